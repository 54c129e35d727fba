"""`progsae order CKPT --activations DIR --by mean_sq|freq`: pruning orderings for any SAE (OrderConfig)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.order import OrderConfig

HELP = "sort a TopK SAE's latents by importance (E[a^2] or frequency): adds ordering.safetensors"


@dataclass
class OrderRun:
    """Which checkpoint to order, on which activations."""

    checkpoint: str = field(metadata={"positional": True})
    """Checkpoint directory (ours or SAELens); the orderings are added to it."""
    activations: str
    """Activation cache to score the latents on (the training cache)."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.order import OrderConfig

    run_options = add_dataclass(parser, OrderRun)
    config = add_dataclass(parser, OrderConfig, exclude=["progress"])
    parser.set_defaults(run=lambda args: run(config.build(args, progress=sys.stderr.isatty()),
                                             run_options.build(args)))


def run(cfg: OrderConfig, opts: OrderRun) -> int:
    from progsae.sae import checkpoint
    from progsae.sae.metrics import fit_power_law
    from progsae.trainer.order import compute_orderings

    orderings = compute_orderings(opts.checkpoint, opts.activations, cfg)
    checkpoint.write_orderings(opts.checkpoint, orderings)
    for name, o in orderings.items():
        s = o.sorted_scores()
        dead = int((s == 0).sum())
        try:
            pl = fit_power_law(s)
            fit = f"power law alpha={pl.alpha:.3f} R^2={pl.r2:.3f}"
        except ValueError:
            fit = "too few positive scores for a power-law fit"
        print(f"{opts.checkpoint}: ordering {name}: top score {float(s[0]):.4g}, {dead} latents never active, {fit}")
    if cfg.ladder:
        from progsae.trainer.data import outlier_policy
        from progsae.trainer.evaluation import auto_ladder

        rungs = auto_ladder.parse_auto(cfg.ladder)
        assert rungs is not None  # OrderConfig checked the spec
        policy = outlier_policy.resolve(cfg.outlier_factor, checkpoint.load_meta(opts.checkpoint))
        choice = auto_ladder.for_checkpoint(opts.checkpoint, opts.activations, rungs, orderings, policy,
                                            cfg.ladder_tokens)
        auto_ladder.store(opts.checkpoint, choice)
        print(auto_ladder.format_choice(choice))
        print(f"{opts.checkpoint}: ladder {list(choice.ladder)} stored (served by default)")
    return 0
