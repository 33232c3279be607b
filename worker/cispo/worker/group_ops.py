"""What every rank of a data-parallel group executes: the operations rank 0 scatters, one
typed class each, and the loop of ranks 1..W-1.

An operation is a picklable dataclass whose `run(runs, ctx)` does it on this rank's registry
(worker.runs.TrainingRuns) and returns this rank's outcome; rank 0 runs its own message the
same way (worker.group_runs). A message names its run (`model_id`; None: the export sampler).
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

import torch
import torch.distributed as dist

from cispo.worker.batch import SampleBatch
from cispo.worker.engine import Engine
from cispo.worker.group import GroupContext, Heartbeat
from cispo.worker.lora import LoraSpec
from cispo.worker.losses import get_loss_function
from cispo.worker.optimizer import AdamParams
from cispo.worker.results import BatchResult, OptimResult
from cispo.worker.runs import TrainingRuns
from cispo.worker.sampling import SampleRequest, SampleResult

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class GroupOp(Protocol[T_co]):
    """One operation as every rank runs it."""

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> T_co: ...


@dataclass(frozen=True)
class Create:
    owner: str | None
    spec: LoraSpec | None
    model_id: str  # rank 0 chose the id

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> str:
        return runs.create(self.owner, self.spec, self.model_id)


@dataclass(frozen=True)
class Discard:
    model_id: str

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> None:
        runs.discard(self.model_id)


@dataclass(frozen=True)
class Unload:
    model_id: str
    owner: str | None

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> None:
        runs.unload(self.model_id, self.owner)


@dataclass(frozen=True)
class RunBatch:
    """This rank's shard of a validated batch (Engine.run_batch), in `micro_batches` passes."""

    model_id: str | None
    samples: SampleBatch
    loss_fn: str
    config: Mapping[str, float]
    backward: bool
    micro_batches: int

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> BatchResult:
        return runs.engine(self.model_id).run_batch(
            self.samples,
            get_loss_function(self.loss_fn),
            self.config,
            backward=self.backward,
            micro_batches=self.micro_batches,
        )


@dataclass(frozen=True)
class OptimStep:
    model_id: str | None
    adam: AdamParams

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> OptimResult:
        return runs.engine(self.model_id).optim_step(self.adam)


@dataclass(frozen=True)
class SaveState:
    """Rank 0 writes a replicated state alone; every rank writes its shards of a sharded one."""

    model_id: str | None
    name: str
    owner: str | None

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> Path | None:
        engine = runs.engine(self.model_id)
        return engine.save_state(self.name, self.owner) if ctx.rank == 0 or engine.state_sharded else None


@dataclass(frozen=True)
class LoadState:
    """Every rank reads its shards of a sharded state from the shared checkpoint directory; a
    replicated one is read by rank 0 and sent to the others (`load_from_rank0`)."""

    model_id: str | None
    name: str
    with_optimizer: bool
    owner: str | None

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> int:
        engine = runs.engine(self.model_id)
        if engine.state_sharded:
            return engine.load_state(self.name, self.with_optimizer, self.owner)
        load_from_rank0(engine, ctx, self.name, self.with_optimizer, self.owner)
        return engine.optimizer.step_count


@dataclass(frozen=True)
class Sample:
    """Sharded only: every rank runs the same seeded generation."""

    model_id: str | None
    requests: list[SampleRequest]

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> list[SampleResult | Exception]:
        return runs.engine(self.model_id).sample(self.requests)


@dataclass(frozen=True)
class SaveWeightsForSampler:
    """Sharded only: every rank takes part in the export."""

    model_id: str | None
    name: str
    owner: str | None
    merged: bool

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> Path | None:
        return runs.engine(self.model_id).save_weights_for_sampler(self.name, self.owner, self.merged)


@dataclass(frozen=True)
class Shutdown:
    """Ranks 1..W-1 leave their loop."""

    def run(self, runs: TrainingRuns, ctx: GroupContext) -> None:
        log.info("rank %d: shutdown", ctx.rank)


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One rank's outcome of an operation: its value, or the exception it raised."""

    value: T | None = None
    error: Exception | None = None

    def unwrap(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.value)  # None is a value too (e.g. Discard's)


def execute(op: GroupOp[T], runs: TrainingRuns, ctx: GroupContext) -> Outcome[T]:
    """Run `op` on this rank; its outcome, sent to rank 0, which raises an error to the caller."""
    try:
        return Outcome(op.run(runs, ctx))
    except Exception as exc:
        return Outcome(error=exc)


def run_worker(runs: TrainingRuns, ctx: GroupContext) -> None:
    """The loop of ranks 1..W-1: receive an operation, run it, send the outcome; until shutdown.
    `runs` makes its engines ranks of the group (TrainingRuns' `member`)."""
    Heartbeat(ctx).start()
    while True:
        message: list[GroupOp[object] | None] = [None]
        dist.scatter_object_list(message, None, src=0, group=ctx.control)
        op = message[0]
        assert op is not None  # scatter_object_list filled it
        if isinstance(op, Shutdown):
            op.run(runs, ctx)
            return
        dist.gather_object(execute(op, runs, ctx), None, dst=0, group=ctx.control)


# What rank 0 sends ahead of a state's tensors: its failure (or None), the step count, and the
# optimizer tensors' (key, shape, dtype).
LoadHeader = tuple[Exception | None, int, list[tuple[str, tuple[int, ...], torch.dtype]]]


def load_from_rank0(engine: Engine, ctx: GroupContext, name: str, with_optimizer: bool, owner: str | None) -> None:
    """Rank 0 reads and checks the state; every rank then receives it over the control group,
    so ranks need no shared storage and a group of any size can load it."""
    failure: Exception | None = None
    if ctx.rank == 0:
        try:
            engine.load_state(name, with_optimizer, owner)
        except Exception as exc:  # every rank must leave this collective together
            failure = exc
    optimizer: dict[str, torch.Tensor] = {}
    header: list[LoadHeader | None] = [None]
    if ctx.rank == 0:
        optimizer = engine.optimizer.state_tensors() if failure is None else {}
        header = [(failure, engine.optimizer.step_count, [(k, tuple(v.shape), v.dtype) for k, v in optimizer.items()])]
    dist.broadcast_object_list(header, src=0, group=ctx.control)
    assert header[0] is not None  # rank 0's, broadcast
    failed, step_count, optimizer_meta = header[0]
    if failed is not None:
        raise failed
    with torch.no_grad():
        for p in engine.named_params.values():
            buf = p.detach().cpu() if ctx.rank == 0 else torch.empty(p.shape, dtype=p.dtype)
            dist.broadcast(buf, src=0, group=ctx.control)
            if ctx.rank != 0:
                p.copy_(buf)
                p.grad = None
    tensors: dict[str, torch.Tensor] = {}
    for key, shape, dtype in optimizer_meta:
        buf = optimizer[key] if ctx.rank == 0 else torch.empty(shape, dtype=dtype)
        dist.broadcast(buf, src=0, group=ctx.control)
        tensors[key] = buf
    if ctx.rank != 0:
        if optimizer_meta:
            engine.optimizer.load_state_tensors(tensors, step_count)
        else:
            engine.optimizer.reset()
