"""`progsae train`: a TopK or Matryoshka SAE on an activation cache (TrainConfig + TrainRun)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.trainer.training.config import TrainConfig

HELP = "train a TopK or Matryoshka SAE on an activation cache (resumes after interruption)"
DESCRIPTION = "Train a TopK or Matryoshka SAE. Rerun the same command after an interruption to resume."


@dataclass
class TrainRun:
    """Where a training run reads and writes, and how it runs (none of it changes the weights)."""

    activations: str
    """Activation cache directory (progsae harvest)."""
    out: str
    """Checkpoint directory to write (its resumable state lives in OUT.training/)."""
    threads: int = 0
    """torch CPU threads (0: torch's choice)."""
    device: str = "cpu"
    """Where to train: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU). Resume on
    the same device type for weights identical to an uninterrupted run."""
    progress: bool = True
    """Show a progress bar (stderr)."""
    metrics_port: int | None = None
    """Serve Prometheus progress gauges on this port."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.trainer.training.config import TrainConfig

    run_options, config = add_dataclass(parser, TrainRun), add_dataclass(parser, TrainConfig)
    parser.set_defaults(run=lambda args: run(config.build(args), run_options.build(args)))


def run(cfg: TrainConfig, opts: TrainRun) -> int:
    cfg.validate()  # before importing the trainer or touching the disk
    import torch

    from progsae.trainer.training.train import train

    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = train(cfg, opts.activations, opts.out, progress=opts.progress, metrics_port=opts.metrics_port,
                device=opts.device)
    print(f"wrote {out}")
    return 0
