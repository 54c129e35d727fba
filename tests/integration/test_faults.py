"""Faults on the plain grpcio server: random mid-stream cancels from many clients, deadlines shorter
than one rung. (Replica kill under Ray is bench/faults.py; SIGKILL of training and harvesting is
tests/integration/test_train_resume.py and tests/integration/test_harvest.py.)"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from progsae.clients import Client, ProgsaeError
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.support import synthetic as testing


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("faultckpt")
    testing.make_checkpoint(root / "big", d=16, m=2048, k=8, ladder=(64, 2048), orderings=False, seed=3,
                            model=None)
    with PlainServer(RegistryConfig(root=str(root))) as s:
        yield s


def _settle(c: Client, field: str = "rungs_computed", quiet_s: float = 0.4, limit_s: float = 10.0):
    """Stats once `field` has stopped moving for quiet_s."""
    end = time.time() + limit_s
    last = c.stats()
    while time.time() < end:
        time.sleep(quiet_s)
        now = c.stats()
        if getattr(now, field) == getattr(last, field) and now.streams_started == (
                now.streams_completed + now.streams_cancelled):
            return now
        last = now
    return last


def _round(server, xb, plan) -> dict[int, str]:
    results: dict[int, str] = {}

    def run(i: int, stop_after: int | None) -> None:
        with Client(server.address, timeout=30) as cc:
            s = cc.stream(xb, model="big", ladder=range(1, 2049, 4), payload="reconstruction")
            n = 0
            for _ in s:
                n += 1
                if stop_after is not None and n > stop_after:
                    s.cancel()
                    break
            results[i] = "cancelled" if stop_after is not None and n > stop_after else s.result.stop_reason

    ts = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(plan)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a stream hung"
    return results


def test_random_cancels_stop_compute_and_leak_nothing(server):
    """Two rounds of 16 concurrent streams, most cancelled at a random rung: every stream is accounted
    completed or cancelled, compute stops, and the second round grows no thread."""
    xb = testing.sample_activations(256, d=16, m=2048, seed=3).numpy()
    rng = random.Random(0)
    threads = []
    with Client(server.address, timeout=30) as c:
        for _ in range(2):
            plan = [rng.choice([None, 0, 1, 2, 5, 20]) for _ in range(16)]  # None = read to the end
            before = _settle(c)
            results = _round(server, xb, plan)
            after = _settle(c)
            a = after.rungs_computed
            time.sleep(0.3)
            assert c.stats().rungs_computed == a, "compute continued after every client left"
            threads.append(threading.active_count())
            done = after.streams_completed - before.streams_completed
            cancelled = after.streams_cancelled - before.streams_cancelled
            n_cancel = sum(1 for r in results.values() if r == "cancelled")
            assert done + cancelled == len(plan)
            assert cancelled >= n_cancel - 2  # a cancel racing the last rung may count as completed
            assert after.rungs_computed - before.rungs_computed < 512 * (len(plan) - n_cancel) + 512 * n_cancel // 2
    # the server's pool is bounded (16 workers): no per-stream thread leak (+2: gRPC's own pollers come and go)
    assert threads[1] <= threads[0] + 2, threads


def test_budget_deadline_shorter_than_one_rung(server):
    """budget.deadline_ms below the first rung's cost: a clean stream with no rung and reason DEADLINE."""
    xb = testing.sample_activations(4096, d=16, m=2048, seed=3).numpy()
    with Client(server.address, timeout=30) as c:
        s = c.stream(xb, model="big", deadline_ms=1, payload="none")
        rungs = list(s)
    assert s.result.stop_reason == "deadline" and len(rungs) == 0 and s.result.rungs == 0


def test_call_deadline_shorter_than_one_rung(server):
    """A gRPC deadline shorter than one rung: DEADLINE_EXCEEDED with a clean message; the server serves on."""
    xb = testing.sample_activations(4096, d=16, m=2048, seed=3).numpy()
    stub = pb_grpc.ProgsaeStub(grpc.insecure_channel(server.address))
    req = pb.StreamDecodeRequest(model_id="big", activations=convert.from_numpy(xb), ladder=range(1, 2049))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamDecode(req, timeout=0.005))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "\n" not in (e.value.details() or "")
    with Client(server.address, timeout=0.005, retries=0) as c:
        with pytest.raises(ProgsaeError) as pe:
            c.encode(xb, model="big")
        assert pe.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with Client(server.address, timeout=30) as c:
        assert c.encode(xb[:4], model="big").codes.tokens == 4
