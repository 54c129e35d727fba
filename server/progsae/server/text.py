"""Text -> tokens -> activations at a checkpoint's layer, via the shared language-model loader (progsae.lm).

Kept apart from the codec: in Ray Serve it runs in its own deployment (`LanguageModel`)
so the LM and the SAE codec scale independently. Loaded LMs are cached per process: every
TextBackend of a process shares them, and one lock, since a model object is not safe to run from two
threads at once (hidden_at_layer and forward_from_layer hook or swap its layers while they run). A
text stream's per-rung fidelity (progsae.server.fidelity) runs the layers after the SAE's on the
same model, under the same lock (`holding`): in Ray, in the codec replica that streams.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ServiceError, Status, invalid
from .registry import ModelCard, ServedModel

if TYPE_CHECKING:
    from progsae.lm.models import LoadedModel


@dataclass(frozen=True)
class TextActivations:
    """What the language model produced for one text."""

    token_ids: list[int]
    tokens: list[str]
    activations: np.ndarray
    """[N, d_model] float32, one row per token (the start-of-context token excluded)."""
    language_model: str
    layer: int
    text_tokens: int = 0
    """Tokens the whole text has (more than len(token_ids) when it was cut at max_tokens)."""
    lm_ms: float = 0.0
    """Time the language model took, ms (set by the servicer, which times the whole call to it)."""


def _models():
    try:
        from progsae.lm import models
    except ImportError as e:  # transformers is optional for serving codes
        raise ServiceError(Status.UNIMPLEMENTED, f"text encoding unavailable: {e}") from None
    return models


def available(card: ModelCard) -> bool:
    """Whether EncodeText can run for this model (LM named, resolvable offline, layer known)."""
    if not card.meta.model or card.meta.layer is None:
        return False
    try:
        _models().resolve_model(card.meta.model)
    except (ServiceError, ValueError, OSError):
        return False
    return True


def language_model_of(models: Sequence[ServedModel]) -> tuple[str, list[int]]:
    """The one language model of `models` and their layers, ascending (FAILED_PRECONDITION for a model
    that names none, INVALID_ARGUMENT for models of different language models)."""
    for m in models:
        if not m.meta.model or m.meta.layer is None:
            raise ServiceError(Status.FAILED_PRECONDITION,
                               f"model {m.id} names no language model and layer; text needs both")
    lms = sorted({str(m.meta.model) for m in models})
    if len(lms) > 1:
        raise invalid(f"models of one text call must share their language model; these name {lms}")
    return lms[0], sorted({int(m.meta.layer) for m in models})  # pyright: ignore[reportArgumentType]


_LOCK = threading.RLock()
_LOADED: dict[str, LoadedModel] = {}
"""The process's loaded LMs, oldest first (guarded by _LOCK)."""


class TextBackend:
    """Loads LMs on first use (the process's cache) and runs texts up to a layer."""

    def __init__(self, max_models: int = 1):
        self._lock = _LOCK
        self._loaded = _LOADED
        self._max = max_models

    def lm(self, alias: str) -> LoadedModel:
        """The loaded model (loading it first; at most `max_models` stay loaded)."""
        with self._lock:
            if alias not in self._loaded:
                try:
                    _models().resolve_model(alias)
                    loaded = _models().load_model(alias)
                except ValueError as e:
                    raise ServiceError(Status.FAILED_PRECONDITION,
                                       f"language model {alias!r} unavailable: {e}") from None
                while self._loaded and len(self._loaded) >= self._max:
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[alias] = loaded
            return self._loaded[alias]

    @contextmanager
    def holding(self, alias: str) -> Iterator[LoadedModel]:
        """The loaded model, run by no other thread of the process while the block runs."""
        with self._lock:
            yield self.lm(alias)

    def run(self, alias: str | None, layer: int | None, text: str, max_tokens: int) -> TextActivations:
        (by_layer,) = self.run_many(alias, (layer,), (text,), max_tokens)
        return next(iter(by_layer.values()))

    def run_many(self, alias: str | None, layers: Sequence[int | None], texts: Sequence[str],
                 max_tokens: int) -> list[dict[int, TextActivations]]:
        """Each text's activations at each of `layers`, from one pass of the LM over the texts (one
        padded batch) that stops at the deepest layer: [text][layer]."""
        if not alias or any(layer is None for layer in layers):
            raise ServiceError(Status.FAILED_PRECONDITION,
                               "this checkpoint names no language model and layer; text needs both")
        if not texts:
            raise invalid("no text")
        for i, text in enumerate(texts):
            if not text.strip():
                raise invalid("text is empty" if len(texts) == 1 else f"text {i} is empty")
        import torch

        models = _models()
        try:
            models.resolve_model(alias)
        except ValueError as e:
            raise ServiceError(Status.FAILED_PRECONDITION, f"language model {alias!r} unavailable: {e}") from None
        lm = self.lm(alias)
        all_ids = [lm.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        ids = [a[: max(1, max_tokens)] for a in all_ids]
        if not all(ids):
            raise invalid("text has no tokens")
        # Right-padded: a causal LM's positions never attend to later ones, so each text's own positions
        # are what it alone would give, and no attention mask is needed (one text: no padding at all).
        width = max(map(len, ids))
        input_ids = torch.tensor([[lm.start_token_id, *i, *[lm.start_token_id] * (width - len(i))] for i in ids])
        wanted = sorted({int(layer) for layer in layers if layer is not None})
        with self._lock, torch.inference_mode():
            try:
                hidden = models.hidden_at_layers(lm.model, input_ids, wanted)
            except ValueError as e:
                raise ServiceError(Status.FAILED_PRECONDITION, f"language model {alias!r}: {e}") from None
        out = []
        for row, (kept, whole) in enumerate(zip(ids, all_ids, strict=True)):
            tokens = [lm.tokenizer.decode([t]) for t in kept]
            acts = {layer: hidden[layer][row, 1:1 + len(kept)].float().numpy() for layer in wanted}
            out.append({layer: TextActivations(list(map(int, kept)), tokens, acts[layer], lm.alias, layer, len(whole))
                        for layer in wanted})
        return out
