"""The fast path at cluster scale: autoscaling, spread to new replicas, scale-down, lost calls.

Starts the app as `progsae serve CKPT --num-cpus 4 --replica-num-cpus 1 --no-text --autoscaling '{...}'`
would (launch.start, the same code), then runs C clients, each streaming T-token requests in a loop
for S seconds, all through one path (the replicas' own port, or Serve's proxy), then stops the load
and waits for the scale-down. After every stream a client asks GetServerStats on the same channel,
which names the replica that serves that channel.

    .venv/bin/python bench/bench_autoscale.py --path direct --clients 8 --tokens 256 --seconds 50
    .venv/bin/python bench/bench_autoscale.py --path proxy  --clients 8 --tokens 256 --seconds 50

Reports: replicas over time; when the codec reached 2 replicas (target: within 15 s of the load
starting); the share of calls the first new replica served within 20 s of becoming ready (target
>= 25%); how long after the load stopped it was back at min_replicas (target: downscale_delay_s +
20 s); calls ok / failed as the project's client saw them (target: 0 failed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 2,
               "downscale_delay_s": 10, "look_back_period_s": 2, "metrics_interval_s": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=["direct", "proxy"], default="direct")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=50)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--json", default="")
    a = p.parse_args()

    from ray import serve

    from progsae.clients import Client
    from progsae.server import launch
    from progsae.server.config import AppConfig
    from tests.support import synthetic as testing

    root = Path(tempfile.mkdtemp())
    testing.make_checkpoint(root / "ck", d=a.d_in, m=a.d_sae, k=32, architecture="matryoshka", orderings=False)
    cluster = launch.LocalCluster(grpc_port=testing.free_port(), http_port=testing.free_port(), num_cpus=4)
    cfg = AppConfig(checkpoint_root=str(root), text=False, replica_num_cpus=1, autoscaling=AUTOSCALING,
                    direct_grpc_port=testing.free_port(), graceful_shutdown_timeout_s=20)
    addrs = launch.start(cfg, cluster)
    target = addrs["direct" if a.path == "direct" else "grpc"]
    x = testing.sample_activations(a.tokens, d=a.d_in, m=a.d_sae).numpy()

    def replicas() -> int:
        return serve.status().applications[launch.APP_NAME].deployments["Codec"].replica_states.get("RUNNING", 0)

    stop = threading.Event()
    served: list[tuple[float, str]] = []
    ok, failed = [0], [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with Client(target, timeout=120) as c:
            while not stop.is_set():
                try:
                    list(c.stream(x, model="ck", payload="none"))
                    who = c.stats().replica
                    with lock:
                        ok[0] += 1
                        served.append((time.time(), who))
                except Exception as e:  # noqa: BLE001  (counted: the target is none)
                    with lock:
                        failed[0] += 1
                        errors.append(str(e)[:200])

    timeline: list[tuple[float, int]] = []
    t0 = time.time()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(a.clients)]
    for t in threads:
        t.start()
    first_new_ready = None
    while time.time() - t0 < a.seconds:
        n = replicas()
        if not timeline or timeline[-1][1] != n:
            timeline.append((round(time.time() - t0, 1), n))
        if n >= 2 and first_new_ready is None:
            first_new_ready = time.time()
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    t_stop = time.time()
    while replicas() > AUTOSCALING["min_replicas"] and time.time() - t_stop < 120:
        n = replicas()
        if timeline[-1][1] != n:
            timeline.append((round(time.time() - t0, 1), n))
        time.sleep(0.5)
    timeline.append((round(time.time() - t0, 1), replicas()))
    back_at_min = time.time() - t_stop
    launch.stop()

    original = {r for t, r in served if t - t0 < 5} or {served[0][1]}
    share = None
    if first_new_ready is not None:
        window = [r for t, r in served if first_new_ready <= t <= first_new_ready + 20]
        share = sum(r not in original for r in window) / max(1, len(window))
    out = {
        "path": a.path, "clients": a.clients, "tokens": a.tokens, "seconds": a.seconds,
        "replicas_over_time": timeline,
        "scaled_to_2_after_s": None if first_new_ready is None else round(first_new_ready - t0, 1),
        "new_replicas_share_first_20s": None if share is None else round(share, 3),
        "back_at_min_after_load_s": round(back_at_min, 1),
        "calls_ok": ok[0], "calls_failed": failed[0], "replicas_that_answered": len({r for _, r in served}),
        "errors": errors[:5],
    }
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
