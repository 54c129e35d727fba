"""The Ray Serve application: a codec deployment (gRPC + HTTP ingress) and a language-model one.

    Codec          gRPC methods of progsae.v1.Progsae (via Serve's native gRPC proxy), the gRPC
                   health and reflection services, and the HTTP/JSON API (server/http_api.py).
                   Models are multiplexed (serve.multiplexed, LRU per replica); Encode calls are
                   dynamically batched (serve.batch); replicas autoscale.
    LanguageModel  text -> tokens -> activations at a layer, for EncodeText; scales on its own.

`build_app(args)` is the import path for `serve run` / `serve deploy` (deploy/serve_config.yaml).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from ray import serve
from ray.serve.handle import DeploymentHandle

from progsae.v1 import progsae_pb2 as pb

from . import auth, http_api
from . import text as textmod
from .config import AppConfig
from .errors import ServiceError, Status, invalid
from .grpc_server import SERVICE_NAME
from .registry import Registry, RegistryConfig, ServedModel
from .service import CodecService, ServiceConfig
from .stats import Stats

GRPC_SERVICER_FUNCTIONS = [
    "progsae.v1.progsae_pb2_grpc.add_ProgsaeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "grpc_reflection.v1alpha.reflection_pb2_grpc.add_ServerReflectionServicer_to_server",
]
MODELS_PER_REPLICA = int(os.environ.get("PROGSAE_MODELS_PER_REPLICA", "4"))
"""LRU size of serve.multiplexed (fixed when the class is defined: set the env var in runtime_env)."""


def _fail(grpc_context, e: ServiceError) -> None:
    if grpc_context is not None:
        grpc_context.set_code(e.status.grpc())
        grpc_context.set_details(e.message)


TIMEOUT_METADATA = "progsae-timeout-ms"


def _expired(grpc_context, t0: float):
    """A check for the call's own deadline, sent by clients as metadata (Ray does not forward it)."""
    ms = None
    for key, value in grpc_context.invocation_metadata() if grpc_context is not None else ():
        if key == TIMEOUT_METADATA:
            try:
                ms = float(value)
            except ValueError:
                pass
    if ms is None or ms <= 0:
        return None
    end = t0 + ms / 1e3
    return lambda: time.perf_counter() > end


class StreamRejected(Exception):
    """Raised (after the status is set on the gRPC context) when a stream fails before its first message."""


@serve.deployment(name="LanguageModel", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4)
class LanguageModel:
    """Runs texts through a checkpoint's LM up to its layer (loaded on first use)."""

    def __init__(self) -> None:
        self.backend = textmod.TextBackend()

    def run(self, alias: str | None, layer: int | None, text: str, max_tokens: int) -> tuple:
        try:
            return ("ok", self.backend.run(alias, layer, text, max_tokens))
        except ServiceError as e:
            return ("error", e.status.value, e.message)
        except Exception as e:  # noqa: BLE001  (one line back, never a traceback)
            return ("error", Status.INTERNAL.value, f"language model failed: {type(e).__name__}: {e}"[:300])


@serve.deployment(name="Codec")
@serve.ingress(http_api.api)
class Codec:
    """gRPC + HTTP ingress over the transport-free CodecService."""

    def __init__(self, config: dict[str, Any], lm: DeploymentHandle | None = None) -> None:
        from .ray_metrics import RayServeSink

        self.config = AppConfig.from_dict(config)
        c = self.config
        self.registry = Registry(RegistryConfig(root=c.checkpoint_root, models=tuple(c.models),
                                                default_model=c.default_model, device=c.device))
        self.service = CodecService(ServiceConfig(limits=c.limits, torch_threads=c.torch_threads),
                                    Stats(RayServeSink()), text_available=self._text_available)
        self.lm = lm if c.text else None
        self._token = auth.resolve_token(c.auth_token, c.auth_token_env)
        self._encode_batch.set_max_batch_size(c.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        self._reflection = reflection.ReflectionServicer(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME))

    def _text_available(self, card) -> bool:
        return self.lm is not None and textmod.available(card)

    # --- models ---------------------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def _load(self, model_id: str) -> ServedModel:
        return self.registry.load(self.registry.resolve(model_id))

    async def model(self, field: str) -> ServedModel:
        """Resolve the request's model (field and/or multiplexed_model_id metadata) and load it."""
        meta = serve.get_multiplexed_model_id()
        spec = self.registry.resolve(field or meta)
        if field and meta and self.registry.resolve(meta).id != spec.id:
            raise invalid(f"model_id {field!r} disagrees with metadata multiplexed_model_id={meta!r}")
        return await self._load(spec.id)

    def loaded(self) -> list[str]:
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper is not None else []

    async def _unary(self, method: str, field: str, grpc_context, fn, empty):
        try:
            with self.service.observe(method, field):
                auth.check(grpc_context, self._token)
                model = await self.model(field)
                out = fn(model)
                if asyncio.iscoroutine(out):
                    out = await out
            self.service.stats.bytes_out(method, out.ByteSize())
            return out
        except ServiceError as e:
            _fail(grpc_context, e)
            return empty

    # --- gRPC: progsae.v1.Progsae ----------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def _encode_batch(self, items: list[tuple[ServedModel, pb.EncodeRequest]]) -> list:
        return self.service.encode_batch(items)

    async def encode(self, model: ServedModel, request: pb.EncodeRequest) -> pb.EncodeResponse:
        out = await self._encode_batch((model, request))
        if isinstance(out, ServiceError):
            raise out
        return out

    async def Encode(self, request: pb.EncodeRequest, grpc_context=None) -> pb.EncodeResponse:
        return await self._unary("Encode", request.model_id, grpc_context,
                                 lambda m: self.encode(m, request), pb.EncodeResponse())

    async def DecodeAtGranularity(self, request: pb.DecodeRequest, grpc_context=None) -> pb.DecodeResponse:
        return await self._unary("DecodeAtGranularity", request.model_id, grpc_context,
                                 lambda m: self.service.decode_at(m, request), pb.DecodeResponse())

    async def StreamDecode(self, request: pb.StreamDecodeRequest, grpc_context=None):
        t0 = time.perf_counter()
        done = {"recorded": False}

        def record(status: str) -> None:
            if not done["recorded"]:
                done["recorded"] = True
                self.service.stats.request("StreamDecode", status, request.model_id, time.perf_counter() - t0)

        try:
            auth.check(grpc_context, self._token)
            model = await self.model(request.model_id)
            gen = self.service.stream(model, request, cancelled=_expired(grpc_context, t0), t0=t0)
        except ServiceError as e:
            record(e.status.value)
            _fail(grpc_context, e)
            raise StreamRejected(e.message) from None
        # When Ray cancels the request (client gone, deadline passed) while this generator is
        # parked at `yield`, it is never resumed: close the computation from the task's end.
        task = asyncio.current_task()

        def on_task_done(_t) -> None:
            gen.close()
            record(Status.CANCELLED.value)

        if task is not None:
            task.add_done_callback(on_task_done)
        ended = False
        try:
            for msg in gen:
                self.service.stats.bytes_out("StreamDecode", msg.ByteSize())
                ended = msg.HasField("end")
                yield msg
                await asyncio.sleep(0)  # a cancellation point between rungs
        finally:
            if task is not None:
                task.remove_done_callback(on_task_done)
            gen.close()
            record("OK" if ended else Status.CANCELLED.value)

    async def encode_text(self, model: ServedModel, text: str, max_tokens: int) -> pb.EncodeTextResponse:
        limits = self.service.limits
        if not text.strip():
            raise invalid("text is empty")
        if len(text) > limits.max_text_chars:
            raise ServiceError(Status.RESOURCE_EXHAUSTED,
                               f"text of {len(text)} characters exceeds {limits.max_text_chars}")
        if self.lm is None:
            raise ServiceError(Status.UNIMPLEMENTED, "this server runs no language model (text: false)")
        if not model.meta.model or model.meta.layer is None:
            raise ServiceError(Status.FAILED_PRECONDITION,
                               f"model {model.id} names no language model and layer; EncodeText needs both")
        n = min(max_tokens or limits.max_text_tokens, limits.max_text_tokens)
        r = await self.lm.run.remote(model.meta.model, model.meta.layer, text, n)
        if r[0] == "error":
            raise ServiceError(Status(r[1]), r[2])
        ta = r[1]
        return self.service.encode_text_response(model, ta.token_ids, ta.tokens, ta.activations,
                                                 ta.language_model, ta.layer)

    async def EncodeText(self, request: pb.EncodeTextRequest, grpc_context=None) -> pb.EncodeTextResponse:
        return await self._unary("EncodeText", request.model_id, grpc_context,
                                 lambda m: self.encode_text(m, request.text, request.max_tokens),
                                 pb.EncodeTextResponse())

    def list_models(self) -> pb.ListModelsResponse:
        infos = [self.service.model_info(self.registry.card(s)) for s in self.registry.variants()]
        return pb.ListModelsResponse(models=infos, default_model_id=self.registry.default_id)

    def get_model(self, model_id: str) -> pb.ModelInfo:
        return self.service.model_info(self.registry.card(self.registry.resolve(model_id)))

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        try:
            with self.service.observe("ListModels"):
                auth.check(grpc_context, self._token)
                return self.list_models()
        except ServiceError as e:
            _fail(grpc_context, e)
            return pb.ListModelsResponse()

    async def GetModel(self, request: pb.GetModelRequest, grpc_context=None) -> pb.ModelInfo:
        try:
            with self.service.observe("GetModel", request.model_id):
                auth.check(grpc_context, self._token)
                return self.get_model(request.model_id or serve.get_multiplexed_model_id())
        except ServiceError as e:
            _fail(grpc_context, e)
            return pb.ModelInfo()

    async def GetServerStats(self, request: pb.ServerStatsRequest, grpc_context=None) -> pb.ServerStats:
        try:
            auth.check(grpc_context, self._token)
        except ServiceError as e:
            _fail(grpc_context, e)
            return pb.ServerStats()
        return self.service.server_stats(self.loaded())

    # --- gRPC: grpc.health.v1.Health and reflection -----------------------------------------

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        known = ("", SERVICE_NAME)
        if request.service not in known:
            _fail(grpc_context, ServiceError(Status.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def ServerReflectionInfo(self, requests, grpc_context=None):
        try:
            auth.check(grpc_context, self._token)
        except ServiceError as e:
            _fail(grpc_context, e)
            return
        async for req in requests:
            for resp in self._reflection.ServerReflectionInfo(iter([req]), None):
                yield resp


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `serve run progsae.server.app:build_app key=value` / serve_config.yaml."""
    cfg = AppConfig.from_dict(args)
    lm = None
    if cfg.text:
        lm_opts: dict[str, Any] = {"autoscaling_config": cfg.lm_autoscaling} if cfg.lm_autoscaling else {}
        lm = LanguageModel.options(**lm_opts).bind()
    opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "health_check_period_s": cfg.health_check_period_s,
        "logging_config": {"enable_access_log": cfg.access_log},
        "ray_actor_options": {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus},
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.codec_replicas
    return Codec.options(**opts).bind(cfg.to_dict(), lm)
