"""The answers of the training and sampling operations, each with the run's version after it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .tensor_data import TensorData

__all__ = [
    "ForwardBackwardOutput",
    "LoadStateResponse",
    "LoadWeightsResponse",
    "LossFnOutput",
    "OptimStepResponse",
    "RunVersion",
    "SampleResponse",
    "SampledSequence",
    "SaveStateResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
]

LossFnOutput = dict[str, TensorData]
"""Per-datum outputs by name; the service returns "logprobs", shape (N,), float32."""


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
