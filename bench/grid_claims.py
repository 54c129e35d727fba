"""The paper's claims across a grid of dictionary sizes M and sparsities k, one seed per cell.

For each (M, k) cell, a Matryoshka checkpoint and a TopK one (ordered by mean_sq and freq, both
evaluated with `progsae eval --ordering all`) give: FVU at every G for the four variants,
claim 1 (Matryoshka vs E[a²]-sorted TopK, and sorted vs unsorted), claim 2 (E[a²] vs frequency),
claim 3 (power law of the sorted E[a²] scores over the head and over all ranks) and claim 4
(Matryoshka / TopK training time per token). One seed per cell: a difference is compared with
`--noise`, the seed sd of the same difference measured elsewhere (RESULTS "Seed spread"), and
called "within noise" when smaller than twice it.

    python bench/grid_claims.py --cell '16384,32=ckpt/smollm2-l15-600k-m16k-k32-{arch}' \
        --cell '16384,64=ckpt/smollm2-l15-600k-m16k-k64-{arch}' --noise 0.005
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from seed_spread import rungs, train_extra

from progsae.sae.metrics import fit_power_law

VARIANTS = (("Matryoshka", "matryoshka", "none"), ("TopK E[a²]", "topk", "mean_sq"),
            ("TopK freq", "topk", "freq"), ("TopK unsorted", "topk", "none"))
CLAIMS = (("1. Matryoshka − E[a²]-sorted TopK", "Matryoshka", "TopK E[a²]"),
          ("1'. E[a²]-sorted − unsorted TopK", "TopK E[a²]", "TopK unsorted"),
          ("2. E[a²] − freq sorting", "TopK E[a²]", "TopK freq"))
HEADS = (1000, 0)


HIGHER_IS_BETTER = {"rsa", "ce_recovered"}


def verdict(d: float, noise: float, higher: bool) -> str:
    return "within noise" if abs(d) <= 2 * noise else ("A better" if (d > 0) == higher else "B better")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", action="append", required=True, help="M,k=PATH with {arch}; repeatable")
    ap.add_argument("--metric", default="fvu", help="metric to compare: fvu, rsa (or kl, ce_recovered after --ce)")
    ap.add_argument("--noise", type=float, default=0.005, help="seed sd of a paired difference")
    a = ap.parse_args()
    for cell in a.cell:
        mk, _, pattern = cell.partition("=")
        paths = {arch: Path(pattern.format(arch=arch)) for arch in ("matryoshka", "topk")}
        data = {name: rungs(paths[arch], ordering) for name, arch, ordering in VARIANTS}
        gs = sorted(data["Matryoshka"])
        print(f"### M, k = {mk}\n")
        print(f"| {a.metric} | " + " | ".join(f"G={g}" for g in gs) + " |")
        print("|---|" + "---:|" * len(gs))
        for name, _, _ in VARIANTS:
            print(f"| {name} | " + " | ".join(f"{data[name][g][a.metric]:.4f}" for g in gs) + " |")
        higher = a.metric in HIGHER_IS_BETTER
        print(f"\n| claim (A − B, {a.metric}) | " + " | ".join(f"G={g}" for g in gs[:-1]) + " |")
        print("|---|" + "---:|" * (len(gs) - 1))
        for label, va, vb in CLAIMS:
            cells = []
            for g in gs[:-1]:
                d = data[va][g][a.metric] - data[vb][g][a.metric]
                cells.append(f"{d:+.4f} ({verdict(d, a.noise, higher)})")
            print(f"| {label} | " + " | ".join(cells) + " |")
        scores = np.asarray(json.loads((paths["topk"] / "metrics.json").read_text())["mean_sq"]["scores_sorted"])
        laws = [(h, fit_power_law(scores[:h] if h else scores)) for h in HEADS]
        ratio = train_extra(paths["matryoshka"])["wall_time_s"] / train_extra(paths["topk"])["wall_time_s"]
        print("\n- claim 3: " + "; ".join(f"{'top ' + str(h) if h else 'all'} ranks alpha {w.alpha:.3f}, "
                                           f"R² {w.r2:.3f}" for h, w in laws))
        print(f"- claim 4: Matryoshka / TopK training time per token {ratio:.3f} (sequential runs)\n")


if __name__ == "__main__":
    main()
