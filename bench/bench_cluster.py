"""The fast path on a real two-node Ray cluster: autoscaling across nodes, spread, scale-down, admission.

A head (`ray start --head`, 1 CPU) and a worker (`ray start --address`, 2 CPUs) on this machine
(tests/support/ray_cluster.py), the app deployed with `serve deploy` from deploy/serve_config.yaml (its
autoscaling policy and replica-port settings as shipped; ports, the checkpoint root, `HeadOnly` proxies,
min 1 / max 3 codec replicas of 1 CPU and a 64 MiB `replica_memory_bytes` set here). C clients stream
through the replicas' own port for S seconds, then stop; then one oversized Encode.

    .venv/bin/python bench/bench_cluster.py --clients 8 --seconds 40

Reports replicas over time and the node of each, the share of calls the replicas added during the
load served, the time back to min_replicas, calls failed, and what the oversized Encode answered.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support

import argparse
import collections
import json
import tempfile
import threading
import time

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--json", default="")
    a = p.parse_args()

    import psutil

    from progsae.clients import Client, ProgsaeError
    from tests.support import synthetic
    from tests.support.ray_cluster import RayCluster, wait_for

    root = Path(tempfile.mkdtemp()) / "ckpt"
    synthetic.make_checkpoint(root / "big", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3, model=None)
    x = synthetic.sample_activations(256, d=16, m=4096, seed=3).numpy()
    grpc_port, direct_port = synthetic.free_port(), synthetic.free_port()
    direct = f"127.0.0.1:{direct_port}"
    cfg = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = {"host": "127.0.0.1", "port": synthetic.free_port()}
    cfg["grpc_options"]["port"] = grpc_port
    (app,) = cfg["applications"]
    app["args"].update(checkpoint_root=str(root), text=False, direct_grpc_port=direct_port,
                       direct_grpc_host="127.0.0.1", replica_memory_bytes=64 << 20)
    codec = next(d for d in app["deployments"] if d["name"] == "Codec")
    codec["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=3, target_ongoing_requests=2,
                                       upscale_delay_s=2, downscale_delay_s=10, look_back_period_s=2)
    app["deployments"] = [codec]
    out: dict = {}
    with RayCluster(env={"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}) as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_node("worker", num_cpus=2)
        cfg_file = Path(tempfile.mkdtemp()) / "serve_config.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        cluster.serve_deploy(cfg_file)

        def up() -> bool:
            try:
                with Client(direct, timeout=5, retries=0) as c:
                    return bool(c.stats().replica)
            except ProgsaeError:
                return False

        wait_for(up, 180, what="the codec's replica port")

        def node_of(replica: str) -> str:
            pid = int(replica.rsplit(":", 1)[1])
            worker = {q.pid for q in cluster.processes("worker")}
            return "worker" if pid in worker or any(a.pid in worker for a in psutil.Process(pid).parents()) else "head"

        stop = threading.Event()
        served: list[tuple[float, str]] = []
        ok, failed, errors = [0], [0], []
        lock = threading.Lock()

        def client() -> None:
            with Client(direct, timeout=120) as c:
                while not stop.is_set():
                    try:
                        list(c.stream(x, model="big", ladder=range(64, 4097, 64), payload="none"))
                        who = c.stats().replica
                        with lock:
                            ok[0] += 1
                            served.append((time.time(), who))
                    except Exception as e:  # noqa: BLE001  (counted: the target is none)
                        with lock:
                            failed[0] += 1
                            errors.append(str(e)[:200])

        t0 = time.time()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(a.clients)]
        for t in threads:
            t.start()
        seen_over_time = []
        nodes: dict[str, str] = {}
        while time.time() - t0 < a.seconds:
            time.sleep(2)
            with lock:
                recent = {r for t, r in served if t > time.time() - 4}
            seen_over_time.append((round(time.time() - t0, 1), len(recent)))
            for r in recent - set(nodes):
                try:
                    nodes[r] = node_of(r)
                except psutil.Error:
                    nodes[r] = "?"
        stop.set()
        for t in threads:
            t.join(timeout=120)
        t_stop = time.time()
        first = {r for t, r in served if t - t0 < 5} or {served[0][1]}
        later = [r for t, r in served if t - t0 > a.seconds / 2]
        replicas = sorted({r for _, r in served})

        def one_left() -> bool:
            seen = set()
            for _ in range(12):
                try:
                    with Client(direct, timeout=5, retries=2) as c:
                        seen.add(c.stats().replica)
                except ProgsaeError:
                    pass
            return len(seen) == 1

        wait_for(one_left, 120, every=2, what="back at one replica")
        back = time.time() - t_stop
        with Client(direct, timeout=60) as c:
            big = synthetic.sample_activations(8192, d=16, m=4096, seed=3).numpy()
            try:
                c.encode(big, model="big")
                admission = "OK (not refused)"
            except ProgsaeError as e:
                admission = f"{e.code.name}: {e.details}"
            after = c.stats().replica
        share = sum(r not in first for r in later) / max(1, len(later))
        out = {"clients": a.clients, "seconds": a.seconds, "replicas_seen": {r: nodes.get(r, "?") for r in replicas},
               "replicas_answering_over_time": seen_over_time,
               "share_of_second_half_on_added_replicas": round(share, 3),
               "calls_ok": ok[0], "calls_failed": failed[0], "errors": errors[:5],
               "back_at_one_replica_after_s": round(back, 1), "oversized_encode": admission,
               "replica_after_admission": after,
               "replicas_by_node": dict(collections.Counter(nodes.get(r, "?") for r in replicas))}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
