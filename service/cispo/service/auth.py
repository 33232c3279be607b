"""Who is calling: bearer-token authentication (TLS is in service/cispo/service/tls.py).

- `current_identity()`: the token NAME of the current RPC (None when the server checks no
  tokens), set by `TokenAuthInterceptor` inside the wrapped behavior, so the servicer and the
  tasks it creates (which copy the context) see it.
- `load_tokens(path)`: the tokens file, one `NAME:TOKEN` a line; every mistake is a
  `TokenFileError` naming the line, never the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path

import grpc

from cispo.service.log_limits import RateLimitedLog

log = logging.getLogger(__name__)

_identity: ContextVar[str | None] = ContextVar("cispo_identity", default=None)


def current_identity() -> str | None:
    """The token name of the calling client, or None without authentication."""
    return _identity.get()


def set_identity(name: str | None) -> None:
    """Make `name` the current identity of this task (and the tasks it creates): for fronts
    other than gRPC, which authenticate in their own way."""
    _identity.set(name)


# --- the tokens file ---------------------------------------------------------------------------

MIN_TOKEN_LENGTH = 16


class TokenFileError(ValueError):
    """A tokens file that cannot be used; the message names the file and line, never a token."""


def load_tokens(path: str | os.PathLike) -> dict[str, str]:
    """NAME -> TOKEN from a file of `NAME:TOKEN` lines (`#` comments and blank lines allowed).

    Rejects malformed lines, empty names or tokens, tokens shorter than 16 characters,
    duplicate names and duplicate tokens, and a file with no token at all.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read tokens file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    tokens: dict[str, str] = {}
    seen: dict[str, int] = {}  # token -> line number
    names: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"tokens file {path} line {number}"
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep:
            raise TokenFileError(f"{where}: expected NAME:TOKEN")
        if not name:
            raise TokenFileError(f"{where}: empty name")
        if any(c.isspace() for c in name):
            raise TokenFileError(f"{where}: the name {name!r} contains whitespace")
        if not token:
            raise TokenFileError(f"{where}: empty token for {name!r}")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise TokenFileError(f"{where}: the token for {name!r} contains whitespace or control characters")
        if len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(f"{where}: the token for {name!r} is shorter than {MIN_TOKEN_LENGTH} characters")
        if name in names:
            raise TokenFileError(f"{where}: duplicate name {name!r} (first on line {names[name]})")
        if token in seen:
            raise TokenFileError(f"{where}: the token for {name!r} is the same as the one on line {seen[token]}")
        names[name], seen[token], tokens[name] = number, number, token
    if not tokens:
        raise TokenFileError(f"tokens file {path} holds no NAME:TOKEN line")
    return tokens


# --- the interceptor ----------------------------------------------------------------------------

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
# How long a refused request stream may take to send its first message (see _await_first_request).
FIRST_REQUEST_WAIT_SECONDS = 2.0
# Methods open without a token: Kubernetes probes speak grpc.health.v1 and carry none.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer TOKEN` on every call except health checks.

    A token is compared against every known one in constant time (digests, `hmac.compare_digest`,
    no early exit), so timing reveals neither whether nor which token matched. A call without a
    valid token ends with UNAUTHENTICATED before its request message is decoded.
    """

    def __init__(self, tokens: Mapping[str, str], log_interval_seconds: float = 5.0):
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._digests = [(name, _digest(token)) for name, token in tokens.items()]
        self._failures = RateLimitedLog(log, log_interval_seconds, logging.WARNING)

    def authenticate(self, metadata) -> tuple[str | None, str]:
        """(token name, "") for a valid bearer token, else (None, why) with no secret in `why`."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return None, "no authorization header"
        if len(values) > 1:
            return None, "several authorization headers"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "authorization is not a bearer token"
        found = self.identify(token.strip())
        return (found, "") if found is not None else (None, "unknown bearer token")

    def identify(self, token: str) -> str | None:
        """The name of `token`, or None if it is none of the known ones (constant time)."""
        presented = _digest(token)
        found = None
        for name, digest in self._digests:  # no break: every comparison is made
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        name, why = self.authenticate(handler_call_details.invocation_metadata)
        method = handler_call_details.method
        # The request message of a refused call is received but never decoded.
        kwargs = dict(
            request_deserializer=handler.request_deserializer if name else _discard,
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, name, why, method), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, name, why, method), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, name, why, method), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, name, why, method), **kwargs)

    def _refuse(self, context, why: str, method: str):
        self._failures.log(
            f"authentication failed from {_peer_host(context.peer())}: {why}",
            "authentication failed for %s from %s%s: %s",
            method,
            context.peer(),
            _client_certificate_name(context),
            why,
        )
        return context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def _await_first_request(self, request_or_iterator) -> None:
        """Before refusing a call that streams requests: wait (briefly) for its first message, never
        decoded. A status sent while the client's first write is still starting surfaces in the
        grpc.aio client as INTERNAL "Internal error from Core" instead of UNAUTHENTICATED."""
        if not hasattr(request_or_iterator, "__aiter__"):
            return
        try:
            await asyncio.wait_for(request_or_iterator.__aiter__().__anext__(), FIRST_REQUEST_WAIT_SECONDS)
        except (StopAsyncIteration, asyncio.TimeoutError):
            pass
        except Exception:
            pass

    def _unary(self, behavior, name, why, method):
        if name is None:

            async def refused(request_or_iterator, context):
                await self._await_first_request(request_or_iterator)
                await self._refuse(context, why, method)

            return refused

        async def wrapped(request_or_iterator, context):
            _identity.set(name)
            return await behavior(request_or_iterator, context)

        return wrapped

    def _stream(self, behavior, name, why, method):
        if name is None:

            async def refused(request_or_iterator, context):
                await self._await_first_request(request_or_iterator)
                await self._refuse(context, why, method)
                yield  # an async generator, like the behavior it stands for

            return refused

        if not inspect.isasyncgenfunction(behavior):  # writes with context.write() and returns

            async def written(request_or_iterator, context):
                _identity.set(name)
                return await behavior(request_or_iterator, context)

            return written

        async def wrapped(request_or_iterator, context):
            _identity.set(name)
            async for response in behavior(request_or_iterator, context):
                yield response

        return wrapped


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _discard(_: bytes) -> None:
    return None


def _peer_host(peer: str | None) -> str:
    """ "ipv4:10.0.0.7:53412" -> "ipv4:10.0.0.7": one rate limit per client host, not per connection."""
    if not peer:
        return "?"
    if peer.startswith("ipv6:["):
        return peer.partition("]")[0] + "]"
    return peer.rpartition(":")[0] or peer


def _client_certificate_name(context) -> str:
    """ " (client certificate CN=...)" under mTLS, else ""."""
    try:
        auth = context.auth_context() or {}
    except Exception:
        return ""
    names = auth.get("x509_common_name") or auth.get("x509_subject_alternative_name") or []
    return f" (client certificate {names[0].decode(errors='replace')})" if names else ""
