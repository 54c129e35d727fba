"""Integration: the real Ray Serve app on real ports (gRPC proxy, HTTP proxy, Prometheus endpoint,
and the codec replica's own gRPC port).

One module-scoped app (num_cpus=2, no dashboard) serves every test here. Tests of the gRPC contract
run through both ways into the same servicer: Serve's proxy and the replica's direct port.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from progsae.clients import Client, ProgsaeError
from progsae.sae import checkpoint
from progsae.server import launch
from progsae.server.config import AppConfig
from progsae.server.validate import Limits
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.support import synthetic as testing
from tests.support.synthetic import free_port

LIMITS = Limits(max_request_bytes=1 << 20, max_tokens=4096)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    testing.make_checkpoint(root / "topk", d=32, m=256, k=8)
    testing.make_checkpoint(root / "mat", d=32, m=256, k=8, architecture="matryoshka", orderings=False)
    testing.make_checkpoint(root / "big", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3)
    testing.make_checkpoint(root / "wide", d=128, m=32768, k=16, orderings=False, seed=4)  # a slow encode
    # a checkpoint on the real packaged LM's residual stream (random dictionary): EncodeText end to end
    testing.make_checkpoint(root / "lm", d=576, m=1024, k=16, orderings=False, model="smollm2-135m", layer=3)
    testing.make_checkpoint(root / "lm9", d=576, m=512, k=16, orderings=False, model="smollm2-135m", layer=9, seed=5)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0,
                   "downscale_delay_s": 2, "look_back_period_s": 1}
    cfg = AppConfig(checkpoint_root=str(root), limits=LIMITS, autoscaling=autoscaling, graceful_shutdown_timeout_s=2,
                    direct_grpc_port=free_port(), direct_max_connection_age_s=2, direct_max_connection_age_grace_s=30)
    addrs = launch.start(cfg, cluster)
    yield {"root": root, **addrs}
    launch.stop()


@pytest.fixture(scope="module")
def client(app):
    with Client(app["grpc"], timeout=30) as c:
        yield c


@pytest.fixture(scope="module", params=["proxy", "replica port"])
def via(request, app):
    """A client of Serve's gRPC proxy, or of the codec replica's own port: the same servicer behind both."""
    with Client(app["grpc" if request.param == "proxy" else "direct"], timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def x():
    return testing.sample_activations(64, d=32, m=256).numpy()


def test_every_rpc(app, via, x):
    models = {m.model_id: m for m in via.models()}
    assert {"topk@mean_sq", "topk@freq", "topk@none", "mat@none", "big@none"} <= set(models)
    assert models["mat@none"].architecture == "matryoshka" and models["mat@none"].ladder == (16, 32, 64, 128, 256)
    assert via.model("topk@freq").ordering == "freq"
    enc = via.encode(x, model="topk")
    ck = checkpoint.load(app["root"] / "topk", ordering="mean_sq")
    import torch

    want = ck.sae.decode(ck.sae.encode(torch.from_numpy(x)), 64).numpy()
    np.testing.assert_allclose(via.decode_at(enc, 64).reconstruction, want, rtol=1e-4, atol=1e-4)
    prefix = via.encode(x, model="topk", prefix_g=32)
    assert prefix.prefix and prefix.codes.indices.max() < 32
    s = via.stream(x, model="topk")
    rungs = list(s)
    assert [r.g for r in rungs] == [16, 32, 64, 128, 256] and s.result.stop_reason == "ladder_done"
    np.testing.assert_allclose(rungs[2].tensor, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ProgsaeError) as e:
        via.encode_text("The cat sat.", model="topk")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert via.stats().requests["Encode:OK"] >= 2


@pytest.mark.parametrize("kw, reason", [
    ({}, "ladder_done"),
    ({"max_g": 48}, "max_granularity"),
    ({"target_fvu": 0.6}, "target_fvu"),
    ({"deadline_ms": 1, "ladder": range(1, 4097), "model": "big", "payload": "none"}, "deadline"),
])
def test_stop_reasons(via, x, kw, reason):
    kw = dict(kw)
    inputs = testing.sample_activations(256, d=16, m=4096, seed=3).numpy() if kw.get("model") == "big" else x
    s = via.stream(inputs, **{"model": "mat", **kw})
    rungs = list(s)
    assert s.result.stop_reason == reason
    assert s.result.rungs == len(rungs)
    if reason == "max_granularity":
        assert [r.g for r in rungs] == [16, 32, 48]
    if reason == "target_fvu":
        assert rungs[-1].fvu <= 0.6 < rungs[-2].fvu
    if reason == "deadline":
        assert len(rungs) < 4096


def test_per_token_and_k_prime_budgets_through_the_proxy(app, client, x):
    """One StreamDecode through Serve's gRPC proxy with a per-token target under a k' cap: each token's
    final reconstruction is the direct (G, k') decode at its final G, the met flags hold."""
    import torch

    from progsae.sae.budgets import decode_at
    from progsae.sae.codec import Codes

    s = client.stream(x, model="mat", token_target_fvu=0.3, max_k=4, payload="delta")
    rungs = list(s)
    res = s.result
    assert res.reconstruction is not None and res.token_final_g is not None and res.token_met is not None
    assert res.codes is not None and res.token_final_k is not None and set(res.token_final_k) == {4}
    assert {r.k for r in rungs} == {4} and rungs[-1].refining is not None
    assert 0 < res.token_met.sum() < len(x) or res.stop_reason == "token_target_fvu"
    sae = checkpoint.load(app["root"] / "mat").sae
    codes = Codes(*(torch.from_numpy(a) for a in res.codes.padded()))
    for g in np.unique(res.token_final_g):
        rows = np.flatnonzero(res.token_final_g == g)
        np.testing.assert_allclose(res.reconstruction[rows], decode_at(sae, codes, int(g), 4).numpy()[rows],
                                   rtol=1e-4, atol=1e-4)
    err = ((x - res.reconstruction) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1)
    assert (err[res.token_met] <= 0.3 + 1e-6).all() and (res.token_final_g[~res.token_met] == 256).all()


def test_multiplexing_two_checkpoints(client, x):
    a1 = client.encode(x, model="topk")
    b1 = client.encode(x, model="mat")
    a2 = client.encode(x, model="topk@mean_sq")
    assert a1.model_id == a2.model_id == "topk@mean_sq" and b1.model_id == "mat@none"
    np.testing.assert_array_equal(a1.codes.indices, a2.codes.indices)
    assert not np.array_equal(a1.codes.indices, b1.codes.indices)
    loaded = set(client.stats().loaded_models)
    assert {"topk@mean_sq", "mat@none"} <= loaded


def test_model_id_field_and_metadata_must_agree(via, x):
    stub = pb_grpc.ProgsaeStub(via.channel)
    from progsae.v1 import convert

    req = pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(x))
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(req, metadata=[("multiplexed_model_id", "mat")], timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # two spellings of one model agree (the bare id resolves to its default ordering)
    out = stub.Encode(req, metadata=[("multiplexed_model_id", "topk@mean_sq")], timeout=10)
    assert out.model_id == "topk@mean_sq"


def test_cheap_calls_flow_while_a_large_encode_computes(via):
    big = np.random.default_rng(0).standard_normal((LIMITS.max_request_bytes // 512, 128)).astype(np.float32)
    answered, total = testing.calls_during_large_encode(via.config.target, "wide", big)
    assert answered >= 1, (answered, total)  # GetModel and a 4-token Encode returned before the large call


def test_error_matrix(via, x):
    stub = pb_grpc.ProgsaeStub(via.channel)
    for name, rpc, req, code in testing.error_cases(x, 256, "topk", LIMITS.max_request_bytes):
        with pytest.raises(grpc.RpcError) as e:
            out = getattr(stub, rpc)(req, timeout=20)
            if rpc == "StreamDecode":
                list(out)
        assert e.value.code().name == code, (name, e.value.details())
        details = e.value.details() or ""
        assert "\n" not in details and "Traceback" not in details, (name, details)
        assert via.encode(x, model="topk").codes.tokens == 64, name  # same replica still serves


# A client's cancel through Ray (proxy and replica port) stopping compute within one rung is
# tests/integration/test_ray_cancel.py: a stock Serve proxy loses some cancels, progsae.server.ray_proxy relays them.


def test_expired_deadline_stops_stream(via, x):
    xb = testing.sample_activations(4096, d=16, m=4096, seed=3).numpy()
    before = via.stats()
    with pytest.raises(ProgsaeError) as e:
        list(via.stream(xb, model="big", ladder=range(1, 4097), payload="none", timeout=0.5))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 10
    while via.stats().streams_cancelled == before.streams_cancelled and time.time() < deadline:
        time.sleep(0.1)
    after = via.stats()
    assert after.streams_cancelled == before.streams_cancelled + 1
    assert after.rungs_computed - before.rungs_computed < 4096
    assert via.encode(x, model="mat").codes.tokens == 64


def test_health_and_reflection(app):
    ch = grpc.insecure_channel(app["grpc"])
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="progsae.v1.Progsae"),
                                                timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                         timeout=10))
    assert "progsae.v1.Progsae" in {s.name for s in out[0].list_services_response.service}
    ch.close()


def _http(app, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(app["http"] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_api(app, x):
    status, body = _http(app, "/api/models")
    assert status == 200 and "mat@none" in {m["model_id"] for m in json.loads(body)["models"]}
    status, body = _http(app, "/api/encode", {"model_id": "mat", "activations": x[:4].tolist()})
    codes = json.loads(body)["codes"]
    assert status == 200 and len(codes) == 4
    status, body = _http(app, "/api/decode", {"model_id": "mat", "codes": codes, "granularity": 64})
    assert status == 200 and np.array(json.loads(body)["reconstruction"]).shape == (4, 32)
    status, body = _http(app, "/api/encode", {"model_id": "../x", "activations": x[:4].tolist()})
    assert status == 400 and json.loads(body)["code"] == "INVALID_ARGUMENT"
    status, body = _http(app, "/api/stream", {"model_id": "mat", "activations": x.tolist(),
                                              "budget": {"max_granularity": 64}})
    events = [e.split("\n")[0].removeprefix("event: ") for e in body.strip().split("\n\n")]
    assert status == 200 and events == ["header", "rung", "rung", "rung", "end"]
    status, body = _http(app, "/api/stream?model_id=mat&text=hello")
    assert "event: error" in body and "FAILED_PRECONDITION" in body


def test_encode_text_with_real_lm(app, client):
    assert client.model("lm").text_available
    out = client.encode_text("The quick brown fox jumps over the lazy dog.", model="lm")
    n = len(out.tokens)
    assert n == len(out.token_ids) >= 8 and out.codes.tokens == n
    assert out.activations.shape == (n, 576) and np.isfinite(out.activations).all()
    assert out.language_model == "smollm2-135m" and out.layer == 3
    assert "".join(out.tokens).strip().startswith("The quick")
    s = client.stream(out.activations, model="lm", max_g=256)
    assert [r.g for r in s] and s.result.stop_reason == "max_granularity"
    status, body = _http(app, "/api/stream?model_id=lm&text=Hello%20world&max_granularity=128")
    assert status == 200 and body.startswith("event: header") and "event: end" in body
    header = json.loads(body.split("\n")[1].removeprefix("data: "))
    assert header["tokens"] and header["ladder"][-1] == 128
    # revision 5: a text stream with per-rung KL and a KL budget, the LM's tail run in the codec replica
    kl = client.stream("The quick brown fox jumps over the lazy dog.", model="lm", max_g=256, token_target_kl=1e9)
    rungs = list(kl)
    assert kl.result.stop_reason == "token_target_kl" and len(rungs) == 1 and kl.result.token_met.all()
    assert kl.result.token_strings == out.tokens and np.isfinite(kl.result.token_kl).all()
    status, body = _http(app, "/api/stream?model_id=lm&text=Hello%20world&max_granularity=128&kl=true")
    assert status == 200 and '"kl":[' in body and '"token_kl":[' in body


def test_metrics_reach_prometheus(app, client, x):
    from prometheus_client.parser import text_string_to_metric_families

    client.encode(x, model="mat")
    list(client.stream(x, model="mat", max_g=32))
    with pytest.raises(ProgsaeError):  # a refused call (this test may run first in the module)
        client.encode(x[:, :3], model="mat")
    want = {"ray_progsae_requests", "ray_progsae_rungs_streamed", "ray_progsae_stream_stops",
            "ray_progsae_request_latency_ms", "ray_progsae_encode_batch_size", "ray_progsae_bytes_out"}
    found: dict[str, list] = {}
    deadline = time.time() + 60
    while time.time() < deadline:
        with urllib.request.urlopen(app["metrics"], timeout=10) as r:
            text = r.read().decode()
        found = {f.name: f.samples for f in text_string_to_metric_families(text) if f.name.startswith("ray_progsae")}
        refused = want <= set(found) and any(s.labels.get("status") == "INVALID_ARGUMENT"
                                             for s in found["ray_progsae_requests"])
        if refused:
            break
        time.sleep(1)
    assert want <= set(found), sorted(found)
    labels = [s.labels for s in found["ray_progsae_requests"]]
    assert any(lb.get("method") == "Encode" and lb.get("status") == "OK" for lb in labels)
    assert any(lb.get("status") == "INVALID_ARGUMENT" for lb in labels)
    assert any(s.labels.get("reason") == "max_granularity" for s in found["ray_progsae_stream_stops"])


def _codec_replicas(every_state: bool = False) -> int:
    """Codec replicas RUNNING (`every_state`: in any state, STOPPING ones included)."""
    from ray import serve

    dep = serve.status().applications[launch.APP_NAME].deployments["Codec"]
    return sum(dep.replica_states.values()) if every_state else dep.replica_states.get("RUNNING", 0)


@pytest.mark.parametrize("path", ["grpc", "direct"], ids=["proxy", "replica port"])
def test_autoscaling_up_under_load_and_down_after(app, path):
    """Last in the module: 12 concurrent long streams push the codec from 1 to 2 replicas, then back, through
    Serve's proxy and through the replicas' own port alike (its load reaches Serve's autoscaler through
    record_autoscaling_stats and the fast-path policy). On the replica port, clients that connected before
    the new replica existed reach it once their connection ages out (direct_max_connection_age_s)."""
    import threading

    deadline = time.time() + 60
    # the previous run's scale-down, finished: a replica Serve is stopping still answers its own port
    # until its drain ends, and would count here as a replica of this run
    while _codec_replicas(every_state=True) != 1 and time.time() < deadline:
        time.sleep(0.5)
    assert _codec_replicas(every_state=True) == 1
    xb = testing.sample_activations(1024, d=16, m=4096, seed=3).numpy()
    stop = threading.Event()
    answered: list[tuple[float, str]] = []  # (time, replica) of each probe after a stream, on its channel
    failures: list[BaseException] = []

    # on the replica port, streams short enough to probe often which replica serves each channel
    ladder = range(16, 4097, 16) if path == "direct" else range(1, 4097)

    def load() -> None:
        try:
            with Client(app[path], timeout=60) as c:
                while not stop.is_set():
                    s = c.stream(xb, model="big", ladder=ladder, payload="none")
                    for _ in s:
                        if stop.is_set():
                            s.cancel()
                            break
                    answered.append((time.time(), c.stats().replica))
        except BaseException as e:  # noqa: BLE001  (asserted below: no call may fail)
            failures.append(e)

    t_start = time.time()
    threads = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 90
        while _codec_replicas() < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert _codec_replicas() == 2, "did not scale up under load"
        t_up = time.time()
        print(f"{path}: scaled up after {t_up - t_start:.1f}s")
        time.sleep(15)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:3]
    late = [r for t, r in answered if t > t_up + 5]
    first = {r for t, r in answered if t < t_start + 1} or {answered[0][1]}
    share = sum(r not in first for r in late) / max(1, len(late))
    print(f"{path}: {len(late)} probes after the new replica was up, {share:.0%} on the new one")
    if path == "direct":  # (through the proxy, Serve routes each call itself)
        assert len({r for _, r in answered}) == 2 and share >= 0.15  # (bench/bench_autoscale.py measures it)
    deadline = time.time() + 60
    while _codec_replicas() > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert _codec_replicas() == 1, "did not scale back down"
    print(f"{path}: scaled down {time.time() - t_start:.1f}s after the load started")


@pytest.mark.parametrize("path", ["grpc", "direct"], ids=["proxy", "replica port"])
def test_encode_texts_one_pass_through_ray(app, path):
    """EncodeTexts on Ray: the LanguageModel deployment runs the texts once for SAEs at two layers."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is in France."]
    with Client(app[path], timeout=60) as c:
        out = c.encode_texts(texts, models=["lm", "lm9"])
        assert [[r.layer for r in row] for row in out.results] == [[3, 9], [3, 9]]
        for text, row in zip(texts, out.results, strict=True):
            alone = c.encode_text(text, model="lm9")
            assert row[1].tokens == alone.tokens
            np.testing.assert_allclose(row[1].activations, alone.activations, rtol=1e-4, atol=2e-3)
