"""Training data as the engine sees it: one `Sample` per datum, a `SampleBatch` of many (the
columns a request is decoded into and validated as), and packed micro-batches."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

# Loss input names and the kind of tensor each must be.
LOSS_INPUT_KINDS: dict[str, str] = {
    "target_tokens": "int",
    "logprobs": "float",
    "advantages": "float",
    "weights": "float",
    "sequence_ratio_mask": "float",
}
# Every field of a datum and its kind (None: an unknown name).
FIELD_KINDS: dict[str, str] = {"model_input": "int", **LOSS_INPUT_KINDS}

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


def tensor_problem(shape: tuple[int, ...], dtype: torch.dtype, kind: str | None) -> str | None:
    """Why a tensor cannot be a field of `kind` ("int": token ids, "float"; None: any), or None."""
    if len(shape) != 1:
        return f"must be 1-D, got shape {tuple(shape)}"
    if kind == "int" and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        return f"must hold integer token ids, got {dtype}"
    if kind == "float" and not dtype.is_floating_point:
        return f"must hold floats, got {dtype}"
    return None


def ranges(starts: np.ndarray, lengths: np.ndarray, step: int = 1) -> np.ndarray:
    """starts[i] + step * j for j < lengths[i], for each i in turn: (sum(lengths),) int64."""
    if (lengths == 1).all():
        return starts
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first * step, lengths) + np.arange(int(lengths.sum())) * step


@dataclass(frozen=True)
class Column:
    """One field of every datum of a batch of B.

    values: (sum of the good datums' lengths,) numpy, the good datums' elements in datum order
    (good: given, with no problem); floats narrower than float32 are widened to it.
    lengths: (B,) int64, each datum's tensor length (shape[0]), -1 where it gives none.
    problems: datum -> why its tensor is unusable (see `tensor_problem`); not in `values`.
    starts: (B,) int64, where each good datum's elements begin in `values`.
    """

    values: np.ndarray
    lengths: np.ndarray
    problems: dict[int, str]
    starts: np.ndarray

    @classmethod
    def build(
        cls,
        name: str,
        size: int,
        parts: Sequence[tuple[np.ndarray, np.ndarray, torch.Tensor]] = (),
        tensors: Sequence[tuple[int, torch.Tensor]] = (),
    ) -> "Column":
        """The column `name` of `size` datums from `parts`, (datums (k,), their lengths
        (k,), their elements concatenated) of one dtype each, and from (datum, tensor) pairs of
        other datums. A tensor that is not 1-D, or a part of the wrong kind for `name`, is a problem."""
        kind = FIELD_KINDS.get(name)
        lengths = np.full(size, -1, dtype=np.int64)
        problems: dict[int, str] = {}
        groups: dict[torch.dtype, tuple[list[int], list[torch.Tensor]]] = {}  # dtype -> (datums, tensors)
        for i, tensor in tensors:
            lengths[i] = tensor.shape[0] if tensor.dim() else 0
            why = tensor_problem(tuple(tensor.shape), tensor.dtype, kind) if tensor.dim() != 1 else None
            if why is not None:
                problems[i] = why
            else:
                datums_of_dtype, tensors_of_dtype = groups.setdefault(tensor.dtype, ([], []))
                datums_of_dtype.append(i)
                tensors_of_dtype.append(tensor)
        of_tensors = [
            (datums, lengths[datums], torch.cat(ts)) for datums, ts in ((np.array(d), ts) for d, ts in groups.values())
        ]
        kept: list[tuple[np.ndarray, np.ndarray]] = []  # (datums (k,), their elements)
        for datums, part_lengths, elements in [*parts, *of_tensors]:
            lengths[datums] = part_lengths
            why = tensor_problem(tuple(elements.shape), elements.dtype, kind)
            if why is None:
                kept.append((datums, _numpy(elements)))
            else:
                problems.update(dict.fromkeys(datums.tolist(), why))
        good = np.maximum(lengths, 0)
        good[list(problems)] = 0
        starts = np.cumsum(good) - good
        if len(kept) == 1 and (np.diff(kept[0][0]) > 0).all():  # in datum order already
            values = kept[0][1]
        else:
            values = np.empty(int(good.sum()), np.result_type(*(v for _, v in kept)) if kept else np.int64)
            for datums, part in kept:
                values[ranges(starts[datums], lengths[datums])] = part
        return cls(values, lengths, problems, starts)

    def given(self) -> np.ndarray:
        """(B,) bool: the datums that give this field."""
        return self.lengths >= 0

    def good(self) -> np.ndarray:
        """(B,) bool: the datums whose elements are in `values`."""
        good = self.given()
        good[list(self.problems)] = False
        return good

    def take(self, rows: Sequence[int]) -> "Column":
        """The column of datums `rows` (k,), in that order; for a validated column (no problems)."""
        lengths = self.lengths[np.asarray(rows, dtype=np.int64)]
        good = np.maximum(lengths, 0)
        return Column(
            self.values[ranges(self.starts[np.asarray(rows, dtype=np.int64)], good)],
            lengths,
            {},
            np.cumsum(good) - good,
        )

    def datum(self, i: int) -> torch.Tensor:
        """Datum i's tensor (N_i,), a view of `values`."""
        return torch.from_numpy(self.values[self.starts[i] : self.starts[i] + self.lengths[i]])


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (floats numpy lacks, bfloat16 and float16, as float32)."""
    return (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()


class SampleBatch(Sequence[Sample]):
    """B datums as columns: `columns["model_input"]` and one column per loss input name given
    by any datum. `lengths` (B,) int64: the datums' model_input lengths. The service decodes a
    request into one; it is validated as it is and goes to the engine unchanged. Indexing gives
    a Sample of views, so it also serves where a list of Samples is expected."""

    def __init__(self, columns: dict[str, Column]):
        self.columns = columns
        self.lengths = columns["model_input"].lengths
        self.length_list = self.lengths.tolist()

    @classmethod
    def of(cls, samples: "Samples") -> "SampleBatch":
        """`samples` as a batch (itself if it is one)."""
        return samples if isinstance(samples, SampleBatch) else cls.from_samples(samples)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "SampleBatch":
        fields: dict[str, list[tuple[int, torch.Tensor]]] = {"model_input": []}
        for i, sample in enumerate(samples):
            fields["model_input"].append((i, sample.model_input))
            for name, tensor in sample.loss_fn_inputs.items():
                fields.setdefault(name, []).append((i, tensor))
        return cls({name: Column.build(name, len(samples), tensors=tensors) for name, tensors in fields.items()})

    def take(self, rows: Sequence[int]) -> "SampleBatch":
        """Datums `rows` in that order, as a batch of their own (validated datums)."""
        return SampleBatch({name: column.take(rows) for name, column in self.columns.items()})

    def __len__(self) -> int:
        return len(self.length_list)

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        """Datum i as a Sample of views of the columns (a slice: a list of them)."""
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]
        return Sample(self.columns["model_input"].datum(i), self.inputs(i))

    def inputs(self, i: int) -> dict[str, torch.Tensor]:
        """Datum i's loss inputs, views of the columns."""
        return {
            name: column.datum(i)
            for name, column in self.columns.items()
            if name != "model_input" and column.lengths[i] >= 0
        }


Samples = SampleBatch | Sequence[Sample]  # what the engine takes: a decoded batch, or Samples in process


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


def pack(batch: SampleBatch, indices: list[int], input_names: tuple[str, ...], device: torch.device) -> MicroBatch:
    """Concatenate `batch[indices]` into one MicroBatch on `device`, with the loss inputs
    named in `input_names` (the others are left None): one gather per field."""
    rows = np.asarray(indices, dtype=np.int64)
    lengths = batch.lengths[rows]  # (k,)

    def gather(name: str, dtype: type, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(T,) the field of the chosen datums; an optional input's default where one gives none."""
        column = batch.columns.get(name)
        if column is None or not (given := column.given()[rows]).any():
            return OPTIONAL_INPUT_DEFAULTS[name](inputs)
        values = column.values[ranges(column.starts[rows[given]], lengths[given])]
        values_T = torch.from_numpy(values.astype(dtype, copy=False))
        if given.all():
            return values_T
        out = OPTIONAL_INPUT_DEFAULTS[name](inputs)
        out[torch.from_numpy(np.repeat(given, lengths))] = values_T
        return out

    inputs: dict[str, torch.Tensor] = {}
    for name, kind in LOSS_INPUT_KINDS.items():  # in this order: a default is made of the inputs before it
        if name in input_names:
            inputs[name] = gather(name, np.int64 if kind == "int" else np.float32, inputs)
    on_device = {name: t.to(device) for name, t in inputs.items()}
    positions = ranges(np.zeros_like(lengths), lengths)
    return MicroBatch(
        indices=list(indices),
        lengths=lengths.tolist(),
        input_ids_1T=gather("model_input", np.int64, inputs).to(device)[None],
        position_ids_1T=torch.from_numpy(positions).to(device)[None],
        target_tokens_T=on_device["target_tokens"],
        logprobs_T=on_device.get("logprobs"),
        advantages_T=on_device.get("advantages"),
        weights_T=on_device.get("weights"),
        sequence_ratio_mask_T=on_device.get("sequence_ratio_mask"),
    )
