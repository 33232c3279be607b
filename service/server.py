"""The gRPC server: TrainingService + health + reflection + Prometheus /metrics, and drain."""

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from cispo.service.interceptor import GrpcMetricsInterceptor
from cispo.service.metrics import ServiceMetrics
from cispo.service.pipeline import OperationPipeline
from cispo.service.servicer import SERVICE_NAME, TrainingServicer, add_training_service
from cispo.v1 import training_pb2

log = logging.getLogger(__name__)

# Health service names the server registers; probes must use these.
HEALTH_SERVICE_NAMES = ("", SERVICE_NAME)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9400
    """Prometheus /metrics port; 0 picks a free one, -1 disables."""
    max_message_bytes: int = 256 << 20
    max_tokens_per_request: int = 1 << 20
    drain_seconds: float = 30.0
    """On SIGTERM, how long accepted work may take to finish before the server exits."""
    queue_capacity: int = 8
    """Operations waiting for the engine before reads stop (back-pressure)."""


class TrainingServer:
    """One server process. `start()` binds; `drain()` stops accepting, finishes, exits."""

    def __init__(self, engine, config: ServerConfig, registry: CollectorRegistry | None = None, world_size: int = 1):
        self.engine = engine
        self.config = config
        self.metrics = ServiceMetrics(registry)
        self.metrics.world_size.set(world_size)
        if engine.policy.device.type == "cuda":
            self.metrics.track_cuda_memory(engine.policy.device)
        limits = dict(max_message_bytes=config.max_message_bytes, max_tokens_per_request=config.max_tokens_per_request,
                      max_sequence_length=engine.info().max_sequence_length)
        self.pipeline = OperationPipeline(config.queue_capacity)
        self.servicer = TrainingServicer(engine, self.pipeline, self.metrics, limits, world_size)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        options = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                   ("grpc.max_send_message_length", self.config.max_message_bytes)]
        interceptor = GrpcMetricsInterceptor(self.metrics.registry, (training_pb2.DESCRIPTOR.services_by_name["TrainingService"],))
        server = grpc.aio.server(interceptors=[interceptor], options=options)
        add_training_service(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.config.metrics_port >= 0:
            self._http, _ = start_http_server(self.config.metrics_port, addr=self.config.host, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        self._loop = asyncio.get_running_loop()
        self.pipeline.start()
        await server.start()
        self._server = server
        await self.set_serving(True)
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
            asyncio.ensure_future(self.set_serving(False))
        self._loop.call_soon_threadsafe(on_loop)

    async def drain(self) -> None:
        """Stop accepting work, answer everything accepted (within drain_seconds), stop."""
        log.info("draining: no new operations; finishing those accepted")
        await self.set_serving(False)
        self.servicer.draining.set()
        await self._server.stop(grace=self.config.drain_seconds)
        await self.pipeline.close()
        if self._http is not None:
            self._http.shutdown()
        log.info("drained: %d operations accepted, %d completed", self.pipeline.accepted, self.pipeline.completed)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
