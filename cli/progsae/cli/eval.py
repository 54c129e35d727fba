"""`progsae eval CKPT --activations DIR`: every metric at every rung G (EvalConfig + EvalRun)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.evaluate import EvalConfig

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
    from progsae.trainer.evaluate import EvalConfig

    run_options, config = add_dataclass(parser, EvalRun), add_dataclass(parser, EvalConfig)
    parser.set_defaults(run=lambda args: run(config.build(args), run_options.build(args)))


def run(cfg: EvalConfig, opts: EvalRun) -> int:
    from progsae.trainer.evaluate import evaluate, format_table, save_result

    cfg.validate()
    if cfg.rsa_tokens < 1000:
        print(f"warning: RSA over {cfg.rsa_tokens} tokens; SPEC §5 asks for N >= 1000", flush=True)
    result = evaluate(opts.checkpoint, opts.activations, cfg)
    print(format_table(result))
    if opts.write:
        save_result(result, opts.checkpoint)
        print(f"wrote {opts.checkpoint}/metrics.json")
    return 0
