"""HTTP/JSON API on the same Ray Serve app (the dashboard builds on it).

    GET  /api/models                 served models (JSON list)
    GET  /api/models/{model_id}      one model
    POST /api/encode                 {model_id, activations: [[...]], prefix_granularity?}
    POST /api/decode                 {model_id, codes: [{indices, values}], granularity}
    POST /api/encode_text            {model_id, text, max_tokens?, include_activations?}
    GET  /api/stream?model_id&text&max_granularity&deadline_ms&target_fvu&token_target_fvu&max_k&top
    POST /api/stream                 {model_id, text | activations, budget: {...}, ladder?, axis?,
                                      k_ladder?, top?}; budget: max_granularity, deadline_ms,
                                      target_fvu, token_target_fvu, max_k; axis "g" (default) or
                                      "k" (climb k' up k_ladder at one G)
                                     -> text/event-stream: `header`, one `rung` per rung, `end`
                                        (or one `error` event {code, message}); with a per-token
                                        target a rung lists the tokens it computed and the end
                                        every token's final G and whether it met the target
    GET  /api/stats                  this replica's counters
Errors answer {"code": "INVALID_ARGUMENT", "message": "..."} with the matching HTTP status.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format

from progsae.sae import budgets
from progsae.sae.codec import Codes
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import auth
from .errors import ServiceError, internal, invalid, unauthenticated

if TYPE_CHECKING:
    from .service import CodecService
    from .servicer import ProgsaeServicer

api = FastAPI(title="progsae", description="Progressive SAE codec: HTTP/JSON API")


class _Replica(Protocol):
    """What the routes use of the replica that serves them (an app.Codec)."""

    servicer: ProgsaeServicer
    service: CodecService

    def loaded(self) -> list[str]: ...


def _codec() -> _Replica:
    from ray import serve

    # Serve annotates servable_object as a plain callable; it is the ingress deployment's instance.
    return cast(_Replica, serve.get_replica_context().servable_object)


def _error(e: Exception) -> JSONResponse:
    err = e if isinstance(e, ServiceError) else internal(e)
    return JSONResponse({"code": err.status.value, "message": err.message}, status_code=err.status.http)


def _info(m: pb.ModelInfo) -> dict[str, Any]:
    return {
        "model_id": m.model_id, "architecture": m.architecture, "d_in": m.d_in, "d_sae": m.d_sae, "k": m.k,
        "ladder": list(m.ladder), "ordering": m.ordering, "available_orderings": list(m.available_orderings),
        "language_model": m.language_model, "layer": m.layer if m.layer >= 0 else None, "hook": m.hook,
        "scale": m.normalisation.scale, "training_tokens": m.training_tokens,
        "evaluation": json.loads(m.evaluation_json or "{}"), "text_available": m.text_available,
        "k_ladder": list(m.k_ladder),
    }


def _codes_json(s: convert.SparseArrays) -> list[dict[str, list]]:
    return [{"indices": s.token(n)[0].tolist(), "values": np.round(s.token(n)[1], 6).tolist()}
            for n in range(s.tokens)]


def _codes_msg(tokens: Any) -> pb.SparseCodes:
    if not isinstance(tokens, list) or not all(isinstance(t, dict) for t in tokens):
        raise invalid("codes must be a list of {indices, values} objects, one per token")
    counts = [len(t.get("indices", [])) for t in tokens]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    try:
        idx = np.array([i for t in tokens for i in t.get("indices", [])], dtype=np.int64)
        val = np.array([v for t in tokens for v in t.get("values", [])], dtype=np.float32)
    except (TypeError, ValueError):
        raise invalid("codes indices must be integers and values numbers") from None
    return convert.codes_from_csr(convert.SparseArrays(offsets, idx, val))


def _tensor(rows: Any, field: str) -> pb.Tensor:
    try:
        a = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise invalid(f"{field} must be a list of equal-length lists of numbers") from None
    return convert.from_numpy(a)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise invalid("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return body


@api.middleware("http")
async def _require_token(request: Request, call_next):
    """With auth on, every /api route needs `Authorization: Bearer <token>` (401 otherwise)."""
    if request.url.path.startswith("/api"):
        token = getattr(_codec(), "_token", "")
        if not auth.authorized(request.headers.get(auth.HEADER), token):
            return _error(unauthenticated("missing or wrong bearer token (header 'Authorization: Bearer <token>')"))
    return await call_next(request)


@api.get("/api/models")
async def models() -> Any:
    try:
        resp = _codec().servicer.list_models()
        return {"default_model_id": resp.default_model_id, "models": [_info(m) for m in resp.models]}
    except Exception as e:  # noqa: BLE001
        return _error(e)


@api.get("/api/models/{model_id:path}")
async def model(model_id: str) -> Any:
    try:
        sv = _codec().servicer
        return _info(sv.get_model(sv.registry.resolve(model_id)))
    except Exception as e:  # noqa: BLE001
        return _error(e)


@api.get("/api/stats")
async def stats() -> Any:
    c = _codec()
    st = c.service.server_stats(c.loaded())
    out = json_format.MessageToDict(st, preserving_proto_field_name=True)
    for key in ("streams_started", "streams_completed", "streams_cancelled", "rungs_computed"):
        out[key] = getattr(st, key)
    out["requests"] = dict(st.requests)
    return out


@api.post("/api/encode")
async def encode(request: Request) -> Any:
    c = _codec()
    try:
        body = await _body(request)
        req = pb.EncodeRequest(model_id=str(body.get("model_id", "")),
                               activations=_tensor(body.get("activations"), "activations"))
        if body.get("prefix_granularity"):
            req.mode, req.granularity = pb.ENCODE_MODE_PREFIX, int(body["prefix_granularity"])
        resp = await c.servicer.Encode(req)
        return {"model_id": resp.model_id, "granularity": resp.granularity,
                "codes": _codes_json(convert.codes_to_arrays(resp.codes))}
    except Exception as e:  # noqa: BLE001
        return _error(e)


@api.post("/api/decode")
async def decode(request: Request) -> Any:
    c = _codec()
    try:
        body = await _body(request)
        req = pb.DecodeRequest(model_id=str(body.get("model_id", "")), codes=_codes_msg(body.get("codes")),
                               granularity=int(body.get("granularity", 0)))
        resp = await c.servicer.DecodeAtGranularity(req)
        return {"model_id": resp.model_id, "granularity": resp.granularity, "l0": list(resp.l0),
                "reconstruction": convert.to_numpy(resp.reconstruction).tolist()}
    except Exception as e:  # noqa: BLE001
        return _error(e)


@api.post("/api/encode_text")
async def encode_text(request: Request) -> Any:
    c = _codec()
    try:
        body = await _body(request)
        mid = str(body.get("model_id", ""))
        resp = await c.servicer.EncodeText(pb.EncodeTextRequest(model_id=mid, text=str(body.get("text", "")),
                                                                max_tokens=int(body.get("max_tokens", 0))))
        out = {"model_id": resp.model_id, "language_model": resp.language_model, "layer": resp.layer,
               "token_ids": list(resp.token_ids), "tokens": list(resp.tokens),
               "codes": _codes_json(convert.codes_to_arrays(resp.codes))}
        if body.get("include_activations"):
            out["activations"] = convert.to_numpy(resp.activations).tolist()
        return out
    except Exception as e:  # noqa: BLE001
        return _error(e)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream_events(c, body: dict[str, Any]):
    """SSE events of one stream; errors become an `error` event (the HTTP status is already 200).

    A deadline counts from the request, so it includes running the language model on `text`: the
    stream gets what is left, and when nothing is, it ends at once (no rung, reason deadline), as
    StreamDecode does when its deadline passes before the first rung."""
    t0 = time.perf_counter()
    stream = None
    try:
        sv = c.servicer
        mid = str(body.get("model_id", ""))
        req = pb.StreamDecodeRequest(model_id=mid, payload=pb.PAYLOAD_NONE, per_token_l0=True)
        _budget(req, body)
        tokens = None
        if body.get("text"):
            t = await sv.EncodeText(pb.EncodeTextRequest(model_id=mid, text=str(body["text"]),
                                                         max_tokens=int(body.get("max_tokens", 0))))
            req.activations.CopyFrom(t.activations)
            tokens = list(t.tokens)
        elif body.get("activations") is not None:
            req.activations.CopyFrom(_tensor(body["activations"], "activations"))
        else:
            raise invalid("stream needs `text` or `activations`")
        if req.budget.HasField("deadline_ms") and req.budget.deadline_ms > 0:
            left = req.budget.deadline_ms - 1e3 * (time.perf_counter() - t0)
            if left < 1:
                n = req.activations.shape[0] if req.activations.shape else 0
                yield _sse("header", {"model_id": mid, "ladder": [], "tokens": tokens, "n_tokens": n,
                                      "axis": "k" if req.axis == pb.STREAM_AXIS_K else "g", "k_ladder": []})
                yield _sse("end", {"stop_reason": "deadline", "rungs": 0, "final_g": 0, "final_k": None,
                                   "elapsed_ms": 1e3 * (time.perf_counter() - t0), "final_fvu": None,
                                   "token_final_g": [], "token_final_k": [], "token_met": []})
                return
            req.budget.deadline_ms = int(left)
        top = int(body.get("top", 8))
        stream = sv.StreamDecode(req)
        codes, seen, n_tokens = None, None, 0
        async for msg in stream:
            if msg.HasField("header"):
                h = msg.header
                n_tokens = h.tokens
                codes = _padded(convert.codes_to_arrays(h.codes))
                seen = torch.zeros_like(codes.indices, dtype=torch.bool)
                yield _sse("header", {"model_id": h.model_id, "ladder": list(h.ladder), "tokens": tokens,
                                      "n_tokens": h.tokens, "axis": "k" if h.axis == pb.STREAM_AXIS_K else "g",
                                      "k_ladder": list(h.k_ladder)})
            if msg.HasField("rung"):
                r = msg.rung
                rows = list(r.tokens) or list(range(n_tokens))
                yield _sse("rung", {"index": r.index, "g": r.g, "k": r.k or None, "mean_l0": r.mean_l0,
                                    "l0": list(r.l0), "tokens": list(r.tokens),
                                    "refining": r.refining if r.HasField("refining") else None,
                                    "fvu": r.fvu if r.HasField("fvu") else None, "elapsed_ms": r.elapsed_ms,
                                    "features": _band(codes, seen, rows, r.g, r.k or None, top)})
            if msg.HasField("end"):
                e = msg.end
                yield _sse("end", {"stop_reason": convert.STOP_REASONS[e.stop_reason],
                                   "rungs": e.rungs, "final_g": e.final_g, "final_k": e.final_k or None,
                                   "elapsed_ms": e.elapsed_ms,
                                   "final_fvu": e.final_fvu if e.HasField("final_fvu") else None,
                                   "token_final_g": list(e.token_final_g), "token_final_k": list(e.token_final_k),
                                   "token_met": list(e.token_met)})
    except Exception as e:  # noqa: BLE001
        err = e if isinstance(e, ServiceError) else internal(e)
        yield _sse("error", {"code": err.status.value, "message": err.message})
    finally:
        if stream is not None:
            await stream.aclose()


def _budget(req: pb.StreamDecodeRequest, body: dict[str, Any]) -> None:
    """The JSON body's budget, ladders and axis into `req` (the servicer validates the values)."""
    budget = body.get("budget") or {}
    if not isinstance(budget, dict):
        raise invalid("budget must be a JSON object")
    try:
        for key in ("max_granularity", "deadline_ms", "max_k"):
            if budget.get(key) is not None:
                setattr(req.budget, key, int(budget[key]))
        for key in ("target_fvu", "token_target_fvu"):
            if budget.get(key) is not None:
                setattr(req.budget, key, float(budget[key]))
        req.ladder.extend(int(g) for g in body.get("ladder") or ())
        req.k_ladder.extend(int(k) for k in body.get("k_ladder") or ())
    except (TypeError, ValueError):
        raise invalid("budget values and ladders must be numbers") from None
    axis = body.get("axis") or "g"
    if axis not in ("g", "k"):
        raise invalid(f"axis must be 'g' (climb G) or 'k' (climb k'), got {axis!r}")
    req.axis = pb.STREAM_AXIS_K if axis == "k" else pb.STREAM_AXIS_G


def _padded(s: convert.SparseArrays) -> Codes:
    idx, val = s.padded()
    return Codes(torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(val.astype(np.float32)))


def _band(codes: Codes | None, seen: torch.Tensor | None, rows: list[int], g: int, k: int | None,
          top: int) -> list[list[list[float]]]:
    """Per token, the latents decoded at (g, k') that no earlier rung decoded: [[index, value], ...]
    by value, at most `top`; empty for a token this rung did not compute (it stopped refining).
    `seen` ([N, w] bool) is updated in place."""
    if codes is None or seen is None:
        return []
    out: list[list[list[float]]] = [[] for _ in range(codes.indices.shape[0])]
    sel = budgets.select(Codes(codes.indices[rows], codes.values[rows]), g, k)
    for j, n in enumerate(rows):
        fresh = sel[j] & ~seen[n]
        seen[n] |= sel[j]
        idx, val = codes.indices[n][fresh], codes.values[n][fresh]
        order = torch.argsort(-val, stable=True)[:top]
        out[n] = [[int(i), round(float(v), 5)] for i, v in zip(idx[order].tolist(), val[order].tolist(), strict=True)]
    return out


@api.get("/api/stream")
async def stream_get(request: Request) -> StreamingResponse:
    q = request.query_params
    budget = {k: q.get(k) for k in ("max_granularity", "deadline_ms", "target_fvu", "token_target_fvu", "max_k")
              if q.get(k)}
    body = {"model_id": q.get("model_id", ""), "text": q.get("text", ""), "budget": budget,
            "top": q.get("top", 8), "max_tokens": q.get("max_tokens", 0)}
    return StreamingResponse(_stream_events(_codec(), body), media_type="text/event-stream")


@api.post("/api/stream")
async def stream_post(request: Request) -> Any:
    try:
        body = await _body(request)
    except ServiceError as e:
        return _error(e)
    return StreamingResponse(_stream_events(_codec(), body), media_type="text/event-stream")


from .dashboard import router as dashboard_router  # noqa: E402  (the page at / and its routes)

api.include_router(dashboard_router)
