"""Per-rung fidelity of text streams and the per-token KL budget (proto revision 5), on the real
SmolLM2-135M at layer 3 with a small progressive coder of its residual stream: the service, the gRPC
clients and CLI over a plain grpc.aio server, and the HTTP/SSE API."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from progsae.cli import main
from progsae.clients import AsyncClient, Client, ProgsaeError
from progsae.clients import types as t
from progsae.lm.models import forward_from_layer, hidden_at_layer
from progsae.lm.splice import next_token_log_probs, splice
from progsae.sae import budgets
from progsae.sae.codec import Codes
from progsae.sae.metrics import token_kl
from progsae.server import http_api, http_host
from progsae.server.errors import ServiceError, Status
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import CodecService
from progsae.server.servicer import ProgsaeServicer
from progsae.server.text import TextBackend
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from tests.support import synthetic as testing
from tests.support.lm_checkpoint import LM, make_lm_checkpoint
from tests.support.sse import sse

TEXT = "The old man walked slowly to the market to buy some fresh fish for dinner."
LAYER = 3
TARGET = 2.0  # nats: some tokens meet it at the first rung, some later, some never (checked below)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("kl")
    make_lm_checkpoint(r / "pca", layer=LAYER)
    testing.make_checkpoint(r / "nolm", d=576, m=64, k=4, orderings=False, model=None)
    testing.make_checkpoint(r / "ghost", d=576, m=64, k=4, orderings=False, model="no-such-lm", layer=LAYER)
    return r


@pytest.fixture(scope="module")
def model(root):
    return Registry(RegistryConfig(root=str(root))).get("pca")


@pytest.fixture(scope="module")
def text():
    return TextBackend().run(LM, LAYER, TEXT, 64)


@pytest.fixture(scope="module")
def server(root):
    with PlainServer(RegistryConfig(root=str(root))) as s:
        yield s


def stream(model, text, **kw) -> list[pb.StreamDecodeResponse]:
    return list(CodecService().stream(model, pb.StreamDecodeRequest(**kw), text=text))


def offline_kl(text, spliced: np.ndarray, state: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """`progsae eval`'s splice on one text: (KL per token, top-1 agreement per token) with `state` [N, d]
    in place of the spliced tokens' clean activations; the last token from the plain forward's last row."""
    lm = TextBackend().lm(LM)
    ids = torch.tensor([[lm.start_token_id, *text.token_ids]])
    with TextBackend().holding(LM), torch.no_grad():
        hidden = hidden_at_layer(lm.model, ids, LAYER).float()
        h = splice(hidden, torch.from_numpy(spliced)[None], torch.from_numpy(state))
        clean, lp = next_token_log_probs(lm.model, hidden, LAYER), next_token_log_probs(lm.model, h, LAYER)
        last = [torch.log_softmax(forward_from_layer(lm.model, v, LAYER)[0, -1:].float(), -1) for v in (hidden, h)]
    clean, lp = torch.cat([clean, last[0]]), torch.cat([lp, last[1]])
    return token_kl(clean, lp), lp.argmax(-1) == clean.argmax(-1)


def header_codes(msgs) -> Codes:
    return Codes(*(torch.from_numpy(a) for a in convert.codes_to_arrays(msgs[0].header.codes).padded()))


@pytest.mark.parametrize("budget", [pb.Budget(), pb.Budget(token_target_kl=TARGET)])
def test_reported_kl_is_the_offline_splice(model, text, budget):
    """Every rung's KL per computed token equals the evaluation's splice of the same reconstruction (every
    token at its latest rung) to 1e-5 relative, top-1 agreement too; the clean predictions ride on the
    first rung and the header names the text and which tokens are spliced."""
    msgs = stream(model, text, fidelity=pb.Fidelity(kl=True, predictions=3), budget=budget)
    h = msgs[0].header
    assert list(h.token_ids) == text.token_ids and list(h.token_strings) == text.tokens
    assert h.language_model == LM and h.layer == LAYER and h.text_tokens == len(text.token_ids)
    spliced = np.array(h.spliced, dtype=bool)
    norms = np.linalg.norm(text.activations, axis=1)
    assert len(spliced) == len(text.token_ids) and (spliced == (norms <= model.meta.extra["outlier_policy"]
                                                               ["threshold"])).all()
    state = np.zeros_like(text.activations)
    rungs = [m.rung for m in msgs]
    assert len(rungs[0].clean_predictions) == len(text.token_ids) and not any(r.clean_predictions for r in rungs[1:])
    for r in rungs:
        rows = list(r.tokens) if r.HasField("refining") else list(range(len(text.token_ids)))
        state[rows] = convert.to_numpy(r.tensor)
        kl, top1 = offline_kl(text, spliced, state)
        assert len(r.kl) == len(r.top1) == len(r.predictions) == len(rows)
        assert min(r.kl) > 1e-3  # far from float noise: the comparison below is a relative one
        np.testing.assert_allclose(list(r.kl), kl[rows].numpy(), rtol=1e-5, atol=0)
        assert list(r.top1) == top1[rows].tolist()
        for p in r.predictions:
            assert len(p.ids) == len(p.tokens) == 3 and list(p.probs) == sorted(p.probs, reverse=True)
    end = msgs[-1].end
    assert len(end.token_kl) == len(text.token_ids) and len(end.token_top1) == len(text.token_ids)


def test_kl_budget_stops_each_token_at_its_first_rung_within_target(model, text):
    """Rungs list exactly the tokens still refining; a token stops at its first rung with KL <= t; the end
    gives its final G, its KL there and whether it met t; its final reconstruction is the direct decode."""
    msgs = stream(model, text, budget=pb.Budget(token_target_kl=TARGET), per_token_l0=True)
    codes = header_codes(msgs)
    n = len(text.token_ids)
    expected, final = list(range(n)), {}
    for m in msgs:
        r = m.rung
        assert list(r.tokens) == expected and len(r.kl) == len(expected)
        rows = convert.to_numpy(r.tensor)
        direct = budgets.decode_at(model.sae, codes, r.g).numpy()
        np.testing.assert_allclose(rows, direct[expected], rtol=1e-5, atol=1e-4)
        for j, tok in enumerate(expected):
            final[tok] = (r.g, r.kl[j], r.top1[j])
        expected = [tok for j, tok in enumerate(expected) if r.kl[j] > TARGET]
        assert r.refining == len(expected)
    end = msgs[-1].end
    met = np.array(end.token_met)
    assert list(end.token_final_g) == [final[i][0] for i in range(n)]
    assert list(end.token_kl) == [final[i][1] for i in range(n)]
    assert list(end.token_top1) == [final[i][2] for i in range(n)]
    assert (np.array(end.token_kl)[met] <= TARGET).all() and (np.array(end.token_kl)[~met] > TARGET).all()
    assert met.any() and (~met).any()  # the case exercises both outcomes
    assert len(set(end.token_final_g[i] for i in np.flatnonzero(met))) > 1  # tokens stopped at different rungs
    assert end.stop_reason == pb.STOP_REASON_LADDER_DONE
    easy = stream(model, text, budget=pb.Budget(token_target_kl=50.0))
    assert len(easy) == 1 and easy[-1].end.stop_reason == pb.STOP_REASON_TOKEN_TARGET_KL


def test_both_per_token_targets_stop_a_token_only_when_both_are_met(model, text):
    msgs = stream(model, text, budget=pb.Budget(token_target_kl=TARGET, token_target_fvu=0.5))
    x = text.activations
    base = ((x - x.mean(0)) ** 2).sum(1)
    codes = header_codes(msgs)
    expected = list(range(len(x)))
    for m in msgs:
        r = m.rung
        assert list(r.tokens) == expected
        err = ((x - budgets.decode_at(model.sae, codes, r.g).numpy()) ** 2).sum(1) / base
        expected = [tok for j, tok in enumerate(expected) if r.kl[j] > TARGET or err[tok] > 0.5]
    met = np.array(msgs[-1].end.token_met)
    assert met.sum() == len(x) - len(expected)


def test_streams_without_fidelity_are_unchanged(model, text):
    """A text stream without fidelity sends the rungs and end an activations stream of the same
    activations sends, byte for byte; only the header names the text."""
    x = convert.from_numpy(text.activations)
    for budget in (pb.Budget(), pb.Budget(token_target_fvu=0.3, max_granularity=64)):
        from_text = stream(model, text, budget=budget, payload=pb.PAYLOAD_DELTA)
        from_acts = list(CodecService().stream(model, pb.StreamDecodeRequest(activations=x, budget=budget,
                                                                            payload=pb.PAYLOAD_DELTA)))
        assert len(from_text) == len(from_acts)
        for a, b in zip(from_text, from_acts, strict=True):
            for m in (a, b):
                m.rung.elapsed_ms = m.end.elapsed_ms = 0
            assert a.rung.SerializeToString(deterministic=True) == b.rung.SerializeToString(deterministic=True)
            assert a.end.SerializeToString(deterministic=True) == b.end.SerializeToString(deterministic=True)
            assert not a.rung.kl and not a.end.token_kl and not a.header.spliced


@pytest.mark.parametrize(("kw", "words"), [
    ({"fidelity": pb.Fidelity(kl=True)}, "fidelity needs a text input"),
    ({"budget": pb.Budget(token_target_kl=0.5)}, "budget.token_target_kl needs a text input"),
])
def test_fidelity_needs_a_text(model, text, kw, words):
    req = pb.StreamDecodeRequest(activations=convert.from_numpy(text.activations), **kw)
    with pytest.raises(ServiceError) as e:
        list(CodecService().stream(model, req))
    assert e.value.status == Status.INVALID_ARGUMENT and words in e.value.message


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf])
def test_bad_kl_targets(model, text, target):
    with pytest.raises(ServiceError) as e:
        stream(model, text, budget=pb.Budget(token_target_kl=target))
    assert e.value.status == Status.INVALID_ARGUMENT and "token_target_kl must be a finite number" in e.value.message
    with pytest.raises(ServiceError, match="predictions must be in 0..20"):
        stream(model, text, fidelity=pb.Fidelity(predictions=21))


# --- through real gRPC and the clients ---------------------------------------------------------


def test_grpc_clients_and_errors(server, model, text):
    with Client(server.address, timeout=60) as c:
        s = c.stream(TEXT, model="pca", token_target_kl=TARGET, predictions=2, payload="reconstruction")
        rungs = list(s)
        res = s.result
    assert res.token_strings == text.tokens and res.token_ids == text.token_ids and res.layer == LAYER
    assert res.spliced is not None and res.token_kl is not None and res.token_top1 is not None
    assert res.token_met is not None and res.token_final_g is not None and res.reconstruction is not None
    assert res.clean_predictions is not None and len(res.clean_predictions) == len(text.tokens)
    assert rungs[0].kl is not None and rungs[0].predictions is not None and rungs[0].mean_kl is not None
    assert isinstance(rungs[0].predictions[0][0], t.Prediction) and len(rungs[0].predictions[0]) == 2
    assert (res.token_kl[res.token_met] <= TARGET).all() and (res.token_kl[~res.token_met] > TARGET).all()
    codes = Codes(*(torch.from_numpy(a) for a in res.codes.padded())) if res.codes is not None else None
    assert codes is not None
    for g in np.unique(res.token_final_g):
        rows = np.flatnonzero(res.token_final_g == g)
        direct = budgets.decode_at(model.sae, codes, int(g)).numpy()
        np.testing.assert_allclose(res.reconstruction[rows], direct[rows], rtol=1e-5, atol=1e-4)

    async def run_async():
        async with AsyncClient(server.address, timeout=60) as ac:
            out = t.StreamResult()
            got = [r async for r in ac.stream(TEXT, model="pca", token_target_kl=TARGET, payload="none", result=out)]
            return got, out

    arungs, ares = asyncio.run(run_async())
    assert len(arungs) == len(rungs) and ares.token_kl is not None
    np.testing.assert_allclose(ares.token_kl, res.token_kl, rtol=1e-6)
    assert (ares.token_final_g == res.token_final_g).all()
    with Client(server.address, timeout=60) as c:
        cases = [(lambda: c.stream(text.activations, model="pca", kl=True), grpc.StatusCode.INVALID_ARGUMENT,
                  "needs a text input"),
                 (lambda: c.stream(TEXT, model="pca", token_target_kl=math.nan), grpc.StatusCode.INVALID_ARGUMENT,
                  "token_target_kl"),
                 (lambda: c.stream(TEXT, model="nolm", kl=True), grpc.StatusCode.FAILED_PRECONDITION,
                  "names no language model"),
                 (lambda: c.stream(TEXT, model="ghost", kl=True), grpc.StatusCode.FAILED_PRECONDITION,
                  "no-such-lm")]
        for make, code, words in cases:
            with pytest.raises(ProgsaeError) as e:
                list(make())
            assert e.value.code == code and words in e.value.details and "\n" not in e.value.details


def test_cli_stream_text_with_kl(server, capsys):
    t0 = ["client", "--target", server.address]
    assert main([*t0, "stream", "--model", "pca", "--text", TEXT, "--token-target-kl", str(TARGET),
                 "--predictions", "2"]) == 0
    out = capsys.readouterr().out
    assert "mean KL" in out and "met the per-token target" in out and "predicted (clean)" in out
    assert "' fish'" in out  # the token table names each token
    assert main([*t0, "encode", "--model", "pca", "--text", TEXT]) == 0
    assert "text (smollm2-135m layer 3) encode" in capsys.readouterr().out


# --- HTTP / server-sent events -----------------------------------------------------------------


def test_http_stream_with_kl(root, text):
    registry = Registry(RegistryConfig(root=str(root)))
    client = TestClient(http_host.host(ProgsaeServicer(registry, CodecService()), http_api.build_api()))
    r = client.post("/api/stream", json={"model_id": "pca", "text": TEXT, "kl": True, "predictions": 2,
                                         "budget": {"token_target_kl": TARGET}})
    events = sse(r.text)
    assert [e for e, _ in events][0] == "header" and events[-1][0] == "end", events[-1]
    header, rungs, end = events[0][1], [d for e, d in events if e == "rung"], events[-1][1]
    assert len(header["spliced"]) == len(text.tokens)
    assert len(rungs[0]["clean_predictions"]) == len(text.tokens) and rungs[1]["clean_predictions"] is None
    for d in rungs:
        assert len(d["kl"]) == len(d["top1"]) == len(d["predictions"]) == len(d["tokens"])
        assert all(len(p) == 2 and isinstance(p[0][0], str) for p in d["predictions"]) and d["mean_kl"] > 0
    met = np.array(end["token_met"])
    assert (np.array(end["token_kl"])[met] <= TARGET).all() and len(end["token_top1"]) == len(text.tokens)
    plain = sse(client.get("/api/stream", params={"model_id": "pca", "text": TEXT}).text)
    assert "spliced" not in plain[0][1] and "kl" not in plain[1][1] and "token_kl" not in plain[-1][1]
    got = sse(client.get("/api/stream", params={"model_id": "pca", "text": TEXT, "kl": "true"}).text)
    assert len(got[1][1]["kl"]) == len(text.tokens) and got[1][1]["predictions"] is None
    bad = client.get("/api/stream", params={"model_id": "pca", "text": TEXT, "kl": "maybe"})
    assert bad.status_code == 400 and bad.json()["message"].startswith("kl")
    bad = client.post("/api/stream", json={"model_id": "pca", "text": TEXT, "predictions": 99})
    assert bad.status_code == 400 and bad.json()["message"].startswith("predictions")
    for body, code, words in [
        ({"activations": text.activations[:4].tolist(), "kl": True}, "INVALID_ARGUMENT", "needs a text input"),
        ({"text": TEXT, "budget": {"token_target_kl": -1}}, "INVALID_ARGUMENT", "token_target_kl"),
        ({"model_id": "nolm", "text": TEXT, "kl": True}, "FAILED_PRECONDITION", "names no language model"),
    ]:
        events = sse(client.post("/api/stream", json={"model_id": "pca", **body}).text)
        assert events[-1][0] == "error" and events[-1][1]["code"] == code and words in events[-1][1]["message"]
