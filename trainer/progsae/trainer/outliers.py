"""Outlier rows of an activation cache: the read policy, and where such rows are.

Attention sinks and separator positions carry up to ~100x the median token norm (RESULTS.md).
`OutlierPolicy` says which rows a reader of a cache keeps: rows whose norm exceeds `factor` x
the cache's median token norm are dropped, or none at all. It is the one spelling of that rule:

    flag `--outlier-factor`   "10" (a positive factor), or "0" / "none" / "off" (keep every row);
                              a negative or non-numeric value is an error, in every command
    recorded                  as the float `factor`, or null for "keep every row" (checkpoints'
                              train_config and outlier_policy, metrics.json, features.json)
    default                   DEFAULT (factor DEFAULT_FACTOR), for training and for checkpoints
                              that recorded none
    eval, order, features     apply what the checkpoint was trained with unless told otherwise
                              (`resolve`), so they score the rows the SAE saw in training

`analyse` (`progsae outliers CACHE`) reports where a cache's huge-norm rows sit: the median and
maximum token norm, how many rows exceed 3x / 10x the median, the share of the total variance
they hold, at which context positions they sit and which tokens they are (the separator, right
after one, or ordinary text). `compare_start` recomputes a sample of the cache's contexts with
another start token (needs the model) to compare the choice.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from progsae.sae.checkpoint import CheckpointMeta

DEFAULT_FACTOR = 10.0
"""On SmolLM2-135M layer 15 every sink lies above 11.6x the median norm and every other row below
6.6x (RESULTS.md, "Outlier tokens"); Gemma-3-270m layer 9 needs 3."""

KEEP_ALL_WORDS = ("0", "none", "off")


@dataclass(frozen=True)
class OutlierPolicy:
    """Which rows of an activation cache a reader keeps."""

    factor: float | None = DEFAULT_FACTOR
    """Rows with norm > factor x the cache's median token norm are dropped; None keeps every row."""

    def __post_init__(self) -> None:
        f = self.factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                              or f <= 0):
            raise ValueError(f"outlier factor must be a positive number, or 0 / none / off to keep every row; "
                             f"got {f!r}")
        if f is not None:
            object.__setattr__(self, "factor", float(f))

    @classmethod
    def parse(cls, text: str) -> OutlierPolicy:
        """From a flag: a positive factor, or "0", "none" or "off" to keep every row."""
        word = text.strip().lower()
        if word in KEEP_ALL_WORDS:
            return KEEP_ALL
        try:
            factor = float(word)
        except ValueError:
            factor = math.nan
        if factor == 0:
            return KEEP_ALL
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"expected a positive factor, or 0 / none / off to keep every row; got {text!r}")
        return cls(factor)

    @classmethod
    def from_record(cls, factor: Any) -> OutlierPolicy:
        """From a recorded factor (a float, or null for every row)."""
        return KEEP_ALL if factor is None else cls.parse(str(factor))

    @property
    def keeps_all(self) -> bool:
        return self.factor is None

    def threshold(self, median_norm: float) -> float:
        """The largest norm kept in a cache whose median token norm is `median_norm`."""
        return math.inf if self.factor is None else self.factor * median_norm

    def __str__(self) -> str:
        return "off" if self.factor is None else f"{self.factor:g}"


DEFAULT = OutlierPolicy()
KEEP_ALL = OutlierPolicy(None)


def trained_with(meta: CheckpointMeta) -> OutlierPolicy:
    """The policy a checkpoint was trained with, from the factor its provenance records (our trainer
    writes it into `train_config`); DEFAULT when it records none (e.g. a SAELens checkpoint)."""
    ex = meta.extra or {}
    for d in (ex, *(v for v in ex.values() if isinstance(v, dict))):
        recorded = d.get("outlier_factor", "absent")
        if recorded is None or (isinstance(recorded, (int, float)) and not isinstance(recorded, bool)):
            try:
                return OutlierPolicy.from_record(recorded)
            except ValueError as e:
                raise ValueError(f"the checkpoint records outlier_factor={recorded!r}: {e}") from None
    return DEFAULT


def resolve(asked: OutlierPolicy | None, meta: CheckpointMeta) -> OutlierPolicy:
    """The policy eval, order and features apply: the one asked for, else the checkpoint's own."""
    return trained_with(meta) if asked is None else asked


# --- where the outliers are (`progsae outliers`) --------------------------------------------------


def analyse(directory: str | Path, factors: tuple[float, ...] = (3.0, DEFAULT_FACTOR)) -> dict[str, Any]:
    import numpy as np

    from progsae.trainer.activations import ActivationCache

    cache = ActivationCache(directory, outliers=KEEP_ALL, require_complete=False)
    m = cache.manifest
    per = m.context - 1
    norms, sums, sq = [], np.zeros(m.d_model), 0.0
    for a in cache._acts:
        x = np.asarray(a, dtype=np.float64)
        norms.append(np.linalg.norm(x, axis=1))
        sums += x.sum(0)
        sq += float((x * x).sum())
    norm = np.concatenate(norms)
    n = len(norm)
    mean = sums / n
    # per-row squared deviation from the mean: ||x||^2 - 2 x.mean + ||mean||^2
    dev = []
    for a in cache._acts:
        x = np.asarray(a, dtype=np.float64)
        dev.append((x * x).sum(1) - 2 * x @ mean + mean @ mean)
    dev = np.concatenate(dev)
    total_var = float(dev.sum())
    toks = cache.tokens()
    sep = m.extra.get("separator_id")
    med = float(np.median(norm))
    out: dict[str, Any] = {
        "cache": str(directory), "model": m.model, "layer": m.layer, "bos": m.bos, "rows": n,
        "norm_median": med, "norm_max": float(norm.max()), "norm_p99": float(np.percentile(norm, 99)),
    }
    for f in factors:
        idx = np.flatnonzero(norm > f * med)
        ctx, pos = idx // per, idx % per + 1
        tok = toks[ctx, pos]
        prev = toks[ctx, pos - 1]
        kinds = Counter(
            "separator token" if t == sep else ("right after a separator" if p == sep and q > 1 else
                                                "first position after the start token" if q == 1 else "other text")
            for t, p, q in zip(tok.tolist(), prev.tolist(), pos.tolist())
        )
        out[f"above_{f:g}x"] = {
            "rows": int(len(idx)), "fraction": len(idx) / n,
            "variance_share": float(dev[idx].sum() / total_var),
            "positions": dict(Counter(pos.tolist()).most_common(5)),
            "kinds": dict(kinds),
            "norm_median_of_these": float(np.median(norm[idx])) if len(idx) else 0.0,
        }
    n_sep = int((toks[:, 1:] == sep).sum()) if sep is not None else 0
    out["separator_rows"] = n_sep
    return out


def compare_start(directory: str | Path, start_id: int, n_contexts: int = 48, batch: int = 8) -> dict[str, Any]:
    """Recompute the cache's first contexts with another start token; outlier counts for both."""
    import numpy as np
    import torch

    from progsae.lm.models import hidden_at_layer, load_model
    from progsae.trainer.activations import ActivationCache

    cache = ActivationCache(directory, outliers=KEEP_ALL, require_complete=False)
    m = cache.manifest
    lm = load_model(m.model)
    toks = np.array(cache.tokens()[:n_contexts], dtype=np.int64)
    res = {}
    other = lm.tokenizer.convert_ids_to_tokens(start_id)
    for label, sid in (("recorded " + m.bos, int(toks[0, 0])), (other, start_id)):
        t = toks.copy()
        t[:, 0] = sid
        hs = [hidden_at_layer(lm.model, torch.from_numpy(t[i:i + batch]), m.layer)[:, 1:]
              for i in range(0, len(t), batch)]
        h = torch.cat(hs).reshape(-1, m.d_model).double()
        norm = h.norm(dim=1)
        med = float(norm.median())
        dev = ((h - h.mean(0)) ** 2).sum(1)
        big = norm > 3 * med
        pos = (torch.nonzero(big).flatten() % (m.context - 1) + 1).tolist()
        res[label] = {"rows": len(norm), "median": med, "max": float(norm.max()), "above_3x": int(big.sum()),
                      "above_10x": int((norm > 10 * med).sum()), "variance_share_3x": float(dev[big].sum() / dev.sum()),
                      "positions_3x": dict(Counter(pos).most_common(5))}
    return res
