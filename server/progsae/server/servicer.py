"""The one implementation of the wire contract progsae.v1.Progsae, hosted by every transport.

    client -> host (grpc.aio server | Ray Serve gRPC | HTTP API) -> ProgsaeServicer -> CodecService -> codec

Hosts are thin: each wraps its transport's context in a `Call` (progsae.server.call) and calls a
method here. Per call, exactly once and only here: auth, model-id resolution (field and the
`multiplexed_model_id` metadata reconciled; ids cached by the registry), the call's deadline,
status mapping (a ServiceError, or INTERNAL for anything else, answered through `Call.fail`) and
metrics. Torch work (validation of large tensors, encode, every rung, checkpoint loading) runs on
a thread pool, never on the event loop, so health checks, GetModel and other streams keep
flowing while a large request computes. A cancelled call (client gone, deadline passed) starts no
further rung.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, TypeVar

from grpc_reflection.v1alpha import reflection

from progsae.v1 import progsae_pb2 as pb

from . import auth, stream, validate
from . import text as textmod
from .admission import Admission, Shape, default_budget
from .call import Call
from .errors import ServiceError, Status, invalid
from .health import HEALTH_NAME, SERVICE_NAME, Health
from .off_loop import OffLoop
from .registry import ModelRef, Registry, ServedModel
from .service import CodecService
from .text import TextActivations, TextBackend

T = TypeVar("T")
Loader = Callable[[ModelRef], Awaitable[ServedModel]]
TextRunner = Callable[[str, Sequence[int], Sequence[str], int], Awaitable[list[dict[int, TextActivations]]]]
"""(language model, layers, texts, most tokens) -> each text's activations at each layer, from one pass."""


class Forwarder(Protocol):
    """Where a call goes when its model is held by another replica (Ray: progsae.server.placement).
    `unary` and `stream` raise NotRouted when no replica took the call in time: it is then served here."""

    def wants(self, spec: ModelRef, call: Call) -> bool: ...
    async def unary(self, method: str, request: Any, spec: ModelRef, call: Call) -> Any: ...
    def stream(self, method: str, request: Any, spec: ModelRef, call: Call) -> AsyncGenerator[Any, None]: ...


class Elsewhere(Exception):
    """The call's model is held by another replica: the call is sent there (`Forwarder`)."""

    def __init__(self, spec: ModelRef):
        self.spec = spec


class Tagged(NamedTuple):
    """An item of one of the several streams of one StreamEvents call."""

    stream: int
    """Which: 0 for the call's request, i for its also[i - 1]."""
    item: TextActivations | stream.Event


class NotRouted(Exception):
    """The forwarder could not place the call on another replica in time: this replica serves it."""


class StreamRejected(Exception):
    """A stream failed on a context that cannot abort (Ray's; status already set there); raising ends it."""


class ProgsaeServicer:
    """progsae.v1.Progsae over a CodecService. Hosts give it how to load a model (Ray: the
    multiplexed LRU), how to encode (Ray: dynamic batching) and how to run text through a
    language model (Ray: its own deployment); the defaults do each in this process."""

    def __init__(self, registry: Registry, service: CodecService, *, token: str = "",
                 pool: Executor | None = None, load: Loader | None = None,
                 encode: Callable[[ServedModel, pb.EncodeRequest], Awaitable[pb.EncodeResponse]] | None = None,
                 text: TextRunner | None = None, text_enabled: bool = True,
                 loaded: Callable[[], Mapping[str, ServedModel]] | None = None, forward: Forwarder | None = None):
        self.registry, self.service, self.token = registry, service, token
        self.pool = pool or ThreadPoolExecutor(max(1, service.config.compute_threads), thread_name_prefix="codec")
        self._load = load or (lambda spec: asyncio.to_thread(registry.get, spec))
        self._encode = encode or (lambda model, req: self.compute(service.encode, model, req))
        self._text = text or _local_text(TextBackend())
        self.text_enabled = text_enabled
        self._loaded = loaded or registry.loaded
        self.forward = forward
        self.health = Health()
        budget = service.config.memory_bytes
        self.admission = Admission(default_budget(service.config.compute_threads) if budget == 0 else budget)
        self.reflection = reflection.ReflectionServicer((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME))

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue torch work on the compute pool, counted until it finishes (the replica's rung work
        queued, which it reports to the autoscaler)."""
        stats = self.service.stats
        stats.compute_started()
        future = self.pool.submit(fn, *args)
        future.add_done_callback(stats.compute_done)
        return future

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run torch work on the compute pool (never on the event loop)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    # --- what every call goes through -----------------------------------------------------------

    def authorize(self, call: Call) -> None:
        """UNAUTHENTICATED unless the call carries the bearer token (no-op when auth is off, and for a
        call another replica authorised and sent on)."""
        if not call.trusted:
            auth.check(call.authorization, self.token)

    def resolve(self, field: str, call: Call, agree: bool = True) -> ModelRef:
        """The call's model: its field and/or the multiplexed_model_id metadata, which must agree
        (`agree`: a call naming several models checks the metadata itself)."""
        meta = call.model_id if agree else ""
        spec = self.registry.resolve(field or meta)
        if field and meta and meta != field and self.registry.resolve(meta).id != spec.id:
            raise invalid(f"model_id {field!r} disagrees with metadata multiplexed_model_id={meta!r}")
        self.service.stats.count("resolve")
        return spec

    async def model(self, field: str, call: Call, method: str = "", tokens: int = 0,
                    encodes: bool = False, agree: bool = True) -> ServedModel:
        """The call's model, loaded; a call of `tokens` tokens is priced first (admission) and refused
        when it would not fit the replica's memory."""
        spec = self.resolve(field, call, agree)
        if self.forward is not None and not call.stay and self.forward.wants(spec, call):
            raise Elsewhere(spec)
        if tokens > 0:
            m = self.registry.card(spec).meta
            self.admission.check(method, spec.id, Shape(tokens, m.d_in, m.d_sae, m.k, encodes),
                                 loaded=spec.id in self._loaded())
        return await self._load(spec)

    async def unary(self, method: str, field: str, call: Call, body: Callable[[], Awaitable[T]], empty: T,
                    request: Any = None) -> T:
        """Run one unary call: auth, metrics, status mapping; `request` is sent on as it is when its model
        is held elsewhere. `empty` answers a failed call on a host whose `fail` does not raise (Ray's)."""
        label = call.label(method)
        stats = self.service.stats
        stats.enter(call.transport)
        try:
            with self.service.observe(label, field):
                self.authorize(call)
                try:
                    out = await body()
                except Elsewhere as e:
                    assert self.forward is not None and request is not None  # only model() raises it
                    try:
                        out = await self.forward.unary(method, request, e.spec, call)
                        stats.count("forward")
                    except NotRouted:
                        stats.count("forward unrouted")
                        call.stay = True
                        out = await body()
            size = getattr(out, "ByteSize", None)
            if size is not None:
                stats.bytes_out(label, size())
            return out
        except ServiceError as e:
            await call.fail(e)
            return empty
        finally:
            stats.leave(call.transport)

    async def streaming(self, method: str, field: str, call: Call,
                        body: Callable[[Callable[[], bool], float], AsyncGenerator[T, None]],
                        request: Any = None) -> AsyncGenerator[T, None]:
        """Run one streaming call: auth, metrics, status mapping, and DEADLINE_EXCEEDED when the
        deadline stopped the stream before its end. `body(expired, t0)` yields the items; `request` is
        sent on as it is when its model is held elsewhere."""
        label = call.label(method)
        t0 = time.perf_counter()
        items: AsyncGenerator[T, None] | None = None
        self.service.stats.enter(call.transport)
        try:
            with self.service.observe(label, field):
                self.authorize(call)
                expired = call.expired(t0)
                ended = False
                items = self._forwarding(lambda: body(expired, t0), method, request, call)
                async for item in items:
                    size = getattr(item, "ByteSize", None)
                    if size is not None:
                        self.service.stats.bytes_out(label, size())
                    ended = ended or _is_end(item)
                    yield item
                if not ended:  # the service stops before its end only at the call's deadline
                    raise ServiceError(Status.DEADLINE_EXCEEDED, "the call's deadline passed; stream stopped")
        except ServiceError as e:
            await call.fail(e)
            raise StreamRejected(e.message) from None
        finally:
            self.service.stats.leave(call.transport)
            if items is not None:
                await items.aclose()  # stops its computing at once (OffLoop.close)

    async def _forwarding(self, body: Callable[[], AsyncGenerator[T, None]], method: str, request: Any,
                          call: Call) -> AsyncGenerator[T, None]:
        """`body()`'s items, or, when it finds its model held elsewhere (before its first item), the
        stream of the replica that holds it; when no replica takes the call in time, `body()`'s again,
        served here."""
        items = body()
        try:
            async for item in items:
                yield item
            return
        except Elsewhere as e:
            elsewhere = e
        finally:
            await items.aclose()
        assert self.forward is not None and request is not None  # only model() raises Elsewhere
        sent = self.forward.stream(method, request, elsewhere.spec, call)
        try:
            try:
                first = await anext(sent)
            except StopAsyncIteration:
                return
            except NotRouted:
                self.service.stats.count("forward unrouted")
                call.stay = True
                sent = body()
                first = await anext(sent)  # its model is loaded here now: no Elsewhere
            else:
                self.service.stats.count("forward")
            yield first
            async for item in sent:
                yield item
        finally:
            await sent.aclose()

    async def _off_loop(self, gen_fn: Callable[..., Generator[T, None, Any]], *args: Any) -> AsyncGenerator[T, None]:
        """Items of a sync generator built and advanced on the compute pool; it is closed when this is."""
        items = OffLoop(await self.compute(gen_fn, *args), self.submit)
        try:
            async for item in items:
                yield item
        finally:
            items.close()

    # --- progsae.v1.Progsae -----------------------------------------------------------------

    async def Encode(self, request: pb.EncodeRequest, call: Call) -> pb.EncodeResponse:
        async def body():
            model = await self.model(request.model_id, call, "Encode", _rows(request.activations), encodes=True)
            return await self._encode(model, request)

        return await self.unary("Encode", request.model_id, call, body, pb.EncodeResponse(), request)

    async def DecodeAtGranularity(self, request: pb.DecodeRequest, call: Call) -> pb.DecodeResponse:
        async def body():
            model = await self.model(request.model_id, call, "DecodeAtGranularity", _code_rows(request.codes))
            return await self.compute(self.service.decode_at, model, request)

        return await self.unary("DecodeAtGranularity", request.model_id, call, body, pb.DecodeResponse(), request)

    def StreamDecode(self, request: pb.StreamDecodeRequest,
                     call: Call) -> AsyncGenerator[pb.StreamDecodeResponse, None]:
        async def body(expired: Callable[[], bool], t0: float):
            ta = None
            if request.WhichOneof("input") == "text":  # revision 5: the language model first, once
                text = request.text
                n = self._text_tokens(text.max_tokens)
                model = await self.model(request.model_id, call, "StreamDecode", n, True)
                ta = await self.run_text(model, text.text, text.max_tokens)
            else:
                encodes = request.WhichOneof("input") == "activations"
                rows = _rows(request.activations) if encodes else _code_rows(request.codes)
                model = await self.model(request.model_id, call, "StreamDecode", rows, encodes)
            rungs = self._off_loop(self.service.stream, model, request, expired, t0, ta)
            try:
                async for msg in rungs:
                    yield msg
            finally:
                await rungs.aclose()

        return self.streaming("StreamDecode", request.model_id, call, body, request)

    async def EncodeText(self, request: pb.EncodeTextRequest, call: Call) -> pb.EncodeTextResponse:
        async def body():
            model = await self.model(request.model_id, call, "EncodeText", self._text_tokens(request.max_tokens), True)
            ta = await self.run_text(model, request.text, request.max_tokens)
            return await self.compute(self.service.encode_text_response, model, ta, request.packed_codes)

        return await self.unary("EncodeText", request.model_id, call, body, pb.EncodeTextResponse(), request)

    async def EncodeTexts(self, request: pb.EncodeTextsRequest, call: Call) -> pb.EncodeTextsResponse:
        ids = list(request.model_ids) or [""]
        field = ids[0] if len(ids) == 1 else ""

        async def body():
            n = self._text_tokens(request.max_tokens) * len(request.texts)
            models = await self._text_models(ids, call, "EncodeTexts", n)
            texts = await self.run_texts(models, list(request.texts), request.max_tokens)
            results = await self.compute(lambda: [self.service.encode_text_response(m, ta, request.packed_codes)
                                                  for row in texts for m, ta in zip(models, row, strict=True)])
            return pb.EncodeTextsResponse(results=results, lm_ms=texts[0][0].lm_ms)

        return await self.unary("EncodeTexts", field, call, body, pb.EncodeTextsResponse(), request)

    async def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        async def body():
            infos = [self.service.model_info(self.registry.card(s)) for s in self.registry.variants()]
            return pb.ListModelsResponse(models=infos, default_model_id=self.registry.default_id)

        return await self.unary("ListModels", "", call, body, pb.ListModelsResponse())

    async def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        async def body():
            return self.service.model_info(self.registry.card(self.resolve(request.model_id, call)))

        return await self.unary("GetModel", request.model_id, call, body, pb.ModelInfo())

    async def GetServerStats(self, request: pb.ServerStatsRequest, call: Call) -> pb.ServerStats:
        async def body():
            return self.service.server_stats(self._loaded(), self.registry.loads)

        return await self.unary("GetServerStats", "", call, body, pb.ServerStats())

    # --- text: one pass from the language model to the rungs ----------------------------------

    async def run_text(self, model: ServedModel, text: str, max_tokens: int) -> TextActivations:
        """The checkpoint's language model over `text`, up to its layer (once per call)."""
        ((ta,),) = await self.run_texts([model], [text], max_tokens)
        return ta

    async def run_texts(self, models: Sequence[ServedModel], texts: Sequence[str],
                        max_tokens: int) -> list[list[TextActivations]]:
        """The models' one language model over `texts` in one pass, up to the deepest of their layers:
        [text][model], each at its model's layer."""
        validate.texts(texts, self.service.limits)
        if not self.text_enabled:
            raise ServiceError(Status.UNIMPLEMENTED, "this server runs no language model (text: false)")
        lm, layers = textmod.language_model_of(models)
        self.service.stats.count("lm")
        t0 = time.perf_counter()
        out = await self._text(lm, layers, list(texts), self._text_tokens(max_tokens))
        ms = 1e3 * (time.perf_counter() - t0)
        return [[dataclasses.replace(by_layer[int(m.meta.layer)], lm_ms=ms) for m in models]  # pyright: ignore[reportArgumentType]
                for by_layer in out]

    async def _text_models(self, ids: Sequence[str], call: Call, method: str, tokens: int) -> list[ServedModel]:
        """The models a text call names, loaded: each once, and, naming several, the metadata's model (when
        set) one of them; such a call is served here (one call cannot follow several models to holders)."""
        if len(set(ids)) < len(ids):
            raise invalid(f"a model is named twice: {list(ids)}")
        if len(ids) > 1:
            meta = call.model_id
            if meta and meta not in ids:
                raise invalid(f"metadata multiplexed_model_id={meta!r} is none of the models {list(ids)}")
            call.stay = True
        return [await self.model(i, call, method, tokens, True, agree=len(ids) == 1) for i in ids]

    def StreamEvents(self, request: pb.StreamDecodeRequest, call: Call, *, top: int = 8, text: str | None = None,
                     max_tokens: int = 0, also: Sequence[pb.StreamDecodeRequest] = ()
                     ) -> AsyncGenerator[TextActivations | stream.Event | Tagged, None]:
        """A stream as typed events (the HTTP API's and the dashboard's), whose rungs carry their new
        latents (at most `top` per token). With `text`, the request's input is the text's activations:
        the model is resolved once, the language model runs once (its output, with the tokens, is
        the first item), the activations are encoded once, and the call is counted once. The deadline
        counts from the call's start, the language model included: when nothing is left for a rung,
        the stream ends with none. With `also` (more streams of the same text through other models of
        the same language model), the language model still runs once, and every item comes Tagged with
        its stream's index (0 = `request`), one stream after the other."""
        async def body(expired: Callable[[], bool], t0: float):
            if also:
                reqs = [request, *also]
                if text is None:
                    raise invalid("several models in one stream need a text")
                models = await self._text_models([r.model_id for r in reqs], call, "StreamText",
                                                 self._text_tokens(max_tokens))
                (tas,) = await self.run_texts(models, [text], max_tokens)
                for i, (model, req, ta) in enumerate(zip(models, reqs, tas, strict=True)):
                    async for item in self._events(model, req, ta, expired, t0, top):
                        yield Tagged(i, item)
                return
            if text is not None:
                model = await self.model(request.model_id, call, "StreamText", self._text_tokens(max_tokens), True)
                ta = await self.run_text(model, text, max_tokens)
            else:
                encodes = request.WhichOneof("input") == "activations"
                rows = _rows(request.activations) if encodes else _code_rows(request.codes)
                model = await self.model(request.model_id, call, "StreamEvents", rows, encodes)
                ta = None
            async for item in self._events(model, request, ta, expired, t0, top):
                yield item

        return self.streaming("StreamText" if text is not None else "StreamEvents", request.model_id, call, body)

    async def _events(self, model: ServedModel, request: pb.StreamDecodeRequest, ta: TextActivations | None,
                      expired: Callable[[], bool], t0: float, top: int
                      ) -> AsyncGenerator[TextActivations | stream.Event, None]:
        if ta is not None:
            yield ta
        plan = await self.compute(self._plan, model, request, ta)
        events = self._off_loop(self.service.events, model, plan, expired, t0, top)
        try:
            async for ev in events:
                yield ev
        finally:
            await events.aclose()

    def _text_tokens(self, max_tokens: int) -> int:
        """Most tokens a text call runs (its own cap, within the server's)."""
        limit = self.service.limits.max_text_tokens
        return min(max_tokens or limit, limit)

    def _plan(self, model: ServedModel, request: pb.StreamDecodeRequest, ta: TextActivations | None
              ) -> validate.StreamPlan:
        x = self.service.text_activations(model, ta) if ta is not None else None
        return validate.stream_plan(request, model, self.service.limits, x=x)

    # --- grpc.reflection.v1alpha (behind the same auth) -----------------------------------------

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any], call: Call):
        try:
            self.authorize(call)
        except ServiceError as e:
            await call.fail(e)
            return
        async for req in requests:
            # typeshed wants a context; grpc_reflection's servicer never reads it
            for resp in self.reflection.ServerReflectionInfo(iter([req]), None):  # pyright: ignore[reportArgumentType]
                yield resp


def _rows(t: pb.Tensor) -> int:
    """Tokens of an [N, d_in] tensor message, from its shape alone (validation checks it later)."""
    return int(t.shape[0]) if len(t.shape) == 2 and t.shape[0] > 0 else 0


def _code_rows(c: pb.SparseCodes) -> int:
    """Tokens of a SparseCodes message, from its offsets alone."""
    return max(len(c.offsets), len(c.packed_offsets) // 8) - 1


def _is_end(item: Any) -> bool:
    """Whether a streamed item ends its stream (a StreamDecodeResponse with `end`, an end event)."""
    if isinstance(item, Tagged):
        item = item.item
    if isinstance(item, pb.StreamDecodeResponse):
        return item.HasField("end")
    return isinstance(item, stream.EndEvent) or (isinstance(item, stream.RungEvent) and item.end is not None)


def _local_text(backend: TextBackend) -> TextRunner:
    async def run(alias: str, layers: Sequence[int], texts: Sequence[str], n: int) -> list[dict[int, TextActivations]]:
        return await asyncio.to_thread(backend.run_many, alias, layers, texts, n)

    return run
