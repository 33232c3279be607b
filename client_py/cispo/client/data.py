"""What a training step reads: `ModelInput` (the tokens, as Tinker's chunks) and `Datum` (the
tokens and their per-token loss inputs), named and shaped like the Tinker API's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cispo.v1.tensors import LOSS_INPUT_KINDS

from .conversion import convert
from .tensor_data import TensorData, to_array

__all__ = ["Datum", "EncodedTextChunk", "LossFnInputs", "ModelInput"]


@dataclass
class EncodedTextChunk:
    """A run of token ids inside a `ModelInput`."""

    tokens: Any
    """Token ids, shape (n,), int64 (lists, arrays and tensors are converted)."""
    type: Literal["encoded_text"] = "encoded_text"
    """The chunk kind (Tinker's discriminator); always "encoded_text"."""

    def __post_init__(self) -> None:
        self.tokens = to_array(self.tokens, kind="int", what="EncodedTextChunk.tokens").astype(np.int64, copy=False)

    @property
    def length(self) -> int:
        """Number of tokens."""
        return int(self.tokens.shape[0])


@dataclass
class ModelInput:
    """The tokens the model reads, shape (N,), as a list of chunks (Tinker's layout)."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)
    """The token chunks, read in order."""

    def __post_init__(self) -> None:
        self.chunks = [
            convert(chunk, EncodedTextChunk, f"ModelInput.chunks[{i}]") for i, chunk in enumerate(self.chunks)
        ]

    @classmethod
    def from_ints(cls, tokens: Any) -> ModelInput:
        """From token ids: a list of ints, an integer array or tensor, shape (N,)."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> ModelInput:
        """No tokens."""
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """The token ids as a list of ints, length N."""
        return self.to_numpy().tolist()

    def to_numpy(self) -> np.ndarray:
        """The token ids, shape (N,), int64."""
        if len(self.chunks) == 1:
            return self.chunks[0].tokens
        if not self.chunks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([chunk.tokens for chunk in self.chunks])

    @property
    def length(self) -> int:
        """N, the number of tokens."""
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one token added at the end."""
        return self.append(EncodedTextChunk(tokens=[int(token)]))


LossFnInputs = Mapping[str, Any]
"""Loss inputs by name: "target_tokens", "logprobs", "advantages", "weights"."""


@dataclass
class Datum:
    """One sequence of training data: tokens in, per-token loss inputs.

    Position i of every loss input belongs to the prediction made after reading
    `model_input[i]`: `target_tokens[i]` is the next token. All have length N.
    """

    model_input: ModelInput
    """The tokens the model reads, shape (N,). A plain token list is accepted too."""
    loss_fn_inputs: dict[str, TensorData]
    """Per-token loss inputs, each shape (N,), given as lists, numpy arrays, torch tensors
    or TensorData and stored as TensorData:
      "target_tokens": int, the token that follows each input position (all losses);
      "logprobs":      float, the sampler's logprob of each target token, <= 0
                       (cispo, importance_sampling, ppo, dro, gspo);
      "advantages":    float, per-token advantage; 0 marks prompt tokens
                       (cispo, importance_sampling, ppo, dro, gspo);
      "weights":       float, per-token weight (cross_entropy);
      "sequence_ratio_mask": float, optional (gspo): non-zero marks the tokens the sequence
                       ratio averages over; default the tokens with advantage != 0."""

    def __post_init__(self) -> None:
        if type(self.model_input).__name__ == "ModelInput":  # this package's, or the tinker SDK's
            self.model_input = convert(self.model_input, ModelInput, "Datum.model_input")
        else:
            self.model_input = ModelInput.from_ints(self.model_input)
        if not isinstance(self.loss_fn_inputs, Mapping):
            raise TypeError(f"Datum.loss_fn_inputs: expected a dict, got {type(self.loss_fn_inputs).__name__}")
        normalized: dict[str, TensorData] = {}
        for name, value in self.loss_fn_inputs.items():
            kind = LOSS_INPUT_KINDS.get(name)
            if kind is None:
                raise ValueError(
                    f"Datum.loss_fn_inputs: unknown input {name!r}; expected some of {list(LOSS_INPUT_KINDS)}"
                )
            normalized[name] = TensorData._wrap(to_array(value, kind=kind, what=f"loss_fn_inputs.{name}"))
        self.loss_fn_inputs = normalized
