"""Validation of a whole request before any compute: every problem is reported at once, as
field violations naming the datum and field, and nothing is touched when one is found.

Structure (shapes, dtypes, lengths, which inputs) is checked per datum, which is cheap; values
(token ids in the vocabulary, floats finite in float32, sampling logprobs <= 0) are checked in
bulk over each field concatenated across the batch, so a request of 60,000 tiny datums costs a
few tensor ops, not 60,000 of each.
"""

from collections import defaultdict

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
    by_field: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)  # well-formed tensors to check
    for i, sample in enumerate(samples):
        violations += _structure_violations(i, sample, loss, by_field)
    for name, tensors in by_field.items():
        violations += _value_violations(name, tensors, vocab_size)
    if violations:
        raise InvalidInput(sorted(violations, key=_datum_order))
    longest = max(range(len(samples)), key=lambda i: samples[i].length)
    if samples[longest].length > max_sequence_length:
        raise LimitExceeded(
            "max_sequence_length",
            f"data[{longest}].model_input has {samples[longest].length} tokens, over the model's "
            f"max_sequence_length={max_sequence_length}",
        )


def _structure_violations(i: int, sample: Sample, loss: LossFunction,
                          by_field: dict[str, list[tuple[int, torch.Tensor]]]) -> list[FieldViolation]:
    """Shapes, dtypes, lengths and names of datum `i`; its well-formed tensors go to `by_field`."""
    where = f"data[{i}]"
    out = _shape_violations(f"{where}.model_input", sample.model_input, "int")
    n = sample.length if not out else -1
    if not out:
        by_field["model_input"].append((i, sample.model_input))
    if n == 0:
        out.append(FieldViolation(f"{where}.model_input", "must hold at least one token"))
    inputs = sample.loss_fn_inputs
    required = ("target_tokens", *loss.required_inputs)
    used = (*required, *loss.optional_inputs)
    for name in required:
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
        bad = _shape_violations(field, tensor, LOSS_INPUT_KINDS[name])
        if not bad and n >= 0 and tensor.shape[0] != n:
            bad.append(FieldViolation(field, f"length {tensor.shape[0]} != model_input length {n}"))
        if not bad:
            by_field[f"loss_fn_inputs.{name}"].append((i, tensor))
        out += bad
    return out


def _shape_violations(field: str, tensor: torch.Tensor, kind: str) -> list[FieldViolation]:
    """1-D, and integer ids for an "int" field, floats for a "float" one."""
    if tensor.dim() != 1:
        return [FieldViolation(field, f"must be 1-D, got shape {tuple(tensor.shape)}")]
    if kind == "int" and (tensor.is_floating_point() or tensor.dtype == torch.bool):
        return [FieldViolation(field, f"must hold integer token ids, got {tensor.dtype}")]
    if kind == "float" and not tensor.is_floating_point():
        return [FieldViolation(field, f"must hold floats, got {tensor.dtype}")]
    return []


def _value_violations(name: str, tensors: list[tuple[int, torch.Tensor]], vocab_size: int) -> list[FieldViolation]:
    """One violation per datum whose `name` holds a bad value (the first one in it): ids
    outside [0, vocab_size); floats not finite in float32 (the engine computes in float32);
    sampling logprobs above 0."""
    datums = [i for i, _ in tensors]
    lengths = torch.tensor([t.shape[0] for _, t in tensors])
    if LOSS_INPUT_KINDS.get(name.removeprefix("loss_fn_inputs."), "int") == "int":
        values = torch.cat([t for _, t in tensors]).to(torch.int64)  # cat promotes mixed dtypes
        checks = [((values < 0) | (values >= vocab_size),
                   lambda v, pos: f"token id {int(v)} at position {pos} is outside the vocabulary [0, {vocab_size})")]
    else:
        values = torch.cat([t for _, t in tensors]).to(torch.float64)
        finite = torch.isfinite(values.to(torch.float32))
        checks = [(~finite, lambda v, pos: f"value {float(v):g} at position {pos} is not finite in float32")]
        if name == "loss_fn_inputs.logprobs":
            checks.append((finite & (values > 0),
                           lambda v, pos: f"sampling logprobs must be <= 0; position {pos} is {float(v):g}"))
    starts = torch.cumsum(lengths, 0) - lengths
    out, seen = [], set()
    for bad, describe in checks:
        if not bool(bad.any()):
            continue
        where = torch.nonzero(bad)[:, 0]
        owner = torch.searchsorted(starts, where, right=True) - 1
        first = torch.ones_like(owner, dtype=torch.bool)  # first bad position of each datum
        first[1:] = owner[1:] != owner[:-1]
        for flat, k in zip(where[first].tolist(), owner[first].tolist()):
            if datums[k] not in seen:
                seen.add(datums[k])
                out.append(FieldViolation(f"data[{datums[k]}].{name}", describe(values[flat], flat - int(starts[k]))))
    return out


def _datum_order(violation: FieldViolation) -> tuple[int, int]:
    """Sort key: by datum index, keeping each datum's violations in the order found."""
    if violation.field.startswith("data["):
        return int(violation.field[5:violation.field.index("]")]), 0
    return -1, 0
