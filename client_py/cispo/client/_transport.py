"""The connection: a private event-loop thread that owns the grpc.aio channel.

Why a thread of its own: a grpc.aio channel belongs to the event loop it was made in. Owning
the loop lets the client work the same from plain sync code, from inside any user event loop
(or several, e.g. one `asyncio.run` after another), and from several threads, and lets
`APIFuture.result()` block even on a thread that runs an event loop without deadlocking it.
The user's loop only ever waits on `concurrent.futures.Future`s (via `asyncio.wrap_future`).

Two paths, both over the one channel:
  * `submit`: an operation on the long-lived bidirectional `Stream`. It is given the next
    request id and queued in call order (call order = server execution order); a writer task
    writes the queue to the stream and a reader task resolves the pending futures as answers
    arrive; the transport holds both until they end. If the stream breaks, every pending future
    fails with UnavailableError, and the next submit opens a new stream.
  * `unary`: a blocking unary call. It first waits until every operation submitted earlier
    has been answered, so unary calls also run in call order.

Retries. Every mutating request carries an idempotency key (set by the client), so resending it
is safe: the server answers a key it has seen with the original answer and runs nothing twice.
A unary call that fails with UNAVAILABLE is resent; when a stream breaks with UNAVAILABLE (a
lost connection, a server that drains), its unanswered requests are resent in their order on a
new stream, ahead of any request submitted meanwhile. Each request is resent at most
`max_retries` times, with exponential backoff.

Run versions. The transport learns each run's incarnation from the first answer that carries it
and makes every later request on the run expect it, resent ones included, so a request that
reaches a server whose run began again (after a restart) is refused with AbortedError, which is
not retried, instead of being applied to a state its client never saw.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc as pb_grpc

from .errors import (
    CispoError,
    UnavailableError,
    error_for_code,
    error_from_rpc_error,
    error_from_status,
)

logger = logging.getLogger(__name__)

_END_OF_REQUESTS = object()  # queued to half-close a stream
# Operations that get an idempotency key. A sample changes nothing, so a resent one simply runs
# again, and its answers (they can be large) do not crowd training operations out of the
# server's memory of keys.
_KEYED_OPS = ("forward", "forward_backward", "optim_step", "save_state", "load_state", "save_weights_for_sampler")
# Codes that end a stream without the server having judged its requests.
_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_LIVE: weakref.WeakSet = weakref.WeakSet()  # transports to close at interpreter exit


def set_idempotency_key(message: Any) -> None:
    """Give a mutating request message a fresh idempotency key (unless it has one)."""
    if "idempotency_key" in message.DESCRIPTOR.fields_by_name and not message.idempotency_key:
        message.idempotency_key = uuid.uuid4().hex


class _Incarnations:
    """The incarnation of each run (by the model_id requests name) learned from answers: from
    the first answer that carries one, never replaced, so a client whose run began again keeps
    being refused rather than going on as if nothing happened. On the I/O loop only."""

    def __init__(self) -> None:
        self._by_run: dict[str, str] = {}

    def stamp(self, message: Any) -> None:
        """Make a request on a run expect the run's incarnation, once it is known (not a
        sample of saved weights, which reads no run)."""
        if (
            "expected_version" in message.DESCRIPTOR.fields_by_name
            and not message.HasField("expected_version")
            and not getattr(message, "model_path", "")
            and message.model_id in self._by_run
        ):
            message.expected_version.incarnation = self._by_run[message.model_id]

    def learn(self, request: Any, answer: Any) -> None:
        """Learn from the answer to `request` (a CreateModel's: of the run it made)."""
        if isinstance(answer, pb.CreateModelResponse):
            model_id, answer = answer.model_id, answer.info
        else:
            model_id = getattr(request, "model_id", "")
        if "version" in answer.DESCRIPTOR.fields_by_name and answer.version.incarnation:
            self._by_run.setdefault(model_id, answer.version.incarnation)


def backoff_seconds(attempt: int) -> float:
    """Wait before the `attempt`-th resend (1-based): 0.2 s, doubling, at most 5 s."""
    return min(0.2 * 2 ** (attempt - 1), 5.0)


class _Pending:
    """A submitted stream request awaiting its answer."""

    __slots__ = ("attempts", "decode", "expected", "future", "request")

    def __init__(
        self, future: concurrent.futures.Future, expected: str, decode: Callable, request: pb.StreamRequest
    ) -> None:
        self.future = future  # RUNNING concurrent future handed to the caller
        self.expected = expected  # the StreamResponse.result field the answer must carry
        self.decode = decode  # that field's message -> client type
        self.request = request  # to resend it, key and all
        self.attempts = 0  # times resent

    def resolve(self, response: pb.StreamResponse) -> None:
        which = response.WhichOneof("result")
        try:
            if which == "error":
                raise error_from_status(response.error)
            if which != self.expected:
                raise CispoError(
                    f"protocol error: answer to request {response.request_id!r} carries "
                    f"{which!r}, expected {self.expected!r}",
                    code=grpc.StatusCode.INTERNAL,
                )
            value = self.decode(getattr(response, which))
        except Exception as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _StreamSession:
    """One `Stream` call: the queue of requests to write and the requests awaiting answers.

    Lives on the I/O loop; no locking needed.
    """

    def __init__(
        self,
        stub: pb_grpc.TrainingServiceStub,
        call_kwargs: dict,
        target: str,
        on_broken: Callable[[list[_Pending], grpc.StatusCode, str], None],
        incarnations: _Incarnations,
    ) -> None:
        self.target = target
        self.on_broken = on_broken  # gets the unanswered requests when the call ends
        self.incarnations = incarnations
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: dict[str, _Pending] = {}  # insertion order = request order
        self.broken = False  # the call has ended; no more answers will come
        self.half_closed = False  # no more requests will be written
        self.closing = False  # the client is closing (for the failure message)
        self.idle = asyncio.Event()  # set while nothing is pending
        self.idle.set()
        # Written and read by tasks of our own, not through a request iterator: gRPC's task that
        # drains an iterator is left waiting on the queue when the call breaks, and collected
        # with the generator mid-step ("aclose(): asynchronous generator is already running").
        self.call = stub.Stream(**call_kwargs)
        loop = asyncio.get_running_loop()
        self.writer = loop.create_task(self._write())
        self.reader = loop.create_task(self._read())

    async def _write(self) -> None:
        """Write the queued requests in order until the end-of-requests mark, then half-close."""
        try:
            while (request := await self.queue.get()) is not _END_OF_REQUESTS:
                await self.call.write(request)
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended; the reader reports why

    def add(self, request: pb.StreamRequest, pending: _Pending) -> None:
        self.pending[request.request_id] = pending
        self.idle.clear()
        self.queue.put_nowait(request)

    def half_close(self) -> None:
        if not self.half_closed:
            self.half_closed = True
            self.queue.put_nowait(_END_OF_REQUESTS)

    async def _read(self) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the server ended the stream"
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                pending = self.pending.pop(response.request_id, None)
                if pending is None:
                    logger.warning("answer to unknown request id %r ignored", response.request_id)
                    continue
                if response.WhichOneof("result") not in (None, "error"):
                    self.incarnations.learn(
                        getattr(pending.request, pending.request.WhichOneof("op")),
                        getattr(response, response.WhichOneof("result")),
                    )
                pending.resolve(response)
                if not self.pending:
                    self.idle.set()
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, "the stream was cancelled"
        except Exception as exc:  # a bug or a decoding failure: end this stream, keep the client
            logger.exception("stream reader failed")
            code, details = grpc.StatusCode.INTERNAL, f"stream reader failed: {exc!r}"
        finally:
            self.broken = True
            self.call.cancel()  # a no-op unless the reader failed on a live call
            self.half_close()  # ends the writer
            unanswered, self.pending = self.pending, {}
            if unanswered and not self.closing:
                self.on_broken(list(unanswered.values()), code, details)
            else:
                for item in unanswered.values():
                    item.fail(self.failure(code, details))
            self.idle.set()

    def failure(self, code: grpc.StatusCode, details: str) -> CispoError:
        if self.closing:
            return UnavailableError(
                "the client was closed before the answer arrived; the operation may or may not have run"
            )
        if code in _BROKEN:
            return UnavailableError(
                f"stream to {self.target} broke before the answer arrived ({code.name}: {details}); "
                "the operation may or may not have run"
            )
        # The server refused the whole call (e.g. UNAUTHENTICATED, or a message over its limit).
        return error_for_code(code, f"stream to {self.target} ended ({code.name}: {details})")


class Transport:
    """One channel to the server, on a private I/O thread started on first use."""

    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        wait_for_ready: bool = False,
        timeout: float | None = None,
        max_retries: int = 5,
    ) -> None:
        self.target = target
        self.max_retries = max_retries
        self.max_message_bytes = max_message_bytes
        self._credentials = credentials
        self._channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options,
        ]
        self._call_kwargs = {"metadata": tuple(metadata) or None, "wait_for_ready": wait_for_ready}
        self._timeout = timeout
        self._lock = threading.Lock()  # guards the fields below
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        self._inflight: set[concurrent.futures.Future] = set()
        self._closed = False
        # Touched on the I/O loop only:
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TrainingServiceStub | None = None
        self._session: _StreamSession | None = None
        self._held: list[tuple[pb.StreamRequest, _Pending]] | None = None  # submitted while resending
        self._tasks: set[asyncio.Task] = set()  # every stream's reader and writer, until done
        self._incarnations = _Incarnations()
        _LIVE.add(self)

    # --- lifecycle ------------------------------------------------------------------------

    def _start_locked(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError("the TrainingClient is closed")
        if self._loop is None:
            ready = threading.Event()
            failure: list[BaseException] = []
            thread = threading.Thread(target=self._run, args=(ready, failure), name="cispo-client-io", daemon=True)
            thread.start()
            ready.wait()
            if failure:
                raise failure[0]
            self._thread = thread
        if self._loop is None:  # _run sets it before `ready`, or reports a failure
            raise RuntimeError("the client's I/O loop did not start")
        return self._loop

    def _run(self, ready: threading.Event, failure: list) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open_channel())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            loop.close()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open_channel(self) -> None:
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._channel_options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._channel_options)
        self._stub = pb_grpc.TrainingServiceStub(self._channel)

    def _on_io_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def close(self, grace: float | None = None) -> None:
        """Half-close the stream, wait up to `grace` seconds (None: until all are answered)
        for the answers in flight, fail the rest, close the channel and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._on_io_thread():
            raise RuntimeError("close() called from a future's callback")
        asyncio.run_coroutine_threadsafe(self._aclose(grace), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    def close_nowait(self) -> None:
        """Close like `close(None)` in the background, without waiting (for finalizers)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shut_down() -> None:
            try:
                await self._aclose(None)
            finally:
                loop.stop()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            asyncio.run_coroutine_threadsafe(shut_down(), loop)

    async def _aclose(self, grace: float | None) -> None:
        self._resend_held()  # fails what waits to be resent: the client is closed
        session = self._session
        if session is not None and not session.broken:
            session.half_close()
            if grace is None or grace > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(session.idle.wait(), grace)
            session.closing = True
        if self._channel is not None:
            await self._channel.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- stream ---------------------------------------------------------------------------

    def submit(
        self, request: pb.StreamRequest, expected: str, decode: Callable
    ) -> tuple[str, concurrent.futures.Future]:
        """Queue `request` on the stream in call order; its future gets `decode(answer)`.

        `expected` is the StreamResponse.result field of a successful answer.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        op = request.WhichOneof("op")
        if op in _KEYED_OPS:
            set_idempotency_key(getattr(request, op))
        with self._lock:
            loop = self._start_locked()
            self._next_id += 1
            request.request_id = str(self._next_id)
            self._inflight.add(future)
            loop.call_soon_threadsafe(self._enqueue, request, _Pending(future, expected, decode, request))
        future.add_done_callback(self._forget)
        return request.request_id, future

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._inflight.discard(future)

    def _enqueue(self, request: pb.StreamRequest, pending: _Pending) -> None:
        """On the I/O loop, in call order: put the request on the current stream (or hold it
        while earlier requests wait to be resent)."""
        if self._held is not None:
            self._held.append((request, pending))
            return
        session = self._session
        if session is None or session.broken or session.half_closed:
            try:
                if self._stub is None:  # connected before the first request; else fails as unreachable
                    raise RuntimeError("no channel")
                session = self._session = _StreamSession(
                    self._stub, self._call_kwargs, self.target, self._on_broken, self._incarnations
                )
            except Exception as exc:
                pending.fail(UnavailableError(f"cannot open a stream to {self.target}: {exc!r}"))
                return
            for task in (session.writer, session.reader):
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._incarnations.stamp(getattr(request, request.WhichOneof("op")))
        session.add(request, pending)

    def _on_broken(self, unanswered: list[_Pending], code: grpc.StatusCode, details: str) -> None:
        """On the I/O loop: a stream ended with requests unanswered. Resend them, in order and
        before anything submitted meanwhile, if the failure is transient; else fail them."""
        session = self._session
        retry = code == grpc.StatusCode.UNAVAILABLE and not self._closed
        resend = [item for item in unanswered if retry and item.attempts < self.max_retries]
        for item in unanswered:
            if item not in resend:
                item.fail(session.failure(code, details) if session else UnavailableError(details))
        if not resend:
            return
        for item in resend:
            item.attempts += 1
        attempt = max(item.attempts for item in resend)
        logger.info(
            "stream to %s broke (%s: %s); resending %d requests (attempt %d)",
            self.target,
            code.name,
            details,
            len(resend),
            attempt,
        )
        self._held = [(item.request, item) for item in resend]
        asyncio.get_running_loop().call_later(backoff_seconds(attempt), self._resend_held)

    def _resend_held(self) -> None:
        held, self._held = self._held, None
        for request, item in held or ():
            if self._closed:
                item.fail(UnavailableError("the client was closed before the request could be resent"))
            else:
                self._enqueue(request, item)

    # --- unary ----------------------------------------------------------------------------

    def unary(self, method: str, request: Any) -> Any:
        """Call the unary `method` (e.g. "ForwardBackward") and return the response message,
        after every earlier submitted operation has been answered. Resent on UNAVAILABLE (with
        an idempotency key). Raises CispoError."""
        set_idempotency_key(request)
        with self._lock:
            loop = self._start_locked()
            earlier = list(self._inflight)
        if self._on_io_thread():
            raise RuntimeError("a blocking call was made from a future's callback")
        if earlier:
            concurrent.futures.wait(earlier)
        return asyncio.run_coroutine_threadsafe(self._unary(method, request), loop).result()

    async def _unary(self, method: str, request: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            self._incarnations.stamp(request)
            try:
                response = await getattr(self._stub, method)(request, timeout=self._timeout, **self._call_kwargs)
                self._incarnations.learn(request, response)
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.max_retries or self._closed:
                    raise error_from_rpc_error(exc) from None
                logger.info(
                    "%s to %s failed (%s); resending (attempt %d)", method, self.target, exc.details(), attempt + 1
                )
                await asyncio.sleep(backoff_seconds(attempt + 1))


@atexit.register
def _close_at_exit() -> None:
    """Close every open client before the interpreter tears down (waiting a little for answers
    in flight), so no I/O task is left pending and reported destroyed."""
    for transport in list(_LIVE):
        transport.close(grace=5.0)
