"""The losses, each a sum over tokens (never a mean), chosen by name.

    cispo:                -sum(clamp(r, lo, hi).detach() * t * A)    defaults lo=0.0, hi=4.0
    importance_sampling:  -sum(r * A)
    ppo:                  -sum(min(r * A, clamp(r, lo, hi) * A))     defaults lo=0.8, hi=1.2
    cross_entropy:        -sum(w * t)

with t the trainer's target logprobs, s the sampler's, r = exp(t - s), A the advantages and
w the weights. Ratio, coefficient and loss are fp32. Thresholds are absolute ratio bounds.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from cispo.worker.errors import FieldViolation, InvalidInput
from cispo.worker.loss_stats import token_stats

# t - s is clamped to +-LOG_RATIO_LIMIT before exp(), so no ratio, loss or metric is inf/NaN
# (exp(60) ~ 1e26 stays finite in fp32 even summed over millions of tokens).
LOG_RATIO_LIMIT = 60.0

CLIP_LOW, CLIP_HIGH = "clip_low_threshold", "clip_high_threshold"
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # config values are used in float32


@dataclass(frozen=True)
class TokenInputs:
    """Loss inputs of one packed micro-batch; each (T,) fp32 on the model's device, or None."""

    sampling_logprobs_T: torch.Tensor | None
    advantages_T: torch.Tensor | None
    weights_T: torch.Tensor | None

    def __getitem__(self, sl: slice) -> "TokenInputs":
        """The inputs of tokens `sl`."""
        return TokenInputs(*(None if t is None else t[sl] for t in (self.sampling_logprobs_T, self.advantages_T, self.weights_T)))


# A loss body: (target logprobs (T,) fp32, inputs, resolved config) -> loss scalar, a sum of
# per-token terms (so the gradient w.r.t. logp_T[i] depends on token i alone).
LossBody = Callable[[torch.Tensor, TokenInputs, Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class LossFunction:
    name: str
    defaults: Mapping[str, float]
    required_inputs: tuple[str, ...]
    body: LossBody

    def resolve_config(self, config: Mapping[str, float] | None) -> dict[str, float]:
        """Defaults overlaid with `config`, validated; raises InvalidInput naming each bad key."""
        resolved = dict(self.defaults)
        violations = []
        for key, value in (config or {}).items():
            if key not in self.defaults:
                allowed = ", ".join(self.defaults) or "none"
                violations.append(_config_violation(key, f"unknown key for loss '{self.name}' (allowed: {allowed})"))
            elif not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                violations.append(_config_violation(key, f"must be finite in float32 (|value| <= 3.4e38), got {value:g}"))
            else:
                resolved[key] = float(value)
        if not violations and CLIP_HIGH in resolved:
            violations = _threshold_violations(resolved[CLIP_LOW], resolved[CLIP_HIGH])
        if violations:
            raise InvalidInput(violations)
        return resolved

    def __call__(self, target_logprobs_T, inputs: TokenInputs, config: Mapping[str, float]) -> torch.Tensor:
        return self.body(target_logprobs_T, inputs, config)

    def stats(self, target_logprobs_T, inputs: TokenInputs, config: Mapping[str, float]) -> dict:
        """Token counts and, for losses with a ratio, ratio statistics over active tokens."""
        if inputs.sampling_logprobs_T is None:
            return token_stats(inputs.weights_T != 0)
        log_ratio_T = _log_ratio(target_logprobs_T.detach(), inputs.sampling_logprobs_T)
        return token_stats(inputs.advantages_T != 0, log_ratio_T, config.get(CLIP_LOW), config.get(CLIP_HIGH))


def _config_violation(key: str, description: str) -> FieldViolation:
    return FieldViolation(f"loss_fn_config.{key}", description)


def _threshold_violations(lo: float, hi: float) -> list[FieldViolation]:
    if lo < 0:
        return [_config_violation(CLIP_LOW, f"must be >= 0 (an absolute ratio bound), got {lo}")]
    if hi < 1:
        return [_config_violation(
            CLIP_HIGH,
            f"{hi} < 1 would clip every on-policy token (ratio 1). Thresholds are absolute ratio "
            f"bounds, not offsets from 1: for an epsilon of {hi}, pass {1 + hi}",
        )]
    if hi < lo:
        return [_config_violation(CLIP_HIGH, f"{hi} is below {CLIP_LOW} {lo}")]
    return []


def _log_ratio(target_logprobs_T: torch.Tensor, sampling_logprobs_T: torch.Tensor) -> torch.Tensor:
    return (target_logprobs_T - sampling_logprobs_T).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _cispo(t_T, x: TokenInputs, cfg):
    lo, hi = cfg[CLIP_LOW], cfg[CLIP_HIGH]
    log_ratio_T = _log_ratio(t_T.detach(), x.sampling_logprobs_T)
    coef_T = log_ratio_T.exp().clamp(lo, hi)  # detached: bounds the coefficient, never zeroes a gradient
    return -(coef_T * t_T * x.advantages_T).sum()


def _importance_sampling(t_T, x: TokenInputs, cfg):
    log_ratio_T = _log_ratio(t_T, x.sampling_logprobs_T)
    return -(log_ratio_T.exp() * x.advantages_T).sum()


def _ppo(t_T, x: TokenInputs, cfg):
    lo, hi = cfg[CLIP_LOW], cfg[CLIP_HIGH]
    log_ratio_T = _log_ratio(t_T, x.sampling_logprobs_T)
    ratio_T, a_T = log_ratio_T.exp(), x.advantages_T
    return -torch.minimum(ratio_T * a_T, ratio_T.clamp(lo, hi) * a_T).sum()


def _cross_entropy(t_T, x: TokenInputs, cfg):
    return -(x.weights_T * t_T).sum()


LOSS_FUNCTIONS: dict[str, LossFunction] = {
    f.name: f
    for f in (
        LossFunction("cispo", {CLIP_LOW: 0.0, CLIP_HIGH: 4.0}, ("logprobs", "advantages"), _cispo),
        LossFunction("importance_sampling", {}, ("logprobs", "advantages"), _importance_sampling),
        LossFunction("ppo", {CLIP_LOW: 0.8, CLIP_HIGH: 1.2}, ("logprobs", "advantages"), _ppo),
        LossFunction("cross_entropy", {}, ("weights",), _cross_entropy),
    )
}


def get_loss_function(name: str) -> LossFunction:
    """The loss called `name` ("" means cispo); raises InvalidInput for an unknown one."""
    loss = LOSS_FUNCTIONS.get(name or "cispo")
    if loss is None:
        raise InvalidInput([FieldViolation("loss_fn", f"unknown loss '{name}' (known: {', '.join(LOSS_FUNCTIONS)})")])
    return loss
