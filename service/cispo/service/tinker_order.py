"""Order: a Tinker model's requests start in `seq_id` order, whatever order they arrive in, so
chunks the SDK sends in parallel accumulate into one gradient.

A request holds its turn (`hold_turn`) from the moment its model and seq_id are read until it is
queued (`take_turn`); a request refused in between gives its turn up (`give_up_turn`), so later
requests never wait for it.
"""

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Start = Callable[[], Awaitable[None]]
"""What starts one request, once its turn comes."""


class SeqOrder:
    """Starts one model's requests in seq_id order, whatever order they arrive in.

    A request whose seq_id is already past (a retry, or a second client of the model) starts at
    once; its idempotency key, not its seq_id, keeps it from applying twice. Every refused request
    gives its turn up; a seq_id that never comes (a body that could not even be read) holds the
    later ones `gap_seconds` at most, then the order goes on without it.
    """

    def __init__(self, gap_seconds: float, first: int = 1) -> None:
        self.next = first
        self.gap_seconds = gap_seconds
        self._waiting: dict[int, list[Start]] = {}
        self._running = False
        self._gap: tuple[int, asyncio.TimerHandle] | None = None  # (the seq_id awaited, its timer)
        self._tasks: set[asyncio.Task] = set()  # owned: the loop holds tasks weakly

    def __len__(self) -> int:
        """Requests waiting for their turn."""
        return sum(map(len, self._waiting.values()))

    async def put(self, seq_id: int, start: Start) -> None:
        if seq_id < self.next:
            await start()
            return
        self._waiting.setdefault(seq_id, []).append(start)
        await self._run()

    async def _run(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            while self.next in self._waiting:
                starts = self._waiting.pop(self.next)
                self.next += 1
                for begin in starts:
                    await begin()
        finally:
            self._running = False
            self._watch()

    def _watch(self) -> None:
        """While later requests wait for `next`, a timer that skips it after gap_seconds."""
        if self._gap is not None and (not self._waiting or self._gap[0] != self.next):
            self._gap[1].cancel()
            self._gap = None
        if self._waiting and self._gap is None:
            timer = asyncio.get_running_loop().call_later(self.gap_seconds, self._skip)
            self._gap = (self.next, timer)

    def _skip(self) -> None:
        self._gap = None
        if self._running or not self._waiting:
            return
        log.warning(
            "seq_id %d never came within %.0f s; going on from seq_id %d",
            self.next,
            self.gap_seconds,
            min(self._waiting),
        )
        self.next = min(self._waiting)
        task = asyncio.ensure_future(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_turn: contextvars.ContextVar[tuple[SeqOrder, int] | None] = contextvars.ContextVar("tinker_turn", default=None)
"""The (order, seq_id) of the request being handled, while it has not been queued."""


def hold_turn(order: SeqOrder, seq_id: int) -> None:
    """The request being handled has turn `seq_id` in `order` until it is queued or refused."""
    _turn.set((order, seq_id))


def take_turn() -> None:
    """The request is queued (or holds no turn): nothing to give up."""
    _turn.set(None)


async def give_up_turn() -> None:
    """A refused request's turn in its model's order is passed on at once."""
    if (turn := _turn.get()) is not None:
        _turn.set(None)
        order, seq_id = turn
        await order.put(seq_id, _nothing)


async def _nothing() -> None:
    """The turn of a refused request."""
