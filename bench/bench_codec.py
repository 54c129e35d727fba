"""Codec benchmark (issue 2): encode vs bare matmul, stream vs one decode, sparse vs dense decode.

    .venv/bin/python bench/bench_codec.py [--d-in 576 --d-sae 16384 --k 32 --batch 4096 --repeats 7]

All variants run interleaved in one process (round-robin per repeat) so machine noise hits
them alike; we report medians and ratios of medians.

Real sizes, bounded memory (issue 11): encode only, chunked (the default chunk_bytes) vs
unchunked vs the bare matmul, then each case's peak RSS in a fresh subprocess:

    .venv/bin/python bench/bench_codec.py --encode-only --peak-rss --d-in 2304 --d-sae 65536 --batch 6000

(--repeats 0: peak RSS only.)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from progsae.sae.codec import ENCODE_CHUNK_BYTES, SAE

UNCHUNKED = 2**62  # chunk_bytes larger than any [N, M]: one chunk, the pre-chunking encode


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_sae(d: int, m: int, k: int, n: int) -> tuple[SAE, torch.Tensor]:
    """A random unit-norm SAE with its normalisation folded in, as every loaded checkpoint has,
    and N random tokens; built in place so setup holds little beyond the weights."""
    torch.manual_seed(0)
    W_dec = torch.randn(m, d)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    c = 1.3
    W_enc = W_dec.T.contiguous().mul_(c)
    W_dec /= c
    sae = SAE(W_enc=W_enc, W_dec=W_dec, b_enc=torch.zeros(m), b_dec=torch.randn(d) * 0.1 / c, k=k)
    return sae, torch.randn(n, d)


def encode_cases(chunk_mib: list[float]) -> dict[str, Callable[[SAE, torch.Tensor], object]]:
    cases: dict[str, Callable[[SAE, torch.Tensor], object]] = {
        "bare addmm (x @ W_enc + b)": lambda s, x: torch.addmm(s.b_enc, x, s.W_enc),
        f"encode, chunked ({ENCODE_CHUNK_BYTES / 2**20:g} MiB, default)": lambda s, x: s.encode(x),
        "encode, unchunked": lambda s, x: s.encode(x, chunk_bytes=UNCHUNKED),
    }
    for mib in chunk_mib:
        cases[f"encode, chunked ({mib:g} MiB)"] = lambda s, x, b=int(mib * 2**20): s.encode(x, chunk_bytes=b)
    return cases


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def rss_case(sae: SAE, x: torch.Tensor, cases: dict[str, Callable[[SAE, torch.Tensor], object]],
             name: str) -> None:
    """Run one case once after a warm-up on one token; print baseline and peak RSS (MiB).
    Linux: the peak (VmHWM) is reset after setup by writing 5 to /proc/self/clear_refs."""
    fn = cases[name]
    fn(sae, x[:1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    fn(sae, x)
    dt = time.perf_counter() - t0
    print(f"RSS {base:.0f} {_status_mib('VmHWM'):.0f} {dt:.3f}")


def encode_only(sae: SAE, x: torch.Tensor, args: argparse.Namespace) -> None:
    """--encode-only: time the encode cases (unless --repeats 0), then --peak-rss."""
    n = x.shape[0]
    if args.repeats > 0:
        time_encode(sae, x, args.repeats, args.chunk_mib)
    if args.peak_rss:
        peak_rss(sae, n, args.chunk_mib)


def time_encode(sae: SAE, x: torch.Tensor, repeats: int, chunk_mib: list[float]) -> None:
    n, m = x.shape[0], sae.d_sae
    cases = encode_cases(chunk_mib)
    for fn in cases.values():  # warm-up on a slice: the full call is the measured one
        fn(sae, x[:512])
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(lambda fn=fn: fn(sae, x)))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"shapes: d_in={sae.d_in} d_sae={m} k={sae.k} batch={n}; chunk rows "
          f"{max(1, ENCODE_CHUNK_BYTES // (m * 4))}; medians of {repeats}, interleaved\n")
    print("| operation | median s | min s | max s | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {min(times[name]):.2f} | {max(times[name]):.2f} | {n / t:,.0f} |")
    bare, chunked, whole = list(med.values())[:3]
    print(f"\nencode (chunked) throughput / bare addmm throughput: {bare / chunked:.3f}x")
    print(f"encode (unchunked) throughput / bare addmm throughput: {bare / whole:.3f}x")
    print(f"chunked encode time / unchunked encode time: {chunked / whole:.3f}x", flush=True)
    for name in list(med)[3:]:
        print(f"{name} time / unchunked encode time: {med[name] / whole:.3f}x", flush=True)


def peak_rss(sae: SAE, n: int, chunk_mib: list[float]) -> None:
    import subprocess
    import sys

    m = sae.d_sae
    print("\nPeak RSS, one fresh process per case (weights + tokens are the baseline):\n")
    print("| case | baseline MiB | peak MiB | extra MiB | [N, M] float32 MiB |")
    print("|---|---:|---:|---:|---:|")
    for name in encode_cases(chunk_mib):
        cmd = [sys.executable, __file__, "--rss-case", name, "--d-in", str(sae.d_in), "--d-sae", str(m),
               "--k", str(sae.k), "--batch", str(n), "--chunk-mib", *map(str, chunk_mib)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        base, peak, _ = (float(v) for v in next(ln for ln in out.splitlines() if ln.startswith("RSS ")).split()[1:])
        print(f"| {name} | {base:,.0f} | {peak:,.0f} | {peak - base:,.0f} | {n * m * 4 / 2**20:,.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rungs", type=int, default=6)
    ap.add_argument("--encode-only", action="store_true",
                    help="time only bare addmm, chunked encode and unchunked encode")
    ap.add_argument("--peak-rss", action="store_true",
                    help="then measure each encode case's peak RSS in its own subprocess")
    ap.add_argument("--chunk-mib", type=float, nargs="*", default=[],
                    help="extra chunk_bytes settings (MiB) for --peak-rss")
    ap.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: one case, print peak RSS
    args = ap.parse_args()
    d, m, k, n = args.d_in, args.d_sae, args.k, args.batch
    sae, x = make_sae(d, m, k, n)
    if args.rss_case is not None:
        return rss_case(sae, x, encode_cases(args.chunk_mib), args.rss_case)
    if args.encode_only:
        return encode_only(sae, x, args)
    ladder = [m >> i for i in reversed(range(args.rungs))]
    codes = sae.encode(x)
    mask_dense = torch.zeros(n, m)

    def bare_matmul() -> torch.Tensor:
        return torch.addmm(sae.b_enc, x, sae.W_enc)

    def stream_all() -> torch.Tensor:
        last = None
        for r in sae.progressive(codes, ladder):
            last = r.recon
        return last

    def stream_deltas() -> None:
        for _ in sae.progressive(codes, ladder, with_recon=False):
            pass

    def reencode_per_rung() -> None:
        # what separately trained SAEs cost: a fresh encode (of the prefix) + decode per rung
        for g in ladder:
            c = sae.prefix_encode(x, g)
            sae.decode(c, g)

    def dense_masked_decode() -> torch.Tensor:
        z = mask_dense.zero_().scatter_(1, codes.indices, codes.values)
        return (z @ sae.W_dec + sae.b_dec) / sae.scale

    variants: dict[str, Callable[[], object]] = {
        "bare addmm (x @ W_enc + b)": bare_matmul,
        "encode (full, top-k)": lambda: sae.encode(x),
        "sparse decode at M": lambda: sae.decode(codes),
        f"stream all {len(ladder)} rungs": stream_all,
        f"stream all {len(ladder)} rungs, deltas only": stream_deltas,
        "re-encode + decode per rung": reencode_per_rung,
        "dense masked decode": dense_masked_decode,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"shapes: d_in={d} d_sae={m} k={k} batch={n} ladder={ladder}; medians of {args.repeats}\n")
    print("| operation | median ms | tokens/s |")
    print("|---|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {1e3 * t:.2f} | {n / t:,.0f} |")
    enc = med["bare addmm (x @ W_enc + b)"] / med["encode (full, top-k)"]
    stream = med[f"stream all {len(ladder)} rungs"] / med["sparse decode at M"]
    delta = med[f"stream all {len(ladder)} rungs, deltas only"] / med["sparse decode at M"]
    reenc = med["re-encode + decode per rung"] / med[f"stream all {len(ladder)} rungs"]
    sparse = med["dense masked decode"] / med["sparse decode at M"]
    print()
    print("| ratio | measured | target |")
    print("|---|---:|---|")
    print(f"| encode throughput / bare addmm throughput | {enc:.3f}x | >= 0.85x |")
    print(f"| stream all rungs time / one sparse decode time | {stream:.3f}x | <= 1.15x |")
    print(f"| delta-only stream time / one sparse decode time | {delta:.3f}x | (<= 1.15x) |")
    print(f"| re-encode per rung time / stream time | {reenc:.1f}x | report |")
    print(f"| dense masked decode time / sparse decode time | {sparse:.1f}x | >= 10x |")


if __name__ == "__main__":
    main()
