"""Exceptions raised by the client, built from the server's `google.rpc.Status`.

A failed operation raises a `CispoError` subclass chosen by its gRPC status code. The server's
`google.rpc.BadRequest` details become `field_violations`, e.g.

    FieldViolation(field="data[3].loss_fn_inputs.logprobs",
                   description="length 17 != model_input length 18")

Unary calls carry the status in the `grpc-status-details-bin` trailer; stream answers carry it
in `StreamResponse.error`. Both go through `error_from_status`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AbortedError",
    "CispoError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for_code",
    "error_from_rpc_error",
    "error_from_status",
]

_DETAILS_TRAILER = "grpc-status-details-bin"
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# Detail messages the client unpacks from `google.rpc.Status.details`.
_KNOWN_DETAILS = (
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
    error_details_pb2.RequestInfo,
)


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (a `google.rpc.BadRequest.FieldViolation`)."""

    field: str
    """Path of the field, e.g. "data[3].loss_fn_inputs.logprobs"."""
    description: str
    """What is wrong with it, e.g. "length 17 != model_input length 18"."""

    def __str__(self) -> str:
        return f"{self.field}: {self.description}" if self.field else self.description


class CispoError(Exception):
    """An operation failed; the server (or the connection) said why.

    Subclasses exist for the codes the service uses; any other code raises this class itself.
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field_violations: Iterable[FieldViolation] = (),
        details: Sequence[Any] = (),
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        """The gRPC status code, e.g. `grpc.StatusCode.INVALID_ARGUMENT`."""
        self.message: str = message
        """The status message."""
        self.field_violations: list[FieldViolation] = list(field_violations)
        """The `google.rpc.BadRequest` field violations; empty when there are none."""
        self.details: list[Any] = list(details)
        """All status details, unpacked to their `google.rpc` message types where known
        (BadRequest, ErrorInfo, QuotaFailure, ...), else left as `google.protobuf.Any`."""

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        for violation in self.field_violations:
            text += f"\n  {violation}"
        return text

    def __reduce__(self):
        return (
            _rebuild_error,
            (type(self), self.message, self.code, self.field_violations, self.details),
        )


def _rebuild_error(cls, message, code, field_violations, details):
    return cls(message, code=code, field_violations=field_violations, details=details)


class InvalidArgumentError(CispoError):
    """INVALID_ARGUMENT: the request is malformed; `field_violations` names the fields."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(CispoError):
    """RESOURCE_EXHAUSTED: the request is over a limit; the message names the limit."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(CispoError):
    """FAILED_PRECONDITION: the state does not allow it, e.g. loading a state never saved."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(CispoError):
    """UNAVAILABLE: the server cannot be reached, is draining, or the stream broke.

    The client retries such failures itself with the operation's idempotency key, so an
    operation that still fails this way after the retries ran at most once on the server.
    """

    default_code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(CispoError):
    """UNAUTHENTICATED: no valid bearer token (see the `token` argument or CISPO_TOKEN)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(CispoError):
    """PERMISSION_DENIED: the object belongs to another identity (e.g. a saved state)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class NotFoundError(CispoError):
    """NOT_FOUND: no training run of that id is visible to this identity."""

    default_code = grpc.StatusCode.NOT_FOUND


class AbortedError(CispoError):
    """ABORTED: the run no longer holds the state this client last saw (e.g. the server
    restarted and the run began again from the base model); nothing was applied, and the message
    says what the run holds. Not retried: resume from your last saved state with a new client.
    """

    default_code = grpc.StatusCode.ABORTED


_CLASS_BY_CODE: dict[grpc.StatusCode, type[CispoError]] = {
    cls.default_code: cls
    for cls in (
        AbortedError,
        InvalidArgumentError,
        ResourceExhaustedError,
        FailedPreconditionError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
        NotFoundError,
    )
}


def error_for_code(
    code: grpc.StatusCode,
    message: str,
    *,
    field_violations: Iterable[FieldViolation] = (),
    details: Sequence[Any] = (),
) -> CispoError:
    """The exception of the class that matches `code`."""
    cls = _CLASS_BY_CODE.get(code, CispoError)
    return cls(message, code=code, field_violations=field_violations, details=details)


def _unpack_detail(detail: any_pb2.Any) -> Any:
    for message_type in _KNOWN_DETAILS:
        if detail.Is(message_type.DESCRIPTOR):
            message = message_type()
            detail.Unpack(message)
            return message
    return detail


def error_from_status(status: status_pb2.Status) -> CispoError:
    """The exception for a `google.rpc.Status` (a stream error answer or a unary trailer)."""
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    details = [_unpack_detail(detail) for detail in status.details]
    violations = [
        FieldViolation(field=v.field, description=v.description)
        for detail in details
        if isinstance(detail, error_details_pb2.BadRequest)
        for v in detail.field_violations
    ]
    return error_for_code(code, status.message, field_violations=violations, details=details)


def error_from_rpc_error(error: grpc.RpcError) -> CispoError:
    """The exception for a failed call (`grpc.RpcError` or `grpc.aio.AioRpcError`).

    Uses the rich status in the `grpc-status-details-bin` trailer when the server sent one,
    else the call's code and details.
    """
    # (key, value) pairs: grpc's _Metadatum namedtuples, or grpc.aio.Metadata's tuples; the stubs
    # know only the first, and as objects that do not unpack.
    trailers = cast(Iterable[tuple[str, Any]], error.trailing_metadata() if hasattr(error, "trailing_metadata") else ())
    for key, value in trailers:
        if key == _DETAILS_TRAILER:
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer: fall back to code and details
                break
            return error_from_status(status)
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    return error_for_code(code or grpc.StatusCode.UNKNOWN, message or "")
