"""`progsae features CKPT --activations DIR | --texts FILE`: feature cards for the dashboard
(FeatureConfig + FeaturesRun).

The checkpoint's language model (cfg `model`) supplies the tokenizer (decoded token strings)
and the logit lens (final norm + unembedding); `--no-lens`, or a checkpoint whose model
cannot be loaded offline, leaves promoted tokens empty and shows token ids. With `--texts`
the same model runs the file's text at the checkpoint's layer first (trainer.text_cache: packed
as a harvest packs a corpus, into a temporary cache removed afterwards).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from progsae.clients.flags import add_dataclass
from progsae.trainer.data.outlier_policy import OutlierPolicy

if TYPE_CHECKING:
    from progsae.sae.checkpoint import CheckpointMeta
    from progsae.trainer.data.activations import ActivationCache
    from progsae.trainer.features import Decode, FeatureConfig, LogitLens

HELP = "feature cards (density, top contexts, promoted tokens) for the dashboard"


@dataclass
class FeaturesRun:
    """Which checkpoint, which activations, which rows of them, and whether to load the LM."""

    checkpoint: str = field(metadata={"positional": True})
    """Checkpoint directory; the cards are written into it."""
    activations: str = field(default="", metadata={"one_of": "input"})
    """Activation cache with token ids (progsae harvest)."""
    texts: str = field(default="", metadata={"one_of": "input"})
    """UTF-8 text file, one document per line: cards from its text run through the checkpoint's
    language model at the checkpoint's layer (instead of --activations)."""
    context: int = 128
    """With --texts: tokens per context, the start token included (a shorter text is one context)."""
    outlier_factor: OutlierPolicy | None = None
    """Exclude rows with norm > this factor x the median token norm (0, none or off: keep every
    row). Default: the policy the checkpoint was trained with."""
    lens: bool = True
    """Load the checkpoint's language model for the logit lens (promoted tokens) and token strings."""
    device: str = "cpu"
    """Where to encode: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU); the
    statistics and the language model stay on the CPU."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.features import FeatureConfig

    run_options = add_dataclass(parser, FeaturesRun)
    config = add_dataclass(parser, FeatureConfig, exclude=["progress"])
    parser.set_defaults(run=lambda args: run(config.build(args, progress=sys.stderr.isatty()),
                                             run_options.build(args)))


def run(cfg: FeatureConfig, opts: FeaturesRun) -> int:
    from progsae.sae import checkpoint
    from progsae.sae.devices import check_device
    from progsae.trainer import features
    from progsae.trainer.data import outlier_policy
    from progsae.trainer.data.activations import ActivationCache

    check_device(opts.device)  # before loading anything
    meta = checkpoint.load_meta(opts.checkpoint)
    if opts.texts:
        return _from_texts(cfg, opts, meta)
    cache = ActivationCache(opts.activations, outliers=outlier_policy.resolve(opts.outlier_factor, meta))
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
    return _write(cfg, opts, cache, lens, lens.decode if lens else None)


def _from_texts(cfg: FeatureConfig, opts: FeaturesRun, meta: CheckpointMeta) -> int:
    """Cards from a text file: the checkpoint's LM at its layer, into a temporary cache."""
    import tempfile

    from progsae.lm.models import load_model
    from progsae.trainer import features
    from progsae.trainer.data import outlier_policy, text_cache
    from progsae.trainer.data.activations import ActivationCache

    if not meta.model or meta.layer is None:
        raise ValueError(f"{opts.checkpoint} records no language model and layer; use --activations")
    docs = text_cache.read_documents(opts.texts)
    lm = load_model(meta.model)
    with tempfile.TemporaryDirectory(prefix="progsae-texts-") as tmp:
        made = text_cache.build(lm, docs, meta.layer, tmp, context=opts.context, source=str(opts.texts))
        if made.dropped:
            print(f"progsae features: {made.dropped} tokens at the end of {opts.texts} fill no whole "
                  f"{made.manifest.context}-token context and are left out", file=sys.stderr)
        cache = ActivationCache(tmp, outliers=outlier_policy.resolve(opts.outlier_factor, meta))
        lens = features.LogitLens(lm, cfg.promoted) if opts.lens else None
        return _write(cfg, opts, cache, lens, lambda ids: [lm.tokenizer.decode([i]) for i in ids],
                      {"activations": None, "texts": str(opts.texts), "documents": len(docs)})


def _write(cfg: FeatureConfig, opts: FeaturesRun, cache: ActivationCache, lens: LogitLens | None,
           decode: Decode | None, provenance: dict[str, Any] | None = None) -> int:
    from progsae.sae import checkpoint, feature_cards
    from progsae.trainer import features

    sae = checkpoint.load(opts.checkpoint).sae
    cards = features.compute(sae, cache, cfg, decode=decode, lens=lens, device=opts.device)
    cards.info.update(provenance or {})
    out = feature_cards.save(opts.checkpoint, cards)
    d = cards.tensors["density"]
    print(f"{out}: {cards.d_sae} latents over {cards.info['tokens']} tokens; "
          f"{int((d == 0).sum())} never fire; median density {float(d.median()):.2e}")
    return 0
