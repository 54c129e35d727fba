"""Does a client's cancel reach the Ray Serve replica? Streams are cancelled one after another and the
replica's own counters (GetServerStats) say what it computed.

Starts the app on a local Ray instance (one codec replica, synthetic checkpoints), then for each trial:
start a stream, read `--read` rungs, cancel, wait until `rungs_computed` stops moving, and record what
the replica computed and whether it counted the stream cancelled. `--stock-proxy` registers the service
with the generated function instead of progsae.server.ray_proxy's (Ray's proxy as it ships).

    .venv/bin/python bench/cancel_relay.py --rungs fast --trials 10 --stock-proxy
    .venv/bin/python bench/cancel_relay.py --rungs slow --trials 5 --stock-proxy
    .venv/bin/python bench/cancel_relay.py --rungs fast --trials 10
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from progsae.clients import Client
from progsae.server import app as appmod
from progsae.server import launch
from progsae.server.config import AppConfig
from progsae.v1.convert import SparseArrays
from tests.support import synthetic as testing
from tests.support.synthetic import free_port

STOCK = "progsae.v1.progsae_pb2_grpc.add_ProgsaeServicer_to_server"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", choices=["fast", "slow"], default="fast",
                    help="fast: 512 tokens, d 16, 4096 rungs with reconstructions (~2 ms a rung, the replica runs "
                         "ahead of the client); slow: 8192 tokens, d 1024, 200 rungs, no payload (~60 ms a rung)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--read", type=int, default=2, help="rungs read before the cancel")
    ap.add_argument("--via", choices=["proxy", "direct"], default="proxy")
    ap.add_argument("--stock-proxy", action="store_true", help="register the service without progsae's proxy hook")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.stock_proxy:
        appmod.GRPC_SERVICER_FUNCTIONS[0] = STOCK
    root = Path(tempfile.mkdtemp(prefix="cancel-relay-"))
    if args.rungs == "fast":
        testing.make_checkpoint(root / "m", d=16, m=4096, k=8, ladder=(64, 4096), orderings=False, seed=3, model=None)
        inputs = testing.sample_activations(512, d=16, m=4096, seed=3).numpy()
        kw = {"ladder": range(1, 4097), "payload": "reconstruction"}
    else:
        d = m = 1024
        tokens, k = 8192, 8
        testing.make_checkpoint(root / "m", d=d, m=m, k=k, ladder=(64, m), orderings=False, seed=5, model=None)
        rng = np.random.default_rng(0)
        idx = (np.arange(k) * (m // k) + rng.integers(0, m // k, (tokens, k))).reshape(-1)
        inputs = SparseArrays(np.arange(0, tokens * k + 1, k, dtype=np.int64), idx.astype(np.int64),
                              rng.uniform(0.5, 2.0, tokens * k).astype(np.float32))
        kw = {"ladder": range(1, 201), "payload": "none"}
    cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port())
    addrs = launch.start(AppConfig(checkpoint_root=str(root), text=False, codec_replicas=1,
                                   graceful_shutdown_timeout_s=1, direct_grpc_port=free_port()), cluster)
    trials = []
    try:
        with Client(addrs["grpc" if args.via == "proxy" else "direct"], timeout=300) as c:
            list(c.stream(inputs, model="m", max_g=128, payload="none"))  # loaded, warm
            for i in range(args.trials):
                before = c.stats()
                s = c.stream(inputs, model="m", **kw)
                received = 0
                for _ in s:
                    received += 1
                    if received == args.read:
                        s.cancel()
                        break
                last = -1
                while True:
                    time.sleep(0.5)
                    now = c.stats()
                    if now.rungs_computed == last:
                        break
                    last = now.rungs_computed
                trial = {"received": received, "computed": now.rungs_computed - before.rungs_computed,
                         "counted_cancelled": now.streams_cancelled - before.streams_cancelled,
                         "counted_completed": now.streams_completed - before.streams_completed}
                trials.append(trial)
                print(i, trial, flush=True)
    finally:
        launch.stop()
    total = len(kw["ladder"])
    lost = sum(1 for t in trials if t["counted_cancelled"] == 0)
    print(f"{'stock' if args.stock_proxy else 'progsae'} proxy hook, {args.rungs} rungs via {args.via}: "
          f"{lost} of {len(trials)} cancels lost (computed: {[t['computed'] for t in trials]}, ladder {total})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "trials": trials}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
