"""ServiceClient: the training runs of one cispo server, as Tinker's ServiceClient has them.

    service = ServiceClient("localhost:50051", token=...)   # or ServiceClient(): env CISPO_TARGET
    training = service.create_lora_training_client(base_model, rank=32, seed=0)  # a new run
    ...
    resumed = service.create_training_client_from_state_with_optimizer(path)
    service.list_models(); service.unload_model(training.model_id)
    service.list_checkpoints(); service.get_checkpoint(path); service.delete_checkpoint(path)

Tinker returns futures of the clients it creates; here creation blocks and the client is its
own resolved future, so `create_lora_training_client(...).result()` and `await ...` work too.
Every client it makes shares its connection; `close()` closes them all.
"""

from __future__ import annotations

import os
from typing import Any

from cispo.v1 import training_pb2 as pb

from . import wire
from .client import TrainingClient
from .sampling_client import SamplingClient
from .types import CheckpointInfo, ModelInfo

DEFAULT_TARGET = "localhost:50051"


class ServiceClient:
    def __init__(
        self,
        target: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        **connection: Any,
    ) -> None:
        """
        target: "host:port" of the server; default `base_url`, else env CISPO_TARGET, else
            localhost:50051.
        api_key: Tinker's name for `token` (the bearer token; default env CISPO_TOKEN).
        user_metadata, project_id: accepted for Tinker's signature; cispo does not use them.
        connection: as for TrainingClient (token, TLS, timeout, ...).
        """
        if api_key is not None:
            if "token" in connection:
                raise ValueError("pass either token or api_key")
            connection["token"] = api_key
        self.target = target or base_url or os.environ.get("CISPO_TARGET") or DEFAULT_TARGET
        self._client = TrainingClient(self.target, **connection)

    def create_lora_training_client(
        self,
        base_model: str = "",
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new LoRA run on the served model (`base_model`: its directory or name, or "").
        user_metadata: accepted for Tinker's signature, not used."""
        config = pb.LoraConfig(rank=rank, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed)
        if seed is not None:
            config.seed = seed
        return self._create(pb.CreateModelRequest(base_model=base_model, lora_config=config))

    def create_full_training_client(self, base_model: str = "") -> TrainingClient:
        """A new full fine-tune of the served model (it excludes every other run)."""
        return self._create(pb.CreateModelRequest(base_model=base_model, full_fine_tuning=True))

    def create_training_client_from_state(self, path: str, base_model: str | None = None) -> TrainingClient:
        """A new run of the kind saved at `path` (what save_state answered), its weights loaded
        and a fresh optimizer. base_model: the served model's name or directory, or None."""
        return self._create(pb.CreateModelRequest(base_model=base_model or "", from_state=pb.StateRef(path=path)))

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None
    ) -> TrainingClient:
        """As create_training_client_from_state, with the saved optimizer state and step count."""
        return self._create(
            pb.CreateModelRequest(base_model=base_model or "", from_state=pb.StateRef(path=path, with_optimizer=True))
        )

    def training_client(self, model_id: str) -> TrainingClient:
        """A client of the existing run `model_id` (see list_models)."""
        return self._client._for_run(model_id)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """A SamplingClient on saved sampler weights (a path save_weights_for_sampler answered).
        A run's current weights are sampled through its TrainingClient's
        create_sampling_client(); sampling the bare base model is not offered."""
        if not model_path:
            raise ValueError(
                "create_sampling_client needs model_path (what save_weights_for_sampler answered); "
                "to sample a run's current weights use its TrainingClient.create_sampling_client()"
            )
        return SamplingClient(self._client, model_path=model_path)

    def list_models(self) -> list[ModelInfo]:
        """The caller's training runs."""
        response = self._client._unary("ListModels", pb.ListModelsRequest(), "list_models", lambda r: r)
        return [wire.model_info_from_pb(m) for m in response.models]

    def unload_model(self, model_id: str) -> None:
        """Drop run `model_id` with its gradient and optimizer state."""
        self._client._unary("UnloadModel", pb.UnloadModelRequest(model_id=model_id), "unload_model", lambda r: r)

    def list_checkpoints(
        self, kind: str | None = None, run_id: str = "", name_prefix: str = ""
    ) -> list[CheckpointInfo]:
        """The caller's saved states and sampler weights, oldest first; `kind` ("state",
        "sampler_weights"; None: both), `run_id` (the run that saved them) and `name_prefix`
        narrow the list."""
        request = pb.ListCheckpointsRequest(
            kind=wire.checkpoint_kind_to_pb(kind), run_id=run_id, name_prefix=name_prefix
        )
        response = self._client._unary("ListCheckpoints", request, "list_checkpoints", lambda r: r)
        return [wire.checkpoint_from_pb(c) for c in response.checkpoints]

    def get_checkpoint(self, path: str, kind: str | None = None) -> CheckpointInfo:
        """One checkpoint: the path its save answered, or its name with its `kind`."""
        request = pb.GetCheckpointRequest(name=path, kind=wire.checkpoint_kind_to_pb(kind))
        response = self._client._unary("GetCheckpoint", request, "get_checkpoint", lambda r: r)
        return wire.checkpoint_from_pb(response.checkpoint)

    def delete_checkpoint(self, path: str, kind: str | None = None, model_id: str = "") -> CheckpointInfo:
        """Delete one checkpoint (the path its save answered, or its name with its `kind`),
        after the operations queued before it on run `model_id`; returns it as it was."""
        request = pb.DeleteCheckpointRequest(name=path, kind=wire.checkpoint_kind_to_pb(kind), model_id=model_id)
        response = self._client._unary("DeleteCheckpoint", request, "delete_checkpoint", lambda r: r)
        return wire.checkpoint_from_pb(response.checkpoint)

    def _create(self, request: pb.CreateModelRequest) -> TrainingClient:
        response = self._client._unary("CreateModel", request, "create_model", lambda r: r)
        return self._client._for_run(response.model_id)

    def close(self, grace: float | None = None) -> None:
        self._client.close(grace)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServiceClient({self.target!r})"
