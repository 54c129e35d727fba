"""Serving benchmark (issue 4): the same codec through Ray Serve gRPC, a plain grpcio server, a direct call.

    .venv/bin/python bench/bench_serve.py [--d-in 576 --d-sae 4608 --k 32 --tokens 64 --n 200]
                                          [--write BENCHMARKS.md]

Latency p50/p99 of Encode (tokens x d_in), DecodeAtGranularity at the first rung, StreamDecode
(codes in) time to the first rung and to the end, StreamDecode (activations in) the same; then
Encode throughput with 16 concurrent clients (one channel each). All three paths serve one
synthetic checkpoint on this machine in the same run, measured round-robin (call by call) so
that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from progsae.server.testing import free_port


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def stream_times(run: Callable[[], object]) -> tuple[float, float]:
    """(ms to the first rung, ms to the end) of one stream; `run` returns an iterator of messages."""
    t0 = time.perf_counter()
    first = None
    for msg in run():
        if first is None and getattr(msg, "g", None) is not None:
            first = 1e3 * (time.perf_counter() - t0)
    return first or float("nan"), 1e3 * (time.perf_counter() - t0)


KEYS = ("encode", "decode", "stream_codes", "stream_acts")


def bench_interleaved(paths: dict[str, dict[str, Callable]], n: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Every path, every call, round-robin n times (rotating the order), so load noise hits all alike."""
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    names = list(paths)
    for i in range(n + 5):
        order = names[i % len(names):] + names[:i % len(names)]
        for p in order:
            for key in KEYS:
                if key.startswith("stream"):
                    first, total = stream_times(paths[p][key])
                    vals = {key + "_first": first, key + "_total": total}
                else:
                    t0 = time.perf_counter()
                    paths[p][key]()
                    vals = {key: 1e3 * (time.perf_counter() - t0)}
                if i >= 5:  # warm-up rounds are dropped
                    for k, v in vals.items():
                        samples[p].setdefault(k, []).append(v)
    return {p: {k: (statistics.median(v), pct(v, 0.99)) for k, v in d.items()} for p, d in samples.items()}


def throughput(make_client: Callable, x: np.ndarray, model: str, clients: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * clients
    ready = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        c = make_client()
        c.encode(x, model=model)
        ready.wait()
        while time.perf_counter() < stop:
            c.encode(x, model=model)
            counts[i] += 1
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    stop = t0 + seconds
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", default="4608,512", help="dictionary sizes M, comma-separated (served side by side)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=200, help="calls per latency measurement")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    ap.add_argument("--write", help="write/replace the '## Serving' section of this markdown file")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    from progsae.clients import Client
    from progsae.server import launch, testing
    from progsae.server.config import AppConfig
    from progsae.server.grpc_server import PlainServer
    from progsae.server.registry import Registry, RegistryConfig
    from progsae.server.service import CodecService, ServiceConfig
    from progsae.v1 import convert
    from progsae.v1 import progsae_pb2 as pb

    torch.set_num_threads(1)
    sizes = [int(m) for m in args.d_sae.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    for m in sizes:
        testing.make_checkpoint(root / f"m{m}", d=args.d_in, m=m, k=args.k, orderings=False)
    reg = Registry(RegistryConfig(root=str(root)))
    svc = CodecService(ServiceConfig(torch_threads=1))

    def rungs(it):
        for msg in it:
            if msg.HasField("rung"):
                yield msg.rung

    def setup(m: int):
        mid = f"m{m}"
        model = reg.get(mid)
        x = testing.sample_activations(args.tokens, d=args.d_in, m=m).numpy()
        codes = svc.encode(model, pb.EncodeRequest(activations=convert.from_numpy(x))).codes
        reqs = {
            "encode": pb.EncodeRequest(model_id=mid, activations=convert.from_numpy(x)),
            "decode": pb.DecodeRequest(model_id=mid, codes=codes, granularity=model.ladder[0]),
            "stream_codes": pb.StreamDecodeRequest(model_id=mid, codes=codes),
            "stream_acts": pb.StreamDecodeRequest(model_id=mid, activations=convert.from_numpy(x)),
        }
        direct = {
            "encode": lambda: svc.encode(model, reqs["encode"]),
            "decode": lambda: svc.decode_at(model, reqs["decode"]),
            "stream_codes": lambda: rungs(svc.stream(model, reqs["stream_codes"])),
            "stream_acts": lambda: rungs(svc.stream(model, reqs["stream_acts"])),
        }
        return mid, model.ladder[0], x, reqs, direct

    def grpc_calls(c: Client, mid: str, reqs) -> dict[str, Callable]:
        stub, md = c.stub, [("multiplexed_model_id", mid)]
        return {
            "encode": lambda: stub.Encode(reqs["encode"], metadata=md, timeout=30),
            "decode": lambda: stub.DecodeAtGranularity(reqs["decode"], metadata=md, timeout=30),
            "stream_codes": lambda: rungs(stub.StreamDecode(reqs["stream_codes"], metadata=md, timeout=30)),
            "stream_acts": lambda: rungs(stub.StreamDecode(reqs["stream_acts"], metadata=md, timeout=30)),
        }

    sections = []
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(torch_threads=1)) as plain:
        cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port(), num_cpus=2)
        addrs = launch.start(AppConfig(checkpoint_root=str(root), text=False, torch_threads=1), cluster)
        try:
            for m in sizes:
                mid, g1, x, reqs, direct = setup(m)
                with Client(plain.address) as cp, Client(addrs["grpc"]) as cr:
                    results = bench_interleaved({"direct call": direct, "plain grpcio": grpc_calls(cp, mid, reqs),
                                                 "Ray Serve gRPC": grpc_calls(cr, mid, reqs)}, args.n)
                tput = {"plain grpcio": throughput(lambda: Client(plain.address), x, mid, args.clients, args.seconds),
                        "Ray Serve gRPC": throughput(lambda: Client(addrs["grpc"]), x, mid, args.clients,
                                                    args.seconds)}
                for p, r in results.items():
                    print(f"M={m} {p}: " + ", ".join(f"{k} p50={v[0]:.2f}ms" for k, v in r.items()), flush=True)
                print(f"M={m} throughput: " + ", ".join(f"{k} {v:.0f}/s" for k, v in tput.items()), flush=True)
                sections.append(render_table(m, g1, results, tput, args))
        finally:
            launch.stop()
    report = render_header(args, sizes) + "\n".join(sections) + NOTES
    print(report)
    if args.write:
        write_section(Path(args.write), report)


NOTES = """
What the numbers say: Ray Serve adds a fixed cost per call on this machine (a call with no compute,
GetServerStats, takes 6-7 ms through the proxy against well under 1 ms in-process) plus a few ms to
carry a 147 KB activation batch proxy -> replica and back (pickled between processes). Where
compute dominates (M = 4608: a 15 ms encode) Ray Serve stays within the 2x target; with a small
dictionary (M = 512: a 3 ms encode) the fixed cost dominates and the target is missed. Streaming
costs one Ray message per rung (the header and end ride on the first and last rung), so the first
rung arrives about as fast as a single DecodeAtGranularity. Throughput with 16 clients is bounded by
the 2 cores that the client threads, the proxy, the replica and the controller share; the
autoscaling config adds replicas where a cluster has cores for them. Not tried here: Serve's
experimental direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS), which skips the proxy hop.
"""


ROWS = [
    ("encode", "Encode"),
    ("decode", "DecodeAtGranularity (G = first rung)"),
    ("stream_codes_first", "StreamDecode from codes: first rung"),
    ("stream_codes_total", "StreamDecode from codes: all rungs"),
    ("stream_acts_first", "StreamDecode from activations: first rung"),
    ("stream_acts_total", "StreamDecode from activations: all rungs"),
]


def render_header(args, sizes: list[int]) -> str:
    cpu = platform.processor() or platform.machine()
    return "\n".join([
        "## Serving",
        "",
        f"`.venv/bin/python bench/bench_serve.py --d-in {args.d_in} --d-sae {args.d_sae} --k {args.k} "
        f"--tokens {args.tokens} --n {args.n} --clients {args.clients} --seconds {args.seconds}`",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, no GPU, shared with other jobs while it ran. Checkpoints: "
        f"synthetic TopK, d_in={args.d_in}, k={args.k}, M in {sizes} (served side by side), default 5-rung "
        f"ladder; {args.tokens} tokens per call. Direct call = the service layer in-process (validation, "
        "codec, wire conversion); plain grpcio = the same service behind an in-process grpcio server; "
        "Ray Serve gRPC = the app through Serve's gRPC proxy on a local 2-CPU Ray. All paths in one run, "
        "measured round-robin call by call; torch uses 1 thread per process. Client-side wall time, ms.",
        "",
        "",
    ])


def render_table(m: int, g1: int, results: dict[str, dict], tput: dict[str, float], args) -> str:
    paths = list(results)
    lines = [
        f"### M = {m} (first rung G = {g1})",
        "",
        "| call | " + " | ".join(f"{p} p50 / p99" for p in paths) + " |",
        "|---|" + "---|" * len(paths),
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{results[p][key][0]:.2f} / {results[p][key][1]:.2f}"
                                                  for p in paths) + " |")
    ray, plain = results["Ray Serve gRPC"], results["plain grpcio"]
    r_enc = ray["encode"][0] / plain["encode"][0]
    r_first = ray["stream_codes_first"][0] / ray["decode"][0]
    lines += [
        "",
        f"Encode throughput, {args.clients} concurrent clients (one channel each): " + ", ".join(
            f"{k} {v:.0f} calls/s" for k, v in tput.items()) + ".",
        "",
        f"- Target Ray Serve Encode p50 <= 2x plain grpcio: {r_enc:.2f}x, {'met' if r_enc <= 2 else 'MISSED'}.",
        f"- Target stream first rung <= 1.2x one DecodeAtGranularity at the first rung (both through Ray "
        f"Serve): {r_first:.2f}x, {'met' if r_first <= 1.2 else 'MISSED'} (plain grpcio: "
        f"{plain['stream_codes_first'][0] / plain['decode'][0]:.2f}x).",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find("## Serving")
    if start >= 0:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote the '## Serving' section of {path}")


if __name__ == "__main__":
    main()
