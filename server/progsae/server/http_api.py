"""HTTP/JSON API on the same Ray Serve app (the dashboard builds on it).

    GET  /api/models                 served models (JSON list)
    GET  /api/models/{model_id}      one model
    POST /api/encode                 {model_id, activations: [[...]], prefix_granularity?}
    POST /api/decode                 {model_id, codes: [{indices, values}], granularity}
    POST /api/encode_text            {model_id, text, max_tokens?, include_activations?}
    GET  /api/stream?model_id&text&max_granularity&deadline_ms&target_fvu&top
    POST /api/stream                 {model_id, text | activations, budget: {...}, ladder?, top?}
                                     -> text/event-stream: `header`, one `rung` per rung, `end`
                                        (or one `error` event {code, message})
    GET  /api/stats                  this replica's counters
Errors answer {"code": "INVALID_ARGUMENT", "message": "..."} with the matching HTTP status.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format

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
    """SSE events of one stream; errors become an `error` event (the HTTP status is already 200)."""
    stream = None
    try:
        sv = c.servicer
        mid = str(body.get("model_id", ""))
        req = pb.StreamDecodeRequest(model_id=mid, payload=pb.PAYLOAD_NONE, per_token_l0=True)
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
        budget = body.get("budget") or {}
        for key in ("max_granularity", "deadline_ms"):
            if budget.get(key) is not None:
                setattr(req.budget, key, int(budget[key]))
        if budget.get("target_fvu") is not None:
            req.budget.target_fvu = float(budget["target_fvu"])
        req.ladder.extend(int(g) for g in body.get("ladder") or ())
        top = int(body.get("top", 8))
        stream = sv.StreamDecode(req)
        codes, lo = None, 0
        async for msg in stream:
            if msg.HasField("header"):
                codes = convert.codes_to_arrays(msg.header.codes)
                yield _sse("header", {"model_id": msg.header.model_id, "ladder": list(msg.header.ladder),
                                      "tokens": tokens, "n_tokens": msg.header.tokens})
            if msg.HasField("rung"):
                r = msg.rung
                yield _sse("rung", {"index": r.index, "g": r.g, "mean_l0": r.mean_l0, "l0": list(r.l0),
                                    "fvu": r.fvu if r.HasField("fvu") else None, "elapsed_ms": r.elapsed_ms,
                                    "features": _band(codes, lo, r.g, top)})
                lo = r.g
            if msg.HasField("end"):
                e = msg.end
                yield _sse("end", {"stop_reason": convert.STOP_REASONS[e.stop_reason],
                                   "rungs": e.rungs, "final_g": e.final_g, "elapsed_ms": e.elapsed_ms,
                                   "final_fvu": e.final_fvu if e.HasField("final_fvu") else None})
    except Exception as e:  # noqa: BLE001
        err = e if isinstance(e, ServiceError) else internal(e)
        yield _sse("error", {"code": err.status.value, "message": err.message})
    finally:
        if stream is not None:
            await stream.aclose()


def _band(codes: convert.SparseArrays | None, lo: int, g: int, top: int) -> list[list[list[float]]]:
    """Per token, the latents that became active in [lo, g): [[index, value], ...] by value, at most `top`."""
    if codes is None:
        return []
    out = []
    for n in range(codes.tokens):
        idx, val = codes.token(n)
        keep = (idx >= lo) & (idx < g) & (val != 0)
        order = np.argsort(-val[keep])[:top]
        out.append([[int(i), round(float(v), 5)] for i, v in zip(idx[keep][order], val[keep][order], strict=True)])
    return out


@api.get("/api/stream")
async def stream_get(request: Request) -> StreamingResponse:
    q = request.query_params
    budget = {k: q.get(k) for k in ("max_granularity", "deadline_ms", "target_fvu") if q.get(k)}
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
