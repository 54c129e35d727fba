"""`progsae interp CKPT --activations DIR`: simulation, absorption and splitting per granularity group."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.interp.measure import InterpConfig

HELP = "interpretability per granularity group: simulation correlation, absorption, splitting"


@dataclass
class InterpRun:
    """What to measure on, and where to write."""

    checkpoint: str = field(metadata={"positional": True})
    """Checkpoint directory."""
    activations: str
    """Held-out activation cache directory (with token ids, as `progsae harvest` stores them)."""
    out: str | None = None
    """JSON file to write (default: CKPT/interp.json, beside metrics.json, which `progsae report` reads)."""
    write: bool = True
    """Write the JSON file (else only print the tables)."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.interp.measure import InterpConfig

    run_options, config = add_dataclass(parser, InterpRun), add_dataclass(parser, InterpConfig)
    parser.set_defaults(run=lambda args: run(config.build(args), run_options.build(args)))


def run(cfg: InterpConfig, opts: InterpRun) -> int:
    from pathlib import Path

    from progsae.trainer.interp.measure import INTERP, format_table, interp, save_result

    cfg.validate()
    result = interp(opts.checkpoint, opts.activations, cfg, log=lambda msg: print(msg, flush=True))
    print(format_table(result))
    if opts.write:
        f = save_result(result, opts.out or Path(opts.checkpoint) / INTERP)
        print(f"wrote {f}")
    return 0
