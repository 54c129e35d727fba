"""A plain grpc.aio server hosting the servicer (no Ray): health, reflection, auth, TLS, size caps.

Used by tests, by the benchmark as the baseline, by anyone who wants the codec without a Ray
cluster, and inside each Ray Serve codec replica as its direct gRPC port (app.py). `PlainServer`
runs the server on its own event-loop thread so that blocking code can start and stop it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2_grpc

from progsae.v1 import progsae_pb2 as pb

from . import health
from .call import GrpcCall
from .health import SERVICE_NAME
from .registry import Registry, RegistryConfig
from .service import CodecService, ServiceConfig
from .servicer import ProgsaeServicer
from .text import available as text_available
from .validate import Limits


@dataclass(frozen=True)
class GrpcServerConfig:
    """How the plain grpc.aio server listens."""

    address: str = "127.0.0.1:0"
    """host:port to bind; port 0 picks a free one (see `PlainServer.port`)."""
    auth_token: str = ""
    """Bearer token every call but health must carry (metadata `authorization: Bearer <token>`); empty = off."""
    tls_cert_file: str = ""
    """PEM certificate chain: with `tls_key_file`, the port speaks TLS instead of plaintext."""
    tls_key_file: str = ""
    """PEM private key of `tls_cert_file`."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT so that several processes (codec replicas) share one port; the kernel
    spreads connections over them."""
    max_connection_age_s: float = 0.0
    """Close each client connection (GOAWAY) after this long, so clients reconnect and are spread over
    the processes listening now; 0 = never."""
    max_connection_age_grace_s: float = 30.0
    """How long calls on a connection closed for its age may still finish."""


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""


def _safe(parse):
    def run(raw: bytes):
        try:
            return parse(raw)
        except Exception:  # noqa: BLE001  (protobuf DecodeError and friends)
            return _Undecodable()

    return run


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


def progsae_handler(servicer: ProgsaeServicer) -> grpc.GenericRpcHandler:
    """progsae.v1.Progsae's methods on `servicer`; undecodable request bytes answer INVALID_ARGUMENT
    in one line (grpcio's own answer would be INTERNAL)."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Progsae"].methods:
        req_cls = getattr(pb, m.input_type.name)
        fn = getattr(servicer, m.name)
        detail = f"{m.name}: request bytes are not a valid progsae.v1 message"

        if m.server_streaming:
            async def stream(request, context, fn=fn, detail=detail):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
                msgs = fn(request, GrpcCall(context))
                try:
                    async for msg in msgs:
                        yield msg
                finally:
                    await msgs.aclose()

            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=_safe(req_cls.FromString), response_serializer=_serialize)
        else:
            async def unary(request, context, fn=fn, detail=detail):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)
                return await fn(request, GrpcCall(context))

            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_safe(req_cls.FromString), response_serializer=_serialize)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class _Reflection(reflection_pb2_grpc.ServerReflectionServicer):
    def __init__(self, servicer: ProgsaeServicer):
        self.servicer = servicer

    async def ServerReflectionInfo(self, request_iterator, context):
        async for resp in self.servicer.ServerReflectionInfo(request_iterator, GrpcCall(context)):
            yield resp


def message_options(limits: Limits) -> list[tuple[str, Any]]:
    """Transport size caps a little above the service's own limits (which answer RESOURCE_EXHAUSTED)."""
    return [("grpc.max_receive_message_length", limits.max_request_bytes + (1 << 20)),
            ("grpc.max_send_message_length", limits.max_response_bytes + (1 << 20))]


async def start_aio_server(servicer: ProgsaeServicer, config: GrpcServerConfig, limits: Limits
                           ) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start a grpc.aio server for `servicer` on the running loop: (server, port)."""
    options = [*message_options(limits), ("grpc.so_reuseport", 1 if config.reuse_port else 0)]
    if config.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(1e3 * config.max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", int(1e3 * config.max_connection_age_grace_s))]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((progsae_handler(servicer),))
    health.add_to_server(servicer.health, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(_Reflection(servicer), server)
    if config.tls_cert_file or config.tls_key_file:
        with open(config.tls_key_file, "rb") as f:
            key = f.read()
        with open(config.tls_cert_file, "rb") as f:
            cert = f.read()
        port = server.add_secure_port(config.address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(config.address)
    await server.start()
    return server, port


class PlainServer:
    """A running grpc.aio server on its own event-loop thread; `stop()` ends it."""

    def __init__(self, registry_config: RegistryConfig, service_config: ServiceConfig | None = None,
                 config: GrpcServerConfig | None = None):
        self.config = config or GrpcServerConfig()
        self.service_config = service_config or ServiceConfig()
        self.registry = Registry(registry_config)
        self.service = CodecService(self.service_config, text_available=text_available)
        self.servicer = ProgsaeServicer(self.registry, self.service, token=self.config.auth_token)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self._server, self.port = self._call(
            start_aio_server(self.servicer, self.config, self.service_config.limits))
        host = self.config.address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> PlainServer:
        return self  # serving since construction (the port is bound and answering)

    def stop(self, grace: float | None = 0.5) -> None:
        if not self._loop.is_running():
            return

        async def down():
            self.servicer.health.enter_graceful_shutdown()
            await self._server.stop(grace)

        self._call(down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.servicer.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> PlainServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

