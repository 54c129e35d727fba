"""The (G, k') grid: FVU, L0 and CE recovered of decoding each token from its k' largest codes
among those with index < G (codec.topk_prefix), and the cost frontiers over it.

Decode cost is the mean number of active codes multiplied in per token (the L0 of the (G, k')
code), the quantity both axes trade against error. Three ways to spend a budget:

* G only: k' = k, G along the ladder (today's progressive stream);
* k' only: G = M, k' along the k grid;
* best (G, k'): the lower envelope of every grid point (the cheapest point reaching each FVU).

One encode per batch over the held-out cache (policy rows, as `progsae eval`), every grid
point decoded from the same codes. CE recovered splices each point's x_hat into the model in
ce_loss.splice_eval's loop (progsae.lm.splice; same contexts, same policy), one forward per point
and context batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from progsae.sae import checkpoint
from progsae.sae.codec import SAE, Codes, topk_prefix
from progsae.sae.ladders import area_under_steps
from progsae.sae.metrics import FVUAccumulator
from progsae.trainer.data.activations import ActivationCache


class GridPoint(NamedTuple):
    """One (G, k') decode, measured on the held-out rows the policy keeps."""

    g: int
    k_prime: int
    fvu: float
    l0: float
    """Mean active codes per token: the decode cost."""
    ce_recovered: float | None = None
    ce_recovered_se: float | None = None


@dataclass
class KGridResult:
    """Every point of the grid for one ordering of one checkpoint."""

    checkpoint: str
    ordering: str
    ladder: list[int]
    k_grid: list[int]
    k_ladder: list[int]
    """The k' ladder the model was trained with (empty: trained at k only)."""
    n_tokens: int
    points: list[GridPoint] = field(default_factory=list[GridPoint])

    def at(self, g: int, k_prime: int) -> GridPoint:
        return next(p for p in self.points if p.g == g and p.k_prime == k_prime)

    def g_only(self) -> list[GridPoint]:
        """k' = k (the largest k'), along the ladder."""
        return [self.at(g, self.k_grid[-1]) for g in self.ladder]

    def k_only(self) -> list[GridPoint]:
        """G = M, along the k grid."""
        return [self.at(self.ladder[-1], kp) for kp in self.k_grid]

    def best(self) -> list[GridPoint]:
        return pareto(self.points)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [p._asdict() for p in self.points]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KGridResult:
        return cls(**{**d, "points": [GridPoint(**p) for p in d["points"]]})


def pareto(points: list[GridPoint]) -> list[GridPoint]:
    """The points no other point beats on both cost (l0) and FVU, by increasing cost."""
    out: list[GridPoint] = []
    for p in sorted(points, key=lambda p: (p.l0, p.fvu)):
        if not out or p.fvu < out[-1].fvu:
            out.append(p)
    return out


def fvu_at_cost(curve: list[GridPoint], cost: float) -> float:
    """Lowest FVU of a curve's points with cost <= `cost` (inf if none is that cheap)."""
    ok = [p.fvu for p in curve if p.l0 <= cost * (1 + 1e-9)]
    return min(ok) if ok else float("inf")


def area_under(curve: list[GridPoint], lo: float, hi: float, floor: float = 1.0) -> float:
    """Mean FVU a budget drawn log-uniformly from [lo, hi] active codes buys on this curve
    (ladders.area_under_steps; below the cheapest point: `floor`, decoding no code)."""
    if not curve:
        raise ValueError("need a non-empty curve")
    return area_under_steps([p.l0 for p in curve], [p.fvu for p in curve], lo, hi, floor)


def grid_codes(codes: Codes, g: int, k_prime: int) -> Codes:
    """The (G, k') code (codec.topk_prefix); named here for the evaluator's one use."""
    return topk_prefix(codes, g, k_prime)


def choose_ordering(ck: checkpoint.Checkpoint, ordering: str) -> str:
    """One ordering for the grid: Matryoshka in trained order; TopK the one asked for, else
    mean_sq if stored, else none."""
    if ck.meta.architecture == "matryoshka":
        return "none"
    if ordering in ("none", "mean_sq", "freq"):
        if ordering != "none" and ordering not in ck.orderings:
            raise ValueError(f"{ck.path}: no stored ordering {ordering}; run `progsae order` first")
        return ordering
    return "mean_sq" if "mean_sq" in ck.orderings else "none"


def check_k_grid(k_grid: tuple[int, ...], k: int) -> None:
    if not k_grid:
        raise ValueError("empty --k-grid")
    if any(b <= a for a, b in zip(k_grid, k_grid[1:])) or k_grid[0] < 1 or k_grid[-1] > k:
        raise ValueError(f"--k-grid must be strictly increasing within 1..k={k}, got {list(k_grid)}")


@torch.no_grad()
def evaluate_grid(ckpt_path: str | Path, acts_dir: str | Path, k_grid: tuple[int, ...], *,
                  ordering: str = "all", batch_size: int = 4096, max_tokens: int | None = None,
                  ce: bool = False, ce_contexts: int = 32, ce_batch: int = 4, model: Any = None,
                  progress: bool = False) -> KGridResult:
    """FVU and L0 (and with `ce` CE recovered) at every (G, k') of the checkpoint's ladder x k_grid."""
    from progsae.trainer.data import outlier_policy
    from progsae.trainer.evaluation.evaluate import check_compatible

    ck = checkpoint.load(ckpt_path)
    check_k_grid(k_grid, ck.meta.k)
    name = choose_ordering(ck, ordering)
    sae = ck.sae if name == "none" else checkpoint.load(ckpt_path, ordering=name).sae
    rule = outlier_policy.resolve(None, ck.meta)
    cache_all = ActivationCache(acts_dir, outliers=outlier_policy.KEEP_ALL)
    check_compatible(ck, cache_all)
    keep = np.zeros(cache_all.manifest.n_tokens, dtype=bool)
    keep[ActivationCache(acts_dir, outliers=rule).rows()] = True
    n = len(keep) if max_tokens is None else min(len(keep), max_tokens)
    keep = keep[:n]
    grid = [(g, kp) for g in ck.ladder for kp in k_grid]
    fvus = {p: FVUAccumulator() for p in grid}
    l0s = dict.fromkeys(grid, 0.0)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="tok", desc="eval (G, k') grid", disable=not progress)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        kb = torch.from_numpy(keep[rows])
        x = cache_all.gather(rows)[kb]
        if len(x) == 0:
            continue
        codes = sae.encode(x)
        for g, kp in grid:
            c = grid_codes(codes, g, kp)
            fvus[(g, kp)].update(x, sae.decode(c, g))
            l0s[(g, kp)] += float(((c.indices < g) & (c.values != 0)).sum())
        bar.update(len(rows))
    bar.close()
    n_kept = int(keep.sum())
    ce_rec: dict[tuple[int, int], tuple[float, float | None]] = {}
    if ce:
        ce_rec = _grid_ce(ck, sae, grid, cache_all, keep, ce_contexts, ce_batch, model)
    points = [GridPoint(g, kp, fvus[(g, kp)].value(), l0s[(g, kp)] / n_kept, *ce_rec.get((g, kp), (None, None)))
              for g, kp in grid]
    return KGridResult(str(ck.path), name, list(ck.ladder), list(k_grid),
                       list(ck.meta.extra.get("k_ladder", [])), n_kept, points)


def _grid_ce(ck: checkpoint.Checkpoint, sae: SAE, grid: list[tuple[int, int]], cache: ActivationCache,
             keep: np.ndarray, n_contexts: int, ce_batch: int, model: Any
             ) -> dict[tuple[int, int], tuple[float, float | None]]:
    """CE recovered (and its bootstrap SE) of every grid point, ce_loss.splice_eval's protocol."""
    from progsae.lm.splice import splice_losses
    from progsae.trainer.evaluation.ce_loss import cache_batches, eval_contexts, load_lm, rung_numbers

    if model is None:
        model = load_lm(ck, cache)
    ctx = eval_contexts(cache, keep, n_contexts)

    def points(x: Tensor) -> Iterator[tuple[tuple[int, int], Tensor]]:
        codes = sae.encode(x)
        for g, kp in grid:
            yield (g, kp), sae.decode(grid_codes(codes, g, kp), g)

    losses = splice_losses(model, cache.manifest.layer, cache_batches(cache, keep, ctx, ce_batch), points)
    out: dict[tuple[int, int], tuple[float, float | None]] = {}
    for p, acc in losses.variants.items():
        r = rung_numbers(losses.clean, losses.zero, acc)
        out[p] = (r.ce_recovered, r.ce_recovered_se)
    return out


def format_grid(r: KGridResult) -> str:
    """FVU (L0) table, rows G, columns k', then the three frontiers."""
    ce = any(p.ce_recovered is not None for p in r.points)
    lines = [f"(G, k') grid, ordering {r.ordering}, {r.n_tokens} tokens; trained k ladder {r.k_ladder or 'none'}",
             f"{'G':>6} " + " ".join(f"{f'k={kp}':>22}" for kp in r.k_grid)]
    for g in r.ladder:
        cells = []
        for kp in r.k_grid:
            p = r.at(g, kp)
            cell = f"{p.fvu:.4f} ({p.l0:5.2f})"
            if ce and p.ce_recovered is not None:
                cell += f" {p.ce_recovered:.3f}"
            cells.append(f"{cell:>22}")
        lines.append(f"{g:6d} " + " ".join(cells))
    lines.append("cells: FVU (mean L0)" + (" CE recovered" if ce else ""))
    best = r.best()
    for label, curve in (("G only", r.g_only()), ("k' only", r.k_only())):
        for p in curve:
            b = fvu_at_cost(best, p.l0)
            lines.append(f"{label:8} (G={p.g}, k'={p.k_prime}) cost {p.l0:6.2f}: FVU {p.fvu:.4f}, "
                         f"best (G, k') at <= that cost {b:.4f}")
    lines.append("best path: " + " -> ".join(f"({p.g},{p.k_prime}) {p.l0:.1f}:{p.fvu:.4f}" for p in best))
    return "\n".join(lines)
