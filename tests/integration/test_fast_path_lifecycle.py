"""The replicas' own port across a redeploy: old replicas send GOAWAY and drain, clients move on to
the new ones, and no call fails (real Ray Serve, real gRPC over loopback)."""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from dataclasses import replace

import pytest

from progsae.clients import Client
from progsae.server import launch
from progsae.server.app import build_app
from progsae.server.config import AppConfig
from tests.support import synthetic as testing


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    testing.make_checkpoint(root / "big", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3)
    cluster = launch.LocalCluster(grpc_port=testing.free_port(), http_port=testing.free_port())
    cfg = AppConfig(checkpoint_root=str(root), codec_replicas=2, text=False, graceful_shutdown_timeout_s=15,
                    direct_grpc_port=testing.free_port(), direct_max_connection_age_s=2,
                    direct_max_connection_age_grace_s=15, replica_memory_bytes=64 << 20)
    addrs = launch.start(cfg, cluster)
    yield cfg, addrs
    launch.stop()


def test_redeploy_under_streaming_load_loses_no_call(app):
    from ray import serve

    cfg, addrs = app
    xb = testing.sample_activations(256, d=16, m=4096, seed=3).numpy()
    stop = threading.Event()
    done: list[str] = []
    failures: list[BaseException] = []

    def load() -> None:
        try:
            with Client(addrs["direct"], timeout=60) as c:
                while not stop.is_set():
                    rungs = list(c.stream(xb, model="big", ladder=range(64, 4097, 64), payload="reconstruction"))
                    assert rungs[-1].g == 4096
                    done.append(c.stats().replica)
        except BaseException as e:  # noqa: BLE001  (asserted below)
            failures.append(e)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 60  # every client finished a stream on the replicas there are now
    while len(done) < len(threads) and time.time() < deadline and not failures:
        time.sleep(0.2)
    before = set(done)
    t0 = time.time()
    # a changed config: Serve replaces every codec replica (rolling), each old one drains its port
    serve.run(build_app(replace(cfg, max_batch_size=8).to_dict()), name=launch.APP_NAME, route_prefix="/")
    print(f"redeploy took {time.time() - t0:.1f} s")
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[:3]
    after = set(done[-6:])
    print(f"{len(done)} streams; replicas before {sorted(before)}, at the end {sorted(after)}")
    assert before and after and not before & after  # every client moved to the new replicas
    stops = _replica_stop_lines()
    print("\n".join(stops))
    assert any("calls in flight at GOAWAY, 0 left" in s for s in stops)


def _replica_stop_lines() -> list[str]:
    """The stop records old replicas wrote to their Serve logs (progsae.server.app.Codec.__del__)."""
    out = []
    for f in glob.glob(os.path.join("/tmp/ray/session_latest/logs/serve", "replica_*Codec*.log")):
        with open(f, errors="replace") as fh:
            out += [m.group(0) for line in fh if (m := re.search(r"progsae: codec replica .*", line))]
    return out


@pytest.mark.parametrize("path", ["grpc", "direct"], ids=["proxy", "replica port"])
def test_an_encode_too_large_for_the_replica_is_refused_and_nothing_restarts(app, path):
    import grpc
    from ray import serve

    from progsae.clients import ProgsaeError

    _, addrs = app
    replicas = lambda: serve.status().applications[launch.APP_NAME].deployments["Codec"].replica_states  # noqa: E731
    before = dict(replicas())
    xb = testing.sample_activations(8192, d=16, m=4096, seed=3).numpy()  # ~270 MiB of pre-activations
    with Client(addrs[path], timeout=60) as c:
        with pytest.raises(ProgsaeError) as e:
            c.encode(xb, model="big")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "8192 tokens" in e.value.details
        assert "64 MiB" in e.value.details
        assert c.encode(xb[:64], model="big").codes.tokens == 64  # the replica keeps serving
    assert dict(replicas()) == before  # no replica restarted
