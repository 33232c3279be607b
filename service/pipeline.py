"""The ordered operation pipeline of the one training state.

Operations run one at a time, in the order submitted, on a dedicated engine thread, while the
event loop goes on decoding and validating the next requests. At most `capacity` operations
wait; `submit` blocks beyond that, so a stream's reader stops reading and gRPC flow control
slows the client (back-pressure) instead of memory growing.

Batching. A `Batchable` operation (a sample) runs together with the batchable operations of the
same `run_batch` queued right behind it, up to a budget of their costs: operations that only
read the state may share one engine call without changing what any of them sees, while every
other operation keeps its place between them. Batchable operations wait under a capacity of
their own (`batch_capacity`), so many small requests can gather into one batch.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

_STOP = object()


@dataclass(frozen=True)
class Batchable:
    """An operation that may share an engine call: `run_batch([item, ...])` returns one result
    (or Exception) per item, in order."""

    item: Any
    run_batch: Callable[[list[Any]], list[Any]]
    cost: int
    budget: int  # most total cost of one batch (an item over it runs alone)


class OperationPipeline:
    def __init__(self, capacity: int = 8, batch_capacity: int = 256):
        if capacity < 1 or batch_capacity < 1:
            raise ValueError(f"capacities must be >= 1, got {capacity} and {batch_capacity}")
        self.capacity = capacity
        self.batch_capacity = batch_capacity
        self._queue: deque = deque()  # (fn or Batchable or _STOP, future)
        self._waiting = {False: 0, True: 0}  # queued operations, by whether they are batchable
        self._changed = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cispo-engine")
        self._runner: asyncio.Task | None = None
        self._running: list[asyncio.Future] = []
        self._failure: BaseException | None = None
        self.accepted = 0  # operations submitted so far
        self.completed = 0  # operations the engine finished (successfully or not)

    @property
    def depth(self) -> int:
        """Operations accepted and waiting to run."""
        return len(self._queue)

    @property
    def batchable_depth(self) -> int:
        """Batchable operations (samples) accepted and waiting to run."""
        return self._waiting[True]

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def submit(self, fn: Callable[[], Any] | Batchable) -> asyncio.Future:
        """Queue `fn` (waiting for room) and return the future of its result."""
        batchable = isinstance(fn, Batchable)
        room = self.batch_capacity if batchable else self.capacity
        async with self._changed:
            await self._changed.wait_for(lambda: self._failure is not None or self._waiting[batchable] < room)
            if self._failure is not None:
                raise self._failure
            future = asyncio.get_running_loop().create_future()
            self._queue.append((fn, future))
            self._waiting[batchable] += 1
            self.accepted += 1
            self._changed.notify_all()
        return future

    def fail(self, exc: BaseException) -> None:
        """The engine can no longer run (e.g. a rank is lost): fail the running and queued
        operations with `exc` now, and every later submit too. The engine thread may stay
        blocked; `close` does not wait for it."""
        self._failure = exc
        pending = list(self._running)
        while self._queue:
            fn, future = self._queue.popleft()
            pending.append(future)
        self._waiting = {False: 0, True: 0}
        for future in pending:
            if future is not None and not future.done():
                future.set_exception(exc)
        asyncio.ensure_future(self._notify())  # wake submitters waiting for room

    async def close(self) -> None:
        """Run everything already accepted, then stop the engine thread."""
        if self._failure is not None:
            if self._runner is not None:
                self._runner.cancel()
            self._executor.shutdown(wait=False)
            return
        async with self._changed:
            self._queue.append((_STOP, None))
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner
        self._executor.shutdown(wait=True)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        """The next operation, with the batchable ones right behind it that join its batch."""
        taken = [self._queue.popleft()]
        first = taken[0][0]
        if isinstance(first, Batchable):
            cost = first.cost
            while self._queue:
                fn = self._queue[0][0]
                if not (isinstance(fn, Batchable) and fn.run_batch == first.run_batch
                        and cost + fn.cost <= first.budget):
                    break
                cost += fn.cost
                taken.append(self._queue.popleft())
        if first is not _STOP:
            self._waiting[isinstance(first, Batchable)] -= len(taken)
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._queue)
                taken = self._take()
                self._changed.notify_all()
            first = taken[0][0]
            if first is _STOP:
                return
            futures = [future for _, future in taken]
            self._running = futures
            try:
                if isinstance(first, Batchable):
                    results = await loop.run_in_executor(self._executor, first.run_batch,
                                                         [fn.item for fn, _ in taken])
                    outcomes = [(isinstance(r, Exception), r) for r in results]
                else:
                    outcomes = [(False, await loop.run_in_executor(self._executor, first))]
            except Exception as exc:  # handed to the waiting callers
                outcomes = [(True, exc)] * len(futures)
            finally:
                self._running = []
                self.completed += len(futures)
            for future, (failed, value) in zip(futures, outcomes):
                if future.done():
                    continue
                if failed:
                    future.set_exception(value)
                else:
                    future.set_result(value)
