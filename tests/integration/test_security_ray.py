"""The same guarantees through the Ray Serve app (one module-scoped app, auth on via an env var):
bearer token on gRPC and HTTP, size caps, and a sample of the fuzz cases, through Serve's proxy and
through the codec replica's own port."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progsae.clients import Client, ProgsaeError
from progsae.server import launch
from progsae.server.config import AppConfig
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.integration.test_fuzz_rpc import ALLOWED, GOOD_X, LIMITS, ONE_FIELD, D, M, clean_message, one_field_request
from tests.support import synthetic as testing
from tests.support.browser import chromium, new_page
from tests.support.synthetic import free_port

TOKEN = "ray-s3cret"
ENV = "PROGSAE_TEST_AUTH_TOKEN"
AUTH = [("authorization", f"Bearer {TOKEN}")]
RAY_LIMITS = dataclasses.replace(LIMITS, max_response_bytes=2048)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayseckpt")
    testing.make_checkpoint(root / "topk", d=D, m=M, k=4, model=None)
    saved = {k: os.environ.get(k) for k in (ENV, "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE")}
    os.environ[ENV] = TOKEN  # replicas of a Ray instance started here inherit it
    cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port(), num_cpus=2)
    cfg = AppConfig(checkpoint_root=str(root), limits=RAY_LIMITS, text=False, auth_token_env=ENV,
                    graceful_shutdown_timeout_s=1)
    try:
        addrs = launch.start(cfg, cluster)
        yield {"root": root, **addrs}
    finally:
        launch.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=["grpc", "direct"])
def stub(app, request):
    """Serve's proxy, or the codec replica's own port: one servicer, the same guarantees."""
    ch = grpc.insecure_channel(app[request.param], options=[("grpc.max_send_message_length", 1 << 26)])
    yield pb_grpc.ProgsaeStub(ch)
    ch.close()


def _code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        out = fn()
        if hasattr(out, "__next__"):
            list(out)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_grpc_token(app, stub):
    enc = pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(GOOD_X))
    calls = {
        "Encode": lambda md: stub.Encode(enc, timeout=20, metadata=md),
        "StreamDecode": lambda md: stub.StreamDecode(pb.StreamDecodeRequest(
            model_id="topk", activations=convert.from_numpy(GOOD_X)), timeout=20, metadata=md),
        "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), timeout=20, metadata=md),
        "GetModel": lambda md: stub.GetModel(pb.GetModelRequest(model_id="topk"), timeout=20, metadata=md),
        "GetServerStats": lambda md: stub.GetServerStats(pb.ServerStatsRequest(), timeout=20, metadata=md),
    }
    for name, fn in calls.items():
        for md in ([], [("authorization", "Bearer nope")]):
            code, details = _code(lambda fn=fn, md=md: fn(md))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, details)
            clean_message(details, app["root"])
        assert _code(lambda fn=fn: fn(AUTH))[0] == grpc.StatusCode.OK, name
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(app["grpc"]))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=20).status == health_pb2.HealthCheckResponse.SERVING
    with Client(app["grpc"], timeout=20, token=TOKEN) as c:
        assert c.encode(GOOD_X, model="topk").codes.tokens == GOOD_X.shape[0]


def _http(app, path, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(app["http"] + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_token(app):
    status, body = _http(app, "/api/models")
    assert status == 401 and json.loads(body)["code"] == "UNAUTHENTICATED"
    assert _http(app, "/api/models", "wrong")[0] == 401
    status, body = _http(app, "/api/models", TOKEN)
    assert status == 200 and json.loads(body)["models"]


def test_dashboard_asks_for_the_token_once(app):
    """The page asks for the token (again after a wrong one), then sends it on every /api call,
    streams included, and a reload in the same session does not ask again."""
    with chromium() as b, new_page(b) as page:
        page.goto(app["http"] + "/")
        page.wait_for_selector("#auth:not([hidden])")
        assert "needs a token" in page.inner_text("#auth-msg") and "token needed" in page.inner_text("#server-status")
        page.fill("#auth-token", "wrong")
        page.click("#auth button")
        page.wait_for_function("() => document.getElementById('auth-msg').textContent.includes('refused')")
        assert page.is_visible("#auth")
        page.fill("#auth-token", TOKEN)
        page.click("#auth button")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_hidden("#auth") and "connected" in page.inner_text("#server-status")
        sent: list[tuple[str, str | None]] = []
        page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))) if "/api/" in r.url else None)
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_hidden("#auth")
        page.fill("#text", "Hello there.")
        page.click("#run")  # this server has no language model: the stream is refused for that, not for auth
        page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
        assert "language model" in page.inner_text("#error") and page.is_hidden("#auth")
        assert {u.split("/api/")[1].split("?")[0] for u, _ in sent} >= {"models", "overview", "stream"}
        assert all(h == f"Bearer {TOKEN}" for _, h in sent), sent


def test_caps_through_ray(app):
    n = RAY_LIMITS.max_response_bytes // (4 * D) + 1
    x = testing.sample_activations(n, d=D, m=M).numpy()
    with Client(app["grpc"], timeout=20, token=TOKEN) as c:
        enc = c.encode(x, model="topk")
        with pytest.raises(ProgsaeError) as e:
            c.decode_at(enc, g=M)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        over = testing.sample_activations(RAY_LIMITS.max_tokens + 1, d=D, m=M).numpy()
        with pytest.raises(ProgsaeError) as e:
            c.encode(over, model="topk")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.decode_at(c.encode(x[:8], model="topk"), g=M).reconstruction.shape == (8, D)


@pytest.mark.parametrize("rpc", sorted(ONE_FIELD))
def test_fuzz_sample_through_ray(app, stub, fuzz_cases, rpc):
    """One fuzzed field of a good request, through Serve's gRPC proxy: documented status, clean message,
    a good call right after a failure succeeds, and the replica counts no INTERNAL."""
    cases = 0

    @settings(deadline=None, database=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def case(data):
        nonlocal cases
        name = data.draw(st.sampled_from(sorted(ONE_FIELD[rpc])), label="field")
        value = data.draw(ONE_FIELD[rpc][name], label=name)
        req = one_field_request(rpc, name, value)
        cases += 1
        md = list(AUTH)
        if req.model_id.isascii() and req.model_id.isprintable() and req.model_id == req.model_id.strip():
            md.append(("multiplexed_model_id", req.model_id))
        code, details = _code(lambda: getattr(stub, rpc)(req, timeout=20, metadata=md))
        if code != grpc.StatusCode.OK:
            assert code.name in ALLOWED[rpc], (rpc, name, code, details)
            clean_message(details, app["root"])
            good = stub.Encode(pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(GOOD_X)),
                               timeout=20, metadata=AUTH)
            assert len(good.codes.offsets) == GOOD_X.shape[0] + 1

    case()
    fuzz_cases["rpc cases through Ray Serve"][rpc] += cases
    assert cases >= 5, cases
    stats = stub.GetServerStats(pb.ServerStatsRequest(), timeout=20, metadata=AUTH)
    assert stats.requests and not any(k.endswith(":INTERNAL") for k in stats.requests), dict(stats.requests)
