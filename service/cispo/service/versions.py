"""Run versions at the doors (reference/run-state.md): the version a request expects, the
version every answer carries, and the incarnation each gRPC connection saw of each run.

A mutating request that expects no incarnation (grpcurl, the Node client) is held to the one
its connection saw: the incarnation of the run when an operation over that connection was first
answered on it. A connection is its gRPC peer ("ipv4:127.0.0.1:53412"), which names one TCP
connection while it lives. After a restart every connection is new, so this matters within one
process: when a run is unloaded and made again under its id (the default run), a connection that
worked on the old run is refused (ABORTED) on the new one until it reconnects; one that unloaded
the run itself is not. gRPC does not tell a server when a connection closes, so the memory is
bounded (the REMEMBERED most recent pairs), and a new connection that happens to reuse a closed
one's port may be refused once too: a spurious refusal, never a silent application.
"""

import contextvars
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, TypeVar

from cispo.v1 import training_pb2 as pb
from cispo.worker.protocols import RunRegistry, TrainingEngine
from cispo.worker.runs import DEFAULT_RUN, ExpectedVersion, RunVersion

T = TypeVar("T")


class Versioned(Protocol):
    """A response that carries its run's version."""

    @property
    def version(self) -> pb.RunVersion: ...


V = TypeVar("V", bound=Versioned)
CONNECTION: contextvars.ContextVar[str] = contextvars.ContextVar("cispo_connection", default="")
"""The gRPC peer of the call being served ("" for other doors, which send versions themselves)."""
MUTATING = frozenset({"forward_backward", "optim_step", "save_state", "load_state", "save_weights_for_sampler"})
REMEMBERED = 65536


def take_expected(request) -> ExpectedVersion:
    """The version `request` expects, taken out of it: a precondition of the operation, not part
    of what it does, so a retry's idempotency fingerprint does not depend on it."""
    if "expected_version" not in request.DESCRIPTOR.fields_by_name or not request.HasField("expected_version"):
        return ExpectedVersion()
    version = request.expected_version
    expected = ExpectedVersion(
        version.incarnation,
        version.step if version.HasField("step") else None,
        version.accumulated if version.HasField("accumulated") else None,
    )
    request.ClearField("expected_version")
    return expected


def stamped(response: V, version: RunVersion | None) -> V:
    """`response`, carrying `version` (when there is one)."""
    if version is not None:
        response.version.CopyFrom(
            pb.RunVersion(incarnation=version.incarnation, step=version.step, accumulated=version.accumulated)
        )
    return response


class RunVersions:
    """The runs' operations, each checked against the version its request (or its connection)
    expects. Called on the engine thread only, as the runs are."""

    def __init__(self, runs: RunRegistry, remembered: int = REMEMBERED):
        self.runs = runs
        self.remembered = remembered
        self._seen: OrderedDict[tuple[str, str], str] = OrderedDict()  # (connection, run) -> incarnation

    def apply(
        self,
        op: str,
        model_id: str,
        owner: str | None,
        expected: ExpectedVersion,
        connection: str,
        fn: Callable[[TrainingEngine], T],
    ) -> tuple[T, RunVersion]:
        """`fn(engine)` on the run, as runs.apply, with the run's version after it."""
        run = model_id or DEFAULT_RUN
        seen = (connection, run)
        if not expected.incarnation and op in MUTATING and seen in self._seen:
            expected = replace(expected, incarnation=self._seen[seen])
        result, version = self.runs.apply(model_id, owner, expected, op, fn)
        if connection:
            self._seen.setdefault(seen, version.incarnation)
            self._seen.move_to_end(seen)
            while len(self._seen) > self.remembered:
                self._seen.popitem(last=False)
        return result, version

    def unloaded(self, connection: str, model_id: str) -> None:
        """`connection` unloaded run `model_id`: a run made again under that id is new to it."""
        self._seen.pop((connection, model_id), None)
