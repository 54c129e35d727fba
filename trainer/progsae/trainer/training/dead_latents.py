"""Dead-latent bookkeeping for AuxK, counted in tokens (Gao et al. 2024: 10M tokens)."""

from __future__ import annotations

import torch
from torch import Tensor


class DeadTracker:
    """Tokens since each latent last fired; dead once that reaches `window` tokens.

    A latent fires in a batch if it is selected with a positive value for any token.
    The counter is part of the resumable training state.
    """

    def __init__(self, d_sae: int, window: int, since_fired: Tensor | None = None,
                 device: torch.device | str = "cpu"):
        self.window = window
        # on the training device: dead ids index that device's pre-activations
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device) if since_fired is None else since_fired

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.window

    def dead_ids(self) -> Tensor | None:
        """int64 ids of the dead latents, None if there are none."""
        mask = self.dead_mask()
        return mask.nonzero().squeeze(1) if bool(mask.any()) else None

    def update(self, indices: Tensor, values: Tensor, n_tokens: int) -> None:
        """After a batch of `n_tokens` tokens whose selected codes were (indices, values)."""
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.since_fired += n_tokens
        self.since_fired[fired] = 0
