"""The worker's typed seams: what the service may call on an engine and on a run registry.

`Engine` (one process) and `GroupEngine` (a torch.distributed group, driven from rank 0) both
satisfy `TrainingEngine`; `TrainingRuns` and `GroupRuns` both satisfy `RunRegistry`. The service
speaks to these Protocols only, and the type checker holds both implementations to them.
"""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from cispo.worker.batch import Samples
from cispo.worker.checkpoints import CheckpointInfo
from cispo.worker.config import EngineConfig
from cispo.worker.lora import LoraSpec
from cispo.worker.losses import LossFunction
from cispo.worker.optimizer import AdamParams
from cispo.worker.results import BatchResult, EngineInfo, OptimResult
from cispo.worker.run_versions import ExpectedVersion, RunInfo, RunVersion
from cispo.worker.sampling import SampleRequest, SampleResult
from cispo.worker.sharding import MemoryUse

T = TypeVar("T")

# A sample's answer: its result and the version of the run whose current weights it sampled
# (None: saved weights), or the error in its place.
SampleAnswer = tuple[SampleResult, RunVersion | None] | Exception


class TrainingEngine(Protocol):
    """One training run's engine. Every method runs on the engine thread."""

    def info(self) -> EngineInfo:
        """The run's model, step and memory."""
        ...

    def run_batch(
        self, samples: Samples, loss: LossFunction, config: Mapping[str, float], *, backward: bool
    ) -> BatchResult:
        """Target logprobs and loss statistics of validated `samples`; with `backward`, the
        gradient is accumulated too (forward_backward), else nothing changes (forward)."""
        ...

    def optim_step(self, adam: AdamParams) -> OptimResult: ...

    def save_state(self, name: str, owner: str | None = None) -> Path | None:
        """The saved state's path (None only on ranks other than 0 of a group)."""
        ...

    def load_state(self, name: str, with_optimizer: bool = False, owner: str | None = None) -> int: ...

    def validate_sample(self, request: SampleRequest) -> SampleRequest: ...

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult | Exception]: ...

    def save_weights_for_sampler(self, name: str, owner: str | None = None, merged: bool = False) -> Path | None:
        """The saved sampler weights' path (None only on ranks other than 0 of a group)."""
        ...


class RunRegistry(Protocol):
    """The training runs one server holds, over one base model. `owner` is the calling identity
    (None when the server has no tokens); a run another identity owns is answered as missing."""

    @property
    def config(self) -> EngineConfig: ...

    @property
    def max_runs(self) -> int: ...

    def __len__(self) -> int: ...

    def base_info(self) -> EngineInfo:
        """The served base model, described as a run with no training of its own."""
        ...

    def get(self, model_id: str, owner: str | None) -> TrainingEngine: ...

    def info(self, model_id: str, owner: str | None) -> RunInfo: ...

    def list_runs(self, owner: str | None) -> list[RunInfo]: ...

    def create(self, owner: str | None, spec: LoraSpec | None, model_id: str | None = None) -> str: ...

    def create_from_state(
        self, owner: str | None, name: str, with_optimizer: bool, model_id: str | None = None
    ) -> str: ...

    def unload(self, model_id: str, owner: str | None) -> None: ...

    def apply(
        self,
        model_id: str,
        owner: str | None,
        expected: ExpectedVersion,
        op: str,
        fn: Callable[[TrainingEngine], T],
    ) -> tuple[T, RunVersion]: ...

    def validate(
        self, samples: Samples, loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> tuple[LossFunction, dict[str, float]]: ...

    def validate_sample(self, request: SampleRequest) -> SampleRequest: ...

    def sample(self, items: list[tuple[str, SampleRequest, ExpectedVersion]]) -> list[SampleAnswer]:
        """Every (model_id, validated request, expected version)'s answer, in order."""
        ...

    def check_export(self, model_path: str, owner: str | None) -> None: ...

    def delete_checkpoint(self, kind: str, name: str, owner: str | None) -> CheckpointInfo:
        """Delete `owner`'s checkpoint (worker.checkpoints); a loaded export is forgotten too."""
        ...

    def memory_use(self) -> dict[str, MemoryUse]: ...
