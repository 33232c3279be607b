"""LoRA adapters of training runs, through PEFT: many adapters on one frozen base model.

A LoRA run trains the adapter PEFT injects into the attention projections (`train_attn`), the
MLP projections (`train_mlp`) and the LM head (`train_unembed`):

    W x  ->  W x + (alpha / rank) * B (A x),    A (rank, in) ~ PEFT's Kaiming-uniform, B (out, rank) = 0

so a new adapter leaves the model unchanged, and alpha is fixed at LORA_ALPHA (32) whatever the
rank, as Tinker and PEFT's own defaults do. The initial A is drawn from `seed` alone: the same
seed gives the same adapter, bit for bit.

All adapters live in one `peft.PeftModel` around the served model, which PEFT changes in place
(its Linear layers become LoRA layers). The base is frozen and held once, in the compute dtype
(sharded under `--sharding fsdp`: 1/W of it per rank, the shards cast to the compute dtype); adapter weights are fp32
master weights, whole on every rank of a group. Switching runs is `activate`: PEFT's `set_adapter`,
no reload. Parameters are named canonically (PEFT's names without the adapter's own name), so a
state saved by one run loads into another run of the same shape.
"""

import copy
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from cispo.worker.model import PolicyModel
from cispo.worker.sharding import cast_shards

LORA_ALPHA = 32
# Attention and MLP children of a decoder layer, by the names transformers' models give them.
ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")
MLP_MODULES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run adapts (Tinker's options)."""

    rank: int = 32
    seed: int = 0
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def __post_init__(self):
        if not 1 <= self.rank <= 4096:
            raise ValueError(f"rank must be in [1, 4096], got {self.rank}")
        if not (self.train_mlp or self.train_attn or self.train_unembed):
            raise ValueError("a LoRA run must train something: set train_mlp, train_attn or train_unembed")

    def to_dict(self) -> dict:
        return asdict(self)


def target_modules(policy: PolicyModel, spec: LoraSpec) -> list[str]:
    """Names of the Linear layers `spec` adapts in `policy`'s model, as PEFT matches them: a
    short name ("q_proj") where it picks out exactly those layers, else the full name."""
    base = policy.model  # PEFT adapts it in place: it is also the PEFT model's base model
    output = base.get_output_embeddings()
    head = getattr(output, "base_layer", output)
    linears = {
        name: getattr(m, "base_layer", m)
        for name, m in base.named_modules()
        if isinstance(getattr(m, "base_layer", m), torch.nn.Linear)
        and "lora_" not in name
        and not name.endswith("base_layer")
    }
    chosen: set[str] = set()
    for name, module in linears.items():
        parts = name.split(".")
        if module is head:
            if spec.train_unembed:
                chosen.add(name)
        elif (spec.train_attn and any(p in ATTENTION_MODULES for p in parts)) or (
            spec.train_mlp and any(p in MLP_MODULES for p in parts)
        ):
            chosen.add(name)
    short: dict[str, set[str]] = {}  # last part of a name -> the names that end in it
    for name in linears:
        short.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    out = set()
    for name in chosen:
        suffix = name.rsplit(".", 1)[-1]
        out.add(suffix if short[suffix] <= chosen else name)
    return sorted(out)


def add_adapter(policy: PolicyModel, name: str, spec: LoraSpec) -> dict[str, torch.nn.Parameter]:
    """Give `policy` a new adapter `name` (the first one wraps the model in PEFT and freezes the
    base in the compute dtype); returns its parameters by canonical name."""
    targets = target_modules(policy, spec)
    if not targets:
        raise ValueError(f"{policy.name}: no layers to adapt for {spec}")
    config = LoraConfig(r=spec.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        if policy.peft is None:
            _freeze_base(policy)
            policy.peft = get_peft_model(policy.model, config, adapter_name=name)
        else:
            policy.peft.add_adapter(name, config)
    activate(policy, name)
    return adapter_parameters(policy, name)


def _freeze_base(policy: PolicyModel) -> None:
    """The base frozen in the compute dtype: whole, or, sharded, as FSDP2 shards it casts (it
    gathers them in that dtype anyway, so the computation is the same, in half the bytes)."""
    with torch.no_grad():
        if policy.sharded is not None:
            cast_shards(policy.sharded, policy.compute_dtype)
        for p in policy.model.parameters():
            p.requires_grad_(False)
            p.grad = None
            if p.dtype != policy.compute_dtype:
                p.data = p.data.to(policy.compute_dtype)


def adapter_parameters(policy: PolicyModel, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter `name`, by canonical name (PEFT's, without `.name`)."""
    marker = f".{name}."
    return {n.replace(marker, "."): p for n, p in policy.model.named_parameters() if marker in n and "lora_" in n}


def peft_model(policy: PolicyModel) -> PeftModel:
    """The PEFT model around `policy`'s model; ValueError when no LoRA run is live."""
    if policy.peft is None:
        raise ValueError("no LoRA run is live, so there is no PEFT model")
    return policy.peft


def activate(policy: PolicyModel, name: str) -> None:
    """Make adapter `name` the one the model computes with (no copy, no reload)."""
    peft = peft_model(policy)
    if peft.active_adapter != name:
        peft.set_adapter(name)  # PEFT also makes only the active adapter's parameters trainable


def remove_adapter(policy: PolicyModel, name: str) -> None:
    """Drop adapter `name`; the last one unwraps the model, whose base stays frozen."""
    peft = peft_model(policy)
    if len(peft.peft_config) == 1:
        peft.unload()
        policy.peft = None
    else:
        if peft.active_adapter == name:
            peft.set_adapter(next(a for a in peft.peft_config if a != name))
        peft.delete_adapter(name)


def copy_adapter(policy: PolicyModel, source: str, name: str, dtype: torch.dtype | None = None) -> None:
    """A frozen copy `name` of adapter `source`, its weights rounded through `dtype` if given."""
    peft = peft_model(policy)
    config = peft.peft_config[source]
    peft.add_adapter(name, LoraConfig(**{**config.to_dict(), "inference_mode": True}))
    targets = adapter_parameters(policy, name)
    with torch.no_grad():
        for key, p in adapter_parameters(policy, source).items():
            value = p.detach() if dtype is None else p.detach().to(dtype)
            targets[key].copy_(value)
            targets[key].requires_grad_(False)


def export_adapter(policy: PolicyModel, name: str, directory: Path, dtype: torch.dtype) -> None:
    """Write adapter `name` as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) that `PeftModel.from_pretrained(base, directory)` and vLLM load."""
    from safetensors.torch import save_file

    peft = peft_model(policy)
    state = get_peft_model_state_dict(peft, adapter_name=name, save_embedding_layers=False)
    save_file(
        {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, directory / "adapter_model.safetensors"
    )
    config = copy.deepcopy(peft.peft_config[name])
    config.base_model_name_or_path = policy.name
    config.inference_mode = True
    config.save_pretrained(str(directory))


def load_adapter(policy: PolicyModel, directory: Path, name: str) -> None:
    """Load a PEFT adapter directory as the frozen adapter `name` of `policy`."""
    if policy.peft is None:
        raise ValueError("no LoRA run is live, so there is no PEFT model to load an adapter into")
    policy.peft.load_adapter(str(directory), adapter_name=name, is_trainable=False)


def adapted_weights(policy: PolicyModel, name: str) -> dict[str, Any]:
    """transformers' name of each weight adapter `name` adapts -> its LoRA layer (a PEFT layer
    class such as peft.tuners.lora.Linear, found by its get_delta_weight as PEFT's merge does;
    LoraLayer, their common base, declares no get_delta_weight, hence Any)."""
    return {
        f"{module_name}.weight": module
        for module_name, module in policy.model.named_modules()
        if hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {})
    }


def merged(
    policy: PolicyModel, name: str | None, tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers' name, tensor) of each (PEFT's name, whole tensor) of `tensors` but the
    LoRA weights, adapter `name`'s (alpha/r) B A added in fp32 to each weight it adapts (None:
    no adapter). Lazily: a sharded export gathers one tensor at a time."""
    adapted = {} if name is None else adapted_weights(policy, name)
    for key, tensor in tensors:
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        if clean in adapted:
            tensor = tensor.detach().float() + adapted[clean].get_delta_weight(name).detach().float()
        yield clean, tensor


def merged_state(policy: PolicyModel, name: str) -> dict[str, torch.Tensor]:
    """The served model's state dict (transformers' names) with adapter `name` merged in."""
    return dict(merged(policy, name, policy.model.state_dict().items()))
