"""EncodeTexts (revision 6): several texts through several SAEs, the real SmolLM2-135M run once, over real
gRPC (the Python client) and the HTTP API; each result is what EncodeText gives for that text and SAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from progsae.clients import Client, ProgsaeError
from progsae.server import http_api, http_host
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from progsae.server.service import ServiceConfig
from progsae.server.validate import Limits
from tests.support import synthetic as testing
from tests.support.sse import sse

TEXTS = ["The Eiffel Tower is in Paris.", "hi", "Rivers carry water from the mountains down to the sea."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("texts")
    # synthetic dictionaries at the real LM's width, at two of its layers
    for name, layer, seed in (("early", 3, 1), ("late", 9, 2)):
        testing.make_checkpoint(root / name, d=576, m=256, k=8, orderings=False, model="smollm2-135m",
                                layer=layer, seed=seed)
    testing.make_checkpoint(root / "other_lm", d=576, m=256, k=8, orderings=False, model="gpt2", layer=3)
    testing.make_checkpoint(root / "no_lm", d=576, m=256, k=8, orderings=False, model=None)
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=Limits(max_texts=4))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def test_several_texts_and_saes_from_one_pass(client):
    before = client.stats().work
    out = client.encode_texts(TEXTS, models=["early", "late"])
    after = client.stats().work
    assert after["lm"] == before["lm"] + 1  # one pass for 3 texts x 2 SAEs at two layers
    assert [[r.model_id for r in row] for row in out.results] == [["early@none", "late@none"]] * 3
    assert out.lm_ms > 0
    for text, row in zip(TEXTS, out.results, strict=True):
        for r in row:
            alone = client.encode_text(text, model=r.model_id)
            assert r.tokens == alone.tokens and r.token_ids == alone.token_ids and r.layer == alone.layer
            # one padded batch against the text alone: the same positions, float32 kernels of other shapes
            np.testing.assert_allclose(r.activations, alone.activations, rtol=1e-4, atol=2e-3)


def test_one_text_is_exactly_encode_text(client):
    (row,) = client.encode_texts([TEXTS[0]], models=["late"]).results
    alone = client.encode_text(TEXTS[0], model="late")
    np.testing.assert_array_equal(row[0].activations, alone.activations)
    for a, b in zip(row[0].codes, alone.codes, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("texts", "models", "code", "says"), [
    (["a", "b"], ["early", "early"], "INVALID_ARGUMENT", "twice"),
    (["a", " "], ["early"], "INVALID_ARGUMENT", "text 1 is empty"),
    (["a"] * 5, ["early"], "RESOURCE_EXHAUSTED", "5 texts exceed the limit of 4"),
    (["a"], ["early", "other_lm"], "INVALID_ARGUMENT", "share their language model"),
    (["a"], ["early", "no_lm"], "FAILED_PRECONDITION", "no_lm@none names no language model"),
    ([], ["early"], "INVALID_ARGUMENT", "no text"),
    (["a"], ["early", "nope"], "NOT_FOUND", "nope"),
])
def test_bad_requests_say_what_is_wrong(client, texts, models, code, says):
    with pytest.raises(ProgsaeError) as e:
        client.encode_texts(texts, models=models)
    assert e.value.code.name == code and says in e.value.details


def test_http_route(server):
    http = TestClient(http_host.host(server.servicer, http_api.build_api()))
    r = http.post("/api/encode_texts", json={"model_ids": ["early", "late"], "texts": TEXTS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["model_id"] for x in body["results"]] == ["early@none", "late@none"] * 2
    assert body["results"][2]["tokens"] == ["hi"] and "activations" not in body["results"][0]
    bad = http.post("/api/encode_texts", json={"model_ids": ["early"], "texts": "not a list"})
    assert bad.status_code == 400 or bad.status_code == 422


def test_one_text_streamed_through_two_saes_from_one_pass(server):
    """The dashboard's side by side: one /api/stream with also_models runs the language model once, and
    each model's events (tagged `stream`) are what its own stream of the text gives."""
    http = TestClient(http_host.host(server.servicer, http_api.build_api()))
    text, stats = TEXTS[2], server.servicer.service.stats
    lm = stats.work["lm"]
    both = sse(http.post("/api/stream", json={"model_id": "early", "also_models": ["late"], "text": text}).text)
    assert stats.work["lm"] == lm + 1
    for i, model in enumerate(["early", "late"]):
        alone = sse(http.post("/api/stream", json={"model_id": model, "text": text}).text)
        mine = [(e, {k: v for k, v in d.items() if k not in ("stream", "elapsed_ms", "lm_ms")})
                for e, d in both if d["stream"] == i]
        assert [e for e, _ in mine] == [e for e, _ in alone] and mine[0][1]["model_id"] == f"{model}@none"
        fvus = [d["fvu"] for e, d in alone if e == "rung"]
        assert fvus and [d["fvu"] for e, d in mine if e == "rung"] == pytest.approx(fvus, rel=1e-4)
    bad = sse(http.post("/api/stream", json={"model_id": "early", "also_models": ["other_lm"], "text": text}).text)
    assert bad[0][0] == "error" and "share their language model" in bad[0][1]["message"]
