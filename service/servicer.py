"""cispo.v1.TrainingService: decode, validate, queue on the pipeline, encode, map errors.

Every operation goes through `_accept` (decode + validate on the event loop, then queue) and
`_answer` (await the engine, encode, record metrics). Failures become a google.rpc.Status: a
unary call aborts with it, a stream answers that request with it and goes on.
"""

import asyncio
import time
from collections.abc import Callable

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from cispo.service import convert
from cispo.service.errors import Unavailable, code_name, to_status
from cispo.service.metrics import ServiceMetrics
from cispo.service.pipeline import OperationPipeline
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from cispo.worker import FieldViolation, InvalidInput
from cispo.worker.checkpoint import state_dir

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Answers a stream keeps in flight before it stops reading (bounds per-stream memory).
STREAM_WINDOW = 64


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, engine, pipeline: OperationPipeline, metrics: ServiceMetrics, limits: dict[str, int],
                 world_size: int = 1):
        self.engine = engine
        self.pipeline = pipeline
        self.metrics = metrics
        self.limits = limits
        self.world_size = world_size
        self.draining = asyncio.Event()

    # -- unary ----------------------------------------------------------------------------------

    async def GetInfo(self, request, context):
        return await self._unary("get_info", request, context)

    async def Forward(self, request, context):
        return await self._unary("forward", request, context)

    async def ForwardBackward(self, request, context):
        return await self._unary("forward_backward", request, context)

    async def OptimStep(self, request, context):
        return await self._unary("optim_step", request, context)

    async def SaveState(self, request, context):
        return await self._unary("save_state", request, context)

    async def LoadState(self, request, context):
        return await self._unary("load_state", request, context)

    async def _unary(self, op: str, request, context):
        answer = await (await self._accept(op, request))
        if isinstance(answer, status_pb2.Status):
            await context.abort_with_status(rpc_status.to_status(answer))
        return answer

    # -- stream ---------------------------------------------------------------------------------

    async def Stream(self, request_iterator, context):
        answers: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(request_iterator, answers))
        answered = 0
        try:
            while (item := await answers.get()) is not None:
                request_id, op, pending = item
                answer = await pending
                if isinstance(answer, status_pb2.Status):
                    yield pb.StreamResponse(request_id=request_id, error=answer)
                else:
                    yield pb.StreamResponse(request_id=request_id, **{op: answer})
                answered += 1
            if reader.result() == "draining":
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"server is draining: {answered} requests of this stream were answered, "
                                    "later ones were not accepted")
        finally:
            reader.cancel()

    async def _read_stream(self, request_iterator, answers: asyncio.Queue) -> str:
        """Accept requests in order until the stream ends ("eof") or the server drains."""
        requests = request_iterator.__aiter__()
        drained = asyncio.ensure_future(self.draining.wait())
        try:
            while True:
                next_request = asyncio.ensure_future(requests.__anext__())
                await asyncio.wait({next_request, drained}, return_when=asyncio.FIRST_COMPLETED)
                if self.draining.is_set():  # a request read now is not accepted: the client retries it
                    next_request.cancel()
                    return "draining"
                try:
                    request = next_request.result()
                except StopAsyncIteration:
                    return "eof"
                op = request.WhichOneof("op")
                pending = await self._accept(op, getattr(request, op) if op else None)
                await answers.put((request.request_id, op, pending))
        finally:
            drained.cancel()
            await answers.put(None)

    # -- the two halves of every operation -------------------------------------------------------

    async def _accept(self, op: str, request) -> asyncio.Future:
        """Decode and validate now; queue the engine call. The returned future resolves to the
        response message or a Status, never raises."""
        started = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            if self.draining.is_set():
                raise Unavailable("server is draining and accepts no new operations")
            call, encode = self._prepare(op, request)
            engine_future = await self.pipeline.submit(call)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a Status
            return _done(self._failed(op or "none", exc, started))
        self.metrics.queue_depth.set(self.pipeline.depth)
        return asyncio.ensure_future(self._answer(op, engine_future, encode, started))

    async def _answer(self, op: str, engine_future: asyncio.Future, encode: Callable, started: float):
        try:
            result = await engine_future
            response = encode(result)
        except Exception as exc:  # noqa: BLE001
            return self._failed(op, exc, started)
        self.metrics.queue_depth.set(self.pipeline.depth)
        self.metrics.inflight.dec()
        self.metrics.request_seconds.labels(op).observe(time.perf_counter() - started)
        return response

    def _failed(self, op: str, exc: Exception, started: float) -> status_pb2.Status:
        status = to_status(exc)
        self.metrics.inflight.dec()
        self.metrics.operation_errors.labels(op, code_name(status)).inc()
        self.metrics.request_seconds.labels(op).observe(time.perf_counter() - started)
        return status

    def _prepare(self, op: str, request) -> tuple[Callable, Callable]:
        """(engine call, result encoder) for one operation; raises on invalid input."""
        engine, metrics = self.engine, self.metrics
        if op is None:
            raise InvalidInput([FieldViolation("op", "set exactly one operation")])
        if op in ("forward", "forward_backward"):
            samples, loss_fn, config = convert.decode_forward_backward(request)
            engine.validate(samples, loss_fn, config)
            run = engine.forward if op == "forward" else engine.forward_backward

            def encode_batch(result):
                metrics.observe_batch(op, loss_fn, result.stats)
                return convert.encode_batch_result(result)

            return (lambda: run(samples, loss_fn, config)), encode_batch
        if op == "optim_step":
            adam = convert.decode_adam_params(request)

            def encode_step(result):
                metrics.observe_step(result.grad_norm)
                return pb.OptimStepResponse(grad_norm=result.grad_norm, step=result.step, metrics={
                    "grad_norm:max": result.grad_norm, "learning_rate:max": result.learning_rate})

            return (lambda: engine.optim_step(adam)), encode_step
        if op == "save_state":
            state_dir(engine.config.checkpoint_dir, request.name)  # reject a bad name before queueing
            return (lambda: (engine.save_state(request.name), engine.info().step)), (
                lambda r: pb.SaveStateResponse(name=request.name, path=str(r[0]), step=r[1]))
        if op == "load_state":
            state_dir(engine.config.checkpoint_dir, request.name)
            return (lambda: engine.load_state(request.name, request.with_optimizer)), (
                lambda step: pb.LoadStateResponse(name=request.name, step=step))
        if op == "get_info":
            return engine.info, lambda info: convert.encode_info(info, self.limits, self.world_size)
        raise AssertionError(f"unknown op {op}")


def add_training_service(servicer: TrainingServicer, server: grpc.aio.Server) -> None:
    """Register the TrainingService on `server`."""
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)


def _done(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
