"""Exactly-once retries: the answers of recent operations, by idempotency key.

A client may tag each mutating request with a key of its own choosing. The first request with
a key runs; its answer future is remembered under (identity, key) at once, before it is queued,
so a retry that arrives while it is still queued or running waits for the same answer instead of
running again. Successful answers stay until evicted (oldest first, beyond `max_entries` or
`max_bytes` of answers); a failed operation changed nothing, so it is forgotten and its retry
runs anew. The request's fingerprint is kept too: a key reused for a different request is an
error, not a silent replay. Lives on the event loop; not thread-safe.
"""

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from google.rpc import status_pb2

from cispo.service.config import ServerConfig
from cispo.worker import FieldViolation, InvalidInput

MAX_KEY_CHARS = 128


def fingerprint(op: str, request) -> bytes:
    """A digest of what an operation does: its name and its request message (SHA-256, which
    CPUs hash in hardware)."""
    digest = hashlib.sha256(op.encode())
    digest.update(request.SerializeToString(deterministic=True))
    return digest.digest()


def check_key(key: str) -> None:
    """InvalidInput unless `key` is a usable idempotency key ("" means none)."""
    if len(key) > MAX_KEY_CHARS:
        raise InvalidInput(
            [FieldViolation("idempotency_key", f"must be at most {MAX_KEY_CHARS} characters, got {len(key)}")]
        )


@dataclass
class _Entry:
    fingerprint: bytes
    answer: asyncio.Future  # resolves to the response message or a google.rpc.Status
    size: int = 0  # bytes of a successful answer (0 while running)


class IdempotencyCache:
    def __init__(
        self, max_entries: int = ServerConfig.idempotency_keys, max_bytes: int = ServerConfig.idempotency_bytes
    ):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, identity: str | None, key: str, request_fingerprint: bytes) -> asyncio.Future | None:
        """The answer future of an earlier request with this key (None if there is none);
        InvalidInput if that request was a different one."""
        entry = self._entries.get((identity, key))
        if entry is None:
            return None
        if entry.fingerprint != request_fingerprint:
            raise InvalidInput(
                [
                    FieldViolation(
                        "idempotency_key",
                        (
                            "was already used for a different request; use a new key for every operation "
                            "and the same key only to retry the same request"
                        ),
                    )
                ]
            )
        return entry.answer

    def remember(self, identity: str | None, key: str, request_fingerprint: bytes, answer: asyncio.Future) -> None:
        """Remember `answer` under the key now; keep it once it succeeds, drop it if it fails."""
        if self.max_entries == 0:
            return
        scoped = (identity, key)
        entry = _Entry(request_fingerprint, answer)
        self._entries[scoped] = entry
        answer.add_done_callback(lambda future: self._settled(scoped, entry))

    def _settled(self, scoped: tuple, entry: _Entry) -> None:
        if self._entries.get(scoped) is not entry:
            return
        answer = None if entry.answer.cancelled() else entry.answer.result()
        if answer is None or isinstance(answer, status_pb2.Status):
            del self._entries[scoped]
            return
        entry.size = answer.ByteSize()
        self._bytes += entry.size
        self._evict()

    def _evict(self) -> None:
        """Drop the oldest settled answers while over a bound (running ones are never dropped)."""
        for scoped in list(self._entries):
            if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes:
                return
            entry = self._entries[scoped]
            if entry.answer.done():
                del self._entries[scoped]
                self._bytes -= entry.size
