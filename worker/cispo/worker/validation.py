"""Validation of a whole request before any compute: every problem is reported at once, as
field violations naming the datum and field, and nothing is touched when one is found.

Vectorised over datums: a batch is checked column by column (worker.batch.SampleBatch) with
whole-array numpy operations - which inputs each datum gives, their dtypes and lengths, token ids
in the vocabulary, floats finite in float32, sampling logprobs <= 0 - and a message is written
only for a datum that fails a check, so 60,000 tiny datums cost a few array passes.
"""

from collections.abc import Callable

import numpy as np

from cispo.worker.batch import FIELD_KINDS, LOSS_INPUT_KINDS, Column, SampleBatch, Samples
from cispo.worker.errors import FieldViolation, InvalidInput, LimitExceeded
from cispo.worker.losses import LossFunction

# (datum, rank, violation): a datum's violations are reported in rank order.
Found = list[tuple[int, int, FieldViolation]]


def validate_batch(
    samples: Samples,
    loss: LossFunction,
    vocab_size: int,
    max_sequence_length: int,
    max_tokens_per_request: int,
) -> None:
    """Raise LimitExceeded or InvalidInput unless `samples` can be run through `loss`."""
    batch = SampleBatch.of(samples)
    if not len(batch):
        raise InvalidInput([FieldViolation("data", "at least one datum is required")])
    lengths = batch.lengths
    total = int(lengths.sum())
    if total > max_tokens_per_request:
        raise LimitExceeded(
            "max_tokens_per_request",
            f"request has {total} tokens, over the limit max_tokens_per_request={max_tokens_per_request}",
        )
    found = _violations(batch, loss, vocab_size)
    if found:
        raise InvalidInput([violation for *_, violation in sorted(found, key=lambda f: f[:2])])
    longest = int(np.argmax(lengths))
    if lengths[longest] > max_sequence_length:
        raise LimitExceeded(
            "max_sequence_length",
            f"data[{longest}].model_input has {lengths[longest]} tokens, over the model's "
            f"max_sequence_length={max_sequence_length}",
        )


def _violations(batch: SampleBatch, loss: LossFunction, vocab_size: int) -> Found:
    """Structure (which inputs, dtypes, lengths), then values of the well-formed tensors."""
    found: Found = []

    def add(bad_B: np.ndarray, rank: int, field: str, describe: Callable[[int], str]) -> None:
        found.extend(
            (i, rank, FieldViolation(f"data[{i}].{field}", describe(i))) for i in np.flatnonzero(bad_B).tolist()
        )

    columns = batch.columns
    model = columns["model_input"]
    n_B = model.lengths
    known_B = model.good()  # datums whose model_input length counts
    add(~known_B, 0, "model_input", model.problems.__getitem__)
    add(known_B & (n_B == 0), 1, "model_input", lambda i: "must hold at least one token")
    required = ("target_tokens", *loss.required_inputs)
    used = (*required, *loss.optional_inputs)
    for r, name in enumerate(required):
        given_B = columns[name].given() if name in columns else np.zeros(len(batch), dtype=bool)
        add(~given_B, 2 + r, f"loss_fn_inputs.{name}", lambda i: f"required by loss '{loss.name}'")
    checked = {"model_input": known_B}  # field -> (B,) datums whose values are checked
    for k, (name, column) in enumerate((n, c) for n, c in columns.items() if n != "model_input"):
        field, rank, given_B = f"loss_fn_inputs.{name}", 10 + k, column.given()
        if name not in LOSS_INPUT_KINDS:
            add(given_B, rank, field, lambda i: f"unknown loss input (known: {', '.join(LOSS_INPUT_KINDS)})")
        elif name not in used:
            add(given_B, rank, field, lambda i: f"not used by loss '{loss.name}', which takes {', '.join(used)}")
        else:
            good_B = column.good()
            add(given_B & ~good_B, rank, field, column.problems.__getitem__)
            wrong_B = good_B & known_B & (column.lengths != n_B)
            add(wrong_B, rank, field, lambda i: f"length {column.lengths[i]} != model_input length {n_B[i]}")  # noqa: B023  # add() calls it at once
            checked[name] = good_B & ~wrong_B
    for k, (name, checked_B) in enumerate(checked.items()):
        found += _value_violations(name, columns[name], checked_B, vocab_size, 100 + k)
    return found


def _value_violations(name: str, column: Column, checked_B: np.ndarray, vocab_size: int, rank: int) -> Found:
    """One violation per checked datum whose `name` holds a bad value (the first one in it): ids
    outside [0, vocab_size); floats not finite in float32 (the engine computes in float32);
    sampling logprobs above 0."""
    values = column.values
    if FIELD_KINDS[name] == "int":
        checks = [
            (
                (values < 0) | (values >= vocab_size),
                lambda v, pos: f"token id {int(v)} at position {pos} is outside the vocabulary [0, {vocab_size})",
            )
        ]
    else:
        with np.errstate(over="ignore"):
            finite = np.isfinite(values.astype(np.float32, copy=False))
        checks = [(~finite, lambda v, pos: f"value {float(v):g} at position {pos} is not finite in float32")]
        if name == "logprobs":
            checks.append(
                (
                    finite & (values > 0),
                    lambda v, pos: f"sampling logprobs must be <= 0; position {pos} is {float(v):g}",
                )
            )
    field = name if name == "model_input" else f"loss_fn_inputs.{name}"
    datums = np.flatnonzero(column.good())  # the datums in `values`, in order
    out, seen = [], set()
    for bad, describe in checks:
        if not bad.any():
            continue
        where = np.flatnonzero(bad)
        owner = datums[np.searchsorted(column.starts[datums], where, side="right") - 1]
        first = np.ones(len(owner), dtype=bool)  # the first bad position of each datum
        first[1:] = owner[1:] != owner[:-1]
        for flat, i in zip(where[first].tolist(), owner[first].tolist()):
            if checked_B[i] and i not in seen:
                seen.add(i)
                out.append(
                    (i, rank, FieldViolation(f"data[{i}].{field}", describe(values[flat], flat - column.starts[i])))
                )
    return out
