"""The one implementation of the wire contract progsae.v1.Progsae, hosted by every transport.

    client -> transport (grpc.aio server | Ray Serve gRPC) -> ProgsaeServicer -> CodecService -> codec

Per call, exactly once and only here: auth, model-id resolution (field and the
`multiplexed_model_id` metadata reconciled; ids cached by the registry), the call's deadline
(gRPC's own, or the `progsae-timeout-ms` metadata Ray forwards instead), status mapping and
metrics. Torch work (validation of large tensors, encode, every rung, checkpoint loading)
runs on a thread pool, never on the event loop, so health checks, GetModel and other
streams keep flowing while a large request computes. A cancelled call (client gone, deadline
passed) starts no further rung.

Method signatures are `(request, grpc_context)`: grpc.aio passes its ServicerContext
positionally, Ray Serve passes its RayServegRPCContext by that keyword. A failed call aborts
on grpc.aio and sets code and details on Ray's context (which has no abort).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from progsae.v1 import progsae_pb2 as pb

from . import auth
from .errors import ServiceError, Status, internal, invalid
from .registry import ModelSpec, Registry, ServedModel
from .service import CodecService
from .text import TextActivations, TextBackend

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Progsae"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MODEL_ID_METADATA = "multiplexed_model_id"
TIMEOUT_METADATA = "progsae-timeout-ms"
"""Milliseconds the client will wait; clients send it because Ray's proxy does not forward gRPC deadlines."""

T = TypeVar("T")
Loader = Callable[[ModelSpec], Awaitable[ServedModel]]
TextRunner = Callable[[str, int, str, int], Awaitable[TextActivations]]
_END = object()


class StreamRejected(Exception):
    """A stream failed on Ray's context (status already set there); raising ends the call."""


def metadata_value(grpc_context: Any, key: str) -> str:
    for k, v in grpc_context.invocation_metadata() or () if grpc_context is not None else ():
        if k == key:
            return v
    return ""


def deadline_check(grpc_context: Any, t0: float) -> Callable[[], bool]:
    """True once the call's deadline has passed: gRPC's own (grpc.aio), else the timeout metadata."""
    end = None
    remaining: Callable[[], float | None] | None = getattr(grpc_context, "time_remaining", None)
    left = remaining() if callable(remaining) else None
    if left is not None:
        end = time.perf_counter() + left
    else:
        try:
            ms = float(metadata_value(grpc_context, TIMEOUT_METADATA) or 0)
        except ValueError:
            ms = 0.0
        if ms > 0:
            end = t0 + ms / 1e3
    return (lambda: False) if end is None else (lambda: time.perf_counter() > end)


async def fail(grpc_context: Any, e: ServiceError) -> None:
    """Answer the call with e's status: abort (grpc.aio raises), else set it on Ray's context."""
    if grpc_context is None:
        raise e
    abort = getattr(grpc_context, "abort", None)
    if abort is not None and asyncio.iscoroutinefunction(abort):
        await abort(e.status.grpc(), e.message)
    grpc_context.set_code(e.status.grpc())
    grpc_context.set_details(e.message)


class OffLoop:
    """A sync generator advanced one item at a time on an executor; close() is safe at any moment
    (while an item is being computed, the generator is closed as soon as that item is done)."""

    def __init__(self, gen: Generator[T, None, None], pool: Executor):
        self.gen, self.pool = gen, pool
        self._pending: Future | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            self._pending = self.pool.submit(next, self.gen, _END)
            item = await asyncio.wrap_future(self._pending)
            self._pending = None
            if item is _END:
                return
            yield item

    def close(self) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: self.gen.close())
        else:
            self.gen.close()


class ProgsaeServicer:
    """progsae.v1.Progsae over a CodecService. Hosts give it how to load a model (Ray: the
    multiplexed LRU), how to encode (Ray: dynamic batching) and how to run text through a
    language model (Ray: its own deployment); the defaults do each in this process."""

    def __init__(self, registry: Registry, service: CodecService, *, token: str = "",
                 pool: Executor | None = None, load: Loader | None = None,
                 encode: Callable[[ServedModel, pb.EncodeRequest], Awaitable[pb.EncodeResponse]] | None = None,
                 text: TextRunner | None = None, text_enabled: bool = True,
                 loaded: Callable[[], list[str]] | None = None):
        self.registry, self.service, self.token = registry, service, token
        self.pool = pool or ThreadPoolExecutor(max(1, service.config.compute_threads), thread_name_prefix="codec")
        self._load = load or (lambda spec: asyncio.to_thread(registry.get, spec.id))
        self._encode = encode or (lambda model, req: self.compute(service.encode, model, req))
        self._text = text or _local_text(TextBackend())
        self.text_enabled = text_enabled
        self._loaded = loaded or registry.loaded
        self.reflection = reflection.ReflectionServicer((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME))

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run torch work on the compute pool (never on the event loop)."""
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    def authorize(self, grpc_context: Any) -> None:
        """UNAUTHENTICATED unless the call carries the bearer token. No context = an in-process caller
        (the HTTP API) whose own transport checked the token already."""
        if grpc_context is not None:
            auth.check(grpc_context, self.token)

    def resolve(self, field: str, grpc_context: Any) -> ModelSpec:
        """The call's model: its field and/or the multiplexed_model_id metadata, which must agree."""
        meta = metadata_value(grpc_context, MODEL_ID_METADATA)
        spec = self.registry.resolve(field or meta)
        if field and meta and meta != field and self.registry.resolve(meta).id != spec.id:
            raise invalid(f"model_id {field!r} disagrees with metadata {MODEL_ID_METADATA}={meta!r}")
        return spec

    async def model(self, field: str, grpc_context: Any) -> ServedModel:
        return await self._load(self.resolve(field, grpc_context))

    async def _unary(self, method: str, field: str, grpc_context: Any, body: Callable[[], Awaitable[Any]],
                     empty: Any) -> Any:
        method = _label(method, grpc_context)
        try:
            with self.service.observe(method, field):
                self.authorize(grpc_context)
                out = await body()
            self.service.stats.bytes_out(method, out.ByteSize())
            return out
        except ServiceError as e:
            await fail(grpc_context, e)
            return empty

    # --- progsae.v1.Progsae -----------------------------------------------------------------

    async def Encode(self, request: pb.EncodeRequest, grpc_context: Any = None) -> pb.EncodeResponse:
        async def body():
            return await self._encode(await self.model(request.model_id, grpc_context), request)

        return await self._unary("Encode", request.model_id, grpc_context, body, pb.EncodeResponse())

    async def DecodeAtGranularity(self, request: pb.DecodeRequest, grpc_context: Any = None) -> pb.DecodeResponse:
        async def body():
            return await self.compute(self.service.decode_at, await self.model(request.model_id, grpc_context),
                                      request)

        return await self._unary("DecodeAtGranularity", request.model_id, grpc_context, body, pb.DecodeResponse())

    async def StreamDecode(self, request: pb.StreamDecodeRequest,
                           grpc_context: Any = None) -> AsyncGenerator[pb.StreamDecodeResponse, None]:
        t0 = time.perf_counter()
        status = Status.CANCELLED.value
        rungs: OffLoop | None = None
        try:
            try:
                self.authorize(grpc_context)
                model = await self.model(request.model_id, grpc_context)
                expired = deadline_check(grpc_context, t0)
                gen = await self.compute(self.service.stream, model, request, expired, t0)
                rungs = OffLoop(gen, self.pool)
                async for msg in rungs:
                    self.service.stats.bytes_out("StreamDecode", msg.ByteSize())
                    if msg.HasField("end"):
                        status = "OK"
                    yield msg
                if status != "OK" and expired():  # the service stopped at the call's deadline
                    raise ServiceError(Status.DEADLINE_EXCEEDED, "the call's deadline passed; stream stopped")
            except ServiceError as e:
                status = e.status.value
                await fail(grpc_context, e)
                raise StreamRejected(e.message) from None
            except Exception as e:  # noqa: BLE001  (never a traceback to the client)
                err = internal(e)
                status = err.status.value
                await fail(grpc_context, err)
                raise StreamRejected(err.message) from None
        finally:
            if rungs is not None:
                rungs.close()
            self.service.stats.request(_label("StreamDecode", grpc_context), status, request.model_id,
                                       time.perf_counter() - t0)

    async def EncodeText(self, request: pb.EncodeTextRequest, grpc_context: Any = None) -> pb.EncodeTextResponse:
        async def body():
            model = await self.model(request.model_id, grpc_context)
            limits = self.service.limits
            text = request.text
            if not text.strip():
                raise invalid("text is empty")
            if len(text) > limits.max_text_chars:
                raise ServiceError(Status.RESOURCE_EXHAUSTED,
                                   f"text of {len(text)} characters exceeds {limits.max_text_chars}")
            if not self.text_enabled:
                raise ServiceError(Status.UNIMPLEMENTED, "this server runs no language model (text: false)")
            if not model.meta.model or model.meta.layer is None:
                raise ServiceError(Status.FAILED_PRECONDITION,
                                   f"model {model.id} names no language model and layer; EncodeText needs both")
            n = min(request.max_tokens or limits.max_text_tokens, limits.max_text_tokens)
            ta = await self._text(model.meta.model, int(model.meta.layer), text, n)
            return await self.compute(self.service.encode_text_response, model, ta.token_ids, ta.tokens,
                                      ta.activations, ta.language_model, ta.layer, request.packed_codes)

        return await self._unary("EncodeText", request.model_id, grpc_context, body, pb.EncodeTextResponse())

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any = None) -> pb.ListModelsResponse:
        async def body():
            return self.list_models()

        return await self._unary("ListModels", "", grpc_context, body, pb.ListModelsResponse())

    async def GetModel(self, request: pb.GetModelRequest, grpc_context: Any = None) -> pb.ModelInfo:
        async def body():
            return self.get_model(self.resolve(request.model_id, grpc_context))

        return await self._unary("GetModel", request.model_id, grpc_context, body, pb.ModelInfo())

    async def GetServerStats(self, request: pb.ServerStatsRequest, grpc_context: Any = None) -> pb.ServerStats:
        async def body():
            return self.service.server_stats(self._loaded())

        return await self._unary("GetServerStats", "", grpc_context, body, pb.ServerStats())

    # --- the same, for the HTTP API (no protobuf metadata) ------------------------------------

    def list_models(self) -> pb.ListModelsResponse:
        infos = [self.get_model(s) for s in self.registry.variants()]
        return pb.ListModelsResponse(models=infos, default_model_id=self.registry.default_id)

    def get_model(self, spec: ModelSpec) -> pb.ModelInfo:
        return self.service.model_info(self.registry.card(spec))

    # --- grpc.reflection.v1alpha (behind the same auth) -----------------------------------------

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any], grpc_context: Any = None):
        try:
            self.authorize(grpc_context)
        except ServiceError as e:
            await fail(grpc_context, e)
            return
        async for req in requests:
            # typeshed wants a context; grpc_reflection's servicer never reads it
            for resp in self.reflection.ServerReflectionInfo(iter([req]), None):  # pyright: ignore[reportArgumentType]
                yield resp


def _label(method: str, grpc_context: Any) -> str:
    """The metrics label of a call: the RPC's name, `http:`-prefixed for the HTTP API (no gRPC context)."""
    return method if grpc_context is not None else f"http:{method}"


def _local_text(backend: TextBackend) -> TextRunner:
    async def run(alias: str, layer: int, text: str, n: int) -> TextActivations:
        return await asyncio.to_thread(backend.run, alias, layer, text, n)

    return run
