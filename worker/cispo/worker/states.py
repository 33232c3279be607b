"""A run's saved states: its trainable weights, optimizer moments and step count, written to
and read back from the checkpoint directory in both formats.

v1 (worker.checkpoint): whole tensors in safetensors files, written by one process. v2
(worker.sharded_checkpoint): torch.distributed.checkpoint shards, written by every rank of a
group whose state is sharded (FSDP2). Either is read into a run of any layout whose tensors fit.
"""

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cispo.worker import checkpoint, sharded_checkpoint
from cispo.worker.errors import ComputeFailed, PermissionDenied, StateNotFound
from cispo.worker.lora import LoraSpec
from cispo.worker.optimizer import MOMENTS, Optimizer
from cispo.worker.sharding import first_failure, like

# A saved tensor's (shape, dtype), by name.
TensorMeta = dict[str, tuple[tuple[int, ...], torch.dtype | None]]  # dtype None: a non-tensor entry


@dataclass(frozen=True)
class FoundState:
    """A saved state checked to fit the run: where it is, its manifest, the saved moments' keys,
    and the whole v1 state (None for v2, read shard by shard)."""

    path: Path
    manifest: dict
    moments: list[str]
    whole: checkpoint.LoadedState | None


@dataclass
class RunStates:
    """Saves and loads one run's state: `named_params` and `optimizer`, under the manifest of
    `model_name` and `lora_spec`. Sharded (`sharded`), every rank of `group` takes part."""

    directory: Path
    model_name: str
    named_params: dict[str, torch.nn.Parameter]
    optimizer: Optimizer
    lora_spec: LoraSpec | None
    sharded: bool
    group: dist.ProcessGroup | None

    def save(self, name: str, owner: str | None) -> Path | None:
        """Write weights, optimizer state and step count under `name`, owned by `owner`
        (None: anyone; PermissionDenied if another identity owns the name). Sharded state, every
        rank calls it and writes its shards (a v2 state); rank 0 returns the path, the others None."""
        lora = self.lora_spec.to_dict() if self.lora_spec is not None else None
        step = self.optimizer.step_count
        with save_failures(f"state '{name}'", "state"):
            if self.sharded:
                assert self.group is not None, "a sharded state is saved by its group"
                manifest = {
                    "step": step,
                    "model_name": self.model_name,
                    "num_tensors": len(self.named_params),
                    "lora": lora,
                }
                tensors = sharded_checkpoint.state_dict(dict(self.named_params), self.optimizer.moments())
                return sharded_checkpoint.save(self.directory, name, tensors, manifest, owner, self.group)
            return checkpoint.save_state(
                self.directory,
                name,
                dict(self.named_params),
                self.optimizer.state_tensors(),
                step,
                self.model_name,
                owner=owner,
                lora=lora,
            )

    def load(self, name: str, with_optimizer: bool, owner: str | None, on_change: Callable[[], None]) -> int:
        """Restore weights (and, if asked, optimizer state and step count; else a fresh
        optimizer at step 0). Drops the accumulated gradient. Returns the state's step count.
        Checks every tensor's name, shape and dtype before changing anything. Reads v1 and v2
        states; sharded state, every rank calls it, and the ranks agree on the checks before any
        of them reads tensors. `on_change()` is called just before the weights change."""
        failure: Exception | None = None
        found: FoundState | None = None
        try:
            found = self._find(name, with_optimizer, owner)
        except Exception as exc:
            failure = exc
        if self.sharded:
            assert self.group is not None, "a sharded state is loaded by its group"
            failure = first_failure(failure, self.group)
        if failure is not None:
            raise failure
        assert found is not None
        state = found.whole
        if state is None:  # v2: into fresh tensors laid out as the run's, then copied: all or nothing
            targets = sharded_checkpoint.state_dict(
                {n: torch.empty_like(p.detach()) for n, p in self.named_params.items()},
                {k: self._empty_moment(k) for k in found.moments},
            )
            sharded_checkpoint.load(found.path, name, targets, self.group if self.sharded else None)
            state = checkpoint.LoadedState(
                weights={n: targets[sharded_checkpoint.WEIGHTS + n] for n in self.named_params},
                optimizer={k: targets[sharded_checkpoint.OPTIMIZER + k] for k in found.moments},
                step=found.manifest["step"],
                manifest=found.manifest,
            )
        on_change()
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(like(p, state.weights[n]))
                p.grad = None
        if with_optimizer:
            self.optimizer.load_state_tensors(state.optimizer, state.step)
        else:
            self.optimizer.reset()
        return state.step

    def _find(self, name: str, with_optimizer: bool, owner: str | None) -> FoundState:
        """State `name`, checked to fit this run; StateNotFound/PermissionDenied otherwise."""
        path, manifest = checkpoint.open_directory(self.directory, name, checkpoint.STATE_FORMATS, owner)
        saved_lora = manifest.get("lora")
        if (saved_lora is None) != (self.lora_spec is None):
            raise StateNotFound(
                f"state '{name}' is {'a LoRA' if saved_lora else 'a full fine-tuning'} state and this "
                f"run is {'a LoRA' if self.lora_spec else 'a full fine-tuning'} run; create a run from "
                "the state instead"
            )
        state = None
        weights: TensorMeta
        moments: TensorMeta
        if manifest["format"] == checkpoint.SHARDED_FORMAT:
            saved = sharded_checkpoint.saved_tensors(path, name)
            weights = {
                k.removeprefix(sharded_checkpoint.WEIGHTS): v
                for k, v in saved.items()
                if k.startswith(sharded_checkpoint.WEIGHTS)
            }
            moments = (
                {
                    k.removeprefix(sharded_checkpoint.OPTIMIZER): v
                    for k, v in saved.items()
                    if k.startswith(sharded_checkpoint.OPTIMIZER)
                }
                if with_optimizer
                else {}
            )
            odd = sorted(
                k for k in saved if not k.startswith((sharded_checkpoint.WEIGHTS, sharded_checkpoint.OPTIMIZER))
            )
            if odd:
                raise StateNotFound(f"state '{name}' cannot be read: unexpected entries {odd[:3]}")
        else:
            state = checkpoint.read_state(path, manifest, name, with_optimizer)
            weights = {k: (tuple(t.shape), t.dtype) for k, t in state.weights.items()}
            moments = {k: (tuple(t.shape), t.dtype) for k, t in state.optimizer.items()}
        self._check_fits(name, weights, moments)
        return FoundState(path, manifest, list(moments), state)

    def _check_fits(self, name: str, weights: TensorMeta, moments: TensorMeta) -> None:
        """StateNotFound unless the saved (shape, dtype) of `weights` and `moments` fit this run."""
        expected = {n: tuple(p.shape) for n, p in self.named_params.items()}
        found = {n: shape for n, (shape, _) in weights.items()}
        shapes = {f"{n}/{k}": (() if k == "step" else shape) for n, shape in expected.items() for k in MOMENTS}
        odd_moments = sorted(k for k, (shape, _) in moments.items() if shapes.get(k) != shape)[:3]
        if odd_moments or not all(
            dtype is not None and dtype.is_floating_point for _, dtype in [*weights.values(), *moments.values()]
        ):
            raise StateNotFound(
                f"state '{name}' cannot be read: its optimizer state does not fit this model "
                f"(unexpected or reshaped {odd_moments}) or it holds non-float tensors"
            )
        if found != expected:
            missing = sorted(set(expected) - set(found))[:3]
            unexpected = sorted(set(found) - set(expected))[:3]
            reshaped = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])[:3]
            raise StateNotFound(
                f"state '{name}' does not fit this model (missing {missing}, unexpected {unexpected}, "
                f"different shapes {reshaped})"
            )

    def _empty_moment(self, key: str) -> torch.Tensor:
        """A fresh tensor for saved moment `key` ("<param>/<moment>"), laid out as its parameter."""
        param, _, moment = key.rpartition("/")
        if moment == "step":
            return torch.zeros((), dtype=torch.float32)
        return torch.empty_like(self.named_params[param].detach())


@contextmanager
def save_failures(what: str, kind: str) -> Iterator[None]:
    """A save that fails on the filesystem (e.g. the volume is full) as ComputeFailed; the
    earlier copy of that name is unchanged. PermissionDenied, an OSError too, passes as it is."""
    try:
        yield
    except PermissionDenied:
        raise
    except OSError as exc:
        raise ComputeFailed(
            f"saving {what} failed ({exc.strerror or exc}); any earlier {kind} of that name is unchanged",
            out_of_memory=exc.errno == errno.ENOSPC,
        ) from exc
