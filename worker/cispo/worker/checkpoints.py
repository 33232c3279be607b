"""Checkpoints as their owners see them: saved states (worker.checkpoint) and sampler weights
(worker.sampler_weights), each with what its manifest records of it (its step, the time it was
saved, when it expires, the run that saved it, the caller's own metadata) and its size.

A save is labelled (`SaveLabel`, written into the manifest with it by `checkpoint.labelled`);
listed, looked up and deleted per identity, in the identity's own home of each directory; swept
once expired (`expired`, which the service's sweeper deletes in the order of its operations);
and bounded per identity by `max_checkpoint_bytes` (`check_room`, before anything is written).
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cispo.worker import checkpoint
from cispo.worker.config import SERVING_DTYPES, EngineConfig
from cispo.worker.errors import FieldViolation, InvalidInput, LimitExceeded

STATE, SAMPLER_WEIGHTS = "state", "sampler_weights"
KINDS = (STATE, SAMPLER_WEIGHTS)
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
MAX_METADATA_BYTES = 8192  # keys and values, UTF-8
MAX_TTL_SECONDS = 10 * 365 * 86400
STATE_BYTES_PER_PARAMETER = 12  # fp32 weights and AdamW's two fp32 moments


@dataclass(frozen=True)
class SaveLabel:
    """What a save records beside its files: the caller's metadata, its lifetime (None: until
    deleted) and the run that saves it. InvalidInput naming the field if out of bounds."""

    user_metadata: Mapping[str, str]
    ttl_seconds: int | None
    run_id: str

    def __post_init__(self) -> None:
        problems = []
        if self.ttl_seconds is not None and not 0 < self.ttl_seconds <= MAX_TTL_SECONDS:
            problems.append(
                FieldViolation(
                    "ttl_seconds",
                    f"{self.ttl_seconds} is not a lifetime: give 1 to {MAX_TTL_SECONDS} seconds, or leave it unset "
                    "to keep the checkpoint until it is deleted",
                )
            )
        problem = metadata_problem(self.user_metadata)
        if problem:
            problems.append(FieldViolation("user_metadata", problem))
        if problems:
            raise InvalidInput(problems)

    def fields(self, lora: dict | None = None) -> dict:
        """The manifest fields of a save made now (`lora`: a LoRA run's options, for an export)."""
        expires = None if self.ttl_seconds is None else time.time() + self.ttl_seconds
        fields = {"expires": expires, "user_metadata": dict(self.user_metadata), "run_id": self.run_id}
        return fields if lora is None else {**fields, "lora": lora}


def metadata_problem(metadata: Mapping[str, str]) -> str | None:
    """What is wrong with a checkpoint's user metadata (too many entries, too long, not UTF-8), or None."""
    if len(metadata) > MAX_METADATA_ENTRIES:
        return f"it has {len(metadata)} entries, more than {MAX_METADATA_ENTRIES}"
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
            return f"key {checkpoint.shown(key)} is {len(key)} characters long; give 1 to {MAX_METADATA_KEY_CHARS}"
        if len(value) > MAX_METADATA_VALUE_CHARS:
            return f"the value of {checkpoint.shown(key)} is {len(value)} characters long, more than {MAX_METADATA_VALUE_CHARS}"
    try:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return "a key or value is not valid Unicode text (a lone surrogate)"
    if size > MAX_METADATA_BYTES:
        return f"its keys and values are {size} bytes (UTF-8), more than {MAX_METADATA_BYTES}"
    return None


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as ListCheckpoints describes it."""

    name: str
    kind: str  # STATE or SAMPLER_WEIGHTS
    path: str  # as its save answered it
    step: int
    created: float  # Unix time (0: saved by an earlier version, which did not record it)
    expires: float | None
    size_bytes: int
    user_metadata: dict[str, str]
    lora: dict | None  # a LoRA run's options
    run_id: str  # "" when not recorded


def _root(config: EngineConfig, kind: str) -> tuple[Path, str | tuple[str, ...]]:
    """(the directory, the manifest formats) of checkpoints of `kind`."""
    if kind == STATE:
        return config.checkpoint_dir, checkpoint.STATE_FORMATS
    return config.export.sampler_dir, checkpoint.SAMPLER_FORMAT


def _info(kind: str, name: str, path: Path, manifest: dict) -> CheckpointInfo:
    metadata = manifest.get("user_metadata")
    expires, created, lora = manifest.get("expires"), manifest.get("created"), manifest.get("lora")
    return CheckpointInfo(
        name=name,
        kind=kind,
        path=str(path) if kind == STATE else str(path.absolute()),  # as SaveState / the export answer
        step=manifest["step"],
        created=float(created) if isinstance(created, (int, float)) else 0.0,
        expires=float(expires) if isinstance(expires, (int, float)) else None,
        size_bytes=checkpoint.directory_bytes(path),
        user_metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
        lora=lora if isinstance(lora, dict) else None,
        run_id=str(manifest.get("run_id") or ""),
    )


def list_checkpoints(config: EngineConfig, owner: str | None, kind: str | None = None) -> list[CheckpointInfo]:
    """`owner`'s checkpoints (of `kind`; None: both), oldest first."""
    found = []
    for k in KINDS if kind is None else (kind,):
        root, formats = _root(config, k)
        found += [_info(k, name, path, manifest) for name, path, manifest in checkpoint.saved_in(root, owner, formats)]
    return sorted(found, key=lambda c: (c.created, c.kind, c.name))


def resolve(config: EngineConfig, name_or_path: str, kind: str | None, owner: str | None) -> tuple[str, str]:
    """(kind, name) of the checkpoint a request names: a name and its `kind`, or the path its
    save answered (in `owner`'s home; another's answers as missing). InvalidInput otherwise."""
    if "/" not in name_or_path:
        if kind is None:
            raise InvalidInput([FieldViolation("kind", "give the checkpoint's kind with its name (or give its path)")])
        return kind, checkpoint.check_name(name_or_path)
    failures = []
    for k in KINDS if kind is None else (kind,):
        root, formats = _root(config, k)
        try:
            name = checkpoint.name_in(root, name_or_path, "name", "state" if k == STATE else "sampler export")
        except InvalidInput as exc:
            failures.append(exc)
            continue
        checkpoint.check_home(root, name_or_path, owner, formats)
        return k, name
    if len(failures) == 1:
        raise failures[0]
    raise InvalidInput(
        [
            FieldViolation(
                "name",
                f"{checkpoint.shown(name_or_path)} is no checkpoint of this server (its states are in "
                f"{config.checkpoint_dir}, its sampler weights in {config.export.sampler_dir}); give a path a save "
                "answered, or a name and its kind",
            )
        ]
    )


def get_checkpoint(config: EngineConfig, kind: str, name: str, owner: str | None) -> CheckpointInfo:
    """`owner`'s checkpoint `name` of `kind`; StateNotFound as for a missing one otherwise."""
    root, formats = _root(config, kind)
    path, manifest = checkpoint.open_directory(root, name, formats, owner)
    return _info(kind, name, path, manifest)


def delete_checkpoint(config: EngineConfig, kind: str, name: str, owner: str | None) -> CheckpointInfo:
    """Delete `owner`'s checkpoint `name` of `kind` crash-safely (checkpoint.remove_directory);
    returns it as it was."""
    found = get_checkpoint(config, kind, name, owner)
    root, formats = _root(config, kind)
    checkpoint.remove_directory(root, name, formats, owner)
    return found


def expired(config: EngineConfig, now: float) -> list[tuple[str, str, str | None]]:
    """(kind, name, owner) of every checkpoint, whoever owns it, whose lifetime ended by `now`."""
    found = []
    for kind in KINDS:
        root, formats = _root(config, kind)
        for owner, name, manifest in checkpoint.saved_everywhere(root, formats):
            expires = manifest.get("expires")
            if isinstance(expires, (int, float)) and expires <= now:
                found.append((kind, name, owner))
    return found


def state_bytes(trainable_parameters: int) -> int:
    """What a state of this many trainable parameters takes on disk, about (its tensors)."""
    return STATE_BYTES_PER_PARAMETER * trainable_parameters


def export_bytes(parameters: int, dtype: str) -> int:
    """What sampler weights of this many parameters in the serving `dtype` take, about."""
    return parameters * SERVING_DTYPES[dtype].itemsize


def check_room(config: EngineConfig, owner: str | None, kind: str, name: str, size: Callable[[], int]) -> None:
    """LimitExceeded (max_checkpoint_bytes) unless `owner`'s checkpoints, with a save of `size()`
    bytes (estimated only when there is a limit) as `name` of `kind`, replacing any earlier one
    of that name, fit the limit."""
    limit = config.max_checkpoint_bytes
    if not limit:
        return
    needed = size()
    used = sum(c.size_bytes for c in list_checkpoints(config, owner))
    replaced = sum(c.size_bytes for c in list_checkpoints(config, owner, kind) if c.name == name)
    available = max(limit - used + replaced, 0)
    if needed > available:
        raise LimitExceeded(
            "max_checkpoint_bytes",
            f"saving {kind.replace('_', ' ')} '{name}' needs about {needed} bytes and {available} of your "
            f"--max-checkpoint-bytes {limit} are available ({used} in use); delete checkpoints "
            "(ListCheckpoints, DeleteCheckpoint) first",
        )
