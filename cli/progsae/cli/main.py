"""`progsae` command line: one subcommand per job; each module registers its own.

Registration functions must stay cheap: heavy imports (transformers, ray, grpc) belong
inside the command handlers, so `progsae --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing `register(subparsers)`; each adds its subcommands with set_defaults(func=...).
COMMAND_MODULES = [
    "progsae.cli.inspect",
    "progsae.cli.demo",
    "progsae.trainer.harvest",
    "progsae.trainer.train_cmd",
    "progsae.trainer.order",
    "progsae.trainer.eval_cli",
    "progsae.server.cli",
    "progsae.clients.cli",
    "progsae.trainer.features_cmd",
]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="progsae", description="Progressive sparse autoencoders: train, order, evaluate, serve."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from progsae.sae.checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (UserError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"progsae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"progsae {args.command}: interrupted", file=sys.stderr)
        return 130



