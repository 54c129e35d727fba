"""`progsae order CKPT --activations DIR --by mean_sq|freq`: pruning orderings for any SAE.

Encodes the cache's tokens (in cache order, outlier policy applied) with the checkpoint's
SAE in its trained latent order, accumulates E[(a_i ||W_dec[i]||)^2] and E[1{a_i > 0}]
(sae/ordering.py) in float64, and adds the requested orderings to CKPT/ordering.safetensors
(checkpoint.write_orderings: merged with any stored ones, written atomically). Works for
our checkpoints and SAELens-format ones (cfg.json + sae_weights.safetensors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CRITERIA = ("mean_sq", "freq")


def _criteria(s: str) -> tuple[str, ...]:
    out = tuple(c.strip() for c in s.split(",") if c.strip())
    if "all" in out:
        return CRITERIA
    bad = [c for c in out if c not in CRITERIA]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown criterion {', '.join(bad) or s!r}; choose from mean_sq, freq, all")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "order", help="sort a TopK SAE's latents by importance (E[a^2] or frequency): adds ordering.safetensors",
    )
    p.add_argument("checkpoint", help="checkpoint directory (ours or SAELens)")
    p.add_argument("--activations", required=True, help="activation cache to score the latents on")
    p.add_argument("--by", type=_criteria, default=("mean_sq",),
                   help="mean_sq (E[(a*||W_dec||)^2], default), freq (firing frequency), a comma list, or all")
    p.add_argument("--tokens", type=int, default=0, help="tokens to use (default: the whole cache)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--outlier-factor", type=float, default=None,
                   help="0 keeps outlier tokens (default: the factor the checkpoint was trained with, else 10)")
    p.set_defaults(func=run)


def compute_orderings(checkpoint_dir: str | Path, activations: str | Path, criteria: tuple[str, ...] = CRITERIA,
                      tokens: int = 0, batch_size: int = 4096, outlier_factor: float | None = 10.0,
                      progress: bool = True) -> dict:
    """{criterion: Ordering} over the first `tokens` kept tokens of the cache (0 = all)."""
    import torch

    from progsae.sae import checkpoint
    from progsae.sae.ordering import ImportanceAccumulator

    from .activations import ActivationCache

    if tokens < 0 or batch_size < 1:
        raise ValueError("--tokens must be >= 0 and --batch-size positive")
    meta = checkpoint.load_meta(checkpoint_dir)
    cache = ActivationCache(activations, outlier_factor=outlier_factor)
    man = cache.manifest
    if man.d_model != meta.d_in:
        raise ValueError(f"{activations} holds activations of width {man.d_model}, the SAE expects d_in={meta.d_in}")
    ours = meta.extra.get("source") != "saelens"
    for key in ("model", "layer"):
        have, want = getattr(man, key), getattr(meta, key)
        if ours and want is not None and have != want:
            raise ValueError(f"{activations} comes from {key}={have!r}, the checkpoint was trained on {key}={want!r}")
    sae = checkpoint.load(checkpoint_dir).sae
    acc = ImportanceAccumulator(sae)
    budget = tokens or len(cache)
    from tqdm import tqdm

    bar = tqdm(total=budget, unit="tok", unit_scale=True, disable=not progress, desc="order")
    with torch.inference_mode():
        for x in cache.batches(batch_size):
            x = x[: budget - acc.tokens]
            acc.update(sae.encode(x))
            bar.update(x.shape[0])
            if acc.tokens >= budget:
                break
    bar.close()
    return {c: acc.ordering(c) for c in criteria}


def run(args: argparse.Namespace) -> int:
    from progsae.sae import checkpoint
    from progsae.sae.metrics import fit_power_law
    from progsae.trainer.evaluate import resolve_outlier_factor

    factor = resolve_outlier_factor(checkpoint.load_meta(args.checkpoint), args.outlier_factor)
    orderings = compute_orderings(args.checkpoint, args.activations, args.by, args.tokens, args.batch_size,
                                  factor, progress=sys.stderr.isatty())
    checkpoint.write_orderings(args.checkpoint, orderings)
    for name, o in orderings.items():
        s = o.sorted_scores()
        dead = int((s == 0).sum())
        try:
            pl = fit_power_law(s)
            fit = f"power law alpha={pl.alpha:.3f} R^2={pl.r2:.3f}"
        except ValueError:
            fit = "too few positive scores for a power-law fit"
        print(f"{args.checkpoint}: ordering {name}: top score {float(s[0]):.4g}, {dead} latents never active, {fit}")
    return 0
