"""The operations every door serves: one typed handler per operation, in one table.

An `Operation` (cispo.service.operation) names what a request does (`name`: the metrics label, the log's `op=` and the
field of cispo.v1.StreamRequest's oneof; `method`: its gRPC method), the typed cispo.v1
request and response messages (the schema every door shares), its handler, its lane rule and
whether idempotency keys apply. `OPERATIONS` maps each name to its operation; an operation
added here is reachable from every door.

A handler validates its request at once (raising the worker's typed errors: InvalidInput,
LimitExceeded, ...) and returns a `Prepared`: the engine call, run later on the engine thread
in the request's lane, and the encoder of its result. It runs on a codec thread, never on the
event loop.

What a door uses (the data plane is `cispo.service.data_plane.Operations`):

    operations = Operations(runs, pipeline, metrics, limits, world_size, idempotency, base_model)
    response = await operations.call(FORWARD_BACKWARD, request)   # or raises OperationFailed
    decoded = await operations.prepare(SAVE_STATE, request)       # validate now ...
    answer = await (await operations.accept(decoded, started))    # ... queue, await: response or Status
    await operations.check_export(path)          # may the caller read this export? (raises if not)
    operations.base_model()                      # BaseModel(name, architecture, tokenizer_id)
    operations.limits, operations.draining       # RequestLimits; an asyncio.Event set by a drain
    OPERATIONS[name], FORWARD, ..., DELETE_CHECKPOINT  # the table and its entries

Errors are mapped to google.rpc.Status in one place, `cispo.service.errors.to_status`.
"""

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from cispo.service import checkpoint_operations, convert
from cispo.service.errors import clip
from cispo.service.operation import Backend, Call, Handler, Operation, Prepared
from cispo.service.pipeline import Batchable
from cispo.service.versions import stamped
from cispo.v1 import training_pb2 as pb
from cispo.worker import FieldViolation, InvalidInput, checkpoints
from cispo.worker.checkpoint import NAME_PATTERN, STATE_FORMATS, check_home, labelled, name_in, state_dir
from cispo.worker.checkpoints import SaveLabel
from cispo.worker.protocols import RunRegistry, TrainingEngine
from cispo.worker.runs import DEFAULT_RUN, RunVersion

# -- the handlers ---------------------------------------------------------------------------------


def _batch(backward: bool) -> Handler[pb.ForwardBackwardInput, pb.ForwardBackwardOutput]:
    """Forward (backward=False) or ForwardBackward: the batch decoded and validated now."""

    def handle(call: Call, request: pb.ForwardBackwardInput) -> Prepared[pb.ForwardBackwardOutput]:
        server, lane = call.server, call.lane
        limits = server.limits
        batch, loss_fn, config = convert.decode_forward_backward(
            request, limits.max_data_per_request, limits.max_tokens_per_request
        )
        loss, resolved = server.runs.validate(batch, loss_fn, config)
        held = [batch]  # dropped once run: the Prepared outlives the call
        typed = request.typed_outputs

        def run() -> tuple[Any, RunVersion]:
            try:  # the batch validated above, as it is
                result, version = call.on_run(
                    lambda engine: engine.run_batch(held[0], loss, resolved, backward=backward)
                )
            finally:
                held.clear()
            server.metrics.observe_batch(call.op, loss_fn, result.stats, lane)  # engine thread: see forget_run
            return result, version

        def encode(answer: tuple[Any, RunVersion]) -> tuple[pb.ForwardBackwardOutput, dict[str, object]]:
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

        return Prepared(run, encode)

    return handle


def _optim_step(call: Call, request: pb.OptimStepRequest) -> Prepared[pb.OptimStepResponse]:
    adam = convert.decode_adam_params(request)
    metrics, lane = call.server.metrics, call.lane

    def step() -> tuple[Any, RunVersion]:
        result, version = call.on_run(lambda engine: engine.optim_step(adam))
        metrics.observe_step(result.grad_norm, lane)
        return result, version

    def encode(answer: tuple[Any, RunVersion]) -> tuple[pb.OptimStepResponse, dict[str, object]]:
        result, version = answer
        response = pb.OptimStepResponse(
            grad_norm=result.grad_norm,
            step=result.step,
            metrics={"grad_norm:max": result.grad_norm, "learning_rate:max": result.learning_rate},
        )
        return stamped(response, version), {"grad_norm": result.grad_norm, "step": result.step}

    return Prepared(step, encode)


def _sample(call: Call, request: pb.SampleRequest) -> Prepared[pb.SampleResponse]:
    runs, metrics = call.server.runs, call.server.metrics
    sample = runs.validate_sample(convert.decode_sample_request(request, call.owner))
    typed = request.typed_outputs

    def encode(answer: tuple[Any, RunVersion]) -> tuple[pb.SampleResponse, dict[str, object]]:
        result, version = answer
        metrics.observe_sample(result)
        return stamped(convert.encode_sample_result(result, typed), version), {
            "sequences": len(result.sequences),
            "sampled_tokens": sum(len(s.tokens) for s in result.sequences),
        }

    share = Batchable(
        (call.model_id, sample, call.expected), runs.sample, sample.cost, runs.config.sampling.max_sample_request_tokens
    )
    return Prepared(share, encode)


def _save_weights_for_sampler(
    call: Call, request: pb.SaveWeightsForSamplerRequest
) -> Prepared[pb.SaveWeightsForSamplerResponse]:
    name, merged, owner, runs = request.name, request.merged, call.owner, call.server.runs
    state_dir(runs.config.export.sampler_dir, name)  # reject a bad name before queueing
    label = _label(call, request)

    def save(engine: TrainingEngine) -> Any:
        lora = runs.info(call.lane, owner).lora
        adapter = lora is not None and not merged

        def size() -> int:
            parameters = engine.info().num_parameters if adapter else runs.base_info().num_parameters
            return checkpoints.export_bytes(parameters, runs.config.export.dtype)

        checkpoints.check_room(runs.config, owner, checkpoints.SAMPLER_WEIGHTS, name, size)
        with labelled(label.fields(lora.to_dict() if adapter and lora is not None else None)):
            return engine.save_weights_for_sampler(name, owner=owner, merged=merged)

    def encode(answer: tuple[Any, RunVersion]) -> tuple[pb.SaveWeightsForSamplerResponse, dict[str, object]]:
        path, version = answer
        response = pb.SaveWeightsForSamplerResponse(name=name, path=str(path.absolute()), step=version.step)
        return stamped(response, version), {"name": name, "step": version.step}

    return Prepared(lambda: call.on_run(save), encode)


def _save_state(call: Call, request: pb.SaveStateRequest) -> Prepared[pb.SaveStateResponse]:
    name, owner, config = request.name, call.owner, call.server.runs.config
    state_dir(config.checkpoint_dir, name)  # reject a bad name before queueing
    label = _label(call, request)

    def save(engine: TrainingEngine) -> Any:
        def size() -> int:
            return checkpoints.state_bytes(engine.info().num_parameters)

        checkpoints.check_room(config, owner, checkpoints.STATE, name, size)
        with labelled(label.fields()):
            return engine.save_state(name, owner=owner)

    def encode(answer: tuple[Any, RunVersion]) -> tuple[pb.SaveStateResponse, dict[str, object]]:
        path, version = answer
        return stamped(pb.SaveStateResponse(name=name, path=str(path), step=version.step), version), {
            "name": name,
            "step": version.step,
        }

    return Prepared(lambda: call.on_run(save), encode)


def _load_state(call: Call, request: pb.LoadStateRequest) -> Prepared[pb.LoadStateResponse]:
    owner, with_optimizer = call.owner, request.with_optimizer
    name = _state_name(call.server.runs, request.name, "name", owner)

    def encode(answer: tuple[int, RunVersion]) -> tuple[pb.LoadStateResponse, dict[str, object]]:
        step, version = answer
        return stamped(pb.LoadStateResponse(name=name, step=step), version), {"name": name, "step": step}

    return Prepared(lambda: call.on_run(lambda engine: engine.load_state(name, with_optimizer, owner=owner)), encode)


def _get_info(call: Call, request: pb.GetInfoRequest) -> Prepared[pb.GetInfoResponse]:
    return Prepared(lambda: _info(call.server, call.model_id, call.owner), lambda info: (info, {}))


def _create_model(call: Call, request: pb.CreateModelRequest) -> Prepared[pb.CreateModelResponse]:
    server = call.server
    if request.base_model and request.base_model not in server.base_names:
        raise InvalidInput(
            [
                FieldViolation(
                    "base_model",
                    f"{clip(request.base_model, 80)!r} is not the model this server "
                    f"serves; give '{server.base_model}' or leave it empty",
                )
            ]
        )
    create = _creation(server.runs, request, call.owner)

    def create_run() -> tuple[str, pb.GetInfoResponse]:
        created = create()
        server.metrics.add_run(created)
        return created, _info(server, created, call.owner)

    def encode(answer: tuple[str, pb.GetInfoResponse]) -> tuple[pb.CreateModelResponse, dict[str, object]]:
        model_id, info = answer
        return pb.CreateModelResponse(model_id=model_id, info=info), {"model_id": model_id}

    return Prepared(create_run, encode)


def _list_models(call: Call, request: pb.ListModelsRequest) -> Prepared[pb.ListModelsResponse]:
    def encode(infos: list) -> tuple[pb.ListModelsResponse, dict[str, object]]:
        return pb.ListModelsResponse(models=[convert.encode_run_info(i) for i in infos]), {"runs": len(infos)}

    return Prepared(lambda: call.server.runs.list_runs(call.owner), encode)


def _unload_model(call: Call, request: pb.UnloadModelRequest) -> Prepared[pb.UnloadModelResponse]:
    server, model_id = call.server, call.model_id
    if not model_id:
        raise InvalidInput([FieldViolation("model_id", "name the run to unload")])

    def unload() -> None:
        server.runs.unload(model_id, call.owner)
        server.versions.unloaded(call.connection, model_id)
        server.metrics.forget_run(model_id)

    return Prepared(unload, lambda _: (pb.UnloadModelResponse(model_id=model_id), {"model_id": model_id}))


# -- what handlers share --------------------------------------------------------------------------


def _info(server: Backend, model_id: str, owner: str | None) -> pb.GetInfoResponse:
    """GetInfo of run `model_id` ("": the default run if it is live, else the base alone)."""
    runs = server.runs
    run = None
    if model_id or any(r.model_id == DEFAULT_RUN for r in runs.list_runs(owner)):
        run = runs.info(model_id or DEFAULT_RUN, owner)
        engine_info = runs.get(run.model_id, owner).info()
    else:
        engine_info = runs.base_info()
    response = convert.encode_info(
        engine_info,
        server.limits,
        server.world_size,
        run=run,
        base_model=server.base_model,
        num_runs=len(runs),
        max_runs=runs.max_runs,
    )
    return stamped(response, run.version if run is not None else None)


def _state_name(runs: RunRegistry, name_or_path: str, field: str, owner: str | None) -> str:
    """The state a request names: by name, or by the path SaveState answered, which must lie in
    this server's checkpoint directory; a path in another identity's home is answered as a
    missing state is."""
    root = runs.config.checkpoint_dir
    name = name_in(root, name_or_path, field, "state")
    check_home(root, name_or_path, owner, STATE_FORMATS)
    return name


def _creation(runs: RunRegistry, request: pb.CreateModelRequest, owner: str | None) -> Callable[[], str]:
    """The call that makes the run CreateModel asks for (validated here)."""
    kind = request.WhichOneof("kind")
    if kind == "from_state":
        ref = request.from_state
        name = _state_name(runs, ref.path, "from_state.path", owner)
        return lambda: runs.create_from_state(owner, name, ref.with_optimizer)
    if kind == "full_fine_tuning":
        return lambda: runs.create(owner, None)
    spec = convert.decode_lora_config(request.lora_config)
    return lambda: runs.create(owner, spec)


def _label(call: Call, request: pb.SaveStateRequest | pb.SaveWeightsForSamplerRequest) -> SaveLabel:
    """What a save records beside its files (checked now: InvalidInput naming the field)."""
    ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
    return SaveLabel(dict(request.user_metadata), ttl, call.lane)


def model_id_of(request: Message) -> str:
    """The request's run id, checked ("" = the default run, or a request that names none)."""
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


# -- the table ------------------------------------------------------------------------------------

GET_INFO = Operation("get_info", "GetInfo", pb.GetInfoRequest, pb.GetInfoResponse, _get_info, per_run=True, keyed=False)
FORWARD = Operation(
    "forward",
    "Forward",
    pb.ForwardBackwardInput,
    pb.ForwardBackwardOutput,
    _batch(backward=False),
    per_run=True,
    keyed=True,
)
FORWARD_BACKWARD = Operation(
    "forward_backward",
    "ForwardBackward",
    pb.ForwardBackwardInput,
    pb.ForwardBackwardOutput,
    _batch(backward=True),
    per_run=True,
    keyed=True,
)
OPTIM_STEP = Operation(
    "optim_step", "OptimStep", pb.OptimStepRequest, pb.OptimStepResponse, _optim_step, per_run=True, keyed=True
)
SAVE_STATE = Operation(
    "save_state", "SaveState", pb.SaveStateRequest, pb.SaveStateResponse, _save_state, per_run=True, keyed=True
)
LOAD_STATE = Operation(
    "load_state", "LoadState", pb.LoadStateRequest, pb.LoadStateResponse, _load_state, per_run=True, keyed=True
)
SAVE_WEIGHTS_FOR_SAMPLER = Operation(
    "save_weights_for_sampler",
    "SaveWeightsForSampler",
    pb.SaveWeightsForSamplerRequest,
    pb.SaveWeightsForSamplerResponse,
    _save_weights_for_sampler,
    per_run=True,
    keyed=True,
)
SAMPLE = Operation("sample", "Sample", pb.SampleRequest, pb.SampleResponse, _sample, per_run=True, keyed=True)
CREATE_MODEL = Operation(
    "create_model",
    "CreateModel",
    pb.CreateModelRequest,
    pb.CreateModelResponse,
    _create_model,
    per_run=False,
    keyed=True,
)
LIST_MODELS = Operation(
    "list_models", "ListModels", pb.ListModelsRequest, pb.ListModelsResponse, _list_models, per_run=False, keyed=False
)
UNLOAD_MODEL = Operation(
    "unload_model",
    "UnloadModel",
    pb.UnloadModelRequest,
    pb.UnloadModelResponse,
    _unload_model,
    per_run=True,
    keyed=True,
)
REMOVE_EXPORT = Operation(
    "remove_export",
    "RemoveExport",
    pb.RemoveExportRequest,
    pb.RemoveExportResponse,
    checkpoint_operations.remove_export,
    per_run=True,
    keyed=True,
)
LIST_CHECKPOINTS = Operation(
    "list_checkpoints",
    "ListCheckpoints",
    pb.ListCheckpointsRequest,
    pb.ListCheckpointsResponse,
    checkpoint_operations.list_checkpoints,
    per_run=False,
    keyed=False,
)
"""The caller's saved states and sampler weights, with their lifetimes, sizes and metadata."""
GET_CHECKPOINT = Operation(
    "get_checkpoint",
    "GetCheckpoint",
    pb.GetCheckpointRequest,
    pb.GetCheckpointResponse,
    checkpoint_operations.get_checkpoint,
    per_run=False,
    keyed=False,
)
"""One of the caller's checkpoints, by name and kind or by the path its save answered."""
DELETE_CHECKPOINT = Operation(
    "delete_checkpoint",
    "DeleteCheckpoint",
    pb.DeleteCheckpointRequest,
    pb.DeleteCheckpointResponse,
    checkpoint_operations.delete_checkpoint,
    per_run=True,
    keyed=True,
)
"""Deletes one of the caller's checkpoints, crash-safely, in its run's order (REMOVE_EXPORT is
its special case for sampler weights by name)."""

OPERATIONS: dict[str, Operation[Any, Any]] = {
    op.name: op
    for op in (
        GET_INFO,
        FORWARD,
        FORWARD_BACKWARD,
        OPTIM_STEP,
        SAVE_STATE,
        LOAD_STATE,
        SAVE_WEIGHTS_FOR_SAMPLER,
        SAMPLE,
        CREATE_MODEL,
        LIST_MODELS,
        UNLOAD_MODEL,
        REMOVE_EXPORT,
        LIST_CHECKPOINTS,
        GET_CHECKPOINT,
        DELETE_CHECKPOINT,
    )
}
