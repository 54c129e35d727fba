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

Every /api route is one servicer call (progsae.server.servicer) over an HttpCall: auth, model
resolution, metrics and status mapping happen there; this module only turns JSON into requests
and responses (and a stream's events) into JSON. The host hands its servicer over with `http_host.host`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format

from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import stream
from .call import HttpCall
from .errors import ServiceError, internal, invalid
from .http_host import servicer_of
from .servicer import ProgsaeServicer
from .text import TextActivations

api = FastAPI(title="progsae", description="Progressive SAE codec: HTTP/JSON API")


def error_response(e: ServiceError) -> JSONResponse:
    """The one place an HTTP call's ServiceError becomes its answer: {code, message}, the matching status."""
    return JSONResponse({"code": e.status.value, "message": e.message}, status_code=e.status.http)


@api.exception_handler(ServiceError)
async def _service_error(_request: Request, e: ServiceError) -> JSONResponse:
    return error_response(e)


@api.exception_handler(Exception)
async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
    return error_response(internal(e))  # one line to the client, the traceback to the server log


@api.middleware("http")
async def _authorize(request: Request, call_next):
    """Every /api route needs the servicer's token (its `authorize`), checked before the body is read."""
    if request.url.path.startswith("/api"):
        try:
            servicer_of(request).authorize(HttpCall(request.headers))
        except ServiceError as e:
            return error_response(e)
    return await call_next(request)


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


def _int(v: Any, field: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise invalid(f"{field} must be an integer, got {str(v)[:40]!r}") from None


@api.get("/api/models")
async def models(request: Request) -> Any:
    resp = await servicer_of(request).ListModels(pb.ListModelsRequest(), HttpCall(request.headers))
    return {"default_model_id": resp.default_model_id, "models": [_info(m) for m in resp.models]}


@api.get("/api/models/{model_id:path}")
async def model(request: Request, model_id: str) -> Any:
    return _info(await servicer_of(request).GetModel(pb.GetModelRequest(model_id=model_id), HttpCall(request.headers)))


@api.get("/api/stats")
async def stats(request: Request) -> Any:
    st = await servicer_of(request).GetServerStats(pb.ServerStatsRequest(), HttpCall(request.headers))
    out = json_format.MessageToDict(st, preserving_proto_field_name=True)
    for key in ("streams_started", "streams_completed", "streams_cancelled", "rungs_computed"):
        out[key] = getattr(st, key)
    out["requests"] = dict(st.requests)
    return out


@api.post("/api/encode")
async def encode(request: Request) -> Any:
    b = await _body(request)
    req = pb.EncodeRequest(model_id=str(b.get("model_id", "")), activations=_tensor(b.get("activations"),
                                                                                    "activations"))
    if b.get("prefix_granularity"):
        req.mode, req.granularity = pb.ENCODE_MODE_PREFIX, _int(b["prefix_granularity"], "prefix_granularity")
    resp = await servicer_of(request).Encode(req, HttpCall(request.headers))
    return {"model_id": resp.model_id, "granularity": resp.granularity,
            "codes": _codes_json(convert.codes_to_arrays(resp.codes))}


@api.post("/api/decode")
async def decode(request: Request) -> Any:
    b = await _body(request)
    req = pb.DecodeRequest(model_id=str(b.get("model_id", "")), codes=_codes_msg(b.get("codes")),
                           granularity=_int(b.get("granularity", 0), "granularity"))
    resp = await servicer_of(request).DecodeAtGranularity(req, HttpCall(request.headers))
    return {"model_id": resp.model_id, "granularity": resp.granularity, "l0": list(resp.l0),
            "reconstruction": convert.to_numpy(resp.reconstruction).tolist()}


@api.post("/api/encode_text")
async def encode_text(request: Request) -> Any:
    b = await _body(request)
    req = pb.EncodeTextRequest(model_id=str(b.get("model_id", "")), text=str(b.get("text", "")),
                               max_tokens=_int(b.get("max_tokens", 0), "max_tokens"))
    resp = await servicer_of(request).EncodeText(req, HttpCall(request.headers))
    out = {"model_id": resp.model_id, "language_model": resp.language_model, "layer": resp.layer,
           "token_ids": list(resp.token_ids), "tokens": list(resp.tokens),
           "codes": _codes_json(convert.codes_to_arrays(resp.codes))}
    if b.get("include_activations"):
        out["activations"] = convert.to_numpy(resp.activations).tolist()
    return out


# --- streams: server-sent events --------------------------------------------------------------


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _stream_request(body: dict[str, Any]) -> pb.StreamDecodeRequest:
    """The JSON body's model, budget, ladders and axis as a StreamDecodeRequest (the servicer
    validates the values); its input is set by the caller."""
    req = pb.StreamDecodeRequest(model_id=str(body.get("model_id", "")), payload=pb.PAYLOAD_NONE, per_token_l0=True)
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
    return req


async def _stream_events(sv: ProgsaeServicer, c: HttpCall, body: dict[str, Any]) -> AsyncIterator[bytes]:
    """SSE events of one stream (one servicer call); errors become an `error` event (the HTTP status
    is already 200)."""
    items = None
    try:
        req = _stream_request(body)
        text = str(body["text"]) if body.get("text") else None
        if text is None:
            if body.get("activations") is None:
                raise invalid("stream needs `text` or `activations`")
            req.activations.CopyFrom(_tensor(body["activations"], "activations"))
        top, max_tokens = _int(body.get("top", 8), "top"), _int(body.get("max_tokens", 0), "max_tokens")
        items = sv.StreamEvents(req, c, top=top, text=text, max_tokens=max_tokens)
        tokens = None
        async for item in items:
            if isinstance(item, TextActivations):
                tokens = list(item.tokens)
            elif isinstance(item, stream.Header):
                yield _sse("header", {"model_id": item.model_id, "ladder": list(item.ladder), "tokens": tokens,
                                      "n_tokens": item.tokens, "axis": "k" if item.k_ladder else "g",
                                      "k_ladder": list(item.k_ladder)})
            else:
                if isinstance(item, stream.RungEvent):
                    yield _sse("rung", _rung_json(item))
                end = item.end if isinstance(item, stream.RungEvent) else item
                if end is not None:
                    yield _sse("end", _end_json(end))
    except Exception as e:  # noqa: BLE001  (an error event, never a traceback)
        err = e if isinstance(e, ServiceError) else internal(e)
        yield _sse("error", {"code": err.status.value, "message": err.message})
    finally:
        if items is not None:
            await items.aclose()


def _rung_json(r: stream.RungEvent) -> dict[str, Any]:
    features = [[[i, v] for i, v in latents] for latents in r.fresh or ()]
    return {"index": r.index, "g": r.g, "k": r.k, "mean_l0": r.mean_l0, "l0": r.l0.tolist(),
            "tokens": r.tokens.tolist() if r.listed else [], "refining": r.refining if r.listed else None,
            "fvu": r.fvu, "elapsed_ms": r.elapsed_ms, "features": features}


def _end_json(e: stream.EndEvent) -> dict[str, Any]:
    return {"stop_reason": convert.STOP_REASONS[e.reason], "rungs": e.rungs, "final_g": e.final_g,
            "final_k": e.final_k, "elapsed_ms": e.elapsed_ms, "final_fvu": e.final_fvu,
            "token_final_g": e.token_final_g or [], "token_final_k": e.token_final_k or [],
            "token_met": e.token_met or []}


@api.get("/api/stream")
async def stream_get(request: Request) -> StreamingResponse:
    q = request.query_params
    budget = {k: q.get(k) for k in ("max_granularity", "deadline_ms", "target_fvu", "token_target_fvu", "max_k")
              if q.get(k)}
    body = {"model_id": q.get("model_id", ""), "text": q.get("text", ""), "budget": budget,
            "top": q.get("top", 8), "max_tokens": q.get("max_tokens", 0)}
    return StreamingResponse(_stream_events(servicer_of(request), HttpCall(request.headers), body),
                             media_type="text/event-stream")


@api.post("/api/stream")
async def stream_post(request: Request) -> Any:
    body = await _body(request)
    return StreamingResponse(_stream_events(servicer_of(request), HttpCall(request.headers), body),
                             media_type="text/event-stream")


from .dashboard import router as dashboard_router  # noqa: E402  (the page at / and its routes)

api.include_router(dashboard_router)
