"""HTTP/JSON API on the same Ray Serve app (the dashboard builds on it).

    GET  /api/models                 served models (JSON list)
    GET  /api/models/{model_id}      one model
    POST /api/encode                 {model_id, activations: [[...]], prefix_granularity?}
    POST /api/decode                 {model_id, codes: [{indices, values}], granularity}
    POST /api/encode_text            {model_id, text, max_tokens?, include_activations?}
    POST /api/encode_texts           {model_ids: [...], texts: [...], max_tokens?, include_activations?}
                                     -> {lm_ms, results: [one encode_text answer per (text, model),
                                        text-major]}: the language model runs once (revision 6)
    GET  /api/stream?model_id&text&max_granularity&deadline_ms&target_fvu&token_target_fvu&max_k&top
                     &token_target_kl&kl&predictions
    GET/POST /api/stream with also_models (a list; GET: comma-separated) and a text: the same text through
                                     more models of the same language model, from one pass of it; each
                                     event carries `stream` (0 = model_id, i = also_models[i - 1])
    POST /api/stream                 {model_id, text | activations, budget: {...}, ladder?, axis?,
                                      k_ladder?, top?, kl?, predictions?}; budget: max_granularity,
                                      deadline_ms, target_fvu, token_target_fvu, max_k,
                                      token_target_kl; axis "g" (default) or "k" (climb k' up
                                      k_ladder at one G)
                                     -> text/event-stream: `header`, one `rung` per rung, `end`
                                        (or one `error` event {code, message}); with a per-token
                                        target a rung lists the tokens it computed and the end
                                        every token's final G and whether it met the target.
                                        Text streams with `kl` (or `predictions` > 0, or
                                        token_target_kl; revision 5): the header says which tokens
                                        are `spliced`; each rung carries, per computed token, `kl`,
                                        `top1` and `predictions` ([[token, p], ...]), its `mean_kl`,
                                        and the first rung `clean_predictions` per token; the end
                                        each token's `token_kl` and `token_top1`. The header's
                                        `fvu_baseline` says what FVU divides by: "checkpoint" (a
                                        text: the checkpoint's reference variance per token,
                                        `fvu_reference_variance`) or "batch" (sent activations, or
                                        a checkpoint that records none); for a text, its
                                        `token_groups` ([[first, end, text]]: byte-level tokens
                                        that decode only together, e.g. one emoji) and
                                        `token_bytes` (hex of each token that does not decode
                                        alone, else "")
    GET  /api/stats                  this replica's counters
Errors answer {"code": "INVALID_ARGUMENT", "message": "..."} with the matching HTTP status.

Every /api route is one servicer call (progsae.server.servicer) over an HttpCall: auth, model
resolution, metrics and status mapping happen there; this module only turns JSON into requests
and responses (and a stream's events) into JSON. The host hands its servicer over with `http_host.host`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format
from pydantic import ValidationError

from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import stream, tokens
from .call import HttpCall
from .errors import ServiceError, internal, invalid
from .http_host import servicer_of
from .http_models import Budget, DecodeBody, EncodeBody, EncodeTextBody, EncodeTextsBody, StreamBody, TokenCodes
from .servicer import ProgsaeServicer, Tagged
from .text import TextActivations

router = APIRouter()


def error_response(e: ServiceError) -> JSONResponse:
    """The one place an HTTP call's ServiceError becomes its answer: {code, message}, the matching status."""
    return JSONResponse({"code": e.status.value, "message": e.message}, status_code=e.status.http)


async def _service_error(_request: Request, e: ServiceError) -> JSONResponse:
    return error_response(e)


async def _bad_body(_request: Request, e: RequestValidationError) -> JSONResponse:
    """A body that does not fit its model (http_models): INVALID_ARGUMENT naming the first bad field."""
    return error_response(invalid(_first_error(e.errors())))


def _first_error(errors: Sequence[Any]) -> str:
    if not errors:
        return "request body is not valid"
    err = errors[0]
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request body"
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON"
    return f"{where}: {err.get('msg', 'invalid')}"


async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
    return error_response(internal(e))  # one line to the client, the traceback to the server log


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


def _codes_msg(tokens: Sequence[TokenCodes]) -> pb.SparseCodes:
    for n, t in enumerate(tokens):
        if len(t.indices) != len(t.values):
            raise invalid(f"codes.{n}: {len(t.indices)} indices but {len(t.values)} values")
    offsets = np.concatenate([[0], np.cumsum([len(t.indices) for t in tokens])]).astype(np.int64)
    try:
        idx = np.array([i for t in tokens for i in t.indices], dtype=np.int64)
        val = np.array([v for t in tokens for v in t.values], dtype=np.float32)
    except OverflowError:
        raise invalid("codes indices must fit in 64 bits") from None
    return convert.codes_from_csr(convert.SparseArrays(offsets, idx, val))


def _tensor(rows: Any, field: str) -> pb.Tensor:
    try:
        a = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise invalid(f"{field} must be a list of equal-length lists of numbers") from None
    return convert.from_numpy(a)


@router.get("/api/models")
async def models(request: Request) -> Any:
    resp = await servicer_of(request).ListModels(pb.ListModelsRequest(), HttpCall(request.headers))
    return {"default_model_id": resp.default_model_id, "models": [_info(m) for m in resp.models]}


@router.get("/api/models/{model_id:path}")
async def model(request: Request, model_id: str) -> Any:
    return _info(await servicer_of(request).GetModel(pb.GetModelRequest(model_id=model_id), HttpCall(request.headers)))


@router.get("/api/stats")
async def stats(request: Request) -> Any:
    st = await servicer_of(request).GetServerStats(pb.ServerStatsRequest(), HttpCall(request.headers))
    out = json_format.MessageToDict(st, preserving_proto_field_name=True)
    for key in ("streams_started", "streams_completed", "streams_cancelled", "rungs_computed"):
        out[key] = getattr(st, key)
    out["requests"] = dict(st.requests)
    return out


@router.post("/api/encode")
async def encode(request: Request, body: EncodeBody) -> Any:
    req = pb.EncodeRequest(model_id=body.model_id, activations=_tensor(body.activations, "activations"))
    if body.prefix_granularity:
        req.mode, req.granularity = pb.ENCODE_MODE_PREFIX, body.prefix_granularity
    resp = await servicer_of(request).Encode(req, HttpCall(request.headers))
    return {"model_id": resp.model_id, "granularity": resp.granularity,
            "codes": _codes_json(convert.codes_to_arrays(resp.codes))}


@router.post("/api/decode")
async def decode(request: Request, body: DecodeBody) -> Any:
    req = pb.DecodeRequest(model_id=body.model_id, codes=_codes_msg(body.codes), granularity=body.granularity)
    resp = await servicer_of(request).DecodeAtGranularity(req, HttpCall(request.headers))
    return {"model_id": resp.model_id, "granularity": resp.granularity, "l0": list(resp.l0),
            "reconstruction": convert.to_numpy(resp.reconstruction).tolist()}


@router.post("/api/encode_text")
async def encode_text(request: Request, body: EncodeTextBody) -> Any:
    req = pb.EncodeTextRequest(model_id=body.model_id, text=body.text, max_tokens=body.max_tokens)
    resp = await servicer_of(request).EncodeText(req, HttpCall(request.headers))
    return _text_json(resp, body.include_activations)


@router.post("/api/encode_texts")
async def encode_texts(request: Request, body: EncodeTextsBody) -> Any:
    req = pb.EncodeTextsRequest(model_ids=body.model_ids, texts=body.texts, max_tokens=body.max_tokens)
    resp = await servicer_of(request).EncodeTexts(req, HttpCall(request.headers))
    return {"lm_ms": resp.lm_ms, "results": [_text_json(r, body.include_activations) for r in resp.results]}


def _text_json(resp: pb.EncodeTextResponse, activations: bool) -> dict[str, Any]:
    out = {"model_id": resp.model_id, "language_model": resp.language_model, "layer": resp.layer,
           "token_ids": list(resp.token_ids), "tokens": list(resp.tokens), "text_tokens": resp.text_tokens,
           "truncated": resp.text_tokens > len(resp.token_ids),
           "codes": _codes_json(convert.codes_to_arrays(resp.codes))}
    if activations:
        out["activations"] = convert.to_numpy(resp.activations).tolist()
    return out


# --- streams: server-sent events --------------------------------------------------------------


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _stream_request(body: StreamBody) -> pb.StreamDecodeRequest:
    """The body's model, budget, ladders and axis as a StreamDecodeRequest (the servicer validates the
    values); its input is set by the caller."""
    req = pb.StreamDecodeRequest(model_id=body.model_id, payload=pb.PAYLOAD_NONE, per_token_l0=True)
    for key, value in body.budget.model_dump(exclude_none=True).items():
        setattr(req.budget, key, value)
    req.ladder.extend(body.ladder)
    req.k_ladder.extend(body.k_ladder)
    req.axis = pb.STREAM_AXIS_K if body.axis == "k" else pb.STREAM_AXIS_G
    if body.kl or body.predictions:
        req.fidelity.kl, req.fidelity.predictions = True, body.predictions
    return req


async def _stream_events(sv: ProgsaeServicer, c: HttpCall, body: StreamBody) -> AsyncIterator[bytes]:
    """SSE events of one stream (one servicer call); errors become an `error` event (the HTTP status
    is already 200)."""
    items = None
    try:
        req = _stream_request(body)
        text = body.text or None
        if text is None:
            if body.activations is None:
                raise invalid("stream needs `text` or `activations`")
            req.activations.CopyFrom(_tensor(body.activations, "activations"))
        also = []
        for model_id in body.also_models:
            r = pb.StreamDecodeRequest()
            r.CopyFrom(req)
            r.model_id = model_id
            also.append(r)
        items = sv.StreamEvents(req, c, top=body.top, text=text, max_tokens=body.max_tokens, also=also)
        text_out: dict[int, TextActivations] = {}
        async for tagged in items:
            i, item = (tagged.stream, tagged.item) if isinstance(tagged, Tagged) else (0, tagged)
            tag = {"stream": i} if also else {}
            if isinstance(item, TextActivations):
                text_out[i] = item
            elif isinstance(item, stream.Header):
                ta = text_out.get(i)
                header = {"model_id": item.model_id, "ladder": list(item.ladder),
                          "tokens": list(ta.tokens) if ta else None,
                          "n_tokens": item.tokens, "axis": "k" if item.k_ladder else "g",
                          "k_ladder": list(item.k_ladder), **_text_info(ta, item.tokens),
                          **_fvu_baseline(item), **await _token_display(ta), **tag}
                if item.spliced is not None:
                    header["spliced"] = item.spliced
                yield _sse("header", header)
            else:
                if isinstance(item, stream.RungEvent):
                    yield _sse("rung", {**_rung_json(item), **tag})
                end = item.end if isinstance(item, stream.RungEvent) else item
                if end is not None:
                    yield _sse("end", {**_end_json(end), **tag})
    except Exception as e:  # noqa: BLE001  (an error event, never a traceback)
        err = e if isinstance(e, ServiceError) else internal(e)
        yield _sse("error", {"code": err.status.value, "message": err.message})
    finally:
        if items is not None:
            await items.aclose()


def _text_info(ta: TextActivations | None, n: int) -> dict[str, Any]:
    """What the language model did for a text stream: its time (the deadline counts it) and whether the
    text was cut, with the whole text's token count."""
    if ta is None:
        return {"lm_ms": None, "text_tokens": None, "truncated": False}
    total = ta.text_tokens or n
    return {"lm_ms": round(ta.lm_ms, 2), "text_tokens": total, "truncated": total > n}


async def _token_display(ta: TextActivations | None) -> dict[str, Any]:
    """How the page draws a text's tokens (progsae.server.tokens): runs of byte-level tokens that decode
    only together, and each such token's bytes; nothing to say (no tokenizer loaded) when every token
    decodes alone."""
    if ta is None or not any("\ufffd" in t for t in ta.tokens):
        return {"token_groups": [], "token_bytes": []}
    return await asyncio.to_thread(tokens.display, ta.language_model, list(ta.token_ids))


def _fvu_baseline(h: stream.Header) -> dict[str, Any]:
    """What the stream's FVU divides by: "checkpoint" (its reference variance per token, for a text)
    or "batch" (the tokens' own variance: sent activations, or a checkpoint that records none)."""
    return {"fvu_baseline": "batch" if h.fvu_variance is None else "checkpoint",
            "fvu_reference_variance": h.fvu_variance}


def _rung_json(r: stream.RungEvent) -> dict[str, Any]:
    features = [[[i, v] for i, v in latents] for latents in r.fresh or ()]
    out = {"index": r.index, "g": r.g, "k": r.k, "mean_l0": r.mean_l0, "l0": r.l0.tolist(),
           "tokens": r.tokens.tolist() if r.listed else [], "refining": r.refining if r.listed else None,
           "fvu": r.fvu, "elapsed_ms": r.elapsed_ms, "features": features}
    f = r.fidelity
    if f is not None:
        out.update(kl=[_finite(v) for v in f.kl], top1=f.top1, mean_kl=_finite(f.mean_kl),
                   predictions=_predictions(f.predictions), clean_predictions=_predictions(f.clean))
    return out


def _predictions(rows: list[list[tuple[int, float, str]]] | None) -> list[list[list[Any]]] | None:
    """Per token, [[token, probability], ...], most probable first."""
    return None if rows is None else [[[s, p] for _, p, s in row] for row in rows]


def _finite(v: float) -> float | None:
    return v if np.isfinite(v) else None  # JSON has no NaN


def _end_json(e: stream.EndEvent) -> dict[str, Any]:
    out = {"stop_reason": convert.STOP_REASONS[e.reason], "rungs": e.rungs, "final_g": e.final_g,
           "final_k": e.final_k, "elapsed_ms": e.elapsed_ms, "final_fvu": e.final_fvu,
           "token_final_g": e.token_final_g or [], "token_final_k": e.token_final_k or [],
           "token_met": e.token_met or []}
    if e.token_kl is not None:
        out.update(token_kl=[_finite(v) for v in e.token_kl], token_top1=e.token_top1)
    return out


@router.get("/api/stream")
async def stream_get(request: Request) -> StreamingResponse:
    q = request.query_params
    budget = {k: q[k] for k in Budget.model_fields if q.get(k)}
    fields: dict[str, Any] = {k: q[k] for k in ("model_id", "text", "top", "max_tokens", "predictions") if q.get(k)}
    if q.get("also_models"):
        fields["also_models"] = q["also_models"].split(",")
    if q.get("kl"):  # a query string's bool: anything else is refused by the body's model, naming `kl`
        word = q["kl"].lower()
        fields["kl"] = True if word in ("1", "true") else False if word in ("0", "false") else q["kl"]
    try:
        body = StreamBody.model_validate({**fields, "budget": budget})
    except ValidationError as e:
        raise invalid(_first_error(e.errors())) from None
    return StreamingResponse(_stream_events(servicer_of(request), HttpCall(request.headers), body),
                             media_type="text/event-stream")


@router.post("/api/stream")
async def stream_post(request: Request, body: StreamBody) -> Any:
    return StreamingResponse(_stream_events(servicer_of(request), HttpCall(request.headers), body),
                             media_type="text/event-stream")


def build_api() -> FastAPI:
    """The HTTP app: the JSON API, the dashboard's page and routes, the error handlers and the auth check.
    Each call builds a new app (a test hosts its own; Serve pickles `api`)."""
    from .dashboard import router as dashboard_router

    app = FastAPI(title="progsae", description="Progressive SAE codec: HTTP/JSON API")
    app.add_exception_handler(ServiceError, _service_error)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(RequestValidationError, _bad_body)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(Exception, _unexpected)
    app.middleware("http")(_authorize)
    app.include_router(router)
    app.include_router(dashboard_router)
    return app


api = build_api()
"""The app the Codec deployment serves (serve.ingress)."""
