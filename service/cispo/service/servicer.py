"""cispo.v1.TrainingService: decode, validate, queue on the pipeline, encode, map errors.

Requests arrive as bytes (the handlers' deserializer is the identity), so that everything that
can go wrong with a body is answered here, as a Status, and not by gRPC with UNKNOWN: a body
that does not parse is INVALID_ARGUMENT naming its message type, a body over the message limit
is RESOURCE_EXHAUSTED, and on a Stream either gets an error answer of its own while the stream
goes on. Parsing, validation and encoding run on a small thread pool, never on the event loop,
so a pathological request cannot stall health checks, metrics or other clients.

Every operation goes through `_accept` (decode + validate off the loop, idempotency, then queue)
and `_answer` (await the engine, encode, record metrics, log one line). Once accepted, an
operation is answered whatever happens to its caller: the answer task is shielded from the
call's cancellation, so its idempotency key still records the result for a retry.
"""

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status

from cispo.service import convert
from cispo.service.auth import current_identity
from cispo.service.errors import Unavailable, clip, code_name, to_status
from cispo.service.idempotency import IdempotencyCache, check_key, fingerprint
from cispo.service.limits import RequestLimits
from cispo.service.log_limits import RateLimitedLog
from cispo.service.metrics import ServiceMetrics
from cispo.service.pipeline import Batchable, OperationPipeline
from cispo.service.versions import CONNECTION, RunVersions, stamped, take_expected
from cispo.v1 import training_pb2 as pb
from cispo.worker import EngineInfo, FieldViolation, InvalidInput, LimitExceeded
from cispo.worker.checkpoint import NAME_PATTERN, STATE_FORMATS, check_home, name_in, state_dir
from cispo.worker.runs import DEFAULT_RUN

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Answers a stream keeps in flight before it stops reading (bounds per-stream memory).
STREAM_WINDOW = 64
# Unary method -> (operation, request message type).
UNARY_METHODS: dict[str, tuple[str, type]] = {
    "GetInfo": ("get_info", pb.GetInfoRequest),
    "Forward": ("forward", pb.ForwardBackwardInput),
    "ForwardBackward": ("forward_backward", pb.ForwardBackwardInput),
    "OptimStep": ("optim_step", pb.OptimStepRequest),
    "SaveState": ("save_state", pb.SaveStateRequest),
    "LoadState": ("load_state", pb.LoadStateRequest),
    "SaveWeightsForSampler": ("save_weights_for_sampler", pb.SaveWeightsForSamplerRequest),
    "Sample": ("sample", pb.SampleRequest),
    "CreateModel": ("create_model", pb.CreateModelRequest),
    "ListModels": ("list_models", pb.ListModelsRequest),
    "UnloadModel": ("unload_model", pb.UnloadModelRequest),
}
# Threads that parse, validate and encode (they hold the GIL in turns with the event loop).
CODEC_THREADS = 2


@dataclass(frozen=True)
class Prepared:
    """A decoded, validated operation, ready to queue."""

    call: Callable[[], Any] | Batchable  # the engine call (or a share of one); runs on the engine thread
    encode: Callable[[Any], tuple[Any, dict]]  # engine result -> (response message, log fields)
    idempotency_key: str
    fingerprint: bytes
    lane: str | None  # the pipeline lane: the run's id; None for operations on the set of runs


@dataclass(frozen=True)
class Decoded:
    """One request off the wire: its op and either the prepared operation or why it failed."""

    op: str
    request_id: str = ""
    prepared: Prepared | None = None
    error: Exception | None = None


class TrainingServicer:
    def __init__(
        self,
        runs,
        pipeline: OperationPipeline,
        metrics: ServiceMetrics,
        limits: RequestLimits,
        world_size: int = 1,
        idempotency: IdempotencyCache | None = None,
        base_model: str = "",
    ):
        """`runs`: the training runs (worker.runs.TrainingRuns, or worker.group.GroupRuns); `base_model`: the
        name CreateModel may give the served model."""
        self.runs = runs
        self.base_model = base_model or runs.policy.name
        self.pipeline = pipeline
        self.metrics = metrics
        metrics.track_runs(runs)
        self.limits = limits
        self.world_size = world_size
        self.idempotency = idempotency or IdempotencyCache()
        self.versions = RunVersions(runs)
        self.draining = asyncio.Event()
        self._codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="cispo-codec")
        self._rejections = RateLimitedLog(log, period_seconds=10.0)

    def close(self) -> None:
        self._codec.shutdown(wait=False, cancel_futures=True)

    # -- unary ----------------------------------------------------------------------------------

    def unary_behavior(self, method: str):
        op, message_type = UNARY_METHODS[method]

        async def behavior(body: bytes, context):
            started = time.perf_counter()
            CONNECTION.set(context.peer())
            decoded = await self._decode(lambda: self._decode_unary(op, message_type, body))
            answer = await asyncio.shield(await self._accept(decoded, started))
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

    async def Stream(self, request_iterator, context):
        CONNECTION.set(context.peer())
        answers: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(request_iterator, answers))
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
            if reader.result() == "draining":
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"server is draining: {answered} requests of this stream were answered, "
                    "later ones were not accepted",
                )
        finally:
            reader.cancel()

    async def _read_stream(self, request_iterator, answers: asyncio.Queue) -> str:
        """Accept requests in order until the stream ends ("eof"), breaks ("broken") or the
        server drains ("draining"). Every accepted request's answer is queued before this ends."""
        requests = request_iterator.__aiter__()
        drained = asyncio.ensure_future(self.draining.wait())
        try:
            while True:
                next_request = asyncio.ensure_future(requests.__anext__())
                next_request.add_done_callback(_retrieve)  # it may end unawaited when the call does
                await asyncio.wait({next_request, drained}, return_when=asyncio.FIRST_COMPLETED)
                if self.draining.is_set():  # a request read now is not accepted: the client retries it
                    next_request.cancel()
                    return "draining"
                try:
                    body = next_request.result()
                except StopAsyncIteration:
                    return "eof"
                except Exception:
                    return "broken"
                started = time.perf_counter()
                decoded = await self._decode(lambda body=body: self._decode_stream_item(body))
                if self.draining.is_set():
                    return "draining"
                pending = await self._accept(decoded, started)
                await answers.put((decoded.request_id, decoded.op, pending))
        finally:
            drained.cancel()
            await answers.put(None)

    # -- for other fronts (HTTP): the same operations, prepared and accepted in two steps --------

    async def prepare(self, op: str, request) -> Decoded:
        """Decode and validate `request` of `op` on a codec thread, in the caller's context (its
        identity); nothing is queued. A Decoded with `error` set for a bad request."""

        def decode() -> Decoded:
            try:
                return Decoded(op, prepared=self._prepare(op, request))
            except Exception as exc:
                return Decoded(op, error=exc)

        return await self._decode(decode)

    async def accept(self, decoded: Decoded, started: float, promised: bool = False) -> asyncio.Future:
        """Queue a prepared operation in its run's order, as gRPC's are (idempotency keys
        included). The future of its answer: a response message or a google.rpc.Status.
        `promised`: its client was already told it is accepted (an HTTP request id), so it is
        queued even while the server drains."""
        return await self._accept(decoded, started, promised)

    async def check_export(self, path: str) -> None:
        """Raise the worker's InvalidInput or StateNotFound (as for a missing export) unless the
        caller's identity may read the saved sampler weights `path` (a name, or a path their save
        answered); on a codec thread, at once, not in any run's order."""
        owner = current_identity()
        await asyncio.get_running_loop().run_in_executor(self._codec, self.runs.check_export, path, owner)

    # -- decoding (on the codec threads) ---------------------------------------------------------

    async def _decode(self, decode: Callable[[], Decoded]) -> Decoded:
        """Run `decode` on a codec thread, in this call's context (its identity)."""
        return await asyncio.get_running_loop().run_in_executor(self._codec, contextvars.copy_context().run, decode)

    def _decode_unary(self, op: str, message_type: type, body: bytes) -> Decoded:
        try:
            self._check_size(message_type, body)
            return Decoded(op, prepared=self._prepare(op, self._parse(message_type, body)))
        except DecodeError:  # a datum the lazy parse kept as bytes does not parse
            return Decoded(op, error=self._parse_error(message_type, body))
        except Exception as exc:
            return Decoded(op, error=exc)

    def _decode_stream_item(self, body: bytes) -> Decoded:
        try:
            request = self._parse(pb.StreamRequest, body)
        except Exception as exc:
            return Decoded("none", error=exc)
        op = request.WhichOneof("op")
        try:
            self._check_size(pb.StreamRequest, body)  # after parsing, to answer with its request_id
            if op is None:
                raise InvalidInput([FieldViolation("op", "set exactly one operation")])
            return Decoded(op, request.request_id, prepared=self._prepare(op, getattr(request, op)))
        except DecodeError:  # as if the body had not parsed
            return Decoded("none", error=self._parse_error(pb.StreamRequest, body))
        except Exception as exc:
            return Decoded(op or "none", request.request_id, error=exc)

    def _check_size(self, message_type: type, body: bytes) -> None:
        limit = self.limits.max_message_bytes
        if len(body) > limit:
            raise LimitExceeded(
                "max_message_bytes",
                f"{message_type.DESCRIPTOR.full_name} of {len(body)} bytes is over the limit max_message_bytes={limit}",
            )

    @staticmethod
    def _parse(message_type: type, body: bytes, lazy: bool = True):
        """`body` as a `message_type` (its lazy form, if it has one: see convert.LAZY)."""
        try:
            return (convert.LAZY.get(message_type, message_type) if lazy else message_type).FromString(body)
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

    def _parse_error(self, message_type: type, body: bytes) -> InvalidInput:
        """Why `body` does not parse in full (a datum in it does not)."""
        try:
            self._parse(message_type, body, lazy=False)
        except InvalidInput as exc:
            return exc
        raise AssertionError("a datum that does not parse in a body that does")

    def _prepare(self, op: str, request) -> Prepared:
        """The engine call and result encoder of one operation; raises on invalid input. The
        call finds its run when it executes, in its run's lane, so it sees every earlier
        CreateModel and UnloadModel."""
        runs, metrics = self.runs, self.metrics
        key = getattr(request, "idempotency_key", "")
        check_key(key)
        expected = take_expected(request)  # before the fingerprint: a retry may expect another version
        digest = fingerprint(op, request) if key else b""
        owner = current_identity()
        model_id = _model_id(request)
        lane = model_id or DEFAULT_RUN
        connection = CONNECTION.get()

        def on_run(fn: Callable[[Any], Any]) -> tuple[Any, Any]:
            """(fn(engine), the run's version after it), if the run is the version expected."""
            return self.versions.apply(op, model_id, owner, expected, connection, fn)

        def prepared(call, encode, keyed: bool = True) -> Prepared:
            return Prepared(call, encode, key if keyed else "", digest if keyed else b"", lane)

        if op in ("forward", "forward_backward"):
            batch, loss_fn, config = convert.decode_forward_backward(
                request, self.limits.max_data_per_request, self.limits.max_tokens_per_request
            )
            loss, resolved = runs.validate(batch, loss_fn, config)
            held = [batch]  # dropped once run: the Prepared outlives the call
            typed = request.typed_outputs

            def call():
                try:  # the batch validated above, as it is
                    result, version = on_run(
                        lambda engine: engine.run_batch(held[0], loss, resolved, backward=op == "forward_backward")
                    )
                finally:
                    held.clear()
                metrics.observe_batch(op, loss_fn, result.stats, lane)  # on the engine thread: see forget_run
                return result, version

            def encode_batch(answer):
                result, version = answer
                stats = result.stats
                active = max(stats.active_tokens, 1)
                response = stamped(convert.encode_batch_result(result, typed), version)
                _release(result.logprobs)  # here, one by one, not all at once on the event loop
                return response, {
                    "tokens": stats.tokens,
                    "loss": stats.loss_sum,
                    "clip_rate": (stats.clipped_high + stats.clipped_low) / active,
                }

            return prepared(call, encode_batch)
        if op == "optim_step":
            adam = convert.decode_adam_params(request)

            def step():
                result, version = on_run(lambda engine: engine.optim_step(adam))
                metrics.observe_step(result.grad_norm, lane)
                return result, version

            def encode_step(answer):
                result, version = answer
                return stamped(
                    pb.OptimStepResponse(
                        grad_norm=result.grad_norm,
                        step=result.step,
                        metrics={"grad_norm:max": result.grad_norm, "learning_rate:max": result.learning_rate},
                    ),
                    version,
                ), {"grad_norm": result.grad_norm, "step": result.step}

            return prepared(step, encode_step)
        if op == "sample":
            sample = runs.validate_sample(convert.decode_sample_request(request, owner))
            typed = request.typed_outputs

            def encode_sample(answer):
                result, version = answer
                metrics.observe_sample(result)
                return stamped(convert.encode_sample_result(result, typed), version), {
                    "sequences": len(result.sequences),
                    "sampled_tokens": sum(len(s.tokens) for s in result.sequences),
                }

            batch = Batchable(
                (model_id, sample, expected), runs.sample, sample.cost, runs.config.sampling.max_sample_request_tokens
            )
            return prepared(batch, encode_sample)
        if op == "save_weights_for_sampler":
            name, merged = request.name, request.merged
            state_dir(runs.config.export.sampler_dir, name)

            def save_export():
                return on_run(lambda engine: engine.save_weights_for_sampler(name, owner=owner, merged=merged))

            return prepared(
                save_export,
                lambda r: (
                    stamped(
                        pb.SaveWeightsForSamplerResponse(name=name, path=str(r[0].absolute()), step=r[1].step), r[1]
                    ),
                    {"name": name, "step": r[1].step},
                ),
            )
        if op == "save_state":
            name = request.name
            state_dir(runs.config.checkpoint_dir, name)  # reject a bad name before queueing

            def save():
                return on_run(lambda engine: engine.save_state(name, owner=owner))

            return prepared(
                save,
                lambda r: (
                    stamped(pb.SaveStateResponse(name=name, path=str(r[0]), step=r[1].step), r[1]),
                    {"name": name, "step": r[1].step},
                ),
            )
        if op == "load_state":
            name, with_optimizer = self._state_name(request.name, "name", owner), request.with_optimizer
            return prepared(
                lambda: on_run(lambda engine: engine.load_state(name, with_optimizer, owner=owner)),
                lambda r: (stamped(pb.LoadStateResponse(name=name, step=r[0]), r[1]), {"name": name, "step": r[0]}),
            )
        if op == "get_info":
            return prepared(lambda: self._info(model_id, owner), lambda info: (info, {}), keyed=False)
        if op == "create_model":
            self._check_base_model(request.base_model)
            create = self._creation(request, owner)

            def create_run():
                created = create()
                metrics.add_run(created)
                return created, self._info(created, owner)

            return Prepared(
                create_run,
                lambda r: (pb.CreateModelResponse(model_id=r[0], info=r[1]), {"model_id": r[0]}),
                key,
                digest,
                None,
            )
        if op == "list_models":
            return Prepared(
                lambda: runs.list_runs(owner),
                lambda infos: (
                    pb.ListModelsResponse(models=[convert.encode_run_info(i) for i in infos]),
                    {"runs": len(infos)},
                ),
                "",
                b"",
                None,
            )
        if op == "unload_model":
            if not model_id:
                raise InvalidInput([FieldViolation("model_id", "name the run to unload")])

            def unload():
                runs.unload(model_id, owner)
                self.versions.unloaded(connection, model_id)
                metrics.forget_run(model_id)

            return prepared(unload, lambda _: (pb.UnloadModelResponse(model_id=model_id), {"model_id": model_id}))
        raise AssertionError(f"unknown op {op}")

    def _info(self, model_id: str, owner: str | None) -> pb.GetInfoResponse:
        """GetInfo of run `model_id` ("": the default run if it is live, else the base alone)."""
        runs = self.runs
        run = None
        if model_id or any(r.model_id == DEFAULT_RUN for r in runs.list_runs(owner)):
            run = runs.info(model_id or DEFAULT_RUN, owner)
            engine_info = runs.get(run.model_id, owner).info()
        else:
            engine_info = EngineInfo(
                model_name=runs.policy.name,
                vocab_size=runs.policy.vocab_size,
                max_sequence_length=runs.policy.max_sequence_length,
                device=runs.policy.device.type,
                dtype=str(runs.policy.compute_dtype).removeprefix("torch."),
                num_parameters=sum(p.numel() for p in runs.policy.model.parameters()),
                step=0,
                has_tokenizer=runs.policy.tokenizer is not None,
                eos_token_ids=runs.policy.eos_token_ids,
                sharding=runs.policy.sharding,
            )
        return stamped(
            convert.encode_info(
                engine_info,
                self.limits,
                self.world_size,
                run=run,
                base_model=self.base_model,
                num_runs=len(runs),
                max_runs=runs.max_runs,
            ),
            run.version if run is not None else None,
        )

    def _check_base_model(self, base_model: str) -> None:
        if base_model and base_model not in (self.base_model, self.runs.policy.name):
            raise InvalidInput(
                [
                    FieldViolation(
                        "base_model",
                        f"{clip(base_model, 80)!r} is not the model this server "
                        f"serves; give '{self.base_model}' or leave it empty",
                    )
                ]
            )

    def _state_name(self, name_or_path: str, field: str, owner: str | None) -> str:
        """The state a request names: by name, or by the path SaveState answered, which must lie
        in this server's checkpoint directory; a path in another identity's home is answered as
        a missing state is."""
        root = self.runs.config.checkpoint_dir
        name = name_in(root, name_or_path, field, "state")
        check_home(root, name_or_path, owner, STATE_FORMATS)
        return name

    def _creation(self, request: pb.CreateModelRequest, owner: str | None) -> Callable[[], str]:
        """The call that makes the run CreateModel asks for (validated here)."""
        kind = request.WhichOneof("kind")
        if kind == "from_state":
            ref = request.from_state
            name = self._state_name(ref.path, "from_state.path", owner)
            return lambda: self.runs.create_from_state(owner, name, ref.with_optimizer)
        if kind == "full_fine_tuning":
            return lambda: self.runs.create(owner, None)
        spec = convert.decode_lora_config(request.lora_config)
        return lambda: self.runs.create(owner, spec)

    # -- the two halves of every operation -------------------------------------------------------

    async def _accept(self, decoded: Decoded, started: float, promised: bool = False) -> asyncio.Future:
        """Queue a decoded operation (or replay it by its idempotency key). Returns the future
        of its answer, a response message or a Status; that future never raises."""
        loop = asyncio.get_running_loop()
        op, identity = decoded.op, current_identity()
        self.metrics.inflight.inc()
        placeholder = None
        try:
            if decoded.error is not None:
                raise decoded.error
            if self.draining.is_set() and not promised:
                raise Unavailable("server is draining and accepts no new operations")
            prepared = decoded.prepared
            if prepared.idempotency_key:
                earlier = self.idempotency.lookup(identity, prepared.idempotency_key, prepared.fingerprint)
                if earlier is not None:
                    return asyncio.ensure_future(self._replay(op, earlier, started))
                placeholder = loop.create_future()
                self.idempotency.remember(identity, prepared.idempotency_key, prepared.fingerprint, placeholder)
            engine_future = await self.pipeline.submit(prepared.call, prepared.lane)
        except BaseException as exc:
            if placeholder is not None:
                placeholder.set_result(to_status(Unavailable("the operation was not accepted")))
            if not isinstance(exc, Exception):  # cancelled before it was accepted: nothing to answer
                self.metrics.inflight.dec()
                raise
            return _done(self._failed(op, exc, started))
        self._observe_queue()
        answer = asyncio.ensure_future(
            self._answer(op, engine_future, prepared.encode, started, identity, prepared.lane)
        )
        if placeholder is not None:
            answer.add_done_callback(lambda done: placeholder.set_result(done.result()))
        return answer

    async def _answer(
        self,
        op: str,
        engine_future: asyncio.Future,
        encode: Callable,
        started: float,
        identity: str | None,
        lane: str | None,
    ):
        try:
            result = await engine_future
            response, fields = await asyncio.get_running_loop().run_in_executor(self._codec, encode, result)
        except Exception as exc:
            return self._failed(op, exc, started)
        self._succeeded(op, started, identity, {"run": lane or "-", **fields})
        return response

    async def _replay(self, op: str, earlier: asyncio.Future, started: float):
        """The answer of an earlier request with the same idempotency key."""
        answer = await asyncio.shield(earlier)
        if isinstance(answer, status_pb2.Status):
            self.metrics.inflight.dec()
            self.metrics.operation_errors.labels(op, code_name(answer)).inc()
            return answer
        self._succeeded(op, started, current_identity(), {"replayed": True})
        return answer

    def _succeeded(self, op: str, started: float, identity: str | None, fields: dict) -> None:
        seconds = time.perf_counter() - started
        self._observe_queue()
        self.metrics.inflight.dec()
        self.metrics.request_seconds.labels(op).observe(seconds)
        fields = {"op": op, "identity": identity or "-", "seconds": round(seconds, 4), **fields}
        log.info(" ".join(f"{k}={_short(v)}" for k, v in fields.items()), extra={"fields": fields})

    def _observe_queue(self) -> None:
        self.metrics.queue_depth.set(self.pipeline.depth)
        self.metrics.sampler_queue_depth.set(self.pipeline.batchable_depth)

    def _failed(self, op: str, exc: Exception, started: float) -> status_pb2.Status:
        status = to_status(exc)
        self.metrics.inflight.dec()
        self.metrics.operation_errors.labels(op, code_name(status)).inc()
        self.metrics.request_seconds.labels(op).observe(time.perf_counter() - started)
        who = f"op={op} identity={current_identity() or '-'} code={code_name(status)}"  # a line per period each
        self._rejections.log(who, "%s: %s", who, clip(status.message, 200))
        return status


def _model_id(request) -> str:
    """The request's run id, checked ("" = the default run)."""
    model_id = getattr(request, "model_id", "")
    if model_id and not NAME_PATTERN.fullmatch(model_id):
        raise InvalidInput(
            [
                FieldViolation(
                    "model_id",
                    f"{clip(model_id, 80)!r} is not a run id (CreateModel answers them; empty names the default run)",
                )
            ]
        )
    return model_id


def _release(items: list) -> None:
    """Drop a request's per-datum objects one at a time: freeing 65,536 datums in one go holds
    the GIL (and so the event loop) for hundreds of milliseconds; one by one, other threads run
    between them."""
    while items:
        items.pop()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's exception as seen (asyncio logs unseen ones as errors)."""
    if not future.cancelled():
        future.exception()


def _short(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _done(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def add_training_service(servicer: TrainingServicer, server: grpc.aio.Server) -> None:
    """Register the TrainingService on `server`, with bodies handed over as bytes."""

    def identity(body: bytes) -> bytes:
        return body

    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            servicer.unary_behavior(method),
            request_deserializer=identity,
            response_serializer=lambda message: message.SerializeToString(),
        )
        for method in UNARY_METHODS
    }
    handlers["Stream"] = grpc.stream_stream_rpc_method_handler(
        servicer.Stream, request_deserializer=identity, response_serializer=pb.StreamResponse.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
