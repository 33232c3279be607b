"""Checkpoints on the wire: cispo.v1's CheckpointKind and Checkpoint, to and from the worker's
(worker.checkpoints), for every door."""

from cispo.service import convert
from cispo.v1 import training_pb2 as pb
from cispo.worker import FieldViolation, InvalidInput, checkpoints
from cispo.worker.checkpoints import CheckpointInfo
from cispo.worker.lora import LoraSpec

KINDS_BY_ENUM: dict[pb.CheckpointKind, str | None] = {
    pb.CHECKPOINT_KIND_UNSPECIFIED: None,
    pb.CHECKPOINT_KIND_STATE: checkpoints.STATE,
    pb.CHECKPOINT_KIND_SAMPLER_WEIGHTS: checkpoints.SAMPLER_WEIGHTS,
}
ENUMS_BY_KIND: dict[str, pb.CheckpointKind] = {k: e for e, k in KINDS_BY_ENUM.items() if k is not None}


def decode_kind(kind: pb.CheckpointKind) -> str | None:
    """The checkpoint kind a request names (None: unspecified); InvalidInput for an unknown one."""
    if kind not in KINDS_BY_ENUM:
        raise InvalidInput([FieldViolation("kind", f"{kind} is not a CheckpointKind")])
    return KINDS_BY_ENUM[kind]


def encode_checkpoint(found: CheckpointInfo) -> pb.Checkpoint:
    try:
        lora = convert.encode_lora_config(LoraSpec(**found.lora)) if found.lora else None
    except (TypeError, ValueError):  # options this version does not know: left out
        lora = None
    return pb.Checkpoint(
        name=found.name,
        kind=ENUMS_BY_KIND[found.kind],
        path=found.path,
        step=found.step,
        created_time=found.created,
        expires_time=found.expires,
        size_bytes=found.size_bytes,
        user_metadata=found.user_metadata,
        lora_config=lora,
        run_id=found.run_id,
    )
