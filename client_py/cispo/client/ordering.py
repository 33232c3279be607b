"""`SubmissionOrder`: a client's operations leave in call order, even past a pending custom loss.

`forward_backward_custom` is two requests: a forward, then (once its logprobs are back and the
loss is differentiated on the client) a backward. An `optim_step` called right after it must
reach the server after that backward, so while a custom loss is pending, later submissions wait
here, in order, and leave as soon as the backward has gone.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable

from .errors import FailedPreconditionError

__all__ = ["Release", "SubmissionOrder"]

Release = Callable[[BaseException | None], None]
"""Ends a hold: None once the held operation's last request has been sent, or its error, which
then fails every operation waiting behind it (none of them is sent)."""


class SubmissionOrder:
    """Starts operations in call order; an operation may hold the rest until it releases.

    A start function sends its request(s) and returns the answer's future; it is called under
    this object's lock, so it must only queue work (the transport's `submit` does).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = False
        self._waiting: deque[tuple[Callable, bool, concurrent.futures.Future]] = deque()

    def submit(self, start: Callable[[], concurrent.futures.Future]) -> concurrent.futures.Future:
        """`start()` now, or once every hold before it is released."""
        return self._enqueue(start, False)

    def submit_holding(self, start: Callable[[Release], concurrent.futures.Future]) -> concurrent.futures.Future:
        """`start(release)` in order; later operations wait until it calls `release`."""
        return self._enqueue(start, True)

    def _enqueue(self, start: Callable, holds: bool) -> concurrent.futures.Future:
        with self._lock:
            if not self._held and not self._waiting:
                return self._start(start, holds)
            outer: concurrent.futures.Future = concurrent.futures.Future()
            outer.set_running_or_notify_cancel()
            self._waiting.append((start, holds, outer))
            return outer

    def _start(self, start: Callable, holds: bool) -> concurrent.futures.Future:
        if not holds:
            return start()
        self._held = True
        try:
            return start(self._release)
        except BaseException:
            self._held = False
            raise

    def _release(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._held = False
            if error is not None:
                failed, self._waiting = self._waiting, deque()
                for _, _, outer in failed:
                    outer.set_exception(
                        FailedPreconditionError(
                            f"not sent: the forward_backward_custom submitted before it failed ({error!r})"
                        )
                    )
                return
            while self._waiting and not self._held:
                start, holds, outer = self._waiting.popleft()
                try:
                    _chain(self._start(start, holds), outer)
                except BaseException as exc:  # a request the client itself refused (e.g. too large)
                    outer.set_exception(exc)


def _chain(inner: concurrent.futures.Future, outer: concurrent.futures.Future) -> None:
    """Give `outer` the outcome of `inner` when it arrives."""

    def copy(done: concurrent.futures.Future) -> None:
        error = done.exception()
        if error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(done.result())

    inner.add_done_callback(copy)
