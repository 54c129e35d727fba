"""Pruning orderings: sort a vanilla SAE's latents by importance to make it progressive.

score_i = E[(a_i * ||W_dec[i]||)^2]  ("mean_sq", SPEC §3) or  E[1{a_i > 0}]  ("freq"),
accumulated in float64 over any number of batches of codes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, cast

import torch
from torch import Tensor

from .codec import SAE, Codes

Criterion = Literal["mean_sq", "freq"]
CRITERIA: tuple[Criterion, ...] = ("mean_sq", "freq")


class Ordering(NamedTuple):
    """A progressive order of the latents and the scores that produced it."""

    criterion: str
    """"mean_sq", "freq", or "none" for the identity."""
    perm: Tensor
    """[d_sae] int64: new latent j is original latent perm[j]."""
    scores: Tensor
    """[d_sae] float64 score of each *original* latent."""

    def inverse(self) -> Tensor:
        """[d_sae] inv with inv[perm[j]] = j: original latent i sits at position inv[i]."""
        return invert(self.perm)

    def sorted_scores(self) -> Tensor:
        """[d_sae] scores in the new (descending) order."""
        return self.scores[self.perm]


class ImportanceAccumulator:
    """Streaming E[(a_i ||W_dec[i]||)^2] and E[1{a_i>0}] over batches of codes."""

    def __init__(self, sae: SAE):
        self.d_sae = sae.d_sae
        dev = sae.W_dec.device
        # Codes are in normalised scale; the decoder norms in raw scale absorb 1/scale,
        # a constant factor that changes no ranking but keeps scores in raw units.
        # torch leaves Tensor.norm's dim unannotated, so its type is partly unknown
        norm = cast(Tensor, sae.W_dec.double().norm(dim=1))  # pyright: ignore[reportUnknownMemberType]
        self.dec_norm_sq = (norm / sae.scale) ** 2
        self.sum_sq = torch.zeros(self.d_sae, dtype=torch.float64, device=dev)
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64, device=dev)
        self.tokens = 0

    def update(self, codes: Codes) -> None:
        idx = codes.indices.reshape(-1)
        val = codes.values.reshape(-1).double()
        self.sum_sq.index_add_(0, idx, val.square())
        self.fires.index_add_(0, idx, (val > 0).double())
        self.tokens += codes.indices.shape[0]

    def scores(self, criterion: Criterion) -> Tensor:
        """[d_sae] float64 score of each latent seen so far."""
        if self.tokens == 0:
            raise ValueError("no tokens seen: cannot score latents")
        if criterion == "mean_sq":
            return self.sum_sq * self.dec_norm_sq / self.tokens
        if criterion == "freq":
            return self.fires / self.tokens
        raise ValueError(f"unknown ordering criterion {criterion!r}; choose from {CRITERIA}")

    def ordering(self, criterion: Criterion) -> Ordering:
        return order_by(self.scores(criterion), criterion)


def order_by(scores: Tensor, criterion: str) -> Ordering:
    """Descending order of `scores` [d_sae]; ties keep the original index order (stable)."""
    perm = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    return Ordering(criterion, perm, scores.double().cpu())


def identity(d_sae: int) -> Ordering:
    return Ordering("none", torch.arange(d_sae), torch.zeros(d_sae, dtype=torch.float64))


def invert(perm: Tensor) -> Tensor:
    """[n] inverse of a [n] permutation: inv[perm[j]] = j."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def check_permutation(perm: Tensor, n: int) -> None:
    """Raise ValueError unless perm is a permutation of 0..n-1."""
    if perm.shape != (n,) or perm.dtype != torch.int64:
        raise ValueError(f"permutation must be int64 of shape ({n},), got {perm.dtype} {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise ValueError("permutation is not a bijection of 0..d_sae-1")


def apply(sae: SAE, ordering: Ordering) -> SAE:
    """The SAE with latents in the ordering's progressive order."""
    return sae.permute(ordering.perm.to(sae.W_dec.device))


def undo(sae: SAE, ordering: Ordering) -> SAE:
    """Inverse of `apply`: back to the original latent order."""
    return sae.permute(ordering.inverse().to(sae.W_dec.device))
