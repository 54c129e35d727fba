"""A checkpoint's SAE with its latents permuted into one progressive order.

Encoding is equivariant under a permutation of the latents, so one encode serves every order:
the codes of an order are the trained-order codes with their indices relabelled
(`OrderedSAE.relabel`), and that order's SAE streams its rungs from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from progsae.sae import checkpoint
from progsae.sae import ordering as ordmod
from progsae.sae.codec import SAE, Codes


@dataclass
class OrderedSAE:
    """One progressive order of the checkpoint's latents."""

    name: str
    """The ordering: "none" (trained order), "mean_sq" or "freq"."""
    sae: SAE
    """The SAE with its latents permuted into this order."""
    inv: Tensor
    """Original latent i sits at position inv[i]."""
    perm: Tensor
    """Position j holds original latent perm[j]."""

    @classmethod
    def of(cls, ck: checkpoint.Checkpoint, name: str) -> OrderedSAE:
        """The checkpoint's SAE in its stored ordering `name` ("none": as trained)."""
        o = ordmod.identity(ck.meta.d_sae) if name == "none" else ck.orderings[name]
        return cls(name, ordmod.apply(ck.sae, o), o.inverse(), o.perm)

    def to(self, device: torch.device) -> OrderedSAE:
        return OrderedSAE(self.name, self.sae.to(device), self.inv.to(device), self.perm.to(device))

    def relabel(self, codes: Codes) -> Codes:
        """Trained-order codes as codes of this order."""
        return Codes(self.inv[codes.indices], codes.values)
