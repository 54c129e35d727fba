"""`progsae report CKPT... --out DIR`: report.md and PNG figures from evaluated checkpoints."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from progsae.clients.flags import add_dataclass

HELP = "report.md + PNG figures from evaluated checkpoints"


@dataclass
class ReportRun:
    """Which checkpoints to compare, and where to write."""

    checkpoints: tuple[str, ...] = field(metadata={"positional": True})
    """Checkpoint directories with metrics.json (progsae eval)."""
    out: str = "report"
    """Output directory."""


def configure(parser: argparse.ArgumentParser) -> None:
    options = add_dataclass(parser, ReportRun)
    parser.set_defaults(run=lambda args: run(options.build(args)))


def run(opts: ReportRun) -> int:
    from progsae.trainer.report.write import write_report

    f = write_report(list(opts.checkpoints), opts.out)
    print(f"wrote {f} and {len(list(f.parent.glob('*.png')))} figures")
    return 0
