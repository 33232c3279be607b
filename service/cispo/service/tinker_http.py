"""The Tinker HTTP API (as the tinker SDK 0.38 speaks it) on the server's own runs: `--http-port`.

    TINKER_BASE_URL=http://host:8000 TINKER_API_KEY=tml-<token> python my_tinker_loop.py

Every operation goes through the same operations layer as gRPC (cispo.service.data_plane.
Operations, by its typed entries in cispo.service.operations): the same validation, runs,
pipeline lanes, idempotency (X-Idempotency-Key), metrics and log line. What the front adds is
Tinker's shape of it, one room each:

- tinker_routes: one handler per route (`/api/v1/<route>`); tinker_body reads the bodies;
- tinker_checkpoints: the RestClient's routes of runs and checkpoints; tinker_archive: signed
  archive URLs (the one route without an API key) and the tar streams they answer;
- tinker_sessions: sessions, and Tinker's model ids (`<session>:train:<n>`) mapped to cispo runs;
  checkpoint paths `tinker://<run>/weights/<name>` and `tinker://<run>/sampler_weights/<name>`,
  stored as the cispo state or export `<run>.<name>` (names are per run, as Tinker's are);
  sampling sessions over saved sampler weights;
- tinker_futures: a submit answers `{request_id}` at once; `retrieve_future` long-polls for the
  result (JSON, or protobuf for forward/backward and samples) and answers "try_again" within
  POLL_SECONDS, well inside the SDK's 45 s poll timeout;
- tinker_order: a model's requests start in `seq_id` order whatever order they arrive in, so
  chunks the SDK sends in parallel accumulate into one gradient;
- tinker_dispatch: calls and submits into the operations layer;
- tinker_errors: errors, mapped in one place.

Errors: a request the operations layer refuses is answered at once with an HTTP status the SDK
understands (400 BadRequestError for bad input, with cispo's field violations in the message;
429 for capacity, which the SDK backs off from); an operation that fails later is a future
error (`category` "user" or "server"). Tinker's hosted-platform routes answer 400 "not
supported"; unknown routes 404, both with a JSON error.

This module is the front itself: the Starlette app on uvicorn, in the server's event loop, each
route's endpoint (identity, drain refusals, errors, metrics), and serving and draining.
"""

import asyncio
import logging
import socket
import ssl
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cispo.service.auth import TokenAuthInterceptor, set_identity
from cispo.service.data_plane import Operations
from cispo.service.http_guard import ConnectionLimits, RateLimitedFilter, guarded_protocol, quiet_descriptor_exhaustion
from cispo.service.limits import RequestLimits
from cispo.service.log_limits import RateLimitedLog
from cispo.service.metrics import ServiceMetrics
from cispo.service.tinker_dispatch import Dispatch
from cispo.service.tinker_errors import HttpError, error_response
from cispo.service.tinker_futures import FutureTable
from cispo.service.tinker_order import give_up_turn, take_turn
from cispo.service.tinker_routes import DELETES, SUBMITS, UNAUTHENTICATED, Handler, TinkerRoutes
from cispo.service.tinker_sessions import Sessions
from cispo.worker import InvalidInput, LimitExceeded

log = logging.getLogger(__name__)

RETRIEVE_GRACE_SECONDS = 5.0
"""On a drain, how long answered requests wait for their clients' retrieve_future."""


class TinkerFront:
    """The HTTP front: a Starlette app on uvicorn, in the server's event loop."""

    def __init__(
        self,
        operations: Operations,
        auth: TokenAuthInterceptor | None,
        metrics: ServiceMetrics,
        limits: RequestLimits,
        connections: ConnectionLimits,
        seq_gap_seconds: float,
    ):
        self.auth, self.metrics, self.limits = auth, metrics, limits
        self.connections = connections
        self.futures = FutureTable()
        self.sessions = Sessions(seq_gap_seconds)
        self.routes = TinkerRoutes(operations, self.sessions, self.futures, Dispatch(operations, self.futures))
        self.draining = False
        self._notices = RateLimitedLog(log, period_seconds=10.0, level=logging.WARNING)
        self.app = Starlette(
            routes=[
                Route(
                    f"/api/v1/{path}",
                    self._endpoint(path, handler),
                    methods=["GET", "POST", "DELETE"] if path in DELETES else ["GET", "POST"],
                )
                for path, handler in self.routes.table().items()
            ]
            + [
                Route(
                    "/{rest:path}",
                    self._endpoint("unknown", self.routes.unknown),
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
        self._serving = asyncio.ensure_future(server.main_loop())  # owned: awaited by stop()

    async def drain(self, deadline: float) -> None:
        """Refuse new submissions (503, Retry-After) and start every request that has a request
        id, even while the server drains; wait (until the loop time `deadline`) until they are
        answered, then a little for their clients to retrieve them. Those still waiting for
        their turn at the deadline are answered 410, which the SDK takes as "submit it again"."""
        self.draining = True
        loop = asyncio.get_running_loop()
        for model in self.sessions.models.values():
            model.order.gap_seconds = 0.0  # a gap now would outlast the drain
        await self.futures.wait(self.futures.unanswered, deadline)
        for request_id in self.futures.abandon():
            log.warning("draining: request %s had not started; its client is told to submit it again", request_id)
        await self.futures.wait(self.futures.unretrieved, min(deadline, loop.time() + RETRIEVE_GRACE_SECONDS))

    async def stop(self) -> None:
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        await self._serving
        await self._server.shutdown()

    # -- each request -----------------------------------------------------------------------------

    def _endpoint(self, route: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            take_turn()
            try:
                if route not in UNAUTHENTICATED:
                    set_identity(self._identify(request))
                if self.draining and route in SUBMITS:
                    raise HttpError(
                        503,
                        "the server is draining before a restart and accepts no new requests; retry after it restarts",
                        headers={"Retry-After": "5"},
                    )
                response = await handler(request)
            except (HttpError, InvalidInput, LimitExceeded) as exc:
                response = error_response(exc)
                await give_up_turn()
            except Exception as exc:
                self._notices.log(f"500:{route}", "HTTP %s failed: %r", route, exc)
                response = JSONResponse({"error": f"internal error in {route}: {type(exc).__name__}"}, status_code=500)
                await give_up_turn()
            self.metrics.http_requests.labels(route, str(response.status_code)).inc()
            self.metrics.http_seconds.labels(route).observe(time.perf_counter() - started)
            return response

        return endpoint

    def _identify(self, request: Request) -> str | None:
        """The token identity of the X-API-Key (`tml-<token>`; the SDK insists on the prefix)."""
        if self.auth is None:
            return None
        key = request.headers.get("x-api-key", "")
        for token in (key, key.removeprefix("tml-")):
            if token and (name := self.auth.identify(token)) is not None:
                return name
        raise HttpError(401, "unknown or missing API key (X-API-Key: tml-<token> of --auth-tokens-file)")
