"""Seed spread of the paper's claims: mean ± sd over training seeds, and a verdict per claim.

Reads the metrics.json of `progsae eval`, the interp.json of `progsae interp` (when every
seed has one) and the cfg.json of `progsae train` for every seed of
a Matryoshka checkpoint and a TopK checkpoint (the TopK one ordered by mean_sq and freq) and
prints markdown: every metric at every G as mean ± sd over seeds, then each claim's paired
differences.

A difference between two variants at one G is **resolved** when it has the same sign in every
seed and |mean Δ| > 2 sd(Δ) over seeds (the seeds pair the two variants: same data order, same
held-out rows); otherwise it is "within seed noise". sd is the sample standard deviation (n-1).

    python bench/seed_spread.py --mat 'ckpt/smollm2-l15-600k-matryoshka-s{seed}' \
        --topk 'ckpt/smollm2-l15-600k-topk-s{seed}' --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import NamedTuple

import numpy as np

from progsae.sae.metrics import fit_power_law

METRICS = ("fvu", "ce_recovered", "rsa", "kl", "l0")
VARIANTS = (("Matryoshka", "mat", "none"), ("TopK mean_sq", "topk", "mean_sq"),
            ("TopK freq", "topk", "freq"), ("TopK unsorted", "topk", "none"))
CLAIMS = (("1. Matryoshka vs sorted TopK (mean_sq)", "Matryoshka", "TopK mean_sq"),
          ("1'. sorted TopK (mean_sq) vs unsorted", "TopK mean_sq", "TopK unsorted"),
          ("2. E[a²] (mean_sq) vs frequency sorting", "TopK mean_sq", "TopK freq"))
BETTER_HIGH = {"fvu": False, "ce_recovered": True, "rsa": True, "kl": False}
HEADS = (1000, 3000, 0)
"""Power-law fits over the top N ranks of the sorted E[a²] scores (0: all ranks)."""


class Spread(NamedTuple):
    mean: float
    sd: float

    def fmt(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def spread(xs: list[float]) -> Spread:
    return Spread(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def paired(diff: list[float], higher_is_better: bool, digits: int = 4) -> str:
    """A − B over seeds, with its verdict (the rule in the module docstring)."""
    s = spread(diff)
    same_sign = all(d > 0 for d in diff) or all(d < 0 for d in diff)
    resolved = same_sign and abs(s.mean) > 2 * s.sd
    verdict = (("A better" if (s.mean > 0) == higher_is_better else "B better") if resolved
               else "within seed noise")
    return f"{s.mean:+.{digits}f} ± {s.sd:.{digits}f} ({verdict})"


def rungs(ckpt: Path, ordering: str) -> dict[int, dict[str, float]]:
    m = json.loads((ckpt / "metrics.json").read_text())
    return {r["g"]: r for r in m[ordering]["rungs"]}


def train_extra(ckpt: Path) -> dict:
    return json.loads((ckpt / "cfg.json").read_text())["progsae"]["extra"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mat", required=True, help="Matryoshka checkpoint path with {seed}")
    ap.add_argument("--topk", required=True, help="TopK checkpoint path with {seed}")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    paths = {"mat": [Path(a.mat.format(seed=s)) for s in seeds], "topk": [Path(a.topk.format(seed=s)) for s in seeds]}
    data = {name: [rungs(p, ordering) for p in paths[which]] for name, which, ordering in VARIANTS}
    gs = sorted(data["Matryoshka"][0])
    print(f"Seeds {seeds}; mean ± sd over seeds.\n")
    for metric in METRICS:
        print(f"**{metric}**\n\n| variant | " + " | ".join(f"G={g}" for g in gs) + " |")
        print("|---|" + "---:|" * len(gs))
        for name, _, _ in VARIANTS:
            cells = []
            for g in gs:
                xs = [d[g].get(metric) for d in data[name]]
                cells.append("-" if any(x is None for x in xs) else spread([float(x) for x in xs]).fmt())
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
    print("**Claims: paired differences A − B over seeds** (resolved: same sign in every seed and "
          "|mean Δ| > 2 sd)\n")
    print("| claim | metric | " + " | ".join(f"G={g}" for g in gs) + " |")
    print("|---|---|" + "---:|" * len(gs))
    for label, va, vb in CLAIMS:
        for metric, high in BETTER_HIGH.items():
            cells = []
            for g in gs:
                xa = [d[g].get(metric) for d in data[va]]
                xb = [d[g].get(metric) for d in data[vb]]
                if any(x is None for x in xa + xb):
                    cells.append("-")
                    continue
                cells.append(paired([float(p) - float(q) for p, q in zip(xa, xb)], high))
            print(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    print("\n**Claim 3, power law of E[a²] (TopK, held-out scores) and claim 4, time per token**\n")
    scores = [json.loads((p / "metrics.json").read_text())["mean_sq"]["scores_sorted"] for p in paths["topk"]]
    for head in HEADS:
        laws = [fit_power_law(np.asarray(sc[:head] if head else sc)) for sc in scores]
        ranks = f"the top {head}" if head else "all"
        print(f"- power law over {ranks} ranks: alpha {spread([w.alpha for w in laws]).fmt(3)}, "
              f"R² {spread([w.r2 for w in laws]).fmt(3)}")
    ratio = [train_extra(pm)["wall_time_s"] / train_extra(pt)["wall_time_s"]
             for pm, pt in zip(paths["mat"], paths["topk"])]
    print(f"- Matryoshka / TopK time per token (side by side, one thread each): {spread(ratio).fmt(3)}")
    interp = {name: [_interp(p, ordering) for p in paths[which]] for name, which, ordering in VARIANTS}
    if all(all(v is not None for v in vs) for vs in interp.values()):
        print_interp(interp, seeds)


def _interp(ckpt: Path, ordering: str) -> dict | None:
    f = ckpt / "interp.json"
    return json.loads(f.read_text())["variants"].get(ordering) if f.is_file() else None


def print_interp(interp: dict[str, list], seeds: list[int]) -> None:
    """`progsae interp` per band (simulation, splitting) and per G (absorption), mean ± sd over seeds."""
    bands = [(b["g_lo"], b["g_hi"]) for b in interp["Matryoshka"][0]["bands"]]
    for key, what in (("simulation", "simulation correlation"), ("split_fraction", "prefix latents split"),
                      ("child_fraction", "band latents refining a prefix latent")):
        print(f"\n**{what}** (per band, mean ± sd over seeds {seeds})\n")
        print("| variant | " + " | ".join(f"{lo}<G≤{hi}" for lo, hi in bands) + " |")
        print("|---|" + "---:|" * len(bands))
        for name, runs in interp.items():
            cells = []
            for j in range(len(bands)):
                xs = [r["bands"][j][key] for r in runs]
                cells.append("–" if any(x is None for x in xs) else spread([float(x) for x in xs]).fmt(3))
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n**Claim 5, simulation: paired differences over seeds** (A − B; higher is more interpretable)\n")
    print("| A − B | " + " | ".join(f"{lo}<G≤{hi}" for lo, hi in bands) + " |")
    print("|---|" + "---:|" * len(bands))
    for va, vb in (("Matryoshka", "TopK mean_sq"), ("Matryoshka", "TopK unsorted")):
        cells = [paired([a["bands"][j]["simulation"] - b["bands"][j]["simulation"]
                         for a, b in zip(interp[va], interp[vb])], True, 3) for j in range(len(bands))]
        print(f"| {va} − {vb} | " + " | ".join(cells) + " |")
    inner_outer = [r["bands"][-1]["simulation"] - r["bands"][0]["simulation"] for r in interp["Matryoshka"]]
    print(f"\n- Matryoshka outermost − innermost band: {paired(inner_outer, True, 3)}")
    gs = [a["g"] for a in interp["Matryoshka"][0]["absorption"]]
    if gs:
        print(f"\n**first-letter full-absorption rate** (SAE truncated to G, mean ± sd over seeds {seeds})\n")
        print("| variant | " + " | ".join(f"G={g}" for g in gs) + " |")
        print("|---|" + "---:|" * len(gs))
        for name, runs in interp.items():
            cells = [spread([float(r["absorption"][j]["full_rate"]) for r in runs]).fmt(3) for j in range(len(gs))]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
