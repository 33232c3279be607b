"""Sessions, models and samplers: Tinker's names for cispo's runs and exports.

- a session holds its models; a model id `<session>:train:<n>` names one cispo run;
- checkpoint paths `tinker://<run>/weights/<name>` and `tinker://<run>/sampler_weights/<name>`
  are stored as the cispo state or export `<run>.<name>` (names are per run, as Tinker's are);
- a sampler (a sampling session, `<session>:sample:<n>`) samples one saved export;
- a session's and a model's `user_metadata` are the training run's (cispo.service.tinker_checkpoints).

Each belongs to the identity that made it; another identity's is answered as a missing one.
"""

import re
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from cispo.service.auth import current_identity
from cispo.service.errors import clip
from cispo.service.tinker_errors import HttpError
from cispo.service.tinker_order import SeqOrder
from cispo.v1 import training_pb2 as pb
from cispo.worker import FieldViolation, InvalidInput, checkpoint

MODEL_ID = re.compile(r"(session-[0-9a-f]{16}):train:\d+")
"""The model ids create_session and `Sessions.register` make (see Sessions.model_named)."""
KEPT_EPHEMERAL = 4
"""Exports of save_weights_and_get_sampling_client kept per model: an older one is deleted (with
its sampling sessions) when a newer one is made, and all of a session's when it finishes."""


@dataclass
class TinkerModel:
    tinker_id: str
    run_id: str
    owner: str | None
    lora_rank: int | None
    order: SeqOrder
    ephemeral: list[str] = field(default_factory=list)  # its ephemeral exports, oldest first
    incarnation: str = ""  # of its run when it was made: every request on the model expects it
    user_metadata: dict[str, str] = field(default_factory=dict)  # its session's, then its own

    def expected(self) -> pb.RunVersion:
        """The version every request on this model expects of its run (see Sessions.model_named)."""
        return pb.RunVersion(incarnation=self.incarnation)


@dataclass
class Sampler:
    sampler_id: str
    owner: str | None
    export: str  # cispo export name (or path) the samples read
    tinker_path: str


@dataclass
class Session:
    session_id: str
    owner: str | None
    models: list[str] = field(default_factory=list)  # tinker ids
    last_heartbeat: float = field(default_factory=time.monotonic)
    user_metadata: dict[str, str] = field(default_factory=dict)


class _Owned(Protocol):
    @property
    def owner(self) -> str | None: ...


Item = TypeVar("Item", bound=_Owned)


def owned(table: dict[str, Item], key: str, what: str) -> Item:
    """`table[key]` if the caller's identity owns it; HttpError 404 otherwise."""
    item = table.get(key)
    if item is None or item.owner != current_identity():
        raise HttpError(404, f"no {what} {clip(str(key), 80)!r}")
    return item


def run_name(run_id: str, name: str, field: str = "path") -> str:
    """The cispo name of a Tinker checkpoint `name` of run `run_id`: `<run>.<name>`, both parts
    checked as names (never empty, '.', '..', a path or unprintable), and the whole too (its
    length); InvalidInput naming `field` otherwise."""
    checkpoint.check_name(run_id, field)
    checkpoint.check_name(name, field)
    return checkpoint.check_name(f"{run_id}.{name}", field)


KINDS = ("weights", "sampler_weights")
"""The checkpoint kinds of tinker:// paths: states (save_state) and exports (save_weights_for_sampler)."""


def split_path(path: str, kinds: tuple[str, ...] = KINDS, field: str = "path") -> tuple[str, str]:
    """(kind, cispo name) of a checkpoint path `tinker://<run>/<kind>/<name>`, `kind` one of
    `kinds`; InvalidInput naming `field` otherwise."""
    parts = path.removeprefix("tinker://").split("/")
    if not path.startswith("tinker://") or len(parts) != 3 or parts[1] not in kinds:
        shape = "|".join(kinds)
        raise InvalidInput([FieldViolation(field, f"{clip(path, 120)!r} is not a tinker://<run>/{shape}/<name> path")])
    return parts[1], run_name(parts[0], parts[2], field)


def parse_path(path: str, kind: str) -> str:
    """The cispo name of a checkpoint path: `tinker://<run>/<kind>/<name>` -> `<run>.<name>`;
    anything else (a cispo name or path) is passed on as it is."""
    return split_path(path, (kind,))[1] if path.startswith("tinker://") else path


def tinker_path(kind: str, name: str) -> str | None:
    """The tinker:// path of the cispo checkpoint `name` (`<run>.<name>`) of `kind`; None for a
    name without a run part (saved over gRPC under a plain name)."""
    run, dot, rest = name.partition(".")
    return f"tinker://{run}/{kind}/{rest}" if dot and run and rest else None


class Sessions:
    """The front's sessions, models and samplers, by their Tinker ids."""

    def __init__(self, seq_gap_seconds: float) -> None:
        self.seq_gap_seconds = seq_gap_seconds  # of each new model's SeqOrder
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TinkerModel] = {}
        self.samplers: dict[str, Sampler] = {}

    def session(self, session_id: str) -> Session:
        return owned(self.sessions, session_id, "session")

    # -- run versions (reference/run-state.md) -------------------------------------------------------
    # A model keeps the incarnation of its run when it was made, and every request on it expects
    # that incarnation. The id itself stays `<session>:train:<n>`, since the SDK builds it itself
    # (create_training_client_from_state); its random session part is what marks an id of another
    # server process: such an id (or one of a finished session) is answered 410 with the ABORTED
    # message, which the SDK raises and does not retry, instead of 404.

    def model_named(self, tinker_id: str) -> TinkerModel:
        made = MODEL_ID.fullmatch(tinker_id)
        if tinker_id not in self.models and made and made[1] not in self.sessions:
            raise HttpError(
                410,
                f"model {clip(tinker_id, 80)!r} is not on this server any more (the server restarted, "
                "or its session finished); it no longer holds the state you last saw; resume from "
                "your last saved state",
                code="ABORTED",
            )
        return owned(self.models, tinker_id, "model")

    def register(
        self,
        session: Session,
        model_seq_id: int,
        run_id: str,
        lora_rank: int | None,
        incarnation: str,
        user_metadata: dict[str, str] | None = None,
    ) -> TinkerModel:
        """The model `<session>:train:<model_seq_id>` of the run `run_id` just made."""
        model = TinkerModel(
            f"{session.session_id}:train:{model_seq_id}",
            run_id,
            session.owner,
            lora_rank,
            SeqOrder(self.seq_gap_seconds),
            incarnation=incarnation,
            user_metadata={**session.user_metadata, **(user_metadata or {})},
        )
        self.models[model.tinker_id] = model
        session.models.append(model.tinker_id)
        return model

    def run_metadata(self, run_id: str) -> dict[str, str] | None:
        """The user metadata of the caller's model on run `run_id` (None if it has none here)."""
        owner = current_identity()
        found = [m for m in self.models.values() if m.run_id == run_id and m.owner == owner]
        return (found[-1].user_metadata or None) if found else None

    def new_sampler(self, sampler_id: str, export: str, tinker_path: str) -> Sampler:
        sampler = Sampler(sampler_id, current_identity(), export, tinker_path)
        self.samplers[sampler_id] = sampler
        return sampler

    def sampler(self, sampler_id: str, what: str = "sampling session") -> Sampler:
        return owned(self.samplers, sampler_id, what)

    def forget_samplers(self, exports: list[str], owner: str | None) -> None:
        """Drop `owner`'s samplers of `exports` (about to be removed: names are per identity)."""
        for sampler_id in [k for k, v in self.samplers.items() if v.export in exports and v.owner == owner]:
            del self.samplers[sampler_id]

    def forget_session(self, session: Session) -> None:
        """Drop a finished session and its samplers (its models were taken out one by one)."""
        for key in [k for k in self.samplers if k.startswith(f"{session.session_id}:")]:
            del self.samplers[key]
        del self.sessions[session.session_id]
