"""The ordered operation pipeline of the training runs.

Operations run one at a time on a dedicated engine thread, while the event loop goes on decoding
and validating the next requests. The engine thread takes the next operation itself as soon as
it finishes one, and hands results back to the event loop without waiting for it, so
consecutive operations run back to back however busy the event loop is. Each training run has a lane: its operations run in the order
submitted, and lanes with waiting operations take turns (round robin), so a long queue on one run
does not starve another. At most `capacity` operations wait per lane; `submit` blocks beyond
that, so a stream's reader stops reading and gRPC flow control slows the client (back-pressure)
instead of memory growing.

Batching. A `Batchable` operation (a sample) runs together with the batchable operations of the
same `run_batch` queued right behind it, up to a budget of their costs: operations that only
read the state may share one engine call without changing what any of them sees, while every
other operation keeps its place between them. Batchable operations wait under a capacity of
their own (`batch_capacity`), so many small requests can gather into one batch.
"""

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Batchable:
    """An operation that may share an engine call: `run_batch([item, ...])` returns one result
    (or Exception) per item, in order."""

    item: Any
    run_batch: Callable[[list[Any]], list[Any]]
    cost: int
    budget: int  # most total cost of one batch (an item over it runs alone)


class OperationPipeline:
    def __init__(self, capacity: int = 8, batch_capacity: int = 256, max_lanes: int = 17):
        """At most `capacity` operations (`batch_capacity` batchable ones) wait per lane, and
        lanes with waiting operations are served in turn; at most `max_lanes` lanes' worth of
        operations wait in all."""
        if capacity < 1 or batch_capacity < 1 or max_lanes < 1:
            raise ValueError(f"capacities must be >= 1, got {capacity}, {batch_capacity} and {max_lanes}")
        self.capacity = capacity
        self.batch_capacity = batch_capacity
        self.max_lanes = max_lanes
        self._lanes: dict[Any, deque] = {}  # lane -> (fn or Batchable, future), in submission order
        self._turns: deque = deque()  # lanes with waiting operations, in the order they are served
        self._waiting: dict[tuple[Any, bool], int] = {}  # (lane, batchable) -> waiting operations
        self._total = {False: 0, True: 0}
        self._closing = False
        # The queues are shared with the engine thread under `_lock`; `_work` wakes the engine
        # thread, `_changed` the submitters waiting for room (on the event loop).
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._changed = asyncio.Condition()
        self._notifying: set[asyncio.Task] = set()  # owned: the loop holds tasks weakly
        self._loop: asyncio.AbstractEventLoop | None = None  # the submitters', set on first use
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future | None = None
        self._running: list[asyncio.Future] = []
        self._failure: BaseException | None = None
        self.accepted = 0  # operations submitted so far
        self.completed = 0  # operations the engine finished (successfully or not)

    @property
    def depth(self) -> int:
        """Operations accepted and waiting to run."""
        return self._total[False] + self._total[True]

    @property
    def batchable_depth(self) -> int:
        """Batchable operations (samples) accepted and waiting to run."""
        return self._total[True]

    def start(self) -> None:
        """Start the engine thread (call from the event loop that submits)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(target=self._engine, name="cispo-engine", daemon=True)
        self._thread.start()

    async def submit(self, fn: Callable[[], Any] | Batchable, lane: Any = None) -> asyncio.Future:
        """Queue `fn` in `lane` (waiting for room) and return the future of its result.
        Operations of one lane run in submission order; lanes take turns."""
        batchable = isinstance(fn, Batchable)
        room = self.batch_capacity if batchable else self.capacity

        def has_room() -> bool:
            return (
                self._failure is not None
                or self._closing
                or (self._waiting.get((lane, batchable), 0) < room and self._total[batchable] < room * self.max_lanes)
            )

        async with self._changed:
            await self._changed.wait_for(has_room)
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise RuntimeError("the pipeline is closed")
            self._loop = asyncio.get_running_loop()
            future = self._loop.create_future()
            with self._work:
                if lane not in self._lanes:
                    self._lanes[lane] = deque()
                    self._turns.append(lane)
                self._lanes[lane].append((fn, future))
                self._waiting[lane, batchable] = self._waiting.get((lane, batchable), 0) + 1
                self._total[batchable] += 1
                self.accepted += 1
                self._work.notify()
        return future

    def fail(self, exc: BaseException) -> None:
        """The engine can no longer run (e.g. a rank is lost): fail the running and queued
        operations with `exc` now, and every later submit too. The engine thread may stay
        blocked; `close` does not wait for it."""
        with self._work:
            self._failure = exc
            pending = list(self._running)
            for queue in self._lanes.values():
                pending += [future for _, future in queue]
            self._lanes.clear()
            self._turns.clear()
            self._waiting.clear()
            self._total = {False: 0, True: 0}
            self._work.notify()
        for future in pending:
            if future is not None and not future.done():
                future.set_exception(exc)
        self._wake()  # submitters waiting for room

    async def close(self) -> None:
        """Run everything already accepted, then stop the engine thread."""
        with self._work:
            self._closing = True
            self._work.notify()
        await self._notify()
        if self._failure is None and self._stopped is not None:
            await self._stopped  # the engine thread may stay blocked after a failure: not waited for

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        """The next lane's next operation, with the batchable ones right behind it in that lane
        that join its batch; the lane goes to the back of the turns."""
        lane = self._turns.popleft()
        queue = self._lanes[lane]
        taken = [queue.popleft()]
        first = taken[0][0]
        if isinstance(first, Batchable):
            cost = first.cost
            while queue:
                fn = queue[0][0]
                if not (
                    isinstance(fn, Batchable) and fn.run_batch == first.run_batch and cost + fn.cost <= first.budget
                ):
                    break
                cost += fn.cost
                taken.append(queue.popleft())
        if queue:
            self._turns.append(lane)
        else:
            del self._lanes[lane]
        batchable = isinstance(first, Batchable)
        self._waiting[lane, batchable] -= len(taken)
        if not self._waiting[lane, batchable]:
            del self._waiting[lane, batchable]
        self._total[batchable] -= len(taken)
        return taken

    def _engine(self) -> None:
        """The engine thread: take the next operation, run it, hand its outcome to the event
        loop (without waiting), and go on; until closed and empty, or failed."""
        while True:
            with self._work:
                self._work.wait_for(lambda: self._turns or self._closing or self._failure is not None)
                if self._failure is not None or not self._turns:
                    break
                taken = self._take()
                futures = [future for _, future in taken]
                self._running = futures
            self._on_loop(self._room_freed)
            first = taken[0][0]
            try:
                if isinstance(first, Batchable):
                    results = first.run_batch([fn.item for fn, _ in taken])
                    outcomes = [(isinstance(r, Exception), r) for r in results]
                else:
                    outcomes = [(False, first())]
            except Exception as exc:  # handed to the waiting callers
                outcomes = [(True, exc)] * len(futures)
            with self._work:
                self._running = []
                self.completed += len(futures)
            self._on_loop(self._deliver, futures, outcomes)
        self._on_loop(self._finished)

    def _on_loop(self, callback, *args) -> None:
        """Run `callback(*args)` on the event loop; nothing if the loop is closed (its callers are gone)."""
        loop = self._loop
        if loop is None:  # nothing was ever submitted, so no one waits
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            if not loop.is_closed():
                raise

    def _room_freed(self) -> None:
        self._wake()

    def _wake(self) -> None:
        """Wake the submitters waiting for room, from a task kept until it is done."""
        task = asyncio.ensure_future(self._notify())
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    def _finished(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    @staticmethod
    def _deliver(futures: list[asyncio.Future], outcomes: list[tuple[bool, Any]]) -> None:
        for future, (failed, value) in zip(futures, outcomes):
            if future.done():
                continue
            if failed:
                future.set_exception(value)
            else:
                future.set_result(value)
