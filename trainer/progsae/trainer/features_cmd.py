"""`progsae features CKPT --activations DIR`: feature cards for the dashboard (trainer/features.py).

The checkpoint's language model (cfg `model`) supplies the tokenizer (decoded token strings)
and the logit lens (final norm + unembedding); `--no-lens`, or a checkpoint whose model
cannot be loaded offline, leaves promoted tokens empty and shows token ids.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="feature cards (density, top contexts, promoted tokens) for the dashboard")
    p.add_argument("checkpoint", help="checkpoint directory; cards are written into it")
    p.add_argument("--activations", required=True, help="activation cache with token ids (progsae harvest)")
    p.add_argument("--top-n", type=int, default=8, help="top-activating contexts per latent (default 8)")
    p.add_argument("--window", type=int, default=8, help="tokens shown either side of the peak (default 8)")
    p.add_argument("--promoted", type=int, default=10, help="promoted output tokens per latent (default 10)")
    p.add_argument("--tokens", type=int, default=0, help="use about this many tokens of the cache (default: all)")
    p.add_argument("--batch-contexts", type=int, default=32, help="contexts encoded per step")
    p.add_argument("--outlier-factor", type=float, default=None,
                   help="0 keeps outlier tokens (default: the factor the checkpoint was trained with, else 10)")
    p.add_argument("--no-lens", action="store_true", help="skip the language model (no promoted tokens)")
    p.set_defaults(func=run)


class LogitLens:
    """Decoder direction -> final norm -> unembedding -> top-p logits, plus token decoding."""

    def __init__(self, lm: Any, p: int):
        model = lm.model
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        self.norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None) or getattr(base, "ln_f", None)
        if self.norm is None:
            raise ValueError(f"cannot find the final norm of {type(model).__name__}")
        self.unembed = model.get_output_embeddings()
        self.tokenizer, self.p = lm.tokenizer, p

    def __call__(self, rows):
        import torch

        with torch.inference_mode():
            logits = self.unembed(self.norm(rows.unsqueeze(0)))[0]
            return logits.topk(self.p, dim=-1)

    def decode(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


def run(args: argparse.Namespace) -> int:
    from progsae.sae import checkpoint

    from . import features
    from .activations import ActivationCache
    from .evaluate import resolve_outlier_factor

    meta = checkpoint.load_meta(args.checkpoint)
    factor = resolve_outlier_factor(meta, args.outlier_factor)
    cache = ActivationCache(args.activations, outlier_factor=factor)
    man = cache.manifest
    if meta.model and meta.model != man.model or meta.layer is not None and meta.layer != man.layer:
        print(f"progsae features: warning: cache is {man.model} layer {man.layer}, checkpoint says "
              f"{meta.model} layer {meta.layer}", file=sys.stderr)
    lens = None
    if not args.no_lens:
        from progsae.lm.models import load_model

        name = meta.model or man.model
        try:
            lens = LogitLens(load_model(name), args.promoted)
        except ValueError as e:
            print(f"progsae features: warning: no logit lens / tokenizer ({e})", file=sys.stderr)
    cfg = features.FeatureConfig(top_n=args.top_n, window=args.window, promoted=args.promoted,
                                 batch_contexts=args.batch_contexts, max_tokens=args.tokens,
                                 progress=sys.stderr.isatty())
    sae = checkpoint.load(args.checkpoint).sae
    cards = features.compute(sae, cache, cfg, decode=lens.decode if lens else None, lens=lens)
    out = features.save(args.checkpoint, cards)
    d = cards.tensors["density"]
    print(f"{out}: {cards.d_sae} latents over {cards.info['tokens']} tokens; "
          f"{int((d == 0).sum())} never fire; median density {float(d.median()):.2e}")
    return 0
