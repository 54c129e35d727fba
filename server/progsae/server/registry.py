"""Which checkpoints a server may serve, by id, and loading them (with an LRU for plain servers).

A model id is a checkpoint's path relative to the checkpoint root, optionally followed by
``@ordering`` (``topk@mean_sq``) to serve a stored pruning ordering; a bare path serves the
checkpoint's default ordering ("mean_sq" when stored, else the trained order). Ids are
checked before any file is touched: no absolute paths, no ``..``, nothing that resolves
(through symlinks) outside the root.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from progsae.sae import checkpoint
from progsae.sae.codec import SAE
from progsae.sae.devices import resolve_device

from .errors import invalid, not_found

_ID = re.compile(r"^[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*$")
_ORDERING = re.compile(r"^[A-Za-z0-9_]+$")
MAX_ID_CHARS = 256
PREFERRED_ORDERING = "mean_sq"


@dataclass(frozen=True)
class ModelRef:
    """A resolved, validated model id."""

    name: str
    """Checkpoint path relative to the root ("mat", "runs/topk")."""
    ordering: str
    """Ordering to apply: "none" or a stored criterion."""
    path: Path
    """Absolute checkpoint directory."""

    @property
    def id(self) -> str:
        """Canonical id: always names the ordering."""
        return f"{self.name}@{self.ordering}"


@dataclass
class ModelCard:
    """What a model is, without its weights (ListModels / GetModel)."""

    spec: ModelRef
    meta: checkpoint.CheckpointMeta
    orderings: tuple[str, ...]
    """Orderings stored in the checkpoint."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Evaluation summary (metrics.json)."""

    @property
    def ladder(self) -> tuple[int, ...]:
        return tuple(self.meta.granularities)


@dataclass
class ServedModel:
    """A loaded model ready to encode/decode."""

    card: ModelCard
    sae: SAE

    @property
    def device(self) -> torch.device:
        """Where the weights live (inputs are moved there, outputs back to the CPU)."""
        return self.sae.W_dec.device

    @property
    def id(self) -> str:
        return self.card.spec.id

    @property
    def spec(self) -> ModelRef:
        return self.card.spec

    @property
    def meta(self) -> checkpoint.CheckpointMeta:
        return self.card.meta

    @property
    def ladder(self) -> tuple[int, ...]:
        return self.card.ladder

    @property
    def d_in(self) -> int:
        return self.card.meta.d_in

    @property
    def d_sae(self) -> int:
        return self.card.meta.d_sae

    @property
    def nbytes(self) -> int:
        """Bytes of its weights (what holding it costs)."""
        sae = self.sae
        return sum(t.numel() * t.element_size() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))


@dataclass(frozen=True)
class RegistryConfig:
    """Where checkpoints live and which may be served."""

    root: str
    """Checkpoint root directory; every model id is a path under it."""
    models: tuple[str, ...] = ()
    """Checkpoint paths (relative to root) that may be served; empty = every checkpoint under root."""
    default_model: str = ""
    """Id used when a request leaves model_id empty; empty = the first of `models` (or of the scan)."""
    cache_size: int = 4
    """Loaded models kept per process by `Registry.get` (LRU); Ray Serve uses serve.multiplexed instead."""
    device: str = "cpu"
    """Where loaded models live: "cpu", "cuda", "cuda:N", or "auto" (CUDA when available)."""


MAX_RESOLVED = 4096
"""Resolved ids kept by `Registry.resolve`."""


class Registry:
    """Resolves ids to checkpoints under one root; loads them; keeps an LRU of loaded models."""

    def __init__(self, config: RegistryConfig):
        self.config = config
        self.root = Path(config.root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"checkpoint root {config.root} is not a directory")
        self._allowed = {m.strip("/") for m in config.models} or None
        self._orderings: dict[str, tuple[str, ...]] = {}
        self._cards: dict[str, ModelCard] = {}
        self._cache: OrderedDict[str, ServedModel] = OrderedDict()
        self._resolved: dict[str, ModelRef] = {}
        self._lock = threading.Lock()
        self.loads = 0
        """Checkpoints loaded (`load`), cached or not."""
        self.device = resolve_device(config.device)
        names = self.names()
        if not names:
            raise FileNotFoundError(f"no checkpoint found under {self.root}")
        self.default_id = self.resolve(config.default_model or names[0]).id

    # --- ids ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Servable checkpoint paths (relative to the root), in a stable order."""
        if self._allowed is not None:
            return [m.strip("/") for m in self.config.models]
        found = sorted(p.parent.relative_to(self.root).as_posix() for p in self.root.rglob(checkpoint.CFG))
        return [n for n in found if n != "." and not any(part.startswith(".") for part in n.split("/"))]

    def resolve(self, model_id: str) -> ModelRef:
        """Validate an id (INVALID_ARGUMENT) and find its checkpoint (NOT_FOUND). Found ids are cached per
        id string (no realpath or stat per call); a checkpoint removed since then fails on load (NOT_FOUND)."""
        hit = self._resolved.get(model_id)
        if hit is not None:
            return hit
        spec = self._resolve(model_id)
        if len(self._resolved) >= MAX_RESOLVED:
            self._resolved.clear()
        self._resolved[model_id] = spec
        return spec

    def _resolve(self, model_id: str) -> ModelRef:
        model_id = model_id or self.default_id
        if len(model_id) > MAX_ID_CHARS:
            raise invalid(f"model id longer than {MAX_ID_CHARS} characters")
        name, _, ordering = model_id.partition("@")
        if not _ID.match(name) or any(p in (".", "..") for p in name.split("/")):
            raise invalid(f"model id {model_id!r} must be a relative path under the checkpoint root "
                          "(letters, digits, '_.+-', no '..')")
        if ordering and not _ORDERING.match(ordering):
            raise invalid(f"model id {model_id!r}: bad ordering name {ordering!r}")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise invalid(f"model id {model_id!r} escapes the checkpoint root")
        if (self._allowed is not None and name not in self._allowed) or not (path / checkpoint.CFG).is_file():
            raise not_found(f"unknown model {model_id!r}; ListModels shows the served ones")
        stored = self.orderings_of(name, path)
        if not ordering:
            ordering = PREFERRED_ORDERING if PREFERRED_ORDERING in stored else "none"
        elif ordering != "none" and ordering not in stored:
            raise not_found(f"model {name!r} has no ordering {ordering!r} (stored: {', '.join(stored) or 'none'})")
        return ModelRef(name, ordering, path)

    def orderings_of(self, name: str, path: Path) -> tuple[str, ...]:
        if name not in self._orderings:
            try:
                meta = checkpoint.load_meta(path)
            except checkpoint.CheckpointError as e:
                raise not_found(f"model {name!r} is not loadable: {e}") from None
            try:
                stored = tuple(checkpoint.read_orderings(path, meta.d_sae))
            except checkpoint.CheckpointError:  # a damaged ordering file: served in trained order
                stored = ()
            self._orderings[name] = stored
        return self._orderings[name]

    def variants(self) -> list[ModelRef]:
        """Every servable (checkpoint, ordering), default ordering first per checkpoint."""
        out = []
        for name in self.names():
            try:
                default = self.resolve(name)
            except Exception:  # noqa: BLE001  (a broken checkpoint is left out of the list)
                continue
            out.append(default)
            for o in ("none", *self._orderings.get(name, ())):
                if o != default.ordering:
                    out.append(ModelRef(name, o, default.path))
        return out

    # --- loading --------------------------------------------------------------------------

    def load(self, spec: ModelRef) -> ServedModel:
        """Load a checkpoint (no cache)."""
        try:
            ck = checkpoint.load(spec.path, ordering=spec.ordering)
        except checkpoint.CheckpointError as e:
            raise not_found(f"model {spec.id!r} is not loadable: {e}") from None
        card = ModelCard(spec, ck.meta, tuple(ck.orderings), _summary(ck.metrics))
        self._cards[spec.id] = card
        self.loads += 1
        return ServedModel(card, ck.sae.to(device=self.device, dtype=torch.float32))

    def card(self, spec: ModelRef) -> ModelCard:
        """Metadata of a model without loading its weights (cached)."""
        if spec.id not in self._cards:
            try:
                meta = checkpoint.load_meta(spec.path)
                metrics = json.loads((spec.path / checkpoint.METRICS).read_text()) \
                    if (spec.path / checkpoint.METRICS).is_file() else {}
            except (checkpoint.CheckpointError, ValueError, OSError) as e:
                raise not_found(f"model {spec.id!r} is not loadable: {e}") from None
            self._cards[spec.id] = ModelCard(spec, meta, self.orderings_of(spec.name, spec.path), _summary(metrics))
        return self._cards[spec.id]

    def get(self, model: ModelRef | str) -> ServedModel:
        """Load through the LRU cache (thread-safe); an id is resolved first."""
        spec = self.resolve(model) if isinstance(model, str) else model
        with self._lock:
            hit = self._cache.get(spec.id)
            if hit is not None:
                self._cache.move_to_end(spec.id)
                return hit
        served = self.load(spec)
        with self._lock:
            self._cache[spec.id] = served
            self._cache.move_to_end(spec.id)
            while len(self._cache) > max(1, self.config.cache_size):
                self._cache.popitem(last=False)
        return served

    def loaded(self) -> dict[str, ServedModel]:
        """The models this process holds, by id, least recently used first."""
        with self._lock:
            return dict(self._cache)


def _summary(metrics: Any) -> dict[str, Any]:
    """The JSON-safe evaluation summary of a metrics.json."""
    if not isinstance(metrics, dict):
        return {}
    summary = metrics.get("summary", metrics)
    try:
        json.dumps(summary, allow_nan=False)
    except (TypeError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}
