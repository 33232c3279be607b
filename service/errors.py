"""Exceptions -> google.rpc.Status with rich details. Never UNKNOWN with a traceback."""

import logging

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cispo.worker import ComputeFailed, InvalidInput, LimitExceeded, RankUnavailable, StateNotFound

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The server cannot take the operation now (draining, or a worker rank is gone)."""


def to_status(exc: BaseException) -> status_pb2.Status:
    """The rich status a failed operation is answered with."""
    if isinstance(exc, InvalidInput):
        details = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ])
        return _status(code_pb2.INVALID_ARGUMENT, f"invalid request: {exc}", details)
    if isinstance(exc, LimitExceeded):
        details = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=exc.limit, description=str(exc))
        ])
        return _status(code_pb2.RESOURCE_EXHAUSTED, str(exc), details)
    if isinstance(exc, StateNotFound):
        return _status(code_pb2.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, (Unavailable, RankUnavailable)):
        return _status(code_pb2.UNAVAILABLE, str(exc))
    if isinstance(exc, ComputeFailed):
        code = code_pb2.RESOURCE_EXHAUSTED if exc.out_of_memory else code_pb2.INTERNAL
        log.error("compute failed", exc_info=exc)
        return _status(code, str(exc))
    log.error("internal error", exc_info=exc)
    return _status(code_pb2.INTERNAL, f"internal error ({type(exc).__name__}): {exc}")


def _status(code: int, message: str, details=None) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    if details is not None:
        packed = any_pb2.Any()
        packed.Pack(details)
        status.details.append(packed)
    return status


def code_name(status: status_pb2.Status) -> str:
    """E.g. "INVALID_ARGUMENT": the label used in metrics."""
    return code_pb2.Code.Name(status.code)
