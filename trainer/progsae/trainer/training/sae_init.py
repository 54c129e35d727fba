"""Data-dependent initialisation: the normalisation scalar c and b_dec."""

from __future__ import annotations

import math

from torch import Tensor


def norm_scale(x: Tensor) -> float:
    """c with E||c x||^2 = d_in over the sample x [N, d_in] (float64 accumulation)."""
    ms = float(x.double().square().sum(1).mean())
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError("activations are all zero or non-finite: cannot fit the normalisation scalar")
    return math.sqrt(x.shape[1] / ms)


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm on x [N, d] in float64; returns float32 [d]."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            y = y_new
            break
        y = y_new
    return y.float()


def init_b_dec(x: Tensor, how: str = "median") -> Tensor:
    """b_dec from a normalised-scale sample: geometric median, mean, or zeros."""
    if how == "median":
        return geometric_median(x)
    if how == "mean":
        return x.double().mean(0).float()
    if how == "zeros":
        return x.new_zeros(x.shape[1])
    raise ValueError(f"unknown b_dec init {how!r}; choose median, mean or zeros")
