"""The Tinker API's routes (`/api/v1/<route>`), one handler each: read the body, map Tinker's names
to cispo's (cispo.service.tinker_sessions), and call or submit the operation (cispo.service.
tinker_dispatch); the bodies' wire forms are cispo.service.tinker_wire's. The RestClient's routes
of runs and checkpoints are cispo.service.tinker_checkpoints'.

Tinker's hosted-platform routes (HOSTED_ONLY) answer 400 "not supported".
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cispo.service import tinker_wire as wire
from cispo.service.auth import current_identity
from cispo.service.data_plane import Operations
from cispo.service.errors import clip
from cispo.service.operation import Operation, Req, Resp
from cispo.service.operations import (
    CREATE_MODEL,
    FORWARD,
    FORWARD_BACKWARD,
    GET_INFO,
    LOAD_STATE,
    OPTIM_STEP,
    REMOVE_EXPORT,
    SAMPLE,
    SAVE_STATE,
    SAVE_WEIGHTS_FOR_SAMPLER,
    UNLOAD_MODEL,
)
from cispo.service.tinker_body import read_body, read_json
from cispo.service.tinker_checkpoints import ARCHIVE_ROUTE, DELETE_ROUTE, TinkerCheckpoints
from cispo.service.tinker_dispatch import Dispatch
from cispo.service.tinker_errors import HttpError
from cispo.service.tinker_futures import FutureTable
from cispo.service.tinker_order import hold_turn
from cispo.service.tinker_sessions import KEPT_EPHEMERAL, Session, Sessions, TinkerModel, parse_path, run_name
from cispo.v1 import training_pb2 as pb
from cispo.worker.errors import StateNotFound

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
PROTOBUF = "application/x-protobuf"
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
UNAUTHENTICATED = ("healthz", "unknown", ARCHIVE_ROUTE)
"""Routes that take no API key (an archive URL is signed instead)."""
DELETES = (DELETE_ROUTE,)
"""Routes that take DELETE besides GET and POST."""


class TinkerRoutes:
    """The handlers of the Tinker API's routes, over one server's operations."""

    def __init__(self, operations: Operations, sessions: Sessions, futures: FutureTable, dispatch: Dispatch) -> None:
        self.operations, self.sessions, self.futures, self.dispatch = operations, sessions, futures, dispatch
        self.limits = operations.limits
        self.checkpoints = TinkerCheckpoints(operations, sessions, dispatch)

    def table(self) -> dict[str, Handler]:
        """Route (under /api/v1/) -> its handler."""
        return {
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
            **self.checkpoints.table(),
            **dict.fromkeys(HOSTED_ONLY, self.hosted_only),
        }

    # -- what the handlers share ----------------------------------------------------------------

    async def _json(self, request: Request) -> dict[str, Any]:
        return await read_json(request, self.limits.max_message_bytes)

    def _model(self, body: dict[str, Any]) -> tuple[TinkerModel, int]:
        """The request's model and seq_id, read first: from here until the request is queued, a
        refusal gives up its turn (the endpoint sees to it), so later requests never wait for it."""
        model = self.sessions.model_named(wire.field(body, "model_id", (str,)))
        seq_id = wire.field(body, "seq_id", (int,), required=False, default=0)
        hold_turn(model.order, seq_id)
        return model, seq_id

    async def _submit_to(
        self,
        model: TinkerModel,
        seq_id: int,
        op: Operation[Req, Resp],
        message: Req,
        encode: Callable[[Resp], Response],
    ) -> Response:
        """A submit of `message` (which expects `model.expected()`) in `model`'s order."""
        request_id = await self.dispatch.submit(op, message, encode, model.order, seq_id)
        return JSONResponse({"request_id": request_id, "model_id": model.tinker_id})

    async def _remove_exports(self, model: TinkerModel, exports: list[str]) -> None:
        """Delete ephemeral exports (in the run's order, after its saves) and their samplers."""
        self.sessions.forget_samplers(exports, model.owner)
        for export in exports:
            try:
                await self.dispatch.call(REMOVE_EXPORT, pb.RemoveExportRequest(name=export, model_id=model.run_id))
            except HttpError as exc:
                log.warning("could not remove the export %s: %s", export, exc.message)

    # -- sessions -------------------------------------------------------------------------------

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
        body = await self._json(request)
        metadata = wire.string_map(body, "user_metadata", strict=False)
        session = Session(f"session-{uuid.uuid4().hex[:16]}", current_identity(), user_metadata=metadata)
        self.sessions.sessions[session.session_id] = session
        return JSONResponse({"session_id": session.session_id, "type": "create_session"})

    async def heartbeat(self, request: Request) -> Response:
        body = await self._json(request)
        session = self.sessions.sessions.get(wire.field(body, "session_id", (str,)))
        if session is None or session.owner != current_identity():
            raise HttpError(410, "no such session")
        session.last_heartbeat = time.monotonic()
        return JSONResponse({"type": "session_heartbeat"})

    async def finish_session(self, request: Request) -> Response:
        """The session's runs are unloaded (their saved states and exports stay)."""
        session = self.sessions.session(request.path_params["session_id"])
        for tinker_id in session.models:
            model = self.sessions.models.pop(tinker_id, None)
            if model is not None:
                await self._remove_exports(model, model.ephemeral)
                try:
                    await self.dispatch.call(UNLOAD_MODEL, pb.UnloadModelRequest(model_id=model.run_id))
                except HttpError as exc:
                    log.info("finishing %s: %s", session.session_id, exc.message)
        self.sessions.forget_session(session)
        return JSONResponse({})

    async def capabilities(self, request: Request) -> Response:
        return JSONResponse({"supported_models": [{"model_name": self.operations.base_model().name}]})

    async def telemetry(self, request: Request) -> Response:
        """The SDK's own telemetry: read (under the body limit) and dropped."""
        await read_body(request, self.limits.max_message_bytes)
        return Response(status_code=204)

    async def hosted_only(self, request: Request) -> Response:
        raise HttpError(
            400,
            f"{request.url.path} is not supported by cispo: it serves Tinker's hosted platform "
            "(see docs/porting-from-tinker.md)",
        )

    async def unknown(self, request: Request) -> Response:
        raise HttpError(404, f"no route {request.method} {clip(request.url.path, 200)}")

    async def retrieve_future(self, request: Request) -> Response:
        body = await self._json(request)
        return await self.futures.retrieve(wire.field(body, "request_id", (str,)))

    # -- models ---------------------------------------------------------------------------------

    async def create_model(self, request: Request) -> Response:
        body = await self._json(request)
        session = self.sessions.session(wire.field(body, "session_id", (str,)))
        model_seq_id = wire.field(body, "model_seq_id", (int,))
        metadata = wire.string_map(body, "user_metadata", strict=False)
        optimizer = body.get("optimizer_config") or {}
        if isinstance(optimizer, dict) and optimizer.get("type", "adamw") != "adamw":
            raise HttpError(400, f"optimizer {optimizer.get('type')!r} is not supported (AdamW only)")
        message = pb.CreateModelRequest(
            base_model=wire.field(body, "base_model", (str,), required=False, default=""),
            lora_config=wire.lora_config(body),
            idempotency_key=request.headers.get("x-idempotency-key", ""),
        )

        def created(response: pb.CreateModelResponse) -> Response:
            model = self.sessions.register(
                session,
                model_seq_id,
                response.model_id,
                response.info.lora_config.rank,
                response.info.version.incarnation,
                metadata,
            )
            return JSONResponse({"model_id": model.tinker_id, "type": "create_model"})

        return JSONResponse({"request_id": await self.dispatch.submit(CREATE_MODEL, message, created)})

    async def get_info(self, request: Request) -> Response:
        body = await self._json(request)
        model = self.sessions.model_named(wire.field(body, "model_id", (str,)))
        info = await self.dispatch.call(GET_INFO, pb.GetInfoRequest(model_id=model.run_id))
        base = self.operations.base_model()
        return JSONResponse(
            {
                "type": "get_info",
                "model_id": model.tinker_id,
                "model_name": base.name,
                "model_data": {"arch": base.architecture, "model_name": base.name, "tokenizer_id": base.tokenizer_id},
                "is_lora": info.HasField("lora_config"),
                "lora_rank": info.lora_config.rank if info.HasField("lora_config") else None,
            }
        )

    async def forward_backward(self, request: Request) -> Response:
        """The protobuf body is read and converted on a worker thread, its shapes and sizes
        checked against the request limits before anything is allocated for it."""
        body = await read_body(request, self.limits.max_message_bytes)
        message = await asyncio.to_thread(wire.forward_backward_request, body)
        del body
        model = self.sessions.model_named(message.model_id)
        hold_turn(model.order, message.seq_id)
        wire.check_limits(message, self.limits)
        key = request.headers.get("x-idempotency-key", "")
        seq_id, op = message.seq_id, FORWARD if message.forward_only else FORWARD_BACKWARD
        converted = await asyncio.to_thread(wire.forward_backward_input, message, model.run_id, key)
        converted.expected_version.CopyFrom(model.expected())
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
            expected_version=model.expected(),
        )
        return await self._submit_to(
            model,
            seq_id,
            OPTIM_STEP,
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
            expected_version=model.expected(),
        )
        wire.lifetime(body, message)
        return await self._submit_to(
            model,
            seq_id,
            SAVE_STATE,
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
            load = pb.LoadStateRequest(
                name=parse_path(path, "weights"),
                with_optimizer=with_optimizer,
                model_id=model.run_id,
                idempotency_key=key,
                expected_version=model.expected(),
            )
            return await self._submit_to(
                model,
                seq_id,
                LOAD_STATE,
                load,
                lambda out: JSONResponse({"path": path, "model_id": model.tinker_id, "type": "load_weights"}),
            )
        session = self.sessions.session(wire.field(body, "session_id", (str,)))
        model_seq_id = wire.field(body, "model_seq_id", (int,))
        path = wire.field(body, "path", (str,))
        with_optimizer = wire.field(body, "optimizer", (bool,), required=False, default=False)
        metadata = wire.string_map(body, "user_metadata", strict=False)
        create = pb.CreateModelRequest(
            base_model=wire.field(body, "base_model", (str,), required=False, default=""),
            from_state=pb.StateRef(path=parse_path(path, "weights"), with_optimizer=with_optimizer),
            idempotency_key=key,
        )

        def created(response: pb.CreateModelResponse) -> Response:
            info = response.info
            rank = info.lora_config.rank if info.HasField("lora_config") else None
            model = self.sessions.register(
                session, model_seq_id, response.model_id, rank, info.version.incarnation, metadata
            )
            return JSONResponse({"path": path, "model_id": model.tinker_id, "type": "load_weights"})

        return JSONResponse({"request_id": await self.dispatch.submit(CREATE_MODEL, create, created)})

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
            name=export,
            model_id=model.run_id,
            idempotency_key=request.headers.get("x-idempotency-key", ""),
            expected_version=model.expected(),
        )
        wire.lifetime(body, message)

        def saved(out: pb.SaveWeightsForSamplerResponse) -> Response:
            if ephemeral is None:
                return JSONResponse({"path": tinker_path, "type": "save_weights_for_sampler"})
            session_id = model.tinker_id.split(":train:")[0]
            sampler = self.sessions.new_sampler(f"{session_id}:sample:{ephemeral}", export, tinker_path)
            model.ephemeral.append(export)
            if len(model.ephemeral) > KEPT_EPHEMERAL:
                self.dispatch.spawn(self._remove_exports(model, [model.ephemeral.pop(0)]))
            return JSONResponse({"sampling_session_id": sampler.sampler_id, "type": "save_weights_for_sampler"})

        return await self._submit_to(model, seq_id, SAVE_WEIGHTS_FOR_SAMPLER, message, saved)

    # -- sampling -------------------------------------------------------------------------------

    async def create_sampling_session(self, request: Request) -> Response:
        body = await self._json(request)
        session = self.sessions.session(wire.field(body, "session_id", (str,)))
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
            await self.operations.check_export(export)
        except StateNotFound as exc:
            raise HttpError(404, str(exc)) from None
        sampler = self.sessions.new_sampler(f"{session.session_id}:sample:{seq}", export, model_path)
        return JSONResponse({"sampling_session_id": sampler.sampler_id, "type": "create_sampling_session"})

    async def get_sampler(self, request: Request) -> Response:
        sampler = self.sessions.sampler(request.path_params["sampler_id"], "sampler")
        return JSONResponse(
            {
                "sampler_id": sampler.sampler_id,
                "base_model": self.operations.base_model().name,
                "model_path": sampler.tinker_path,
            }
        )

    async def asample(self, request: Request) -> Response:
        body = await self._json(request)
        sampler = self.sessions.sampler(wire.field(body, "sampling_session_id", (str,)))
        message = wire.sample_request(body, sampler.export, "")
        message.idempotency_key = request.headers.get("x-idempotency-key", "")
        request_id = await self.dispatch.submit(
            SAMPLE, message, lambda out: Response(wire.sample_response(out), media_type=PROTOBUF)
        )
        return JSONResponse(
            {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(message.num_samples)]}
        )
