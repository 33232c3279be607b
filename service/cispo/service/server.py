"""The gRPC server: TrainingService + health + reflection + Prometheus /metrics, and drain.

Security (service/cispo/service/tls.py, service/cispo/service/auth.py): optional TLS or mTLS on the gRPC port, optional bearer tokens for
every method but grpc.health.v1. An optional plaintext health-only port serves Kubernetes' native
gRPC probes, which cannot speak TLS. Ports are exclusive: a second server on a port in use fails.
"""

import asyncio
import errno
import ipaddress
import logging
import resource
import socket
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from cispo.service.auth import TokenAuthInterceptor, TokenFileError, load_tokens
from cispo.service.checkpoint_sweeper import CheckpointSweeper
from cispo.service.config import ServerConfig
from cispo.service.data_plane import Operations
from cispo.service.http_guard import ConnectionLimits
from cispo.service.idempotency import IdempotencyCache
from cispo.service.interceptor import GrpcMetricsInterceptor
from cispo.service.limits import RequestLimits
from cispo.service.metrics import ServiceMetrics
from cispo.service.pipeline import OperationPipeline
from cispo.service.servicer import SERVICE_NAME, TrainingServicer, add_training_service
from cispo.service.tls import TlsConfigError, tls_server_context, tls_server_credentials
from cispo.v1 import training_pb2
from cispo.worker.protocols import RunRegistry

if TYPE_CHECKING:
    from cispo.service.tinker_http import TinkerFront

log = logging.getLogger(__name__)

# Health service names the server registers; probes must use these.
HEALTH_SERVICE_NAMES = ("", SERVICE_NAME)


class StartupError(Exception):
    """The server cannot start as configured (a port in use, unusable TLS or tokens files); the
    message is one line for the operator."""


class TrainingServer:
    """One server process. `start()` binds; `drain()` stops accepting, finishes, exits."""

    def __init__(
        self,
        runs: RunRegistry,
        config: ServerConfig,
        registry: CollectorRegistry | None = None,
        world_size: int = 1,
    ):
        """`runs`: the training runs served (worker.runs.TrainingRuns, or worker.group_runs.GroupRuns)."""
        self.runs = runs
        self.config = config
        self.metrics = ServiceMetrics(registry, config.metrics_run_label)
        self.metrics.world_size.set(world_size)
        base, engine_config = runs.base_info(), runs.config
        if base.device == "cuda":
            self.metrics.track_cuda_memory(base.device_name)
        limits = RequestLimits(
            max_message_bytes=config.max_message_bytes,
            max_tokens_per_request=engine_config.max_tokens_per_request,
            max_sequence_length=base.max_sequence_length,
            idempotency_keys_remembered=config.idempotency_keys,
            max_data_per_request=config.max_data_per_request,
            max_sample_tokens=engine_config.sampling.max_sample_tokens,
            max_num_samples=engine_config.sampling.max_num_samples,
            max_sample_request_tokens=engine_config.sampling.max_sample_request_tokens,
        )
        self.pipeline = OperationPipeline(config.queue_capacity, config.sample_queue_capacity, runs.max_runs + 1)
        self.operations = Operations(
            runs,
            self.pipeline,
            self.metrics,
            limits,
            world_size,
            IdempotencyCache(config.idempotency_keys, config.idempotency_bytes),
            base_model=config.model_name,
        )
        self.sweeper = CheckpointSweeper(runs, self.pipeline, self.metrics.registry, config.checkpoint_sweep_seconds)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._http: WSGIServer | None = None
        self.http_port: int | None = None
        self._tinker: TinkerFront | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()  # owned: the loop holds tasks weakly

    async def start(self) -> int:
        """Bind every port and serve. Raises StartupError (one line) when it cannot."""
        config = self.config
        try:
            tokens = load_tokens(config.auth_tokens_file) if config.auth_tokens_file else None
            credentials = None
            if config.tls_cert_file or config.tls_key_file or config.tls_client_ca_file:
                credentials = tls_server_credentials(
                    config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
                )
        except (TokenFileError, TlsConfigError) as exc:
            raise StartupError(str(exc)) from None
        # gRPC itself takes messages up to twice the limit, so that the servicer answers one
        # over the limit, which on a Stream keeps the stream and its accepted answers alive.
        options = [
            ("grpc.max_receive_message_length", min(2 * config.max_message_bytes, 2**31 - 1)),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # One server per port: without this a second server on the port would start
            # and share the connections (grpc sets SO_REUSEPORT by default).
            ("grpc.so_reuseport", 0),
        ]
        # The metrics interceptor is outermost, so it counts the calls auth refuses.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            GrpcMetricsInterceptor(
                self.metrics.registry, (training_pb2.DESCRIPTOR.services_by_name["TrainingService"],)
            )
        ]
        auth = TokenAuthInterceptor(tokens) if tokens is not None else None
        if auth is not None:
            interceptors.append(auth)
        server = grpc.aio.server(interceptors=interceptors, options=options)
        add_training_service(TrainingServicer(self.operations), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        self.port = _add_port(server, config.host, config.port, "gRPC", credentials)
        if config.health_port >= 0:
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_port = _add_port(health_server, config.host, config.health_port, "health")
            self._health_server = health_server
        if config.metrics_port >= 0:
            ensure_port_free(config.host, config.metrics_port, "metrics")
            try:
                self._http, _ = start_http_server(config.metrics_port, addr=config.host, registry=self.metrics.registry)
            except OSError as exc:
                raise StartupError(_bind_error(config.host, config.metrics_port, "metrics", exc)) from None
            self.metrics_port = self._http.server_port
        http_socket = _listen(config.host, config.http_port, "HTTP") if config.http_port >= 0 else None
        self._loop = asyncio.get_running_loop()
        self.pipeline.start()
        await server.start()
        if http_socket is not None:
            from cispo.service.tinker_http import TinkerFront  # the HTTP stack only when asked for

            self._tinker = TinkerFront(
                self.operations,
                auth,
                self.metrics,
                self.operations.limits,
                _connection_limits(config),
                config.http_seq_gap_seconds,
            )
            await self._tinker.start(
                http_socket,
                tls_server_context(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
                if config.tls_cert_file
                else None,
            )
            self.http_port = http_socket.getsockname()[1]
            log.info("Tinker HTTP API on %s:%d", config.host, self.http_port)
        self._server = server
        if self._health_server is not None:
            await self._health_server.start()
            log.info("grpc.health.v1 (plaintext, health only) on %s:%d", config.host, self.health_port)
        self.sweeper.start()  # last: a start that fails leaves no task behind
        await self.set_serving(True)
        mode = ("mTLS" if config.tls_client_ca_file else "TLS") if credentials else "plaintext"
        log.info(
            "gRPC on %s:%d: %s, %s",
            config.host,
            self.port,
            mode,
            f"bearer tokens of {len(tokens)} clients" if tokens else "no authentication",
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_SERVICE_NAMES:
            await self.health.set(name, status)

    def rank_lost(self, error: Exception) -> None:
        """From any thread: a worker rank is gone. NOT_SERVING; fail what is in flight now."""

        def on_loop():
            log.error("worker group broken: %s", error)
            self.pipeline.fail(error)
            task = asyncio.ensure_future(self.set_serving(False))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if self._loop is None:
            raise RuntimeError("the server has not started")
        self._loop.call_soon_threadsafe(on_loop)

    async def drain(self) -> None:
        """Stop accepting work, answer everything accepted (within drain_seconds), stop."""
        log.info("draining: no new operations; finishing those accepted")
        await self.set_serving(False)
        self.operations.draining.set()
        await self.sweeper.stop()  # queues nothing new while the drain runs
        deadline = asyncio.get_running_loop().time() + self.config.drain_seconds
        http_drained = self._tinker.drain(deadline) if self._tinker is not None else asyncio.sleep(0)
        await asyncio.gather(self._started().stop(grace=self.config.drain_seconds), http_drained)
        await self.pipeline.close()
        if self._tinker is not None:
            await self._tinker.stop()
        self.operations.close()
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
        log.info("drained: %d operations accepted, %d completed", self.pipeline.accepted, self.pipeline.completed)

    async def wait_for_termination(self) -> None:
        await self._started().wait_for_termination()

    def _started(self) -> grpc.aio.Server:
        if self._server is None:
            raise RuntimeError("the server has not started")
        return self._server


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or "", every address): assume it is reachable from elsewhere


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _bind_error(host: str, port: int, what: str, exc: OSError | None = None) -> str:
    if exc is not None and exc.errno == errno.EADDRINUSE:
        return f"{what} port {port} on {host} is in use"
    if exc is not None and exc.errno == errno.EACCES:
        return f"{what} port {port} on {host}: permission denied"
    if exc is not None and exc.errno == errno.EADDRNOTAVAIL:
        return f"{what} port {port} on {host}: {host} is not an address of this machine"
    detail = f" ({exc.strerror or exc})" if exc is not None else ""
    return f"cannot bind {what} port {port} on {host}{detail}"


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Raise StartupError when (host, port) cannot be bound now: the port is in use, or the
    address is not this machine's. Port 0 always passes. Before the model loads, it turns a
    minutes-late failure into an immediate one; the real bind still checks."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot bind {what} port {port}: unknown host {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As the servers bind: SO_REUSEADDR (a port in TIME_WAIT is free), never SO_REUSEPORT.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartupError(_bind_error(host, port, what, exc)) from None


def _listen(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on (host, port), as the other ports bind; StartupError if not."""
    ensure_port_free(host, port, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: a response's header and body writes then leave at once,
    # instead of the body waiting out the client's delayed ACK (about 40 ms a request).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise StartupError(_bind_error(host, port, what, exc)) from None
    sock.setblocking(False)
    return sock


def _connection_limits(config: ServerConfig) -> ConnectionLimits:
    """The HTTP port's limits; connections at most a quarter of the descriptors the process may
    open, so that the HTTP port alone never takes the gRPC port's descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = config.http_max_connections
    if soft != resource.RLIM_INFINITY and cap > soft // 4:
        log.warning(
            "--http-max-connections %d lowered to %d: the process may open %d descriptors", cap, soft // 4, soft
        )
        cap = max(1, soft // 4)
    return ConnectionLimits(cap, config.http_header_timeout_seconds, config.http_body_timeout_seconds)


def _add_port(server: grpc.aio.Server, host: str, port: int, what: str, credentials=None) -> int:
    ensure_port_free(host, port, what)
    try:
        if credentials is not None:
            return server.add_secure_port(_address(host, port), credentials)
        return server.add_insecure_port(_address(host, port))
    except RuntimeError:  # grpc says only "Failed to bind"
        raise StartupError(_bind_error(host, port, what)) from None
