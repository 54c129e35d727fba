"""Training throughput: tokens/s of TopK vs Matryoshka optimiser steps on synthetic data.

    .venv/bin/python bench/bench_train.py [--d-in 576 --d-sae 4096 --k 32 --batch 4096]
        [--steps 5 --repeats 5] [--variants topk,matryoshka,...] [--append BENCHMARKS.md]

Variants (all interleaved, medians over `repeats` timings of `steps` steps each, one process):
  topk            one top-k, full-reconstruction FVU, sparse encoder backward
  matryoshka      same top-k, incremental prefix losses over the ladder (one embedding_bag)
  matryoshka_naive  prefix losses by decoding every prefix from scratch (reference)
  topk_dense_bwd  plain-autograd encoder (dense [B, M] backward; reference)
  *_auxk          with 10% of the latents marked dead (AuxK with k_aux = d_in/2 active)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from progsae.trainer.training.losses import (
    Output,
    TrainableSAE,
    naive_prefix_sse,
    optimizer_step,
    total_variance,
)
from progsae.trainer.training.sparse_topk import topk_encode, topk_encode_dense


def synthetic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 8 out of 2048 random unit directions plus noise, norm ~ sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(2048, d, generator=g), dim=1)
    idx = torch.randint(0, 2048, (n, 8), generator=g)
    coef = torch.rand(n, 8, generator=g) * 2
    x = torch.nn.functional.embedding_bag(idx, dirs, per_sample_weights=coef, mode="sum")
    x = x + 0.1 * torch.randn(n, d, generator=g)
    return x * (d / x.square().sum(1).mean()).sqrt()


def naive_step(sae: TrainableSAE, opt: torch.optim.Optimizer, x: torch.Tensor, k: int,
               ladder: tuple[int, ...], weights: torch.Tensor, dead=None, k_aux: int = 0) -> Output:
    sel = topk_encode(x - sae.b_dec, sae.W_enc, sae.b_enc, k, dead, k_aux)
    loss = (weights * naive_prefix_sse(x, sae, sel, ladder) / total_variance(x)).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalise_decoder()
    return Output(loss, loss.detach()[None], loss.detach(), sel, loss.detach()[None])


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    ladder = tuple(args.granularities)
    data = synthetic(args.batch * 4, args.d_in)
    dead = torch.arange(0, args.d_sae, 10)
    k_aux = args.d_in // 2
    variants = {}
    for name in args.variants:
        base = name.removesuffix("_auxk")
        lad = (args.d_sae,) if base.startswith("topk") else ladder
        w = torch.full((len(lad),), 1 / len(lad))
        dd, ka = (dead, k_aux) if name.endswith("_auxk") else (None, 0)
        sae = TrainableSAE(args.d_in, args.d_sae, torch.Generator().manual_seed(0))
        opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
        if base == "matryoshka_naive":
            fn = lambda x, s=sae, o=opt, l=lad, w=w, dd=dd, ka=ka: naive_step(s, o, x, args.k, l, w, dd, ka)  # noqa: E731
        else:
            enc = topk_encode_dense if base == "topk_dense_bwd" else topk_encode
            fn = (lambda x, s=sae, o=opt, l=lad, w=w, dd=dd, ka=ka, e=enc:  # noqa: E731
                  optimizer_step(s, o, x, args.k, l, w, dd, ka, 1 / 32, e))
        variants[name] = fn
    times: dict[str, list[float]] = {n: [] for n in variants}
    for rep in range(args.repeats + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for s in range(args.steps):
                i = (rep * args.steps + s) % 4
                fn(data[i * args.batch:(i + 1) * args.batch])
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {n: args.steps * args.batch / statistics.median(t) for n, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--granularities", type=lambda s: [int(v) for v in s.split(",")],
                   default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", type=lambda s: s.split(","),
                   default=["topk", "matryoshka", "matryoshka_naive", "topk_dense_bwd", "topk_auxk", "matryoshka_auxk"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--append", type=Path, help="append a markdown section to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    base = res.get("topk")
    lines = [
        f"`{' '.join(['python', *sys.argv])}`",
        "",
        f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, ladder "
        f"{','.join(map(str, args.granularities))}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; median of {args.repeats} x {args.steps} steps",
        "",
        "| variant | tokens/s | wall time per token vs topk |",
        "|---|---:|---:|",
    ]
    for name, tps in res.items():
        ratio = f"{base / tps:.3f}" if base else "-"
        lines.append(f"| {name} | {tps:,.0f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
