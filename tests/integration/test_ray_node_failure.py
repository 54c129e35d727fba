"""A node dies under load, on a real two-node Ray cluster: the project's client sees no failure, and no
call on a raw gRPC channel ends INTERNAL.

The cluster is started the way an operator starts one, on this machine: `ray start --head` and
`ray start --address` (tests/support/ray_cluster.py: own temp dirs and ports, token auth), the app deployed with
`serve deploy` from deploy/serve_config.yaml (its grpc_options as shipped; only ports, the checkpoint
root, `proxy_location: HeadOnly` since two proxies on one machine would want the same ports, and two
fixed codec replicas of 1 CPU on two 1-CPU nodes, so one replica per node). Clients stream through
Serve's gRPC proxy and through the replicas' own port; a few seconds in, the worker node's raylet is
SIGKILLed (its replica dies with it) and the load goes on. Every Ray process the test started is killed
by pid at the end, pass or fail (never `ray stop`, which would stop other sessions' clusters too).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import yaml

from progsae.clients import Client, ProgsaeError
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.support import synthetic as testing
from tests.support.ray_cluster import RayCluster, wait_for
from tests.support.synthetic import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LOAD_BEFORE_S = float(os.environ.get("PROGSAE_TEST_LOAD_BEFORE_S", "4"))
"""Load before the kill."""
LOAD_AFTER_S = float(os.environ.get("PROGSAE_TEST_LOAD_AFTER_S", "8"))
"""Load after the kill (the dead replica's calls retried, the service on one replica). Both can be
raised from the environment for a longer measurement (RELIABILITY.md)."""


def serve_config(root: Path, grpc_port: int, http_port: int, direct_port: int) -> dict:
    cfg = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = {"host": "127.0.0.1", "port": http_port}
    cfg["grpc_options"]["port"] = grpc_port
    (app,) = cfg["applications"]
    app["args"].update(checkpoint_root=str(root), models=[], text=False, direct_grpc_port=direct_port,
                       direct_grpc_host="127.0.0.1", graceful_shutdown_timeout_s=1)
    app["deployments"] = [{"name": "Codec", "num_replicas": 2, "max_ongoing_requests": 64,
                           "ray_actor_options": {"num_cpus": 1}}]
    return cfg


class Load:
    """Client threads until `stop`: the project's client (its outcome per call) and raw channels (the
    status of every call, mid-stream or not)."""

    def __init__(self, targets: dict[str, str], x: np.ndarray):
        self.targets, self.x = targets, x
        self.stop = threading.Event()
        self.kill_t: float | None = None
        self.lock = threading.Lock()
        self.ok: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.resumed = 0
        self.raw: collections.Counter[str] = collections.Counter()
        self.raw_details: collections.Counter[tuple[str, str]] = collections.Counter()
        self.after_kill = 0
        self.threads: list[threading.Thread] = []

    def _count_ok(self, what: str) -> None:
        with self.lock:
            self.ok[what] += 1
            self.after_kill += self.kill_t is not None

    def client(self, via: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(self.targets[via], timeout=20) as c:
            while not self.stop.is_set():
                what = f"{via} StreamDecode"
                try:
                    if rng.random() < 0.25:
                        what = f"{via} Encode+Decode"
                        enc = c.encode(self.x[: int(rng.integers(1, 64))], model="big")
                        c.decode_at(enc, int(rng.integers(1, 4097)))
                    else:
                        s = c.stream(self.x, model="big", ladder=range(64, 4097, 64), payload="reconstruction")
                        rungs = list(s)
                        assert [r.g for r in rungs] == list(range(64, 4097, 64)) and s.result.rungs == 64
                        with self.lock:
                            self.resumed += s.resumed
                    self._count_ok(what)
                except ProgsaeError as e:
                    with self.lock:
                        self.failures.append(f"{what}: {e}")

    def raw_stream(self, via: str) -> None:
        ch = grpc.insecure_channel(self.targets[via])
        stub = pb_grpc.ProgsaeStub(ch)
        req = pb.StreamDecodeRequest(model_id="big", activations=convert.from_numpy(self.x),
                                     ladder=list(range(64, 4097, 64)), payload=pb.PAYLOAD_RECONSTRUCTION)
        while not self.stop.is_set():
            got = 0
            try:
                for _ in stub.StreamDecode(req, timeout=20, metadata=[("multiplexed_model_id", "big")]):
                    got += 1
                code, details = "OK", ""
            except grpc.RpcError as e:
                code, details = e.code().name, " ".join((e.details() or "").split())[:200]
            with self.lock:
                self.raw[f"{via} {code}{' mid-stream' if got and code != 'OK' else ''}"] += 1
                if code != "OK":
                    self.raw_details[(code, details)] += 1
                self.after_kill += self.kill_t is not None and code == "OK"
        ch.close()

    def start(self) -> None:
        # Each client has its own channel, so its own connection: the replica port's SO_REUSEPORT spreads
        # the direct ones over both replicas, as Serve's router spreads the proxied calls.
        plan = [(self.client, ("proxy", i)) for i in range(4)] + [(self.client, ("direct", i)) for i in (4, 5)]
        plan += [(self.raw_stream, ("proxy",))] * 2 + [(self.raw_stream, ("direct",))] * 2
        self.threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in plan]
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a call hung"


@pytest.mark.timeout(400)
def test_node_death_under_load(tmp_path):
    root = tmp_path / "ckpt"
    testing.make_checkpoint(root / "big", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3, model=None)
    x = testing.sample_activations(256, d=16, m=4096, seed=3).numpy()
    grpc_port, direct_port = free_port(), free_port()
    targets = {"proxy": f"127.0.0.1:{grpc_port}", "direct": f"127.0.0.1:{direct_port}"}
    t0 = time.time()
    marks: dict[str, float] = {}
    # Serve's proxy prefers the replicas on its own node; with the one proxy on the head, that would
    # keep every proxied call off the worker node (a proxy per node spreads them the same way).
    with RayCluster(env={"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}) as cluster:
        cluster.start_head(num_cpus=1)
        marks["head up"] = time.time() - t0
        cluster.add_node("worker", num_cpus=1)
        marks["worker up"] = time.time() - t0
        cfg_file = tmp_path / "serve_config.yaml"
        cfg_file.write_text(yaml.safe_dump(serve_config(root, grpc_port, free_port(), direct_port)))
        cluster.serve_deploy(cfg_file)
        marks["serve deploy returned"] = time.time() - t0

        replicas: set[str] = set()

        def both_replicas() -> bool:
            try:
                with Client(targets["proxy"], timeout=5, retries=0) as c:
                    for _ in range(4):
                        replicas.add(c.stats().replica)
            except ProgsaeError:
                pass
            return len(replicas) == 2

        wait_for(both_replicas, 150, what="a codec replica on each node")
        marks["deployed"] = time.time() - t0
        worker_pids = {p.pid for p in cluster.processes("worker")}
        on_worker = [r for r in replicas if int(r.rsplit(":", 1)[1]) in worker_pids]
        assert len(on_worker) == 1, (replicas, "one replica must run on the worker node")

        direct_spread = collections.Counter()
        for _ in range(8):  # a fresh channel each: which replica a new connection to the replica port reaches
            with Client(targets["direct"], timeout=10) as c:
                direct_spread[c.stats().replica] += 1
        marks["direct port checked"] = time.time() - t0

        load = Load(targets, x)
        load.start()
        try:
            time.sleep(LOAD_BEFORE_S)
            with load.lock:
                before = sum(load.ok.values())
                load.kill_t = time.time()
            cluster.kill_node("worker")
            replica = psutil.Process(int(on_worker[0].rsplit(":", 1)[1]))
            end = time.time() + LOAD_AFTER_S
            while time.time() < end:
                if "replica exited" not in marks and not replica.is_running():
                    marks["replica exited"] = time.time() - load.kill_t
                time.sleep(0.05)
        finally:
            load.join()
        marks["load done"] = time.time() - t0
    marks["stopped"] = time.time() - t0
    print(f"\ncalls OK by the project's client: {dict(load.ok)} ({before} before the kill); "
          f"streams resumed after a lost replica: {load.resumed}; failures: {len(load.failures)}")
    print(f"replicas: {sorted(replicas)}, on the worker node: {on_worker[0]}; "
          f"8 new connections to the replica port reached {dict(direct_spread)}")
    print(f"raw channel statuses: {dict(load.raw)}")
    for (code, details), n in load.raw_details.items():
        print(f"  {n} x {code}: {details}")
    print("timeline (s): " + ", ".join(f"{k} {v:.2f}" for k, v in marks.items()) + " (replica exited: after the kill)")
    assert not load.failures, load.failures[:5]
    assert not [k for k in load.raw if "INTERNAL" in k or "UNKNOWN" in k], dict(load.raw_details)
    assert load.after_kill >= 20, "the service did not keep serving after the node died"
    hit = load.resumed + sum(n for k, n in load.raw.items() if "UNAVAILABLE" in k)
    assert hit, "no call was in flight on the dead node: the test proved nothing"
