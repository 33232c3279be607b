"""The Tinker HTTP API (as the tinker SDK 0.38 speaks it) on the server's own runs: `--http-port`.

    TINKER_BASE_URL=http://host:8000 TINKER_API_KEY=tml-<token> python my_tinker_loop.py

Every operation goes through the same servicer as gRPC (`TrainingServicer.prepare`, then
`.accept`): the same validation, runs, pipeline lanes, idempotency (X-Idempotency-Key) and
metrics. What this module adds is Tinker's shape of it:

- sessions, and Tinker's model ids (`<session>:train:<n>`) mapped to cispo runs;
- futures: a submit answers `{request_id}` at once; `retrieve_future` long-polls for the result
  (JSON, or protobuf for forward/backward and samples) and answers "try_again" within
  POLL_SECONDS, well inside the SDK's 45 s poll timeout;
- order: a model's requests start in `seq_id` order whatever order they arrive in, so chunks the
  SDK sends in parallel accumulate into one gradient;
- checkpoint paths `tinker://<run>/weights/<name>` and `tinker://<run>/sampler_weights/<name>`,
  stored as the cispo state or export `<run>.<name>` (names are per run, as Tinker's are);
- sampling sessions over saved sampler weights.

Errors: a request the servicer refuses is answered at once with an HTTP status the SDK
understands (400 BadRequestError for bad input, with cispo's field violations in the message;
429 for capacity, which the SDK backs off from); an operation that fails later is a future
error (`category` "user" or "server"). Tinker's hosted-platform routes answer 400 "not
supported"; unknown routes 404, both with a JSON error.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
import zstandard
from google.rpc import code_pb2, error_details_pb2, status_pb2
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cispo.service import tinker_wire as wire
from cispo.service.auth import TokenAuthInterceptor, current_identity, set_identity
from cispo.service.errors import clip, to_status
from cispo.service.http_guard import ConnectionLimits, RateLimitedFilter, guarded_protocol, quiet_descriptor_exhaustion
from cispo.service.limits import RequestLimits
from cispo.service.log_limits import RateLimitedLog
from cispo.service.servicer import TrainingServicer
from cispo.v1 import training_pb2 as pb
from cispo.worker import FieldViolation, InvalidInput, LimitExceeded, checkpoint
from cispo.worker.errors import StateNotFound

log = logging.getLogger(__name__)

POLL_SECONDS = 20.0
"""Longest wait of one retrieve_future before it answers try_again."""
SEQ_GAP_SECONDS = 300.0
"""How long a request waits for an earlier seq_id of its model before it fails."""
KEPT_FUTURES = 8192
"""Answered futures remembered for retrieval (the oldest retrieved ones go first)."""
RETRIEVE_GRACE_SECONDS = 5.0
"""On a drain, how long answered requests wait for their clients' retrieve_future."""
PROTOBUF = "application/x-protobuf"
MODEL_ID = re.compile(r"(session-[0-9a-f]{16}):train:\d+")
"""The model ids create_session and _register make (see TinkerFront._model_named)."""
KEPT_EPHEMERAL = 4
"""Exports of save_weights_and_get_sampling_client kept per model: an older one is deleted (with
its sampling sessions) when a newer one is made, and all of a session's when it finishes."""
MAX_CHUNK_DATA = 1024
"""Most datums of one forward_backward chunk the SDK sends (Tinker's own default)."""
HOSTED_ONLY = (
    "create_custom_loss",
    "copy_weights",
    "save_weights_external",
    "auth/token",
    "retrieve_futures",
    "join_sampling_session",
    "cancel_future",
)
"""Routes of Tinker's hosted platform (or of features the SDK uses only when the server's client
config turns them on, which this one does not)."""
SUBMITS = (
    "create_session",
    "create_model",
    "forward_backward",
    "optim_step",
    "save_weights",
    "load_weights",
    "save_weights_for_sampler",
    "create_sampling_session",
    "asample",
)
"""Routes that start new work: refused (503) while the server drains."""


class HttpError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def _status_http(status: status_pb2.Status) -> int:
    """The HTTP status of a refused submit, chosen for the SDK's retry rules: only capacity
    (429) and unavailability (503) are retried."""
    if status.code == code_pb2.RESOURCE_EXHAUSTED:
        for detail in status.details:
            quota = error_details_pb2.QuotaFailure()
            if detail.Unpack(quota) and any(v.subject == "max_runs" for v in quota.violations):
                return 429
        return 413
    return {
        code_pb2.INVALID_ARGUMENT: 400,
        code_pb2.FAILED_PRECONDITION: 422,
        code_pb2.NOT_FOUND: 404,
        code_pb2.PERMISSION_DENIED: 403,
        code_pb2.UNAUTHENTICATED: 401,
        code_pb2.UNAVAILABLE: 503,
    }.get(status.code, 500)


def _status_body(status: status_pb2.Status) -> dict:
    body: dict[str, Any] = {"error": status.message, "code": code_pb2.Code.Name(status.code)}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            body["field_violations"] = [{"field": v.field, "description": v.description} for v in bad.field_violations]
    return body


# --- futures ------------------------------------------------------------------------------------


@dataclass
class _Future:
    owner: str | None
    answer: asyncio.Future  # -> Response
    started: bool = False
    retrieved: bool = False


class FutureTable:
    """Answers by request id, for `retrieve_future`; bounded (KEPT_FUTURES answered ones)."""

    def __init__(self) -> None:
        self._futures: OrderedDict[str, _Future] = OrderedDict()
        self._ids = itertools.count(1)

    def new(self) -> tuple[str, asyncio.Future]:
        request_id = f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        answer = asyncio.get_running_loop().create_future()
        self._futures[request_id] = _Future(current_identity(), answer)
        self._evict()
        return request_id, answer

    def started(self, request_id: str) -> None:
        self._futures[request_id].started = True

    def unanswered(self) -> int:
        return sum(not f.answer.done() for f in self._futures.values())

    def unretrieved(self) -> int:
        return sum(not f.retrieved for f in self._futures.values())

    def abandon(self) -> list[str]:
        """Answer every request that has not started 410 (the SDK submits it again); their ids."""
        abandoned = [k for k, f in self._futures.items() if not f.started and not f.answer.done()]
        for request_id in abandoned:
            self._futures[request_id].answer.set_result(
                JSONResponse(
                    {
                        "error": "the server restarted before this request started; it was not applied: submit it again",
                        "category": "server",
                    },
                    status_code=410,
                )
            )
        return abandoned

    def _evict(self) -> None:
        if len(self._futures) <= KEPT_FUTURES:  # the common case: nothing to scan
            return
        done = [k for k, f in self._futures.items() if f.answer.done()]
        excess = len(done) - KEPT_FUTURES
        if excess > 0:
            for key in sorted(done, key=lambda k: not self._futures[k].retrieved)[:excess]:
                del self._futures[key]

    async def retrieve(self, request_id: str) -> Response:
        entry = self._futures.get(request_id)
        if entry is None or entry.owner != current_identity():
            raise HttpError(410, f"no pending request {clip(request_id, 80)!r}: unknown, expired or not yours")
        try:
            response = await asyncio.wait_for(asyncio.shield(entry.answer), POLL_SECONDS)
        except asyncio.TimeoutError:
            return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        entry.retrieved = True
        return response


# --- order ----------------------------------------------------------------------------------------


_turn = contextvars.ContextVar("tinker_turn", default=None)
"""The (TinkerModel, seq_id) of the request being handled, while it has not been queued."""


async def _nothing() -> None:
    """The turn of a request that was refused."""


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
        self._waiting: dict[int, list[Callable[[], Awaitable[None]]]] = {}
        self._running = False
        self._gap: tuple[int, asyncio.TimerHandle] | None = None  # (the seq_id awaited, its timer)
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        """Requests waiting for their turn."""
        return sum(map(len, self._waiting.values()))

    async def put(self, seq_id: int, start: Callable[[], Awaitable[None]]) -> None:
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


# --- sessions, models, samplers --------------------------------------------------------------------


@dataclass
class TinkerModel:
    tinker_id: str
    run_id: str
    owner: str | None
    lora_rank: int | None
    order: SeqOrder
    ephemeral: list[str] = field(default_factory=list)  # its ephemeral exports, oldest first
    incarnation: str = ""  # of its run when it was made: every request on the model expects it


@dataclass
class Sampler:
    sampler_id: str
    owner: str | None
    export: str  # cispo export name (or path) the samples read
    tinker_path: str


@dataclass
class Session:
    session_id: str
    owner: str | None
    models: list[str] = field(default_factory=list)  # tinker ids
    last_heartbeat: float = field(default_factory=time.monotonic)


def _owned(table: dict, key: str, what: str):
    item = table.get(key)
    if item is None or item.owner != current_identity():
        raise HttpError(404, f"no {what} {clip(str(key), 80)!r}")
    return item


def run_name(run_id: str, name: str) -> str:
    """The cispo name of a Tinker checkpoint `name` of run `run_id`: `<run>.<name>`, both parts
    checked as names (never empty, '.', '..', a path or unprintable), and the whole too (its
    length); InvalidInput naming `path` otherwise."""
    checkpoint.check_name(run_id, "path")
    checkpoint.check_name(name, "path")
    return checkpoint.check_name(f"{run_id}.{name}", "path")


def parse_path(path: str, kind: str) -> str:
    """The cispo name of a checkpoint path: `tinker://<run>/<kind>/<name>` -> `<run>.<name>`;
    anything else (a cispo name or path) is passed on as it is."""
    if not path.startswith("tinker://"):
        return path
    parts = path.removeprefix("tinker://").split("/")
    if len(parts) != 3 or parts[1] != kind:
        raise InvalidInput([FieldViolation("path", f"{clip(path, 120)!r} is not a tinker://<run>/{kind}/<name> path")])
    return run_name(parts[0], parts[2])


class TinkerFront:
    """The HTTP front: a Starlette app on uvicorn, in the server's event loop."""

    def __init__(
        self,
        servicer: TrainingServicer,
        auth: TokenAuthInterceptor | None,
        metrics,
        limits: RequestLimits,
        connections: ConnectionLimits = ConnectionLimits(),
        seq_gap_seconds: float = 60.0,
    ):
        self.servicer, self.auth, self.metrics, self.limits = servicer, auth, metrics, limits
        self.connections, self.seq_gap_seconds = connections, seq_gap_seconds
        self.futures = FutureTable()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TinkerModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.draining = False
        self._notices = RateLimitedLog(log, period_seconds=10.0, level=logging.WARNING)
        self._tasks: set[asyncio.Task] = set()
        routes = {
            "client/config": self.client_config,
            "client/dynamic_config": self.empty,
            "healthz": self.healthz,
            "create_session": self.create_session,
            "session_heartbeat": self.heartbeat,
            "sessions/{session_id}/finish": self.finish_session,
            "get_server_capabilities": self.capabilities,
            "create_model": self.create_model,
            "get_info": self.get_info,
            "forward_backward": self.forward_backward,
            "optim_step": self.optim_step,
            "save_weights": self.save_weights,
            "load_weights": self.load_weights,
            "save_weights_for_sampler": self.save_weights_for_sampler,
            "create_sampling_session": self.create_sampling_session,
            "samplers/{sampler_id}": self.get_sampler,
            "asample": self.asample,
            "retrieve_future": self.retrieve_future,
            "telemetry": self.telemetry,
            **dict.fromkeys(HOSTED_ONLY, self.hosted_only),
        }
        self.app = Starlette(
            routes=[
                Route(f"/api/v1/{path}", self._endpoint(path, handler), methods=["GET", "POST"])
                for path, handler in routes.items()
            ]
            + [
                Route(
                    "/{rest:path}",
                    self._endpoint("unknown", self.unknown),
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                )
            ]
        )
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task | None = None

    # -- serving --------------------------------------------------------------------------------

    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on the bound, listening `sock` until `stop()`."""
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_keep_alive=75,
            http=guarded_protocol(self.connections, self._notices),
        )
        server = uvicorn.Server(config)
        config.load()
        if ssl_context is not None:
            config.ssl = ssl_context
        logging.getLogger("uvicorn.error").addFilter(RateLimitedFilter(self._notices))
        quiet_descriptor_exhaustion(asyncio.get_running_loop(), self._notices)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server
        self._serving = asyncio.ensure_future(server.main_loop())

    async def drain(self, deadline: float) -> None:
        """Refuse new submissions (503, Retry-After) and start every request that has a request
        id, even while the server drains; wait (until the loop time `deadline`) until they are
        answered, then a little for their clients to retrieve them. Those still waiting for
        their turn at the deadline are answered 410, which the SDK takes as "submit it again"."""
        self.draining = True
        loop = asyncio.get_running_loop()
        for model in self.models.values():
            model.order.gap_seconds = 0.0  # a gap now would outlast the drain
        while self.futures.unanswered() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in self.futures.abandon():
            log.warning("draining: request %s had not started; its client is told to submit it again", request_id)
        retrieval = min(deadline, loop.time() + RETRIEVE_GRACE_SECONDS)
        while self.futures.unretrieved() and loop.time() < retrieval:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        await self._serving
        await self._server.shutdown()

    def _endpoint(self, route: str, handler: Callable[[Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            _turn.set(None)
            try:
                if route not in ("healthz", "unknown"):
                    set_identity(self._identify(request))
                if self.draining and route in SUBMITS:
                    raise HttpError(
                        503,
                        "the server is draining before a restart and accepts no new requests; retry after it restarts",
                        headers={"Retry-After": "5"},
                    )
                response = await handler(request)
            except (HttpError, InvalidInput, LimitExceeded) as exc:
                response = self._error_response(exc)
                await self._give_up_turn()
            except Exception as exc:
                self._notices.log(f"500:{route}", "HTTP %s failed: %r", route, exc)
                response = JSONResponse({"error": f"internal error in {route}: {type(exc).__name__}"}, status_code=500)
                await self._give_up_turn()
            self.metrics.http_requests.labels(route, str(response.status_code)).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - started)
            return response

        return endpoint

    @classmethod
    def _error_response(cls, exc: HttpError | InvalidInput | LimitExceeded) -> Response:
        if not isinstance(exc, HttpError):
            exc = cls._refused(to_status(exc))
        headers = exc.extra.pop("headers", None)
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=headers)

    @staticmethod
    async def _give_up_turn() -> None:
        """A refused request's turn in its model's order is passed on at once."""
        if (turn := _turn.get()) is not None:
            _turn.set(None)
            model, seq_id = turn
            await model.order.put(seq_id, _nothing)

    def _identify(self, request: Request) -> str | None:
        """The token identity of the X-API-Key (`tml-<token>`; the SDK insists on the prefix)."""
        if self.auth is None:
            return None
        key = request.headers.get("x-api-key", "")
        for token in (key, key.removeprefix("tml-")):
            if token and (name := self.auth.identify(token)) is not None:
                return name
        raise HttpError(401, "unknown or missing API key (X-API-Key: tml-<token> of --auth-tokens-file)")

    async def _json(self, request: Request) -> dict:
        body = await self._body(request)
        try:
            value = json.loads(body or b"{}")
        except RecursionError:
            raise HttpError(400, "the body is JSON nested too deeply") from None
        except ValueError as exc:
            raise HttpError(400, f"the body is not JSON: {clip(str(exc), 200)}") from None
        if not isinstance(value, dict):
            raise HttpError(400, "the body must be a JSON object")
        return value

    async def _body(self, request: Request) -> bytes:
        """The body, read under max_message_bytes: a declared Content-Length over it is refused
        before a byte is read, and a body that grows over it as soon as it does."""
        limit = self.limits.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise HttpError(
                413 if declared.isdigit() else 400,
                f"Content-Length {clip(declared, 40)} is not a size up to max_message_bytes={limit}",
                headers={"Connection": "close"},
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # the rest is not read: the connection closes after the answer
                    raise HttpError(413, f"the body is over max_message_bytes={limit}", headers={"Connection": "close"})
                chunks.append(chunk)
        except ClientDisconnect:
            raise HttpError(400, "the connection closed before the whole body arrived") from None
        body = b"".join(chunks)
        del chunks
        if request.headers.get("content-encoding", "").lower() == "zstd":
            try:
                with zstandard.ZstdDecompressor().stream_reader(body) as reader:
                    body = reader.read(limit + 1)
            except zstandard.ZstdError as exc:
                raise HttpError(400, f"the body is not valid zstd: {exc}") from None
            if len(body) > limit:
                raise HttpError(413, f"the decompressed body is over max_message_bytes={limit}")
        return body

    # -- running operations -----------------------------------------------------------------------

    async def _call(self, op: str, message) -> Any:
        """Run one operation now and wait for it; HttpError if it fails."""
        decoded = await self.servicer.prepare(op, message)
        if decoded.error is not None:
            raise self._refused(to_status(decoded.error))
        answer = await (await self.servicer.accept(decoded, time.perf_counter()))
        if isinstance(answer, status_pb2.Status):
            raise self._refused(answer)
        return answer

    @staticmethod
    def _refused(status: status_pb2.Status) -> HttpError:
        body = _status_body(status)
        return HttpError(_status_http(status), body.pop("error"), **body)

    def _own(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(
        self, op: str, message, encode: Callable[[Any], Response], order: SeqOrder | None = None, seq_id: int = 0
    ) -> str:
        """Validate now (a refusal is this request's answer); queue in `order` by `seq_id` (or at
        once). The request id, whose result retrieve_future answers: from then on the request is
        started even if the server begins to drain."""
        decoded = await self.servicer.prepare(op, message)
        if decoded.error is not None:
            raise self._refused(to_status(decoded.error))  # the endpoint gives up its turn
        request_id, answer = self.futures.new()
        context = contextvars.copy_context()

        def settle(response: Response) -> None:
            if not answer.done():
                answer.set_result(response)

        async def finish(pending: asyncio.Future) -> None:
            result = await pending
            if isinstance(result, status_pb2.Status):
                user = result.code in (
                    code_pb2.INVALID_ARGUMENT,
                    code_pb2.FAILED_PRECONDITION,
                    code_pb2.NOT_FOUND,
                    code_pb2.RESOURCE_EXHAUSTED,
                    code_pb2.PERMISSION_DENIED,
                    code_pb2.ABORTED,
                )
                settle(JSONResponse({"error": result.message, "category": "user" if user else "server"}))
                return
            try:
                settle(encode(result))
            except Exception as exc:
                status = to_status(exc)
                category = "user" if status.code == code_pb2.INVALID_ARGUMENT else "server"
                settle(JSONResponse({"error": status.message, "category": category}))

        async def start() -> None:
            if answer.done():  # abandoned by a drain: never started
                return
            self.futures.started(request_id)
            accepted = asyncio.create_task(
                self.servicer.accept(decoded, time.perf_counter(), promised=True), context=context
            )
            self._own(asyncio.create_task(finish(await accepted), context=context))

        if order is None:
            await start()
        else:
            _turn.set(None)  # taken
            self._own(asyncio.ensure_future(order.put(seq_id, start)))
        return request_id

    async def _submit_to(
        self, model: TinkerModel, seq_id: int, op: str, message, encode: Callable[[Any], Response]
    ) -> Response:
        """`_submit` of `message` in `model`'s order; the submit's answer."""
        message.expected_version.incarnation = model.incarnation  # see _model_named
        request_id = await self._submit(op, message, encode, model.order, seq_id)
        return JSONResponse({"request_id": request_id, "model_id": model.tinker_id})

    def _model(self, body: dict) -> tuple[TinkerModel, int]:
        """The request's model and seq_id, read first: from here until the request is queued, a
        refusal gives up its turn (the endpoint sees to it), so later requests never wait for it."""
        model = self._model_named(wire.field(body, "model_id", (str,)))
        seq_id = wire.field(body, "seq_id", (int,), required=False, default=0)
        _turn.set((model, seq_id))
        return model, seq_id

    def _session(self, session_id: str) -> Session:
        return _owned(self.sessions, session_id, "session")

    # -- routes: sessions ---------------------------------------------------------------------------

    async def client_config(self, request: Request) -> Response:
        # Plain httpx, zstd bodies, chunks no larger than one cispo request may be.
        return JSONResponse(
            {
                "use_pyqwest_transport": False,
                "proto_compress_fwdbwd": True,
                "parallel_fwdbwd_chunks": True,
                "fwdbwd_max_chunk_len": min(MAX_CHUNK_DATA, self.limits.max_data_per_request),
                "fwdbwd_max_chunk_bytes_count": self.limits.max_message_bytes // 2,
            }
        )

    async def empty(self, request: Request) -> Response:
        return JSONResponse({})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def create_session(self, request: Request) -> Response:
        await self._json(request)
        session = Session(f"session-{uuid.uuid4().hex[:16]}", current_identity())
        self.sessions[session.session_id] = session
        return JSONResponse({"session_id": session.session_id, "type": "create_session"})

    async def heartbeat(self, request: Request) -> Response:
        body = await self._json(request)
        session = self.sessions.get(wire.field(body, "session_id", (str,)))
        if session is None or session.owner != current_identity():
            raise HttpError(410, "no such session")
        session.last_heartbeat = time.monotonic()
        return JSONResponse({"type": "session_heartbeat"})

    async def finish_session(self, request: Request) -> Response:
        """The session's runs are unloaded (their saved states and exports stay)."""
        session = self._session(request.path_params["session_id"])
        for tinker_id in session.models:
            model = self.models.pop(tinker_id, None)
            if model is not None:
                await self._remove_exports(model, model.ephemeral)
                try:
                    await self._call("unload_model", pb.UnloadModelRequest(model_id=model.run_id))
                except HttpError as exc:
                    log.info("finishing %s: %s", session.session_id, exc.message)
        for key in [k for k in self.samplers if k.startswith(f"{session.session_id}:")]:
            del self.samplers[key]
        del self.sessions[session.session_id]
        return JSONResponse({})

    async def capabilities(self, request: Request) -> Response:
        return JSONResponse({"supported_models": [{"model_name": self.servicer.base_model}]})

    async def telemetry(self, request: Request) -> Response:
        """The SDK's own telemetry: read (under the body limit) and dropped."""
        await self._body(request)
        return Response(status_code=204)

    async def hosted_only(self, request: Request) -> Response:
        raise HttpError(
            400,
            f"{request.url.path} is not supported by cispo: it serves Tinker's hosted platform "
            "(see docs/porting-from-tinker.md)",
        )

    async def unknown(self, request: Request) -> Response:
        raise HttpError(404, f"no route {request.method} {clip(request.url.path, 200)}")

    # -- routes: models -----------------------------------------------------------------------------

    # -- run versions (reference/run-state.md) -------------------------------------------------------
    # A model keeps the incarnation of its run when it was made, and every request on it expects
    # that incarnation. The id itself stays `<session>:train:<n>`, since the SDK builds it itself
    # (create_training_client_from_state); its random session part is what marks an id of another
    # server process: such an id (or one of a finished session) is answered 410 with the ABORTED
    # message, which the SDK raises and does not retry, instead of 404.

    def _model_named(self, tinker_id: str) -> TinkerModel:
        made = MODEL_ID.fullmatch(tinker_id)
        if tinker_id not in self.models and made and made[1] not in self.sessions:
            raise HttpError(
                410,
                f"model {clip(tinker_id, 80)!r} is not on this server any more (the server restarted, "
                "or its session finished); it no longer holds the state you last saw; resume from "
                "your last saved state",
                code="ABORTED",
            )
        return _owned(self.models, tinker_id, "model")

    def _register(
        self, session: Session, model_seq_id: int, run_id: str, lora_rank: int | None, incarnation: str
    ) -> TinkerModel:
        model = TinkerModel(
            f"{session.session_id}:train:{model_seq_id}",
            run_id,
            session.owner,
            lora_rank,
            SeqOrder(self.seq_gap_seconds),
            incarnation=incarnation,
        )
        self.models[model.tinker_id] = model
        session.models.append(model.tinker_id)
        return model

    async def create_model(self, request: Request) -> Response:
        body = await self._json(request)
        session = self._session(wire.field(body, "session_id", (str,)))
        model_seq_id = wire.field(body, "model_seq_id", (int,))
        optimizer = body.get("optimizer_config") or {}
        if isinstance(optimizer, dict) and optimizer.get("type", "adamw") != "adamw":
            raise HttpError(400, f"optimizer {optimizer.get('type')!r} is not supported (AdamW only)")
        message = pb.CreateModelRequest(
            base_model=wire.field(body, "base_model", (str,), required=False, default=""),
            lora_config=wire.lora_config(body),
            idempotency_key=request.headers.get("x-idempotency-key", ""),
        )

        def created(response: pb.CreateModelResponse) -> Response:
            model = self._register(
                session,
                model_seq_id,
                response.model_id,
                response.info.lora_config.rank,
                response.info.version.incarnation,
            )
            return JSONResponse({"model_id": model.tinker_id, "type": "create_model"})

        return JSONResponse({"request_id": await self._submit("create_model", message, created)})

    async def get_info(self, request: Request) -> Response:
        body = await self._json(request)
        model = self._model_named(wire.field(body, "model_id", (str,)))
        info = await self._call("get_info", pb.GetInfoRequest(model_id=model.run_id))
        policy = self.servicer.runs.policy
        base = self.servicer.base_model
        return JSONResponse(
            {
                "type": "get_info",
                "model_id": model.tinker_id,
                "model_name": base,
                "model_data": {
                    "arch": policy.model.config.model_type,
                    "model_name": base,
                    "tokenizer_id": policy.name if policy.tokenizer is not None else None,
                },
                "is_lora": info.HasField("lora_config"),
                "lora_rank": info.lora_config.rank if info.HasField("lora_config") else None,
            }
        )

    async def forward_backward(self, request: Request) -> Response:
        """The protobuf body is read and converted on a worker thread, its shapes and sizes
        checked against the request limits before anything is allocated for it."""
        message = await asyncio.to_thread(wire.forward_backward_request, await self._body(request))
        model = self._model_named(message.model_id)
        _turn.set((model, message.seq_id))
        wire.check_limits(message, self.limits)
        key = request.headers.get("x-idempotency-key", "")
        seq_id, op = message.seq_id, "forward" if message.forward_only else "forward_backward"
        converted = await asyncio.to_thread(wire.forward_backward_input, message, model.run_id, key)
        del message
        return await self._submit_to(
            model, seq_id, op, converted, lambda out: Response(wire.forward_backward_output(out), media_type=PROTOBUF)
        )

    async def optim_step(self, request: Request) -> Response:
        body = await self._json(request)
        model, seq_id = self._model(body)
        message = pb.OptimStepRequest(
            adam_params=wire.adam_params(body),
            model_id=model.run_id,
            idempotency_key=request.headers.get("x-idempotency-key", ""),
        )
        return await self._submit_to(
            model,
            seq_id,
            "optim_step",
            message,
            lambda out: JSONResponse({"metrics": {**out.metrics, "step:max": float(out.step)}, "type": "optim_step"}),
        )

    async def save_weights(self, request: Request) -> Response:
        body = await self._json(request)
        model, seq_id = self._model(body)
        name = wire.field(body, "path", (str,))
        message = pb.SaveStateRequest(
            name=run_name(model.run_id, name),
            model_id=model.run_id,
            idempotency_key=request.headers.get("x-idempotency-key", ""),
        )
        return await self._submit_to(
            model,
            seq_id,
            "save_state",
            message,
            lambda out: JSONResponse({"path": f"tinker://{model.run_id}/weights/{name}", "type": "save_weights"}),
        )

    async def load_weights(self, request: Request) -> Response:
        """Into an existing model ({model_id, seq_id}), or as a new model of a session
        ({session_id, model_seq_id}: create_training_client_from_state)."""
        body = await self._json(request)
        key = request.headers.get("x-idempotency-key", "")
        if body.get("model_id") is not None:
            model, seq_id = self._model(body)  # first: a refusal below gives up its turn
            path = wire.field(body, "path", (str,))
            with_optimizer = wire.field(body, "optimizer", (bool,), required=False, default=False)
            message = pb.LoadStateRequest(
                name=parse_path(path, "weights"),
                with_optimizer=with_optimizer,
                model_id=model.run_id,
                idempotency_key=key,
            )
            return await self._submit_to(
                model,
                seq_id,
                "load_state",
                message,
                lambda out: JSONResponse({"path": path, "model_id": model.tinker_id, "type": "load_weights"}),
            )
        session = self._session(wire.field(body, "session_id", (str,)))
        model_seq_id = wire.field(body, "model_seq_id", (int,))
        path = wire.field(body, "path", (str,))
        with_optimizer = wire.field(body, "optimizer", (bool,), required=False, default=False)
        message = pb.CreateModelRequest(
            base_model=wire.field(body, "base_model", (str,), required=False, default=""),
            from_state=pb.StateRef(path=parse_path(path, "weights"), with_optimizer=with_optimizer),
            idempotency_key=key,
        )

        def created(response: pb.CreateModelResponse) -> Response:
            rank = response.info.lora_config.rank if response.info.HasField("lora_config") else None
            model = self._register(session, model_seq_id, response.model_id, rank, response.info.version.incarnation)
            return JSONResponse({"path": path, "model_id": model.tinker_id, "type": "load_weights"})

        return JSONResponse({"request_id": await self._submit("create_model", message, created)})

    async def save_weights_for_sampler(self, request: Request) -> Response:
        """Named ({path}): an export `tinker://<run>/sampler_weights/<name>`. Ephemeral
        ({sampling_session_seq_id}): an export and a sampling session on it."""
        body = await self._json(request)
        model, seq_id = self._model(body)
        name = wire.field(body, "path", (str,), required=False)
        ephemeral = wire.field(body, "sampling_session_seq_id", (int,), required=False)
        if (name is None) == (ephemeral is None):
            raise HttpError(400, "give path (a named export) or sampling_session_seq_id (an ephemeral one)")
        if body.get("kind", "snapshot") != "snapshot":
            raise HttpError(400, f"sampling client kind {body.get('kind')!r} is not supported (snapshot only)")
        name = name if name is not None else f"ephemeral-{uuid.uuid4().hex[:12]}"
        export, tinker_path = run_name(model.run_id, name), f"tinker://{model.run_id}/sampler_weights/{name}"
        message = pb.SaveWeightsForSamplerRequest(
            name=export, model_id=model.run_id, idempotency_key=request.headers.get("x-idempotency-key", "")
        )

        def saved(out: pb.SaveWeightsForSamplerResponse) -> Response:
            if ephemeral is None:
                return JSONResponse({"path": tinker_path, "type": "save_weights_for_sampler"})
            session_id = model.tinker_id.split(":train:")[0]
            sampler = self._new_sampler(f"{session_id}:sample:{ephemeral}", export, tinker_path)
            model.ephemeral.append(export)
            if len(model.ephemeral) > KEPT_EPHEMERAL:
                self._own(asyncio.ensure_future(self._remove_exports(model, [model.ephemeral.pop(0)])))
            return JSONResponse({"sampling_session_id": sampler.sampler_id, "type": "save_weights_for_sampler"})

        return await self._submit_to(model, seq_id, "save_weights_for_sampler", message, saved)

    # -- routes: sampling ---------------------------------------------------------------------------

    async def _remove_exports(self, model: TinkerModel, exports: list[str]) -> None:
        """Delete ephemeral exports (in the run's order, after its saves) and their samplers."""
        runs, owner = self.servicer.runs, current_identity()
        for sampler_id in [k for k, v in self.samplers.items() if v.export in exports]:
            del self.samplers[sampler_id]
        for export in exports:
            try:
                await (await self.servicer.pipeline.submit(lambda e=export: runs.remove_export(e, owner), model.run_id))
            except Exception as exc:
                log.warning("could not remove the export %s: %s", export, exc)

    def _new_sampler(self, sampler_id: str, export: str, tinker_path: str) -> Sampler:
        sampler = Sampler(sampler_id, current_identity(), export, tinker_path)
        self.samplers[sampler_id] = sampler
        return sampler

    async def create_sampling_session(self, request: Request) -> Response:
        body = await self._json(request)
        session = self._session(wire.field(body, "session_id", (str,)))
        seq = wire.field(body, "sampling_session_seq_id", (int,))
        model_path = wire.field(body, "model_path", (str,), required=False)
        if model_path is None:
            raise HttpError(
                400,
                "sampling the base model alone is not supported by cispo: save weights for a "
                "sampler (save_weights_and_get_sampling_client) and sample those",
            )
        export = parse_path(model_path, "sampler_weights")
        try:  # at once: another identity's export answers as a missing one does
            await self.servicer.check_export(export)
        except StateNotFound as exc:
            raise HttpError(404, str(exc)) from None
        sampler = self._new_sampler(f"{session.session_id}:sample:{seq}", export, model_path)
        return JSONResponse({"sampling_session_id": sampler.sampler_id, "type": "create_sampling_session"})

    async def get_sampler(self, request: Request) -> Response:
        sampler = _owned(self.samplers, request.path_params["sampler_id"], "sampler")
        return JSONResponse(
            {
                "sampler_id": sampler.sampler_id,
                "base_model": self.servicer.base_model,
                "model_path": sampler.tinker_path,
            }
        )

    async def asample(self, request: Request) -> Response:
        body = await self._json(request)
        sampler = _owned(self.samplers, wire.field(body, "sampling_session_id", (str,)), "sampling session")
        message = wire.sample_request(body, sampler.export, "")
        message.idempotency_key = request.headers.get("x-idempotency-key", "")
        request_id = await self._submit(
            "sample", message, lambda out: Response(wire.sample_response(out), media_type=PROTOBUF)
        )
        return JSONResponse(
            {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(message.num_samples)]}
        )

    async def retrieve_future(self, request: Request) -> Response:
        body = await self._json(request)
        return await self.futures.retrieve(wire.field(body, "request_id", (str,)))
