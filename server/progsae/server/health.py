"""grpc.health.v1.Health, once for every host: the plain grpc.aio server and each codec replica's own
port register it through `add_to_server`, the Ray Serve deployment forwards its Check and Watch here.

It answers for "" (the server) and progsae.v1.Progsae, needs no token (load balancers and Kubernetes
probes call it), and turns NOT_SERVING when the host starts to drain (`enter_graceful_shutdown`):
clients and balancers stop sending new calls while the in-flight ones finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from progsae.v1 import progsae_pb2 as pb

from .call import Call, GrpcCall
from .errors import ServiceError, not_found

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Progsae"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The serving status of one host and the two Health methods over it."""

    def __init__(self) -> None:
        self.status = SERVING
        self._changed = asyncio.Event()

    def enter_graceful_shutdown(self) -> None:
        """From now on every Check and Watch answers NOT_SERVING."""
        self.status = NOT_SERVING
        self._changed.set()

    def _response(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            raise not_found(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.status)

    async def Check(self, request: health_pb2.HealthCheckRequest, call: Call) -> health_pb2.HealthCheckResponse:
        try:
            return self._response(request)
        except ServiceError as e:
            await call.fail(e)
            return health_pb2.HealthCheckResponse()

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    call: Call) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then once more if the host starts to drain."""
        try:
            first = self._response(request)
        except ServiceError as e:
            await call.fail(e)
            return
        yield first
        if first.status == SERVING:
            await self._changed.wait()
            yield self._response(request)


class _GrpcHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, health: Health):
        self.health = health

    async def Check(self, request: Any, context: Any) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        return await self.health.Check(request, GrpcCall(context))

    async def Watch(self, request: Any, context: Any):  # pyright: ignore[reportIncompatibleMethodOverride]
        async for resp in self.health.Watch(request, GrpcCall(context)):
            yield resp


def add_to_server(health: Health, server: Any) -> None:
    """Register `health` as grpc.health.v1.Health on a grpc.aio server."""
    health_pb2_grpc.add_HealthServicer_to_server(_GrpcHealth(health), server)
