"""The data plane every door calls: `Operations` (see cispo.service.operations for its API).

Every operation goes through `decode` (validate, on a codec thread, never on the event loop),
then `accept` (idempotency, then queue in its lane of the pipeline) and its answer (await the
engine, encode, record metrics, log one line), whichever door it came in by. Once accepted, an
operation is answered whatever happens to its caller: its answer is a task of this plane, which
a door awaits shielded from its own cancellation, so its idempotency key still records the result
for a retry. An answer is a response message or a google.rpc.Status; it never raises.
"""

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.rpc import status_pb2

from cispo.service.auth import current_identity
from cispo.service.errors import OperationFailed, Unavailable, clip, code_name, to_status
from cispo.service.idempotency import IdempotencyCache, check_key, fingerprint
from cispo.service.limits import RequestLimits
from cispo.service.log_limits import RateLimitedLog
from cispo.service.metrics import ServiceMetrics
from cispo.service.operation import Backend, Call, Operation, Prepared, Req, Resp
from cispo.service.operations import model_id_of
from cispo.service.pipeline import OperationPipeline
from cispo.service.versions import CONNECTION, RunVersions, take_expected
from cispo.worker.protocols import RunRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Threads that parse, validate and encode (they hold the GIL in turns with the event loop).
CODEC_THREADS = 2


@dataclass(frozen=True)
class Decoded:
    """One request, validated: its operation's name ("none" when a body names none) and either
    what to queue or why it was refused."""

    op: str
    request_id: str = ""  # the client's tag of a Stream request
    prepared: Prepared | None = None
    error: Exception | None = None
    idempotency_key: str = ""
    fingerprint: bytes = b""
    lane: str | None = None  # the run's id; None for operations on the set of runs


@dataclass(frozen=True)
class BaseModel:
    """The served base model, as a door describes it."""

    name: str  # the name it is served under (GetInfo.base_model)
    architecture: str  # the Hugging Face model_type, e.g. "qwen2"
    tokenizer_id: str | None  # what loads its tokenizer; None when it has none


class Operations:
    """The operations of one server over its training runs, for every door."""

    def __init__(
        self,
        runs: RunRegistry,
        pipeline: OperationPipeline,
        metrics: ServiceMetrics,
        limits: RequestLimits,
        world_size: int = 1,
        idempotency: IdempotencyCache | None = None,
        base_model: str = "",
    ):
        """`base_model`: the name the served model goes by (default: the name it was loaded by)."""
        info = runs.base_info()
        name = base_model or info.model_name
        self._base = BaseModel(name, info.architecture, info.model_name if info.has_tokenizer else None)
        self.limits = limits
        self._pipeline = pipeline
        self._metrics = metrics
        metrics.track_runs(runs)
        self._idempotency = idempotency or IdempotencyCache()
        self.backend = Backend(
            runs, metrics, limits, RunVersions(runs), name, frozenset({name, info.model_name}), world_size
        )
        self.draining = asyncio.Event()
        self._runs = runs
        self._codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="cispo-codec")
        self._answers: set[asyncio.Task] = set()  # owned: the loop holds tasks weakly
        self._rejections = RateLimitedLog(log, period_seconds=10.0)

    def close(self) -> None:
        self._codec.shutdown(wait=False, cancel_futures=True)

    def base_model(self) -> BaseModel:
        return self._base

    # -- the API of the doors --------------------------------------------------------------------

    async def call(self, op: Operation[Req, Resp], request: Req) -> Resp:
        """Run `op` now and wait for its response; OperationFailed (with its Status) if it fails."""
        decoded = await self.prepare(op, request)
        answer = await asyncio.shield(await self.accept(decoded, time.perf_counter()))
        if isinstance(answer, status_pb2.Status):
            raise OperationFailed(answer)
        return answer

    async def prepare(self, op: Operation, request: Message) -> Decoded:
        """Validate `request` of `op` on a codec thread, in the caller's context (its identity);
        nothing is queued. A Decoded with `error` set for a bad request."""
        return await self.on_codec(lambda: self.decode(op, request))

    async def accept(self, decoded: Decoded, started: float, promised: bool = False) -> asyncio.Future:
        """Queue a decoded operation in its lane (or replay it by its idempotency key); the
        future of its answer, a response message or a google.rpc.Status, which never raises.
        `started`: time.perf_counter() when the request arrived. `promised`: its client was
        already told it is accepted (an HTTP request id), so it is queued even while draining."""
        loop = asyncio.get_running_loop()
        op, identity = decoded.op, current_identity()
        self._metrics.inflight.inc()
        placeholder = None
        try:
            prepared = decoded.prepared
            if prepared is None:
                raise decoded.error or AssertionError("a Decoded with neither an operation nor an error")
            if self.draining.is_set() and not promised:
                raise Unavailable("server is draining and accepts no new operations")
            if decoded.idempotency_key:
                earlier = self._idempotency.lookup(identity, decoded.idempotency_key, decoded.fingerprint)
                if earlier is not None:
                    return self._own(self._replay(op, earlier, started))
                placeholder = loop.create_future()
                self._idempotency.remember(identity, decoded.idempotency_key, decoded.fingerprint, placeholder)
            engine_future = await self._pipeline.submit(prepared.call, decoded.lane)
        except BaseException as exc:
            if placeholder is not None:
                placeholder.set_result(to_status(Unavailable("the operation was not accepted")))
            if not isinstance(exc, Exception):  # cancelled before it was accepted: nothing to answer
                self._metrics.inflight.dec()
                raise
            done = loop.create_future()
            done.set_result(self._failed(op, exc, started))
            return done
        self._observe_queue()
        answer = self._own(self._answer(op, engine_future, prepared.encode, started, identity, decoded.lane))
        if placeholder is not None:
            answer.add_done_callback(lambda settled: placeholder.set_result(settled.result()))
        return answer

    async def check_export(self, path: str) -> None:
        """Raise the worker's InvalidInput or StateNotFound (as for a missing export) unless the
        caller's identity may read the saved sampler weights `path` (a name, or a path their save
        answered); on a codec thread, at once, not in any run's order."""
        owner = current_identity()
        await asyncio.get_running_loop().run_in_executor(self._codec, self._runs.check_export, path, owner)

    # -- for doors that decode bytes themselves (gRPC) -------------------------------------------

    async def on_codec(self, fn: Callable[[], T]) -> T:
        """`fn()` on a codec thread, in this call's context (its identity, its connection)."""
        return await asyncio.get_running_loop().run_in_executor(self._codec, contextvars.copy_context().run, fn)

    def decode(self, op: Operation, request: Message, request_id: str = "") -> Decoded:
        """Validate `request` of `op` here and now (on a codec thread); never raises. Its
        handler finds its run only when it executes, in its lane, so it sees every earlier
        CreateModel and UnloadModel."""
        try:
            key = getattr(request, "idempotency_key", "") if op.keyed else ""
            check_key(key)
            expected = take_expected(request)  # before the fingerprint: a retry may expect another version
            digest = fingerprint(op.name, request) if key else b""
            call = Call(self.backend, op.name, current_identity(), model_id_of(request), expected, CONNECTION.get())
            prepared = op.handler(call, request)
        except Exception as exc:
            return Decoded(op.name, request_id, error=exc)
        return Decoded(op.name, request_id, prepared, None, key, digest, call.lane if op.per_run else None)

    # -- the answer of an accepted operation ----------------------------------------------------

    def _own(self, answer: Any) -> asyncio.Task:
        task = asyncio.ensure_future(answer)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)
        return task

    async def _answer(
        self,
        op: str,
        engine_future: asyncio.Future,
        encode: Callable[[Any], tuple[Message, dict[str, object]]],
        started: float,
        identity: str | None,
        lane: str | None,
    ) -> Message:  # the response, or a google.rpc.Status
        try:
            result = await engine_future
            response, fields = await asyncio.get_running_loop().run_in_executor(self._codec, encode, result)
        except Exception as exc:
            return self._failed(op, exc, started)
        self._succeeded(op, started, identity, {"run": lane or "-", **fields})
        return response

    async def _replay(
        self, op: str, earlier: asyncio.Future, started: float
    ) -> Message:  # the response, or a google.rpc.Status
        """The answer of an earlier request with the same idempotency key."""
        answer = await asyncio.shield(earlier)
        if isinstance(answer, status_pb2.Status):
            self._metrics.inflight.dec()
            self._metrics.operation_errors.labels(op, code_name(answer)).inc()
            return answer
        self._succeeded(op, started, current_identity(), {"replayed": True})
        return answer

    def _succeeded(self, op: str, started: float, identity: str | None, fields: dict[str, object]) -> None:
        seconds = time.perf_counter() - started
        self._observe_queue()
        self._metrics.inflight.dec()
        self._metrics.request_seconds.labels(op).observe(seconds)
        fields = {"op": op, "identity": identity or "-", "seconds": round(seconds, 4), **fields}
        log.info(" ".join(f"{k}={_short(v)}" for k, v in fields.items()), extra={"fields": fields})

    def _observe_queue(self) -> None:
        self._metrics.queue_depth.set(self._pipeline.depth)
        self._metrics.sampler_queue_depth.set(self._pipeline.batchable_depth)

    def _failed(self, op: str, exc: Exception, started: float) -> status_pb2.Status:
        status = to_status(exc)
        self._metrics.inflight.dec()
        self._metrics.operation_errors.labels(op, code_name(status)).inc()
        self._metrics.request_seconds.labels(op).observe(time.perf_counter() - started)
        who = f"op={op} identity={current_identity() or '-'} code={code_name(status)}"  # a line per period each
        self._rejections.log(who, "%s: %s", who, clip(status.message, 200))
        return status


def _short(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
