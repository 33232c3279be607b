"""Weights for samplers: a directory that transformers and vLLM load as it is, and a bounded cache
of such directories loaded back for the built-in sampler.

    <home>/<name>/config.json             the served model's config, dtype = serving dtype
    <home>/<name>/generation_config.json
    <home>/<name>/tokenizer files         when the served model directory has a tokenizer
    <home>/<name>/model.safetensors       or model-0000i-of-0000n.safetensors + its index
    <home>/<name>/manifest.json           cispo's record (format, layout, step, owner)

A LoRA run writes a PEFT adapter directory instead (layout "lora"):

    <home>/<name>/adapter_config.json     base_model_name_or_path = the served model
    <home>/<name>/adapter_model.safetensors   in the serving dtype
    <home>/<name>/manifest.json

`<home>` is the sampler directory, or with authentication the identity's own directory in it,
`<sampler_dir>/@<identity>`: names are per identity, as states' are (worker.checkpoint).

or, asked to merge, the "full" layout with the adapter merged into the base weights.

Weights only: no optimizer state. Written by transformers' `save_pretrained` (or PEFT's
helpers), so tied embeddings are stored once, as transformers expects; saved crash-safely and
found like states (`checkpoint.save_directory`, `checkpoint.open_directory`).

Loaded back for the built-in sampler, a full export is a model of its own; an adapter export is
one more frozen adapter on the served model's PEFT model, which costs no copy of the base.
"""

import copy
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from cispo.worker import checkpoint, lora, sharding
from cispo.worker.config import SERVING_DTYPES, ExportConfig
from cispo.worker.errors import StateNotFound
from cispo.worker.model import PolicyModel, check_supported, load_tokenizer

LAYOUTS = ("full", "lora")


@dataclass(frozen=True)
class SamplerWeights:
    """Loaded sampler weights: a model of their own, or a frozen `adapter` on the served model."""

    policy: PolicyModel
    adapter: str | None = None


def export_full(
    policy: PolicyModel, config: ExportConfig, name: str, step: int, owner: str | None, merge_adapter: str | None = None
) -> Path:
    """Write `policy`'s weights (with adapter `merge_adapter` merged in, if given) as an HF model
    directory, `owner`'s `name` (see the module docstring); returns it."""
    dtype = SERVING_DTYPES[config.dtype]
    model = policy.model  # with an adapter, PEFT's base model (PEFT adapts the model in place)

    def write(tmp: Path) -> None:
        hf_logging.disable_progress_bar()
        state = (
            _cast_state(model, dtype)
            if merge_adapter is None
            else {
                k: v.to("cpu", dtype if v.is_floating_point() else v.dtype)
                for k, v in lora.merged_state(policy, merge_adapter).items()
            }
        )
        model.save_pretrained(tmp, state_dict=state, max_shard_size=config.max_shard_bytes)
        _write_config(policy, config, tmp)

    return checkpoint.save_directory(config.sampler_dir, name, write, _full_manifest(policy, config, step), owner)


def _write_config(policy: PolicyModel, config: ExportConfig, directory: Path) -> None:
    """config.json (dtype = the serving dtype), generation_config.json and the tokenizer."""
    model_config = copy.deepcopy(policy.model.config)
    model_config.dtype = config.dtype  # save_pretrained writes the parameters' (fp32) dtype
    model_config.save_pretrained(directory)
    if policy.model.generation_config is not None:
        policy.model.generation_config.save_pretrained(directory)
    if policy.tokenizer is not None:
        policy.tokenizer.save_pretrained(directory)


def _full_manifest(policy: PolicyModel, config: ExportConfig, step: int) -> dict:
    return {
        "format": checkpoint.SAMPLER_FORMAT,
        "layout": "full",
        "step": step,
        "model_name": policy.name,
        "dtype": config.dtype,
    }


def export_full_sharded(
    policy: PolicyModel,
    config: ExportConfig,
    name: str,
    step: int,
    owner: str | None,
    group: torch.distributed.ProcessGroup,
    merge_adapter: str | None = None,
) -> Path | None:
    """export_full for a sharded model (worker.sharding), streamed: every rank of `group`
    all-gathers one parameter at a time (adding adapter `merge_adapter`, whole on every rank,
    to the weights it adapts), and rank 0 writes them into safetensors files of at most
    `max_shard_bytes` (HF's sharded layout and index), so no rank holds the whole model.
    Rank 0 returns the path, the others None; a failure raises on rank 0 after every rank has
    gone through every parameter (so no rank is left waiting in a collective)."""
    dtype = SERVING_DTYPES[config.dtype]
    rank0 = torch.distributed.get_rank(group) == 0
    params = {key: p for key, p in policy.model.named_parameters() if "lora_" not in key}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in lora.merged(policy, merge_adapter, sharding.full_tensors(params)):
            yield key, tensor.detach().to("cpu", dtype)

    if not rank0:
        if sharding.broadcast(None, group):
            for _ in tensors():
                pass
        return None
    sent = False

    def write(tmp: Path) -> None:
        nonlocal sent
        sent = sharding.broadcast(True, group)
        _write_safetensors_shards(tensors(), tmp, config.max_shard_bytes)
        _write_config(policy, config, tmp)

    try:
        return checkpoint.save_directory(config.sampler_dir, name, write, _full_manifest(policy, config, step), owner)
    finally:
        if not sent:
            sharding.broadcast(False, group)


def _write_safetensors_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int
) -> None:
    """Write (key, tensor) pairs as HF does: one model.safetensors, or numbered files of at most
    `max_shard_bytes` each (a bigger tensor alone) plus model.safetensors.index.json. Consumes
    every pair even after a write fails, then raises."""
    part: dict[str, torch.Tensor] = {}  # the file being filled
    files: list[list[str]] = []  # the keys of each file filled, in order
    size, total = 0, 0
    failure: OSError | None = None
    written: list[Path] = []

    def flush() -> None:
        nonlocal failure
        if failure is None and part:
            path = directory / f"part-{len(files) + 1}.safetensors"
            try:
                save_file(part, path, metadata={"format": "pt"})
                written.append(path)
            except OSError as exc:
                failure = exc
        files.append(list(part))  # keep the keys, drop the tensors
        part.clear()

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if part and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        part[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    if failure is not None:
        raise failure
    if len(written) == 1:
        os.rename(written[0], directory / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for path, new in zip(written, names):
        os.rename(path, directory / new)
    weight_map = {key: new for keys, new in zip(files, names) for key in keys}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def export_adapter(
    policy: PolicyModel, config: ExportConfig, adapter: str, name: str, step: int, owner: str | None
) -> Path:
    """Write LoRA adapter `adapter` as a PEFT adapter directory, `owner`'s `name`; returns it."""
    return checkpoint.save_directory(
        config.sampler_dir,
        name,
        lambda tmp: lora.export_adapter(policy, adapter, tmp, SERVING_DTYPES[config.dtype]),
        {
            "format": checkpoint.SAMPLER_FORMAT,
            "layout": "lora",
            "step": step,
            "model_name": policy.name,
            "dtype": config.dtype,
        },
        owner,
    )


def adapter_snapshot(policy: PolicyModel, config: ExportConfig, adapter: str, name: str) -> SamplerWeights:
    """What loading the adapter export just written gives, without reading it back."""
    copy_name = cache_adapter_name(name)
    if copy_name in lora.peft_model(policy).peft_config:
        lora.remove_adapter(policy, copy_name)
    lora.copy_adapter(policy, adapter, copy_name, SERVING_DTYPES[config.dtype])
    return SamplerWeights(policy, copy_name)


def cache_adapter_name(name: str) -> str:
    """The PEFT adapter name under which export `name` is loaded (PEFT forbids dots in it)."""
    return "export_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def snapshot(policy: PolicyModel, config: ExportConfig, name: str) -> SamplerWeights:
    """What loading the export just written gives, without reading it back: a frozen copy of
    the model with weights rounded to the serving dtype (held as `load_dtype` holds them)."""
    params = list(policy.model.parameters())
    no_grads = {id(p.grad): None for p in params if p.grad is not None}  # deepcopy skips gradients
    model = copy.deepcopy(policy.model, memo=no_grads)
    dtype, held = SERVING_DTYPES[config.dtype], load_dtype(policy)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(dtype).to(held)
    return SamplerWeights(
        PolicyModel(
            name=name, model=model, device=policy.device, compute_dtype=policy.compute_dtype, tokenizer=policy.tokenizer
        )
    )


def export_name(config: ExportConfig, model_path: str) -> str:
    """The export a Sample request's `model_path` names: a name, or a path in sampler_dir (or a
    home in it: `checkpoint.check_home` says whose)."""
    return checkpoint.name_in(config.sampler_dir, model_path, "model_path", "sampler export")


def load_export(policy: PolicyModel, config: ExportConfig, name: str, owner: str | None) -> SamplerWeights:
    """Load `owner`'s export `name` for sampling on `policy`'s device and compute dtype."""
    path, manifest = checkpoint.open_directory(config.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)
    if manifest.get("layout") not in LAYOUTS:
        raise StateNotFound(f"sampler weights '{name}' cannot be read: unknown layout {manifest.get('layout')!r}")
    if manifest["layout"] == "lora":
        return _load_adapter_export(policy, path, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation="sdpa", dtype=load_dtype(policy)
        )
        check_supported(model.config)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise StateNotFound(f"sampler weights '{name}' cannot be read: {checkpoint.reason(exc)}") from exc
    if model.get_output_embeddings().weight.shape != policy.head_weight_VD.shape:
        raise StateNotFound(
            f"sampler weights '{name}' do not fit the served model (head shape "
            f"{tuple(model.get_output_embeddings().weight.shape)})"
        )
    model.to(policy.device).eval().requires_grad_(False)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides the bound method from mypy
    return SamplerWeights(
        PolicyModel(
            name=name,
            model=model,
            device=policy.device,
            compute_dtype=policy.compute_dtype,
            tokenizer=load_tokenizer(path),
        )
    )


def _load_adapter_export(policy: PolicyModel, path: Path, name: str) -> SamplerWeights:
    if policy.peft is None:
        raise StateNotFound(
            f"sampler weights '{name}' are a LoRA adapter, and no LoRA run is live on this server "
            "to sample it on; create a LoRA run first"
        )
    try:
        lora.load_adapter(policy, path, cache_adapter_name(name))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise StateNotFound(f"sampler weights '{name}' cannot be read: {checkpoint.reason(exc)}") from exc
    return SamplerWeights(policy, cache_adapter_name(name))


def load_dtype(policy: PolicyModel) -> torch.dtype:
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
    """The most recently used loaded exports, at most `capacity` of them, each kept as what its
    name is to one identity (the one that saved or loaded it). One entry per name: another
    identity's export of that name replaces it (the loaded adapter's name is made from the
    export's name alone). An adapter export leaves the served model's PEFT model when it leaves
    the cache."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._weights: OrderedDict[str, tuple[SamplerWeights, str | None]] = OrderedDict()  # name -> (weights, whose)

    def get(self, name: str, owner: str | None, load) -> SamplerWeights:
        """`owner`'s export `name`, from the cache or else `load()`, which finds it among
        `owner`'s names (or raises)."""
        if name in self._weights and self._weights[name][1] == owner:
            self._weights.move_to_end(name)
            return self._weights[name][0]
        self.forget(name)
        weights = load()
        self.put(name, weights, owner)
        return weights

    def put(self, name: str, weights: SamplerWeights, owner: str | None) -> None:
        """Keep `weights` as `owner`'s export `name`; drops the least recent."""
        if name in self._weights:
            self._drop(self._weights.pop(name)[0], keep=weights)
        if self.capacity == 0 and weights.adapter is None:
            return
        self._weights[name] = (weights, owner)
        while len(self._weights) > max(self.capacity, 1):  # an adapter in use stays until the next
            self._drop(self._weights.popitem(last=False)[1][0])

    def forget(self, name: str) -> None:
        """Drop export `name` (it was replaced on disk by something the cache does not hold)."""
        if name in self._weights:
            self._drop(self._weights.pop(name)[0])

    def drop_adapters(self) -> None:
        """Forget every adapter export (the PEFT model they live on is going away)."""
        for name in [n for n, (w, _) in self._weights.items() if w.adapter is not None]:
            del self._weights[name]

    @staticmethod
    def _drop(weights: SamplerWeights, keep: SamplerWeights | None = None) -> None:
        peft_model = weights.policy.peft
        if (
            weights.adapter is not None
            and (keep is None or keep.adapter != weights.adapter)
            and peft_model is not None
            and weights.adapter in peft_model.peft_config
        ):
            lora.remove_adapter(weights.policy, weights.adapter)

    def __len__(self) -> int:
        return len(self._weights)
