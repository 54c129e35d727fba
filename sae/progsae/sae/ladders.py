"""Ladders from the data: pick R rungs that each buy an equal share of the FVU reduction.

Given a curve FVU(G) (measured on scoring activations, or predicted from a fitted importance
power law), the auto ladder G_1 < ... < G_R = M has G_1 given and

    FVU(G_j) <= FVU(G_1) - (j - 1) / (R - 1) * (FVU(G_1) - FVU(M)),

each G_j the smallest G of the curve's grid that reaches its level (so every rung adds about
the same 1 / (R - 1) of the reduction). A curve that is not monotone is replaced by its running
minimum first (a larger G never has to be worse than a smaller one to be chosen).

The power-law curve: with sorted importance scores s_i ~ C i^-alpha (E[(a_i ||W_dec[i]||)^2], the
variance latent i explains when the cross terms are ignored), the reduction from G_1 to G is
proportional to sum_{G_1 < i <= G} i^-alpha, so equal shares of FVU are equal shares of that sum.

To compare ladders: `area_under_steps`, the mean FVU a decode budget drawn log-uniformly from
[lo, hi] active codes buys, when a budget buys the largest rung it can afford.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def equal_share_ladder(grid: Sequence[int], fvu: Sequence[float], rungs: int, g_first: int) -> tuple[int, ...]:
    """R rungs from g_first to grid[-1] (= M), each adding an equal share of the FVU reduction.

    grid: increasing granularities containing g_first and ending at M; fvu: FVU at each. If the
    levels crowd together (a flat stretch), a rung moves to the next grid point, so the result
    is always strictly increasing with exactly `rungs` entries when the grid allows it."""
    g = np.asarray(grid, dtype=np.int64)
    f = np.minimum.accumulate(np.asarray(fvu, dtype=np.float64))
    if len(g) != len(f) or len(g) == 0 or np.any(np.diff(g) <= 0):
        raise ValueError("grid must be non-empty, strictly increasing and as long as fvu")
    if rungs < 2:
        raise ValueError(f"an auto ladder needs at least 2 rungs, got {rungs}")
    if g_first not in set(g.tolist()) or g_first >= g[-1]:
        raise ValueError(f"first rung {g_first} must be a grid point below M={int(g[-1])}")
    i0 = int(np.flatnonzero(g == g_first)[0])
    if len(g) - i0 < rungs:
        raise ValueError(f"only {len(g) - i0} grid points from G={g_first} to M; cannot place {rungs} rungs")
    f1, fm = f[i0], f[-1]
    picks = [i0]
    for j in range(1, rungs - 1):
        level = f1 - j / (rungs - 1) * (f1 - fm)
        i = i0 + int(np.argmax(f[i0:] <= level + 1e-15))
        i = max(i, picks[-1] + 1)
        i = min(i, len(g) - (rungs - j))  # leave room for the remaining rungs
        picks.append(i)
    picks.append(len(g) - 1)
    return tuple(int(g[i]) for i in picks)


def power_law_curve(grid: Sequence[int], alpha: float) -> np.ndarray:
    """Predicted FVU(G) up to an affine map: 1 - (sum_{i <= G} i^-alpha) / (sum_{i <= M} i^-alpha),
    for G in grid (M = grid[-1])."""
    m = int(grid[-1])
    cum = np.cumsum(np.arange(1, m + 1, dtype=np.float64) ** -alpha)
    return 1.0 - cum[np.asarray(grid, dtype=np.int64) - 1] / cum[-1]


def area_under_steps(costs: Sequence[float], fvus: Sequence[float], lo: float, hi: float,
                     floor: float = 1.0) -> float:
    """Mean FVU a budget drawn log-uniformly from [lo, hi] buys: a budget c buys the lowest FVU of
    the points with cost <= c, or `floor` (decoding nothing) below the cheapest point. The area
    under that step function over log2(cost), divided by log2(hi / lo)."""
    c = np.asarray(costs, dtype=np.float64)
    f = np.asarray(fvus, dtype=np.float64)
    if len(c) == 0 or len(c) != len(f) or not 0 < lo < hi:
        raise ValueError("need matching non-empty costs and fvus and 0 < lo < hi")
    xs = np.unique(np.concatenate([[lo, hi], c[(c > lo) & (c < hi)]]))
    total = 0.0
    for a, b in zip(xs[:-1], xs[1:]):
        ok = f[c <= a * (1 + 1e-9)]
        total += min(float(ok.min()) if ok.size else floor, floor) * (np.log2(b) - np.log2(a))
    return float(total / (np.log2(hi) - np.log2(lo)))
