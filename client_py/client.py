"""`TrainingClient`: the training operations of one cispo server, sync and async.

    client = TrainingClient("localhost:50051")
    out = client.forward_backward(data, loss_fn="cispo")          # blocks; a unary RPC
    step = client.optim_step(AdamParams(learning_rate=1e-5))

    fwd_bwd_future = await client.forward_backward_async(data=data, loss_fn="cispo")
    optim_future = await client.optim_step_async(AdamParams())    # pipelined on one Stream
    fwd_bwd_result = await fwd_bwd_future.result_async()

Operations run on the server in the order this client submits them, sync and async alike.
An `_async` method returns once its request is queued (in call order); many requests may be
in flight at once, which keeps the server busy. Failures raise `CispoError` subclasses that
carry the server's field violations.
"""

from __future__ import annotations

import asyncio
import copy
import os
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from cispo.v1 import training_pb2 as pb

from . import wire
from ._transport import Transport
from .errors import ResourceExhaustedError
from .futures import APIFuture
from .sampling_client import SamplingClient
from .types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadStateResponse,
    OptimStepResponse,
    SaveStateResponse,
    SaveWeightsForSamplerResponse,
)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "TrainingClient"]

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""The server's default request-size limit (--max-message-bytes)."""


class TrainingClient:
    """A client of one cispo server's training state.

    Thread-safe. Nothing connects until the first call; the connection and its I/O thread
    live until `close()` (or the end of a `with` / `async with` block).
    """

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
            tls = (pem(root_certificates, "CISPO_TLS_CA_FILE"), pem(private_key, "CISPO_CLIENT_KEY_FILE"),
                   pem(certificate_chain, "CISPO_CLIENT_CERT_FILE"))
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
        # A client dropped without close(): finish what is in flight, then free the thread.
        self._finalizer = weakref.finalize(self, self._transport.close_nowait)
        self._finalizer.atexit = False

    # --- requests -------------------------------------------------------------------------

    def _check_size(self, request: Any, op: str) -> None:
        size = request.ByteSize()
        if size > self.max_message_bytes:
            raise ResourceExhaustedError(
                f"{op} request of {size} bytes is over max_message_bytes={self.max_message_bytes}; "
                "split the batch"
            )

    def _bind(self, message: Any) -> None:
        """Name this client's run in an operation's message."""
        if self.model_id and "model_id" in message.DESCRIPTOR.fields_by_name:
            message.model_id = self.model_id

    def _unary(self, method: str, request: Any, op: str, decode: Callable) -> Any:
        self._bind(request)
        self._check_size(request, op)
        return decode(self._transport.unary(method, request))

    def _submit(self, request: pb.StreamRequest, op: str, decode: Callable) -> APIFuture:
        self._bind(getattr(request, request.WhichOneof("op")))
        self._check_size(request, op)
        request_id, future = self._transport.submit(request, op, decode)
        return APIFuture(future, request_id)

    @staticmethod
    def _fwd_stream_request(
        op: str, data: Iterable[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> pb.StreamRequest:
        request = pb.StreamRequest()
        wire.forward_backward_input_to_pb(data, loss_fn, loss_fn_config, out=getattr(request, op))
        return request

    @staticmethod
    def _load_request(name: str, with_optimizer: bool) -> pb.LoadStateRequest:
        return pb.LoadStateRequest(name=name, with_optimizer=with_optimizer)

    # --- sync API: unary calls --------------------------------------------------------------

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cispo",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Run the batch forward and backward through `loss_fn`; the gradient is added to the
        accumulated gradient.

        data: the batch, one Datum per sequence (lengths may differ).
        loss_fn: "cispo", "importance_sampling", "ppo" or "cross_entropy".
        loss_fn_config: loss hyper-parameters, e.g. {"clip_low_threshold": 0.0,
            "clip_high_threshold": 4.0}; unset keys take the server's defaults.
        Returns per-datum target logprobs (`loss_fn_outputs[i]["logprobs"]`, shape (N_i,))
        and batch metrics (`metrics["loss:sum"]`, ...).
        """
        request = wire.forward_backward_input_to_pb(data, loss_fn, loss_fn_config)
        return self._unary(
            "ForwardBackward", request, "forward_backward", wire.forward_backward_output_from_pb
        )

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cispo",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        """Like `forward_backward`, without the backward pass: no gradient is accumulated."""
        request = wire.forward_backward_input_to_pb(data, loss_fn, loss_fn_config)
        return self._unary("Forward", request, "forward", wire.forward_backward_output_from_pb)

    def optim_step(self, adam_params: AdamParams | None = None) -> OptimStepResponse:
        """Apply the accumulated gradient with AdamW (defaults when None), then zero it.
        Returns the pre-clip gradient norm and the step count."""
        request = pb.OptimStepRequest(adam_params=wire.adam_params_to_pb(adam_params))
        return self._unary("OptimStep", request, "optim_step", wire.optim_step_response_from_pb)

    def save_state(self, name: str) -> SaveStateResponse:
        """Save weights, optimizer state and step count under `name` (letters, digits, '.',
        '_', '-'; replaces an existing state atomically) in the server's --checkpoint-dir."""
        request = pb.SaveStateRequest(name=name)
        return self._unary("SaveState", request, "save_state", wire.save_state_response_from_pb)

    def load_state(self, name: str) -> LoadStateResponse:
        """Load the weights saved under `name` and reset the optimizer (no moments, step 0);
        the accumulated gradient is dropped. Use `load_state_with_optimizer` to resume a run.
        Raises FailedPreconditionError if there is no such state."""
        return self._unary(
            "LoadState",
            self._load_request(name, False),
            "load_state",
            wire.load_state_response_from_pb,
        )

    def load_state_with_optimizer(self, name: str) -> LoadStateResponse:
        """Load the weights and the optimizer state (moments, step count) saved under `name`."""
        return self._unary(
            "LoadState",
            self._load_request(name, True),
            "load_state",
            wire.load_state_response_from_pb,
        )

    def save_weights_for_sampler(self, name: str, merged: bool = False) -> SaveWeightsForSamplerResponse:
        """Write the current weights, and nothing else, as a directory that vLLM (`--model
        path`) and transformers load as they are, in the server's --sampler-dir (replaces an
        export of that name atomically); a LoRA run writes its PEFT adapter directory, or with
        `merged` full weights with the adapter merged in. Returns its path."""
        request = pb.SaveWeightsForSamplerRequest(name=name, merged=merged)
        return self._unary("SaveWeightsForSampler", request, "save_weights_for_sampler",
                           wire.save_weights_for_sampler_response_from_pb)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """`save_weights_for_sampler(name)`, then a SamplingClient on those weights, sharing this
        client's connection. None names the export `sampler-<random hex>`: each such call
        writes a new directory, which stays until removed from --sampler-dir."""
        saved = self.save_weights_for_sampler(name or f"sampler-{uuid.uuid4().hex[:16]}")
        return SamplingClient(self, model_path=saved.path)

    def create_sampling_client(self, model_path: str | None = None) -> SamplingClient:
        """A SamplingClient sharing this client's connection and order of operations: on the
        saved weights at `model_path`, or (None) on the training state's current weights."""
        return SamplingClient(self, model_path=model_path)

    def get_info(self) -> GetInfoResponse:
        """The model, vocabulary size, limits and loss functions with their defaults."""
        return self._unary(
            "GetInfo", pb.GetInfoRequest(), "get_info", wire.get_info_response_from_pb
        )

    # --- async API: pipelined on one Stream ---------------------------------------------------

    async def forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cispo",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Queue a `forward_backward` (see there) and return its future at once."""
        request = self._fwd_stream_request("forward_backward", data, loss_fn, loss_fn_config)
        return self._submit(request, "forward_backward", wire.forward_backward_output_from_pb)

    async def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cispo",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Queue a `forward` (see there) and return its future at once."""
        request = self._fwd_stream_request("forward", data, loss_fn, loss_fn_config)
        return self._submit(request, "forward", wire.forward_backward_output_from_pb)

    async def optim_step_async(
        self, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Queue an `optim_step` (see there) and return its future at once."""
        request = pb.StreamRequest()
        request.optim_step.SetInParent()
        wire.adam_params_to_pb(adam_params, out=request.optim_step.adam_params)
        return self._submit(request, "optim_step", wire.optim_step_response_from_pb)

    async def save_state_async(self, name: str) -> APIFuture[SaveStateResponse]:
        """Queue a `save_state` (see there) and return its future at once."""
        request = pb.StreamRequest(save_state=pb.SaveStateRequest(name=name))
        return self._submit(request, "save_state", wire.save_state_response_from_pb)

    async def load_state_async(self, name: str) -> APIFuture[LoadStateResponse]:
        """Queue a `load_state` (see there) and return its future at once."""
        request = pb.StreamRequest(load_state=self._load_request(name, False))
        return self._submit(request, "load_state", wire.load_state_response_from_pb)

    async def load_state_with_optimizer_async(self, name: str) -> APIFuture[LoadStateResponse]:
        """Queue a `load_state_with_optimizer` (see there) and return its future at once."""
        request = pb.StreamRequest(load_state=self._load_request(name, True))
        return self._submit(request, "load_state", wire.load_state_response_from_pb)

    async def save_weights_for_sampler_async(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Queue a `save_weights_for_sampler` (see there) and return its future at once."""
        request = pb.StreamRequest(save_weights_for_sampler=pb.SaveWeightsForSamplerRequest(name=name))
        return self._submit(request, "save_weights_for_sampler", wire.save_weights_for_sampler_response_from_pb)

    async def get_info_async(self) -> APIFuture[GetInfoResponse]:
        """Queue a `get_info` and return its future at once."""
        request = pb.StreamRequest()
        request.get_info.SetInParent()
        return self._submit(request, "get_info", wire.get_info_response_from_pb)

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self, grace: float | None = None) -> None:
        """Stop taking requests, wait up to `grace` seconds (None: until answered) for the
        answers in flight, then close the connection. Unanswered futures fail with
        UnavailableError. Idempotent."""
        self._transport.close(grace)

    async def close_async(self, grace: float | None = None) -> None:
        """`close()` without blocking the running event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, grace)

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving on an error: do not wait for answers nobody will read.
        self.close(grace=0 if exc_type is not None else None)

    async def __aenter__(self) -> TrainingClient:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.close_async(grace=0 if exc_type is not None else None)

    def _for_run(self, model_id: str) -> TrainingClient:
        """A client of run `model_id` sharing this client's connection (and its closing)."""
        bound = copy.copy(self)
        bound.model_id = model_id
        bound._parent = self  # the connection closes when its first client is collected or closed
        return bound

    def __repr__(self) -> str:
        return f"TrainingClient({self.target!r}, model_id={self.model_id!r})"
