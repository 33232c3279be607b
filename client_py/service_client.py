"""ServiceClient: the training runs of one cispo server, as Tinker's ServiceClient has them.

    service = ServiceClient("localhost:50051", token=...)
    training = service.create_lora_training_client(rank=32, seed=0)   # a TrainingClient of a new run
    ...
    resumed = service.create_training_client_from_state_with_optimizer(path)
    service.list_models(); service.unload_model(training.model_id)

Every client it makes shares its connection; `close()` closes them all.
"""

from __future__ import annotations

from typing import Any

from cispo.v1 import training_pb2 as pb

from . import wire
from .client import TrainingClient
from .sampling_client import SamplingClient
from .types import ModelInfo


class ServiceClient:
    def __init__(self, target: str, **connection: Any) -> None:
        """target and connection: as for TrainingClient (token, TLS, timeout, ...)."""
        self._client = TrainingClient(target, **connection)
        self.target = target

    def create_lora_training_client(self, base_model: str = "", rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True,
                                    train_unembed: bool = True) -> TrainingClient:
        """A new LoRA run on the served model (`base_model`: its directory or name, or "")."""
        config = pb.LoraConfig(rank=rank, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed)
        if seed is not None:
            config.seed = seed
        return self._create(pb.CreateModelRequest(base_model=base_model, lora_config=config))

    def create_full_training_client(self, base_model: str = "") -> TrainingClient:
        """A new full fine-tune of the served model (it excludes every other run)."""
        return self._create(pb.CreateModelRequest(base_model=base_model, full_fine_tuning=True))

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        """A new run of the kind saved at `path` (what save_state answered), its weights loaded
        and a fresh optimizer."""
        return self._create(pb.CreateModelRequest(from_state=pb.StateRef(path=path)))

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        """As create_training_client_from_state, with the saved optimizer state and step count."""
        return self._create(pb.CreateModelRequest(from_state=pb.StateRef(path=path, with_optimizer=True)))

    def training_client(self, model_id: str) -> TrainingClient:
        """A client of the existing run `model_id` (see list_models)."""
        return self._client._for_run(model_id)

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A SamplingClient on saved sampler weights (a path save_weights_for_sampler answered)."""
        return SamplingClient(self._client, model_path=model_path)

    def list_models(self) -> list[ModelInfo]:
        """The caller's training runs."""
        response = self._client._unary("ListModels", pb.ListModelsRequest(), "list_models", lambda r: r)
        return [wire.model_info_from_pb(m) for m in response.models]

    def unload_model(self, model_id: str) -> None:
        """Drop run `model_id` with its gradient and optimizer state."""
        self._client._unary("UnloadModel", pb.UnloadModelRequest(model_id=model_id), "unload_model", lambda r: r)

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
