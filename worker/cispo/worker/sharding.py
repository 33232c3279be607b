"""Sharded parameters, gradients and AdamW state across a data-parallel group, with FSDP2.

    --sharding replicated   every rank holds the whole fp32 model, gradient and moments
                            (16 bytes per parameter per rank); gradients are all-reduced before
                            each step (worker.group)
    --sharding fsdp         `torch.distributed.fsdp.fully_shard` per decoder layer, then a root
                            group for the embeddings, final norm and LM head: each rank holds
                            1/W of the fp32 master weights, gradients and moments

Under fsdp the compute runs in the compute dtype (FSDP2's `MixedPrecisionPolicy`: parameters
all-gathered in bf16 on GPU), and gradients are reduce-scattered in fp32 as sums (the loss is a
sum, so the divide factor is 1). The engine runs the model as a `Trunk`: the decoder's hidden
states plus the LM head's unsharded weight, which the chunked head uses as it is (still no
(tokens x V) logits); the head's weight gradient goes back through autograd, so FSDP2 reduces
it with the others; an adapted head adds its LoRA delta to the gathered weight. Every rank
must run the same number of trunk passes per operation, since each pass all-gathers: a rank
with fewer micro-batches runs padding ones (engine). A LoRA run's frozen base has no master
weights: its shards are cast to the compute dtype (`cast_shards`).
"""

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel

SHARDING_MODES = ("replicated", "fsdp")
Picklable = TypeVar("Picklable")


class Trunk(torch.nn.Module):
    """The decoder and the LM head of a causal LM, as one module FSDP2 can own as its root."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()  # a child, so that FSDP2's root owns the head
        self._output_embeddings = model.get_output_embeddings  # PEFT's LoRA layer once it adapts the head

    def forward(
        self, input_ids_1T: torch.Tensor, position_ids_1T: torch.Tensor, **attention_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((T, D) hidden states, (V, D) head weight as computed with, differentiable)."""
        out = self.decoder(input_ids=input_ids_1T, position_ids=position_ids_1T, use_cache=False, **attention_kwargs)
        weight_VD = output_weight(self._output_embeddings())
        # A view, so that FSDP2's backward hook goes on this pass's output, not on the parameter.
        return out.last_hidden_state[0], weight_VD.view(weight_VD.shape)


class ShardedTrunk(FSDPModule, Trunk):
    """A Trunk after `fully_shard`, which swaps its class for one deriving from FSDPModule and
    Trunk (so it has `reshard`, `unshard`): the type `shard_model` returns; never built."""


def output_weight(head: torch.nn.Module) -> torch.Tensor:
    """The LM head's (V, D) weight, plus the active LoRA adapters' (alpha/r) B A when PEFT
    adapts the head (differentiable w.r.t. A and B; still no (tokens x V) logits)."""
    weight = head.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the LM head {type(head).__name__} has no weight tensor")
    if not hasattr(head, "get_delta_weight"):
        return weight
    lora_head: Any = head  # peft's LoRA Linear (peft.tuners.lora.Linear), found by duck typing as PEFT does
    adapters = [a for a in lora_head.active_adapters if a in lora_head.lora_A]
    return lora_head.base_layer.weight + sum(lora_head.get_delta_weight(a) for a in adapters) if adapters else weight


def shard_model(
    model: PreTrainedModel, compute_dtype: torch.dtype, weights: Path | None = None, device: torch.device | None = None
) -> ShardedTrunk:
    """Shard `model`'s parameters in place over the default process group; returns its Trunk,
    the FSDP2 root the engine computes through.

    `weights`: an HF checkpoint directory to read the parameters from, when `model`'s are on
    the meta device (its buffers real): each rank allocates its shards on `device` and reads
    the checkpoint one tensor at a time, so it never holds more than one whole tensor."""
    low_precision = compute_dtype in (torch.bfloat16, torch.float16)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype if low_precision else None, reduce_dtype=torch.float32)
    trunk = Trunk(model)
    for layer in trunk.decoder.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(trunk, mp_policy=policy)
    sharded = cast(ShardedTrunk, trunk)  # fully_shard changed its class
    for module in sharded.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sums, as the loss is a sum
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    if weights is not None:
        if device is None:
            raise ValueError("shard_model: reading `weights` needs the `device` to allocate the shards on")
        _read_shards(model, weights, device)
    # One pass of one token makes the trunk FSDP2's root before anything else runs a layer.
    device = next(sharded.parameters()).device
    with torch.no_grad():
        sharded(
            torch.zeros((1, 1), dtype=torch.int64, device=device), torch.zeros((1, 1), dtype=torch.int64, device=device)
        )
    sharded.reshard()
    return sharded


def cast_shards(trunk: Trunk, dtype: torch.dtype) -> None:
    """Cast the shards of `trunk`'s parameters to `dtype` in place (FSDP2 follows Module.to),
    its buffers kept as they were (rotary frequencies stay fp32, as in an unsharded model)."""
    buffers = list(trunk.named_buffers())
    trunk.to(dtype)
    for name, buffer in buffers:
        owner, _, leaf = name.rpartition(".")
        setattr(trunk.get_submodule(owner), leaf, buffer)


def _read_shards(model: torch.nn.Module, directory: Path, device: torch.device) -> None:
    """Materialise `model`'s meta parameters as this rank's fp32 shards on `device`, read from
    the safetensors files of `directory` one whole tensor at a time (buffers kept as they are)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        index = directory / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        params = dict(model.named_parameters())  # tied weights once
        found = set()
        for file in files:
            with safe_open(directory / file, "pt") as f:
                for key in f.keys():  # noqa: SIM118  # a safetensors handle, not a dict: keys() but no __iter__
                    if key in params:
                        param = params[key]
                        local(param).copy_(local(like(param, f.get_tensor(key).to(torch.float32))))
                        found.add(key)
        missing = sorted(set(params) - found)
        if missing:
            raise ValueError(
                f"{directory}: the checkpoint has no tensor for {missing[:3]} "
                f"({len(missing)} parameters); it cannot be loaded sharded"
            )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor` (a DTensor's local shard; any other tensor as it is)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the default group (in place; returned)."""
    dist.all_reduce(value)
    return value


def broadcast(value: Picklable, group: dist.ProcessGroup) -> Picklable:
    """Rank 0's picklable `value`, on every rank of `group`."""
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def first_failure(failure: Exception | None, group: dist.ProcessGroup) -> Exception | None:
    """The lowest rank's failure (pickled across), or None when no rank of `group` failed: so
    that every rank goes on to a collective, or none does."""
    outcomes: list[Exception | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, failure, group=group)
    return next((f for f in outcomes if f is not None), None)


def like(tensor: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (the whole tensor, on every rank) laid out as `tensor` is: its shard of it for a
    DTensor (no communication), else `full` itself on `tensor`'s device. A DTensor `full` is
    already laid out."""
    if isinstance(full, DTensor) or not isinstance(tensor, DTensor):
        return full.to(tensor.device)
    return distribute_tensor(
        full.to(tensor.device, tensor.dtype), tensor.device_mesh, tensor.placements, src_data_rank=None
    )


def full_tensors(named: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, the whole tensor) one at a time, all-gathered where sharded: a collective, so
    every rank iterates together; at most one whole tensor is alive at a time."""
    for name, tensor in named.items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class MemoryUse:
    """Bytes this rank holds for training state."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


# Bytes per trainable parameter: the fp32 master weight, its fp32 gradient, AdamW's two fp32 moments.
BYTES_PER_PARAMETER = MemoryUse(parameters=4, gradients=4, optimizer=8)


def state_bytes(num_parameters: int, world_size: int = 1, sharding: str = "replicated") -> MemoryUse:
    """What one rank holds of a run with `num_parameters` trainable parameters after a
    forward_backward that follows a step (the accounting `Engine.memory_use` reports and
    docs/scaling.md tabulates): BYTES_PER_PARAMETER each, or 1/W of them under fsdp (a shard
    of every tensor; AdamW's per-tensor step counters, 4 bytes each, are left out)."""
    share = -(-num_parameters // world_size) if sharding == "fsdp" else num_parameters
    b = BYTES_PER_PARAMETER
    return MemoryUse(b.parameters * share, b.gradients * share, b.optimizer * share)


def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of this rank's parts of `tensors` (None entries count 0)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)
