"""`APIFuture`: the answer to a submitted operation, usable from sync and async code.

The client's I/O runs on its own event-loop thread, so a future resolves whatever the caller
does: `result()` blocks any thread (even one running an event loop, without deadlock), and
`await future.result_async()` / `await future` waits inside any running event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

__all__ = ["APIFuture"]

T = TypeVar("T")


class APIFuture(Generic[T]):
    """The pending result of one operation (Tinker's `APIFuture`).

    The operation is already submitted: operations run on the server in submission order,
    whether or not anyone waits for them. Waiting raises the operation's `CispoError`
    if it failed.
    """

    __slots__ = ("_future", "request_id")

    def __init__(self, future: concurrent.futures.Future, request_id: str = "") -> None:
        # RUNNING, so that cancelling a task that awaits this future cannot cancel it.
        if not (future.running() or future.done()):
            future.set_running_or_notify_cancel()
        self._future = future
        self.request_id: str = request_id
        """The id the request carried on the stream."""

    def result(self, timeout: float | None = None) -> T:
        """Block until the answer arrives and return it (or raise its error).

        Raises TimeoutError after `timeout` seconds; the operation itself is not cancelled.
        """
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:  # the builtin TimeoutError only from 3.11 on
            raise TimeoutError(f"no answer to request {self.request_id!r} yet") from None

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the answer in the running event loop and return it (or raise its error).

        Raises TimeoutError after `timeout` seconds; the operation itself is not cancelled.
        """
        waiter = asyncio.wrap_future(self._future)
        if timeout is None:
            return await waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11 on
            raise TimeoutError(f"no answer to request {self.request_id!r} yet") from None

    def __await__(self) -> Generator[Any, None, T]:
        """`await future` is `await future.result_async()`."""
        return self.result_async().__await__()

    def done(self) -> bool:
        """Whether the answer (or an error) has arrived."""
        return self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until the answer arrives; the operation's error, or None if it succeeded."""
        return self._future.exception(timeout)

    def add_done_callback(self, callback: Callable[[APIFuture[T]], Any]) -> None:
        """Call `callback(self)` when the answer arrives, on the client's I/O thread
        (or at once if it already has). The callback must not block."""
        self._future.add_done_callback(lambda _: callback(self))

    def future(self) -> concurrent.futures.Future:
        """The underlying `concurrent.futures.Future` (Tinker's `future()`)."""
        return self._future

    def __repr__(self) -> str:
        state = "pending"
        if self._future.done():
            state = "failed" if self._future.exception() is not None else "done"
        return f"<APIFuture request_id={self.request_id!r} {state}>"
