"""One call as the servicer sees it, whichever transport carried it: its metadata (bearer token, the
model id Serve routes on), its deadline, and how to fail it.

    GrpcCall   grpc.aio (the plain server and each codec replica's own port): gRPC's own deadline;
               a failure aborts the call.
    RayCall    Ray Serve's gRPC proxy: the deadline comes as `progsae-timeout-ms` metadata (the proxy
               does not forward gRPC deadlines); a failure sets code and details on Ray's context,
               which has no abort.
    HttpCall   the HTTP/JSON API: the request's headers; a failure raises the ServiceError, which
               the API's one exception handler answers as JSON with the matching HTTP status.

The servicer's methods take a Call and never ask which transport it came from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ServiceError

MODEL_ID_METADATA = "multiplexed_model_id"
"""The metadata key Serve's multiplexed router reads; it may name the call's model."""
TIMEOUT_METADATA = "progsae-timeout-ms"
"""Milliseconds the client will wait; clients send it because Ray's proxy does not forward gRPC deadlines."""
AUTH_METADATA = "authorization"
"""`Bearer <token>` when the server has a token (progsae.server.auth)."""


class Call:
    """A call's metadata, deadline and failure; subclasses say how their transport provides each."""

    label_prefix = ""
    """Prefix of the call's metrics label: "" for gRPC, "http:" for the HTTP API."""
    transport = "local"
    """How the call reached this process: "direct" (a grpc.aio port: the replica's own, or a plain
    server), "proxy" (Serve's gRPC proxy), "http" (Serve's HTTP proxy). Serve counts the last two for
    its autoscaler; the replica reports the first itself (progsae.server.autoscaling)."""
    trusted = False
    """True for a call another replica of the deployment authorised already (progsae.server.placement)."""
    stay = False
    """Serve the call on this replica even when its model is held by another: set when forwarding it
    found no replica in time (progsae.server.placement)."""

    def __init__(self, metadata: Iterable[tuple[str, str]] = ()):
        self._metadata = {k.lower(): v for k, v in metadata}

    def metadata(self, key: str) -> str:
        """The value of metadata `key` ("" when absent)."""
        return self._metadata.get(key, "")

    @property
    def authorization(self) -> str | None:
        return self._metadata.get(AUTH_METADATA)

    @property
    def model_id(self) -> str:
        """The model named in metadata (Serve's multiplexed_model_id); "" when absent."""
        return self.metadata(MODEL_ID_METADATA)

    def label(self, method: str) -> str:
        return self.label_prefix + method

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline, read when the call starts; None = no deadline."""
        try:
            ms = float(self.metadata(TIMEOUT_METADATA) or 0)
        except ValueError:
            return None
        return ms / 1e3 if ms > 0 else None

    def expired(self, t0: float) -> Callable[[], bool]:
        """A check that answers True once the deadline (counted from `t0`, the call's start) has passed."""
        left = self.time_remaining()
        if left is None:
            return lambda: False
        end = t0 + left
        return lambda: time.perf_counter() > end

    async def fail(self, e: ServiceError) -> None:
        """Answer the call with e's status."""
        raise e


class GrpcCall(Call):
    """A grpc.aio call: gRPC's own deadline; a failure aborts (grpc.aio raises out of the handler)."""

    transport = "direct"

    def __init__(self, context: Any):
        super().__init__(context.invocation_metadata() or ())
        self.context = context

    def time_remaining(self) -> float | None:
        left = self.context.time_remaining()
        return super().time_remaining() if left is None else left

    def expired(self, t0: float) -> Callable[[], bool]:
        left = self.time_remaining()
        if left is None:
            return lambda: False
        end = time.perf_counter() + left  # measured now, not from t0: gRPC counts it for us
        return lambda: time.perf_counter() > end

    async def fail(self, e: ServiceError) -> None:
        await self.context.abort(e.status.grpc(), e.message)


class RayCall(Call):
    """A call through Ray Serve's gRPC proxy (its RayServegRPCContext)."""

    transport = "proxy"

    def __init__(self, context: Any):
        super().__init__(context.invocation_metadata() or () if context is not None else ())
        self.context = context

    async def fail(self, e: ServiceError) -> None:
        if self.context is None:
            raise e
        self.context.set_code(e.status.grpc())
        self.context.set_details(e.message)


class HttpCall(Call):
    """A call of the HTTP/JSON API: its headers are its metadata; a failure raises."""

    label_prefix = "http:"
    transport = "http"

    def __init__(self, headers: Mapping[str, str]):
        super().__init__((k, v) for k, v in headers.items() if k.lower() == AUTH_METADATA)
