"""The ordered operation pipeline of the one training state.

Operations run one at a time, in the order submitted, on a dedicated engine thread, while the
event loop goes on decoding and validating the next requests. At most `capacity` operations
wait; `submit` blocks beyond that, so a stream's reader stops reading and gRPC flow control
slows the client (back-pressure) instead of memory growing.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_STOP = object()


class OperationPipeline:
    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=capacity)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cispo-engine")
        self._runner: asyncio.Task | None = None
        self._running: asyncio.Future | None = None
        self._failure: BaseException | None = None
        self.accepted = 0  # operations submitted so far
        self.completed = 0  # operations the engine finished (successfully or not)

    @property
    def depth(self) -> int:
        """Operations accepted and waiting to run."""
        return self._queue.qsize()

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Queue `fn` (waiting for room) and return the future of its result."""
        if self._failure is not None:
            raise self._failure
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((fn, future))
        self.accepted += 1
        return future

    def fail(self, exc: BaseException) -> None:
        """The engine can no longer run (e.g. a rank is lost): fail the running and queued
        operations with `exc` now, and every later submit too. The engine thread may stay
        blocked; `close` does not wait for it."""
        self._failure = exc
        pending = [self._running] if self._running is not None else []
        while not self._queue.empty():
            fn, future = self._queue.get_nowait()
            pending.append(future)
        for future in pending:
            if future is not None and not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Run everything already accepted, then stop the engine thread."""
        if self._failure is not None:
            if self._runner is not None:
                self._runner.cancel()
            self._executor.shutdown(wait=False)
            return
        await self._queue.put((_STOP, None))
        if self._runner is not None:
            await self._runner
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            fn, future = await self._queue.get()
            if fn is _STOP:
                return
            self._running = future
            try:
                result = await loop.run_in_executor(self._executor, fn)
            except Exception as exc:  # handed to the waiting caller
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
            finally:
                self._running = None
                self.completed += 1
