"""`progsae outliers CACHE`: where a cache's huge-norm rows are, as JSON (progsae.trainer.data.outliers)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from progsae.clients.flags import add_dataclass

HELP = "where an activation cache's outlier rows sit (norms, positions, tokens, variance share)"


@dataclass
class OutliersRun:
    """Which cache, and an optional comparison with another start token."""

    cache: str = field(metadata={"positional": True})
    """Activation cache directory (progsae harvest)."""
    start_token_id: int | None = None
    """Also recompute the first contexts with this start token (needs the model) and compare."""
    contexts: int = 48
    """Contexts recomputed for the comparison."""


def configure(parser: argparse.ArgumentParser) -> None:
    options = add_dataclass(parser, OutliersRun)
    parser.set_defaults(run=lambda args: run(options.build(args)))


def run(opts: OutliersRun) -> int:
    from progsae.trainer.data.outliers import analyse, compare_start

    print(json.dumps(analyse(opts.cache), indent=2))
    if opts.start_token_id is not None:
        print(json.dumps(compare_start(opts.cache, opts.start_token_id, opts.contexts), indent=2))
    return 0
