"""The HTTP/JSON API hosted in-process over one servicer (no Ray): the dashboard's text stream is one
servicer call, and every route goes through the servicer (auth, resolution, counters)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progsae.sae import budgets
from progsae.sae.codec import Codes
from progsae.server import http_api, http_host
from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import CodecService
from progsae.server.servicer import ProgsaeServicer
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from tests.support import synthetic as testing
from tests.support.sse import sse

TEXT = "The Eiffel Tower is in Paris, and the Louvre is close by."


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http")
    # a synthetic dictionary at the real LM's width: the text runs through the real SmolLM2 (layer 3)
    testing.make_checkpoint(root / "mat", d=576, m=256, k=8, architecture="matryoshka", orderings=False,
                            model="smollm2-135m", layer=3)
    return root


def serve(root: Path, token: str = "") -> tuple[TestClient, ProgsaeServicer]:
    registry = Registry(RegistryConfig(root=str(root)))
    servicer = ProgsaeServicer(registry, CodecService(), token=token)
    return TestClient(http_host.host(servicer, http_api.build_api())), servicer  # its own app, not Serve's


def test_a_text_stream_is_one_pass(root):
    """One dashboard stream: one model resolution, one LM run, one encode, counted once; each rung's
    features are exactly the latents it decoded first, largest first (checked against the codes of a
    separate EncodeText of the same text)."""
    client, sv = serve(root)
    stats = sv.service.stats
    r = client.post("/api/stream", json={"model_id": "mat", "text": TEXT, "top": 3})
    assert r.status_code == 200
    events = sse(r.text)
    assert [e for e, _ in events][0] == "header" and [e for e, _ in events][-1] == "end"
    assert dict(stats.work) == {"resolve": 1, "lm": 1, "encode": 1}
    assert stats.requests == {"http:StreamText:OK": 1}
    assert stats.streams_started == stats.streams_completed == 1

    header = events[0][1]
    enc = client.post("/api/encode_text", json={"model_id": "mat", "text": TEXT}).json()
    assert header["tokens"] == enc["tokens"] and header["n_tokens"] == len(enc["tokens"])
    idx = [t["indices"] for t in enc["codes"]]
    val = [t["values"] for t in enc["codes"]]
    w = max(map(len, idx))
    codes = Codes(torch.tensor([i + [0] * (w - len(i)) for i in idx]),
                  torch.tensor([v + [0.0] * (w - len(v)) for v in val]))
    rungs = [d for e, d in events if e == "rung"]
    assert [d["g"] for d in rungs] == list(header["ladder"])
    prev = torch.zeros_like(codes.indices, dtype=torch.bool)
    for d in rungs:
        sel = budgets.select(codes, d["g"])
        for n, feats in enumerate(d["features"]):
            new = sel[n] & ~prev[n]
            expect = sorted(zip(codes.indices[n][new].tolist(), codes.values[n][new].tolist(), strict=True),
                            key=lambda p: -p[1])[:3]
            assert [f[0] for f in feats] == [i for i, _ in expect]
            np.testing.assert_allclose([f[1] for f in feats], [v for _, v in expect], atol=1e-4)
        prev |= sel
        assert d["l0"] == sel.sum(-1).tolist()


def test_text_stream_deadline_counts_the_language_model(root):
    """A deadline shorter than the LM's run ends the stream with no rung and reason `deadline`."""
    client, sv = serve(root)
    events = sse(client.post("/api/stream", json={"model_id": "mat", "text": TEXT,
                                                  "budget": {"deadline_ms": 1}}).text)
    assert [e for e, _ in events] == ["header", "end"]
    assert events[-1][1]["stop_reason"] == "deadline" and events[-1][1]["rungs"] == 0


def test_routes_are_servicer_calls(root):
    """/api/models/{id} and /api/stats are GetModel and GetServerStats; errors answer {code, message}."""
    client, sv = serve(root)
    assert client.get("/api/models/mat").json()["model_id"] == "mat@none"
    assert client.get("/api/stats").json()["requests"] == {"http:GetModel:OK": 1}
    bad = client.get("/api/models/..%2Fetc")
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_ARGUMENT"
    missing = client.get("/api/models/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
    assert sv.service.stats.requests["http:GetModel:NOT_FOUND"] == 1
    x = testing.sample_activations(4, d=576, m=256).tolist()
    bad_json = client.post("/api/stream", content=b"{not json")
    assert bad_json.status_code == 400 and bad_json.json()["code"] == "INVALID_ARGUMENT"
    events = sse(client.post("/api/stream", json={"model_id": "mat", "activations": x}).text)
    assert [e for e, _ in events][-1] == "end" and sv.service.stats.requests["http:StreamEvents:OK"] == 1


def test_every_api_route_needs_the_token(root):
    client, _ = serve(root, token="s3cret")
    for path in ("/api/models", "/api/models/mat", "/api/stats", "/api/overview",
                 "/api/feature?model_id=mat&latent=1", "/api/labels?model_id=mat&latents=1"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHENTICATED", path
    for path in ("/api/stream", "/api/encode", "/api/decode", "/api/encode_text"):
        assert client.post(path, content=b"{").status_code == 401, path
    ok = client.get("/api/overview", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["checkpoints"][0]["name"] == "mat"
    assert client.get("/").status_code == 200  # the page itself asks for the token


def test_encode_decode_round_trip(root):
    client, _ = serve(root)
    x = testing.sample_activations(3, d=576, m=256).numpy()
    enc = client.post("/api/encode", json={"model_id": "mat", "activations": x.tolist()}).json()
    dec = client.post("/api/decode", json={"model_id": "mat", "codes": enc["codes"], "granularity": 256}).json()
    assert np.asarray(dec["reconstruction"]).shape == x.shape
    r = client.post("/api/decode", json={"model_id": "mat", "codes": enc["codes"], "granularity": "x"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_ARGUMENT"
    assert convert.STOP_REASONS[pb.STOP_REASON_DEADLINE] == "deadline"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/stream", {"model_id": "mat", "text": TEXT, "top": "x"}, "top"),
    ("/api/stream", {"model_id": "mat", "text": ["a", "b"]}, "text"),
    ("/api/stream", {"model_id": "mat", "text": TEXT, "budget": {"max_granularty": 64}}, "budget.max_granularty"),
    ("/api/stream", {"model_id": "mat", "text": TEXT, "axis": "z"}, "axis"),
    ("/api/encode_text", {"model_id": "mat", "text": 7}, "text"),
    ("/api/encode", {"model_id": "mat", "activations": "x"}, "activations"),
    ("/api/decode", {"model_id": "mat", "codes": [{"indices": [1]}], "granularity": 4}, "codes.0.values"),
])
def test_bodies_are_typed(root, path, body, field):
    """Every route validates its body: a wrong type or an unknown field is INVALID_ARGUMENT naming it."""
    client, sv = serve(root)
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "INVALID_ARGUMENT" and r.json()["message"].startswith(field), r.json()
    assert sv.service.stats.work["lm"] == 0  # refused before any work


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = {
    "/api/stream": ["model_id", "text", "activations", "budget", "ladder", "k_ladder", "axis", "top", "max_tokens",
                    "kl", "predictions"],
    "/api/encode": ["model_id", "activations", "prefix_granularity"],
    "/api/decode": ["model_id", "codes", "granularity"],
    "/api/encode_text": ["model_id", "text", "max_tokens", "include_activations"],
}


@st.composite
def http_cases(draw):
    path = draw(st.sampled_from(sorted(FIELDS)))
    keys = draw(st.lists(st.sampled_from(FIELDS[path] + ["extra"]), max_size=4, unique=True))
    body = {k: draw(JSON) for k in keys}
    if draw(st.booleans()):
        body["model_id"] = "mat"
    if path == "/api/stream" and draw(st.booleans()):
        body["activations"] = draw(st.lists(st.lists(st.floats(allow_nan=True, width=32), min_size=576,
                                                     max_size=576), min_size=0, max_size=3))
    return path, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=http_cases())
def test_http_api_fuzzed(root, case):
    """Random JSON on every POST route: a clear status with a one-line {code, message}, or a stream whose
    error event is one line; never INTERNAL, never a traceback."""
    global _FUZZ
    if _FUZZ is None:
        _FUZZ = serve(root)[0]
    path, body = case
    r = _FUZZ.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})  # NaN allowed
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.status_code == 200
        for event, data in sse(r.text):
            if event == "error":
                assert data["code"] != "INTERNAL" and "\n" not in data["message"], data
        return
    assert r.status_code in (200, 400, 404, 412, 413, 501), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()
        assert err["code"] != "INTERNAL" and "\n" not in err["message"] and "Traceback" not in err["message"]


_FUZZ = None


def test_a_cut_text_is_reported_with_its_token_count(root):
    """Issue 22 item 2: EncodeText and the stream say when the text was cut, keeping the whole count."""
    client, _ = serve(root)
    short = client.post("/api/encode_text", json={"model_id": "mat", "text": TEXT}).json()
    assert short["truncated"] is False and short["text_tokens"] == len(short["tokens"])
    cut = client.post("/api/encode_text", json={"model_id": "mat", "text": TEXT, "max_tokens": 5}).json()
    assert cut["truncated"] is True and len(cut["tokens"]) == 5 and cut["text_tokens"] == short["text_tokens"]
    header = sse(client.post("/api/stream", json={"model_id": "mat", "text": TEXT, "max_tokens": 5}).text)[0][1]
    assert header["truncated"] is True and header["n_tokens"] == 5 and header["text_tokens"] == short["text_tokens"]
    assert header["lm_ms"] > 0
