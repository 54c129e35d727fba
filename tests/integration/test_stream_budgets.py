"""Per-token and (G, k') budgets of StreamDecode (proto revision 3): the service, and the clients
against a plain grpc.aio server over a loopback socket."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from progsae.clients import AsyncClient, Client, ProgsaeError
from progsae.clients import types as t
from progsae.sae import budgets, checkpoint
from progsae.sae.codec import SAE, Codes
from progsae.server.errors import ServiceError, Status
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import ModelCard, ModelRef, Registry, RegistryConfig, ServedModel
from progsae.server.service import CodecService
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from tests.support import synthetic as testing

# --- revision 2's streams, byte for byte -------------------------------------------------------


def exact_model() -> tuple[ServedModel, np.ndarray]:
    """A model and input whose every sum is exact in float32 (small dyadic weights and activations),
    so its streams are the same bytes on any CPU, thread count or summation order."""
    g = torch.Generator().manual_seed(7)
    d, m, k = 8, 32, 4
    W_dec = torch.randint(-2, 3, (m, d), generator=g).float() / 4
    b_dec = torch.randint(-2, 3, (d,), generator=g).float()
    sae = SAE(W_enc=W_dec.T.clone(), W_dec=W_dec, b_enc=torch.arange(m).float() / 64, b_dec=b_dec, k=k)
    meta = checkpoint.CheckpointMeta(architecture="matryoshka", d_in=d, d_sae=m, k=k, granularities=(4, 8, 16, 32))
    card = ModelCard(ModelRef("exact", "none", Path("/nonexistent")), meta, ())
    coef = torch.randint(0, 4, (12, m), generator=g).float() * (torch.rand(12, m, generator=g) < 0.1)
    return ServedModel(card, sae), (b_dec + coef @ W_dec).numpy()


def revision2_requests(x: np.ndarray) -> list[pb.StreamDecodeRequest]:
    f = convert.from_numpy
    idx = np.tile(np.array([1, 6, 12, 30]), (12, 1))
    val = (np.arange(48).reshape(12, 4) % 5 + 1).astype(np.float32) / 4
    S = pb.StreamDecodeRequest
    return [
        S(activations=f(x)),
        S(activations=f(x), payload=pb.PAYLOAD_DELTA, ladder=[2, 5, 9, 32], per_token_l0=True, packed_codes=True),
        S(activations=f(x), payload=pb.PAYLOAD_NONE, budget=pb.Budget(target_fvu=0.97)),
        S(codes=convert.codes_from_arrays(idx, val), budget=pb.Budget(max_granularity=10),
          output_dtype=pb.DTYPE_FLOAT16),
        S(activations=f(x), payload=pb.PAYLOAD_DELTA, output_dtype=pb.DTYPE_BFLOAT16,
          budget=pb.Budget(max_granularity=20, target_fvu=0.9)),
    ]


REVISION2_DIGESTS = [
    # sha256 of each stream's messages (elapsed_ms zeroed, length-prefixed, deterministic
    # serialization) as the service produced them before revision 3 (commit c42efa6).
    "8842330e4b68b50f633161ad45f24e94f065fc2da435a34d2ad8d4e081b4bf16",
    "c40c305295691a9ff5931532efb1e73f31e11ef66aa3609362735877a04e4ab1",
    "ec8fc51a84d58592de988fb5ad3203785a760c30b9edae4bb10de2600ad484cf",
    "7fc829703bd8a821c9c594cc2faee7080eec966d09ea9eaae56763158d238498",
    "7aa6ba2a49c967814618e4627bd09fe4e9af6b8c7fcd691092f0d7ede2274c4b",
]


def digest(msgs: list[pb.StreamDecodeResponse]) -> str:
    h = hashlib.sha256()
    for m in msgs:
        m = pb.StreamDecodeResponse.FromString(m.SerializeToString())
        if m.HasField("rung"):
            m.rung.elapsed_ms = 0
        if m.HasField("end"):
            m.end.elapsed_ms = 0
        b = m.SerializeToString(deterministic=True)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def test_without_a_revision3_budget_streams_are_byte_for_byte_revision2():
    model, x = exact_model()
    svc = CodecService()
    got = [digest(list(svc.stream(model, r))) for r in revision2_requests(x)]
    assert got == REVISION2_DIGESTS


# --- the service -------------------------------------------------------------------------------


def test_service_per_token_stream_semantics():
    """Rungs list exactly the tokens still refining; `refining` counts the next rung's rows; the end's
    final G / met flags agree with the rungs; each token's last row is the direct decode."""
    model, x = exact_model()
    svc = CodecService()
    req = pb.StreamDecodeRequest(activations=convert.from_numpy(x), budget=pb.Budget(token_target_fvu=0.9),
                                 per_token_l0=True)
    msgs = list(svc.stream(model, req))
    codes = Codes(*(torch.from_numpy(a) for a in convert.codes_to_arrays(msgs[0].header.codes).padded()))
    rungs, end = [m.rung for m in msgs if m.HasField("rung")], msgs[-1].end
    n = x.shape[0]
    expected, last_row, l0 = list(range(n)), {}, np.zeros(n)
    for r in rungs:
        assert list(r.tokens) == expected and r.k == 0
        rows = convert.to_numpy(r.tensor)
        assert rows.shape == (len(expected), x.shape[1]) and len(r.l0) == len(expected)
        l0[expected] = list(r.l0)
        assert r.mean_l0 == pytest.approx(l0.mean())
        direct = budgets.decode_at(model.sae, codes, r.g).numpy()
        np.testing.assert_allclose(rows, direct[expected], rtol=1e-5, atol=1e-5)
        err = ((x - direct) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1)
        for j, tok in enumerate(expected):
            last_row[tok] = (r.g, rows[j])
        expected = [tok for tok in expected if err[tok] > 0.9]
        assert r.refining == len(expected)
    assert end.stop_reason in (pb.STOP_REASON_LADDER_DONE, pb.STOP_REASON_TOKEN_TARGET_FVU)
    assert list(end.token_final_g) == [last_row[i][0] for i in range(n)]
    assert [not m for m in end.token_met] == [i in expected for i in range(n)]
    assert 0 < sum(end.token_met) < n  # the case exercises both outcomes
    assert len(end.token_final_k) == 0  # no k' cap


def test_service_k_axis_and_max_k():
    model, x = exact_model()
    svc = CodecService()
    f = convert.from_numpy(x)
    msgs = list(svc.stream(model, pb.StreamDecodeRequest(activations=f, axis=pb.STREAM_AXIS_K,
                                                         budget=pb.Budget(max_granularity=16, max_k=3))))
    h = msgs[0].header
    assert h.axis == pb.STREAM_AXIS_K and list(h.k_ladder) == [1, 2, 3] and list(h.ladder) == [16]
    codes = Codes(*(torch.from_numpy(a) for a in convert.codes_to_arrays(h.codes).padded()))
    assert [(m.rung.g, m.rung.k) for m in msgs] == [(16, 1), (16, 2), (16, 3)]
    for m in msgs:
        np.testing.assert_allclose(convert.to_numpy(m.rung.tensor),
                                   budgets.decode_at(model.sae, codes, 16, m.rung.k).numpy(), rtol=1e-5, atol=1e-5)
    assert msgs[-1].end.stop_reason == pb.STOP_REASON_MAX_K and msgs[-1].end.final_k == 3
    g_msgs = list(svc.stream(model, pb.StreamDecodeRequest(activations=f, budget=pb.Budget(max_k=2),
                                                           payload=pb.PAYLOAD_DELTA)))
    total = sum(convert.to_numpy(m.rung.tensor) for m in g_msgs)
    np.testing.assert_allclose(total, budgets.decode_at(model.sae, codes, 32, 2).numpy(), rtol=1e-5, atol=1e-5)
    assert {m.rung.k for m in g_msgs} == {2} and g_msgs[-1].end.stop_reason == pb.STOP_REASON_LADDER_DONE


@pytest.mark.parametrize("budget,extra,words", [
    (pb.Budget(token_target_fvu=0.0), {}, "token_target_fvu must be in (0, 1]"),
    (pb.Budget(token_target_fvu=1.5), {}, "token_target_fvu must be in (0, 1]"),
    (pb.Budget(token_target_fvu=float("nan")), {}, "token_target_fvu must be in (0, 1]"),
    (pb.Budget(token_target_fvu=0.5), {"codes": True}, "needs activations"),
    (pb.Budget(max_k=0), {}, "max_k k'=0 out of range 1..4"),
    (pb.Budget(max_k=5), {}, "max_k k'=5 out of range 1..4"),
    (pb.Budget(), {"axis": pb.STREAM_AXIS_K, "ladder": [4, 8]}, "ladder is for axis STREAM_AXIS_G"),
    (pb.Budget(), {"k_ladder": [1, 2]}, "k_ladder is for axis STREAM_AXIS_K"),
    (pb.Budget(), {"axis": pb.STREAM_AXIS_K, "k_ladder": [2, 2]}, "strictly increasing"),
    (pb.Budget(), {"axis": pb.STREAM_AXIS_K, "k_ladder": [1, 9]}, "k'=9 out of range 1..4"),
    (pb.Budget(), {"axis": 7}, "unknown StreamAxis 7"),
])
def test_service_rejects_bad_budgets(budget, extra, words):
    model, x = exact_model()
    req = pb.StreamDecodeRequest(budget=budget, **{k: v for k, v in extra.items() if k != "codes"})
    if extra.get("codes"):
        req.codes.CopyFrom(convert.codes_from_arrays(np.array([[1, 2]] * 3), np.ones((3, 2), np.float32)))
    else:
        req.activations.CopyFrom(convert.from_numpy(x))
    with pytest.raises(ServiceError) as e:
        list(CodecService().stream(model, req))
    assert e.value.status == Status.INVALID_ARGUMENT and words in e.value.message and "\n" not in e.value.message
    one = pb.StreamDecodeRequest(activations=convert.from_numpy(x[:1]), budget=pb.Budget(token_target_fvu=0.5))
    with pytest.raises(ServiceError, match="at least 2 tokens"):
        list(CodecService().stream(model, one))


# --- through real gRPC --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("ckpts")
    testing.make_checkpoint(r / "mat", d=32, m=256, k=8, architecture="matryoshka", orderings=False)
    return r


@pytest.fixture(scope="module")
def server(root):
    with PlainServer(RegistryConfig(root=str(root))) as s:
        yield s


@pytest.fixture(scope="module")
def local(root):
    return Registry(RegistryConfig(root=str(root))).get("mat").sae


@pytest.fixture(scope="module")
def x():
    return testing.sample_activations(48, d=32, m=256).numpy()


def _codes(result: t.StreamResult) -> Codes:
    assert result.codes is not None
    idx, val = result.codes.padded()
    return Codes(torch.from_numpy(idx), torch.from_numpy(val))


@pytest.mark.parametrize("payload", ["reconstruction", "delta"])
def test_grpc_per_token_stream(server, local, x, payload):
    """The client returns each token's final reconstruction, final G and met flag; the final rows are
    the server's own DecodeAtGranularity at that G, and a per-token stream sends fewer rows."""
    with Client(server.address, timeout=20) as c:
        s = c.stream(x, model="mat", token_target_fvu=0.3, payload=payload)
        rungs = list(s)
        res = s.result
        assert res.reconstruction is not None and res.token_final_g is not None and res.token_met is not None
        assert res.stop_reason in ("ladder_done", "token_target_fvu")
        assert [len(r.tokens) for r in rungs if r.tokens is not None][0] == len(x)
        assert sum(len(r.tokens) for r in rungs if r.tokens is not None) < len(x) * len(rungs)  # rows dropped
        assert [r.refining for r in rungs][:-1] == [len(r.tokens) for r in rungs[1:] if r.tokens is not None]
        for g in np.unique(res.token_final_g):
            rows = np.flatnonzero(res.token_final_g == g)
            dec = c.decode_at(res.codes, int(g), model="mat").reconstruction
            np.testing.assert_allclose(res.reconstruction[rows], dec[rows], rtol=1e-4, atol=1e-4)
        err = ((x - res.reconstruction) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1)
        assert (err[res.token_met] <= 0.3 + 1e-6).all()
        assert (res.token_final_g[~res.token_met] == res.ladder[-1]).all()
        assert res.token_met.any() and (res.token_final_g < res.ladder[-1]).any()
    direct = budgets.decode_at(local, _codes(res), 256).numpy()
    assert np.abs(direct - res.reconstruction).max() > 1e-3  # early stops did change some rows


def test_grpc_k_axis_and_decode_at_g_k(server, local, x):
    with Client(server.address, timeout=20) as c:
        s = c.stream(x, model="mat", axis="k", max_g=128)
        rungs = list(s)
        assert s.result.axis == "k" and s.result.k_ladder == (1, 2, 4, 8) and s.result.ladder == (128,)
        codes = _codes(s.result)
        for r in rungs:
            assert r.g == 128 and r.tensor is not None
            np.testing.assert_allclose(r.tensor, budgets.decode_at(local, codes, 128, r.k).numpy(),
                                       rtol=1e-4, atol=1e-4)
            dec = c.decode_at(s.result.codes, 128, model="mat", max_k=r.k)
            np.testing.assert_allclose(dec.reconstruction, r.tensor, rtol=1e-5, atol=1e-5)
        assert [r.fvu for r in rungs] == sorted((r.fvu for r in rungs), reverse=True)
        assert s.result.stop_reason == "ladder_done" and s.result.final_k == 8
        capped = c.stream(x, model="mat", max_k=2, token_target_fvu=0.5, payload="delta")
        list(capped)
        assert capped.result.token_final_k is not None and set(capped.result.token_final_k) == {2}
        with pytest.raises(ProgsaeError) as e:
            list(c.stream(x, model="mat", max_k=9))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_k" in e.value.details
        with pytest.raises(ProgsaeError) as e:
            list(c.stream(c.encode(x, model="mat"), model="mat", token_target_fvu=0.5))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "needs activations" in e.value.details
        with pytest.raises(ProgsaeError) as e:
            c.decode_at(s.result.codes, 128, model="mat", max_k=0)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_per_token(server, x):
    async def main():
        async with AsyncClient(server.address, timeout=20) as c:
            res = t.StreamResult()
            rungs = [r async for r in c.stream(x, model="mat", token_target_fvu=0.3, result=res)]
            return rungs, res

    rungs, res = asyncio.run(main())
    with Client(server.address, timeout=20) as c:
        s = c.stream(x, model="mat", token_target_fvu=0.3)
        list(s)
    assert res.token_final_g is not None and s.result.token_final_g is not None
    assert (res.token_final_g == s.result.token_final_g).all() and len(rungs) == s.result.rungs
    np.testing.assert_array_equal(res.reconstruction, s.result.reconstruction)


def test_service_per_token_deadline_and_cancel():
    """A deadline that has passed before the first rung: one message, header and end, no token finished;
    a cancelled stream stops without an end."""
    import time

    model, x = exact_model()
    svc = CodecService()
    req = pb.StreamDecodeRequest(activations=convert.from_numpy(x),
                                 budget=pb.Budget(token_target_fvu=0.5, deadline_ms=1))
    msgs = list(svc.stream(model, req, t0=time.perf_counter() - 1))
    assert len(msgs) == 1 and msgs[0].HasField("header") and not msgs[0].HasField("rung")
    end = msgs[0].end
    assert end.stop_reason == pb.STOP_REASON_DEADLINE and end.rungs == 0
    assert list(end.token_final_g) == [0] * len(x) and not any(end.token_met)
    req.budget.ClearField("deadline_ms")
    calls = iter([False, True])
    msgs = list(svc.stream(model, req, cancelled=lambda: next(calls)))
    assert len(msgs) == 1 and msgs[0].HasField("rung") and not msgs[0].HasField("end")
    assert svc.stats.streams_cancelled == 1
