"""The built-in sampler: batched generation with a KV cache, exact logprobs, seeded draws.

At each step a sequence draws its next token from

    q = softmax(logits / temperature), kept to the top_k most likely tokens, then to the
        smallest set of most likely tokens whose mass reaches top_p, renormalised

and reports log q(token), the denominator an importance ratio needs. At temperature 1 with no
truncation q is the policy itself, so the logprobs equal the trainer's (same trunk, same head
arithmetic). Temperature 0 is greedy (argmax), reported at temperature 1 (a point mass says
nothing).

Every request of a batch is prefilled once, its `num_samples` rows share that cache, and all rows
of all requests decode together; finished rows leave the batch. Each request draws from its own
generator (seeded), one uniform per row and step, by inverse CDF: the same request with the same
seed gives the same samples whatever else shares the batch.
"""

import functools
import inspect
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from transformers import DynamicCache

from cispo.worker.config import SamplingLimits
from cispo.worker.errors import FieldViolation, InvalidInput, LimitExceeded
from cispo.worker.logprob_head import target_logprobs
from cispo.worker.model import PolicyModel

StopReason = Literal["length", "stop"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample (see the module docstring); None fields take their defaults at validation."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1  # <= 0: all tokens
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SampleRequest:
    """One Sample request: `prompt` (P,) int64 token ids on the CPU."""

    prompt: torch.Tensor
    num_samples: int = 1
    params: SamplingParams = SamplingParams()
    include_prompt_logprobs: bool = False
    model_path: str = ""
    """"" samples the training state's weights; else a saved sampler export (name or path)."""
    owner: str | None = None
    """The caller's identity (who may read `model_path`)."""

    @property
    def cost(self) -> int:
        """Tokens it holds in a batch: num_samples * (prompt + max_tokens)."""
        return self.num_samples * (int(self.prompt.shape[0]) + (self.params.max_tokens or 0))


@dataclass(frozen=True)
class SampledSequence:
    tokens: torch.Tensor  # (L,) int64, the stop token included
    logprobs: torch.Tensor  # (L,) fp32, log q of each token
    stop_reason: StopReason


@dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: torch.Tensor | None  # (P - 1,) fp32 at temperature 1, when asked


def validate_sample_request(request: SampleRequest, policy: PolicyModel, limits: SamplingLimits) -> SampleRequest:
    """The request with defaults resolved (max_tokens, a fresh seed); InvalidInput for bad
    parameters, LimitExceeded over a limit. Computes nothing."""
    bad: list[FieldViolation] = []
    prompt, params = request.prompt, request.params
    vocab, context = policy.vocab_size, policy.max_sequence_length
    if prompt.dim() != 1 or prompt.shape[0] < 1 or prompt.is_floating_point():
        bad.append(FieldViolation("prompt", "must be 1-D integer token ids, at least one"))
    elif int(prompt.min()) < 0 or int(prompt.max()) >= vocab:
        bad.append(
            FieldViolation("prompt", f"token ids must be in [0, {vocab}), got {int(prompt.min())}..{int(prompt.max())}")
        )
    elif prompt.shape[0] >= context:
        bad.append(
            FieldViolation(
                "prompt", f"length {prompt.shape[0]} leaves no room in the model's max_sequence_length {context}"
            )
        )
    if request.num_samples < 1:
        bad.append(FieldViolation("num_samples", f"must be >= 1, got {request.num_samples}"))
    if params.max_tokens is not None and params.max_tokens < 1:
        bad.append(FieldViolation("sampling_params.max_tokens", f"must be >= 1, got {params.max_tokens}"))
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= 1e6):
        bad.append(FieldViolation("sampling_params.temperature", f"must be finite and >= 0, got {params.temperature}"))
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        bad.append(FieldViolation("sampling_params.top_p", f"must be in (0, 1], got {params.top_p}"))
    if params.top_k < -1:
        bad.append(FieldViolation("sampling_params.top_k", f"must be >= 1, or 0 or -1 for all, got {params.top_k}"))
    odd = [t for t in params.stop_tokens if not 0 <= t < vocab]
    if odd:
        bad.append(FieldViolation("sampling_params.stop_tokens", f"token ids must be in [0, {vocab}), got {odd[:3]}"))
    if params.stop_strings and policy.tokenizer is None:
        bad.append(
            FieldViolation(
                "sampling_params.stop_strings",
                "need a tokenizer, and this model directory has none; give stop_tokens instead",
            )
        )
    if any(not s for s in params.stop_strings):
        bad.append(FieldViolation("sampling_params.stop_strings", "must not be empty strings"))
    if bad:
        raise InvalidInput(bad)
    if request.num_samples > limits.max_num_samples:
        raise LimitExceeded(
            "max_num_samples",
            f"num_samples {request.num_samples} is over the limit max_num_samples={limits.max_num_samples}",
        )
    if params.max_tokens is not None and params.max_tokens > limits.max_sample_tokens:
        raise LimitExceeded(
            "max_sample_tokens",
            f"max_tokens {params.max_tokens} is over the limit max_sample_tokens={limits.max_sample_tokens}",
        )
    room = context - int(prompt.shape[0])
    max_tokens = min(params.max_tokens or limits.max_sample_tokens, room)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    resolved = replace(
        request,
        params=replace(params, max_tokens=max_tokens, seed=seed, top_k=params.top_k if params.top_k > 0 else -1),
    )
    if resolved.cost > limits.max_sample_request_tokens:
        raise LimitExceeded(
            "max_sample_request_tokens",
            (
                f"num_samples * (prompt + max_tokens) = {resolved.cost} tokens is over the limit "
                f"max_sample_request_tokens={limits.max_sample_request_tokens}"
            ),
        )
    return resolved


def generate(policy: PolicyModel, requests: Sequence[SampleRequest]) -> list[SampleResult]:
    """Sample every (validated) request on `policy`'s weights, all in one batch."""
    device = policy.device
    counts = [r.num_samples for r in requests]
    rows_of = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts))  # (B,) request of each row
    params = [r.params for r in requests]
    max_tokens = [_resolved(p.max_tokens, "max_tokens") for p in params]
    generators = [torch.Generator(device=device).manual_seed(_resolved(p.seed, "seed")) for p in params]
    with torch.no_grad(), policy.autocast():
        cache = DynamicCache()
        hidden_RPD, mask_RP = _prefill(policy, [r.prompt for r in requests], cache)
        prompt_logprobs = [
            _prompt_logprobs(policy, hidden_RPD[i], mask_RP[i], r.prompt) if r.include_prompt_logprobs else None
            for i, r in enumerate(requests)
        ]
        index_B = rows_of.to(device)
        cache.batch_select_indices(index_B)
        mask_BS = mask_RP[index_B]
        logits_BV = _logits(policy, hidden_RPD[index_B, -1])
        positions_B = mask_BS.sum(-1)  # position of the next token
        del hidden_RPD
        rows = list(range(len(rows_of)))  # rows still generating, in batch order
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        reasons: list[StopReason] = ["length"] * len(rows)  # a row that leaves without a stop ran out of tokens
        stops = [frozenset(policy.eos_token_ids) | frozenset(p.stop_tokens) for p in params]
        settings = _RowSettings.of(rows_of, params, device)
        while rows:
            token_B, logq_B = _draw(logits_BV, settings, generators)  # on the CPU
            keep = []
            for j, (row, r, token, logq) in enumerate(zip(rows, settings.owners, token_B.tolist(), logq_B.tolist())):
                tokens[row].append(token)
                logprobs[row].append(logq)
                if token in stops[r] or _hit_stop_string(policy, tokens[row], params[r].stop_strings):
                    reasons[row] = "stop"
                elif len(tokens[row]) < max_tokens[r]:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows):
                kept = torch.tensor(keep)
                token_B = token_B[kept]
                kept = kept.to(device)
                cache.batch_select_indices(kept)
                mask_BS, positions_B = mask_BS[kept], positions_B[kept]
                rows = [rows[j] for j in keep]
                settings = settings.select(keep)
            mask_BS = torch.cat([mask_BS, mask_BS.new_ones(len(rows), 1)], dim=1)
            hidden_B1D = _decode(policy, token_B[:, None].to(device), mask_BS, positions_B[:, None], cache)
            logits_BV = _logits(policy, hidden_B1D[:, -1])
            positions_B = positions_B + 1
    results, start = [], 0
    for i, n in enumerate(counts):
        results.append(
            SampleResult(
                sequences=[
                    SampledSequence(
                        torch.tensor(tokens[row], dtype=torch.int64),
                        torch.tensor(logprobs[row], dtype=torch.float32),
                        reasons[row],
                    )
                    for row in range(start, start + n)
                ],
                prompt_logprobs=prompt_logprobs[i],
            )
        )
        start += n
    return results


def _resolved(value: int | None, name: str) -> int:
    """A sampling parameter `validate_sample_request` resolves (generate takes only its requests)."""
    if value is None:
        raise ValueError(f"sampling_params.{name} is unresolved: validate the request first")
    return value


def _prefill(
    policy: PolicyModel, prompts: list[torch.Tensor], cache: DynamicCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts through the trunk into `cache`: ((R, P, D) hidden, (R, P) mask)."""
    longest = max(int(p.shape[0]) for p in prompts)
    ids_RP = torch.zeros(len(prompts), longest, dtype=torch.int64)
    mask_RP = torch.zeros(len(prompts), longest, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids_RP[i, longest - p.shape[0] :] = p
        mask_RP[i, longest - p.shape[0] :] = 1
    ids_RP, mask_RP = ids_RP.to(policy.device), mask_RP.to(policy.device)
    positions_RP = (mask_RP.cumsum(-1) - 1).clamp(min=0)
    return _decode(policy, ids_RP, mask_RP, positions_RP, cache), mask_RP


def _decode(
    policy: PolicyModel, ids_BS: torch.Tensor, mask_BT: torch.Tensor, positions_BS: torch.Tensor, cache: DynamicCache
) -> torch.Tensor:
    """The trunk over new tokens (B, S), attending to the cache; the mask covers all T so far:
    the last hidden states (B, S, D)."""
    decoder: torch.nn.Module = policy.model.get_decoder()
    return decoder(
        input_ids=ids_BS,
        attention_mask=mask_BT,
        position_ids=positions_BS,
        use_cache=True,
        **{_cache_argument(type(decoder)): cache},  # type: ignore[arg-type]  # mypy reads type(x) as not Hashable; classes are
    ).last_hidden_state


@functools.cache
def _cache_argument(decoder_type: type[torch.nn.Module]) -> str:
    """The decoder's name for its KV cache argument: transformers renamed past_key_values to
    cache in 5.x."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


def _logits(policy: PolicyModel, hidden_BD: torch.Tensor) -> torch.Tensor:
    """(B, V) fp32 logits of the last positions, as the trainer's head computes them."""
    weight_VD = policy.head_weight_VD.to(hidden_BD.dtype)
    return (hidden_BD @ weight_VD.T).float()


def _prompt_logprobs(
    policy: PolicyModel, hidden_PD: torch.Tensor, mask_P: torch.Tensor, prompt: torch.Tensor
) -> torch.Tensor:
    """(P - 1,) logprob of prompt[i + 1] after prompt[: i + 1], through the chunked head."""
    n = int(prompt.shape[0])
    hidden = hidden_PD[hidden_PD.shape[0] - n : hidden_PD.shape[0] - 1]
    weight_VD = policy.head_weight_VD.to(hidden.dtype)
    return target_logprobs(hidden, weight_VD, prompt[1:].to(hidden.device)).float().cpu()


@dataclass(frozen=True)
class _RowSettings:
    """The sampling settings of each row still generating, (B,) each on the device; the rows of
    a request are consecutive."""

    owners: list[int]  # (B,) request of each row
    groups: list[tuple[int, int]]  # (request, rows) of each run of consecutive rows
    temperature_B: torch.Tensor  # fp32, 1 where greedy
    greedy_B: torch.Tensor  # bool
    top_k_B: torch.Tensor  # int64, <= 0: all tokens
    top_p_B: torch.Tensor  # fp32
    truncate: bool  # whether any sampled (not greedy) row has top-k or top-p

    @classmethod
    def of(cls, rows_of: torch.Tensor, params: list[SamplingParams], device: torch.device) -> "_RowSettings":
        def per_row(field: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(params[r], field) for r in rows_of.tolist()], dtype=dtype, device=device)

        temperature_B = per_row("temperature", torch.float32)
        greedy_B = temperature_B == 0
        return cls._make(
            rows_of.tolist(),
            torch.where(greedy_B, 1.0, temperature_B),
            greedy_B,
            per_row("top_k", torch.int64),
            per_row("top_p", torch.float32),
            any(p.top_k > 0 or p.top_p < 1 for p in params if p.temperature > 0),
        )

    def select(self, keep: list[int]) -> "_RowSettings":
        """The settings of rows `keep` (increasing positions in the batch)."""
        kept = torch.tensor(keep, device=self.temperature_B.device)
        return self._make(
            [self.owners[j] for j in keep],
            self.temperature_B[kept],
            self.greedy_B[kept],
            self.top_k_B[kept],
            self.top_p_B[kept],
            self.truncate,
        )

    @classmethod
    def _make(
        cls,
        owners: list[int],
        temperature_B: torch.Tensor,
        greedy_B: torch.Tensor,
        top_k_B: torch.Tensor,
        top_p_B: torch.Tensor,
        truncate: bool,
    ) -> "_RowSettings":
        groups: list[tuple[int, int]] = []  # (request, rows)
        for r in owners:
            if groups and groups[-1][0] == r:
                groups[-1] = (r, groups[-1][1] + 1)
            else:
                groups.append((r, 1))
        return cls(owners, groups, temperature_B, greedy_B, top_k_B, top_p_B, truncate)


def _draw(
    logits_BV: torch.Tensor, rows: _RowSettings, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log q: (B,) int64 and (B,) fp32 on the CPU."""
    device = logits_BV.device
    scaled_BV = logits_BV / rows.temperature_B[:, None]
    if rows.truncate:
        scaled_BV = _truncate(scaled_BV, rows.top_k_B, rows.top_p_B, ~rows.greedy_B)
    logq_BV = torch.log_softmax(scaled_BV, dim=-1)
    # One uniform in (0, 1] per row from its request's generator, in row order; by inverse CDF
    # (in fp64), a token of probability 0 is never drawn.
    uniform_B = 1 - torch.cat(
        [torch.rand(n, generator=generators[r], device=device, dtype=torch.float64) for r, n in rows.groups]
    )
    cdf_BV = logq_BV.double().exp().cumsum(-1)
    sampled_B = torch.searchsorted(cdf_BV, (uniform_B * cdf_BV[:, -1])[:, None])[:, 0].clamp(max=cdf_BV.shape[1] - 1)
    token_B = torch.where(rows.greedy_B, logits_BV.argmax(-1), sampled_B)
    logq_B = logq_BV.gather(1, token_B[:, None])[:, 0]
    return token_B.cpu(), logq_B.float().cpu()


def _truncate(
    scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor, rows_B: torch.Tensor
) -> torch.Tensor:
    """Logits with the tokens outside top-k, then outside the top-p nucleus, set to -inf
    (rows where `rows_B` is False are left whole)."""
    sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(scaled_BV.shape[1], device=scaled_BV.device)
    outside_BV = (top_k_B[:, None] > 0) & (rank_V[None] >= top_k_B[:, None])
    sorted_BV = sorted_BV.masked_fill(outside_BV, -math.inf)
    probs_BV = torch.softmax(sorted_BV, dim=-1)
    mass_before_BV = probs_BV.cumsum(-1) - probs_BV
    outside_BV |= (mass_before_BV >= top_p_B[:, None]) & (top_p_B[:, None] < 1)  # top_p 1 keeps even fp dust
    outside_BV &= rows_B[:, None]
    outside_BV[:, 0] = False  # the most likely token always stays
    return scaled_BV.masked_fill(torch.zeros_like(outside_BV).scatter(1, order_BV, outside_BV), -math.inf)


def _hit_stop_string(policy: PolicyModel, tokens: list[int], stop_strings: tuple[str, ...]) -> bool:
    """Whether the last token completed a stop string in the generated text."""
    if not stop_strings:
        return False
    tokenizer = policy.tokenizer
    if tokenizer is None:
        raise ValueError("stop_strings need a tokenizer; validate the request first")
    window = 4 * max(len(s) for s in stop_strings) + 8  # tokens that can hold the newest match
    text = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    before = tokenizer.decode(tokens[-window:-1], skip_special_tokens=False)
    return any(s in text and s not in before for s in stop_strings)
