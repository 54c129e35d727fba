"""Load test: N concurrent clients mixing Encode, DecodeAtGranularity and StreamDecode with random budgets.

Bounded in time (--duration) and count (--max-calls), loopback only. Either drives a running server
(--target host:port) or, with --spawn, writes small synthetic checkpoints (core checkpoint.save via
tests.support.synthetic), starts `progsae serve` on them on free loopback ports, and stops it afterwards.

Reports: failed calls by status (must be zero), per-method p50/p99 latency, whether every stream ended
complete or stopped for a budget its own request set, the RSS of every server process (Ray's replicas,
proxy, controller, raylet, GCS ...) at start and end, and the codec replica count over time (autoscaling).

    .venv/bin/python bench/load.py --spawn --clients 32 --duration 60 \
        --autoscaling '{"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8, \
                        "upscale_delay_s": 2, "downscale_delay_s": 5, "look_back_period_s": 2}'
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from progsae.clients import Client, ProgsaeError
from tests.support.synthetic import free_port

REPO = Path(__file__).resolve().parents[1]
REPLICA_TAG = "ServeReplica:progsae:Codec"
D, M = 64, 2048


# --- server ------------------------------------------------------------------------------------------------


def make_checkpoints(root: Path) -> list[Path]:
    from tests.support import synthetic as testing

    return [testing.make_checkpoint(root / "topk", d=D, m=M, k=16, model=None),
            testing.make_checkpoint(root / "mat", d=D, m=M, k=16, architecture="matryoshka", orderings=False,
                                    model=None, seed=1)]


@dataclass
class Spawned:
    proc: subprocess.Popen
    target: str
    root: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # `progsae serve` stops Serve and Ray cleanly on SIGINT
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def spawn(autoscaling: str | None, extra_env: dict[str, str] | None = None, timeout_s: float = 180,
          attempts: int = 3) -> Spawned:
    """Start `progsae serve` on fresh synthetic checkpoints (retrying when a picked port got taken)."""
    root = Path(tempfile.mkdtemp(prefix="progsae-load-"))
    ckpts = make_checkpoints(root / "ckpt")
    for attempt in range(attempts):
        try:
            return _spawn(root, ckpts, autoscaling, extra_env, timeout_s)
        except RuntimeError as e:
            if attempt == attempts - 1:
                raise SystemExit(str(e)) from None
            print(f"{e}; retrying with other ports", flush=True)
    raise AssertionError("unreachable")


def _spawn(root: Path, ckpts: list[Path], autoscaling: str | None, extra_env: dict[str, str] | None,
           timeout_s: float) -> Spawned:
    port, http = free_port(), free_port()
    cmd = [str(REPO / ".venv" / "bin" / "progsae"), "serve", *map(str, ckpts), "--grpc-port", str(port),
           "--http-port", str(http), "--host", "127.0.0.1", "--no-text", "--num-cpus", "2"]
    if autoscaling:
        cmd += ["--autoscaling", autoscaling]
    log = root / "serve.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    target = f"127.0.0.1:{port}"
    end = time.time() + timeout_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"progsae serve exited with {proc.returncode}; see {log}")
        try:
            with Client(target, timeout=5, retries=0) as c:
                if len(c.models()) >= 2:
                    return Spawned(proc, target, root, log)
        except ProgsaeError:
            pass
        time.sleep(1)
    Spawned(proc, target, root, log).stop()
    raise SystemExit(f"progsae serve not ready after {timeout_s}s; see {log}")


# --- processes -----------------------------------------------------------------------------------------------


def server_processes(root_pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(root_pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    head = cmd[0] if cmd else p.name()
    if head.startswith("ray::"):
        return head.split()[0].split(".")[0]
    scripts = [Path(a).name for a in cmd[1:4] if a.endswith(".py")]
    if scripts:
        return f"python {scripts[0]}"
    if "progsae" in " ".join(cmd[:3]):
        return "progsae serve"
    return Path(head).name


def rss_table(root_pid: int | None) -> dict[int, tuple[str, float]]:
    """pid -> (label, RSS MiB) for the server's processes and this client process."""
    procs = server_processes(root_pid) if root_pid else []
    procs.append(psutil.Process())
    out = {}
    for p in procs:
        try:
            out[p.pid] = (label(p) if p.pid != os.getpid() else "load clients (this process)",
                          p.memory_info().rss / 2 ** 20)
        except psutil.NoSuchProcess:
            pass
    return out


def replica_pids(root_pid: int) -> list[int]:
    return [p.pid for p in server_processes(root_pid) if REPLICA_TAG in label(p)]


# --- workload ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: Counter = field(default_factory=Counter)
    stops: Counter = field(default_factory=Counter)
    stream_violations: list[str] = field(default_factory=list)
    retried_ok: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, method: str, seconds: float) -> None:
        with self.lock:
            self.latency[method].append(seconds)

    def fail(self, method: str, code: str, detail: str) -> None:
        with self.lock:
            self.failures[f"{method}:{code}"] += 1
            if len(self.stream_violations) < 20 and code != "DEADLINE_EXCEEDED":
                self.stream_violations.append(f"{method} failed {code}: {detail[:120]}")


def check_stop(res, max_g, deadline_ms, target) -> str | None:
    """None when the stream ended complete or for a budget its own request set."""
    r = res.stop_reason
    if r == "ladder_done":
        return None if res.rungs > 0 and res.final_g == M else f"ladder_done at G={res.final_g}"
    if r == "max_granularity":
        return None if max_g is not None and res.final_g == max_g else f"max_granularity {res.final_g} vs {max_g}"
    if r == "deadline":
        return None if deadline_ms is not None else "deadline without a budget deadline"
    if r == "target_fvu":
        ok = target is not None and res.final_fvu is not None and res.final_fvu <= target + 1e-9
        return None if ok else f"target_fvu {res.final_fvu} vs {target}"
    return f"unknown stop reason {r!r}"


def worker(i: int, target: str, stop_at: float, budget: list[int], tally: Tally, pools, xs,
           client_kwargs: dict) -> None:
    rng = random.Random(1000 + i)
    models = ["topk", "mat"]
    with Client(target, **client_kwargs) as c:
        while time.time() < stop_at:
            with tally.lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            method = rng.choice(["Encode", "DecodeAtGranularity", "StreamDecode"])
            model = rng.choice(models)
            t0 = time.perf_counter()
            try:
                if method == "Encode":
                    n = rng.randint(1, 128)
                    x = xs[model][rng.randrange(len(xs[model]) - n):][:n]
                    prefix = rng.randint(1, M) if rng.random() < 0.2 else None
                    enc = c.encode(x, model=model, prefix_g=prefix)
                    assert enc.codes.tokens == n
                elif method == "DecodeAtGranularity":
                    enc = rng.choice(pools[model])
                    g = rng.randint(1, M)
                    dec = c.decode_at(enc, g=g, model=model)
                    assert dec.reconstruction.shape == (enc.codes.tokens, D)
                else:
                    use_codes = rng.random() < 0.3
                    n = rng.randint(2, 128)
                    inputs = rng.choice(pools[model]).codes if use_codes else xs[model][:n]
                    max_g = rng.randint(1, M) if rng.random() < 0.5 else None
                    deadline = rng.randint(1, 20) if rng.random() < 0.3 else None
                    target_fvu = rng.uniform(0.05, 0.9) if (not use_codes and rng.random() < 0.3) else None
                    payload = rng.choice(["reconstruction", "delta", "none"])
                    s = c.stream(inputs, model=model, max_g=max_g, deadline_ms=deadline, target_fvu=target_fvu,
                                 payload=payload)
                    for _ in s:
                        pass
                    bad = check_stop(s.result, max_g, deadline, target_fvu)
                    with tally.lock:
                        tally.stops[s.result.stop_reason] += 1
                        if bad:
                            tally.stream_violations.append(bad)
                tally.ok(method, time.perf_counter() - t0)
            except ProgsaeError as e:
                tally.fail(method, e.code.name, e.details)


def percentiles(v: list[float]) -> dict[str, float]:
    a = np.asarray(v) * 1e3
    return {"calls": len(v), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())} if len(v) else {"calls": 0}


def prepare(target: str, client_kwargs: dict):
    rng = np.random.default_rng(0)
    from tests.support import synthetic as testing

    xs = {"topk": testing.sample_activations(4096, d=D, m=M, seed=0).numpy(),
          "mat": testing.sample_activations(4096, d=D, m=M, seed=1).numpy()}
    pools = {}
    with Client(target, **client_kwargs) as c:
        for model, x in xs.items():
            pools[model] = [c.encode(x[o:o + int(n)], model=model)
                            for o, n in zip(rng.integers(0, 3900, 8), rng.integers(1, 128, 8))]
    return pools, xs


def run_load(target: str, clients: int, duration: float, max_calls: int, root_pid: int | None,
             client_kwargs: dict, monitor_s: float = 0.0, on_tick=None) -> dict:
    pools, xs = prepare(target, client_kwargs)
    tally = Tally()
    rss0 = rss_table(root_pid)
    timeline: list[tuple[float, int]] = []
    t_start = time.time()
    stop_at = t_start + duration
    budget = [max_calls]
    ts = [threading.Thread(target=worker, args=(i, target, stop_at, budget, tally, pools, xs, client_kwargs),
                           daemon=True) for i in range(clients)]
    for t in ts:
        t.start()
    end_monitor = stop_at + monitor_s
    samples: dict[int, list[tuple[float, float]]] = defaultdict(list)  # pid -> [(t, RSS MiB)] every ~5 s
    rss_load_end: dict[int, tuple[str, float]] = {}
    next_sample = 0.0
    while any(t.is_alive() for t in ts) or time.time() < end_monitor:
        now = time.time() - t_start
        if root_pid:
            timeline.append((round(now, 1), len(replica_pids(root_pid))))
        if now >= next_sample:
            for pid, (lab, mib) in rss_table(root_pid).items():
                samples[pid].append((round(now, 1), round(mib, 1)))
                rss0.setdefault(pid, (lab, mib))  # processes that appear later (new replicas)
            next_sample += 5.0
        if on_tick:
            on_tick(now)
        if not rss_load_end and not any(t.is_alive() for t in ts):
            rss_load_end = rss_table(root_pid)
        time.sleep(1.0)
        if time.time() > stop_at + 120 and any(t.is_alive() for t in ts):
            break  # a hung call: reported below
    hung = sum(t.is_alive() for t in ts)
    t_load = min(time.time(), stop_at) - t_start
    rss1 = rss_table(root_pid)
    rss_load_end = rss_load_end or rss1
    total = sum(len(v) for v in tally.latency.values())
    return {
        "clients": clients, "duration_s": round(t_load, 1), "calls_ok": total,
        "calls_failed": sum(tally.failures.values()), "failures": dict(tally.failures), "hung_clients": hung,
        "per_method": {m: percentiles(v) for m, v in sorted(tally.latency.items())},
        "stream_stops": dict(tally.stops), "stream_violations": tally.stream_violations[:20],
        "rss_mib": {str(pid): {"process": (rss1.get(pid) or rss_load_end.get(pid) or (lab,))[0],
                               "start": round(rss0[pid][1], 1) if pid in rss0 else None,
                               "at_10s": _at(samples.get(pid, []), 10.0),
                               "load_end": round(rss_load_end[pid][1], 1) if pid in rss_load_end else None,
                               "end": round(rss1[pid][1], 1) if pid in rss1 else None,
                               "max": max((m for _, m in samples.get(pid, [])), default=None)}
                    for pid, (lab, _) in sorted({**rss0, **rss1}.items())},
        "rss_samples": {str(pid): v for pid, v in samples.items()},
        "codec_replicas_timeline": timeline,
    }


def _at(samples: list[tuple[float, float]], t: float) -> float | None:
    """The first sample at or after t."""
    return next((m for ts, m in samples if ts >= t), None)


def show(r: dict) -> None:
    print(f"\n{r['clients']} clients, {r['duration_s']} s: {r['calls_ok']} calls ok, {r['calls_failed']} failed "
          f"{r['failures'] or ''}, hung clients: {r['hung_clients']}")
    for m, p in r["per_method"].items():
        if p["calls"]:
            print(f"  {m:22s} {p['calls']:6d} calls  p50 {p['p50_ms']:8.1f} ms  p99 {p['p99_ms']:8.1f} ms  "
                  f"max {p['max_ms']:8.1f} ms")
    print(f"  stream stops: {r['stream_stops']}; violations: {len(r['stream_violations'])} {r['stream_violations']}")
    print("  RSS MiB: start, at 10 s, end of load, end (after cooldown), max")
    for pid, v in r["rss_mib"].items():
        print(f"    {pid:>7s} {v['process'][:40]:40s} {v['start']!s:>7s} {v['at_10s']!s:>7s} {v['load_end']!s:>7s} "
              f"{v['end']!s:>7s} {v['max']!s:>7s}")
    tl = r["codec_replicas_timeline"]
    if tl:
        changes = [tl[0]] + [b for a, b in zip(tl, tl[1:]) if a[1] != b[1]]
        print(f"  codec replicas over time (t s, count), changes only: {changes}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="", help="host:port of a running server (loopback)")
    ap.add_argument("--server-pid", type=int, default=None, help="pid of that server, for RSS and replica counts")
    ap.add_argument("--spawn", action="store_true", help="start `progsae serve` on synthetic checkpoints")
    ap.add_argument("--autoscaling", default=None, help="codec autoscaling_config JSON (with --spawn)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (bounded)")
    ap.add_argument("--max-calls", type=int, default=200_000, help="bound on the number of calls")
    ap.add_argument("--cooldown", type=float, default=0.0, help="seconds to keep watching replicas after the load")
    ap.add_argument("--timeout", type=float, default=60.0, help="client deadline per call, seconds")
    ap.add_argument("--json", default="", help="write the result here")
    args = ap.parse_args(argv)
    if not args.spawn and not args.target:
        ap.error("give --target HOST:PORT or --spawn")
    if args.target and not args.target.startswith(("127.", "localhost")):
        ap.error("loopback targets only")
    spawned = spawn(args.autoscaling) if args.spawn else None
    target = spawned.target if spawned else args.target
    pid = spawned.proc.pid if spawned else args.server_pid
    try:
        r = run_load(target, args.clients, args.duration, args.max_calls, pid,
                     {"timeout": args.timeout, "retries": 3}, monitor_s=args.cooldown)
    finally:
        if spawned:
            spawned.stop()
    r["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    show(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    ok = r["calls_failed"] == 0 and not r["stream_violations"] and r["hung_clients"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
