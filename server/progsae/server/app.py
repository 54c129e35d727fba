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
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from progsae.v1 import progsae_pb2 as pb

from . import admission, auth, autoscaling, http_api, http_host, placement
from . import text as textmod
from .call import RayCall
from .config import AppConfig
from .errors import ServiceError, Status, internal
from .grpc_server import GrpcServerConfig, start_aio_server
from .ray_proxy import LOST_REPLICA, is_lost_replica
from .registry import Registry, RegistryConfig, ServedModel
from .service import CodecService, ServiceConfig
from .servicer import ProgsaeServicer
from .stats import Stats
from .text import TextActivations

GRPC_SERVICER_FUNCTIONS = [
    # progsae.v1.Progsae, registered with progsae's fixes to Serve's gRPC proxy (server/ray_proxy.py)
    "progsae.server.ray_proxy.add_ProgsaeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "grpc_reflection.v1alpha.reflection_pb2_grpc.add_ServerReflectionServicer_to_server",
]
log = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = int(os.environ.get("PROGSAE_MODELS_PER_REPLICA", "-1"))
"""A count cap on serve.multiplexed's LRU besides its byte budget (AppConfig.model_memory_bytes); -1 = none
(fixed when the class is defined: set the env var in runtime_env)."""


@serve.deployment(name="LanguageModel", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4)
class LanguageModel:
    """Runs texts through a checkpoint's LM up to its layer (loaded on first use)."""

    def __init__(self) -> None:
        self.backend = textmod.TextBackend()

    def run(self, alias: str, layers: Sequence[int], texts: Sequence[str],
            max_tokens: int) -> list[dict[int, TextActivations]] | ServiceError:
        """The texts' activations at the layers (one pass; TextBackend.run_many), or the error as a value
        (raised by the caller: Ray would wrap a raised one)."""
        try:
            return self.backend.run_many(alias, layers, texts, max_tokens)
        except ServiceError as e:
            return e
        except Exception as e:  # noqa: BLE001  (one line back, the traceback in this replica's log)
            return internal(e)


@serve.deployment(name="Codec")
@serve.ingress(http_api.api)
class Codec:
    """Hosts the one servicer: gRPC through Serve's proxy (methods below), optionally the same servicer
    on this replica's own grpc.aio port (`direct_grpc_port`), and the HTTP API."""

    async def __init__(self, config: dict[str, Any], lm: DeploymentHandle | None = None) -> None:
        from .ray_metrics import RayServeSink

        self.config = AppConfig.from_dict(config)
        c = self.config
        self.registry = Registry(RegistryConfig(root=c.checkpoint_root, models=tuple(c.models),
                                                default_model=c.default_model, device=c.device))
        self.service = CodecService(
            ServiceConfig(limits=c.limits, torch_threads=c.torch_threads, compute_threads=c.compute_threads,
                          memory_bytes=c.replica_memory_bytes),
            Stats(RayServeSink()), text_available=self._text_available)
        self.lm = lm if c.text else None
        self.model_budget = c.model_memory_bytes or admission.available_bytes() // 4
        forward = (placement.HandleForwarder(self._self_handle, self.loaded, self._weight_bytes, self.model_budget,
                                             c.forward_wait_s) if c.forward_direct_calls else None)
        self.servicer = ProgsaeServicer(self.registry, self.service,
                                        token=auth.resolve_token(c.auth_token, c.auth_token_env), forward=forward,
                                        # Ray leaves serve.multiplexed's result unannotated (pyright misreads it)
                                        load=lambda spec: self._load(spec.id),  # pyright: ignore[reportCallIssue]
                                        encode=self._encode,
                                        text=self._run_text, text_enabled=self.lm is not None, loaded=self.loaded)
        # Ray's annotation of serve.batch leaves out the setters its wrapper has
        self._encode_batch.set_max_batch_size(c.max_batch_size)  # pyright: ignore[reportAttributeAccessIssue]
        self._encode_batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)  # pyright: ignore[reportAttributeAccessIssue]
        self._encodes_in_flight = 0
        self._handle: DeploymentHandle | None = None
        http_host.host(self.servicer, http_api.api)
        self._direct = None
        if c.direct_grpc_port:
            self._direct = await start_aio_server(
                self.servicer, GrpcServerConfig(address=f"{c.direct_grpc_host}:{c.direct_grpc_port}", reuse_port=True,
                                                max_connection_age_s=c.direct_max_connection_age_s,
                                                max_connection_age_grace_s=c.direct_max_connection_age_grace_s),
                c.limits)

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (scale-down, redeploy), after its own drain: the direct
        port turns NOT_SERVING, sends GOAWAY (clients open their next calls elsewhere) and lets the calls
        in flight finish within graceful_shutdown_timeout_s."""
        direct, self._direct = getattr(self, "_direct", None), None
        if direct is not None:
            server, _ = direct
            t0, calls = time.perf_counter(), self.service.stats.in_flight["direct"]
            self.servicer.health.enter_graceful_shutdown()
            await server.stop(self.config.graceful_shutdown_timeout_s)
            log.info("progsae: codec replica %s stopped its direct port in %.3f s (%d calls in flight at GOAWAY, "
                     "%d left)", self.service.stats.replica, time.perf_counter() - t0, calls,
                     self.service.stats.in_flight["direct"])

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics: the load its proxies do not see (the direct port)."""
        return autoscaling.replica_stats(self.service.stats)

    def _text_available(self, card) -> bool:
        return self.lm is not None and textmod.available(card)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def _load(self, model_id: str) -> ServedModel:
        """Make room in the byte budget, then load off the event loop (reading and hashing a large
        checkpoint takes seconds). Serve keys its LRU by id; the id resolves from the registry's cache."""
        spec = self.registry.resolve(model_id)
        await placement.make_room(getattr(self, "__serve_multiplex_wrapper"), self._weight_bytes(spec),
                                  self.model_budget, spec.id)
        return await asyncio.to_thread(self.registry.load, spec)

    def _weight_bytes(self, spec) -> int:
        m = self.registry.card(spec).meta
        return admission.weight_bytes(m.d_in, m.d_sae)

    def _self_handle(self) -> DeploymentHandle:
        """This deployment's handle (made on first use, inside the replica)."""
        if self._handle is None:
            ctx = serve.get_replica_context()
            self._handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        return self._handle

    # --- calls another replica sent on (progsae.server.placement) ---------------------------------

    async def forwarded(self, method: str, request: Any, timeout_s: float | None) -> Any:
        return await getattr(self.servicer, method)(request, placement.ForwardedCall(timeout_s))

    async def forwarded_stream(self, method: str, request: Any, timeout_s: float | None):
        stream = getattr(self.servicer, method)(request, placement.ForwardedCall(timeout_s))
        try:
            async for msg in stream:
                yield msg
        finally:
            await stream.aclose()

    def loaded(self) -> dict[str, ServedModel]:
        """The models this replica holds (serve.multiplexed's LRU), by id."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        return dict(wrapper.models) if wrapper is not None else {}

    # Several batches may be in flight (the compute pool bounds what runs at once): a small Encode
    # then runs beside a large one instead of queueing behind it.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001, max_concurrent_batches=8)
    async def _encode_batch(self, items: list[tuple[ServedModel, pb.EncodeRequest]]) -> list:
        return await self.servicer.compute(self.service.encode_batch, items)

    async def _encode(self, model: ServedModel, request: pb.EncodeRequest) -> pb.EncodeResponse:
        shape = request.activations.shape
        large = len(shape) == 2 and shape[0] > self.config.batch_max_tokens
        alone = large or not self._encodes_in_flight
        self._encodes_in_flight += 1
        try:
            if alone:
                # Large calls run alone (batched with one, a small call would wait for it), and so does a
                # call that finds no other Encode running: there is nothing to batch it with, and
                # serve.batch's queue would only add its own latency. Calls that arrive while others run
                # are batched.
                return await self.servicer.compute(self.service.encode, model, request)
            out = await self._encode_batch((model, request))
        finally:
            self._encodes_in_flight -= 1
        if isinstance(out, ServiceError):
            raise out
        return out

    async def _run_text(self, alias: str, layers: Sequence[int], texts: Sequence[str],
                        n: int) -> list[dict[int, TextActivations]]:
        assert self.lm is not None
        try:
            r = await self.lm.run.remote(alias, layers, texts, n)
        except Exception as e:
            if is_lost_replica(e):  # its replica or node died under the call: transient, like our own
                raise ServiceError(Status.UNAVAILABLE, LOST_REPLICA.format(type(e).__name__)) from e
            raise
        if isinstance(r, ServiceError):
            raise r
        return r

    # --- gRPC through Serve's proxy: the servicer's methods, each call wrapped in a RayCall ---------

    async def Encode(self, request: pb.EncodeRequest, grpc_context=None) -> pb.EncodeResponse:
        return await self.servicer.Encode(request, RayCall(grpc_context))

    async def DecodeAtGranularity(self, request: pb.DecodeRequest, grpc_context=None) -> pb.DecodeResponse:
        return await self.servicer.DecodeAtGranularity(request, RayCall(grpc_context))

    async def StreamDecode(self, request: pb.StreamDecodeRequest, grpc_context=None):
        stream = self.servicer.StreamDecode(request, RayCall(grpc_context))
        # When Ray cancels the request (client gone, deadline passed) while the stream is parked at
        # `yield`, it is never resumed: close it from the task's end so it counts and computes no more.
        task = asyncio.current_task()

        def close(_t: object) -> None:
            asyncio.get_running_loop().create_task(stream.aclose())

        if task is not None:
            task.add_done_callback(close)
        try:
            async for msg in stream:
                yield msg
        finally:
            if task is not None:
                task.remove_done_callback(close)
            await stream.aclose()

    async def EncodeText(self, request: pb.EncodeTextRequest, grpc_context=None) -> pb.EncodeTextResponse:
        return await self.servicer.EncodeText(request, RayCall(grpc_context))

    async def EncodeTexts(self, request: pb.EncodeTextsRequest, grpc_context=None) -> pb.EncodeTextsResponse:
        return await self.servicer.EncodeTexts(request, RayCall(grpc_context))

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        return await self.servicer.ListModels(request, RayCall(grpc_context))

    async def GetModel(self, request: pb.GetModelRequest, grpc_context=None) -> pb.ModelInfo:
        return await self.servicer.GetModel(request, RayCall(grpc_context))

    async def GetServerStats(self, request: pb.ServerStatsRequest, grpc_context=None) -> pb.ServerStats:
        return await self.servicer.GetServerStats(request, RayCall(grpc_context))

    async def ServerReflectionInfo(self, requests, grpc_context=None):
        async for resp in self.servicer.ServerReflectionInfo(requests, RayCall(grpc_context)):
            yield resp

    # --- gRPC: grpc.health.v1.Health (progsae.server.health) -------------------------------------

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        return await self.servicer.health.Check(request, RayCall(grpc_context))

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        async for resp in self.servicer.health.Watch(request, RayCall(grpc_context)):
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
        # with a direct port, Serve's policy must see its load too (progsae.server.autoscaling)
        opts["autoscaling_config"] = autoscaling.with_policy(cfg.autoscaling) if cfg.direct_grpc_port \
            else cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.codec_replicas
    return Codec.options(**opts).bind(cfg.to_dict(), lm)
