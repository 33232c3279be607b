"""Data-parallel worker groups on torch.distributed (torchrun, or the same env vars on a cluster):
joining one, what makes an engine one of its ranks, and the heartbeats that name a lost rank.

Rank 0 serves gRPC and drives the group (worker.group_runs): every operation is scattered to
all ranks over a gloo control group (each rank gets its shard of the batch, balanced by token
count; worker.group_ops), each rank runs it on its own engine of the run it names, and the
outcomes are gathered back in the original datum order. Gradients are summed across ranks
(all_reduce on the default group: gloo on CPU, nccl on GPU, or FSDP2's reduce-scatter for
sharded parameters) before each optimizer step; the loss is a sum, so this is exact and the
weights stay identical everywhere.

Every rank writes a heartbeat into the rendezvous store; rank 0 watches them, so a rank that
dies or hangs is named and the service fails over to UNAVAILABLE instead of hanging with it.
"""

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cispo.worker.engine import GroupMember
from cispo.worker.errors import ComputeFailed, RankUnavailable

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


def member(ctx: GroupContext) -> GroupMember:
    """What makes an engine one rank of the group: summed gradients (FSDP2 sums sharded
    parameters' in its backward; the others, a LoRA adapter's under fsdp too, are all-reduced),
    group-wide failure agreement."""

    def reduce_gradients(replicated: list[torch.nn.Parameter]) -> None:
        for p in replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_in_buckets([p.grad for p in replicated if p.grad is not None])

    def agree_on_failure(failure: ComputeFailed | None) -> ComputeFailed | None:
        outcomes: list[ComputeFailed | None] = [None] * ctx.world_size
        dist.all_gather_object(outcomes, failure, group=ctx.control)
        rank, first = next(((r, f) for r, f in enumerate(outcomes) if f is not None), (None, None))
        if first is None or first.non_finite:
            return first
        return ComputeFailed(f"rank {rank}: {first}", first.out_of_memory)

    return GroupMember(ctx.rank, ctx.control, reduce_gradients, agree_on_failure)


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
