"""`Connection`: one server, its transport and one run's order of operations, which a
TrainingClient is and a SamplingClient submits through.

Nothing connects until the first call; the connection and its I/O thread live until `close()`.
Requests bound for the stream are sent in submission order (`_submit`), named with the run's
model_id and checked against max_message_bytes before they leave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cispo.v1 import training_pb2 as pb

from ._transport import Transport
from .errors import ResourceExhaustedError
from .futures import APIFuture
from .ordering import SubmissionOrder

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Connection"]

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""The server's default request-size limit (--max-message-bytes)."""

_Self = TypeVar("_Self", bound="Connection")


class Connection:
    """A connection to one cispo server, on behalf of one training run. Thread-safe."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | str | os.PathLike | None = None,
        certificate_chain: bytes | str | os.PathLike | None = None,
        private_key: bytes | str | os.PathLike | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = None,
        wait_for_ready: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        max_retries: int = 5,
        model_id: str = "",
    ) -> None:
        """
        target: "host:port" of the server (any gRPC target string).
        token: bearer token of a server started with --auth-tokens-file, sent as
            `authorization: Bearer <token>` on every call; default: env CISPO_TOKEN.
        root_certificates: PEM CA certificates (bytes, or a file path) that signed the server's
            TLS certificate; setting it (or env CISPO_TLS_CA_FILE) makes the channel TLS.
        certificate_chain, private_key: this client's PEM certificate and key (bytes or file
            paths) for a server that requires client certificates (mTLS); default: env
            CISPO_CLIENT_CERT_FILE and CISPO_CLIENT_KEY_FILE.
        max_message_bytes: the largest message sent or received; a request over it raises
            ResourceExhaustedError before it is sent. Keep it at or below the server's.
        timeout: deadline in seconds for each sync (unary) call; None waits forever.
        wait_for_ready: queue calls while the server is unreachable instead of failing fast.
        credentials: TLS channel credentials (`grpc.ssl_channel_credentials()`), instead of
            root_certificates/certificate_chain/private_key; None and none of those is plaintext.
        channel_options: extra gRPC channel options, e.g. [("grpc.keepalive_time_ms", 30000)].
        metadata: extra request headers for every call, e.g. [("authorization", "Bearer ...")].
        max_retries: times an operation is resent after UNAVAILABLE or a broken stream, with
            backoff (0.2 s, doubling, at most 5 s). Every mutating request carries an
            idempotency key, so the server applies a resent operation once.
        model_id: the training run every call names (see ServiceClient); "" = the server's
            default run, a full fine-tune.
        """
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        env = os.environ

        def pem(value, variable):  # bytes, PEM text or a path; else the file named by `variable`
            value = value if value is not None else (env.get(variable) or None)
            if value is None or isinstance(value, bytes):
                return value
            value = os.fspath(value)
            return value.encode() if value.lstrip().startswith("-----BEGIN") else Path(value).read_bytes()

        if credentials is not None:
            if any(v is not None for v in (root_certificates, certificate_chain, private_key)):
                raise ValueError("pass either credentials or root_certificates/certificate_chain/private_key")
        else:
            tls = (
                pem(root_certificates, "CISPO_TLS_CA_FILE"),
                pem(private_key, "CISPO_CLIENT_KEY_FILE"),
                pem(certificate_chain, "CISPO_CLIENT_CERT_FILE"),
            )
            if (tls[1] is None) != (tls[2] is None):
                raise ValueError("certificate_chain and private_key go together (mTLS)")
            if any(part is not None for part in tls):
                credentials = grpc.ssl_channel_credentials(*tls)
        has_authorization = any(key.lower() == "authorization" for key, _ in metadata)
        if token is not None and has_authorization:
            raise ValueError("pass either token or an authorization entry in metadata")
        token = token if token is not None else (None if has_authorization else env.get("CISPO_TOKEN"))
        if token is not None and token.strip():
            metadata = (*metadata, ("authorization", f"Bearer {token.strip()}"))
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.model_id = model_id
        self._transport = Transport(
            target,
            max_message_bytes=max_message_bytes,
            credentials=credentials,
            channel_options=channel_options,
            metadata=metadata,
            wait_for_ready=wait_for_ready,
            timeout=timeout,
            max_retries=max_retries,
        )
        self._order = SubmissionOrder()
        self._parent: Connection | None = None  # the client whose connection this one shares
        # A client dropped without close(): finish what is in flight, then free the thread.
        self._finalizer = weakref.finalize(self, self._transport.close_nowait)
        self._finalizer.atexit = False

    # --- requests -------------------------------------------------------------------------

    def _check_size(self, request: Any, op: str) -> None:
        size = request.ByteSize()
        if size > self.max_message_bytes:
            raise ResourceExhaustedError(
                f"{op} request of {size} bytes is over max_message_bytes={self.max_message_bytes}; split the batch"
            )

    def _bind(self, message: Any) -> None:
        """Name this client's run in an operation's message."""
        if self.model_id and "model_id" in message.DESCRIPTOR.fields_by_name:
            message.model_id = self.model_id

    def _unary(self, method: str, request: Any, op: str, decode: Callable) -> Any:
        self._bind(request)
        self._check_size(request, op)
        return decode(self._transport.unary(method, request))

    def _send(self, request: pb.StreamRequest, op: str, decode: Callable) -> concurrent.futures.Future:
        """Put `request` on the stream now; the future of its decoded answer."""
        return self._send_with_id(request, op, decode)[1]

    def _send_with_id(
        self, request: pb.StreamRequest, op: str, decode: Callable
    ) -> tuple[str, concurrent.futures.Future]:
        self._bind(getattr(request, request.WhichOneof("op")))
        self._check_size(request, op)
        return self._transport.submit(request, op, decode)

    def _submit(self, request: pb.StreamRequest, op: str, decode: Callable) -> APIFuture:
        """Send `request` in this client's order of operations; its future at once (with its
        stream request id when it could leave at once)."""
        sent: list[str] = []

        def start() -> concurrent.futures.Future:
            request_id, future = self._send_with_id(request, op, decode)
            sent.append(request_id)
            return future

        future = self._order.submit(start)
        return APIFuture(future, sent[0] if sent else "")

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self, grace: float | None = None) -> None:
        """Stop taking requests, wait up to `grace` seconds (None: until answered) for the
        answers in flight, then close the connection. Unanswered futures fail with
        UnavailableError. Idempotent."""
        self._transport.close(grace)

    async def close_async(self, grace: float | None = None) -> None:
        """`close()` without blocking the running event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, grace)

    def _for_run(self: _Self, model_id: str) -> _Self:
        """A client of run `model_id` sharing this client's connection (and its closing)."""
        bound = copy.copy(self)
        bound.model_id = model_id
        bound._order = SubmissionOrder()  # each run has its own order of operations
        bound._parent = self  # the connection closes when its first client is collected or closed
        return bound
