"""The on-disk activation cache: sharded .npy files + manifest.json, memory-mapped on read.

    DIR/manifest.json         what, from where, how many; sha256 per shard; "complete"
    DIR/acts-00000.npy        float32 [n_tokens, d_model]   (one row per token, BOS excluded)
    DIR/tokens-00000.npy      int32   [n_contexts, context] token ids of the contexts;
                               position 0 is the start token (`Manifest.bos`), never stored,
                               so a shard holds whole contexts and the activation of context
                               c, position p >= 1 is acts row c * (context - 1) + p - 1

Shards are written with temp + rename and registered in the manifest only once whole, so
an interrupted harvest resumes from the last registered shard and the finished cache is
byte-identical to an uninterrupted one (the writer must be deterministic).

The outlier policy (shared/DATA.md, outlier_policy.py) is applied when *reading*: rows whose
norm exceeds `outliers.factor` x the cache's median token norm are excluded, and counted.
Training and evaluation read through the same `ActivationCache`, so they apply the same policy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from progsae.sae.checkpoint import atomic_write
from progsae.trainer.data.outlier_policy import DEFAULT, OutlierPolicy

FORMAT = "progsae-acts/1"
MANIFEST = "manifest.json"


class CacheError(ValueError):
    """An activation cache is missing, incomplete, corrupted or of the wrong kind."""


@dataclass
class Shard:
    """One shard of the cache."""

    acts: str
    """File name of the float32 [n, d_model] activations."""
    tokens: str
    """File name of the int32 [n_contexts, context] token ids ("" if not stored)."""
    n_tokens: int
    """Rows in `acts`."""
    n_contexts: int
    """Contexts the rows came from."""
    sha256: str
    """sha256 of the acts file's bytes."""
    norm_median: float = 0.0
    """Median token norm within this shard (the cache median is the median of these)."""


@dataclass
class Manifest:
    """What an activation cache holds and where it came from."""

    model: str
    """Model alias or path."""
    layer: int
    """hidden_states index (0 = embeddings, transformers' convention)."""
    d_model: int
    """Activation width."""
    corpus: list[str]
    """Corpora the text came from, in order."""
    split: str
    """"train" or "heldout" (a document's split is fixed by a hash of its id)."""
    context: int
    """Tokens per context, including the start token whose position is dropped."""
    target_tokens: int
    """Tokens asked for (`--tokens`)."""
    bos: str = ""
    """Start-of-context token prepended to each context (its position is never stored)."""
    dtype: str = "float32"
    """Stored dtype of the activations."""
    shards: list[Shard] = field(default_factory=list)
    """Registered, complete shards, in order."""
    complete: bool = False
    """True once all `target_tokens` are written (or the corpus ran out)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Harvest provenance (seed, model cache, corpus sizes, tokens/s...)."""
    format: str = FORMAT

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def norm_median(self) -> float:
        return float(np.median([s.norm_median for s in self.shards])) if self.shards else 0.0

    def save(self, directory: Path) -> None:
        atomic_write(directory / MANIFEST, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        f = Path(directory) / MANIFEST
        if not f.is_file():
            raise CacheError(f"{directory}: not an activation cache (no {MANIFEST})")
        try:
            raw = json.loads(f.read_text())
            if raw.get("format") != FORMAT:
                raise CacheError(f"{f}: unsupported cache format {raw.get('format')!r}")
            raw["shards"] = [Shard(**s) for s in raw.get("shards", [])]
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise CacheError(f"{f}: malformed manifest ({e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a signal leaves no half-written file
        raise


class CacheWriter:
    """Appends shards to a cache directory; resumable (see module docstring)."""

    def __init__(self, directory: str | Path, manifest: Manifest):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / MANIFEST).exists():
            old = Manifest.load(self.dir)
            for key in ("model", "layer", "d_model", "corpus", "split", "context", "target_tokens", "bos"):
                if getattr(old, key) != getattr(manifest, key):
                    raise CacheError(
                        f"{self.dir}: existing cache has {key}={getattr(old, key)!r}, asked for "
                        f"{getattr(manifest, key)!r}; use another --out or delete it"
                    )
            manifest = old
        self.manifest = manifest
        self.manifest.save(self.dir)

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    def add_shard(self, acts: np.ndarray, tokens: np.ndarray | None = None) -> Shard:
        """Write one shard whole, then register it in the manifest."""
        if acts.ndim != 2 or acts.shape[1] != self.manifest.d_model:
            raise CacheError(f"shard of shape {acts.shape} does not match d_model={self.manifest.d_model}")
        i = self.n_shards
        a_name, t_name = f"acts-{i:05d}.npy", (f"tokens-{i:05d}.npy" if tokens is not None else "")
        _atomic_npy(self.dir / a_name, np.ascontiguousarray(acts, dtype=np.float32))
        if tokens is not None:
            _atomic_npy(self.dir / t_name, np.ascontiguousarray(tokens, dtype=np.int32))
        norms = np.linalg.norm(acts.astype(np.float32), axis=1)
        shard = Shard(
            a_name, t_name, int(acts.shape[0]), int(0 if tokens is None else tokens.shape[0]),
            _sha256(self.dir / a_name), float(np.median(norms)) if norms.size else 0.0,
        )
        self.manifest.shards.append(shard)
        self.manifest.save(self.dir)
        return shard

    def finish(self, **extra: Any) -> Manifest:
        self.manifest.complete = True
        self.manifest.extra.update(extra)
        self.manifest.save(self.dir)
        return self.manifest


class OutlierStats(dict):
    """{"threshold": norm, "factor": the policy's factor (None: every row kept), "excluded": rows, "total": rows}."""


class ActivationCache:
    """Read side: memory-mapped shards, outlier policy, shuffled or ordered batches."""

    def __init__(self, directory: str | Path, outliers: OutlierPolicy = DEFAULT,
                 verify: bool = False, require_complete: bool = True):
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        if require_complete and not self.manifest.complete:
            raise CacheError(f"{self.dir}: cache is incomplete; rerun the harvest command to finish it")
        if not self.manifest.shards:
            raise CacheError(f"{self.dir}: cache holds no tokens")
        if not isinstance(outliers, OutlierPolicy):
            raise TypeError(f"outliers must be an OutlierPolicy, got {outliers!r}")
        self.outlier_policy = outliers
        self._acts: list[np.ndarray] = []
        for s in self.manifest.shards:
            f = self.dir / s.acts
            if not f.is_file():
                raise CacheError(f"{f}: shard missing")
            if verify and _sha256(f) != s.sha256:
                raise CacheError(f"{f}: checksum mismatch (corrupted shard)")
            a = np.load(f, mmap_mode="r")
            if a.shape != (s.n_tokens, self.manifest.d_model):
                raise CacheError(f"{f}: shape {a.shape}, manifest says ({s.n_tokens}, {self.manifest.d_model})")
            self._acts.append(a)
        self.threshold = outliers.threshold(self.manifest.norm_median)
        self._keep: list[np.ndarray] | None = None

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    def keep_masks(self) -> list[np.ndarray]:
        """Per shard, a bool mask of rows kept by the outlier policy (computed once)."""
        if self._keep is None:
            self._keep = [np.linalg.norm(np.asarray(a), axis=1) <= self.threshold for a in self._acts]
        return self._keep

    def outliers(self) -> OutlierStats:
        kept = sum(int(m.sum()) for m in self.keep_masks())
        total = self.manifest.n_tokens
        return OutlierStats(threshold=self.threshold, factor=self.outlier_policy.factor, excluded=total - kept,
                            total=total)

    def __len__(self) -> int:
        return sum(int(m.sum()) for m in self.keep_masks())

    def rows(self) -> np.ndarray:
        """Global indices (over all shards) of kept rows, in cache order."""
        offs = np.cumsum([0] + [s.n_tokens for s in self.manifest.shards])
        return np.concatenate([np.flatnonzero(m) + o for m, o in zip(self.keep_masks(), offs[:-1])])

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """float32 [len(rows), d_model] for global row indices (any order)."""
        offs = np.cumsum([0] + [s.n_tokens for s in self.manifest.shards])
        shard = np.searchsorted(offs, rows, side="right") - 1
        out = np.empty((len(rows), self.d_model), dtype=np.float32)
        for s in np.unique(shard):
            sel = shard == s
            local = rows[sel] - offs[s]
            order = np.argsort(local, kind="stable")  # sorted reads are kind to the page cache
            out[np.flatnonzero(sel)[order]] = self._acts[s][local[order]]
        return torch.from_numpy(out)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                start_batch: int = 0, epochs: int = 1) -> Iterator[torch.Tensor]:
        """Batches of kept rows; with shuffle, a fixed permutation per (seed, epoch) across shards.

        `start_batch` skips that many batches (for resuming training deterministically).
        """
        rows = self.rows()
        n_batches = len(rows) // batch_size if shuffle else -(-len(rows) // batch_size)
        b = 0
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch]).permutation(rows) if shuffle else rows
            for i in range(n_batches):
                if b >= start_batch:
                    yield self.gather(order[i * batch_size:(i + 1) * batch_size])
                b += 1

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        rows = self.rows()
        pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
        return self.gather(rows[np.sort(pick)])

    def tokens(self) -> np.ndarray:
        """int32 [n_contexts, context] of every stored context, in cache order."""
        parts = [np.load(self.dir / s.tokens, mmap_mode="r") for s in self.manifest.shards if s.tokens]
        if not parts:
            raise CacheError(f"{self.dir}: this cache stores no token ids")
        return np.concatenate(parts)
