"""Weights for samplers: a directory that transformers and vLLM load as it is, and a bounded cache
of such directories loaded back for the built-in sampler.

    <sampler_dir>/<name>/config.json             the served model's config, dtype = serving dtype
    <sampler_dir>/<name>/generation_config.json
    <sampler_dir>/<name>/tokenizer files         when the served model directory has a tokenizer
    <sampler_dir>/<name>/model.safetensors       or model-0000i-of-0000n.safetensors + its index
    <sampler_dir>/<name>/manifest.json           cispo's record (format, layout, step, owner)

Weights only: no optimizer state. Written by transformers' `save_pretrained`, so tied embeddings
are stored once, as transformers expects; saved crash-safely and owned like states
(`checkpoint.save_directory`). `LAYOUTS` names what a directory holds: "full" (HF weights); a
LoRA run's PEFT adapter directory is the other layout to come.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from cispo.worker import checkpoint
from cispo.worker.errors import FieldViolation, InvalidInput, StateNotFound
from cispo.worker.model import PolicyModel, check_supported, load_tokenizer

LAYOUTS = ("full",)
SERVING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExportConfig:
    """Where and how sampler weights are written."""

    sampler_dir: Path = Path("sampler_weights")
    dtype: str = "bfloat16"
    """Serving dtype of the safetensors: bfloat16, float16 or float32."""
    max_shard_bytes: int = 5 * 10**9
    """Above this, the weights are sharded into several files with an index."""
    cache_size: int = 2
    """Exports kept loaded for Sample requests that name one (0: load each time)."""

    def __post_init__(self):
        if self.dtype not in SERVING_DTYPES:
            raise ValueError(f"sampler dtype must be one of {', '.join(SERVING_DTYPES)}, got {self.dtype!r}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")


def export_full(policy: PolicyModel, config: ExportConfig, name: str, step: int, owner: str | None) -> Path:
    """Write `policy`'s weights as an HF model directory `sampler_dir/name` (see the module
    docstring); returns it."""
    dtype = SERVING_DTYPES[config.dtype]

    def write(tmp: Path) -> None:
        hf_logging.disable_progress_bar()
        state = _cast_state(policy.model, dtype)
        policy.model.save_pretrained(tmp, state_dict=state, max_shard_size=config.max_shard_bytes)
        model_config = copy.deepcopy(policy.model.config)
        model_config.dtype = config.dtype  # save_pretrained writes the parameters' (fp32) dtype
        model_config.save_pretrained(tmp)
        if policy.tokenizer is not None:
            policy.tokenizer.save_pretrained(tmp)

    return checkpoint.save_directory(config.sampler_dir, name, write, {
        "format": checkpoint.SAMPLER_FORMAT, "layout": "full", "step": step, "model_name": policy.name,
        "dtype": config.dtype}, owner)


def snapshot(policy: PolicyModel, config: ExportConfig, name: str) -> PolicyModel:
    """What loading the export just written gives, without reading it back: a frozen copy of
    the model with weights rounded to the serving dtype (held as `_load_dtype` holds them)."""
    params = list(policy.model.parameters())
    no_grads = {id(p.grad): None for p in params if p.grad is not None}  # deepcopy skips gradients
    model = copy.deepcopy(policy.model, memo=no_grads)
    dtype, held = SERVING_DTYPES[config.dtype], _load_dtype(policy)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(dtype).to(held)
    return PolicyModel(name=name, model=model, device=policy.device, compute_dtype=policy.compute_dtype,
                       tokenizer=policy.tokenizer)


def export_name(config: ExportConfig, model_path: str) -> str:
    """The export a Sample request's `model_path` names: a name, or a path in sampler_dir."""
    path = Path(model_path)
    if "/" in model_path and path.parent.resolve() != config.sampler_dir.resolve():
        raise InvalidInput([FieldViolation("model_path", f"{checkpoint.shown(model_path)} is not in this server's "
                                                         "sampler directory; give a path SaveWeightsForSampler answered")])
    if not checkpoint.NAME_PATTERN.fullmatch(path.name):
        raise InvalidInput([FieldViolation("model_path", f"{checkpoint.shown(model_path)} names no export: use a path "
                                                         "SaveWeightsForSampler answered, or an export's name")])
    return path.name


def load_export(policy: PolicyModel, config: ExportConfig, name: str,
                owner: str | None) -> tuple[PolicyModel, str | None]:
    """Load `sampler_dir/name` for sampling on `policy`'s device and compute dtype, if `owner`
    may read it: (the model, the export's owner)."""
    path, manifest = checkpoint.open_directory(config.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)
    if manifest.get("layout") not in LAYOUTS:
        raise StateNotFound(f"sampler weights '{name}' cannot be read: unknown layout {manifest.get('layout')!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                                     dtype=_load_dtype(policy))
        check_supported(model.config)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise StateNotFound(f"sampler weights '{name}' cannot be read: {checkpoint.reason(exc)}") from exc
    if model.get_output_embeddings().weight.shape != policy.head_weight_VD.shape:
        raise StateNotFound(f"sampler weights '{name}' do not fit the served model (head shape "
                            f"{tuple(model.get_output_embeddings().weight.shape)})")
    model.to(policy.device).eval().requires_grad_(False)
    return PolicyModel(name=name, model=model, device=policy.device, compute_dtype=policy.compute_dtype,
                       tokenizer=load_tokenizer(path)), manifest["owner"]


def _load_dtype(policy: PolicyModel) -> torch.dtype:
    """Loaded exports hold their weights in the compute dtype (fp32 when computing in fp32)."""
    return policy.compute_dtype if policy.compute_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _cast_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict on the CPU in `dtype`; tensors that share storage (tied) still do."""
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr not in cast:
            cast[ptr] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
        state[key] = cast[ptr]
    return state


class ExportCache:
    """The most recently used loaded exports, by name, at most `capacity` of them."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[str, tuple[PolicyModel, str | None]] = OrderedDict()

    def get(self, name: str, owner: str | None, load) -> PolicyModel:
        """The export `name` if `owner` may read it, from the cache or else `load()`, which
        returns (model, the export's owner) and checks the owner itself."""
        if name in self._models:
            model, saved_by = self._models[name]
            checkpoint.check_owner(name, {"owner": saved_by}, owner)
            self._models.move_to_end(name)
            return model
        model, saved_by = load()
        self.put(name, model, saved_by)
        return model

    def put(self, name: str, model: PolicyModel, saved_by: str | None) -> None:
        """Keep `model` as the export `name`, owned by `saved_by`; drops the least recent."""
        self._models.pop(name, None)
        if self.capacity == 0:
            return
        self._models[name] = (model, saved_by)
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)

    def __len__(self) -> int:
        return len(self._models)
