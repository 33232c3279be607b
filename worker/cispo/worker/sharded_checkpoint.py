"""Sharded training states (`--sharding fsdp`), written with torch.distributed.checkpoint (DCP).

    <checkpoint_dir>/<name>/.metadata, __<rank>_0.distcp   DCP: each rank writes its own shards of
                                   "model/<param>" and "optimizer/<param>/<exp_avg|exp_avg_sq|step>"
    <checkpoint_dir>/<name>/manifest.json                  format "cispo.state.v2", as in v1

No rank ever holds the whole model to save it. A group of any size and either sharding mode
loads such a state (DCP reshards on load; a single process reads it with no process group),
and a sharded group also loads v1 states (worker.checkpoint), each rank taking its shard. The
save is crash-safe as every state is (checkpoint.save_directory): all ranks write into rank 0's
hidden copy, which rank 0 then completes and swaps in, so the ranks must share the checkpoint
directory (a ReadWriteMany volume on Kubernetes).
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cispo.worker import checkpoint
from cispo.worker.errors import StateNotFound
from cispo.worker.sharding import broadcast

WEIGHTS, OPTIMIZER = "model/", "optimizer/"


def state_dict(weights: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DCP's flat state dict: "model/<param>" and "optimizer/<param>/<moment>"."""
    return {**{WEIGHTS + k: v for k, v in weights.items()}, **{OPTIMIZER + k: v for k, v in optimizer.items()}}


def save(
    root: Path, name: str, tensors: dict[str, torch.Tensor], manifest: dict, owner: str | None, group: dist.ProcessGroup
) -> Path | None:
    """Every rank of `group` together: write `tensors` (a `state_dict`, DTensors sharded over
    the group) as state `name`. Rank 0 checks the name and owner first, and alone completes
    the save; it returns the state's path (other ranks None). A failure on any rank raises on
    every rank, and leaves any earlier state of that name as it was."""
    if dist.get_rank(group) != 0:
        tmp = broadcast(None, group)
        if tmp is not None:
            dcp.save(tensors, checkpoint_id=tmp, process_group=group)
        return None
    sent = False

    def write(tmp: Path) -> None:
        nonlocal sent
        sent = True
        dcp.save(tensors, checkpoint_id=broadcast(str(tmp), group), process_group=group)

    try:
        return checkpoint.save_directory(root, name, write, {**manifest, "format": checkpoint.SHARDED_FORMAT}, owner)
    finally:
        if not sent:  # refused before writing: release the other ranks
            broadcast(None, group)


def saved_tensors(path: Path, name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """(shape, dtype) of every tensor of the v2 state at `path`, by state-dict key (reads only
    DCP's metadata); a non-tensor entry has dtype None."""
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:
        raise StateNotFound(f"state '{name}' cannot be read: .metadata: {checkpoint.reason(exc)}") from exc
    return {
        key: (tuple(entry.size), entry.properties.dtype) if isinstance(entry, TensorStorageMetadata) else ((), None)
        for key, entry in metadata.state_dict_metadata.items()
    }


def load(path: Path, name: str, targets: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Fill `targets` (a `state_dict` of fresh tensors laid out as the run's: shards or whole)
    from the v2 state at `path`: every rank of `group` together, or this process alone (None)."""
    try:
        dcp.load(targets, checkpoint_id=path, process_group=group, no_dist=group is None)
    except Exception as exc:
        raise StateNotFound(f"state '{name}' cannot be read: {checkpoint.reason(exc)}") from exc
