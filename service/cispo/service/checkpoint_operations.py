"""The checkpoint operations' handlers: list, get and delete the caller's saved states and sampler
weights (RemoveExport is a deletion of sampler weights by name)."""

from collections.abc import Callable

from cispo.service.checkpoint_wire import decode_kind, encode_checkpoint
from cispo.service.operation import Call, Prepared
from cispo.v1 import training_pb2 as pb
from cispo.worker import checkpoints
from cispo.worker.checkpoint import state_dir
from cispo.worker.checkpoints import CheckpointInfo


def remove_export(call: Call, request: pb.RemoveExportRequest) -> Prepared[pb.RemoveExportResponse]:
    """DeleteCheckpoint of sampler weights, by name."""
    name = request.name
    state_dir(call.server.runs.config.export.sampler_dir, name)  # a name only: reject a path or bad name
    delete = _deletion(call, name, checkpoints.SAMPLER_WEIGHTS)
    return Prepared(delete, lambda _: (pb.RemoveExportResponse(name=name), {"name": name}))


def delete_checkpoint(call: Call, request: pb.DeleteCheckpointRequest) -> Prepared[pb.DeleteCheckpointResponse]:
    delete = _deletion(call, request.name, decode_kind(request.kind))

    def encode(deleted: CheckpointInfo) -> tuple[pb.DeleteCheckpointResponse, dict[str, object]]:
        response = pb.DeleteCheckpointResponse(checkpoint=encode_checkpoint(deleted))
        return response, {"name": deleted.name, "kind": deleted.kind}

    return Prepared(delete, encode)


def list_checkpoints(call: Call, request: pb.ListCheckpointsRequest) -> Prepared[pb.ListCheckpointsResponse]:
    config, kind, run_id, prefix = (
        call.server.runs.config,
        decode_kind(request.kind),
        request.run_id,
        request.name_prefix,
    )

    def listed() -> list[CheckpointInfo]:
        return [
            c
            for c in checkpoints.list_checkpoints(config, call.owner, kind)
            if c.name.startswith(prefix) and (not run_id or c.run_id == run_id)
        ]

    def encode(found: list[CheckpointInfo]) -> tuple[pb.ListCheckpointsResponse, dict[str, object]]:
        response = pb.ListCheckpointsResponse(checkpoints=[encode_checkpoint(c) for c in found])
        return response, {"checkpoints": len(found)}

    return Prepared(listed, encode)


def get_checkpoint(call: Call, request: pb.GetCheckpointRequest) -> Prepared[pb.GetCheckpointResponse]:
    config = call.server.runs.config
    kind, name = checkpoints.resolve(config, request.name, decode_kind(request.kind), call.owner)

    def encode(found: CheckpointInfo) -> tuple[pb.GetCheckpointResponse, dict[str, object]]:
        return pb.GetCheckpointResponse(checkpoint=encode_checkpoint(found)), {"name": name, "kind": kind}

    return Prepared(lambda: checkpoints.get_checkpoint(config, kind, name, call.owner), encode)


def _deletion(call: Call, name_or_path: str, kind: str | None) -> Callable[[], CheckpointInfo]:
    """The engine call that deletes the caller's checkpoint a request names (checked now)."""
    runs = call.server.runs
    found_kind, name = checkpoints.resolve(runs.config, name_or_path, kind, call.owner)
    return lambda: runs.delete_checkpoint(found_kind, name, call.owner)
