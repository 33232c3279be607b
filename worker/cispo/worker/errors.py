"""Errors the engine raises. The service maps each to a gRPC status; nothing here knows gRPC.
Each pickles whole, since a group's ranks send them to rank 0."""

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is a path such as "data[3].loss_fn_inputs.logprobs"."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidInput(ValueError):
    """The request is malformed; nothing was computed or changed (INVALID_ARGUMENT)."""

    def __init__(self, violations: list[FieldViolation]):
        assert violations, "InvalidInput needs at least one violation"
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))

    def __reduce__(self):
        return type(self), (self.violations,)


class LimitExceeded(ValueError):
    """The request is over a configured limit, named in `limit` (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: str, message: str):
        self.limit = limit
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.limit, str(self))


class StateNotFound(LookupError):
    """A state to load does not exist or cannot be used (FAILED_PRECONDITION)."""


class PermissionDenied(PermissionError):
    """The caller's identity may not touch this object (e.g. a state another identity saved)
    (PERMISSION_DENIED)."""


class StepRefused(RuntimeError):
    """The optimizer refused a step whose gradient or update is not finite; weights, moments
    and step count are unchanged, and the message says what became of the gradient
    (FAILED_PRECONDITION)."""


class ComputeFailed(RuntimeError):
    """Compute failed mid-way (e.g. out of memory), or its gradient was not finite
    (`non_finite`); the accumulated gradient is unchanged."""

    def __init__(self, message: str, out_of_memory: bool = False, non_finite: bool = False):
        self.out_of_memory = out_of_memory
        self.non_finite = non_finite
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.out_of_memory, self.non_finite)


class RankUnavailable(RuntimeError):
    """A data-parallel rank died or stopped answering; the group cannot train (UNAVAILABLE)."""

    def __init__(self, rank: int | None, message: str):
        self.rank = rank
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.rank, str(self))


class RunNotFound(LookupError):
    """No training run of that id is visible to the caller (NOT_FOUND). Another identity's run
    is not found either: its existence is not revealed."""


class RunConflict(RuntimeError):
    """The run cannot be created or used while other runs are live, e.g. a full fine-tune
    beside LoRA runs (FAILED_PRECONDITION)."""


class RunRestored(RuntimeError):
    """The request expects an incarnation of its run that the run no longer is: it no longer
    holds the state the client last saw, and nothing was applied (ABORTED). The message says
    what it holds."""


class VersionMismatch(RuntimeError):
    """The request expects another step or accumulation of its run's current incarnation; the
    message names both, and nothing was applied (FAILED_PRECONDITION)."""
