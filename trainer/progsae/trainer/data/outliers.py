"""Where an activation cache's outlier rows are (`progsae outliers CACHE`).

`analyse` reports where a cache's huge-norm rows sit: the median and
maximum token norm, how many rows exceed 3x / 10x the median, the share of the total variance
they hold, at which context positions they sit and which tokens they are (the separator, right
after one, or ordinary text). `compare_start` recomputes a sample of the cache's contexts with
another start token (needs the model) to compare the choice.

Which rows a reader keeps is the outlier policy (outlier_policy.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.data.outlier_policy import DEFAULT_FACTOR, KEEP_ALL


def analyse(directory: str | Path, factors: tuple[float, ...] = (3.0, DEFAULT_FACTOR)) -> dict[str, Any]:
    import numpy as np

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
