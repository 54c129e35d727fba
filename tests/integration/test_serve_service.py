"""Service layer and plain grpcio server, no Ray: real gRPC over a loopback socket."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from progsae.clients import Client, ProgsaeError
from progsae.sae import checkpoint, metrics
from progsae.server.errors import ServiceError, Status
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import CodecService, ServiceConfig
from progsae.server.validate import Limits
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.support import synthetic as testing

LIMITS = Limits(max_request_bytes=1 << 20, max_tokens=4096)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("ckpts")
    testing.make_checkpoint(r / "topk", d=32, m=256, k=8)
    testing.make_checkpoint(r / "mat", d=32, m=256, k=8, architecture="matryoshka", orderings=False)
    testing.make_checkpoint(r / "big", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3)
    testing.make_checkpoint(r / "wide", d=128, m=32768, k=16, orderings=False, seed=4)  # a slow encode
    (r / "outside").mkdir()
    return r


@pytest.fixture(scope="module")
def server(root):
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=LIMITS)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def x():
    return testing.sample_activations(64, d=32, m=256).numpy()


def test_registry_ids_and_traversal(root, tmp_path):
    reg = Registry(RegistryConfig(root=str(root)))
    assert reg.resolve("topk").id == "topk@mean_sq"  # default ordering of a vanilla SAE
    assert reg.resolve("topk@none").ordering == "none"
    assert reg.resolve("mat").id == "mat@none"
    assert {s.id for s in reg.variants()} >= {"topk@mean_sq", "topk@freq", "topk@none", "mat@none"}
    (root / "outside" / "link").symlink_to(tmp_path)
    for bad in ["../x", "/etc", "topk/../../x", "a//b", "outside/link", "topk@../x", "x" * 300]:
        with pytest.raises(ServiceError) as e:
            reg.resolve(bad)
        assert e.value.status in (Status.INVALID_ARGUMENT, Status.NOT_FOUND), bad
    with pytest.raises(ServiceError) as e:
        reg.resolve("topk@nope")
    assert e.value.status == Status.NOT_FOUND
    only = Registry(RegistryConfig(root=str(root), models=("mat",)))
    with pytest.raises(ServiceError):
        only.resolve("topk")


def test_service_matches_core(root, x):
    reg = Registry(RegistryConfig(root=str(root)))
    svc = CodecService()
    m = reg.get("topk")
    resp = svc.encode(m, pb.EncodeRequest(activations=convert.from_numpy(x)))
    ck = checkpoint.load(root / "topk", ordering="mean_sq")
    codes = ck.sae.encode(__import__("torch").from_numpy(x))
    for g in (1, 17, 64, 256):
        dec = svc.decode_at(m, pb.DecodeRequest(codes=resp.codes, granularity=g))
        np.testing.assert_allclose(convert.to_numpy(dec.reconstruction), ck.sae.decode(codes, g).numpy(),
                                   rtol=1e-5, atol=1e-5)
    pre = svc.encode(m, pb.EncodeRequest(activations=convert.from_numpy(x), mode=pb.ENCODE_MODE_PREFIX,
                                         granularity=32))
    assert max(pre.codes.indices) < 32 and pre.granularity == 32


def test_stream_delta_sums_to_reconstruction(root, x):
    reg = Registry(RegistryConfig(root=str(root)))
    svc = CodecService()
    m = reg.get("mat")
    msgs = list(svc.stream(m, pb.StreamDecodeRequest(activations=convert.from_numpy(x), payload=pb.PAYLOAD_DELTA)))
    assert msgs[0].HasField("header") and msgs[-1].end.stop_reason == pb.STOP_REASON_LADDER_DONE
    assert len(msgs) == 5 and all(m.HasField("rung") for m in msgs)  # header/end ride on rungs
    total = sum(convert.to_numpy(r.rung.tensor).astype(np.float64) for r in msgs)
    full = svc.decode_at(m, pb.DecodeRequest(codes=msgs[0].header.codes, granularity=m.d_sae))
    np.testing.assert_allclose(total, convert.to_numpy(full.reconstruction), atol=1e-4)
    fvus = [r.rung.fvu for r in msgs]
    assert fvus == sorted(fvus, reverse=True)
    ck = checkpoint.load(root / "mat")
    assert fvus[-1] == pytest.approx(metrics.fvu(__import__("torch").from_numpy(x), ck.sae.decode(
        ck.sae.encode(__import__("torch").from_numpy(x)))), rel=1e-4)


def test_every_rpc(client, x):
    ids = [m.model_id for m in client.models()]
    assert "topk@mean_sq" in ids and "mat@none" in ids
    assert client.model("topk").ordering == "mean_sq"
    enc = client.encode(x, model="topk")
    assert enc.codes.tokens == 64 and enc.granularity == 256
    dec = client.decode_at(enc, 64)
    assert dec.reconstruction.shape == (64, 32) and (dec.l0 <= 8).all()
    rungs = list(client.stream(x, model="topk", per_token_l0=True))
    assert [r.g for r in rungs] == [16, 32, 64, 128, 256]
    assert rungs[-1].l0.shape == (64,)
    with pytest.raises(ProgsaeError) as e:
        client.encode_text("hello", model="topk")
    assert e.value.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
    st = client.stats()
    assert st.requests["Encode:OK"] >= 1


@pytest.mark.parametrize("budget, reason", [
    ({}, "ladder_done"),
    ({"max_g": 100}, "max_granularity"),
    ({"target_fvu": 0.6}, "target_fvu"),
])
def test_stop_reasons(client, x, budget, reason):
    s = client.stream(x, model="mat", **budget)
    rungs = list(s)
    assert s.result.stop_reason == reason
    if reason == "max_granularity":
        assert [r.g for r in rungs] == [16, 32, 64, 100]
    if reason == "target_fvu":
        assert rungs[-1].fvu <= 0.6 < rungs[-2].fvu


def test_deadline_stop(client):
    xb = testing.sample_activations(256, d=16, m=4096, seed=3).numpy()
    s = client.stream(xb, model="big", deadline_ms=1, ladder=range(1, 4097), payload="none")
    rungs = list(s)
    assert s.result.stop_reason == "deadline" and len(rungs) < 4096


def test_error_matrix(server, client, x):
    stub = pb_grpc.ProgsaeStub(client.channel)
    for name, rpc, req, code in testing.error_cases(x, 256, "topk", LIMITS.max_request_bytes):
        with pytest.raises(grpc.RpcError) as e:
            out = getattr(stub, rpc)(req, timeout=10)
            if rpc == "StreamDecode":
                list(out)
        assert e.value.code().name == code, (name, e.value.details())
        assert "\n" not in e.value.details() and "Traceback" not in e.value.details(), name
        assert client.encode(x, model="topk").codes.tokens == 64, name  # the server still serves


def test_cancelled_stream_stops_computing(server, client):
    xb = testing.sample_activations(512, d=16, m=4096, seed=3).numpy()
    before = client.stats()
    s = client.stream(xb, model="big", ladder=range(1, 4097), payload="reconstruction")
    it = iter(s)
    next(it), next(it)
    s.cancel()
    time.sleep(0.3)
    a = client.stats()
    time.sleep(0.3)
    b = client.stats()
    assert b.rungs_computed == a.rungs_computed  # nothing more computed after the cancel
    assert a.rungs_computed - before.rungs_computed < 4096
    assert b.streams_cancelled == before.streams_cancelled + 1


def test_expired_call_deadline_stops(client):
    xb = testing.sample_activations(512, d=16, m=4096, seed=3).numpy()
    before = client.stats()
    with pytest.raises(ProgsaeError) as e:
        list(client.stream(xb, model="big", ladder=range(1, 4097), timeout=0.3))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.3)
    a = client.stats()
    time.sleep(0.3)
    assert client.stats().rungs_computed == a.rungs_computed
    assert a.rungs_computed - before.rungs_computed < 4096


def test_health_and_reflection(server):
    ch = grpc.insecure_channel(server.address)
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="progsae.v1.Progsae"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in out[0].list_services_response.service}
    assert "progsae.v1.Progsae" in names and "grpc.health.v1.Health" in names
    ch.close()


def test_async_client(server, x):
    import asyncio

    from progsae.clients import AsyncClient
    from progsae.clients.types import StreamResult

    async def main():
        async with AsyncClient(server.address) as c:
            encs = await asyncio.gather(*(c.encode(x, model="mat") for _ in range(8)))
            dec = await c.decode_at(encs[0], 32)
            res = StreamResult()
            rungs = [r async for r in c.stream(x, model="mat", max_g=64, result=res)]
            with pytest.raises(ProgsaeError):
                await c.encode(x, model="nope")
            return encs, dec, rungs, res

    encs, dec, rungs, res = asyncio.run(main())
    assert len(encs) == 8 and dec.reconstruction.shape == (64, 32)
    assert [r.g for r in rungs] == [16, 32, 64] and res.stop_reason == "max_granularity"


def test_client_retries_unavailable(root):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    started = threading.Event()

    def later():
        time.sleep(0.4)
        srv = PlainServer(RegistryConfig(root=str(root)), config=__import__(
            "progsae.server.grpc_server", fromlist=["GrpcServerConfig"]).GrpcServerConfig(address=f"127.0.0.1:{port}"))
        srv.start()
        started.srv = srv
        started.set()

    threading.Thread(target=later, daemon=True).start()
    with Client(f"127.0.0.1:{port}", retries=6, backoff=0.1, timeout=5) as c:
        assert c.models()
    started.wait(5)
    started.srv.stop()


def test_cheap_calls_flow_while_a_large_encode_computes(server):
    big = np.random.default_rng(0).standard_normal((LIMITS.max_request_bytes // 512, 128)).astype(np.float32)
    answered, total = testing.calls_during_large_encode(server.address, "wide", big)
    assert answered >= 1, (answered, total)  # GetModel and a 4-token Encode returned before the large call


def test_a_batch_answers_each_encode_in_the_codes_form_it_asked_for(root, x):
    """Batched together, a revision-1 Encode still gets repeated codes and a revision-2 one packed codes."""
    m = Registry(RegistryConfig(root=str(root))).get("topk")
    old = pb.EncodeRequest(activations=convert.from_numpy(x[:4]))
    new = pb.EncodeRequest(activations=convert.from_numpy(x[4:8]), packed_codes=True)
    for batch in ([old, new], [new, old]):
        for req, resp in zip(batch, CodecService().encode_batch([(m, r) for r in batch])):
            assert isinstance(resp, pb.EncodeResponse)
            assert bool(resp.codes.packed_indices) == req.packed_codes
            assert bool(len(resp.codes.indices)) != req.packed_codes


def test_model_id_field_and_metadata_agree_by_resolved_id(client, x):
    stub = pb_grpc.ProgsaeStub(client.channel)
    req = pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(x))
    assert stub.Encode(req, metadata=[("multiplexed_model_id", "topk@mean_sq")], timeout=10).model_id == "topk@mean_sq"
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(req, metadata=[("multiplexed_model_id", "topk@freq")], timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_revision_1_clients_get_repeated_codes_and_both_forms_decode_alike(client, x):
    stub = pb_grpc.ProgsaeStub(client.channel)
    old = stub.Encode(pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(x)), timeout=10)
    new = stub.Encode(pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(x), packed_codes=True),
                      timeout=10)
    assert len(old.codes.indices) > 0 and not old.codes.packed_indices
    assert new.codes.packed_indices and not len(new.codes.indices)
    a, b = convert.codes_to_arrays(old.codes), convert.codes_to_arrays(new.codes)
    np.testing.assert_array_equal(a.indices, b.indices)
    outs = [convert.to_numpy(stub.DecodeAtGranularity(pb.DecodeRequest(model_id="topk", codes=c, granularity=64),
                                                      timeout=10).reconstruction) for c in (old.codes, new.codes)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_service_errors_cross_process_boundaries_whole():
    """The LanguageModel deployment returns a ServiceError through Ray (pickled): status and message survive."""
    import pickle

    from progsae.server.errors import ServiceError, Status

    e = pickle.loads(pickle.dumps(ServiceError(Status.FAILED_PRECONDITION, "language model 'x' unavailable")))
    assert isinstance(e, ServiceError) and e.status is Status.FAILED_PRECONDITION
    assert e.message == "language model 'x' unavailable"


def test_admission_refuses_what_would_not_fit_and_keeps_serving(root, x):
    """A call priced above the server's memory budget is refused before it runs, with the numbers;
    a model not loaded yet is priced with its weights; smaller calls are served as before."""
    from progsae.server import admission

    m = Registry(RegistryConfig(root=str(root))).card(Registry(RegistryConfig(root=str(root))).resolve("wide")).meta
    small = admission.working_bytes(admission.Shape(4, m.d_in, m.d_sae, m.k, True))
    big_rows = 1024
    big = admission.working_bytes(admission.Shape(big_rows, m.d_in, m.d_sae, m.k, True))
    weights = admission.weight_bytes(m.d_in, m.d_sae)
    budget = small + weights + 1  # fits the small call with its load, not the large one
    assert big > budget
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=LIMITS, memory_bytes=budget)) as srv, \
            Client(srv.address) as c:
        xb = np.random.default_rng(0).standard_normal((big_rows, m.d_in)).astype(np.float32)
        with pytest.raises(ProgsaeError) as e:
            c.encode(xb, model="wide")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{big_rows} tokens" in e.value.details and "MiB" in e.value.details and "to load" in e.value.details
        assert srv.registry.loaded() == {}  # refused before the model was loaded
        assert c.encode(xb[:4], model="wide").codes.tokens == 4
        with pytest.raises(ProgsaeError) as e:
            list(c.stream(xb, model="wide"))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "to load" not in e.value.details
        assert c.stats().streams_started == 0
