"""A run's identity over time (reference/run-state.md), types only: its version (RunVersion),
what a request expects of it (ExpectedVersion), what GetInfo and ListModels say of it (RunInfo).

A version is an incarnation, an unguessable token made with the run (so a run made again under
the same id, or after a restart, has a new one), its optimizer step, and the forward_backward
calls accumulated since that step.
"""

from dataclasses import dataclass

from cispo.worker import lora


@dataclass(frozen=True)
class RunVersion:
    """A run's version after an operation."""

    incarnation: str  # unguessable, made with the run
    step: int  # optimizer steps taken
    accumulated: int  # forward_backward calls whose gradient the next step applies


@dataclass(frozen=True)
class ExpectedVersion:
    """What a request expects of its run; "" and None expect nothing."""

    incarnation: str = ""
    step: int | None = None
    accumulated: int | None = None


@dataclass(frozen=True)
class RunInfo:
    """What GetInfo and ListModels say of a run."""

    model_id: str
    lora: lora.LoraSpec | None  # None: full fine-tuning
    owner: str | None
    step: int
    trainable_parameters: int
    trainable_bytes: int  # weights + gradient + optimizer moments of the run's own parameters
    created: float  # Unix time
    last_used: float
    version: RunVersion
