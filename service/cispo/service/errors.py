"""Exceptions -> google.rpc.Status with rich details. Never UNKNOWN with a traceback.

A status travels in the response trailers, which gRPC caps (8 KiB by default on the client), so
everything a client sent and that an error echoes is cut short here: at most MAX_VIOLATIONS
field violations, each field and description clipped, the message clipped. A 5,000-character
state name is therefore INVALID_ARGUMENT, not a trailer-size RESOURCE_EXHAUSTED.
"""

import logging

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cispo.service import memory
from cispo.worker import (
    ComputeFailed,
    FieldViolation,
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    RankUnavailable,
    RunConflict,
    RunNotFound,
    RunRestored,
    StateNotFound,
    StepRefused,
    VersionMismatch,
)

log = logging.getLogger(__name__)

MAX_VIOLATIONS = 8
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 300
MAX_MESSAGE_CHARS = 1000


class Unavailable(Exception):
    """The server cannot take the operation now (draining, or a worker rank is gone)."""


class OperationFailed(Exception):
    """An operation was answered with `status` (Operations.call raises it)."""

    def __init__(self, status: status_pb2.Status):
        super().__init__(status.message)
        self.status = status


def clip(text: str, limit: int) -> str:
    """`text`, cut to about `limit` characters with a note of its full length."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def to_status(exc: BaseException) -> status_pb2.Status:
    """The rich status a failed operation is answered with. Once it is logged, `exc` and the
    exceptions chained to it lose their tracebacks: the frames in them hold the request (its
    body, its decoded arrays), and a frame that refers back to `exc` (one that raised it again)
    makes a cycle that only a rare full collection frees (cli.GC_THRESHOLDS). What that frees
    goes back to the system soon (memory.release_soon)."""
    try:
        return _status_of(exc)
    finally:
        _drop_tracebacks(exc)
        memory.release_soon()


def _drop_tracebacks(exc: BaseException) -> None:
    """Clear the traceback of `exc` and of every exception in its cause and context chain."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        stack += [e.__cause__, e.__context__]


def _status_of(exc: BaseException) -> status_pb2.Status:
    if isinstance(exc, OperationFailed):
        return exc.status
    if isinstance(exc, InvalidInput):
        shown = [
            FieldViolation(clip(v.field, MAX_FIELD_CHARS), clip(v.description, MAX_DESCRIPTION_CHARS))
            for v in exc.violations[:MAX_VIOLATIONS]
        ]
        more = len(exc.violations) - len(shown)
        details = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in shown
            ]
        )
        message = "; ".join(str(v) for v in shown) + (f"; and {more} more" if more else "")
        return _status(code_pb2.INVALID_ARGUMENT, f"invalid request: {message}", details)
    if isinstance(exc, LimitExceeded):
        details = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=exc.limit, description=clip(str(exc), MAX_DESCRIPTION_CHARS)
                )
            ]
        )
        return _status(code_pb2.RESOURCE_EXHAUSTED, str(exc), details)
    if isinstance(exc, RunRestored):
        return _status(code_pb2.ABORTED, str(exc))
    if isinstance(exc, (StateNotFound, StepRefused, RunConflict, VersionMismatch)):
        return _status(code_pb2.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, RunNotFound):
        return _status(code_pb2.NOT_FOUND, str(exc))
    if isinstance(exc, PermissionDenied):
        return _status(code_pb2.PERMISSION_DENIED, str(exc))
    if isinstance(exc, (Unavailable, RankUnavailable)):
        return _status(code_pb2.UNAVAILABLE, str(exc))
    if isinstance(exc, ComputeFailed):
        code = code_pb2.RESOURCE_EXHAUSTED if exc.out_of_memory else code_pb2.INTERNAL
        log.error("compute failed", exc_info=exc)
        return _status(code, str(exc))
    log.error("internal error", exc_info=exc)
    return _status(code_pb2.INTERNAL, f"internal error ({type(exc).__name__}): {exc}")


def _status(code: int, message: str, details=None) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=clip(message, MAX_MESSAGE_CHARS))
    if details is not None:
        packed = any_pb2.Any()
        packed.Pack(details)
        status.details.append(packed)
    return status


def code_name(status: status_pb2.Status) -> str:
    """E.g. "INVALID_ARGUMENT": the label used in metrics."""
    return code_pb2.Code.Name(status.code)
