"""Service errors: a status code and a one-line message, mapped to gRPC and HTTP.

The service layer raises `ServiceError` for every problem with a request; the transports
(plain grpcio, Ray Serve gRPC, HTTP) turn it into their own status. Anything else that
escapes is a bug: transports report it as INTERNAL with a one-line message, never a
traceback.
"""

from __future__ import annotations

import enum
import logging
import re

log = logging.getLogger("progsae.server")

_ABS_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"`]+/)+([^\s/'\"`]*)")
"""An absolute filesystem path (two or more components); client-visible messages keep its last part only."""


def scrub(text: str) -> str:
    """One line, with absolute paths cut to their last component (no server layout in messages)."""
    return _ABS_PATH.sub(lambda m: m.group(1) or "<path>", " ".join(str(text).split()))


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
    UNAUTHENTICATED = "UNAUTHENTICATED"

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
    Status.UNAUTHENTICATED: 401,
}


class ServiceError(Exception):
    """A request failed with `status`; `message` is one line meant for the caller."""

    def __init__(self, status: Status, message: str):
        one_line = scrub(message)
        super().__init__(one_line)
        self.status = status
        self.message = one_line

    def __repr__(self) -> str:
        return f"ServiceError({self.status.value}, {self.message!r})"

    def __reduce__(self):  # crosses Ray's process boundaries whole (the LanguageModel deployment returns it)
        return (ServiceError, (self.status, self.message))


def invalid(message: str) -> ServiceError:
    return ServiceError(Status.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(Status.NOT_FOUND, message)


def exhausted(message: str) -> ServiceError:
    return ServiceError(Status.RESOURCE_EXHAUSTED, message)


def unauthenticated(message: str = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
                    ) -> ServiceError:
    return ServiceError(Status.UNAUTHENTICATED, message)


def internal(exc: BaseException) -> ServiceError:
    """Wrap an unexpected exception: the caller gets its type only; the server log gets the traceback."""
    log.error("internal error", exc_info=exc)
    return ServiceError(Status.INTERNAL, f"internal error ({type(exc).__name__}); details are in the server log")
