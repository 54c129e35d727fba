"""TopK recipes side by side: held-out FVU at every G, sorted and unsorted, mean ± sd over seeds.

Reads the metrics.json of `progsae eval --ordering all` (orderings from `progsae order` on the
training cache) and the cfg.json of each checkpoint; prints markdown with, per recipe, FVU at
each G in E[a²] (mean_sq), frequency and trained order, and each recipe's paired difference
from the base recipe (same seed: same initial weights, data order and held-out rows), judged as
bench/seed_spread.py judges claims. A recipe with fewer finished seeds is paired on those.

    python bench/topk_recipe.py --base 'ckpt/smollm2-l15-600k-topk-s{seed}' \
        --recipe 'free=ckpt/smollm2-l15-600k-topk-free-s{seed}' --seeds 0,1,2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from seed_spread import paired, rungs, spread, train_extra

ORDERINGS = (("mean_sq", "E[a²]-sorted"), ("freq", "freq-sorted"), ("none", "trained order"))


def finished(pattern: str, seeds: list[int]) -> dict[int, Path]:
    paths = {s: Path(pattern.format(seed=s)) for s in seeds}
    return {s: p for s, p in paths.items() if (p / "metrics.json").is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base recipe's checkpoint path with {seed}")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=PATH with {seed}; repeatable")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = {"base": finished(a.base, seeds)}
    for item in a.recipe:
        name, _, pattern = item.partition("=")
        recipes[name] = finished(pattern, seeds)
    recipes = {n: r for n, r in recipes.items() if r}
    gs = sorted(rungs(next(iter(recipes["base"].values())), "none"))
    for ordering, title in ORDERINGS:
        print(f"**FVU, {title}** (mean ± sd over the seeds finished, n)\n")
        print("| recipe | n | " + " | ".join(f"G={g}" for g in gs) + " |")
        print("|---|---:|" + "---:|" * len(gs))
        for name, runs in recipes.items():
            data = [rungs(p, ordering) for p in runs.values()]
            cells = [spread([d[g]["fvu"] for d in data]).fmt() for g in gs]
            print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        print()
    print("**Paired difference from base, FVU (recipe − base; negative: the recipe reconstructs better)**\n")
    print("| recipe | order | n | " + " | ".join(f"G={g}" for g in gs) + " |")
    print("|---|---|---:|" + "---:|" * len(gs))
    for name, runs in recipes.items():
        if name == "base":
            continue
        common = [s for s in runs if s in recipes["base"]]
        for ordering, title in ORDERINGS[:1] + ORDERINGS[2:]:
            cells = []
            for g in gs:
                diff = [rungs(runs[s], ordering)[g]["fvu"] - rungs(recipes["base"][s], ordering)[g]["fvu"]
                        for s in common]
                cells.append(paired(diff, higher_is_better=False) if len(diff) > 1 else f"{diff[0]:+.4f} (1 seed)")
            print(f"| {name} | {title} | {len(common)} | " + " | ".join(cells) + " |")
    print("\n**Training**\n")
    print("| recipe | final dead fraction | tokens/s |")
    print("|---|---:|---:|")
    for name, runs in recipes.items():
        ex = [train_extra(p) for p in runs.values()]
        dead = [e["final_dead_fraction"] for e in ex if "final_dead_fraction" in e]
        dead_cell = spread(dead).fmt(4) if dead else "–"
        tps = spread([e["tokens_per_s"] for e in ex]).fmt(0)
        print(f"| {name} | {dead_cell} | {tps} |")


if __name__ == "__main__":
    main()
