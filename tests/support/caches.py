"""Tiny synthetic activation caches and training configs, for the trainer's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from progsae.trainer.data.activations import CacheWriter, Manifest
from progsae.trainer.training.config import TrainConfig

D = 8
"""d_model of the default cache."""


def make_cache(path: Path, d: int = D, n: int = 1200, model: str = "synthetic", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(48, d))
    w = CacheWriter(path, Manifest(model=model, layer=3, d_model=d, corpus=["synthetic"], split="train",
                                   context=9, target_tokens=n))
    for _ in range(3):
        codes = rng.exponential(size=(n // 3, 48)) * (rng.random((n // 3, 48)) < 0.1)
        w.add_shard((3.0 + codes @ dirs).astype(np.float32))
    w.finish()
    return path


def tiny(arch: str = "matryoshka", **kw) -> TrainConfig:
    base = dict(arch=arch, d_sae=32, k=4, granularities=(4, 8, 16, 32), batch_size=32, seed=3,
                checkpoint_every=5, log_every=5)
    base.update(kw)
    return TrainConfig(**base)
