"""gRPC server metrics in the go-grpc-prometheus names, from an aio server interceptor:
grpc_server_started_total, grpc_server_handled_total{grpc_code}, grpc_server_handling_seconds."""

import inspect
import time

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from cispo.service.metrics import LATENCY_BUCKETS

_LABELS = ["grpc_type", "grpc_service", "grpc_method"]


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry, services: tuple[ServiceDescriptor, ...] = ()):
        self.started = Counter("grpc_server_started", "RPCs started on the server.", _LABELS, registry=registry)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by code.", [*_LABELS, "grpc_code"], registry=registry
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "RPC latency until the server finished.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Every series of `services` at 0 (as go-grpc-prometheus' InitializeMetrics), so that
        # rate() sees even errors that all happen between two scrapes.
        for service in services:
            for method in service.methods:
                labels = (_grpc_type(method.client_streaming, method.server_streaming), service.full_name, method.name)
                self.started.labels(*labels)
                self.seconds.labels(*labels)
                for code in grpc.StatusCode:
                    self.handled.labels(*labels, code.name)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if handler.unary_unary:
            labels = ("unary", service, method)
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        kind = _grpc_type(bool(handler.request_streaming), bool(handler.response_streaming))
        labels = (kind, service, method)
        factory = {
            "bidi_stream": grpc.stream_stream_rpc_method_handler,
            "server_stream": grpc.unary_stream_rpc_method_handler,
            "client_stream": grpc.stream_unary_rpc_method_handler,
        }[kind]
        behavior = handler.stream_stream or handler.unary_stream or handler.stream_unary
        wrapped = self._wrap_stream(behavior, labels) if kind != "client_stream" else self._wrap_unary(behavior, labels)
        return factory(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    def _wrap_unary(self, behavior, labels):
        async def wrapped(request, context):
            started = self._start(labels)
            code = "UNKNOWN"
            try:
                response = await behavior(request, context)
                code = _code(context, "OK")
                return response
            except BaseException:
                code = _code(context, "UNKNOWN")
                raise
            finally:
                self._finish(labels, code, started)

        return wrapped

    def _wrap_stream(self, behavior, labels):
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write() (e.g. Health.Watch)
            return self._wrap_unary(behavior, labels)

        async def wrapped(request_or_iterator, context):
            started = self._start(labels)
            code = "UNKNOWN"
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
                code = _code(context, "OK")
            except BaseException:
                code = _code(context, "CANCELLED" if context.cancelled() else "UNKNOWN")
                raise
            finally:
                self._finish(labels, code, started)

        return wrapped

    def _start(self, labels) -> float:
        self.started.labels(*labels).inc()
        return time.perf_counter()

    def _finish(self, labels, code: str, started: float) -> None:
        self.handled.labels(*labels, code).inc()
        self.seconds.labels(*labels).observe(time.perf_counter() - started)


def _grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """go-grpc-prometheus' grpc_type label."""
    if client_streaming:
        return "bidi_stream" if server_streaming else "client_stream"
    return "server_stream" if server_streaming else "unary"


def _code(context, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == code)).name
