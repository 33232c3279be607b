"""One run's passes over its policy: forward, and forward_backward into the accumulated gradient.

A batch is packed into micro-batches under a token budget (worker.batch); each goes through the
trunk with per-datum attention, the chunked head (target logprobs without the [tokens x vocab]
logits), the loss and its stats, and with backward the per-token loss gradient. Results stay
on the device until one host transfer reads them (`PendingResult.read`).
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import torch

from cispo.worker.batch import LOSS_INPUT_KINDS, MicroBatch, Sample, SampleBatch, Samples, pack, plan_micro_batches
from cispo.worker.config import EngineConfig
from cispo.worker.errors import ComputeFailed, FieldViolation, InvalidInput
from cispo.worker.logprob_head import fused_head_gradients, target_logprobs
from cispo.worker.loss_stats import STATS_SIZE, BatchStats, merge_stats, stats_from_vector
from cispo.worker.losses import LossFunction, TokenInputs
from cispo.worker.model import PolicyModel
from cispo.worker.results import BatchResult
from cispo.worker.sharding import local

LOW_PRECISION = (torch.bfloat16, torch.float16)
# What a sharded rank with fewer micro-batches than the others runs (a zero gradient).
PADDING = SampleBatch.from_samples(
    [
        Sample(
            torch.zeros(1, dtype=torch.int64),
            {
                name: torch.zeros(1, dtype=torch.int64 if kind == "int" else torch.float32)
                for name, kind in LOSS_INPUT_KINDS.items()
            },
        )
    ]
)

NON_FINITE_GRADIENT = "the loss gradient of this batch, added to the accumulated gradient, is not finite in float32"

DISCARDED_GRADIENT = (
    "the gradient accumulated since the last optim_step was discarded (--gradient-accumulation "
    "in-place); the weights and optimizer state are unchanged"
)

# Tokens of the probe `TrainingStep.probe` runs: one sequence, its ids spread over the vocabulary.
PROBE_TOKENS = 16

# Given this rank's failure (or None), returns the group's first failure (or None).
FailureAgreement = Callable[[ComputeFailed | None], ComputeFailed | None]


@dataclass(frozen=True)
class PendingResult:
    """An operation's results still on the device: per micro-batch (packed order) the target
    logprobs (T,) fp64, the loss () fp64 and a stats vector (worker.loss_stats)."""

    order: list[int]  # datum indices in packed order
    lengths: list[int]  # their lengths
    logprobs: list[torch.Tensor]
    losses: list[torch.Tensor]
    stats: list[torch.Tensor]

    def read(self, num_samples: int, extra: torch.Tensor | None = None) -> tuple[BatchResult, float]:
        """(the BatchResult, `extra` () read along) through one device-to-host transfer."""
        if not self.order:
            return BatchResult([], BatchStats()), float(extra) if extra is not None else math.nan
        device = self.logprobs[0].device
        parts = [
            merge_stats(self.stats),
            torch.stack(self.losses).sum()[None],
            (extra if extra is not None else torch.zeros(())).double().to(device)[None],
            *self.logprobs,
        ]
        host = torch.cat(parts).cpu()  # the operation's one host sync
        values = host[: STATS_SIZE + 2].tolist()
        logprobs: list[torch.Tensor | None] = [None] * num_samples
        for i, lp in zip(self.order, host[STATS_SIZE + 2 :].float().split(self.lengths)):
            logprobs[i] = lp
        stats = stats_from_vector(values[:STATS_SIZE], loss_sum=values[STATS_SIZE], tokens=sum(self.lengths))
        # Every datum is in exactly one micro-batch: none is left None.
        return BatchResult(cast(list[torch.Tensor], logprobs), stats), values[STATS_SIZE + 1]


class TrainingStep:
    """The passes of one run (its trainable `params`) over `policy`. The caller activates the
    run's weights first."""

    def __init__(self, policy: PolicyModel, config: EngineConfig, params: list[torch.nn.Parameter]):
        self.policy, self.config, self.params = policy, config, params
        head = policy.model.get_output_embeddings().weight
        # The head's fp32 leaf, when the fused head may write its gradient straight into .grad.
        self.head_param = head if policy.sharded is None and any(p is head for p in params) else None

    def forward(
        self, samples: Samples, loss: LossFunction, config: Mapping[str, float], micro_batches: int
    ) -> BatchResult:
        """Target logprobs and loss stats; no gradient."""
        with torch.no_grad():
            result = self.run(samples, loss, config, backward=False, micro_batches=micro_batches).read(len(samples))[0]
        if self.policy.sharded is not None:
            self.policy.sharded.reshard()  # the root's weights too: nothing stays gathered between operations
        return result

    def forward_backward(
        self,
        samples: Samples,
        loss: LossFunction,
        config: Mapping[str, float],
        micro_batches: int,
        agree_on_failure: FailureAgreement | None,
        degenerate: Callable[[], str | None],
    ) -> BatchResult:
        """As forward, and adds the loss gradient to the accumulated gradient.

        "exact" accumulation: the new gradient is accumulated apart from the old one. Backward
        writes straight into fresh `.grad`s (after an optim_step there is no old one, and this
        is the only gradient), the old one is added into them, and the sum is kept only when its
        norm is finite on every rank (`agree_on_failure`). The old tensors are never written, so
        a failure mid-way (e.g. out of memory) or a non-finite sum on any rank puts them back
        exactly as they were.

        "in-place": backward adds into the old `.grad`s, so one gradient is alive; a failure or
        a non-finite sum drops the whole accumulated gradient (every `.grad` None), and the
        error says so.

        A non-finite sum is blamed on the weights rather than the batch when the policy is
        `degenerate()` (called only then; every rank of a group calls it).
        """
        params = self.params
        in_place = self.config.gradient_accumulation == "in-place"
        had_gradient = any(p.grad is not None for p in params)
        previous = [None if in_place else p.grad for p in params]  # no reference: backward adds in place
        if not in_place:
            for p in params:
                p.grad = None
        failure: ComputeFailed | None = None
        error: Exception | None = None
        result = BatchResult([], BatchStats())
        try:
            pending = self.run(samples, loss, config, backward=True, micro_batches=micro_batches)
            for p, g in zip(params, previous):
                if g is not None:  # new + old, in the new buffer; the old one stays as it was
                    p.grad = g if p.grad is None else p.grad.add_(g)
            # Results, stats and the finiteness of the sum in one device-to-host transfer.
            result, finite = pending.read(len(samples), gradient_norm_sum(params))
            if not math.isfinite(finite):
                failure = ComputeFailed(NON_FINITE_GRADIENT, non_finite=True)
        except Exception as exc:
            oom = isinstance(exc, torch.OutOfMemoryError)
            failure, error = ComputeFailed(f"{'out of memory' if oom else type(exc).__name__}: {exc}", oom), exc
        if agree_on_failure is not None:
            failure = agree_on_failure(failure)
        if failure is None:
            return result
        for p, g in zip(params, previous):
            p.grad = g
        left = DISCARDED_GRADIENT if in_place and had_gradient else "the accumulated gradient is unchanged"
        if failure.non_finite:
            reason = degenerate()
            cause = (
                f"because of the weights, not this batch: the policy is degenerate ({reason}); load an earlier state"
                if reason is not None
                else "(advantages or weights too large?)"
            )
            raise InvalidInput([FieldViolation("data", f"{failure} {cause}; {left}")])
        raise ComputeFailed(f"forward_backward failed ({failure}); {left}", failure.out_of_memory) from error

    def run(
        self, samples: Samples, loss: LossFunction, config: Mapping[str, float], backward: bool, micro_batches: int = 0
    ) -> PendingResult:
        """The micro-batches of `samples`, then padding ones up to `micro_batches` (sharded
        ranks must all run as many trunk passes; see worker.sharding). Results stay on the
        device until `PendingResult.read`."""
        logprobs, losses, stats = [], [], []
        input_names = ("target_tokens", *loss.required_inputs, *loss.optional_inputs)
        batch = SampleBatch.of(samples)
        plan = plan_micro_batches(batch.length_list, self.config.micro_batch_tokens)
        order: list[int] = []  # datum indices in packed order
        lengths: list[int] = []
        for indices in plan:
            mb = pack(batch, indices, input_names, self.policy.device)
            logp_T, loss_sum, stats_vector = self.micro_batch(mb, loss, config, backward)
            assert loss_sum is not None and stats_vector is not None  # only padding has none
            logprobs.append(logp_T.detach().double())
            losses.append(loss_sum)
            stats.append(stats_vector)
            order += mb.indices
            lengths += mb.lengths
        for _ in range(micro_batches - len(plan)):
            self.micro_batch(pack(PADDING, [0], input_names, self.policy.device), loss, config, backward, padding=True)
        return PendingResult(order, lengths, logprobs, losses, stats)

    def trunk(
        self, input_ids_1T: torch.Tensor, position_ids_1T: torch.Tensor, lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, head weight) in the dtype the head computes in: the compute dtype
        (bf16 on GPU); its log-sum-exp and logp are taken in fp32."""
        with self.policy.autocast():
            hidden_TD, weight_VD = self.policy.trunk(input_ids_1T, position_ids_1T, lengths)
        dtype = self.policy.compute_dtype if self.policy.compute_dtype in LOW_PRECISION else hidden_TD.dtype
        return hidden_TD.to(dtype), weight_VD.to(dtype)

    def probe(self) -> str | None:
        """Why the policy's weights are unusable on this rank, or None: its logits on a probe of
        PROBE_TOKENS tokens are not finite, or are all equal over the vocabulary at some
        position (a uniform distribution: what weights so large that the activations overflow
        give, as the RMS norms' sums of squares become inf and their outputs 0). The first
        position is not judged for equality: it sees only its own token's embedding, which in a
        sound model may be a row of zeros (a padding token's); every later one mixes in the
        others. One small forward without gradient (sharded, a collective)."""
        device = self.policy.device
        positions = torch.arange(PROBE_TOKENS, device=device)
        ids = positions * (self.policy.vocab_size // PROBE_TOKENS)
        with torch.no_grad():
            hidden_TD, weight_VD = self.trunk(ids[None], positions[None], [PROBE_TOKENS])
            logits_TV = hidden_TD @ weight_VD.T
            flags = torch.stack([~torch.isfinite(logits_TV).all(), (logits_TV.amax(1) == logits_TV.amin(1))[1:].any()])
        if self.policy.sharded is not None:
            self.policy.sharded.reshard()
        non_finite, uniform = flags.tolist()
        if non_finite:
            return f"its logits on a probe of {PROBE_TOKENS} tokens are not finite"
        if uniform:
            return (
                f"its logits on a probe of {PROBE_TOKENS} tokens are all equal at some position: a uniform distribution"
            )
        return None

    def micro_batch(
        self, mb: MicroBatch, loss: LossFunction, config: Mapping[str, float], backward: bool, padding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Trunk, chunked head, loss, and (if `backward`) the gradient: (logp (T,) fp32, the
        loss (a () fp64 tensor), a stats vector), all on the device. A `padding` micro-batch
        contributes a zero gradient, and None for loss and stats."""
        hidden_TD, weight_VD = self.trunk(mb.input_ids_1T, mb.position_ids_1T, mb.lengths)
        inputs = TokenInputs(mb.logprobs_T, mb.advantages_T, mb.weights_T, mb.sequence_ratio_mask_T)
        chunk = self.config.head_chunk_tokens
        logp_T: torch.Tensor | None = None
        loss_sum: torch.Tensor | None = None
        if loss.sequence_level:  # the sequence ratios need every target logprob first
            with torch.no_grad():
                logp_T = target_logprobs(hidden_TD, weight_VD, mb.target_tokens_T, chunk)
            inputs = inputs.with_sequence_log_ratio(logp_T, mb.lengths)
        if backward:
            chunk_losses = []  # each chunk's loss (a sum over its tokens), kept on the device

            def token_gradient(logp_C: torch.Tensor, sl: slice) -> torch.Tensor:
                if padding:
                    return torch.zeros_like(logp_C)
                with torch.enable_grad():
                    leaf_C = logp_C.detach().requires_grad_()
                    value = loss(leaf_C, inputs[sl], config)
                    chunk_losses.append(value.detach())
                    return torch.autograd.grad(value, leaf_C)[0]

            surrogate, logp_T = fused_head_gradients(
                hidden_TD, weight_VD, mb.target_tokens_T, token_gradient, chunk, weight_grad_into=self.head_param
            )
            surrogate.backward()
            if padding:
                return logp_T, None, None
            # The loss is a sum over tokens: the sum of the chunks' losses (in fp64).
            loss_sum = torch.stack(chunk_losses).double().sum()
        elif logp_T is None:
            logp_T = target_logprobs(hidden_TD, weight_VD, mb.target_tokens_T, chunk)
        if padding:
            return logp_T, None, None
        if loss_sum is None:
            loss_sum = loss(logp_T, inputs, config).double()
        return logp_T, loss_sum, loss.stats(logp_T, inputs, config)


def gradient_norm_sum(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The sum of the per-tensor fp32 L2 norms of the gradients, a () tensor on the device:
    finite exactly when every gradient, and so the global norm optim_step takes of them, is
    finite in float32. One pass. Sharded, over this rank's shards (the group agrees through
    `agree_on_failure`)."""
    grads = [local(p.grad) for p in params if p.grad is not None]  # this rank's shards, when sharded
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).float() for g in grads]
    return torch.stack([n.to(norms[0].device) for n in norms]).sum() if norms else torch.zeros(())
