"""A small progressive coder of the real SmolLM2-135M's residual stream, for tests that splice its
reconstructions back into the model (per-rung fidelity): made in seconds, no training.

Its dictionary is the principal directions of a few sentences' activations at `layer`, each with both
signs (a ReLU code is >= 0), most variance first; b_dec is their mean. Encoding picks each token's k
largest projections; nested truncation at G keeps the leading G/2 directions, so the reconstruction,
and with it the model's next-token prediction, improves rung by rung as a trained SAE's does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from progsae.sae import checkpoint
from progsae.sae.codec import SAE

LM = "smollm2-135m"
TEXTS = (
    "The Eiffel Tower is in Paris, and the Louvre is close by.",
    "Rivers carry water from the mountains down to the sea, shaping valleys on the way.",
    "She opened the door, looked at the rain, and decided to stay inside with a book.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them.",
    "Bread is made from flour, water, salt and yeast, baked in a hot oven.",
    "The committee will meet on Tuesday to discuss the budget for next year.",
)


def make_lm_checkpoint(path: Path, layer: int = 3, m: int = 128, k: int = 16,
                       ladder: tuple[int, ...] = (8, 16, 32, 64, 128)) -> Path:
    from progsae.server.text import TextBackend

    backend = TextBackend()
    x = torch.cat([torch.from_numpy(backend.run(LM, layer, t, 512).activations) for t in TEXTS]).double()
    norms = x.norm(dim=1)
    x = x[norms <= 10 * norms.median()]  # the attention sink, as the trainer's outlier policy drops it
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    dirs = v[: m // 2]
    w_dec = torch.stack([dirs, -dirs], dim=1).reshape(m, -1).float()  # +u1, -u1, +u2, -u2, ...
    sae = SAE(W_enc=w_dec.T.clone(), W_dec=w_dec, b_enc=torch.zeros(m), b_dec=mean.float(), k=k, scale=1.0)
    threshold = float(10 * norms.median())
    meta = checkpoint.CheckpointMeta(architecture="matryoshka", d_in=x.shape[1], d_sae=m, k=k, granularities=ladder,
                                     model=LM, layer=layer,
                                     extra={"outlier_policy": {"factor": 10.0, "threshold": threshold}})
    return checkpoint.save(path, sae, meta)
