"""`progsae features CKPT --activations DIR`: feature cards for the dashboard (FeatureConfig + FeaturesRun).

The checkpoint's language model (cfg `model`) supplies the tokenizer (decoded token strings)
and the logit lens (final norm + unembedding); `--no-lens`, or a checkpoint whose model
cannot be loaded offline, leaves promoted tokens empty and shows token ids.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass
from progsae.trainer.outliers import OutlierPolicy

if TYPE_CHECKING:
    from progsae.trainer.features import FeatureConfig

HELP = "feature cards (density, top contexts, promoted tokens) for the dashboard"


@dataclass
class FeaturesRun:
    """Which checkpoint, which activations, which rows of them, and whether to load the LM."""

    checkpoint: str = field(metadata={"positional": True})
    """Checkpoint directory; the cards are written into it."""
    activations: str
    """Activation cache with token ids (progsae harvest)."""
    outlier_factor: OutlierPolicy | None = None
    """Exclude rows with norm > this factor x the median token norm (0, none or off: keep every
    row). Default: the policy the checkpoint was trained with."""
    lens: bool = True
    """Load the checkpoint's language model for the logit lens (promoted tokens) and token strings."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.features import FeatureConfig

    run_options = add_dataclass(parser, FeaturesRun)
    config = add_dataclass(parser, FeatureConfig, exclude=["progress"])
    parser.set_defaults(run=lambda args: run(config.build(args, progress=sys.stderr.isatty()),
                                             run_options.build(args)))


def run(cfg: FeatureConfig, opts: FeaturesRun) -> int:
    from progsae.sae import checkpoint, feature_cards
    from progsae.trainer import features, outliers
    from progsae.trainer.activations import ActivationCache

    meta = checkpoint.load_meta(opts.checkpoint)
    cache = ActivationCache(opts.activations, outliers=outliers.resolve(opts.outlier_factor, meta))
    man = cache.manifest
    if meta.model and meta.model != man.model or meta.layer is not None and meta.layer != man.layer:
        print(f"progsae features: warning: cache is {man.model} layer {man.layer}, checkpoint says "
              f"{meta.model} layer {meta.layer}", file=sys.stderr)
    lens = None
    if opts.lens:
        from progsae.lm.models import load_model

        try:
            lens = features.LogitLens(load_model(meta.model or man.model), cfg.promoted)
        except ValueError as e:
            print(f"progsae features: warning: no logit lens / tokenizer ({e})", file=sys.stderr)
    sae = checkpoint.load(opts.checkpoint).sae
    cards = features.compute(sae, cache, cfg, decode=lens.decode if lens else None, lens=lens)
    out = feature_cards.save(opts.checkpoint, cards)
    d = cards.tensors["density"]
    print(f"{out}: {cards.d_sae} latents over {cards.info['tokens']} tokens; "
          f"{int((d == 0).sum())} never fire; median density {float(d.median()):.2e}")
    return 0
