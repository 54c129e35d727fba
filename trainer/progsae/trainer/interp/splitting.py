"""Feature splitting across granularity groups: do outer latents refine inner ones?

For a progressive order of the latents and its ladder G_1 < ... < G_n, band j holds the latents
at positions [G_{j-1}, G_j) (the "outer" latents of that rung) and the prefix [0, G_{j-1}) holds
its "inner" latents. Band 1 has no inner latents, so both measures are NaN there.

Decoder cosine. For each outer latent v of band j, the largest cosine similarity between its
decoder row and the decoder row of any inner latent; reported as the mean over band j. High
values mean the band re-spends directions the prefix already has.

Splitting. Firing is counted on held-out tokens (a latent fires on a token when its code is > 0).
With n_u the number of tokens latent u fires on and n_uv those both u and v fire on, an outer
latent v of band j is a *child* of inner latent u when

    n_v >= min_fires,   n_uv / n_v >= subset   (v fires almost only where u fires)
    and                 n_uv / n_u <= share    (v covers only part of u's tokens).

An inner latent u (with n_u >= min_fires) is *split* by band j when it has at least 2 children
in band j: its firing is divided among several outer latents that each fire on a subset of its
tokens. Reported per band: `split_fraction`, the fraction of eligible inner latents that band j
splits; `child_fraction`, the fraction of eligible outer latents (n_v >= min_fires) that are a
child of some inner latent; and `children`, the mean number of children of a split latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.sparse import csr_matrix
from torch import Tensor


class BandSplitting(NamedTuple):
    """The splitting measures of one band [g_lo, g_hi) against its prefix [0, g_lo)."""

    g_lo: int
    g_hi: int
    decoder_cos: float
    """Mean over the band's latents of the max decoder cosine to a prefix latent (NaN for band 1)."""
    split_fraction: float
    """Fraction of eligible prefix latents with >= 2 children in this band (NaN for band 1)."""
    child_fraction: float
    """Fraction of the band's eligible latents that are a child of some prefix latent."""
    children: float
    """Mean children per split prefix latent (NaN when none is split)."""


class CoFiring(NamedTuple):
    """Firing statistics of every latent (original order) over a set of tokens."""

    fires: np.ndarray
    """[d_sae] tokens each latent fires on."""
    both: csr_matrix
    """[d_sae, d_sae] sparse: tokens both latents fire on (diagonal = fires)."""


def cofiring(indices: np.ndarray, values: np.ndarray, d_sae: int) -> CoFiring:
    """Co-firing counts from codes [N, k] (one sparse product, cost N * k^2)."""
    n, k = indices.shape
    on = values.reshape(-1) > 0
    rows = np.repeat(np.arange(n), k)[on]
    f = csr_matrix((np.ones(int(on.sum())), (rows, indices.reshape(-1)[on])), shape=(n, d_sae))
    both = csr_matrix(f.T @ f)  # sparse: a d_sae of 16384 would need 2 GB dense
    return CoFiring(np.rint(both.diagonal()).astype(np.int64), both)


def max_cos_to_prefix(W_dec: Tensor, perm: Tensor, ladder: Sequence[int]) -> list[float]:
    """Per band, the mean over its latents of the max decoder cosine to the band's prefix ([d_sae, d_in])."""
    w = torch.nn.functional.normalize(W_dec.double()[perm], dim=1)
    out = [float("nan")]
    for lo, hi in zip(ladder, ladder[1:]):
        cos = w[lo:hi] @ w[:lo].T
        out.append(float(cos.max(dim=1).values.mean()))
    return out


def splitting(co: CoFiring, W_dec: Tensor, perm: Tensor, ladder: Sequence[int], min_fires: int = 5,
              subset: float = 0.8, share: float = 0.5) -> list[BandSplitting]:
    """The measures above for every band of the order `perm` ([d_sae]: position j holds latent perm[j])."""
    p = perm.numpy()
    fires = co.fires[p]
    cos = max_cos_to_prefix(W_dec, perm, ladder)
    nan = float("nan")
    out = [BandSplitting(0, ladder[0], nan, nan, nan, nan)]
    for j, (lo, hi) in enumerate(zip(ladder, ladder[1:]), start=1):
        inner_ok, outer_ok = fires[:lo] >= min_fires, fires[lo:hi] >= min_fires
        nuv = np.asarray(co.both[p[:lo]][:, p[lo:hi]].toarray(), dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            child = ((nuv / fires[lo:hi][None, :] >= subset) & (nuv / fires[:lo][:, None] <= share)
                     & inner_ok[:, None] & outer_ok[None, :])
        n_children = child.sum(axis=1)
        split = n_children >= 2
        out.append(BandSplitting(
            lo, hi, cos[j],
            float(split.sum() / inner_ok.sum()) if inner_ok.any() else nan,
            float(child.any(axis=0).sum() / outer_ok.sum()) if outer_ok.any() else nan,
            float(n_children[split].mean()) if split.any() else nan,
        ))
    return out
