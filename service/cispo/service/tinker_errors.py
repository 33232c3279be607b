"""The Tinker front's errors, mapped in one place: a refused request's HTTP status and JSON body,
and a failed future's answer, in the forms the tinker SDK understands.

A request refused at once gets an HTTP status chosen for the SDK's retry rules: 400
BadRequestError for bad input (with cispo's field violations in the body), 429 for capacity and
503 while draining (the only two it retries). An operation that fails after its request id was
answered is a future error, `{"error", "category": "user" | "server"}`.
"""

from typing import Any

from google.rpc import code_pb2, error_details_pb2, status_pb2
from starlette.responses import JSONResponse, Response

from cispo.service.errors import to_status
from cispo.worker import InvalidInput, LimitExceeded

USER_CODES = frozenset(
    {
        code_pb2.INVALID_ARGUMENT,
        code_pb2.FAILED_PRECONDITION,
        code_pb2.NOT_FOUND,
        code_pb2.RESOURCE_EXHAUSTED,
        code_pb2.PERMISSION_DENIED,
        code_pb2.ABORTED,
    }
)
"""Status codes of an operation that failed for its request (category "user"), not the server."""


class HttpError(Exception):
    """A request answered at once with `status` and `{"error": message, **extra}`; an extra
    `headers` becomes the response's headers."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def refused(status: status_pb2.Status) -> HttpError:
    """The HttpError of a request the operations layer refused with `status`."""
    body = _status_body(status)
    return HttpError(_status_http(status), body.pop("error"), **body)


def error_response(exc: HttpError | InvalidInput | LimitExceeded) -> Response:
    """The answer of a request refused at once."""
    if not isinstance(exc, HttpError):
        exc = refused(to_status(exc))
    headers = exc.extra.pop("headers", None)
    return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=headers)


def future_error(status: status_pb2.Status, user: bool | None = None) -> Response:
    """The answer retrieve_future gives for an operation that failed with `status` (`user`: its
    category, when the caller knows it better than the status code does)."""
    category = status.code in USER_CODES if user is None else user
    return JSONResponse({"error": status.message, "category": "user" if category else "server"})


def _status_http(status: status_pb2.Status) -> int:
    """The HTTP status of a refused submit, chosen for the SDK's retry rules: only capacity
    (429) and unavailability (503) are retried."""
    if status.code == code_pb2.RESOURCE_EXHAUSTED:
        for detail in status.details:
            quota = error_details_pb2.QuotaFailure()
            if detail.Unpack(quota) and any(v.subject == "max_runs" for v in quota.violations):
                return 429
        return 413
    return {
        code_pb2.INVALID_ARGUMENT: 400,
        code_pb2.FAILED_PRECONDITION: 422,
        code_pb2.NOT_FOUND: 404,
        code_pb2.PERMISSION_DENIED: 403,
        code_pb2.UNAUTHENTICATED: 401,
        code_pb2.UNAVAILABLE: 503,
    }.get(status.code, 500)


def _status_body(status: status_pb2.Status) -> dict[str, Any]:
    body: dict[str, Any] = {"error": status.message, "code": code_pb2.Code.Name(status.code)}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            body["field_violations"] = [{"field": v.field, "description": v.description} for v in bad.field_violations]
    return body
