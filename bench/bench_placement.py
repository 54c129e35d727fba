"""Models placed, not copied everywhere: model loads and latency on the replicas' own port against
Serve's proxy, for a release-shaped mix of many checkpoints.

24 checkpoints whose weights total 3x one replica's byte budget (`model_memory_bytes`) are served by 3
codec replicas; C clients send Encode calls for models drawn from a Zipf(1.1) mix. The same seed gives
both paths the same sequence; each path runs on a fresh app (cold replicas). Loads are the replicas'
own count of checkpoints loaded (ServerStats.work["load"], every replica asked through the shared port).

    .venv/bin/python bench/bench_placement.py --calls 1000 --clients 6

Target: loads per 1,000 calls on the replica port <= 1.2x those of the proxy.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

D, M, K, MODELS, REPLICAS = 64, 4096, 16, 24, 3


def zipf_mix(n: int, calls: int, s: float, seed: int) -> list[int]:
    weights = [1 / (i + 1) ** s for i in range(n)]
    return random.Random(seed).choices(range(n), weights=weights, k=calls)


def run(path: str, root: Path, budget: int, mix: list[int], clients: int, tokens: int) -> dict:
    from progsae.clients import Client
    from progsae.server import launch
    from progsae.server.config import AppConfig
    from tests.support import synthetic as testing

    cluster = launch.LocalCluster(grpc_port=testing.free_port(), http_port=testing.free_port(), num_cpus=2)
    cfg = AppConfig(checkpoint_root=str(root), codec_replicas=REPLICAS, text=False, model_memory_bytes=budget,
                    direct_grpc_port=testing.free_port(), forward_direct_calls=True)
    addrs = launch.start(cfg, cluster)
    target = addrs["direct" if path == "direct" else "grpc"]
    x = testing.sample_activations(tokens, d=D, m=M).numpy()
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    todo = list(enumerate(mix))

    def client() -> None:
        with Client(target, timeout=120) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    _, i = todo.pop()
                t0 = time.perf_counter()
                try:
                    c.encode(x, model=f"m{i:02d}")
                except Exception:  # noqa: BLE001  (counted)
                    with lock:
                        failed[0] += 1
                    continue
                with lock:
                    latencies.append(1e3 * (time.perf_counter() - t0))

    t0 = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    seen: dict = {}
    deadline = time.time() + 60
    while len(seen) < REPLICAS and time.time() < deadline:  # fresh connections reach every replica
        with Client(addrs["direct"]) as c:
            st = c.stats()
            seen[st.replica] = st
    launch.stop()
    loads = sum(st.work["load"] for st in seen.values())
    lat = sorted(latencies)
    return {"path": path, "calls": len(mix), "failed": failed[0], "replicas_asked": len(seen),
            "loads": loads, "loads_per_1000": round(1000 * loads / len(mix), 1),
            "forwarded": sum(st.work["forward"] for st in seen.values()),
            "not_placed": sum(st.work["forward unrouted"] for st in seen.values()),
            "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2),
            "wall_s": round(wall, 1),
            "held_mib": {r: round(st.loaded_bytes / 2**20, 1) for r, st in seen.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    a = p.parse_args()

    from progsae.server import admission
    from tests.support import synthetic as testing

    root = Path(tempfile.mkdtemp())
    for i in range(MODELS):
        testing.make_checkpoint(root / f"m{i:02d}", d=D, m=M, k=K, orderings=False, seed=100 + i)
    total = MODELS * admission.weight_bytes(D, M)
    budget = total // 3  # the weights total 3x one replica's budget
    mix = zipf_mix(MODELS, a.calls, a.zipf, a.seed)
    results = [run(path, root, budget, mix, a.clients, a.tokens) for path in ("proxy", "direct")]
    ratio = results[1]["loads"] / max(1, results[0]["loads"])
    out = {"models": MODELS, "replicas": REPLICAS, "budget_mib": round(budget / 2**20, 1),
           "weights_total_mib": round(total / 2**20, 1), "zipf": a.zipf, "results": results,
           "direct_over_proxy_loads": round(ratio, 2)}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
