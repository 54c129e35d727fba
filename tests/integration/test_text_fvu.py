"""What a text stream's FVU divides by (issue 22 item 5), over the in-process HTTP API, gRPC's
StreamDecode and the real SmolLM2: the checkpoint's reference variance when it records one (and the
header says so), the tokens' own variance otherwise (and it says that); a stream of sent activations
is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from progsae.sae import checkpoint, metrics
from progsae.sae.codec import Codes
from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import CodecService
from progsae.server.text import TextBackend
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from tests.integration.test_http_api import serve
from tests.support import synthetic as testing
from tests.support.sse import sse

REFERENCE = 40.0
"""A per-token variance the `ref` checkpoint records (SmolLM2 layer 3 is of this order)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fvu")
    for name in ("ref", "old"):  # one dictionary: "old" was written before checkpoints recorded a reference
        testing.make_checkpoint(root / name, d=576, m=256, k=8, architecture="matryoshka", orderings=False,
                                model="smollm2-135m", layer=3)
    meta = checkpoint.load_meta(root / "ref")
    meta.reference_variance = REFERENCE
    checkpoint.save(root / "ref", checkpoint.load(root / "ref").sae, meta)
    return root


def text_stream(client, model: str, text: str, **budget) -> tuple[dict, list[dict], dict]:
    events = sse(client.post("/api/stream", json={"model_id": model, "text": text, "budget": budget}).text)
    assert events[0][0] == "header" and events[-1][0] == "end", events[-1]
    return events[0][1], [d for e, d in events if e == "rung"], events[-1][1]


def activations_and_codes(client, model: str, text: str) -> tuple[torch.Tensor, Codes]:
    enc = client.post("/api/encode_text", json={"model_id": model, "text": text, "include_activations": True}).json()
    w = max(len(t["indices"]) for t in enc["codes"])
    idx = [t["indices"] + [0] * (w - len(t["indices"])) for t in enc["codes"]]
    val = [t["values"] + [0.0] * (w - len(t["values"])) for t in enc["codes"]]
    return torch.tensor(enc["activations"]), Codes(torch.tensor(idx), torch.tensor(val))


@pytest.mark.parametrize("text", ["hello world", "The Eiffel Tower is in Paris, and the Louvre is close by."])
def test_a_text_divides_by_the_checkpoint_reference(root, text):
    client, _ = serve(root)
    header, rungs, end = text_stream(client, "ref", text)
    assert header["fvu_baseline"] == "checkpoint" and header["fvu_reference_variance"] == REFERENCE
    x, codes = activations_and_codes(client, "ref", text)
    sae = checkpoint.load(root / "ref").sae
    for r in rungs:
        recon = sae.decode(codes, r["g"])
        sse_ = float((x.double() - recon.double()).square().sum())
        assert r["fvu"] == pytest.approx(sse_ / (len(x) * REFERENCE), rel=1e-5)
        assert r["fvu"] != pytest.approx(metrics.fvu(x, recon), rel=1e-3)  # not the tokens' own variance
    assert end["final_fvu"] == rungs[-1]["fvu"]
    # the per-token summary FVU uses the same baseline
    _, per_token, _ = text_stream(client, "ref", text, token_target_fvu=1.0)
    assert per_token[0]["fvu"] == pytest.approx(rungs[0]["fvu"], rel=1e-5)


def test_without_a_reference_the_tokens_own_variance_and_it_says_so(root):
    client, _ = serve(root)
    header, rungs, _ = text_stream(client, "old", "hello world")
    assert header["fvu_baseline"] == "batch" and header["fvu_reference_variance"] is None
    x, codes = activations_and_codes(client, "old", "hello world")
    recon = checkpoint.load(root / "old").sae.decode(codes, rungs[-1]["g"])
    assert rungs[-1]["fvu"] == pytest.approx(metrics.fvu(x, recon), rel=1e-5)


def test_one_token_takes_a_target_only_against_a_reference(root):
    """FVU of one token is undefined against its own mean, defined against the checkpoint's."""
    client, _ = serve(root)
    header, rungs, end = text_stream(client, "ref", "hello", target_fvu=1.0)
    assert header["n_tokens"] == 1 and rungs and end["stop_reason"] in ("target_fvu", "ladder_done")
    events = sse(client.post("/api/stream", json={"model_id": "old", "text": "hello",
                                                  "budget": {"target_fvu": 1.0}}).text)
    assert events[-1][0] == "error" and "at least 2 tokens" in events[-1][1]["message"]


def test_sent_activations_keep_the_batch_baseline(root):
    """A client's own activations (HTTP here; gRPC StreamDecode is the same plan) divide by their own
    variance even when the checkpoint records a reference: those streams are what they were."""
    client, _ = serve(root)
    x = np.random.default_rng(0).standard_normal((6, 576)).astype(np.float32)
    events = sse(client.post("/api/stream", json={"model_id": "ref", "activations": x.tolist()}).text)
    header, last = events[0][1], [d for e, d in events if e == "rung"][-1]
    assert header["fvu_baseline"] == "batch" and header["fvu_reference_variance"] is None
    sae = checkpoint.load(root / "ref").sae
    xt = torch.from_numpy(x)
    assert last["fvu"] == pytest.approx(metrics.fvu(xt, sae.decode(sae.encode(xt), last["g"])), rel=1e-5)


def test_grpc_text_stream_names_its_baseline(root):
    """StreamDecode of a text: StreamHeader.fvu_reference_variance is the checkpoint's, and the rungs'
    FVU divides by it; without one the field is unset and the stream is the activations stream's."""
    registry = Registry(RegistryConfig(root=str(root)))
    ta = TextBackend().run("smollm2-135m", 3, "hello world", 64)
    x = torch.from_numpy(ta.activations)
    for name, want in (("ref", REFERENCE), ("old", None)):
        model = registry.get(name)
        msgs = list(CodecService().stream(model, pb.StreamDecodeRequest(), text=ta))
        header, last = msgs[0].header, msgs[-1].rung
        assert header.HasField("fvu_reference_variance") == (want is not None)
        recon = model.sae.decode(model.sae.encode(x), last.g)
        expected = metrics.fvu(x, recon, want)
        assert last.fvu == pytest.approx(expected, rel=1e-5)
    acts = list(CodecService().stream(registry.get("old"), pb.StreamDecodeRequest(
        activations=convert.from_numpy(ta.activations))))
    assert not acts[0].header.HasField("fvu_reference_variance")
