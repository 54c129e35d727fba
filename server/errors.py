"""Service errors: a status code and a one-line message, mapped to gRPC and HTTP.

The service layer raises `ServiceError` for every problem with a request; the transports
(plain grpcio, Ray Serve gRPC, HTTP) turn it into their own status. Anything else that
escapes is a bug: transports report it as INTERNAL with a one-line message, never a
traceback.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """Transport-neutral status codes (a subset of gRPC's, with the same names)."""

    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def http(self) -> int:
        """The HTTP status the JSON endpoints answer with."""
        return _HTTP[self]

    def grpc(self):  # -> grpc.StatusCode (imported lazily: this module stays grpc-free)
        import grpc

        return getattr(grpc.StatusCode, self.value)


_HTTP = {
    Status.OK: 200,
    Status.INVALID_ARGUMENT: 400,
    Status.NOT_FOUND: 404,
    Status.RESOURCE_EXHAUSTED: 413,
    Status.DEADLINE_EXCEEDED: 504,
    Status.FAILED_PRECONDITION: 412,
    Status.UNIMPLEMENTED: 501,
    Status.CANCELLED: 499,
    Status.UNAVAILABLE: 503,
    Status.INTERNAL: 500,
}


class ServiceError(Exception):
    """A request failed with `status`; `message` is one line meant for the caller."""

    def __init__(self, status: Status, message: str):
        one_line = " ".join(str(message).split())
        super().__init__(one_line)
        self.status = status
        self.message = one_line

    def __repr__(self) -> str:
        return f"ServiceError({self.status.value}, {self.message!r})"


def invalid(message: str) -> ServiceError:
    return ServiceError(Status.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(Status.NOT_FOUND, message)


def exhausted(message: str) -> ServiceError:
    return ServiceError(Status.RESOURCE_EXHAUSTED, message)


def internal(exc: BaseException) -> ServiceError:
    """Wrap an unexpected exception: one line naming its type, no traceback."""
    text = " ".join(str(exc).split())[:200]
    return ServiceError(Status.INTERNAL, f"internal error: {type(exc).__name__}: {text}")
