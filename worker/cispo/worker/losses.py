"""The losses, each a sum over tokens (never a mean), chosen by name.

    cispo:                -sum(clamp(r, lo, hi).detach() * t * A)    defaults lo=0.0, hi=4.0
    importance_sampling:  -sum(r * A)
    ppo:                  -sum(min(r * A, clamp(r, lo, hi) * A))     defaults lo=0.8, hi=1.2
    cross_entropy:        -sum(w * t)
    dro:                  -sum(t * A - beta/2 * (t - s)^2 * [A != 0])  default beta=0.05
    gspo:                 -sum(min(q * A, clamp(q, lo, hi) * A))     defaults lo=0.8, hi=1.2
        q = sg(S) * exp(t - sg(t)), S = exp(mean of (t - s) over the datum's tokens in M)

with t the trainer's target logprobs, s the sampler's, r = exp(t - s), A the advantages,
w the weights and sg() stop-gradient. Ratio, coefficient and loss are fp32. Thresholds are
absolute ratio bounds.

dro's quadratic penalty covers active tokens only: advantage 0 marks prompt tokens, whose
sampler logprobs are usually placeholders. gspo (GSPO-token) gives every token of a datum its
sequence ratio S, the geometric mean of the token ratios over M (the tokens
`sequence_ratio_mask` marks non-zero; default: the active tokens), with its own token's
gradient; S = 1 for a datum with no token in M.
"""

import dataclasses
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
BETA = "beta"
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # config values are used in float32


@dataclass(frozen=True)
class TokenInputs:
    """Loss inputs of one packed micro-batch; each (T,) fp32 on the model's device, or None.

    sequence_log_ratio_T: for a sequence-level loss, log S of each token's datum (detached),
    filled in by `with_sequence_log_ratio` once the target logprobs are known.
    """

    sampling_logprobs_T: torch.Tensor | None
    advantages_T: torch.Tensor | None
    weights_T: torch.Tensor | None
    sequence_ratio_mask_T: torch.Tensor | None = None
    sequence_log_ratio_T: torch.Tensor | None = None

    def __getitem__(self, sl: slice) -> "TokenInputs":
        """The inputs of tokens `sl`."""
        return TokenInputs(
            *(
                None if t is None else t[sl]
                for t in (
                    self.sampling_logprobs_T,
                    self.advantages_T,
                    self.weights_T,
                    self.sequence_ratio_mask_T,
                    self.sequence_log_ratio_T,
                )
            )
        )

    def with_sequence_log_ratio(self, target_logprobs_T: torch.Tensor, lengths: list[int]) -> "TokenInputs":
        """These inputs with `sequence_log_ratio_T`: per datum (consecutive `lengths` tokens),
        the mean of the clamped t - s over its tokens in M, broadcast to its tokens."""
        log_ratio_T = _log_ratio(target_logprobs_T.detach(), self.s_T)
        in_m_T = self.m_T != 0
        datum_T = torch.repeat_interleave(
            torch.arange(len(lengths), device=log_ratio_T.device), torch.tensor(lengths, device=log_ratio_T.device)
        )
        sums_B = log_ratio_T.new_zeros(len(lengths)).index_add_(0, datum_T, torch.where(in_m_T, log_ratio_T, 0.0))
        counts_B = log_ratio_T.new_zeros(len(lengths)).index_add_(0, datum_T, in_m_T.float())
        mean_B = sums_B / counts_B.clamp(min=1.0)
        return dataclasses.replace(self, sequence_log_ratio_T=mean_B[datum_T])

    # The docstring's s, A, w, M and log S. A loss reads only the inputs it requires or has a
    # default for (validation and `pack` supply them), so a None read here is a bug.
    @property
    def s_T(self) -> torch.Tensor:
        return _given(self.sampling_logprobs_T, "logprobs")

    @property
    def a_T(self) -> torch.Tensor:
        return _given(self.advantages_T, "advantages")

    @property
    def w_T(self) -> torch.Tensor:
        return _given(self.weights_T, "weights")

    @property
    def m_T(self) -> torch.Tensor:
        return _given(self.sequence_ratio_mask_T, "sequence_ratio_mask")

    @property
    def log_s_T(self) -> torch.Tensor:
        return _given(self.sequence_log_ratio_T, "sequence_log_ratio (see with_sequence_log_ratio)")


# A loss body: (target logprobs (T,) fp32, inputs, resolved config) -> loss scalar, a sum of
# per-token terms (so the gradient w.r.t. logp_T[i] depends on token i alone).
LossBody = Callable[[torch.Tensor, TokenInputs, Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class LossFunction:
    """A loss by name. optional_inputs: loss inputs it takes when given. sequence_level: its
    body reads `TokenInputs.sequence_log_ratio_T`, so the target logprobs of every datum are
    computed before its gradient (one more pass of the chunked head)."""

    name: str
    defaults: Mapping[str, float]
    required_inputs: tuple[str, ...]
    body: LossBody
    optional_inputs: tuple[str, ...] = ()
    sequence_level: bool = False

    def resolve_config(self, config: Mapping[str, float] | None) -> dict[str, float]:
        """Defaults overlaid with `config`, validated; raises InvalidInput naming each bad key."""
        resolved = dict(self.defaults)
        violations = []
        for key, value in (config or {}).items():
            if key not in self.defaults:
                allowed = ", ".join(self.defaults) or "none"
                violations.append(_config_violation(key, f"unknown key for loss '{self.name}' (allowed: {allowed})"))
            elif not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                violations.append(
                    _config_violation(key, f"must be finite in float32 (|value| <= 3.4e38), got {value:g}")
                )
            else:
                resolved[key] = float(value)
        if not violations and CLIP_HIGH in resolved:
            violations = _threshold_violations(resolved[CLIP_LOW], resolved[CLIP_HIGH])
        if not violations and resolved.get(BETA, 0.0) < 0:
            violations = [
                _config_violation(BETA, f"must be >= 0 (the weight of the quadratic penalty), got {resolved[BETA]}")
            ]
        if violations:
            raise InvalidInput(violations)
        return resolved

    def __call__(
        self, target_logprobs_T: torch.Tensor, inputs: TokenInputs, config: Mapping[str, float]
    ) -> torch.Tensor:
        return self.body(target_logprobs_T, inputs, config)

    def stats(self, target_logprobs_T: torch.Tensor, inputs: TokenInputs, config: Mapping[str, float]) -> torch.Tensor:
        """Token counts and, for losses with a ratio, ratio statistics over active tokens, as a
        stats vector on the device (worker.loss_stats); a sequence-level loss counts a token
        clipped by its sequence ratio."""
        if inputs.sampling_logprobs_T is None:
            return token_stats(inputs.w_T != 0)
        log_ratio_T = _log_ratio(target_logprobs_T.detach(), inputs.sampling_logprobs_T)
        return token_stats(
            inputs.a_T != 0,
            log_ratio_T,
            config.get(CLIP_LOW),
            config.get(CLIP_HIGH),
            clip_log_ratio_T=inputs.sequence_log_ratio_T,
        )


def _config_violation(key: str, description: str) -> FieldViolation:
    return FieldViolation(f"loss_fn_config.{key}", description)


def _threshold_violations(lo: float, hi: float) -> list[FieldViolation]:
    if lo < 0:
        return [_config_violation(CLIP_LOW, f"must be >= 0 (an absolute ratio bound), got {lo}")]
    if hi < 1:
        return [
            _config_violation(
                CLIP_HIGH,
                f"{hi} < 1 would clip every on-policy token (ratio 1). Thresholds are absolute ratio "
                f"bounds, not offsets from 1: for an epsilon of {hi}, pass {1 + hi}",
            )
        ]
    if hi < lo:
        return [_config_violation(CLIP_HIGH, f"{hi} is below {CLIP_LOW} {lo}")]
    return []


def _given(t_T: torch.Tensor | None, name: str) -> torch.Tensor:
    if t_T is None:
        raise ValueError(f"the loss input {name} is missing")
    return t_T


def _log_ratio(target_logprobs_T: torch.Tensor, sampling_logprobs_T: torch.Tensor) -> torch.Tensor:
    return (target_logprobs_T - sampling_logprobs_T).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _cispo(t_T: torch.Tensor, x: TokenInputs, cfg: Mapping[str, float]) -> torch.Tensor:
    lo, hi = cfg[CLIP_LOW], cfg[CLIP_HIGH]
    log_ratio_T = _log_ratio(t_T.detach(), x.s_T)
    coef_T = log_ratio_T.exp().clamp(lo, hi)  # detached: bounds the coefficient, never zeroes a gradient
    return -(coef_T * t_T * x.a_T).sum()


def _importance_sampling(t_T: torch.Tensor, x: TokenInputs, cfg: Mapping[str, float]) -> torch.Tensor:
    log_ratio_T = _log_ratio(t_T, x.s_T)
    return -(log_ratio_T.exp() * x.a_T).sum()


def _ppo(t_T: torch.Tensor, x: TokenInputs, cfg: Mapping[str, float]) -> torch.Tensor:
    lo, hi = cfg[CLIP_LOW], cfg[CLIP_HIGH]
    log_ratio_T = _log_ratio(t_T, x.s_T)
    ratio_T, a_T = log_ratio_T.exp(), x.a_T
    return -torch.minimum(ratio_T * a_T, ratio_T.clamp(lo, hi) * a_T).sum()


def _cross_entropy(t_T: torch.Tensor, x: TokenInputs, cfg: Mapping[str, float]) -> torch.Tensor:
    return -(x.w_T * t_T).sum()


def _dro(t_T: torch.Tensor, x: TokenInputs, cfg: Mapping[str, float]) -> torch.Tensor:
    a_T = x.a_T
    penalty_T = torch.where(a_T != 0, (t_T - x.s_T).square(), 0.0)
    return -(t_T * a_T - 0.5 * cfg[BETA] * penalty_T).sum()


def _gspo(t_T: torch.Tensor, x: TokenInputs, cfg: Mapping[str, float]) -> torch.Tensor:
    lo, hi = cfg[CLIP_LOW], cfg[CLIP_HIGH]
    ratio_T = (x.log_s_T + t_T - t_T.detach()).exp()  # value S, gradient of its own t
    a_T = x.a_T
    return -torch.minimum(ratio_T * a_T, ratio_T.clamp(lo, hi) * a_T).sum()


LOSS_FUNCTIONS: dict[str, LossFunction] = {
    f.name: f
    for f in (
        LossFunction("cispo", {CLIP_LOW: 0.0, CLIP_HIGH: 4.0}, ("logprobs", "advantages"), _cispo),
        LossFunction("importance_sampling", {}, ("logprobs", "advantages"), _importance_sampling),
        LossFunction("ppo", {CLIP_LOW: 0.8, CLIP_HIGH: 1.2}, ("logprobs", "advantages"), _ppo),
        LossFunction("cross_entropy", {}, ("weights",), _cross_entropy),
        LossFunction("dro", {BETA: 0.05}, ("logprobs", "advantages"), _dro),
        LossFunction(
            "gspo",
            {CLIP_LOW: 0.8, CLIP_HIGH: 1.2},
            ("logprobs", "advantages"),
            _gspo,
            optional_inputs=("sequence_ratio_mask",),
            sequence_level=True,
        ),
    )
}


def get_loss_function(name: str) -> LossFunction:
    """The loss called `name` ("" means cispo); raises InvalidInput for an unknown one."""
    loss = LOSS_FUNCTIONS.get(name or "cispo")
    if loss is None:
        raise InvalidInput([FieldViolation("loss_fn", f"unknown loss '{name}' (known: {', '.join(LOSS_FUNCTIONS)})")])
    return loss
