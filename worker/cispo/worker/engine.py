"""The training state and its operations: forward, forward_backward, optim_step, save, load,
sample and save_weights_for_sampler.

One Engine is one training state on one device (one data-parallel rank). Every public method
validates its whole input before computing anything and leaves the state unchanged when it
fails. Not thread-safe: the service runs operations one at a time, in order.
"""

import errno
import math
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cispo.worker import checkpoint, lora, sampler_weights, sharded_checkpoint
from cispo.worker.batch import LOSS_INPUT_KINDS, MicroBatch, Sample, SampleBatch, Samples, pack, plan_micro_batches
from cispo.worker.config import SERVING_DTYPES, EngineConfig
from cispo.worker.errors import (
    ComputeFailed,
    FieldViolation,
    InvalidInput,
    PermissionDenied,
    StateNotFound,
    StepRefused,
)
from cispo.worker.logprob_head import fused_head_gradients, target_logprobs
from cispo.worker.loss_stats import STATS_SIZE, BatchStats, merge_stats, stats_from_vector
from cispo.worker.losses import LOSS_FUNCTIONS, LossFunction, TokenInputs, get_loss_function
from cispo.worker.model import PolicyModel
from cispo.worker.optimizer import MOMENTS, AdamParams, Optimizer
from cispo.worker.sampler_weights import ExportCache, SamplerWeights
from cispo.worker.sampling import SampleRequest, SampleResult, generate, validate_sample_request
from cispo.worker.sharding import MemoryUse, first_failure, is_sharded, like, local, local_bytes
from cispo.worker.validation import validate_batch


@dataclass(frozen=True)
class BatchResult:
    """Per-datum target logprobs ((N_i,) fp32, CPU, request order) and the batch's stats."""

    logprobs: list[torch.Tensor]
    stats: BatchStats

    @property
    def metrics(self) -> dict[str, float]:
        return self.stats.metrics()


@dataclass(frozen=True)
class _PendingResult:
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
        return BatchResult(logprobs=logprobs, stats=stats), values[STATS_SIZE + 1]


@dataclass(frozen=True)
class OptimResult:
    grad_norm: float  # pre-clip global L2 norm
    step: int  # steps taken so far, this one included
    learning_rate: float


@dataclass(frozen=True)
class EngineInfo:
    """A run's engine (or the served base model, with no run) as GetInfo describes it."""

    model_name: str  # the served model's name (its directory, or the embedded test model's)
    vocab_size: int
    max_sequence_length: int
    device: str  # the device type: "cpu", "cuda"
    dtype: str  # the compute dtype: "float32", "bfloat16"
    num_parameters: int  # the run's trainable parameters (the base: all of the model's)
    step: int  # optimizer steps taken (the base: 0)
    has_tokenizer: bool = False
    eos_token_ids: tuple[int, ...] = ()
    loss_functions: dict[str, LossFunction] = field(default_factory=lambda: dict(LOSS_FUNCTIONS))
    sharding: str = "replicated"
    memory: MemoryUse = MemoryUse(0, 0, 0)
    """Bytes this rank holds for the run's trainable parameters, gradient and AdamW moments."""
    architecture: str = ""  # the HF config's model_type, e.g. "llama"
    device_name: str = ""  # the torch device with its index, e.g. "cuda:0"


def base_info(policy: PolicyModel) -> EngineInfo:
    """The served base model, described as a run with no training of its own."""
    return describe(policy, sum(p.numel() for p in policy.model.parameters()))


def describe(
    policy: PolicyModel, num_parameters: int, step: int = 0, memory: MemoryUse = MemoryUse(0, 0, 0)
) -> EngineInfo:
    """`policy` described with a run's `num_parameters`, `step` and `memory`."""
    return EngineInfo(
        model_name=policy.name,
        vocab_size=policy.vocab_size,
        max_sequence_length=policy.max_sequence_length,
        device=policy.device.type,
        dtype=str(policy.compute_dtype).removeprefix("torch."),
        num_parameters=num_parameters,
        step=step,
        memory=memory,
        has_tokenizer=policy.tokenizer is not None,
        eos_token_ids=policy.eos_token_ids,
        sharding=policy.sharding,
        architecture=policy.model.config.model_type,
        device_name=str(policy.device),
    )


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

SHARDED_EXPORT_SAMPLING = (
    "a sharded group (--sharding fsdp) samples its current weights only (and the sampler "
    "weights a run saved of them last, when --sampler-dtype is the compute dtype and, for a "
    "LoRA adapter, float32; never merged ones); serve other saved sampler weights with an "
    "external sampler such as vLLM"
)

NON_FINITE_GRADIENT = "the loss gradient of this batch, added to the accumulated gradient, is not finite in float32"

# Tokens of the probe `Engine.degenerate` runs: one sequence, its ids spread over the vocabulary.
PROBE_TOKENS = 16

DISCARDED_GRADIENT = (
    "the gradient accumulated since the last optim_step was discarded (--gradient-accumulation "
    "in-place); the weights and optimizer state are unchanged"
)

# Sums the engine's gradients across data-parallel ranks in place (None on a single rank).
GradientReducer = Callable[[], None]
# Given this rank's failure (or None), returns the group's first failure (or None).
FailureAgreement = Callable[[ComputeFailed | None], ComputeFailed | None]


def validate_forward(
    policy: PolicyModel,
    config: EngineConfig,
    samples: Samples,
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
) -> tuple[LossFunction, dict[str, float]]:
    """The loss and its resolved config for a forward(_backward) on `policy`; raises
    InvalidInput/LimitExceeded, computes nothing."""
    loss = get_loss_function(loss_fn)
    resolved = loss.resolve_config(loss_fn_config)
    validate_batch(samples, loss, policy.vocab_size, policy.max_sequence_length, config.max_tokens_per_request)
    return loss, resolved


def validate_sample(policy: PolicyModel, config: EngineConfig, request: SampleRequest) -> SampleRequest:
    """The sample request with its defaults resolved; raises InvalidInput/LimitExceeded."""
    if request.model_path:
        sampler_weights.export_name(config.export, request.model_path)
    return validate_sample_request(request, policy, config.sampling)


class Engine:
    def __init__(
        self,
        policy: PolicyModel,
        config: EngineConfig = EngineConfig(),
        gradient_reducer: GradientReducer | None = None,
        agree_on_failure: FailureAgreement | None = None,
        adapter: str | None = None,
        lora_spec: lora.LoraSpec | None = None,
        exports: ExportCache | None = None,
    ):
        """A full fine-tune of `policy` (adapter None), or the LoRA run training `policy`'s
        adapter `adapter` (made with `lora_spec`), which the engine activates for each operation."""
        self.policy = policy
        self.config = config
        self.gradient_reducer = gradient_reducer
        self.agree_on_failure = agree_on_failure
        self.rank = 0  # data-parallel rank (set by worker.group)
        self.process_group = None  # the group's control group (set by worker.group)
        self.current_export: str | None = None  # sharded: the sampler weights that are the current weights
        self.adapter = adapter
        self.lora_spec = lora_spec
        self.named_params = (
            lora.adapter_parameters(policy, adapter)
            if adapter is not None
            else {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
        )
        # FSDP2 shards a full fine-tune's parameters; a LoRA run's adapter is whole on every rank.
        self.state_sharded = any(is_sharded(p) for p in self.named_params.values())
        head = policy.model.get_output_embeddings().weight
        # The head's fp32 leaf, when the fused head may write its gradient straight into .grad.
        self.head_param = (
            head if policy.sharded is None and any(p is head for p in self.named_params.values()) else None
        )
        self.optimizer = Optimizer(self.named_params, sharded=self.state_sharded)
        self.exports = exports if exports is not None else ExportCache(config.export.cache_size)

    def activate(self) -> None:
        """Make this run's weights the ones the shared model computes with."""
        if self.adapter is not None:
            lora.activate(self.policy, self.adapter)

    def info(self) -> EngineInfo:
        numel = sum(t.numel() for t in self.named_params.values())
        return describe(self.policy, numel, self.optimizer.step_count, self.memory_use())

    def memory_use(self) -> MemoryUse:
        """Bytes this rank holds now for the run's parameters, gradient and moments (shards only,
        when sharded)."""
        params = list(self.named_params.values())
        return MemoryUse(
            parameters=local_bytes(params),
            gradients=local_bytes(p.grad for p in params),
            optimizer=local_bytes(self.optimizer.moments().values()),
        )

    # -- forward / forward_backward -------------------------------------------------------------

    def validate(self, samples: Samples, loss_fn: str, loss_fn_config: Mapping[str, float] | None):
        """The loss and its resolved config; raises InvalidInput/LimitExceeded, computes nothing."""
        return validate_forward(self.policy, self.config, samples, loss_fn, loss_fn_config)

    def forward(
        self, samples: Samples, loss_fn: str = "cispo", loss_fn_config: Mapping[str, float] | None = None
    ) -> BatchResult:
        """Validate, then run_batch without gradient."""
        return self.run_batch(samples, *self.validate(samples, loss_fn, loss_fn_config), backward=False)

    def forward_backward(
        self, samples: Samples, loss_fn: str = "cispo", loss_fn_config: Mapping[str, float] | None = None
    ) -> BatchResult:
        """Validate, then run_batch with gradient."""
        return self.run_batch(samples, *self.validate(samples, loss_fn, loss_fn_config), backward=True)

    def run_batch(
        self,
        samples: Samples,
        loss: LossFunction,
        config: Mapping[str, float],
        *,
        backward: bool,
        micro_batches: int = 0,
    ) -> BatchResult:
        """Target logprobs and loss stats of already validated samples (possibly none: a rank's
        empty shard), in at least `micro_batches` trunk passes (the group's most, when sharded);
        with `backward`, the loss gradient is added to the accumulated gradient."""
        if backward:
            return self._forward_backward(samples, loss, config, micro_batches)
        if not samples and not micro_batches:
            return BatchResult([], BatchStats())
        self.activate()
        with torch.no_grad():
            result = self._run(samples, loss, config, backward=False, micro_batches=micro_batches).read(len(samples))[0]
        if self.policy.sharded is not None:
            self.policy.sharded.reshard()  # the root's weights too: nothing stays gathered between operations
        return result

    def _forward_backward(
        self, samples: Samples, loss: LossFunction, config: Mapping[str, float], micro_batches: int
    ) -> BatchResult:
        """run_batch with `backward`.

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
        degenerate (`degenerate`, run only then).
        """
        self.activate()
        params = list(self.named_params.values())
        in_place = self.config.gradient_accumulation == "in-place"
        had_gradient = any(p.grad is not None for p in params)
        previous = [None if in_place else p.grad for p in params]  # no reference: backward adds in place
        if not in_place:
            for p in params:
                p.grad = None
        failure, error, result = None, None, BatchResult([], BatchStats())
        try:
            pending = self._run(samples, loss, config, backward=True, micro_batches=micro_batches)
            for p, g in zip(params, previous):
                if g is not None:  # new + old, in the new buffer; the old one stays as it was
                    p.grad = g if p.grad is None else p.grad.add_(g)
            # Results, stats and the finiteness of the sum in one device-to-host transfer.
            result, finite = pending.read(len(samples), self._gradient_norm_sum(params))
            if not math.isfinite(finite):
                failure = ComputeFailed(NON_FINITE_GRADIENT, non_finite=True)
        except Exception as exc:
            oom = isinstance(exc, torch.OutOfMemoryError)
            failure, error = ComputeFailed(f"{'out of memory' if oom else type(exc).__name__}: {exc}", oom), exc
        if self.agree_on_failure is not None:
            failure = self.agree_on_failure(failure)
        if failure is not None:
            for p, g in zip(params, previous):
                p.grad = g
            left = DISCARDED_GRADIENT if in_place and had_gradient else "the accumulated gradient is unchanged"
            if failure.non_finite:
                degenerate = self.degenerate()
                cause = (
                    f"because of the weights, not this batch: the policy is degenerate ({degenerate}); load an "
                    "earlier state"
                    if degenerate is not None
                    else "(advantages or weights too large?)"
                )
                raise InvalidInput([FieldViolation("data", f"{failure} {cause}; {left}")])
            raise ComputeFailed(f"forward_backward failed ({failure}); {left}", failure.out_of_memory) from error
        return result

    @staticmethod
    def _gradient_norm_sum(params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The sum of the per-tensor fp32 L2 norms of the gradients, a () tensor on the device:
        finite exactly when every gradient, and so the global norm optim_step takes of them, is
        finite in float32. One pass. Sharded, over this rank's shards (the group agrees through
        `agree_on_failure`)."""
        grads = [local(p.grad) for p in params if p.grad is not None]  # this rank's shards, when sharded
        norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).float() for g in grads]
        return torch.stack([n.to(norms[0].device) for n in norms]).sum() if norms else torch.zeros(())

    def _run(
        self, samples: Samples, loss: LossFunction, config: Mapping[str, float], backward: bool, micro_batches: int = 0
    ) -> "_PendingResult":
        """The micro-batches of `samples`, then padding ones up to `micro_batches` (sharded
        ranks must all run as many trunk passes; see worker.sharding). Results stay on the
        device until `_PendingResult.read`."""
        logprobs, losses, stats = [], [], []
        input_names = ("target_tokens", *loss.required_inputs, *loss.optional_inputs)
        batch = SampleBatch.of(samples)
        plan = plan_micro_batches(batch.length_list, self.config.micro_batch_tokens)
        order: list[int] = []  # datum indices in packed order
        lengths: list[int] = []
        for indices in plan:
            mb = pack(batch, indices, input_names, self.policy.device)
            logp_T, loss_sum, stats_vector = self._micro_batch(mb, loss, config, backward)
            logprobs.append(logp_T.detach().double())
            losses.append(loss_sum)
            stats.append(stats_vector)
            order += mb.indices
            lengths += mb.lengths
        for _ in range(micro_batches - len(plan)):
            self._micro_batch(pack(PADDING, [0], input_names, self.policy.device), loss, config, backward, padding=True)
        return _PendingResult(order, lengths, logprobs, losses, stats)

    def _trunk(
        self, input_ids_1T: torch.Tensor, position_ids_1T: torch.Tensor, lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, head weight) in the dtype the head computes in: the compute dtype
        (bf16 on GPU); its log-sum-exp and logp are taken in fp32."""
        with self.policy.autocast():
            hidden_TD, weight_VD = self.policy.trunk(input_ids_1T, position_ids_1T, lengths)
        dtype = self.policy.compute_dtype if self.policy.compute_dtype in LOW_PRECISION else hidden_TD.dtype
        return hidden_TD.to(dtype), weight_VD.to(dtype)

    def degenerate(self) -> str | None:
        """Why the policy's weights are unusable, or None: its logits on a probe of PROBE_TOKENS
        tokens are not finite, or are all equal over the vocabulary at some position (a
        uniform distribution: what weights so large that the activations overflow give, as
        the RMS norms' sums of squares become inf and their outputs 0). The first position is
        not judged for equality: it sees only its own token's embedding, which in a sound
        model may be a row of zeros (a padding token's); every later one mixes in the others.
        One small forward without gradient. Every rank of a group calls it (sharded, the
        forward is a collective), and all take the lowest failing rank's reason."""
        self.activate()
        device = self.policy.device
        positions = torch.arange(PROBE_TOKENS, device=device)
        ids = positions * (self.policy.vocab_size // PROBE_TOKENS)
        with torch.no_grad():
            hidden_TD, weight_VD = self._trunk(ids[None], positions[None], [PROBE_TOKENS])
            logits_TV = hidden_TD @ weight_VD.T
            flags = torch.stack([~torch.isfinite(logits_TV).all(), (logits_TV.amax(1) == logits_TV.amin(1))[1:].any()])
        if self.policy.sharded is not None:
            self.policy.sharded.reshard()
        non_finite, uniform = flags.tolist()
        reason = (
            f"its logits on a probe of {PROBE_TOKENS} tokens are not finite"
            if non_finite
            else f"its logits on a probe of {PROBE_TOKENS} tokens are all equal at some position: a uniform "
            "distribution"
            if uniform
            else None
        )
        if self.process_group is not None:
            failure = first_failure(None if reason is None else StepRefused(reason), self.process_group)
            reason = None if failure is None else str(failure)
        return reason

    def _micro_batch(
        self, mb: MicroBatch, loss: LossFunction, config: Mapping[str, float], backward: bool, padding: bool = False
    ):
        """Trunk, chunked head, loss, and (if `backward`) the gradient: (logp (T,) fp32, the
        loss (a () fp64 tensor), a stats vector), all on the device. A `padding` micro-batch
        contributes a zero gradient, and None for loss and stats."""
        hidden_TD, weight_VD = self._trunk(mb.input_ids_1T, mb.position_ids_1T, mb.lengths)
        inputs = TokenInputs(mb.logprobs_T, mb.advantages_T, mb.weights_T, mb.sequence_ratio_mask_T)
        chunk = self.config.head_chunk_tokens
        logp_T, loss_sum = None, None
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

    # -- optimizer ------------------------------------------------------------------------------

    def optim_step(self, adam: AdamParams) -> OptimResult:
        """Sum gradients across ranks, clip, AdamW step, zero the gradient.

        A step whose weights would make the policy degenerate (`degenerate`) is refused.
        A refused step (StepRefused) changes no weight or moment. After a cross-rank sum, only
        rank 0 keeps the summed gradient, so the next step's sum counts it once."""
        if self.gradient_reducer is not None:
            self.gradient_reducer()
        self.current_export = None
        try:
            grad_norm = self.optimizer.step(adam, self.degenerate)
        except StepRefused:
            if self.gradient_reducer is not None and self.rank != 0:
                self.optimizer.zero_grad()
            raise
        return OptimResult(grad_norm=grad_norm, step=self.optimizer.step_count, learning_rate=adam.learning_rate)

    # -- states ---------------------------------------------------------------------------------

    def save_state(self, name: str, owner: str | None = None) -> Path | None:
        """Write weights, optimizer state and step count under `name`, owned by `owner`
        (None: anyone; PermissionDenied if another identity owns the name). Sharded state, every
        rank calls it and writes its shards (a v2 state); rank 0 returns the path, the others None."""
        manifest = {
            "step": self.optimizer.step_count,
            "model_name": self.policy.name,
            "num_tensors": len(self.named_params),
            "lora": self.lora_spec.to_dict() if self.lora_spec is not None else None,
        }
        with _save_failures(f"state '{name}'", "state"):
            if self.state_sharded:
                return sharded_checkpoint.save(
                    self.config.checkpoint_dir,
                    name,
                    sharded_checkpoint.state_dict(self.named_params, self.optimizer.moments()),
                    manifest,
                    owner,
                    self.process_group,
                )
            return checkpoint.save_state(
                self.config.checkpoint_dir,
                name,
                dict(self.named_params),
                self.optimizer.state_tensors(),
                manifest["step"],
                self.policy.name,
                owner=owner,
                lora=manifest["lora"],
            )

    def load_state(self, name: str, with_optimizer: bool = False, owner: str | None = None) -> int:
        """Restore weights (and, if asked, optimizer state and step count; else a fresh
        optimizer at step 0). Drops the accumulated gradient. Returns the state's step count.
        Checks every tensor's name, shape and dtype before changing anything. Reads v1 and v2
        states (worker.checkpoint, worker.sharded_checkpoint); sharded state, every rank calls
        it, and the ranks agree on the checks before any of them reads tensors."""
        sharded = self.state_sharded
        failure, found = None, None
        try:
            found = self._saved_state(name, with_optimizer, owner)
        except Exception as exc:
            failure = exc
        if sharded:
            failure = first_failure(failure, self.process_group)
        if failure is not None:
            raise failure
        path, manifest, moments, state = found
        if state is None:  # v2: into fresh tensors laid out as the run's, then copied: all or nothing
            targets = sharded_checkpoint.state_dict(
                {n: torch.empty_like(p.detach()) for n, p in self.named_params.items()},
                {k: self._empty_moment(k) for k in moments},
            )
            sharded_checkpoint.load(path, name, targets, self.process_group if sharded else None)
            state = checkpoint.LoadedState(
                weights={n: targets[sharded_checkpoint.WEIGHTS + n] for n in self.named_params},
                optimizer={k: targets[sharded_checkpoint.OPTIMIZER + k] for k in moments},
                step=manifest["step"],
                manifest=manifest,
            )
        self.current_export = None
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(like(p, state.weights[n]))
                p.grad = None
        if with_optimizer:
            self.optimizer.load_state_tensors(state.optimizer, state.step)
        else:
            self.optimizer.reset()
        return state.step

    def _saved_state(self, name: str, with_optimizer: bool, owner: str | None):
        """(path, manifest, the saved moments' keys, the whole v1 state or None for v2) of
        state `name`, checked to fit this run; StateNotFound/PermissionDenied otherwise."""
        path, manifest = checkpoint.open_directory(self.config.checkpoint_dir, name, checkpoint.STATE_FORMATS, owner)
        saved_lora = manifest.get("lora")
        if (saved_lora is None) != (self.lora_spec is None):
            raise StateNotFound(
                f"state '{name}' is {'a LoRA' if saved_lora else 'a full fine-tuning'} state and this "
                f"run is {'a LoRA' if self.lora_spec else 'a full fine-tuning'} run; create a run from "
                "the state instead"
            )
        state = None
        if manifest["format"] == checkpoint.SHARDED_FORMAT:
            saved = sharded_checkpoint.saved_tensors(path, name)
            weights = {
                k.removeprefix(sharded_checkpoint.WEIGHTS): v
                for k, v in saved.items()
                if k.startswith(sharded_checkpoint.WEIGHTS)
            }
            moments = (
                {
                    k.removeprefix(sharded_checkpoint.OPTIMIZER): v
                    for k, v in saved.items()
                    if k.startswith(sharded_checkpoint.OPTIMIZER)
                }
                if with_optimizer
                else {}
            )
            odd = sorted(
                k for k in saved if not k.startswith((sharded_checkpoint.WEIGHTS, sharded_checkpoint.OPTIMIZER))
            )
            if odd:
                raise StateNotFound(f"state '{name}' cannot be read: unexpected entries {odd[:3]}")
        else:
            state = checkpoint.read_state(path, manifest, name, with_optimizer)
            weights = {k: (tuple(t.shape), t.dtype) for k, t in state.weights.items()}
            moments = {k: (tuple(t.shape), t.dtype) for k, t in state.optimizer.items()}
        self._check_fits(name, weights, moments)
        return path, manifest, list(moments), state

    def _check_fits(self, name: str, weights: dict, moments: dict) -> None:
        """StateNotFound unless the saved (shape, dtype) of `weights` and `moments` fit this run."""
        expected = {n: tuple(p.shape) for n, p in self.named_params.items()}
        found = {n: shape for n, (shape, _) in weights.items()}
        shapes = {f"{n}/{k}": (() if k == "step" else shape) for n, shape in expected.items() for k in MOMENTS}
        odd_moments = sorted(k for k, (shape, _) in moments.items() if shapes.get(k) != shape)[:3]
        if odd_moments or not all(
            dtype is not None and dtype.is_floating_point for _, dtype in [*weights.values(), *moments.values()]
        ):
            raise StateNotFound(
                f"state '{name}' cannot be read: its optimizer state does not fit this model "
                f"(unexpected or reshaped {odd_moments}) or it holds non-float tensors"
            )
        if found != expected:
            missing = sorted(set(expected) - set(found))[:3]
            unexpected = sorted(set(found) - set(expected))[:3]
            reshaped = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])[:3]
            raise StateNotFound(
                f"state '{name}' does not fit this model (missing {missing}, unexpected {unexpected}, "
                f"different shapes {reshaped})"
            )

    def _empty_moment(self, key: str) -> torch.Tensor:
        """A fresh tensor for saved moment `key` ("<param>/<moment>"), laid out as its parameter."""
        param, _, moment = key.rpartition("/")
        if moment == "step":
            return torch.zeros((), dtype=torch.float32)
        return torch.empty_like(self.named_params[param].detach())

    # -- sampling -------------------------------------------------------------------------------

    def validate_sample(self, request: SampleRequest) -> SampleRequest:
        """The request with its defaults resolved; raises InvalidInput/LimitExceeded."""
        return validate_sample(self.policy, self.config, request)

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult | Exception]:
        """Generate every validated request, those on the same weights as one batch; a request
        whose weights cannot be had gets its exception in its place."""
        results: list[SampleResult | Exception | None] = [None] * len(requests)
        by_weights: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_weights.setdefault(request.model_path, []).append(i)
        for model_path, indices in by_weights.items():
            weights, allowed = SamplerWeights(self.policy, self.adapter), []
            for i in indices:  # each caller's access to saved weights, on its own
                try:
                    if model_path:
                        weights = self._sampler_weights(model_path, requests[i].owner)
                    allowed.append(i)
                except Exception as exc:
                    results[i] = exc
            if not allowed:
                continue
            try:
                if weights.adapter is not None:
                    lora.activate(weights.policy, weights.adapter)
                with self._gathered():
                    outputs = generate(weights.policy, [requests[i] for i in allowed])
            except torch.OutOfMemoryError as exc:
                outputs = [ComputeFailed(f"sampling ran out of memory: {exc}", out_of_memory=True)] * len(allowed)
            except Exception as exc:
                outputs = [ComputeFailed(f"sampling failed: {type(exc).__name__}: {exc}")] * len(allowed)
            for i, output in zip(allowed, outputs):
                results[i] = output
        return results

    @contextmanager
    def _gathered(self):
        """Sharded: the root's weights (embeddings, norm, head) gathered for sampling, which
        every rank runs on the same requests (the layers gather their own in each pass)."""
        if self.policy.sharded is None:
            yield
            return
        self.policy.sharded.unshard()
        try:
            yield
        finally:
            self.policy.sharded.reshard()

    def _sampler_weights(self, model_path: str, owner: str | None) -> SamplerWeights:
        name = sampler_weights.export_name(self.config.export, model_path)
        if self.policy.sharded is not None:  # only the export of the current weights, which are the same
            if name != self.current_export:
                raise StateNotFound(SHARDED_EXPORT_SAMPLING)
            checkpoint.open_directory(self.config.export.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)
            return SamplerWeights(self.policy, self.adapter)
        return self.exports.get(
            name, owner, lambda: sampler_weights.load_export(self.policy, self.config.export, name, owner)
        )

    def save_weights_for_sampler(self, name: str, owner: str | None = None, merged: bool = False) -> Path:
        """Write the weights as a directory samplers load as it is (see worker.sampler_weights),
        owned by `owner`, and keep them loaded for Sample requests that name it. A LoRA run
        writes its PEFT adapter, or with `merged` full weights with the adapter merged in."""
        export, step = self.config.export, self.optimizer.step_count
        checkpoint.state_dir(export.sampler_dir, name)
        with _save_failures(f"sampler weights '{name}'", "export"):
            if self.policy.sharded is not None:  # streamed; sampled from files by external samplers
                if self.adapter is not None and not merged:  # whole on every rank: rank 0 writes it
                    path = (
                        sampler_weights.export_adapter(self.policy, export, self.adapter, name, step, owner)
                        if self.rank == 0
                        else None
                    )
                else:
                    path = sampler_weights.export_full_sharded(
                        self.policy, export, name, step, owner, self.process_group, merge_adapter=self.adapter
                    )
                # Sampling it is sampling the current weights where its tensors are exactly those
                # the run computes with: in the compute dtype, an adapter in fp32 (its master
                # weights), never merged ones (W + BA rounded as one).
                dtype = SERVING_DTYPES[export.dtype]
                exact = dtype == sampler_weights.load_dtype(self.policy) and (
                    self.adapter is None or (not merged and dtype == torch.float32)
                )
                self.current_export = name if exact else None
                return path
            if self.adapter is None:
                path = sampler_weights.export_full(self.policy, export, name, step, owner)
            elif merged:
                path = sampler_weights.export_full(self.policy, export, name, step, owner, merge_adapter=self.adapter)
            else:
                path = sampler_weights.export_adapter(self.policy, export, self.adapter, name, step, owner)
        if self.adapter is None:
            self.exports.put(name, sampler_weights.snapshot(self.policy, export, name), owner)
        elif not merged:
            self.exports.put(name, sampler_weights.adapter_snapshot(self.policy, export, self.adapter, name), owner)
        else:  # a merged export is loaded from its files when a sample names it
            self.exports.forget(name)
        return path


@contextmanager
def _save_failures(what: str, kind: str):
    """A save that fails on the filesystem (e.g. the volume is full) as ComputeFailed; the
    earlier copy of that name is unchanged. PermissionDenied, an OSError too, passes as it is."""
    try:
        yield
    except PermissionDenied:
        raise
    except OSError as exc:
        raise ComputeFailed(
            f"saving {what} failed ({exc.strerror or exc}); any earlier {kind} of that name is unchanged",
            out_of_memory=exc.errno == errno.ENOSPC,
        ) from exc
