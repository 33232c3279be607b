"""Rank 0's view of a data-parallel group: the training runs every rank holds alike, and each
run's engine across the group.

Every rank holds the same training runs (worker.runs.TrainingRuns): rank 0 creates and unloads
them on every rank at once (GroupRuns), so a group serves full fine-tunes and LoRA runs as a
single process does, the LoRA runs over a frozen base that `--sharding fsdp` shards. Each
operation is scattered to the ranks as a typed message (worker.group_ops) and their outcomes
gathered back; a rank lost meanwhile (worker.group's heartbeats) fails the group over to
RankUnavailable.
"""

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar, cast

import torch.distributed as dist

from cispo.worker import checkpoint, lora
from cispo.worker.batch import SampleBatch, Samples, plan_micro_batches
from cispo.worker.config import RunsConfig
from cispo.worker.engine import Engine
from cispo.worker.errors import RankUnavailable, StateNotFound
from cispo.worker.exports import SHARDED_EXPORT_SAMPLING
from cispo.worker.group import HEARTBEAT_SECONDS, GroupContext, Heartbeat, RankMonitor, shard_by_tokens
from cispo.worker.group_ops import (
    Create,
    Discard,
    GroupOp,
    LoadState,
    OptimStep,
    Outcome,
    RunBatch,
    Sample,
    SaveState,
    SaveWeightsForSampler,
    Shutdown,
    Unload,
    execute,
)
from cispo.worker.loss_stats import BatchStats
from cispo.worker.losses import LossFunction
from cispo.worker.optimizer import AdamParams
from cispo.worker.protocols import RunRegistry, TrainingEngine
from cispo.worker.results import BatchResult, EngineInfo, OptimResult
from cispo.worker.run_versions import RunInfo
from cispo.worker.runs import RunRecord, SharedRuns, TrainingRuns, new_run_id
from cispo.worker.sampler_weights import ExportCache, export_name
from cispo.worker.sampling import SampleRequest, SampleResult
from cispo.worker.sharding import MemoryUse

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupRuns(SharedRuns):
    """Rank 0's view of the group: the training runs every rank holds alike (worker.runs), each
    served through a GroupEngine; the service drives it as it does a TrainingRuns."""

    def __init__(
        self,
        runs: TrainingRuns,
        ctx: GroupContext,
        rank_timeout: float = RunsConfig.rank_timeout_seconds,
        on_rank_lost: Callable[[RankUnavailable], None] | None = None,
    ):
        """`runs`: rank 0's own registry, made with `member` (as every rank's is)."""
        assert ctx.rank == 0
        self.local = runs
        self.ctx = ctx
        self.policy, self.config, self.max_runs = runs.policy, runs.config, runs.max_runs
        self.broken: RankUnavailable | None = None
        self.monitor = RankMonitor(ctx, rank_timeout, self._rank_lost)
        self.on_rank_lost = on_rank_lost
        self._engines: dict[str | None, GroupEngine] = {}
        self._exported_by: dict[Path, str | None] = {}  # sharded: export directory -> the run that wrote it last
        Heartbeat(ctx).start()
        self.monitor.start()

    @property
    def exports(self) -> ExportCache:
        return self.local.exports

    @property
    def sharded(self) -> bool:
        return self.policy.sharded is not None

    # -- runs -----------------------------------------------------------------------------------

    def get(self, model_id: str, owner: str | None) -> "GroupEngine":
        """The group's engine of run `model_id` ("" = `owner`'s default run, made everywhere if
        need be)."""
        model_id = model_id or self._default_run(owner)
        self.local.get(model_id, owner)  # ownership, last use
        return self._engine(model_id)

    def export_sampler(self) -> "GroupEngine":
        return self._engine(None)

    def export_engine(self, model_path: str, owner: str | None) -> "GroupEngine":
        """Replicated, rank 0 samples saved weights alone. Sharded, only those that are a run's
        current weights can be sampled, by that run (every rank computes)."""
        if not self.sharded:
            return self.export_sampler()
        name = export_name(self.config.export, model_path)
        path = checkpoint.open_directory(self.config.export.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)[0]
        model_id = self._exported_by.get(path)
        engine = self.local.engines().get(model_id) if model_id is not None else None
        if engine is None or engine.current_export != name:
            raise StateNotFound(SHARDED_EXPORT_SAMPLING)
        return self._engine(model_id)

    def info(self, model_id: str, owner: str | None) -> RunInfo:
        return self.local.info(model_id, owner)

    def _record(self, model_id: str) -> RunRecord:
        return self.local._record(model_id)

    def list_runs(self, owner: str | None) -> list[RunInfo]:
        return self.local.list_runs(owner)

    def memory_use(self) -> dict[str, MemoryUse]:
        return self.local.memory_use()

    def __len__(self) -> int:
        return len(self.local)

    def create(self, owner: str | None, spec: lora.LoraSpec | None, model_id: str | None = None) -> str:
        """Make the run on every rank; one that only some ranks made (e.g. out of memory on
        one) is dropped again everywhere."""
        model_id = model_id or new_run_id()
        outcomes = self._outcomes([Create(owner, spec, model_id)] * self.ctx.world_size)
        failures = [o.error for o in outcomes if o.error is not None]
        if failures and len(failures) < len(outcomes):
            self.everywhere(Discard(model_id))
        self._engines.pop(None, None)  # the base may have been reloaded: the export sampler is new
        if failures:
            raise failures[0]
        return model_id

    def unload(self, model_id: str, owner: str | None) -> None:
        self.local.info(model_id, owner)  # RunNotFound before anything is sent
        self._engines.pop(model_id, None)
        self.everywhere(Unload(model_id, owner))

    def _engine(self, model_id: str | None) -> "GroupEngine":
        local = self.local.engine(model_id)
        engine = self._engines.get(model_id)
        if engine is None or engine.local is not local:
            engine = self._engines[model_id] = GroupEngine(self, model_id, local)
        return engine

    # -- the group ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the other ranks (they exit their loop)."""
        if self.broken is None:
            dist.scatter_object_list([None], [Shutdown()] * self.ctx.world_size, src=0, group=self.ctx.control)
        self.monitor.stop()

    def everywhere(self, op: GroupOp[T]) -> list[T]:
        return self.call([op] * self.ctx.world_size)

    def call(self, messages: list[GroupOp[T]]) -> list[T]:
        """Scatter one message per rank, run rank 0's, gather every outcome; raise the first error."""
        return [outcome.unwrap() for outcome in self._outcomes(messages)]

    def _outcomes(self, messages: list[GroupOp[T]]) -> list[Outcome[T]]:
        """Every rank's outcome of its message."""
        if self.broken is not None:
            raise self.broken
        try:
            mine: list[GroupOp[T] | None] = [None]
            dist.scatter_object_list(mine, list(messages), src=0, group=self.ctx.control)
            assert mine[0] is not None  # scatter_object_list filled it
            outcome = execute(mine[0], self.local, self.ctx)
            outcomes: list[Outcome[T] | None] = [None] * self.ctx.world_size
            dist.gather_object(outcome, outcomes, dst=0, group=self.ctx.control)
        except RuntimeError as exc:  # a collective failed: some rank is gone
            raise self._diagnose(exc) from exc
        return cast(list[Outcome[T]], outcomes)  # gather_object filled in every rank's

    def _diagnose(self, exc: Exception) -> RankUnavailable:
        """Name the lost rank: wait (bounded) for its heartbeat to go stale."""
        deadline = time.monotonic() + self.monitor.timeout + 2 * HEARTBEAT_SECONDS
        while self.broken is None and time.monotonic() < deadline:
            time.sleep(HEARTBEAT_SECONDS / 4)
            self.monitor.check()
        if self.broken is None:
            self._rank_lost(RankUnavailable(None, f"data-parallel group failed: {exc}"))
        assert self.broken is not None  # _rank_lost set it
        return self.broken

    def _rank_lost(self, error: RankUnavailable) -> None:
        if self.broken is None:
            self.broken = error
            log.error("%s", error)
            if self.on_rank_lost is not None:
                self.on_rank_lost(error)


class GroupEngine:
    """One run across the group, with the Engine's interface: every operation runs on each
    rank's engine of the run (`model_id`; None: the export sampler)."""

    def __init__(self, group: GroupRuns, model_id: str | None, local: Engine):
        self.group, self.model_id, self.local = group, model_id, local
        self.policy, self.config = local.policy, local.config

    @property
    def exports(self) -> ExportCache:
        return self.local.exports

    def info(self) -> EngineInfo:
        return self.local.info()

    def run_batch(
        self, samples: Samples, loss: LossFunction, config: Mapping[str, float], *, backward: bool
    ) -> BatchResult:
        """Engine.run_batch on validated samples, each rank on its shard."""
        batch = SampleBatch.of(samples)
        lengths = batch.length_list
        shards = shard_by_tokens(lengths, self.group.ctx.world_size)
        # Sharded ranks all run as many trunk passes as the busiest one (each pass gathers weights).
        passes = (
            max(
                len(plan_micro_batches([lengths[i] for i in shard], self.config.micro_batch_tokens)) for shard in shards
            )
            if self.group.sharded
            else 0
        )
        results = self.group.call(
            [RunBatch(self.model_id, batch.take(shard), loss.name, config, backward, passes) for shard in shards]
        )
        logprobs: list = [None] * len(samples)
        stats = BatchStats()
        for shard, result in zip(shards, results):
            stats = stats.merge(result.stats)
            for i, lp in zip(shard, result.logprobs):
                logprobs[i] = lp
        return BatchResult(logprobs=logprobs, stats=stats)

    def optim_step(self, adam: AdamParams) -> OptimResult:
        return self.group.everywhere(OptimStep(self.model_id, adam))[0]

    def save_state(self, name: str, owner: str | None = None) -> Path | None:
        return self.group.everywhere(SaveState(self.model_id, name, owner))[0]

    def load_state(self, name: str, with_optimizer: bool = False, owner: str | None = None) -> int:
        return self.group.everywhere(LoadState(self.model_id, name, with_optimizer, owner))[0]

    # Replicated, rank 0 samples and exports alone: every rank holds the same weights. Sharded,
    # every rank takes part (each pass gathers the weights).

    def validate_sample(self, request: SampleRequest) -> SampleRequest:
        return self.local.validate_sample(request)

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult | Exception]:
        if self.group.sharded:
            return self.group.everywhere(Sample(self.model_id, requests))[0]
        self._check_group()
        return self.local.sample(requests)

    def save_weights_for_sampler(self, name: str, owner: str | None = None, merged: bool = False) -> Path | None:
        if not self.group.sharded:
            self._check_group()
            return self.local.save_weights_for_sampler(name, owner, merged)
        saved = self.group.everywhere(SaveWeightsForSampler(self.model_id, name, owner, merged))[0]
        if saved is not None:
            self.group._exported_by[saved] = self.model_id
        return saved

    def _check_group(self) -> None:
        """RankUnavailable once the group is broken, even for what rank 0 does alone."""
        if self.group.broken is not None:
            raise self.group.broken


# The type checker holds GroupRuns and GroupEngine to the service's seams.
_REGISTRY: type[RunRegistry] = GroupRuns
_ENGINE: type[TrainingEngine] = GroupEngine
