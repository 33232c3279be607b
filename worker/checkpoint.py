"""Saved training states: weights and optimizer moments in safetensors plus a JSON manifest.

    <checkpoint_dir>/<name>/model.safetensors      parameters by name (fp32)
    <checkpoint_dir>/<name>/optimizer.safetensors  AdamW moments "<param>/<exp_avg|exp_avg_sq|step>"
    <checkpoint_dir>/<name>/manifest.json          format, step, model name, parameter count

A state is written into a hidden temporary directory and renamed into place, so a reader sees
either the old state or the new one, never half of one. Names are plain file names and can never
reach outside the checkpoint directory. States are full (not sharded): a group of any size can
load what a group of another size saved.
"""

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cispo.worker.errors import FieldViolation, InvalidInput, StateNotFound

FORMAT = "cispo.state.v1"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MODEL_FILE, OPTIMIZER_FILE, MANIFEST_FILE = "model.safetensors", "optimizer.safetensors", "manifest.json"


@dataclass(frozen=True)
class LoadedState:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    step: int
    manifest: dict


def state_dir(root: Path, name: str) -> Path:
    """`root/name`, after checking that `name` is a plain, safe file name."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput([FieldViolation(
            "name", f"{name!r} is not a valid state name: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )])
    path = (root / name).resolve()
    assert path.parent == root.resolve(), "state name escaped the checkpoint directory"
    return path


def save_state(root: Path, name: str, weights: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor],
               step: int, model_name: str) -> Path:
    """Write the state atomically; an existing state of that name is replaced."""
    target = state_dir(root, name)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / MODEL_FILE)
        save_file(optimizer, tmp / OPTIMIZER_FILE)
        manifest = {"format": FORMAT, "step": step, "model_name": model_name, "num_tensors": len(weights)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if target.exists():
            old = root / f".old-{name}-{uuid.uuid4().hex}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_state(root: Path, name: str, with_optimizer: bool) -> LoadedState:
    """Read a whole state into memory (nothing is applied here)."""
    path = state_dir(root, name)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise StateNotFound(f"no saved state named '{name}' in the checkpoint directory")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise StateNotFound(f"state '{name}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
    weights = load_file(path / MODEL_FILE)
    optimizer = load_file(path / OPTIMIZER_FILE) if with_optimizer else {}
    return LoadedState(weights=weights, optimizer=optimizer, step=int(manifest["step"]), manifest=manifest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
