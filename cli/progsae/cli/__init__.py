"""The `progsae` command: one subcommand per job (see `main`)."""

from .main import UserError, build_parser, main

__all__ = ["UserError", "build_parser", "main"]
