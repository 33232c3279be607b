"""Training runs: one served base model, many runs on it, each with its own Engine.

A run is a full fine-tune of the base, or a LoRA adapter on it (worker.lora). Each run has its
own trainable weights, gradient, optimizer state and step count; LoRA runs share the frozen base,
and switching between them is an adapter switch. A full fine-tune changes the base itself, so it
excludes every other run while it lives (RunConflict):

- `create(..., lora=None)` makes a full run only when no run is live;
- `create(..., lora=spec)` makes a LoRA run only when no full run is live;
- operations that name no run go to the default full run `DEFAULT_RUN`, made on first use
  (when no LoRA run is live), so clients that know nothing of runs keep working. It belongs to
  the identity whose use made it: each identity has a default run of its own, one at a time
  (a full fine-tune excludes every other run); while one identity's lives, another's default
  run is a RunConflict.

When the base was last used the other way (trained in full, or frozen in the compute dtype for
LoRA), the next run of the other kind starts from a fresh load of the served model, so that no
run ever sees another's changes. Unloading a run drops it, its gradient and its optimizer state;
what was not saved is gone. A run belongs to the identity that created it; other identities get
RunNotFound, as if it did not exist; a conflict with another identity's run does not name it.
Not thread-safe, like Engine: the service calls it from its engine thread.

Every run has a version (RunVersion, reference/run-state.md): an incarnation, an unguessable
token made with the run (so a run made again under the same id, or after a restart, has a new
one), its optimizer step, and the forward_backward calls accumulated since that step. `apply`
runs an operation only on the version its request expects, and counts its effect.

In a data-parallel group every rank holds a TrainingRuns of its own, kept alike by rank 0
(worker.group_runs.GroupRuns), whose engines are each made a rank of the group (`member`); rank 0's
registry keeps the versions.
"""

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar, cast

from cispo.worker import checkpoint, checkpoints, lora
from cispo.worker.batch import Samples
from cispo.worker.checkpoints import CheckpointInfo
from cispo.worker.config import EngineConfig, RunsConfig
from cispo.worker.engine import Engine, GroupMember, validate_forward, validate_sample
from cispo.worker.engine import base_info as base_model_info
from cispo.worker.errors import LimitExceeded, RunConflict, RunNotFound, RunRestored, StateNotFound, VersionMismatch
from cispo.worker.losses import LossFunction
from cispo.worker.model import PolicyModel
from cispo.worker.protocols import RunRegistry, SampleAnswer, TrainingEngine
from cispo.worker.results import EngineInfo
from cispo.worker.run_versions import ExpectedVersion, RunInfo, RunVersion
from cispo.worker.sampler_weights import ExportCache, export_name
from cispo.worker.sampling import SampleRequest
from cispo.worker.sharding import MemoryUse

__all__ = [
    "DEFAULT_RUN",
    "ExpectedVersion",
    "RunInfo",
    "RunVersion",
    "SharedRuns",
    "TrainingRuns",
    "new_run_id",
]

DEFAULT_RUN = "default"
DEFAULT_CONFIG = EngineConfig()
T = TypeVar("T")


def new_run_id() -> str:
    """A fresh run id for a CreateModel that names none."""
    return f"run-{secrets.token_hex(6)}"


@dataclass
class RunRecord:
    """A live run in a registry: its engine, owner, times, and the state of its version."""

    engine: Engine
    owner: str | None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    incarnation: str = field(default_factory=lambda: secrets.token_hex(8))
    accumulated: int = 0
    origin: str = "the base model"  # what this incarnation began from
    began: tuple[int, int] = (0, 0)  # its step and accumulation then

    def version(self) -> RunVersion:
        return RunVersion(self.incarnation, self.engine.optimizer.step_count, self.accumulated)

    def begin(self, origin: str) -> None:
        """This incarnation began from `origin`, as the run is now."""
        self.origin, self.began = origin, (self.engine.optimizer.step_count, self.accumulated)

    def check(self, model_id: str, expected: ExpectedVersion) -> None:
        """RunRestored or VersionMismatch unless the run is the version `expected`."""
        now = self.version()
        if expected.incarnation and expected.incarnation != self.incarnation:
            moved = (
                ""
                if (now.step, now.accumulated) == self.began
                else (f", and is now at step {now.step} (accumulated {now.accumulated})")
            )
            raise RunRestored(
                f"run '{model_id}' was restored from {self.origin} at step {self.began[0]} (accumulated "
                f"{self.began[1]}){moved}; it no longer holds the state you last saw; resume from your "
                "last saved state"
            )
        expects = {"step": (expected.step, now.step), "accumulated": (expected.accumulated, now.accumulated)}
        if any(want is not None and want != actual for want, actual in expects.values()):
            wanted = " and ".join(f"{name} {want}" for name, (want, _) in expects.items() if want is not None)
            raise VersionMismatch(
                f"run '{model_id}' is at step {now.step} (accumulated {now.accumulated}), but the "
                f"request expects {wanted}"
            )

    def count(self, op: str, succeeded: bool) -> None:
        """Follow the accumulation through operation `op`: a forward_backward adds one, a step or
        a load empties it, and a failure that dropped the gradient (see Engine's in-place
        accumulation, and refused steps) leaves none."""
        if succeeded and op == "forward_backward":
            self.accumulated += 1
        elif (succeeded and op in ("optim_step", "load_state")) or (
            not succeeded
            and op in ("forward_backward", "optim_step")
            and all(p.grad is None for p in self.engine.named_params.values())
        ):
            self.accumulated = 0


class SharedRuns(ABC):
    """What both registries (TrainingRuns, GroupRuns) do the same way, over the lookups each
    implements. The service speaks to worker.protocols.RunRegistry, not to this class."""

    policy: PolicyModel
    config: EngineConfig
    max_runs: int

    @property
    @abstractmethod
    def exports(self) -> ExportCache:
        """The sampler weights kept loaded, of every run."""

    @abstractmethod
    def get(self, model_id: str, owner: str | None) -> TrainingEngine:
        """The engine of run `model_id` ("" = `owner`'s default run, made if need be)."""

    @abstractmethod
    def create(self, owner: str | None, spec: lora.LoraSpec | None, model_id: str | None = None) -> str:
        """Make a run (full when `spec` is None) owned by `owner`; returns its id."""

    @abstractmethod
    def unload(self, model_id: str, owner: str | None) -> None:
        """Drop run `model_id` with its gradient and optimizer state."""

    @abstractmethod
    def _record(self, model_id: str) -> RunRecord:
        """The live run `model_id`'s record (its version), with no ownership check; KeyError if
        there is none."""

    @abstractmethod
    def export_engine(self, model_path: str, owner: str | None) -> TrainingEngine:
        """The engine that samples `owner`'s saved sampler weights `model_path` for a request
        that names no run (it needs no run of its own)."""

    def base_info(self) -> EngineInfo:
        """The served base model, described as a run with no training of its own."""
        return base_model_info(self.policy)

    def _default_run(self, owner: str | None) -> str:
        """DEFAULT_RUN, made for `owner` if no default run is live; RunConflict while another
        identity's is."""
        try:
            run = self._record(DEFAULT_RUN)
        except KeyError:
            self.create(owner, None, DEFAULT_RUN)
            return DEFAULT_RUN
        if run.owner not in (None, owner):
            raise RunConflict(
                "the default run of another identity fine-tunes the whole base model, which every other "
                "run would share; yours can be made once it is unloaded"
            )
        return DEFAULT_RUN

    def apply(
        self, model_id: str, owner: str | None, expected: ExpectedVersion, op: str, fn: Callable[[TrainingEngine], T]
    ) -> tuple[T, RunVersion]:
        """`fn(engine)` on run `model_id` ("" = the default run, made if need be), with the run's
        version after it; RunRestored or VersionMismatch, and nothing run, unless the run is the
        version `expected`. `op` names what `fn` does, for the accumulation count."""
        engine = self.get(model_id, owner)
        run = self._record(model_id or DEFAULT_RUN)
        run.check(model_id or DEFAULT_RUN, expected)
        try:
            result = fn(engine)
        except BaseException:
            run.count(op, succeeded=False)
            raise
        run.count(op, succeeded=True)
        return result, run.version()

    def check_export(self, model_path: str, owner: str | None) -> None:
        """InvalidInput or StateNotFound (as for a missing export) unless `owner` may read the
        saved sampler weights `model_path` (a name, or a path its save answered); reads their
        manifest only. Touches no run: safe on any thread."""
        export = self.config.export
        name = export_name(export, model_path)
        checkpoint.check_home(export.sampler_dir, model_path, owner, checkpoint.SAMPLER_FORMAT)
        checkpoint.open_directory(export.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)

    def create_from_state(self, owner: str | None, name: str, with_optimizer: bool, model_id: str | None = None) -> str:
        """Make a run of the kind saved in state `name` and load it (with its optimizer state and
        step count if asked); on any failure no run is left behind."""
        manifest = checkpoint.open_directory(self.config.checkpoint_dir, name, checkpoint.STATE_FORMATS, owner)[1]
        try:
            spec = lora.LoraSpec(**manifest["lora"]) if manifest.get("lora") else None
        except (TypeError, ValueError) as exc:
            raise StateNotFound(f"state '{name}' cannot be read: its LoRA options are not valid ({exc})") from None
        model_id = self.create(owner, spec, model_id)
        try:
            self.get(model_id, owner).load_state(name, with_optimizer, owner=owner)
        except BaseException:
            self.unload(model_id, owner)
            raise
        self._record(model_id).begin(f"state '{name}'")
        return model_id

    def delete_checkpoint(self, kind: str, name: str, owner: str | None) -> CheckpointInfo:
        """Delete `owner`'s checkpoint `name` of `kind` (worker.checkpoints), sampler weights
        loaded or not; returns it as it was."""
        deleted = checkpoints.delete_checkpoint(self.config, kind, name, owner)
        if kind == checkpoints.SAMPLER_WEIGHTS:
            self.exports.forget(name)
        return deleted

    def validate(
        self, samples: Samples, loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> tuple[LossFunction, dict[str, float]]:
        """The loss and its resolved config (the base decides; every run shares it)."""
        return validate_forward(self.policy, self.config, samples, loss_fn, loss_fn_config)

    def validate_sample(self, request: SampleRequest) -> SampleRequest:
        return validate_sample(self.policy, self.config, request)

    def sample(self, items: list[tuple[str, SampleRequest, ExpectedVersion]]) -> list[SampleAnswer]:
        """Sample every (model_id, validated request, expected version), those on one engine in
        one batch; each result with the version of the run whose current weights it sampled
        (else None). A request whose run or saved weights its owner cannot see, or that is not
        the version expected, gets the error in its place. Each engine samples each identity's
        requests apart: a name is another export to another identity."""
        results: list[SampleAnswer | None] = [None] * len(items)
        versions: list[RunVersion | None] = [None] * len(items)
        by_engine: dict[tuple[int, str | None], tuple[TrainingEngine, list[int]]] = {}
        for i, (model_id, request, expected) in enumerate(items):
            try:  # saved weights named by path need no run (unless the request names one)
                if request.model_path:
                    checkpoint.check_home(
                        self.config.export.sampler_dir, request.model_path, request.owner, checkpoint.SAMPLER_FORMAT
                    )
                if request.model_path and not model_id:
                    engine = self.export_engine(request.model_path, request.owner)
                else:
                    engine = self.get(model_id, request.owner)
                if not request.model_path:
                    run = self._record(model_id or DEFAULT_RUN)
                    run.check(model_id or DEFAULT_RUN, expected)
                    versions[i] = run.version()
            except (RunNotFound, RunConflict, StateNotFound, RunRestored, VersionMismatch) as exc:
                results[i] = exc
                continue
            by_engine.setdefault((id(engine), request.owner), (engine, []))[1].append(i)
        for engine, indices in by_engine.values():
            for i, result in zip(indices, engine.sample([items[i][1] for i in indices])):
                results[i] = result if isinstance(result, Exception) else (result, versions[i])
        return cast(list[SampleAnswer], results)  # every item got its answer


class TrainingRuns(SharedRuns):
    """The runs of one process (or of one rank of a group, which rank 0 keeps alike)."""

    def __init__(
        self,
        policy: PolicyModel,
        config: EngineConfig = DEFAULT_CONFIG,
        max_runs: int = RunsConfig.max_runs,
        reload: Callable[[], PolicyModel] | None = None,
        member: GroupMember | None = None,
    ):
        """`reload()` loads the served model afresh (for a run of the other kind, see above);
        without it, such a switch is refused. `member`: every engine made is that rank of a
        data-parallel group (worker.group.member)."""
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self.policy = policy
        self.config = config
        self.max_runs = max_runs
        self._reload = reload
        self._member = member
        self._runs: dict[str, RunRecord] = {}
        self._base_used_by: str | None = None  # "full", "lora" or "changed" (by a full run now gone)
        self._exports = ExportCache(config.export.cache_size)
        self._export_sampler: Engine | None = None

    @property
    def exports(self) -> ExportCache:
        return self._exports

    # -- lookup ---------------------------------------------------------------------------------

    def get(self, model_id: str, owner: str | None) -> Engine:
        """The engine of run `model_id` ("" = `owner`'s default run, made if need be) for `owner`."""
        run = self._visible(model_id or self._default_run(owner), owner)
        run.last_used = time.time()
        return run.engine

    def _record(self, model_id: str) -> RunRecord:
        return self._runs[model_id]

    def engine(self, model_id: str | None) -> Engine:
        """The engine of run `model_id` (None: the export sampler), with no ownership check: for
        a group, whose rank 0 checked it."""
        return self.export_sampler() if model_id is None else self._runs[model_id].engine

    def export_engine(self, model_path: str, owner: str | None) -> Engine:
        return self.export_sampler()

    def export_sampler(self) -> Engine:
        """An engine that samples saved sampler weights (it needs no run of its own)."""
        if self._export_sampler is None:
            self._export_sampler = self._engine()
        return self._export_sampler

    def info(self, model_id: str, owner: str | None) -> RunInfo:
        return self._info(model_id, self._visible(model_id, owner))

    def list_runs(self, owner: str | None) -> list[RunInfo]:
        """The runs `owner` may see (its own and ownerless ones), oldest first."""
        return [self._info(i, r) for i, r in self._runs.items() if r.owner is None or r.owner == owner]

    def engines(self) -> dict[str, Engine]:
        """Every live run's engine by run id, whatever its owner."""
        return {model_id: run.engine for model_id, run in self._runs.items()}

    def memory_use(self) -> dict[str, MemoryUse]:
        """Run id -> the bytes this rank holds for it, of every live run, whatever its owner. For
        metrics, read from threads other than the engine's: it copies the registry first and
        reads tensor metadata only (a dict changed meanwhile may still raise RuntimeError: read
        again)."""
        return {model_id: run.engine.memory_use() for model_id, run in self._runs.copy().items()}

    def __len__(self) -> int:
        return len(self._runs)

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self, owner: str | None, spec: lora.LoraSpec | None, model_id: str | None = None) -> str:
        """Make a run (full when `spec` is None) owned by `owner`; returns its id."""
        model_id = model_id or new_run_id()
        if model_id in self._runs:
            raise RunConflict(f"a run named '{model_id}' already exists")
        self._create(model_id, spec, owner)
        return model_id

    def unload(self, model_id: str, owner: str | None) -> None:
        """Drop run `model_id` with its gradient and optimizer state."""
        self._drop(model_id, self._visible(model_id, owner))

    def discard(self, model_id: str) -> None:
        """Drop run `model_id` if it exists, whatever its owner: a group undoing, on every rank,
        a creation that failed on some. Left with no run, every rank reloads the base for the
        next one, whatever the failed creation did to it, so that all of them agree on it (a
        sharded reload is a collective)."""
        if model_id in self._runs:
            self._drop(model_id, self._runs[model_id])
        if not self._runs:
            self._base_used_by = "changed"

    def _drop(self, model_id: str, run: RunRecord) -> None:
        del self._runs[model_id]
        if run.engine.adapter is None:
            self._base_used_by = "changed"  # a full run's training stays in the weights: reload for the next
        else:
            lora.remove_adapter(self.policy, run.engine.adapter)
            if not any(r.engine.adapter for r in self._runs.values()):  # the last LoRA run: unwrap PEFT
                self.exports.drop_adapters()
                while self.policy.peft is not None:
                    lora.remove_adapter(self.policy, next(iter(self.policy.peft.peft_config)))

    def _create(self, model_id: str, spec: lora.LoraSpec | None, owner: str | None) -> None:
        kind = "full" if spec is None else "lora"
        full = [i for i, r in self._runs.items() if r.engine.adapter is None]
        if full:
            if self._runs[full[0]].owner not in (None, owner):
                raise RunConflict(
                    "a run of another identity fine-tunes the whole base model, which every other run "
                    "would share; another run can be made once it is unloaded"
                )
            raise RunConflict(
                f"run '{full[0]}' fine-tunes the whole base model, which every other run would share; "
                f"unload it (UnloadModel) before creating another run"
            )
        if spec is None and self._runs:
            raise RunConflict(
                f"{len(self._runs)} LoRA run(s) share the base model, which a full fine-tune would "
                "change; name a LoRA run (model_id), or unload them all first"
            )
        if len(self._runs) >= self.max_runs:
            raise LimitExceeded(
                "max_runs",
                f"{len(self._runs)} runs are live, the limit max_runs={self.max_runs}; unload one (UnloadModel) first",
            )
        if self._base_used_by not in (None, kind):
            self._fresh_base()
        self._base_used_by = kind
        if spec is None:
            engine = self._engine()
        else:
            lora.add_adapter(self.policy, model_id, spec)
            try:
                engine = self._engine(adapter=model_id, lora_spec=spec)
            except BaseException:
                lora.remove_adapter(self.policy, model_id)  # no adapter without its run
                raise
        self._runs[model_id] = RunRecord(engine, owner)

    def _engine(self, adapter: str | None = None, lora_spec: lora.LoraSpec | None = None) -> Engine:
        return Engine(self.policy, self.config, adapter, lora_spec, exports=self.exports, member=self._member)

    def _fresh_base(self) -> None:
        if self._reload is None:
            raise RunConflict(
                "the base model was changed by an earlier run of the other kind, and this server cannot reload it"
            )
        fresh = self._reload()
        self._exports, self._export_sampler = ExportCache(self.config.export.cache_size), None
        self.policy.model, self.policy.peft, self.policy.sharded = fresh.model, None, fresh.sharded

    def _visible(self, model_id: str, owner: str | None) -> RunRecord:
        run = self._runs.get(model_id)
        if run is None or (run.owner is not None and run.owner != owner):
            raise RunNotFound(
                f"no training run '{model_id}'"
                + (" (ListModels lists yours)" if self._runs else " (no run is live: CreateModel makes one)")
            )
        return run

    @staticmethod
    def _info(model_id: str, run: RunRecord) -> RunInfo:
        engine = run.engine
        numel = sum(p.numel() for p in engine.named_params.values())
        return RunInfo(
            model_id=model_id,
            lora=engine.lora_spec,
            owner=run.owner,
            step=engine.optimizer.step_count,
            trainable_parameters=numel,
            trainable_bytes=engine.memory_use().total,
            created=run.created,
            last_used=run.last_used,
            version=run.version(),
        )


# The type checker holds TrainingRuns to the service's seam.
_REGISTRY: type[RunRegistry] = TrainingRuns
