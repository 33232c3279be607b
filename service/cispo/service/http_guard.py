"""The HTTP port's defences against clients that hold connections without using them.

uvicorn's h11 protocol waits forever for a request's headers and body, so a client that opens
connections and trickles bytes (slowloris) holds them, and their descriptors, with no key. This
protocol adds what a shared server needs:

- a cap on open connections: one over it is answered 503 (Retry-After) and closed at once;
- a deadline for a request's headers, counted from the connection (or, on a kept-alive one, from
  the request's first byte), however slowly bytes arrive;
- a deadline between two reads of a body while the server waits for it;
- log lines about refused or dropped connections, and about the process running out of
  descriptors, written at most once a period per kind, with a count of those held back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from cispo.service.log_limits import RateLimitedLog

log = logging.getLogger(__name__)

_OVER_CAP_BODY = b'{"error": "too many open HTTP connections; retry"}'
_OVER_CAP = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_OVER_CAP_BODY), _OVER_CAP_BODY)
)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    """Open HTTP connections at most; one more is answered 503 and closed."""
    header_timeout_seconds: float = 10.0
    """A request's headers must arrive whole within this, from the connection or its first byte."""
    body_timeout_seconds: float = 30.0
    """Longest wait for the next bytes of a body being read."""


def guarded_protocol(limits: ConnectionLimits, notices: RateLimitedLog) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with `limits` (uvicorn.Config(http=...))."""

    class GuardedProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                notices.log(
                    "cap",
                    "HTTP connection from %s refused: %d connections open (--http-max-connections)",
                    self.client[0] if self.client else "?",
                    len(self.connections) - 1,
                )
                transport.write(_OVER_CAP)
                transport.close()
                return
            self._arm(limits.header_timeout_seconds, "its headers")

        def data_received(self, data: bytes) -> None:
            waiting_for_request = self.conn.their_state is h11.IDLE
            if waiting_for_request and self._deadline is None:  # a kept-alive connection's next request
                self._arm(limits.header_timeout_seconds, "its headers")
            super().data_received(data)
            if self.conn.their_state is h11.SEND_BODY:
                self._arm(limits.body_timeout_seconds, "the rest of its body")
            elif self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, seconds, what)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, seconds: float, what: str) -> None:
            self._deadline = None
            if self.flow.read_paused:  # the server, not the client, is behind: wait on
                self._arm(seconds, what)
                return
            if not self.transport.is_closing():
                notices.log(
                    "timeout",
                    "HTTP connection from %s closed: %s did not arrive within %.0f s",
                    self.client[0] if self.client else "?",
                    what,
                    seconds,
                )
                self.transport.close()

    return GuardedProtocol


def quiet_descriptor_exhaustion(loop: asyncio.AbstractEventLoop, notices: RateLimitedLog) -> None:
    """Log the event loop's accept failures for lack of descriptors once a period, without a
    traceback (asyncio logs one a second per listening socket, and pauses that socket's accepts
    for a second, by itself); every other loop error goes to the default handler."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            notices.log(
                "descriptors",
                "accepting a connection failed: %s (raise the process's descriptor limit, "
                "or lower --http-max-connections)",
                exc.strerror,
            )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


class RateLimitedFilter(logging.Filter):
    """Passes one record per (logger, message template) a period to `notices`' logger instead,
    with a count of those held back (uvicorn warns once per malformed request)."""

    def __init__(self, notices: RateLimitedLog):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        self.notices.log(f"{record.name}:{record.msg}", "%s", record.getMessage())
        return False
