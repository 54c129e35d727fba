"""asyncio Python client: the same calls as `Client`, awaitable; `stream` is an async iterator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np

from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc

from . import types as t
from .client import ClientConfig, Diverged, Replay, Retries, make_channel, metadata, status_of
from .types import ProgsaeError


class AsyncClient:
    """Non-blocking client over one grpc.aio channel (create it inside a running event loop)."""

    def __init__(self, target: str = "localhost:9000", **options):
        self.config = ClientConfig(target=target, **options)
        self.channel = make_channel(self.config, aio=True)
        self.stub = pb_grpc.ProgsaeStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: str, request, model: str = "", timeout: float | None = None):
        fn = getattr(self.stub, method)
        retries = Retries(self.config)
        while True:
            try:
                return await fn(request, timeout=timeout or self.config.timeout,
                                metadata=metadata(self.config, model, timeout))
            except grpc.aio.AioRpcError as e:
                code, details = status_of(e)
                delay = retries.again(code, details)
                if delay is None:
                    raise ProgsaeError(code, details, method) from None
                await asyncio.sleep(delay)

    async def models(self) -> list[t.ModelInfo]:
        resp = await self._call("ListModels", pb.ListModelsRequest())
        return [t.ModelInfo.from_proto(m) for m in resp.models]

    async def model(self, model: str = "") -> t.ModelInfo:
        return t.ModelInfo.from_proto(await self._call("GetModel", pb.GetModelRequest(model_id=model)))

    async def encode(self, x: np.ndarray, model: str = "", prefix_g: int | None = None, dtype: str = "float32",
                     timeout: float | None = None) -> t.Encoded:
        return t.encoded(await self._call("Encode", t.encode_request(x, model, prefix_g, dtype), model, timeout))

    async def decode_at(self, codes, g: int, model: str = "", timeout: float | None = None,
                        max_k: int | None = None) -> t.Decoded:
        if isinstance(codes, t.Encoded) and not model:
            model = codes.model_id
        req = pb.DecodeRequest(model_id=model, codes=t.codes_msg(codes), granularity=g, max_k=max_k)
        return t.decoded(await self._call("DecodeAtGranularity", req, model, timeout))

    async def encode_text(self, text: str, model: str = "", max_tokens: int = 0) -> t.TextEncoded:
        req = pb.EncodeTextRequest(model_id=model, text=text, max_tokens=max_tokens, packed_codes=True)
        return t.text_encoded(await self._call("EncodeText", req, model))

    async def encode_texts(self, texts: Sequence[str], models: Sequence[str] = (), max_tokens: int = 0,
                     timeout: float | None = None) -> t.TextsEncoded:
        """Several texts through several SAEs (all on one language model), the language model run once
        (revision 6): `.results[text][model]`."""
        req = pb.EncodeTextsRequest(model_ids=list(models), texts=list(texts), max_tokens=max_tokens,
                                    packed_codes=True)
        return t.texts_encoded(await self._call("EncodeTexts", req, models[0] if len(models) == 1 else "", timeout),
                               len(texts))

    async def stats(self) -> pb.ServerStats:
        return await self._call("GetServerStats", pb.ServerStatsRequest())

    async def stream(self, inputs, model: str = "", max_g: int | None = None, deadline_ms: int | None = None,
                     target_fvu: float | None = None, payload: str = "reconstruction", ladder: Sequence[int] = (),
                     per_token_l0: bool = False, dtype: str = "float32", timeout: float | None = None,
                     result: t.StreamResult | None = None, token_target_fvu: float | None = None,
                     max_k: int | None = None, axis: str = "g", k_ladder: Sequence[int] = (), *, kl: bool = False,
                     predictions: int = 0, token_target_kl: float | None = None,
                     max_tokens: int = 0) -> AsyncIterator[t.Rung]:
        """Async iterator of rungs; pass `result` to receive the header facts, stop reason and (per-token
        budgets, fidelity) each token's outcome. The inputs (a text too) and budget arguments are
        `Client.stream`'s."""
        req = t.stream_request(inputs, model, max_g, deadline_ms, target_fvu, payload, ladder, per_token_l0, dtype,
                               token_target_fvu, max_k, axis, k_ladder, kl=kl, predictions=predictions,
                               token_target_kl=token_target_kl, max_tokens=max_tokens)
        result = result if result is not None else t.StreamResult()
        cfg, retries, replay = self.config, Retries(self.config), Replay(req)
        failed: tuple[grpc.StatusCode, str] | None = None
        while True:
            t0 = time.perf_counter()
            call = self.stub.StreamDecode(replay.request(), timeout=timeout or cfg.timeout,
                                          metadata=metadata(cfg, model, timeout))
            try:
                async for msg in call:
                    rung = replay.absorb(msg, result, 1e3 * (time.perf_counter() - t0))
                    if rung is not None:
                        yield rung
                return
            except grpc.aio.AioRpcError as e:
                code, details = failed = status_of(e)
                delay = retries.again(code, details)
                if delay is None:
                    raise ProgsaeError(code, details, "StreamDecode") from None
                await asyncio.sleep(delay)
            except Diverged as d:
                code, details = failed or (grpc.StatusCode.INTERNAL, "")
                raise ProgsaeError(code, f"{details} (not resumed: {d})", "StreamDecode") from None
            finally:
                call.cancel()
