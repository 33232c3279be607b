"""Data-parallel worker groups on torch.distributed (torchrun, or the same env vars on a cluster).

Rank 0 serves gRPC and drives the group: every operation is scattered to all ranks over a gloo
control group (each rank gets its shard of the batch, balanced by token count), each rank runs
it on its own engine of the run it names, and the outcomes are gathered back in the original
datum order. Gradients are summed across ranks (all_reduce on the default group: gloo on CPU,
nccl on GPU, or FSDP2's reduce-scatter for sharded parameters) before each optimizer step; the
loss is a sum, so this is exact and the weights stay identical everywhere.

Every rank holds the same training runs (worker.runs.TrainingRuns): rank 0 creates and unloads
them on every rank at once (GroupRuns), so a group serves full fine-tunes and LoRA runs as a
single process does, the LoRA runs over a frozen base that `--sharding fsdp` shards.

Every rank writes a heartbeat into the rendezvous store; rank 0 watches them, so a rank that
dies or hangs is named and the service fails over to UNAVAILABLE instead of hanging with it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cispo.worker import checkpoint, lora
from cispo.worker.batch import SampleBatch, Samples, plan_micro_batches
from cispo.worker.engine import SHARDED_EXPORT_SAMPLING, BatchResult, Engine, EngineInfo, OptimResult
from cispo.worker.errors import ComputeFailed, RankUnavailable, StateNotFound
from cispo.worker.loss_stats import BatchStats
from cispo.worker.losses import LossFunction, get_loss_function
from cispo.worker.optimizer import AdamParams
from cispo.worker.runs import RunInfo, TrainingRuns, _Run, _Runs, new_run_id
from cispo.worker.sampler_weights import export_name
from cispo.worker.sharding import MemoryUse, is_sharded

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
# Idle ranks wait for the next operation in a collective; it must not time out between calls.
CONTROL_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class GroupContext:
    rank: int
    world_size: int
    control: dist.ProcessGroup  # gloo: operations, outcomes, states
    store: dist.Store


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_group(device: torch.device, gradient_timeout: timedelta = timedelta(minutes=10)) -> GroupContext:
    """Join the group described by torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=gradient_timeout)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    store = dist.distributed_c10d._get_default_store()
    return GroupContext(dist.get_rank(), dist.get_world_size(), control, store)


def attach(engine: Engine, ctx: GroupContext) -> None:
    """Make `engine` one rank of the group: summed gradients (FSDP2 sums sharded parameters'
    in its backward; the others, a LoRA adapter's under fsdp too, are all-reduced), group-wide
    failure agreement."""
    replicated = [p for p in engine.named_params.values() if not is_sharded(p)]

    def reduce_gradients() -> None:
        for p in replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_in_buckets([p.grad for p in replicated])

    def agree_on_failure(failure: ComputeFailed | None) -> ComputeFailed | None:
        outcomes: list[ComputeFailed | None] = [None] * ctx.world_size
        dist.all_gather_object(outcomes, failure, group=ctx.control)
        rank, first = next(((r, f) for r, f in enumerate(outcomes) if f is not None), (None, None))
        if first is None or first.non_finite:
            return first
        return ComputeFailed(f"rank {rank}: {first}", first.out_of_memory)

    engine.gradient_reducer = reduce_gradients if replicated else None
    engine.agree_on_failure = agree_on_failure
    engine.rank = ctx.rank
    engine.process_group = ctx.control


# Gradients smaller than this are summed together through one flat buffer of at most this size.
BUCKET_BYTES = 32 << 20


def all_reduce_in_buckets(tensors: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum `tensors` across the default group, in place. A contiguous tensor of at least
    `bucket_bytes` is reduced where it lies; smaller ones go in consecutive buckets of the same
    dtype through one flat buffer each, so the extra memory is one bucket, never a copy of all."""
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0])
        elif bucket:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket.clear()

    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > bucket_bytes or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            flush()
            size = 0
        bucket.append(t)
        size += nbytes
    flush()


def shard_by_tokens(lengths: list[int], world_size: int) -> list[list[int]]:
    """Datum indices per rank, balancing token counts (longest first, to the lightest rank)."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shards[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shards]


# -- what every rank executes -----------------------------------------------------------------


def _execute(runs: TrainingRuns, ctx: GroupContext, op: str, args: tuple):
    """Run one operation on this rank; returns this rank's outcome."""
    if op == "create":  # (owner, spec, model_id): rank 0 chose the id
        return runs.create(*args)
    if op == "discard":
        return runs.discard(*args)
    if op == "unload":
        return runs.unload(*args)
    model_id, *args = args
    engine = runs.engine(model_id)
    if op == "run_batch":
        samples, loss_fn, config, backward, micro_batches = args
        return engine.run_batch(
            samples, get_loss_function(loss_fn), config, backward=backward, micro_batches=micro_batches
        )
    if op == "optim_step":
        return engine.optim_step(*args)
    if op == "save_state":
        return engine.save_state(*args) if ctx.rank == 0 or engine.state_sharded else None
    if op == "load_state":
        if engine.state_sharded:  # every rank reads its shards from the shared checkpoint directory
            return engine.load_state(*args)
        _load_from_rank0(engine, ctx, *args)
        return engine.optimizer.step_count
    if op == "sample":  # sharded only: every rank runs the same seeded generation
        return engine.sample(*args)
    if op == "save_weights_for_sampler":
        return engine.save_weights_for_sampler(*args)
    raise AssertionError(f"unknown group op {op}")


def _load_from_rank0(engine: Engine, ctx: GroupContext, name: str, with_optimizer: bool, owner: str | None) -> None:
    """Rank 0 reads and checks the state; every rank then receives it over the control group,
    so ranks need no shared storage and a group of any size can load it."""
    failure = None
    if ctx.rank == 0:
        try:
            engine.load_state(name, with_optimizer, owner)
        except Exception as exc:  # every rank must leave this collective together
            failure = exc
    header = [None]
    if ctx.rank == 0:
        optimizer = engine.optimizer.state_tensors() if failure is None else {}
        header = [(failure, engine.optimizer.step_count, [(k, tuple(v.shape), v.dtype) for k, v in optimizer.items()])]
    dist.broadcast_object_list(header, src=0, group=ctx.control)
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
    tensors = {}
    for key, shape, dtype in optimizer_meta:
        buf = optimizer[key] if ctx.rank == 0 else torch.empty(shape, dtype=dtype)
        dist.broadcast(buf, src=0, group=ctx.control)
        tensors[key] = buf
    if ctx.rank != 0:
        if optimizer_meta:
            engine.optimizer.load_state_tensors(tensors, step_count)
        else:
            engine.optimizer.reset()


def _outcome(fn: Callable):
    try:
        return "ok", fn()
    except Exception as exc:  # sent to rank 0, which raises it to the caller
        return "error", exc


def run_worker(runs: TrainingRuns, ctx: GroupContext) -> None:
    """The loop of ranks 1..W-1: receive an operation, run it, send the outcome; until shutdown.
    `runs` attaches its engines to the group (TrainingRuns' `attach`)."""
    Heartbeat(ctx).start()
    while True:
        message = [None]
        dist.scatter_object_list(message, None, src=0, group=ctx.control)
        op, args = message[0]
        if op == "shutdown":
            log.info("rank %d: shutdown", ctx.rank)
            return
        dist.gather_object(_outcome(lambda: _execute(runs, ctx, op, args)), None, dst=0, group=ctx.control)


# -- rank 0 -------------------------------------------------------------------------------------


class GroupRuns(_Runs):
    """Rank 0's view of the group: the training runs every rank holds alike (worker.runs), each
    served through a GroupEngine; the service drives it as it does a TrainingRuns."""

    def __init__(
        self,
        runs: TrainingRuns,
        ctx: GroupContext,
        rank_timeout: float = 30.0,
        on_rank_lost: Callable[[RankUnavailable], None] | None = None,
    ):
        """`runs`: rank 0's own registry, made with `attach` (as every rank's is)."""
        assert ctx.rank == 0
        self.local = runs
        self.ctx = ctx
        self.config, self.max_runs = runs.config, runs.max_runs
        self.broken: RankUnavailable | None = None
        self.monitor = RankMonitor(ctx, rank_timeout, self._rank_lost)
        self.on_rank_lost = on_rank_lost
        self._engines: dict[str | None, GroupEngine] = {}
        self._exported_by: dict[Path, str] = {}  # sharded: export directory -> the run that wrote it last
        Heartbeat(ctx).start()
        self.monitor.start()

    @property
    def policy(self):
        return self.local.policy

    @property
    def sharded(self) -> bool:
        return self.local.policy.sharded is not None

    # -- runs -----------------------------------------------------------------------------------

    def get(self, model_id: str, owner: str | None) -> GroupEngine:
        """The group's engine of run `model_id` ("" = `owner`'s default run, made everywhere if
        need be)."""
        model_id = model_id or self._default_run(owner)
        self.local.get(model_id, owner)  # ownership, last use
        return self._engine(model_id)

    def export_sampler(self) -> GroupEngine:
        return self._engine(None)

    def export_engine(self, model_path: str, owner: str | None) -> GroupEngine:
        """Replicated, rank 0 samples saved weights alone. Sharded, only those that are a run's
        current weights can be sampled, by that run (every rank computes)."""
        if not self.sharded:
            return self.export_sampler()
        name = export_name(self.config.export, model_path)
        path = checkpoint.open_directory(self.config.export.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)[0]
        model_id = self._exported_by.get(path)
        engine = self.local.engines().get(model_id)
        if engine is None or engine.current_export != name:
            raise StateNotFound(SHARDED_EXPORT_SAMPLING)
        return self._engine(model_id)

    def info(self, model_id: str, owner: str | None) -> RunInfo:
        return self.local.info(model_id, owner)

    def _record(self, model_id: str) -> _Run:
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
        outcomes = self._outcomes([("create", (owner, spec, model_id))] * self.ctx.world_size)
        failures = [value for kind, value in outcomes if kind == "error"]
        if failures and len(failures) < len(outcomes):
            self.everywhere("discard", (model_id,))
        self._engines.pop(None, None)  # the base may have been reloaded: the export sampler is new
        if failures:
            raise failures[0]
        return model_id

    def unload(self, model_id: str, owner: str | None) -> None:
        self.local.info(model_id, owner)  # RunNotFound before anything is sent
        self._engines.pop(model_id, None)
        self.everywhere("unload", (model_id, owner))

    def _engine(self, model_id: str | None) -> GroupEngine:
        local = self.local.engine(model_id)
        engine = self._engines.get(model_id)
        if engine is None or engine.local is not local:
            engine = self._engines[model_id] = GroupEngine(self, model_id, local)
        return engine

    # -- the group ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release the other ranks (they exit their loop)."""
        if self.broken is None:
            dist.scatter_object_list([None], [("shutdown", ())] * self.ctx.world_size, src=0, group=self.ctx.control)
        self.monitor.stop()

    def everywhere(self, op: str, args: tuple) -> list:
        return self.call([(op, args)] * self.ctx.world_size)

    def call(self, messages: list[tuple[str, tuple]]) -> list:
        """Scatter one message per rank, run rank 0's, gather every outcome; raise the first error."""
        outcomes = self._outcomes(messages)
        for kind, value in outcomes:
            if kind == "error":
                raise value
        return [value for _, value in outcomes]

    def _outcomes(self, messages: list[tuple[str, tuple]]) -> list[tuple[str, object]]:
        """Every rank's ("ok", value) or ("error", exception) for its message."""
        if self.broken is not None:
            raise self.broken
        try:
            mine = [None]
            dist.scatter_object_list(mine, messages, src=0, group=self.ctx.control)
            outcome = _outcome(lambda: _execute(self.local, self.ctx, *mine[0]))
            outcomes = [None] * self.ctx.world_size
            dist.gather_object(outcome, outcomes, dst=0, group=self.ctx.control)
        except RuntimeError as exc:  # a collective failed: some rank is gone
            raise self._diagnose(exc) from exc
        return outcomes

    def _diagnose(self, exc: Exception) -> RankUnavailable:
        """Name the lost rank: wait (bounded) for its heartbeat to go stale."""
        deadline = time.monotonic() + self.monitor.timeout + 2 * HEARTBEAT_SECONDS
        while self.broken is None and time.monotonic() < deadline:
            time.sleep(HEARTBEAT_SECONDS / 4)
            self.monitor.check()
        if self.broken is None:
            self._rank_lost(RankUnavailable(None, f"data-parallel group failed: {exc}"))
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
    def exports(self):
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
            [("run_batch", (self.model_id, batch.take(shard), loss.name, config, backward, passes)) for shard in shards]
        )
        logprobs: list = [None] * len(samples)
        stats = BatchStats()
        for shard, result in zip(shards, results):
            stats = stats.merge(result.stats)
            for i, lp in zip(shard, result.logprobs):
                logprobs[i] = lp
        return BatchResult(logprobs=logprobs, stats=stats)

    def optim_step(self, adam: AdamParams) -> OptimResult:
        return self._everywhere("optim_step", adam)

    def save_state(self, name: str, owner: str | None = None):
        return self._everywhere("save_state", name, owner)

    def load_state(self, name: str, with_optimizer: bool = False, owner: str | None = None) -> int:
        return self._everywhere("load_state", name, with_optimizer, owner)

    # Replicated, rank 0 samples and exports alone: every rank holds the same weights. Sharded,
    # every rank takes part (each pass gathers the weights).

    def validate_sample(self, request):
        return self.local.validate_sample(request)

    def sample(self, requests: list) -> list:
        return self._on_weights("sample", requests)

    def save_weights_for_sampler(self, name: str, owner: str | None = None, merged: bool = False):
        saved = self._on_weights("save_weights_for_sampler", name, owner, merged)
        if self.group.sharded:
            self.group._exported_by[saved] = self.model_id
        return saved

    def _on_weights(self, op: str, *args):
        """`op` of the weights: on every rank when sharded, else on rank 0's alone."""
        if self.group.sharded:
            return self._everywhere(op, *args)
        if self.group.broken is not None:
            raise self.group.broken
        return getattr(self.local, op)(*args)

    def _everywhere(self, op: str, *args):
        """Rank 0's outcome of `op` on this run on every rank."""
        return self.group.everywhere(op, (self.model_id, *args))[0]


class Heartbeat(threading.Thread):
    """Writes this rank's wall-clock time into the store every HEARTBEAT_SECONDS."""

    def __init__(self, ctx: GroupContext):
        super().__init__(name=f"cispo-heartbeat-{ctx.rank}", daemon=True)
        self.key = f"cispo/heartbeat/{ctx.rank}"
        self.store = ctx.store

    def run(self) -> None:
        while True:
            try:
                self.store.set(self.key, repr(time.time()))
            except Exception:  # the store lives on rank 0's host; gone means we are done
                return
            time.sleep(HEARTBEAT_SECONDS)


class RankMonitor(threading.Thread):
    """On rank 0: a rank whose heartbeat is older than `timeout` seconds is lost."""

    def __init__(self, ctx: GroupContext, timeout: float, on_lost: Callable[[RankUnavailable], None]):
        super().__init__(name="cispo-rank-monitor", daemon=True)
        self.ctx, self.timeout, self.on_lost = ctx, timeout, on_lost
        self.started = time.time()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(HEARTBEAT_SECONDS):
            self.check()

    def stop(self) -> None:
        self._stop_event.set()

    def check(self) -> None:
        now = time.time()
        for rank in range(1, self.ctx.world_size):
            key = f"cispo/heartbeat/{rank}"
            try:
                last = float(self.ctx.store.get(key)) if self.ctx.store.check([key]) else self.started
            except Exception:
                continue
            if now - last > self.timeout:
                self.on_lost(
                    RankUnavailable(
                        rank,
                        (
                            f"data-parallel rank {rank} stopped answering (no heartbeat for {now - last:.1f} s); "
                            "the group must be restarted and can resume from a saved state"
                        ),
                    )
                )
                return
