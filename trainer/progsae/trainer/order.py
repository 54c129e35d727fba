"""Pruning orderings for any SAE (`progsae order CKPT --activations DIR --by mean_sq|freq`).

Encodes the cache's tokens (in cache order, the checkpoint's outlier policy applied) with the
checkpoint's SAE in its trained latent order, accumulates E[(a_i ||W_dec[i]||)^2] and E[1{a_i > 0}]
(sae/ordering.py) in float64, and adds the requested orderings to CKPT/ordering.safetensors
(checkpoint.write_orderings: merged with any stored ones, written atomically). Works for
our checkpoints and SAELens-format ones (cfg.json + sae_weights.safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from progsae.trainer.data import outlier_policy
from progsae.trainer.data.outlier_policy import OutlierPolicy

if TYPE_CHECKING:
    from progsae.sae.ordering import Criterion, Ordering

CRITERIA = ("mean_sq", "freq")


@dataclass
class OrderConfig:
    """Which orderings to compute, and over which rows."""

    by: tuple[str, ...] = ("mean_sq",)
    """Criteria, comma-separated: mean_sq (E[(a ||W_dec||)^2]), freq (firing frequency), or all."""
    tokens: int = 0
    """Tokens to use (0: the whole cache)."""
    batch_size: int = 4096
    """Tokens per encode batch (encode itself bounds its memory: codec.ENCODE_CHUNK_BYTES)."""
    outlier_factor: OutlierPolicy | None = None
    """Exclude rows with norm > this factor x the median token norm (0, none or off: keep every
    row). Default: the policy the checkpoint was trained with."""
    device: str = "cpu"
    """Where to encode: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU)."""
    ladder: str = ""
    """auto:R: also pick the checkpoint's ladder, R rungs from M / 2^(R-1) to M that each add an
    equal share of the FVU reduction on these activations (evaluation/auto_ladder.py: the fitted importance
    power law where R^2 >= 0.95, else the measured FVU(G)), and store it as the served ladder."""
    ladder_tokens: int = 16384
    """Rows over which --ladder measures FVU(G)."""
    progress: bool = True
    """Show a progress bar (stderr)."""

    def __post_init__(self) -> None:
        by = tuple(c.strip() for c in self.by if c.strip())
        bad = [c for c in by if c not in (*CRITERIA, "all")]
        if bad or not by:
            raise ValueError(f"unknown criterion {', '.join(bad) or repr(self.by)}; choose from mean_sq, freq, all")
        self.by = CRITERIA if "all" in by else by
        from progsae.trainer.evaluation.auto_ladder import parse_auto

        parse_auto(self.ladder)
        if self.ladder_tokens < 1:
            raise ValueError("--ladder-tokens must be positive")
        if self.tokens < 0 or self.batch_size < 1:
            raise ValueError("--tokens must be >= 0 and --batch-size positive")
        from progsae.sae.devices import check_device

        check_device(self.device)


def compute_orderings(checkpoint_dir: str | Path, activations: str | Path, cfg: OrderConfig | None = None) -> dict:
    """{criterion: Ordering} over the first `cfg.tokens` kept tokens of the cache (0 = all)."""
    import torch

    from progsae.sae import checkpoint
    from progsae.sae.ordering import ImportanceAccumulator
    from progsae.trainer.data.activations import ActivationCache

    cfg = cfg or OrderConfig()
    meta = checkpoint.load_meta(checkpoint_dir)
    cache = ActivationCache(activations, outliers=outlier_policy.resolve(cfg.outlier_factor, meta))
    man = cache.manifest
    if man.d_model != meta.d_in:
        raise ValueError(f"{activations} holds activations of width {man.d_model}, the SAE expects d_in={meta.d_in}")
    ours = meta.extra.get("source") != "saelens"
    for key in ("model", "layer"):
        have, want = getattr(man, key), getattr(meta, key)
        if ours and want is not None and have != want:
            raise ValueError(f"{activations} comes from {key}={have!r}, the checkpoint was trained on {key}={want!r}")
    from progsae.sae.devices import resolve_device

    dev = resolve_device(cfg.device)
    sae = checkpoint.load(checkpoint_dir, device=dev).sae
    acc = ImportanceAccumulator(sae)
    budget = cfg.tokens or len(cache)
    from tqdm import tqdm

    bar = tqdm(total=budget, unit="tok", unit_scale=True, disable=not cfg.progress, desc="order")
    with torch.inference_mode():
        for x in cache.batches(cfg.batch_size):
            x = x[: budget - acc.tokens]
            acc.update(sae.encode(x.to(dev, non_blocking=True)))
            bar.update(x.shape[0])
            if acc.tokens >= budget:
                break
    bar.close()
    return {c: _on_cpu(acc.ordering(cast("Criterion", c))) for c in cfg.by}  # OrderConfig checked the names


def _on_cpu(o: Ordering) -> Ordering:
    return o._replace(perm=o.perm.cpu(), scores=o.scores.cpu())
