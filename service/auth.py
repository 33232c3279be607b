"""Who is calling: the identity of the current RPC (None when the server checks no tokens)."""

from contextvars import ContextVar

_identity: ContextVar[str | None] = ContextVar("cispo_identity", default=None)


def current_identity() -> str | None:
    """The token name of the calling client, or None without authentication."""
    return _identity.get()
