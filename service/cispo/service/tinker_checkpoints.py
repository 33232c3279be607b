"""The Tinker REST routes of runs and checkpoints (the SDK's `RestClient`), on cispo's own.

| SDK call | route | on cispo |
|---|---|---|
| `list_training_runs`, `get_training_run*` | GET `training_runs`, `training_runs/{run}` | the caller's runs (ListModels) |
| `list_checkpoints(run)` | GET `training_runs/{run}/checkpoints` | its checkpoints `<run>.<name>` (ListCheckpoints) |
| `list_user_checkpoints` | GET `checkpoints` | all of the caller's, newest first |
| `get_weights_info_by_tinker_path` | POST `weights_info` | GetCheckpoint |
| `delete_checkpoint*` | DELETE `training_runs/{run}/checkpoints/{kind}/{name}` | DeleteCheckpoint |
| `get_checkpoint_archive_url*` (SDKs before 0.38) | GET `.../{kind}/{name}/archive` | 302 to a signed URL of a tar (cispo.service.tinker_archive) |

A Tinker checkpoint id is `weights/<name>` (a state) or `sampler_weights/<name>` (an export);
`tinker://<run>/<kind>/<name>` is the cispo checkpoint `<run>.<name>` (cispo.service.
tinker_sessions). Everything goes through the operations layer, as the caller's identity:
another identity's run or checkpoint answers 404, as a missing one does.
"""

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cispo.service import tinker_wire as wire
from cispo.service.auth import current_identity, set_identity
from cispo.service.data_plane import Operations
from cispo.service.errors import clip
from cispo.service.operations import DELETE_CHECKPOINT, GET_CHECKPOINT, LIST_CHECKPOINTS, LIST_MODELS
from cispo.service.tinker_archive import ARCHIVE_SECONDS, ArchiveSigner, Grant, archive_size, open_members, tar_stream
from cispo.service.tinker_body import read_json
from cispo.service.tinker_dispatch import Dispatch
from cispo.service.tinker_errors import HttpError
from cispo.service.tinker_sessions import KINDS, Sessions, run_name, split_path, tinker_path
from cispo.v1 import training_pb2 as pb

DELETE_ROUTE = "training_runs/{run_id}/checkpoints/{kind}/{name}"
"""The one route that takes DELETE (the others take GET and POST)."""
ARCHIVE_ROUTE = "checkpoint_archives/{token}"
"""The route of archive downloads: the token in the URL is the credential, not an API key."""
PB_KINDS = {"weights": pb.CHECKPOINT_KIND_STATE, "sampler_weights": pb.CHECKPOINT_KIND_SAMPLER_WEIGHTS}
TYPES = {"weights": "training", "sampler_weights": "sampler"}  # Tinker's checkpoint_type
DEFAULT_PAGE = 100


def iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat()


def checkpoint_json(checkpoint: pb.Checkpoint) -> dict[str, Any] | None:
    """Tinker's Checkpoint of a cispo one (None for a name no tinker:// path names)."""
    kind = "weights" if checkpoint.kind == pb.CHECKPOINT_KIND_STATE else "sampler_weights"
    path = tinker_path(kind, checkpoint.name)
    if path is None:
        return None
    return {
        "checkpoint_id": path.split("/", 3)[3],
        "checkpoint_type": TYPES[kind],
        "time": iso(checkpoint.created_time),
        "tinker_path": path,
        "size_bytes": checkpoint.size_bytes,
        "public": False,
        "user_metadata": dict(checkpoint.user_metadata) or None,
        "expires_at": iso(checkpoint.expires_time) if checkpoint.HasField("expires_time") else None,
    }


def _page(request: Request, default: int) -> tuple[int, int]:
    """(limit, offset) of the query string."""
    out = []
    for name, fallback in (("limit", default), ("offset", 0)):
        text = request.query_params.get(name, str(fallback))
        if not text.isdigit():
            raise wire.invalid(name, f"must be a non-negative integer, got {clip(text, 40)!r}")
        out.append(int(text))
    return out[0], out[1]


def _not_found(exc: HttpError) -> HttpError:
    """A checkpoint operation's refusal, with a missing checkpoint (FAILED_PRECONDITION) as 404."""
    if exc.extra.get("code") == "FAILED_PRECONDITION":
        return HttpError(404, exc.message, **exc.extra)
    return exc


class TinkerCheckpoints:
    """The handlers of the runs' and checkpoints' routes, over one server's operations."""

    def __init__(self, operations: Operations, sessions: Sessions, dispatch: Dispatch) -> None:
        self.operations, self.sessions, self.dispatch = operations, sessions, dispatch
        self.signer = ArchiveSigner()

    def table(self) -> dict[str, Callable[[Request], Awaitable[Response]]]:
        """Route (under /api/v1/) -> its handler."""
        return {
            "training_runs": self.list_training_runs,
            "training_runs/{run_id}": self.get_training_run,
            "training_runs/{run_id}/checkpoints": self.list_checkpoints,
            DELETE_ROUTE: self.delete_checkpoint,
            "training_runs/{run_id}/checkpoints/{kind}/{name}/archive": self.archive_url,
            "checkpoints": self.list_user_checkpoints,
            "weights_info": self.weights_info,
            ARCHIVE_ROUTE: self.download,
        }

    # -- what the handlers share ----------------------------------------------------------------

    async def _checkpoints(self, prefix: str = "") -> list[pb.Checkpoint]:
        """The caller's checkpoints whose names start with `prefix`, oldest first."""
        listed = await self.dispatch.call(LIST_CHECKPOINTS, pb.ListCheckpointsRequest(name_prefix=prefix))
        return list(listed.checkpoints)

    async def _get(self, kind: str, name: str) -> pb.Checkpoint:
        try:
            answer = await self.dispatch.call(GET_CHECKPOINT, pb.GetCheckpointRequest(name=name, kind=PB_KINDS[kind]))
        except HttpError as exc:
            raise _not_found(exc) from None
        return answer.checkpoint

    async def _runs(self) -> list[pb.ModelInfo]:
        return list((await self.dispatch.call(LIST_MODELS, pb.ListModelsRequest())).models)

    @staticmethod
    def _named(request: Request) -> tuple[str, str, str]:
        """(run, kind, cispo name) of a checkpoint route's path."""
        run, kind, name = (request.path_params[k] for k in ("run_id", "kind", "name"))
        if kind not in KINDS:
            raise HttpError(404, f"no checkpoint kind {clip(kind, 40)!r} (weights or sampler_weights)")
        return run, kind, run_name(run, name)

    def _training_run(self, info: pb.ModelInfo, checkpoints: list[pb.Checkpoint]) -> dict[str, Any]:
        """Tinker's TrainingRun of a cispo run, with its newest checkpoints of `checkpoints`."""
        newest: dict[str, dict[str, Any] | None] = {"weights": None, "sampler_weights": None}
        for checkpoint in checkpoints:  # oldest first: the last of each kind wins
            if checkpoint.name.startswith(f"{info.model_id}.") and (shown := checkpoint_json(checkpoint)):
                newest[shown["checkpoint_id"].split("/")[0]] = shown
        lora = info.lora_config if info.HasField("lora_config") else None
        return {
            "training_run_id": info.model_id,
            "base_model": self.operations.base_model().name,
            "model_owner": current_identity() or "",
            "is_lora": lora is not None,
            "lora_rank": lora.rank if lora is not None else None,
            "corrupted": False,
            "last_request_time": iso(info.last_used),
            "last_checkpoint": newest["weights"],
            "last_sampler_checkpoint": newest["sampler_weights"],
            "user_metadata": self.sessions.run_metadata(info.model_id),
        }

    # -- runs -----------------------------------------------------------------------------------

    async def list_training_runs(self, request: Request) -> Response:
        """The caller's runs, newest first."""
        limit, offset = _page(request, 20)
        runs = sorted(await self._runs(), key=lambda r: r.created, reverse=True)
        checkpoints = await self._checkpoints()
        return JSONResponse(
            {
                "training_runs": [self._training_run(r, checkpoints) for r in runs[offset : offset + limit]],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
            }
        )

    async def get_training_run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        found = [r for r in await self._runs() if r.model_id == run_id]
        if not found:
            raise HttpError(404, f"no training run {clip(run_id, 80)!r}")
        return JSONResponse(self._training_run(found[0], await self._checkpoints(f"{run_id}.")))

    # -- checkpoints ----------------------------------------------------------------------------

    async def list_checkpoints(self, request: Request) -> Response:
        """A run's checkpoints, oldest first: 404 for a run the caller neither has nor saved."""
        run_id = request.path_params["run_id"]
        run_name(run_id, "x")  # a run id as names are checked
        shown = [c for c in map(checkpoint_json, await self._checkpoints(f"{run_id}.")) if c is not None]
        if not shown and all(r.model_id != run_id for r in await self._runs()):
            raise HttpError(404, f"no training run {clip(run_id, 80)!r}")
        return JSONResponse({"checkpoints": shown, "cursor": None})

    async def list_user_checkpoints(self, request: Request) -> Response:
        """All the caller's checkpoints that tinker:// paths name, newest first."""
        limit, offset = _page(request, DEFAULT_PAGE)
        shown = [c for c in map(checkpoint_json, reversed(await self._checkpoints())) if c is not None]
        return JSONResponse(
            {
                "checkpoints": shown[offset : offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(shown)},
            }
        )

    async def weights_info(self, request: Request) -> Response:
        body = await read_json(request, self.operations.limits.max_message_bytes)
        kind, name = split_path(wire.field(body, "tinker_path", (str,)), field="tinker_path")
        checkpoint = await self._get(kind, name)
        lora = checkpoint.lora_config if checkpoint.HasField("lora_config") else None
        return JSONResponse(
            {
                "base_model": self.operations.base_model().name,
                "is_lora": lora is not None,
                "lora_rank": lora.rank if lora is not None else None,
                "train_unembed": lora.train_unembed if lora is not None else None,
                "train_mlp": lora.train_mlp if lora is not None else None,
                "train_attn": lora.train_attn if lora is not None else None,
            }
        )

    async def delete_checkpoint(self, request: Request) -> Response:
        if request.method != "DELETE":
            raise HttpError(405, f"{request.method} {clip(request.url.path, 200)}: only DELETE")
        run, kind, name = self._named(request)
        message = pb.DeleteCheckpointRequest(
            name=name,
            kind=PB_KINDS[kind],
            model_id=run,
            idempotency_key=request.headers.get("x-idempotency-key", ""),
        )
        try:
            await self.dispatch.call(DELETE_CHECKPOINT, message)
        except HttpError as exc:
            raise _not_found(exc) from None
        if kind == "sampler_weights":
            owner = current_identity()
            self.sessions.forget_samplers([name], owner)
            for model in self.sessions.models.values():
                if model.owner == owner and name in model.ephemeral:
                    model.ephemeral.remove(name)
        return Response(status_code=204)

    # -- archives -------------------------------------------------------------------------------

    async def archive_url(self, request: Request) -> Response:
        """A 302 to a signed URL of the checkpoint's tar, good for ARCHIVE_SECONDS; its JSON
        body says the same ({url, expires})."""
        _, kind, name = self._named(request)
        found = await self._get(kind, name)  # the caller's, or 404
        expires = time.time() + ARCHIVE_SECONDS
        token = self.signer.sign(Grant(current_identity(), kind, name, found.created_time, expires))
        url = f"{str(request.base_url).rstrip('/')}/api/v1/checkpoint_archives/{token}"
        return JSONResponse(
            {"url": url, "expires": iso(expires)},
            status_code=302,
            headers={"Location": url, "Expires": formatdate(expires, usegmt=True)},
        )

    async def download(self, request: Request) -> Response:
        """The tar of the checkpoint a signed URL names, as the identity that asked for it."""
        grant = self.signer.check(request.path_params["token"])
        set_identity(grant.owner)
        checkpoint = await self._get(grant.kind, grant.name)
        if checkpoint.created_time != grant.created:  # deleted and saved again under its name
            raise HttpError(404, f"checkpoint {grant.name!r} was replaced since this URL was made: ask for a new one")
        try:
            members = await asyncio.to_thread(open_members, Path(checkpoint.path))
        except FileNotFoundError:
            raise HttpError(404, f"checkpoint {grant.name!r} was deleted or replaced as it was opened") from None
        filename = f"{grant.name}.tar"
        return StreamingResponse(
            tar_stream(members),
            media_type="application/x-tar",
            headers={
                "Content-Length": str(archive_size(members)),
                "Content-Disposition": f'attachment; filename="{filename}"',
            },
        )
