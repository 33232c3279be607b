"""cispo.v1.TrainingService, the gRPC door: bytes in, the operations layer, messages out.

Its unary methods are generated from the operations table (cispo.service.operations), and Stream
dispatches each request by its oneof through the same table; the data plane
(cispo.service.data_plane.Operations) validates, orders, keeps idempotency keys, counts and logs.

Requests arrive as bytes (the handlers' deserializer is the identity), so that everything that
can go wrong with a body is answered here, as a Status, and not by gRPC with UNKNOWN: a body
that does not parse is INVALID_ARGUMENT naming its message type, a body over the message limit
is RESOURCE_EXHAUSTED, and on a Stream either gets an error answer of its own while the stream
goes on. Parsing, validation and encoding run on the plane's codec threads, never on the event
loop, so a pathological request cannot stall health checks, metrics or other clients.
"""

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from cispo.service import convert
from cispo.service.data_plane import Decoded, Operations
from cispo.service.errors import clip
from cispo.service.operation import Operation
from cispo.service.operations import OPERATIONS
from cispo.service.versions import CONNECTION
from cispo.v1 import training_pb2 as pb
from cispo.worker import FieldViolation, InvalidInput, LimitExceeded

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Answers a stream keeps in flight before it stops reading (bounds per-stream memory).
STREAM_WINDOW = 64
# gRPC method -> operation: every operation has its unary method.
UNARY_METHODS: dict[str, Operation] = {op.method: op for op in OPERATIONS.values()}
# What a stream's reader ended on: the stream's end, a broken stream, or the server draining.
EOF, BROKEN, DRAINING = "eof", "broken", "draining"


class TrainingServicer:
    """The gRPC door over one server's operations."""

    def __init__(self, operations: Operations):
        self.operations = operations
        self._readers: set[asyncio.Task] = set()  # owned until done: the loop holds tasks weakly

    # -- unary ----------------------------------------------------------------------------------

    def unary_behavior(self, op: Operation) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        """The handler of `op`'s unary method: the answer, or its Status set on the call."""
        operations = self.operations

        async def behavior(body: bytes, context: grpc.aio.ServicerContext) -> Message | None:
            started = time.perf_counter()
            CONNECTION.set(context.peer())
            decoded = await operations.on_codec(lambda: self._decode_unary(op, body))
            answer = await asyncio.shield(await operations.accept(decoded, started))
            if isinstance(answer, status_pb2.Status):
                # Set, not raised with abort_with_status: grpc.aio keeps an abort's exception on
                # the call, and its traceback holds this frame (and so `body`) in a reference
                # cycle that a rare full collection alone frees.
                status = rpc_status.to_status(answer)
                context.set_code(status.code)
                context.set_details(status.details)
                context.set_trailing_metadata(status.trailing_metadata)
                return None
            return answer

        return behavior

    # -- stream ---------------------------------------------------------------------------------

    async def stream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        CONNECTION.set(context.peer())
        answers: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(request_iterator, answers))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        answered = 0
        try:
            while (item := await answers.get()) is not None:
                request_id, op, pending = item
                answer = await asyncio.shield(pending)
                if isinstance(answer, status_pb2.Status):
                    yield pb.StreamResponse(request_id=request_id, error=answer)
                else:
                    yield pb.StreamResponse(request_id=request_id, **{op: answer})
                answered += 1
            if reader.result() == DRAINING:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"server is draining: {answered} requests of this stream were answered, "
                    "later ones were not accepted",
                )
        finally:
            reader.cancel()

    async def _read_stream(self, request_iterator: AsyncIterator[bytes], answers: asyncio.Queue) -> str:
        """Accept requests in order until the stream ends (EOF), breaks (BROKEN) or the server
        drains (DRAINING). Every accepted request's answer is queued before this ends."""
        operations = self.operations
        requests = request_iterator.__aiter__()
        drained = asyncio.ensure_future(operations.draining.wait())
        next_request: asyncio.Future | None = None
        cancelled = False
        try:
            while True:
                next_request = asyncio.ensure_future(requests.__anext__())
                next_request.add_done_callback(_retrieve)  # it may end unawaited when the call does
                await asyncio.wait({next_request, drained}, return_when=asyncio.FIRST_COMPLETED)
                if operations.draining.is_set():  # a request read now is not accepted: the client retries it
                    return DRAINING
                try:
                    body = next_request.result()
                except StopAsyncIteration:
                    return EOF
                except Exception:
                    return BROKEN
                started = time.perf_counter()
                decoded = await operations.on_codec(functools.partial(self._decode_stream_item, body))
                if operations.draining.is_set():
                    return DRAINING
                pending = await operations.accept(decoded, started)
                await answers.put((decoded.request_id, decoded.op, pending))
        except asyncio.CancelledError:  # the call is over: no one reads `answers` any more
            cancelled = True
            raise
        finally:
            drained.cancel()
            if next_request is not None:
                next_request.cancel()
            if not cancelled:
                await answers.put(None)

    # -- decoding (on the codec threads) ---------------------------------------------------------

    def _decode_unary(self, op: Operation, body: bytes) -> Decoded:
        try:
            self._check_size(op.request, body)
            request = parse_body(op.request, body)
        except Exception as exc:
            return Decoded(op.name, error=exc)
        decoded = self.operations.decode(op, request)
        if isinstance(decoded.error, DecodeError):  # a datum the lazy parse kept as bytes does not parse
            return replace(decoded, error=_parse_error(op.request, body))
        return decoded

    def _decode_stream_item(self, body: bytes) -> Decoded:
        try:
            request = parse_body(pb.StreamRequest, body)
        except Exception as exc:
            return Decoded("none", error=exc)
        name = request.WhichOneof("op")
        try:
            self._check_size(pb.StreamRequest, body)  # after parsing, to answer with its request_id
            if name is None:
                raise InvalidInput([FieldViolation("op", "set exactly one operation")])
        except Exception as exc:
            return Decoded(name or "none", request.request_id, error=exc)
        decoded = self.operations.decode(OPERATIONS[name], getattr(request, name), request.request_id)
        if isinstance(decoded.error, DecodeError):  # as if the body had not parsed
            return Decoded("none", error=_parse_error(pb.StreamRequest, body))
        return decoded

    def _check_size(self, message_type: type[Message], body: bytes) -> None:
        limit = self.operations.limits.max_message_bytes
        if len(body) > limit:
            raise LimitExceeded(
                "max_message_bytes",
                f"{message_type.DESCRIPTOR.full_name} of {len(body)} bytes is over the limit max_message_bytes={limit}",
            )


def parse_body(message_type: type[Message], body: bytes, lazy: bool = True) -> Any:
    """`body` as a `message_type` (its lazy form, if it has one: see convert.LAZY)."""
    # The lazy form is a type made at run time: the type checker knows it as `type` only.
    form: Any = convert.LAZY.get(message_type, message_type) if lazy else message_type
    try:
        return form.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidInput(
            [
                FieldViolation(
                    "body",
                    f"is not a valid {message_type.DESCRIPTOR.full_name} message "
                    f"({len(body)} bytes: {clip(str(exc), 80)})",
                )
            ]
        ) from None


def _parse_error(message_type: type[Message], body: bytes) -> InvalidInput:
    """Why `body` does not parse in full (a datum in it does not)."""
    try:
        parse_body(message_type, body, lazy=False)
    except InvalidInput as exc:
        return exc
    raise AssertionError("a datum that does not parse in a body that does")


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's exception as seen (asyncio logs unseen ones as errors)."""
    if not future.cancelled():
        future.exception()


def _identity(body: bytes) -> bytes:
    return body


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def add_training_service(servicer: TrainingServicer, server: grpc.aio.Server) -> None:
    """Register the TrainingService on `server`, with bodies handed over as bytes."""
    handlers: dict[str, grpc.RpcMethodHandler] = {
        method: grpc.unary_unary_rpc_method_handler(
            servicer.unary_behavior(op), request_deserializer=_identity, response_serializer=_serialize
        )
        for method, op in UNARY_METHODS.items()
    }
    handlers["Stream"] = grpc.stream_stream_rpc_method_handler(
        servicer.stream, request_deserializer=_identity, response_serializer=_serialize
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
