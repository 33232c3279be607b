"""What an operation of the service is (types only): its handler's view of one request (`Call`,
`Backend`), what a handler answers (`Prepared`), and the `Operation` the table in
cispo.service.operations holds one of per operation."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from cispo.service.limits import RequestLimits
from cispo.service.metrics import ServiceMetrics
from cispo.service.pipeline import Batchable
from cispo.service.versions import RunVersions
from cispo.worker.protocols import RunRegistry, TrainingEngine
from cispo.worker.runs import DEFAULT_RUN, ExpectedVersion, RunVersion

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared(Generic[Resp]):
    """A validated operation, ready to queue."""

    call: Callable[[], Any] | Batchable  # the engine call (or a share of one); runs on the engine thread
    encode: Callable[[Any], tuple[Resp, dict[str, object]]]  # its result -> (response, log fields)


@dataclass(frozen=True)
class Backend:
    """The server's parts a handler uses (one per server)."""

    runs: RunRegistry
    metrics: ServiceMetrics
    limits: RequestLimits
    versions: RunVersions
    base_model: str  # the served model's name (GetInfo.base_model)
    base_names: frozenset[str]  # the names CreateModel.base_model may give it
    world_size: int


@dataclass(frozen=True)
class Call:
    """One request as its handler sees it: the server, and who asks what of which run."""

    server: Backend
    op: str
    owner: str | None  # the calling identity (None without authentication)
    model_id: str  # the run named ("": the default run)
    expected: ExpectedVersion  # the version the request expects of its run
    connection: str  # the gRPC peer ("" for other doors)

    @property
    def lane(self) -> str:
        """The pipeline lane of the run named."""
        return self.model_id or DEFAULT_RUN

    def on_run(self, fn: Callable[[TrainingEngine], T]) -> tuple[T, RunVersion]:
        """(fn(engine), the run's version after it), if the run is the version expected."""
        return self.server.versions.apply(self.op, self.model_id, self.owner, self.expected, self.connection, fn)


Handler = Callable[[Call, Req], Prepared[Resp]]


@dataclass(frozen=True)
class Operation(Generic[Req, Resp]):
    """One operation of the service, as every door serves it."""

    name: str  # "forward_backward": metrics label, log field, StreamRequest oneof field
    method: str  # "ForwardBackward": the gRPC method
    request: type[Req]
    response: type[Resp]
    handler: Handler[Req, Resp]
    per_run: bool  # queued in its run's lane (else in the lane of the set of runs)
    keyed: bool  # an idempotency key makes a retry apply once

    def __post_init__(self) -> None:
        fields = self.request.DESCRIPTOR.fields_by_name
        if self.keyed != ("idempotency_key" in fields) or self.per_run != ("model_id" in fields):
            raise ValueError(f"{self.name}: keyed and per_run must match {self.request.DESCRIPTOR.full_name}'s fields")
