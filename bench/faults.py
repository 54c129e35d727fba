"""Fault injection: SIGKILL a codec replica process while clients load the service.

Starts `progsae serve` on synthetic checkpoints (as bench/load.py --spawn does), runs the load.py
client mix, kills a Ray Serve codec replica (`ray::ServeReplica:progsae:Codec`) with SIGKILL at
--kill-at seconds (and again every --every seconds, --kills times), and measures:

  * what the in-flight and following calls saw (failed calls by status after the client's retries
    on UNAVAILABLE; hung calls: none may outlive its deadline),
  * time to recover: from the kill to the first successful probe call (a 1-token Encode every 50 ms,
    no retries) and to a new replica process,
  * streams: complete or stopped for their own budget (as in load.py).

    .venv/bin/python bench/faults.py --clients 8 --duration 45 --kill-at 10 --kills 2 --every 15
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from load import REPLICA_TAG, replica_pids, run_load, spawn

from progsae.clients import Client, ProgsaeError


class Probe(threading.Thread):
    """A 1-token Encode every 50 ms without retries; records (t, ok, code)."""

    def __init__(self, target: str, t0: float):
        super().__init__(daemon=True)
        self.target, self.t0 = target, t0
        self.samples: list[tuple[float, bool, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        x = np.zeros((1, 64), np.float32)
        with Client(self.target, timeout=5, retries=0) as c:
            while not self.stop.is_set():
                t = time.time() - self.t0
                try:
                    c.encode(x, model="topk")
                    self.samples.append((t, True, "OK"))
                except ProgsaeError as e:
                    self.samples.append((t, False, e.code.name))
                time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=45.0)
    ap.add_argument("--kill-at", type=float, default=10.0, help="first kill, seconds into the load")
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--every", type=float, default=15.0, help="seconds between kills")
    ap.add_argument("--replicas", type=int, default=1, help="codec replicas (fixed)")
    ap.add_argument("--retries", type=int, default=5, help="client retries on UNAVAILABLE")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    autoscaling = json.dumps({"min_replicas": args.replicas, "max_replicas": args.replicas,
                              "initial_replicas": args.replicas})
    srv = spawn(autoscaling)
    pid = srv.proc.pid
    kills: list[dict] = []
    t0 = [0.0]
    probe: Probe | None = None

    def on_tick(t: float) -> None:
        nonlocal probe
        if probe is None:
            t0[0] = time.time() - t
            probe = Probe(srv.target, t0[0])
            probe.start()
        due = args.kill_at + len(kills) * args.every
        if len(kills) < args.kills and t >= due:
            pids = replica_pids(pid)
            if pids:
                victim = pids[0]
                os.kill(victim, signal.SIGKILL)
                kills.append({"t": round(t, 2), "pid": victim, "replicas_before": pids})

    try:
        r = run_load(srv.target, args.clients, args.duration, 10 ** 6, pid,
                     {"timeout": 30, "retries": args.retries, "backoff": 0.2}, on_tick=on_tick)
    finally:
        if probe is not None:
            probe.stop.set()
            probe.join(10)
        srv.stop()
    timeline = r["codec_replicas_timeline"]
    samples = probe.samples if probe else []
    for k in kills:
        after = [s for s in samples if s[0] >= k["t"]]
        fails = [s for s in after if not s[1]]
        first_fail = fails[0][0] if fails else None
        recovered = next((s[0] for s in after if s[1] and (first_fail is None or s[0] > first_fail)), None)
        k["probe_failures"] = {c: sum(1 for s in fails if s[2] == c and s[0] <= (recovered or 1e9))
                               for c in sorted({s[2] for s in fails})}
        k["recovered_after_s"] = round(recovered - k["t"], 2) if recovered is not None else None
        new = next((t for t, n in timeline if t >= k["t"] and n >= len(k["replicas_before"])
                    and t > k["t"] + 0.5), None)
        k["replica_back_after_s"] = round(new - k["t"], 1) if new is not None else None
    r["kills"] = kills
    r["replicas"] = args.replicas
    r["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"\n{args.replicas} codec replica(s), {args.clients} clients, {r['duration_s']} s, "
          f"{len(kills)} SIGKILL(s) of `{REPLICA_TAG}`")
    print(f"  load calls ok {r['calls_ok']}, failed after retries {r['calls_failed']} {r['failures']}, "
          f"hung {r['hung_clients']}")
    for m, p in r["per_method"].items():
        if p["calls"]:
            print(f"  {m:22s} {p['calls']:6d} calls  p50 {p['p50_ms']:8.1f} ms  p99 {p['p99_ms']:8.1f} ms  "
                  f"max {p['max_ms']:8.1f} ms")
    print(f"  stream stops {r['stream_stops']}, violations {len(r['stream_violations'])}")
    for k in kills:
        print(f"  kill at {k['t']} s (pid {k['pid']}): probe recovered after {k['recovered_after_s']} s, "
              f"probe failures before that {k['probe_failures']}, replica back after {k['replica_back_after_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    ok = r["hung_clients"] == 0 and all(k["recovered_after_s"] is not None for k in kills) and kills
    print("PASS (none hung, service recovered)" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
