"""The client's data types, named and shaped like the Tinker API's.

A training loop builds `Datum`s from token ids and per-token loss inputs, and reads
`ForwardBackwardOutput.loss_fn_outputs[i]["logprobs"]` and `.metrics["loss:sum"]` back.
Everything here is plain Python and numpy; the wire form lives in `cispo.client.wire`.

Loss inputs may be given as lists, numpy arrays, torch tensors (duck-typed: anything with
`.detach().cpu().numpy()`; torch itself is never imported here) or `TensorData`. All tensors
are 1-D. Lists take each field's canonical dtype (int64 token ids, float32 values); arrays and
tensors keep their dtype where the wire has it (int64, int32, float32, float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

__all__ = [
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "Limits",
    "LoadStateResponse",
    "LoadWeightsResponse",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "LossFunctionInfo",
    "ModelInput",
    "OptimStepResponse",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveStateResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "convert",
]

LossFnType = Literal["cispo", "importance_sampling", "ppo", "cross_entropy", "dro", "gspo"]
"""Loss functions the service offers (`GetInfoResponse.loss_functions` lists them)."""

TensorDtype = Literal["int64", "int32", "float32", "float64"]
"""Element types a tensor can have on the wire."""

# numpy dtype of each wire dtype (native byte order; the wire is little-endian).
_NP_DTYPES: dict[str, np.dtype] = {
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}

# Loss input names the wire carries, and the kind of number each holds.
LOSS_INPUT_KINDS: dict[str, Literal["int", "float"]] = {
    "target_tokens": "int",
    "logprobs": "float",
    "advantages": "float",
    "weights": "float",
    "sequence_ratio_mask": "float",
}


def _is_torch_like(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("detach", "cpu", "numpy"))


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (duck-typed) as a numpy array, on the CPU, without grad."""
    tensor = tensor.detach().cpu()
    for name in ("resolve_conj", "resolve_neg"):  # numpy() refuses lazily negated views
        if hasattr(tensor, name):
            tensor = getattr(tensor, name)()
    try:
        return tensor.numpy()
    except TypeError:
        # numpy has no bfloat16 (nor float8): widen floating tensors to float32.
        if hasattr(tensor, "is_floating_point") and tensor.is_floating_point():
            return tensor.float().numpy()
        raise


def to_array(value: Any, *, kind: Literal["int", "float"] | None = None, what: str = "tensor") -> np.ndarray:
    """`value` as a 1-D numpy array of a wire dtype; no copy when it already is one.

    kind: "int" for token ids (integer dtypes only; int32 stays int32, others become int64),
          "float" for values (integers and bools become float32), None to keep the dtype
          (lists of floats become float32).
    what: the name used in error messages, e.g. "data[2].loss_fn_inputs.advantages".
    Raises ValueError for non-1-D or non-numeric data, TypeError for unsupported objects.
    """
    typed = True  # the input states its dtype; a Python list does not
    if isinstance(value, TensorData):
        array = value.to_numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif _is_torch_like(value):
        array = _torch_to_numpy(value)
    elif callable(getattr(value, "to_numpy", None)):  # another package's TensorData (the tinker SDK's)
        array = np.asarray(value.to_numpy())
    elif isinstance(value, (list, tuple, range)):
        typed = False
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{what}: expected a flat sequence of numbers ({exc})") from None
    elif hasattr(value, "__array__"):
        array = np.asarray(value)
    else:
        raise TypeError(f"{what}: expected a list, numpy array, torch tensor or TensorData, got {type(value).__name__}")
    if array.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D tensor, got shape {tuple(array.shape)}")

    dtype_kind = array.dtype.kind
    if dtype_kind in "iu":
        if kind == "float":
            target = _NP_DTYPES["float32"]
        elif array.dtype.itemsize == 4 and dtype_kind == "i" and typed:
            target = _NP_DTYPES["int32"]
        else:
            target = _NP_DTYPES["int64"]
    elif kind == "int" and dtype_kind in "fb":
        if array.size:
            raise ValueError(f"{what}: expected integer token ids, got dtype {array.dtype}")
        target = _NP_DTYPES["int64"]  # an empty list; the server judges the length
    elif dtype_kind == "f":
        if not typed or array.dtype.itemsize < 8:
            target = _NP_DTYPES["float32"]  # lists, float16
        else:
            target = _NP_DTYPES["float64"]  # float64 (and longdouble) given explicitly
    elif dtype_kind == "b" and kind == "float":
        target = _NP_DTYPES["float32"]
    else:
        raise ValueError(f"{what}: expected numeric data, got dtype {array.dtype}")
    return array.astype(target, copy=False)


def convert(value: Any, cls: type, what: str) -> Any:
    """`value` as a `cls` of this module. An object of another package whose class has the same
    name (the tinker SDK's `Datum`, `ModelInput`, `AdamParams`, `SamplingParams`, ...) is
    converted field by field; anything else raises TypeError naming both classes."""
    if isinstance(value, cls):
        return value
    if type(value).__name__ != cls.__name__:
        raise TypeError(f"{what}: expected {_qualified(cls)}, got {_qualified(type(value))}")
    names = [f.name for f in fields(cls)]
    try:
        return cls(**{name: getattr(value, name) for name in names if hasattr(value, name)})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: cannot convert {_qualified(type(value))} to {_qualified(cls)}: {exc}") from None


def _qualified(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    module = "cispo.client" if cls.__module__ == __name__ else cls.__module__
    return f"{module}.{cls.__qualname__}"


class TensorData:
    """A 1-D tensor of int64, int32, float32 or float64 elements, held as a numpy array.

    Tinker-compatible: `TensorData(data=[...], dtype="float32", shape=[n])`,
    `TensorData.from_numpy(a)`, `TensorData.from_torch(t)`, `.to_numpy()`, `.to_torch()`,
    `.tolist()`, `.data`, `.dtype`, `.shape`.
    """

    __slots__ = ("_array",)

    def __init__(
        self,
        data: Any,
        dtype: TensorDtype | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        """data: a 1-D list/array/tensor; dtype: convert to this wire dtype (default: keep,
        lists of floats become float32); shape: optional, must be [len(data)]."""
        array = to_array(data, what="TensorData")
        if dtype is not None:
            if dtype not in _NP_DTYPES:
                raise ValueError(f"TensorData: dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
            array = array.astype(_NP_DTYPES[dtype], copy=False)
        if shape is not None and list(shape) != [array.shape[0]]:
            raise ValueError(f"TensorData: shape {list(shape)} does not match {array.shape[0]} elements")
        self._array: np.ndarray = array

    @classmethod
    def _wrap(cls, array: np.ndarray) -> TensorData:
        """Wrap an array already 1-D and of a wire dtype (no checks, no copy)."""
        tensor = cls.__new__(cls)
        tensor._array = array
        return tensor

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """From a 1-D numpy array; int32/int64/float32/float64 are kept without a copy,
        other integers become int64 and float16 becomes float32."""
        return cls._wrap(to_array(array, what="TensorData"))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """From a 1-D torch tensor (moved to the CPU; bfloat16 becomes float32)."""
        return cls._wrap(to_array(tensor, what="TensorData"))

    def to_numpy(self) -> np.ndarray:
        """The elements, shape (N,): the array itself, not a copy."""
        return self._array

    def to_torch(self) -> Any:
        """The elements as a torch tensor, shape (N,) (imports torch)."""
        import torch  # only here: the client does not depend on torch

        return torch.from_numpy(np.array(self._array, copy=True))

    def tolist(self) -> list:
        """The elements as a list of Python ints or floats."""
        return self._array.tolist()

    @property
    def data(self) -> list:
        """The elements as a list (Tinker's field); prefer `to_numpy()`."""
        return self._array.tolist()

    @property
    def dtype(self) -> TensorDtype:
        """The element type: "int64", "int32", "float32" or "float64"."""
        return self._array.dtype.name  # type: ignore[return-value]

    @property
    def shape(self) -> list[int]:
        """[N]."""
        return [int(self._array.shape[0])]

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorData):
            return NotImplemented
        return self.dtype == other.dtype and np.array_equal(
            self._array, other._array, equal_nan=self._array.dtype.kind == "f"
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        values = np.array2string(self._array, separator=", ", threshold=8)
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape}, data={values})"


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

LossFnOutput = dict[str, TensorData]
"""Per-datum outputs by name; the service returns "logprobs", shape (N,), float32."""


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


@dataclass
class AdamParams:
    """AdamW hyper-parameters for `optim_step` (decoupled weight decay).

    The server validates the values and answers INVALID_ARGUMENT for bad ones.
    """

    learning_rate: float = 1e-4
    """Step size."""
    beta1: float = 0.9
    """Decay rate of the first-moment (mean) estimate."""
    beta2: float = 0.95
    """Decay rate of the second-moment (uncentered variance) estimate."""
    eps: float = 1e-12
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.0
    """Decoupled weight decay; 0 disables it."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient L2 norm to this value before the step; 0 disables clipping."""

    def __post_init__(self) -> None:
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"AdamParams.{name}: expected a number, got {type(value).__name__}")
            setattr(self, name, float(value))


@dataclass(frozen=True)
class RunVersion:
    """A training run's version after an operation (docs/training-runs.md, "Run versions")."""

    incarnation: str
    """Unguessable token of the run's state, made when the server made the run: a restarted
    server's runs have new ones."""
    step: int
    """Optimizer steps taken."""
    accumulated: int
    """forward_backward calls whose gradient the next optim_step applies."""


@dataclass
class ForwardBackwardOutput:
    """The answer to `forward` and `forward_backward`."""

    loss_fn_outputs: list[LossFnOutput]
    """One dict per datum, in request order; "logprobs" is the trainer's log-probability
    of each target token, TensorData of shape (N,), float32."""
    metrics: dict[str, float]
    """Batch metrics; each key names its reduction after a colon: "loss:sum", "tokens:sum",
    "active_tokens:sum", "clipped_high:sum", "clipped_low:sum", "ratio:min", "ratio:mean",
    "ratio:max", "kl_k1:mean", "kl_k3:mean"."""
    version: RunVersion | None = None
    """The run's version after this operation."""


@dataclass
class OptimStepResponse:
    """The answer to `optim_step`."""

    grad_norm: float
    """Global L2 norm of the accumulated gradient before clipping."""
    step: int
    """Optimizer steps taken so far, this one included."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Step metrics: "grad_norm:max" (pre-clip) and "learning_rate:max"."""
    version: RunVersion | None = None
    """The run's version after this step."""


@dataclass
class SaveStateResponse:
    """The answer to `save_state`."""

    name: str
    """The state's name, as given."""
    path: str
    """Where the state lives on the server's checkpoint volume."""
    step: int
    """Optimizer steps taken when it was saved."""
    version: RunVersion | None = None
    """The run's version when it was saved."""


@dataclass
class SaveWeightsForSamplerResponse:
    """The answer to `save_weights_for_sampler`."""

    name: str
    """The export's name, as given."""
    path: str
    """The directory on the server's sampler volume: an HF model directory that vLLM
    (`--model path`) and transformers load as it is, and that `create_sampling_client` takes."""
    step: int
    """Optimizer steps taken when it was saved."""
    version: RunVersion | None = None
    """The run's version when it was saved."""


StopReason = Literal["length", "stop"]
"""Why a sampled sequence ended: max_tokens reached, or a stop token / string / end of sequence."""


@dataclass
class SamplingParams:
    """How to sample (Tinker's fields).

    At each step the server draws from q = softmax(logits / temperature), kept to the top_k
    most likely tokens, then to the top_p nucleus, renormalised; `SampledSequence.logprobs` are
    log q of the drawn tokens (see docs/sampling.md for importance ratios at temperature != 1).
    """

    max_tokens: int | None = None
    """Most tokens to generate per sequence; None: the server's limit (and the model's context)."""
    seed: int | None = None
    """Seed of the draws: the same request with the same seed gives the same samples."""
    stop: str | Sequence[str] | Sequence[int] | None = None
    """Stop strings (need a tokenizer on the server) or stop token ids; the model's
    end-of-sequence tokens always stop."""
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 keeps all."""


@dataclass
class SampledSequence:
    """One generated sequence."""

    stop_reason: StopReason
    """"length" or "stop"."""
    tokens: list[int]
    """The generated token ids, the stop token included."""
    logprobs: list[float] | None = None
    """log q of each generated token, the distribution it was drawn from (see SamplingParams)."""


@dataclass
class SampleResponse:
    """The answer to `sample`."""

    sequences: list[SampledSequence]
    """num_samples sequences."""
    prompt_logprobs: list[float | None] | None = None
    """With include_prompt_logprobs: per prompt token, its logprob (temperature 1) after the
    tokens before it; None for the first."""
    version: RunVersion | None = None
    """The version of the run whose current weights were sampled (None for saved weights)."""


@dataclass
class LoadStateResponse:
    """The answer to `load_state` and `load_state_with_optimizer`."""

    name: str
    """The state's name, as given."""
    step: int
    """Optimizer steps recorded in the state."""
    version: RunVersion | None = None
    """The run's version after the load."""


SaveWeightsResponse = SaveStateResponse
"""Tinker's name for the answer to `save_state`."""

LoadWeightsResponse = LoadStateResponse
"""Tinker's name for the answer to `load_state`."""


@dataclass
class LossFunctionInfo:
    """A loss function the server offers."""

    name: str
    """Its name, the `loss_fn` argument, e.g. "cispo"."""
    default_config: dict[str, float]
    """`loss_fn_config` keys and their defaults, e.g. {"clip_low_threshold": 0.0, ...}."""
    required_inputs: list[str]
    """Loss inputs it requires besides "target_tokens", e.g. ["logprobs", "advantages"]."""


@dataclass
class Limits:
    """Server limits; a request over one fails with ResourceExhaustedError."""

    max_message_bytes: int
    """Largest request message, in bytes."""
    max_tokens_per_request: int
    """Most tokens (sum of datum lengths) in one forward/forward_backward."""
    max_sequence_length: int
    """Longest datum the model accepts."""
    idempotency_keys_remembered: int = 0
    """Completed operations whose idempotency keys the server remembers."""
    max_data_per_request: int = 0
    """Most datums in one forward/forward_backward."""
    max_sample_tokens: int = 0
    """Most tokens one sampled sequence may generate."""
    max_num_samples: int = 0
    """Most sequences one sample request may ask for."""
    max_sample_request_tokens: int = 0
    """Most tokens one sample request holds: num_samples * (prompt + max_tokens)."""


@dataclass
class GetInfoResponse:
    """The answer to `get_info`: the model, its limits and the loss functions."""

    model_name: str
    """A checkpoint path, or "embedded-tiny-llama"."""
    vocab_size: int
    """Token ids must lie in [0, vocab_size)."""
    max_sequence_length: int
    """Longest datum the model accepts."""
    loss_functions: list[LossFunctionInfo]
    """The loss functions offered, with their defaults."""
    limits: Limits
    """Request limits."""
    device: str
    """The device the model runs on: "cpu" or "cuda"."""
    dtype: str
    """Parameter dtype: "float32" or "bfloat16"."""
    world_size: int
    """Data-parallel ranks training this state."""
    step: int
    """Optimizer steps taken so far."""
    num_parameters: int
    """Number of trainable parameters."""
    has_tokenizer: bool = False
    """Whether the model directory has a tokenizer (stop strings work)."""
    eos_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sampled sequence by default."""
    model_id: str = ""
    """The training run reported on ("" when none was named and no default run is live)."""
    lora_rank: int | None = None
    """The run's LoRA rank; None for a full fine-tune."""
    base_model: str = ""
    """The name CreateModel's base_model may give the served model."""
    num_runs: int = 0
    """Training runs live on the server."""
    max_runs: int = 0
    """The most runs the server takes."""
    sharding: str = "replicated"
    """How the group holds the training state: "replicated" or "fsdp" (docs/scaling.md)."""
    memory: MemoryUse | None = None
    """Bytes one rank holds for the run's parameters, gradient and AdamW moments."""
    version: RunVersion | None = None
    """The run's version (None when no run is reported on)."""


@dataclass
class MemoryUse:
    """Bytes of training state on one rank (rank 0; sharded, its shards)."""

    parameter_bytes: int = 0
    gradient_bytes: int = 0
    """0 when no gradient is accumulated."""
    optimizer_bytes: int = 0
    """0 before the first optim_step."""


@dataclass
class ModelInfo:
    """One training run, as `ServiceClient.list_models` lists it."""

    model_id: str
    lora_rank: int | None
    """None for a full fine-tune."""
    step: int
    trainable_parameters: int
    trainable_bytes: int
    """Weights, gradient and optimizer moments of the run's own parameters."""
    created: float
    """Unix time."""
    last_used: float
