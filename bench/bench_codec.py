"""Codec benchmark (issue 2): encode vs bare matmul, stream vs one decode, sparse vs dense decode.

    .venv/bin/python bench/bench_codec.py [--d-in 576 --d-sae 16384 --k 32 --batch 4096 --repeats 7]

All variants run interleaved in one process (round-robin per repeat) so machine noise hits
them alike; we report medians and ratios of medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from progsae.sae.codec import SAE


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rungs", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, m, k, n = args.d_in, args.d_sae, args.k, args.batch
    W_dec = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    sae = SAE(W_enc=W_dec.T.contiguous(), W_dec=W_dec, b_enc=torch.zeros(m), b_dec=torch.randn(d) * 0.1, k=k, scale=1.3)
    sae = sae.fold_scale()  # as loaded from a checkpoint: c folded into the weights
    x = torch.randn(n, d)
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
