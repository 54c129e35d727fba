"""A plain in-process grpcio server over the same service layer (no Ray).

Used by tests, by the benchmark as the baseline, and by anyone who wants the codec without
a Ray cluster. Health and reflection services are on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc

from . import auth
from . import text as textmod
from .errors import ServiceError, Status, invalid
from .registry import Registry, RegistryConfig
from .service import CodecService, ServiceConfig

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Progsae"].full_name
MODEL_ID_METADATA = "multiplexed_model_id"


@dataclass(frozen=True)
class GrpcServerConfig:
    """How the plain grpcio server listens."""

    address: str = "127.0.0.1:0"
    """host:port to bind; port 0 picks a free one (see `PlainServer.port`)."""
    workers: int = 8
    """Handler threads."""
    auth_token: str = ""
    """Bearer token every call but health must carry (metadata `authorization: Bearer <token>`); empty = off."""
    tls_cert_file: str = ""
    """PEM certificate chain: with `tls_key_file`, the port speaks TLS instead of plaintext."""
    tls_key_file: str = ""
    """PEM private key of `tls_cert_file`."""


def model_id_of(field: str, metadata) -> str:
    """The model id from the request field and/or the `multiplexed_model_id` metadata."""
    meta = ""
    for key, value in metadata or ():
        if key == MODEL_ID_METADATA:
            meta = value
    if field and meta and field != meta:
        raise invalid(f"model_id {field!r} disagrees with metadata {MODEL_ID_METADATA}={meta!r}")
    return field or meta


class Servicer(pb_grpc.ProgsaeServicer):
    """grpcio servicer: resolve the model, call the service, map errors to statuses."""

    def __init__(self, registry: Registry, service: CodecService, text: textmod.TextBackend | None = None):
        self.registry = registry
        self.service = service
        self.text = text or textmod.TextBackend()

    def _model(self, field: str, context):
        return self.registry.get(model_id_of(field, context.invocation_metadata()))

    def _unary(self, method: str, field: str, context, fn):
        model_id = field
        try:
            with self.service.observe(method, model_id):
                model = self._model(field, context)
                out = fn(model)
            self.service.stats.bytes_out(method, out.ByteSize())
            return out
        except ServiceError as e:
            context.abort(e.status.grpc(), e.message)

    def Encode(self, request, context):
        return self._unary("Encode", request.model_id, context, lambda m: self.service.encode(m, request))

    def DecodeAtGranularity(self, request, context):
        return self._unary("DecodeAtGranularity", request.model_id, context,
                           lambda m: self.service.decode_at(m, request))

    def StreamDecode(self, request, context) -> Iterator[pb.StreamDecodeResponse]:
        t0 = time.perf_counter()
        status = "OK"
        try:
            try:
                model = self._model(request.model_id, context)
                stream = self.service.stream(model, request, cancelled=lambda: not context.is_active(), t0=t0)
            except ServiceError as e:
                status = e.status.value
                context.abort(e.status.grpc(), e.message)
            for msg in stream:
                self.service.stats.bytes_out("StreamDecode", msg.ByteSize())
                yield msg
            if not context.is_active():
                status = Status.CANCELLED.value
        except Exception as e:  # noqa: BLE001
            if status == "OK":
                status = Status.INTERNAL.value
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
            raise
        finally:
            self.service.stats.request("StreamDecode", status, request.model_id, time.perf_counter() - t0)

    def EncodeText(self, request, context):
        def run(model):
            limits = self.service.limits
            if len(request.text) > limits.max_text_chars:
                raise ServiceError(Status.RESOURCE_EXHAUSTED,
                                   f"text of {len(request.text)} characters exceeds {limits.max_text_chars}")
            n = min(request.max_tokens or limits.max_text_tokens, limits.max_text_tokens)
            ta = self.text.run(model.meta.model, model.meta.layer, request.text, n)
            return self.service.encode_text_response(model, ta.token_ids, ta.tokens, ta.activations,
                                                     ta.language_model, ta.layer)

        return self._unary("EncodeText", request.model_id, context, run)

    def ListModels(self, request, context):
        try:
            with self.service.observe("ListModels"):
                infos = [self.service.model_info(self.registry.card(s)) for s in self.registry.variants()]
                return pb.ListModelsResponse(models=infos, default_model_id=self.registry.default_id)
        except ServiceError as e:
            context.abort(e.status.grpc(), e.message)

    def GetModel(self, request, context):
        try:
            with self.service.observe("GetModel", request.model_id):
                mid = model_id_of(request.model_id, context.invocation_metadata())
                return self.service.model_info(self.registry.card(self.registry.resolve(mid)))
        except ServiceError as e:
            context.abort(e.status.grpc(), e.message)

    def GetServerStats(self, request, context):
        return self.service.server_stats(self.registry.loaded())


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""


class DecodeGuard(grpc.ServerInterceptor):
    """Undecodable request bytes answer INVALID_ARGUMENT with one line (grpcio's own answer is INTERNAL)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        name = (handler_call_details.method or "").rsplit("/", 1)[-1]

        def safe(raw: bytes):
            try:
                return decode(raw)
            except Exception:  # noqa: BLE001  (protobuf DecodeError and friends)
                return _Undecodable()

        def guard(behavior):
            def run(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{name}: request bytes are not a valid progsae.v1 message")
                return behavior(request, context)
            return run

        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=safe, unary_unary=guard(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=safe, unary_stream=guard(handler.unary_stream))
        return handler


class PlainServer:
    """A running grpcio server; `stop()` ends it."""

    def __init__(self, registry_config: RegistryConfig, service_config: ServiceConfig | None = None,
                 config: GrpcServerConfig | None = None):
        self.config = config or GrpcServerConfig()
        service_config = service_config or ServiceConfig()
        self.registry = Registry(registry_config)
        self.service = CodecService(service_config, text_available=textmod.available)
        limits = service_config.limits
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.workers),
            interceptors=[*([auth.AuthInterceptor(self.config.auth_token)] if self.config.auth_token else []),
                          DecodeGuard()],
            options=[("grpc.max_receive_message_length", limits.max_request_bytes + (1 << 20)),
                     ("grpc.max_send_message_length", limits.max_response_bytes + (1 << 20))],
        )
        self.servicer = Servicer(self.registry, self.service)
        pb_grpc.add_ProgsaeServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        if self.config.tls_cert_file or self.config.tls_key_file:
            with open(self.config.tls_key_file, "rb") as f:
                key = f.read()
            with open(self.config.tls_cert_file, "rb") as f:
                cert = f.read()
            self.port = self.server.add_secure_port(self.config.address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self.server.add_insecure_port(self.config.address)
        host = self.config.address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def start(self) -> PlainServer:
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()

    def __enter__(self) -> PlainServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
