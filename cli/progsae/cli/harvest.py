"""`progsae harvest`: a real LM's residual activations at a layer -> an on-disk cache (HarvestConfig)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.harvest import HarvestConfig

HELP = "cache a real LM's residual activations at a layer on disk"


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.harvest import HarvestConfig

    config = add_dataclass(parser, HarvestConfig)
    parser.set_defaults(run=lambda args: run(config.build(args)))


def run(cfg: HarvestConfig) -> int:
    from progsae.trainer.harvest import harvest

    m = harvest(cfg)
    print(f"{cfg.out}  {m.n_tokens} tokens  model={m.model} layer={m.layer} d_model={m.d_model} bos={m.bos!r}")
    return 0
