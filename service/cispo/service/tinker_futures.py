"""Futures: a submit answers `{request_id}` at once; `retrieve_future` long-polls for the answer
(JSON, or protobuf for forward/backward and samples) and answers "try_again" within
POLL_SECONDS, well inside the SDK's 45 s poll timeout.
"""

import asyncio
import contextlib
import itertools
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response

from cispo.service.auth import current_identity
from cispo.service.errors import clip
from cispo.service.tinker_errors import HttpError

POLL_SECONDS = 20.0
"""Longest wait of one retrieve_future before it answers try_again."""
KEPT_FUTURES = 8192
"""Answered futures remembered for retrieval (the oldest retrieved ones go first)."""


@dataclass
class _Future:
    owner: str | None
    answer: asyncio.Future[Response]
    started: bool = False
    retrieved: bool = False


class FutureTable:
    """Answers by request id, for `retrieve_future`; bounded (KEPT_FUTURES answered ones)."""

    def __init__(self) -> None:
        self._futures: OrderedDict[str, _Future] = OrderedDict()
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()  # set when a future is answered or retrieved

    def new(self) -> tuple[str, asyncio.Future[Response]]:
        """A new request id of the caller's identity, and the future its answer is set on."""
        request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        answer.add_done_callback(lambda _: self._changed.set())
        self._futures[request_id] = _Future(current_identity(), answer)
        self._evict()
        return request_id, answer

    def started(self, request_id: str) -> None:
        self._futures[request_id].started = True

    def unanswered(self) -> int:
        return sum(not f.answer.done() for f in self._futures.values())

    def unretrieved(self) -> int:
        return sum(not f.retrieved for f in self._futures.values())

    async def wait(self, pending: Callable[[], int], deadline: float) -> None:
        """Wait until `pending()` (unanswered or unretrieved) is 0, or the loop time `deadline`."""
        loop = asyncio.get_running_loop()
        while pending() and (left := deadline - loop.time()) > 0:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def abandon(self) -> list[str]:
        """Answer every request that has not started 410 (the SDK submits it again); their ids."""
        abandoned = [k for k, f in self._futures.items() if not f.started and not f.answer.done()]
        for request_id in abandoned:
            self._futures[request_id].answer.set_result(
                JSONResponse(
                    {
                        "error": "the server restarted before this request started; it was not applied: submit it again",
                        "category": "server",
                    },
                    status_code=410,
                )
            )
        return abandoned

    def _evict(self) -> None:
        if len(self._futures) <= KEPT_FUTURES:  # the common case: nothing to scan
            return
        done = [k for k, f in self._futures.items() if f.answer.done()]
        excess = len(done) - KEPT_FUTURES
        if excess > 0:
            for key in sorted(done, key=lambda k: not self._futures[k].retrieved)[:excess]:
                del self._futures[key]
            self._changed.set()

    async def retrieve(self, request_id: str) -> Response:
        """The answer of `request_id` (the caller's own), or "try_again" after POLL_SECONDS."""
        entry = self._futures.get(request_id)
        if entry is None or entry.owner != current_identity():
            raise HttpError(410, f"no pending request {clip(request_id, 80)!r}: unknown, expired or not yours")
        try:
            response = await asyncio.wait_for(asyncio.shield(entry.answer), POLL_SECONDS)
        except asyncio.TimeoutError:
            return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        entry.retrieved = True
        self._changed.set()
        return response
