"""Training data as the engine sees it: one `Sample` per datum, plus packed micro-batches."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# Loss input names and the kind of tensor each must be.
LOSS_INPUT_KINDS: dict[str, str] = {
    "target_tokens": "int",
    "logprobs": "float",
    "advantages": "float",
    "weights": "float",
    "sequence_ratio_mask": "float",
}

# What an optional loss input is for a datum that does not give it.
OPTIONAL_INPUT_DEFAULTS: dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = {
    "sequence_ratio_mask": lambda inputs: (inputs["advantages"] != 0).float(),  # the active tokens
}


@dataclass(frozen=True)
class Sample:
    """One datum on the CPU: `model_input` (N,) int token ids; `loss_fn_inputs` maps
    names of LOSS_INPUT_KINDS to (N,) tensors (validated by `validation.validate_batch`)."""

    model_input: torch.Tensor
    loss_fn_inputs: Mapping[str, torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.model_input.shape[0])


@dataclass(frozen=True)
class MicroBatch:
    """Datums packed into one sequence; `position_ids` restart at 0 at each datum, which
    the model turns into a block-diagonal causal mask (no attention across datums).

    indices: which datums of the request, in packed order; lengths: their lengths.
    input_ids_1T, position_ids_1T: (1, T) int64; the loss inputs are (T,) or None.
    """

    indices: list[int]
    lengths: list[int]
    input_ids_1T: torch.Tensor
    position_ids_1T: torch.Tensor
    target_tokens_T: torch.Tensor
    logprobs_T: torch.Tensor | None
    advantages_T: torch.Tensor | None
    weights_T: torch.Tensor | None
    sequence_ratio_mask_T: torch.Tensor | None = None


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group datum indices into micro-batches of at most `token_budget` tokens.

    First-fit decreasing: few micro-batches, no padding. A datum longer than the budget
    gets a micro-batch of its own. Deterministic for given lengths.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return bins


def pack(samples: list[Sample], indices: list[int], input_names: tuple[str, ...], device: torch.device) -> MicroBatch:
    """Concatenate `samples[indices]` into one MicroBatch on `device`, with the loss inputs
    named in `input_names` (the others are left None)."""
    chosen = [samples[i] for i in indices]
    lengths = [s.length for s in chosen]

    def cat(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        if name not in input_names:
            return None
        default = OPTIONAL_INPUT_DEFAULTS.get(name)
        parts = [s.loss_fn_inputs[name] if name in s.loss_fn_inputs or default is None else default(s.loss_fn_inputs)
                 for s in chosen]
        return torch.cat(parts).to(device=device, dtype=dtype)

    positions = torch.cat([torch.arange(n) for n in lengths])
    return MicroBatch(
        indices=list(indices),
        lengths=lengths,
        input_ids_1T=torch.cat([s.model_input for s in chosen]).to(device=device, dtype=torch.int64)[None],
        position_ids_1T=positions.to(device)[None],
        target_tokens_T=cat("target_tokens", torch.int64),
        logprobs_T=cat("logprobs", torch.float32),
        advantages_T=cat("advantages", torch.float32),
        weights_T=cat("weights", torch.float32),
        sequence_ratio_mask_T=cat("sequence_ratio_mask", torch.float32),
    )
