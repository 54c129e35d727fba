"""Tiny synthetic activation caches and checkpoints for the eval / report tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from progsae.sae import checkpoint
from progsae.sae import ordering as ordmod
from progsae.sae.codec import SAE
from progsae.trainer.data.activations import CacheWriter, Manifest

D, M, K = 32, 64, 4
LADDER = (8, 16, 32, 64)
CONTEXT = 9  # 8 stored positions per context (position 0, the start token, is never stored)
BOS = 1
VOCAB = 97


def atoms(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)


def sample(n: int, seed: int) -> torch.Tensor:
    """Sparse power-law sources over the atoms, plus a little noise and an offset."""
    g = torch.Generator().manual_seed(seed)
    freq = 0.15 * torch.arange(1, M + 1).float() ** -0.8
    on = torch.rand(n, M, generator=g) < freq
    z = on * (0.5 + torch.rand(n, M, generator=g)) * 2
    return z @ atoms() + 0.02 * torch.randn(n, D, generator=g) + 0.5


def make_cache(directory: Path, n_contexts: int = 64, n_outliers: int = 3, split: str = "heldout",
               model: str = "synthetic", layer: int = 1, d: int = D, shards: int = 2) -> Path:
    """A complete cache whose first position of the first `n_outliers` contexts is huge."""
    per = CONTEXT - 1
    x = sample(n_contexts * per, seed=1)[:, :d] if d <= D else torch.randn(n_contexts * per, d)
    for c in range(n_outliers):
        x[c * per] *= 200.0
    tok = np.random.default_rng(0).integers(2, VOCAB, size=(n_contexts, CONTEXT)).astype(np.int32)
    tok[:, 0] = BOS
    w = CacheWriter(directory, Manifest(model=model, layer=layer, d_model=d, corpus=["synthetic"],
                                        split=split, context=CONTEXT, target_tokens=n_contexts * per))
    for part in np.array_split(np.arange(n_contexts), shards):
        rows = np.concatenate([np.arange(c * per, (c + 1) * per) for c in part])
        w.add_shard(x[rows].numpy(), tok[part])
    w.finish()
    return Path(directory)


def make_sae() -> SAE:
    a = atoms()
    return SAE(W_enc=a.T.clone(), W_dec=a.clone(), b_enc=torch.zeros(M), b_dec=torch.full((D,), 0.5), k=K)


def make_checkpoints(root: Path, model: str = "synthetic", layer: int = 1) -> tuple[Path, Path]:
    """(topk, matryoshka): the same dictionary, the TopK one shuffled and given both orderings."""
    sae = make_sae()
    shuffle = torch.randperm(M, generator=torch.Generator().manual_seed(3))
    topk = sae.permute(shuffle)  # trained order carries no importance information
    acc = ordmod.ImportanceAccumulator(topk)
    acc.update(topk.encode(sample(4096, seed=2)))
    orderings = {c: acc.ordering(c) for c in ordmod.CRITERIA}
    common = dict(d_in=D, d_sae=M, k=K, granularities=LADDER, model=model, layer=layer, training_tokens=4096)
    t = checkpoint.save(root / "topk", topk, checkpoint.CheckpointMeta(
        architecture="topk", extra={"tokens_per_s": 1000.0, "outlier_factor": 10.0}, **common), orderings)
    m = checkpoint.save(root / "mat", sae, checkpoint.CheckpointMeta(
        architecture="matryoshka", extra={"tokens_per_s": 900.0, "outlier_factor": 10.0}, **common))
    return t, m
