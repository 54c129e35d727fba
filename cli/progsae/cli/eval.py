"""`progsae eval CKPT --activations DIR`: every metric at every rung G (EvalConfig + EvalRun)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.evaluation.evaluate import EvalConfig

HELP = "every metric (FVU, L0, dead, density, RSA, CE/KL, power law) at every G"


@dataclass
class EvalRun:
    """What to evaluate on, and whether to record the result."""

    checkpoint: str = field(metadata={"positional": True})
    """Checkpoint directory."""
    activations: str
    """Held-out activation cache directory."""
    write: bool = True
    """Merge the result into the checkpoint's metrics.json (else only print it)."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.evaluation.evaluate import EvalConfig

    run_options, config = add_dataclass(parser, EvalRun), add_dataclass(parser, EvalConfig)
    parser.set_defaults(run=lambda args: run(config.build(args), run_options.build(args)))


def run(cfg: EvalConfig, opts: EvalRun) -> int:
    from progsae.trainer.evaluation.evaluate import evaluate, format_table, save_result

    cfg.validate()
    if cfg.k_grid:
        from progsae.sae import checkpoint
        from progsae.trainer.evaluation.k_grid import check_k_grid

        check_k_grid(cfg.k_grid, checkpoint.load_meta(opts.checkpoint).k)  # before the long pass
    if cfg.rsa_tokens < 1000:
        print(f"warning: RSA over {cfg.rsa_tokens} tokens; SPEC §5 asks for N >= 1000", flush=True)
    result = evaluate(opts.checkpoint, opts.activations, cfg)
    print(format_table(result))
    grid = None
    if cfg.k_grid:
        from progsae.trainer.evaluation.k_grid import evaluate_grid, format_grid

        grid = evaluate_grid(opts.checkpoint, opts.activations, cfg.k_grid, ordering=cfg.ordering,
                             batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, ce=cfg.ce,
                             ce_contexts=cfg.ce_contexts, ce_batch=cfg.ce_batch, progress=cfg.progress)
        print(format_grid(grid))
    if opts.write:
        merged = save_result(result, opts.checkpoint)
        if grid is not None:
            from progsae.sae import checkpoint

            checkpoint.write_metrics(opts.checkpoint, {**merged, "k_grid": grid.to_json()})
        print(f"wrote {opts.checkpoint}/metrics.json")
    return 0
