"""Validation of a whole request before any compute: every problem is reported at once, as
field violations naming the datum and field, and nothing is touched when one is found."""

import torch

from cispo.worker.batch import LOSS_INPUT_KINDS, Sample
from cispo.worker.errors import FieldViolation, InvalidInput, LimitExceeded
from cispo.worker.losses import LossFunction


def validate_batch(
    samples: list[Sample],
    loss: LossFunction,
    vocab_size: int,
    max_sequence_length: int,
    max_tokens_per_request: int,
) -> None:
    """Raise LimitExceeded or InvalidInput unless `samples` can be run through `loss`."""
    if not samples:
        raise InvalidInput([FieldViolation("data", "at least one datum is required")])
    total = sum(s.length for s in samples)
    if total > max_tokens_per_request:
        raise LimitExceeded(
            "max_tokens_per_request",
            f"request has {total} tokens, over the limit max_tokens_per_request={max_tokens_per_request}",
        )
    violations: list[FieldViolation] = []
    for i, sample in enumerate(samples):
        violations += _datum_violations(f"data[{i}]", sample, loss, vocab_size)
    if violations:
        raise InvalidInput(violations)
    longest = max(range(len(samples)), key=lambda i: samples[i].length)
    if samples[longest].length > max_sequence_length:
        raise LimitExceeded(
            "max_sequence_length",
            f"data[{longest}].model_input has {samples[longest].length} tokens, over the model's "
            f"max_sequence_length={max_sequence_length}",
        )


def _datum_violations(where: str, sample: Sample, loss: LossFunction, vocab_size: int) -> list[FieldViolation]:
    out = _tensor_violations(f"{where}.model_input", sample.model_input, "int", vocab_size)
    n = sample.length if sample.model_input.dim() == 1 else -1
    if n == 0:
        out.append(FieldViolation(f"{where}.model_input", "must hold at least one token"))
    inputs = sample.loss_fn_inputs
    used = ("target_tokens", *loss.required_inputs)
    for name in used:
        if name not in inputs:
            out.append(FieldViolation(f"{where}.loss_fn_inputs.{name}", f"required by loss '{loss.name}'"))
    for name, tensor in inputs.items():
        field = f"{where}.loss_fn_inputs.{name}"
        if name not in LOSS_INPUT_KINDS:
            out.append(FieldViolation(field, f"unknown loss input (known: {', '.join(LOSS_INPUT_KINDS)})"))
            continue
        if name not in used:
            out.append(FieldViolation(field, f"not used by loss '{loss.name}', which takes {', '.join(used)}"))
            continue
        bad = _tensor_violations(field, tensor, LOSS_INPUT_KINDS[name], vocab_size)
        if not bad and n >= 0 and tensor.shape[0] != n:
            bad.append(FieldViolation(field, f"length {tensor.shape[0]} != model_input length {n}"))
        if not bad and name == "logprobs" and tensor.numel() and bool((tensor > 0).any()):
            pos = int(torch.nonzero(tensor > 0)[0, 0])
            bad.append(FieldViolation(field, f"sampling logprobs must be <= 0; position {pos} is {tensor[pos].item():g}"))
        out += bad
    return out


def _tensor_violations(field: str, tensor: torch.Tensor, kind: str, vocab_size: int) -> list[FieldViolation]:
    """Shape, dtype and value checks shared by every tensor: 1-D; ints in [0, vocab); floats
    finite in float32."""
    if tensor.dim() != 1:
        return [FieldViolation(field, f"must be 1-D, got shape {tuple(tensor.shape)}")]
    if kind == "int":
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            return [FieldViolation(field, f"must hold integer token ids, got {tensor.dtype}")]
        bad = (tensor < 0) | (tensor >= vocab_size)
        if tensor.numel() and bool(bad.any()):
            pos = int(torch.nonzero(bad)[0, 0])
            return [FieldViolation(field, f"token id {int(tensor[pos])} at position {pos} is outside the vocabulary [0, {vocab_size})")]
        return []
    if not tensor.is_floating_point():
        return [FieldViolation(field, f"must hold floats, got {tensor.dtype}")]
    finite = torch.isfinite(tensor.to(torch.float32))  # the engine computes in float32
    if tensor.numel() and not bool(finite.all()):
        pos = int(torch.nonzero(~finite)[0, 0])
        return [FieldViolation(field, f"value {tensor[pos].item():g} at position {pos} is not finite in float32")]
    return []
