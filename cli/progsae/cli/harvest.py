"""`progsae harvest`: a real LM's residual activations at a layer -> an on-disk cache (HarvestConfig),
its forward passes in this process or on a Ray cluster (RayOptions, `--ray-address`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.data.harvest import HarvestConfig
    from progsae.trainer.data.harvest_ray import RayOptions

HELP = "cache a real LM's residual activations at a layer on disk"


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.data.harvest import HarvestConfig
    from progsae.trainer.data.harvest_ray import RayOptions

    config = add_dataclass(parser, HarvestConfig)
    ray = add_dataclass(parser, RayOptions)
    parser.set_defaults(run=lambda args: run(config.build(args), ray.build(args)))


def run(cfg: HarvestConfig, ray: RayOptions | None = None) -> int:
    from progsae.trainer.data.harvest import harvest
    from progsae.trainer.data.harvest_ray import RayOptions, ray_forward

    forward = ray_forward(cfg, ray or RayOptions(), lambda msg: print(msg, file=sys.stderr))
    m = harvest(cfg, forward=forward)
    print(f"{cfg.out}  {m.n_tokens} tokens  model={m.model} layer={m.layer} d_model={m.d_model} bos={m.bos!r}")
    return 0
