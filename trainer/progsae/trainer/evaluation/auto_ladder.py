"""`progsae order --ladder auto:R`: measure FVU(G) on the scoring activations, pick the auto ladder
(sae/ladders.py), compare it with the geometric one, and store it as the checkpoint's ladder.

The curve FVU(G) is measured on a dense grid of G (every multiple of G_1 / 16 from G_1 to M) over
the first `tokens` rows the outlier policy keeps, with the latents in the order the ladder is
for: the criterion just computed for a TopK SAE (mean_sq first), the trained order for Matryoshka.
Where that order is sorted by importance scores whose power-law fit has R^2 >= `r2_min`, the
ladder follows the fitted curve (ladders.power_law_curve); otherwise the measured one. G_1 is
the geometric ladder's first rung, M / 2^(R-1), so both ladders span the same costs.

Stored in cfg.json: progsae.granularities becomes the auto ladder (what `progsae serve` streams
by default, checkpoint.ladder); progsae.extra.ladder records how it was chosen, with the
granularities the checkpoint had before (for Matryoshka: its trained groups).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from progsae.sae import checkpoint
from progsae.sae.codec import SAE, default_ladder
from progsae.sae.ladders import area_under_steps, equal_share_ladder, power_law_curve
from progsae.sae.metrics import FVUAccumulator, fit_power_law
from progsae.trainer.data.activations import ActivationCache

R2_MIN = 0.95
"""Power-law fits with at least this R^2 choose the ladder; worse ones leave it to the measurement."""


def parse_auto(spec: str) -> int | None:
    """'auto:R' -> R; '' -> None; anything else a one-line ValueError."""
    if not spec:
        return None
    head, _, r = spec.partition(":")
    if head != "auto" or not r.isdigit() or int(r) < 2:
        raise ValueError(f"--ladder must be auto:R with R >= 2 rungs, got {spec!r}")
    return int(r)


class Curve(NamedTuple):
    grid: list[int]
    fvu: list[float]
    l0: list[float]
    """Mean active codes per token with index < G: the decode cost of rung G."""

    def at(self, ladder: tuple[int, ...]) -> tuple[list[float], list[float]]:
        """(costs, fvus) of the ladder's rungs (each on the grid)."""
        pos = {g: i for i, g in enumerate(self.grid)}
        return [self.l0[pos[g]] for g in ladder], [self.fvu[pos[g]] for g in ladder]


class LadderChoice(NamedTuple):
    ladder: tuple[int, ...]
    geometric: tuple[int, ...]
    source: str
    """"power_law" or "measured"."""
    ordering: str
    r2: float | None
    alpha: float | None
    area_auto: float
    """Mean FVU over a log-uniform decode budget in [cost(G_1), k] (ladders.area_under_steps)."""
    area_geometric: float
    curve: Curve

    def record(self, before: tuple[int, ...]) -> dict[str, Any]:
        return {"rule": f"auto:{len(self.ladder)}", "source": self.source, "ordering": self.ordering,
                "power_law_r2": self.r2, "power_law_alpha": self.alpha, "r2_min": R2_MIN,
                "area_auto": self.area_auto, "area_geometric": self.area_geometric,
                "geometric": list(self.geometric), "previous_granularities": list(before)}


def dense_grid(g_first: int, m: int) -> list[int]:
    step = max(1, g_first // 16)
    return sorted({*range(g_first, m + 1, step), m})


@torch.no_grad()
def measure_curve(sae: SAE, cache: ActivationCache, grid: list[int], tokens: int, batch_size: int = 4096) -> Curve:
    """FVU and mean L0 at every G of the grid over the first `tokens` rows of the cache."""
    accs = [FVUAccumulator() for _ in grid]
    l0 = np.zeros(len(grid))
    n = 0
    for x in cache.batches(batch_size):
        x = x[: tokens - n]
        for j, rung in enumerate(sae.progressive(sae.encode(x), grid)):
            assert rung.recon is not None  # progressive() yields reconstructions unless told not to
            accs[j].update(x, rung.recon)
            l0[j] += float(rung.l0.sum())
        n += x.shape[0]
        if n >= tokens:
            break
    return Curve(list(grid), [a.value() for a in accs], (l0 / max(n, 1)).tolist())


def choose(sae: SAE, cache: ActivationCache, rungs: int, ordering: str, sorted_scores: torch.Tensor | None,
           tokens: int = 16384, r2_min: float = R2_MIN) -> LadderChoice:
    """The auto ladder of `sae` (latents already in `ordering`); sorted_scores: the importance
    scores in that order when it is sorted by them (None: trained order, no power law)."""
    m = sae.d_sae
    geometric = default_ladder(m, rungs)
    if len(geometric) != rungs:
        raise ValueError(f"d_sae {m} is too small for {rungs} rungs")
    grid = dense_grid(geometric[0], m)
    curve = measure_curve(sae, cache, grid, tokens)
    r2 = alpha = None
    source = "measured"
    target = curve.fvu
    if sorted_scores is not None:
        try:
            law = fit_power_law(sorted_scores)
            r2, alpha = law.r2, law.alpha
        except ValueError:
            pass
        if r2 is not None and alpha is not None and r2 >= r2_min:
            source, target = "power_law", power_law_curve(grid, alpha).tolist()
    ladder = equal_share_ladder(grid, target, rungs, geometric[0])
    lo, hi = curve.at(geometric)[0][0], float(sae.k)
    if hi <= lo:
        hi = max(curve.l0)
    areas = [area_under_steps(*curve.at(lad), lo, hi) if hi > lo else float("nan") for lad in (ladder, geometric)]
    return LadderChoice(ladder, geometric, source, ordering, r2, alpha, areas[0], areas[1], curve)


def store(path: str | Path, choice: LadderChoice) -> None:
    """Make `choice.ladder` the checkpoint's ladder (cfg.json, atomically) and record its provenance."""
    path = Path(path)
    f = path / checkpoint.CFG
    cfg = json.loads(f.read_text())
    ours = cfg.get("progsae")
    if not isinstance(ours, dict):
        raise ValueError(f"{path}: not a progsae checkpoint; only those store a ladder")
    before = tuple(ours["granularities"])
    ours["granularities"] = list(choice.ladder)
    extra = ours.setdefault("extra", {})
    prev = extra.get("ladder", {}).get("previous_granularities")
    rec = choice.record(before)
    if prev is not None:  # keep the first recorded ladder (the trained groups), not an earlier auto one
        rec["previous_granularities"] = prev
    extra["ladder"] = rec
    checkpoint.atomic_write(f, json.dumps(cfg, indent=2))
    checkpoint.load_meta(path)  # the stored ladder validates


def format_choice(c: LadderChoice) -> str:
    fit = "no power law"
    if c.r2 is not None and c.alpha is not None:
        fit = f"power law alpha={c.alpha:.3f} R^2={c.r2:.3f}"
    costs, fv = c.curve.at(c.ladder)
    gcosts, gfv = c.curve.at(c.geometric)
    return "\n".join([
        f"auto ladder ({c.source}; {fit}; threshold R^2 >= {R2_MIN}; ordering {c.ordering}): {list(c.ladder)}",
        "  auto      " + "  ".join(f"G={g}: FVU {f:.4f} L0 {l:.2f}" for g, f, l in zip(c.ladder, fv, costs)),
        "  geometric " + "  ".join(f"G={g}: FVU {f:.4f} L0 {l:.2f}" for g, f, l in zip(c.geometric, gfv, gcosts)),
        f"  mean FVU over a log-uniform decode budget: auto {c.area_auto:.4f}, geometric {c.area_geometric:.4f}",
    ])


def for_checkpoint(path: str | Path, activations: str | Path, rungs: int, orderings: dict[str, Any],
                   policy: Any, tokens: int = 16384) -> LadderChoice:
    """The auto ladder of a checkpoint: Matryoshka in its trained order; TopK in the mean_sq order
    (power law allowed) when given, else the first ordering given (measured curve only)."""
    from progsae.sae import ordering as ordmod

    ck = checkpoint.load(path)
    cache = ActivationCache(activations, outliers=policy)
    if ck.meta.architecture == "matryoshka" or not orderings:
        return choose(ck.sae, cache, rungs, "none", None, tokens)
    name = "mean_sq" if "mean_sq" in orderings else next(iter(orderings))
    o = orderings[name]
    scores = o.sorted_scores() if name == "mean_sq" else None
    return choose(ordmod.apply(ck.sae, o), cache, rungs, name, scores, tokens)
