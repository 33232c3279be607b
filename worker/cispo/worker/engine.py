"""The training state of one run and its operations: forward and forward_backward (run_batch),
optim_step, save_state, load_state, sample and save_weights_for_sampler.

One Engine is one run on one device (one data-parallel rank). It composes the rooms that do
the work: worker.training_step (the passes and the accumulated gradient), worker.optimizer,
worker.states (saved states), worker.exports (sampler weights); sampling is here. Every public
method validates its whole input before computing anything and leaves the state unchanged when
it fails. Not thread-safe: the service runs operations one at a time, in order.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist

from cispo.worker import lora, sampler_weights
from cispo.worker.batch import Samples
from cispo.worker.config import EngineConfig
from cispo.worker.errors import ComputeFailed, StepRefused
from cispo.worker.exports import SamplerExports
from cispo.worker.loss_stats import BatchStats
from cispo.worker.losses import LossFunction, get_loss_function
from cispo.worker.model import PolicyModel
from cispo.worker.optimizer import AdamParams, Optimizer
from cispo.worker.protocols import TrainingEngine
from cispo.worker.results import NO_MEMORY, BatchResult, EngineInfo, OptimResult
from cispo.worker.sampler_weights import ExportCache, SamplerWeights
from cispo.worker.sampling import SampleRequest, SampleResult, generate, validate_sample_request
from cispo.worker.sharding import MemoryUse, first_failure, is_sharded, local_bytes
from cispo.worker.states import RunStates
from cispo.worker.training_step import FailureAgreement, TrainingStep
from cispo.worker.validation import validate_batch

DEFAULT_CONFIG = EngineConfig()


@dataclass(frozen=True)
class GroupMember:
    """What makes an engine one rank of a data-parallel group (worker.group.member builds it)."""

    rank: int
    control: dist.ProcessGroup  # gloo: agreements, sharded states and exports
    reduce_gradients: Callable[[list[torch.nn.Parameter]], None]
    """Sums the given (replicated) parameters' gradients across the ranks, in place."""
    agree_on_failure: FailureAgreement


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


def base_info(policy: PolicyModel) -> EngineInfo:
    """The served base model, described as a run with no training of its own."""
    return describe(policy, sum(p.numel() for p in policy.model.parameters()))


def describe(policy: PolicyModel, num_parameters: int, step: int = 0, memory: MemoryUse = NO_MEMORY) -> EngineInfo:
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


class Engine:
    def __init__(
        self,
        policy: PolicyModel,
        config: EngineConfig = DEFAULT_CONFIG,
        adapter: str | None = None,
        lora_spec: lora.LoraSpec | None = None,
        exports: ExportCache | None = None,
        member: GroupMember | None = None,
    ):
        """A full fine-tune of `policy` (adapter None), or the LoRA run training `policy`'s
        adapter `adapter` (made with `lora_spec`), which the engine activates for each operation.
        `member`: the engine is one rank of a data-parallel group."""
        self.policy = policy
        self.config = config
        self.adapter = adapter
        self.lora_spec = lora_spec
        self.rank = member.rank if member is not None else 0
        self.process_group = member.control if member is not None else None
        self.agree_on_failure = member.agree_on_failure if member is not None else None
        self.named_params = (
            lora.adapter_parameters(policy, adapter)
            if adapter is not None
            else {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
        )
        params = list(self.named_params.values())
        # FSDP2 shards a full fine-tune's parameters (and sums their gradients in its backward);
        # a LoRA run's adapter is whole on every rank, and so are the others: the group sums them.
        replicated = [p for p in params if not is_sharded(p)]
        self.gradient_reducer = partial(member.reduce_gradients, replicated) if member and replicated else None
        self.state_sharded = len(replicated) < len(params)
        self.optimizer = Optimizer(self.named_params, sharded=self.state_sharded)
        self.exports = exports if exports is not None else ExportCache(config.export.cache_size)
        self.step = TrainingStep(policy, config, params)
        self.states = RunStates(
            config.checkpoint_dir,
            policy.name,
            self.named_params,
            self.optimizer,
            lora_spec,
            self.state_sharded,
            self.process_group,
        )
        self.sampler_exports = SamplerExports(
            policy, config.export, adapter, self.exports, self.rank, self.process_group
        )

    @property
    def current_export(self) -> str | None:
        """Sharded: the saved sampler weights that are exactly this run's current weights."""
        return self.sampler_exports.current

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

    def validate(
        self, samples: Samples, loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> tuple[LossFunction, dict[str, float]]:
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
        with `backward`, the loss gradient is added to the accumulated gradient (see
        TrainingStep.forward_backward: a failure leaves it as it was, or says it was dropped)."""
        if not backward and not samples and not micro_batches:
            return BatchResult([], BatchStats())
        self.activate()
        if not backward:
            return self.step.forward(samples, loss, config, micro_batches)
        return self.step.forward_backward(samples, loss, config, micro_batches, self.agree_on_failure, self.degenerate)

    def degenerate(self) -> str | None:
        """Why the policy's weights are unusable (TrainingStep.probe), or None. Every rank of a
        group calls it (sharded, the probe is a collective), and all take the lowest failing
        rank's reason."""
        self.activate()
        reason = self.step.probe()
        if self.process_group is not None:
            failure = first_failure(None if reason is None else StepRefused(reason), self.process_group)
            reason = None if failure is None else str(failure)
        return reason

    # -- optimizer ------------------------------------------------------------------------------

    def optim_step(self, adam: AdamParams) -> OptimResult:
        """Sum gradients across ranks, clip, AdamW step, zero the gradient.

        A step whose weights would make the policy degenerate (`degenerate`) is refused.
        A refused step (StepRefused) changes no weight or moment. After a cross-rank sum, only
        rank 0 keeps the summed gradient, so the next step's sum counts it once."""
        if self.gradient_reducer is not None:
            self.gradient_reducer()
        self.sampler_exports.current = None
        try:
            grad_norm = self.optimizer.step(adam, self.degenerate)
        except StepRefused:
            if self.gradient_reducer is not None and self.rank != 0:
                self.optimizer.zero_grad()
            raise
        return OptimResult(grad_norm=grad_norm, step=self.optimizer.step_count, learning_rate=adam.learning_rate)

    # -- states ---------------------------------------------------------------------------------

    def save_state(self, name: str, owner: str | None = None) -> Path | None:
        """Write weights, optimizer state and step count under `name` (worker.states); rank 0
        returns the path, the other ranks of a sharded group None."""
        return self.states.save(name, owner)

    def load_state(self, name: str, with_optimizer: bool = False, owner: str | None = None) -> int:
        """Restore weights (and, if asked, optimizer state and step count; else a fresh
        optimizer at step 0), dropping the accumulated gradient (worker.states). Returns the
        state's step count."""

        def changing() -> None:
            self.sampler_exports.current = None

        return self.states.load(name, with_optimizer, owner, changing)

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
                        weights = self.sampler_exports.weights(model_path, requests[i].owner)
                    allowed.append(i)
                except Exception as exc:
                    results[i] = exc
            if not allowed:
                continue
            outputs: Sequence[SampleResult | Exception]
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
        return cast(list[SampleResult | Exception], results)  # every request got its result or error

    @contextmanager
    def _gathered(self) -> Iterator[None]:
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

    def save_weights_for_sampler(self, name: str, owner: str | None = None, merged: bool = False) -> Path | None:
        """Write the weights as a directory samplers load as it is, and keep them loaded for
        Sample requests that name it (worker.exports); rank 0 returns the path."""
        return self.sampler_exports.save(name, self.optimizer.step_count, owner, merged)


# The type checker holds Engine to the service's seam.
_ENGINE: type[TrainingEngine] = Engine
