"""The `progsae` command: one subcommand per job, one module per subcommand (`progsae.cli.<name>`).

Each command module has `HELP` (its line in `progsae --help`) and `configure(parser)`, which adds
the flags generated from the command's config dataclasses (progsae.clients.flags) and sets
`run`: a function of the parsed arguments that builds those dataclasses and does the job.

Command modules import only the standard library at the top, so listing the commands is
instant; `configure` imports the config classes (for some, torch), and `main` configures only
the command it runs. User errors print one line, `progsae CMD: error: ...`, and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

from progsae.clients.flags import Parser

COMMANDS = ("harvest", "train", "order", "eval", "features", "report", "serve", "client", "inspect", "demo",
            "outliers", "interp")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_parser(configure: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `progsae` parser with every subcommand; those in `configure` (all when None) get their flags."""
    chosen = set(COMMANDS if configure is None else configure)
    parser = Parser(prog="progsae", description="Progressive sparse autoencoders: train, order, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"progsae.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        if name in chosen:
            module.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(configure=argv[:1])
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:  # CheckpointError and CacheError are ValueErrors
        print(f"progsae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"progsae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m progsae.cli.main` runs too, not just `-m progsae.cli`
    sys.exit(main())
