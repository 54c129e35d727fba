"""A client's cancel, or its expired gRPC deadline, stops a stream's compute on the Ray Serve replica
within one rung: through Serve's gRPC proxy and through the codec replica's own port, checked with the
replica's own counters (GetServerStats: rungs_computed, streams_cancelled).

Serve's proxy on its own does not always relay a cancel: when the client cancels while the proxy is
writing a message (the usual case when the replica runs ahead of the client), grpc.aio drops the
handler without Serve cancelling the replica's request, and the replica computed the whole stream (5 of
6 cancels in a measurement, RELIABILITY.md). progsae.server.ray_proxy, installed by the servicer
function in grpc_options, cancels the replica's request whenever gRPC reports the call done.

Rungs here are slow (a 1024-wide model over 8192 tokens: ~30-60 ms a rung on 2 cores) so that a rung
is longer than the way a cancel travels (client -> proxy -> replica): "within one rung" is then
checkable from outside as "the replica computed at most the rungs the client received + 2" (one that
may be on its way to the client when it cancels, one in progress when the cancel arrives), where a
cancel that is not relayed goes on for the rest of the 1024-rung ladder.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from progsae.clients import Client, ProgsaeError
from progsae.server import launch
from progsae.server.config import AppConfig
from progsae.v1.convert import SparseArrays
from tests.support import synthetic as testing
from tests.support.synthetic import free_port

D, M, K, TOKENS = 1024, 1024, 8, 8192


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancelckpt")
    testing.make_checkpoint(root / "slow", d=D, m=M, k=K, ladder=(64, M), orderings=False, seed=5, model=None)
    testing.make_checkpoint(root / "fast", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3, model=None)
    cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port())
    cfg = AppConfig(checkpoint_root=str(root), text=False, codec_replicas=1, graceful_shutdown_timeout_s=1,
                    direct_grpc_port=free_port())
    addrs = launch.start(cfg, cluster)
    yield addrs
    launch.stop()


@pytest.fixture(scope="module")
def codes():
    """Codes of TOKENS tokens, K per token spread over the whole dictionary (a stream input that needs no
    encode, so every rung costs the same [TOKENS, D] update)."""
    rng = np.random.default_rng(0)
    band = M // K
    indices = (np.arange(K) * band + rng.integers(0, band, (TOKENS, K))).reshape(-1)
    values = rng.uniform(0.5, 2.0, TOKENS * K).astype(np.float32)
    return SparseArrays(np.arange(0, TOKENS * K + 1, K, dtype=np.int64), indices.astype(np.int64), values)


def _settled(c: Client, before, limit_s: float = 15.0):
    """Stats once the replica has counted the stream cancelled and its rung count stopped moving."""
    end = time.time() + limit_s
    while time.time() < end:
        a = c.stats()
        if a.streams_cancelled > before.streams_cancelled:
            time.sleep(0.5)  # ~10 rungs' time
            b = c.stats()
            if b.rungs_computed == a.rungs_computed:
                return b
        time.sleep(0.1)
    raise AssertionError(f"the replica did not stop the stream within {limit_s}s: {c.stats()}")


@pytest.mark.parametrize("how", ["cancel", "deadline"])
@pytest.mark.parametrize("via", ["proxy", "replica port"])
def test_cancel_stops_compute_within_one_rung(app, codes, via, how):
    target = app["grpc" if via == "proxy" else "direct"]
    with Client(target, timeout=60, retries=0) as c:
        list(c.stream(codes, model="slow", max_g=128, payload="none"))  # model loaded, channel warm
        before = c.stats()
        t0 = time.perf_counter()
        s = c.stream(codes, model="slow", ladder=range(1, M + 1), payload="none",
                     timeout=60 if how == "cancel" else 1.0)
        received = 0
        if how == "cancel":
            for _ in s:
                received += 1
                if received == 3:
                    s.cancel()
                    break
        else:
            with pytest.raises(ProgsaeError) as e:
                for _ in s:
                    received += 1
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        rung_ms = 1e3 * (time.perf_counter() - t0) / max(received, 1)
        after = _settled(c, before)
    computed = after.rungs_computed - before.rungs_computed
    print(f"\n{via} {how}: client received {received} rungs (~{rung_ms:.0f} ms each), replica computed {computed}")
    assert after.streams_cancelled == before.streams_cancelled + 1
    assert after.streams_completed == before.streams_completed
    assert received <= computed <= received + 2, (received, computed)


def test_no_cancel_is_lost_when_the_replica_runs_ahead(app):
    """Cancels of fast streams (~2 ms a rung, reconstructions: the replica runs ahead and the proxy is
    often handing a message to gRPC when the cancel comes), one after another: every one reaches the
    replica. A stock proxy lost 1-3 of 10 of these (bench/cancel_relay.py), each then computing the whole
    4096-rung ladder."""
    x = testing.sample_activations(512, d=16, m=4096, seed=3).numpy()
    with Client(app["grpc"], timeout=60, retries=0) as c:
        list(c.stream(x[:4], model="fast", max_g=128))
        computed = []
        for _ in range(8):
            before = c.stats()
            s = c.stream(x, model="fast", ladder=range(1, 4097), payload="reconstruction")
            for i, _ in enumerate(s):
                if i == 1:
                    s.cancel()
                    break
            after = _settled(c, before, limit_s=10)
            computed.append(after.rungs_computed - before.rungs_computed)
    print(f"\nrungs computed by 8 streams cancelled after 2: {computed}")
    assert max(computed) < 256, computed
