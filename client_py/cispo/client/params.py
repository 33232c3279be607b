"""The parameters of operations: which loss, `AdamParams` for optim_step, `SamplingParams` for
sample (Tinker's names and defaults)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cispo.v1.tensors import ADAM_DEFAULTS

__all__ = ["AdamParams", "LossFnType", "SamplingParams"]

LossFnType = Literal["cispo", "importance_sampling", "ppo", "cross_entropy", "dro", "gspo"]
"""Loss functions the service offers (`GetInfoResponse.loss_functions` lists them)."""


@dataclass
class AdamParams:
    """AdamW hyper-parameters for `optim_step` (decoupled weight decay).

    The server validates the values and answers INVALID_ARGUMENT for bad ones.
    """

    learning_rate: float = ADAM_DEFAULTS["learning_rate"]
    """Step size."""
    beta1: float = ADAM_DEFAULTS["beta1"]
    """Decay rate of the first-moment (mean) estimate."""
    beta2: float = ADAM_DEFAULTS["beta2"]
    """Decay rate of the second-moment (uncentered variance) estimate."""
    eps: float = ADAM_DEFAULTS["eps"]
    """Added to the denominator for numerical stability."""
    weight_decay: float = ADAM_DEFAULTS["weight_decay"]
    """Decoupled weight decay; 0 disables it."""
    grad_clip_norm: float = ADAM_DEFAULTS["grad_clip_norm"]
    """Clip the global gradient L2 norm to this value before the step; 0 disables clipping."""

    def __post_init__(self) -> None:
        for name in ADAM_DEFAULTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"AdamParams.{name}: expected a number, got {type(value).__name__}")
            setattr(self, name, float(value))


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
