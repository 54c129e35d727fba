"""The feature-card files of a checkpoint: read by the dashboard, written by `progsae features`.

    CKPT/features.safetensors  density, mean_act, max_act [M]; top_value [M, N]; top_context,
                               top_position [M, N]; window_ids, window_acts [M, N, W];
                               promoted_ids, promoted_logits [M, P]   (M latents in trained order)
    CKPT/features.json         format, settings, provenance, `vocab` {id: decoded string}, and the
                               sha256 of the weights they were computed from

Both files are written atomically; loading never unpickles. How the cards are computed is
progsae.trainer.features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from .checkpoint import WEIGHTS, atomic_write

FORMAT = "progsae-features/1"
TENSORS, INFO = "features.safetensors", "features.json"
PAD = -1
"""Index of an empty slot (no context, no token)."""
DENSE = 0.1
"""A latent that fires on at least this fraction of the cards' tokens is labelled dense: its top
contexts then say little about what it means (a TopK SAE's average is k / M, under 1% here)."""
POSITION_SHARE, POSITION_PEAKS = 0.75, 3
"""A latent with at least POSITION_PEAKS top contexts, this share of which peak at one position of
their context, is labelled a position latent (contexts are slices of packed documents, so a
position says nothing about the text there)."""


@dataclass
class FeatureCards:
    """Every latent's card as arrays (see the module docstring), plus its string side."""

    tensors: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict[str, Any])

    @property
    def d_sae(self) -> int:
        return int(self.tensors["density"].shape[0])

    def card(self, latent: int) -> dict[str, Any]:
        """JSON-ready card of one latent (trained-order index)."""
        if not 0 <= latent < self.d_sae:
            raise IndexError(f"latent {latent} out of range 0..{self.d_sae - 1}")
        t = self.tensors
        vocab: dict[str, str] = self.info.get("vocab", {})

        def tok(i: int) -> str:
            return vocab.get(str(i), f"<{i}>")

        contexts: list[dict[str, Any]] = []
        for s in range(t["top_value"].shape[1]):
            if int(t["top_context"][latent, s]) < 0:
                break
            ids = _ints(t["window_ids"][latent, s])
            acts = _floats(t["window_acts"][latent, s])
            keep = [j for j, i in enumerate(ids) if i != PAD]
            contexts.append({
                "value": round(float(t["top_value"][latent, s]), 5),
                "context": int(t["top_context"][latent, s]), "position": int(t["top_position"][latent, s]),
                "tokens": [tok(ids[j]) for j in keep], "acts": [round(acts[j], 4) for j in keep],
                "peak": keep.index(self.info["window"]) if self.info["window"] in keep else 0,
            })
        promoted = [{"token": tok(i), "logit": round(v, 4)}
                    for i, v in zip(_ints(t["promoted_ids"][latent]), _floats(t["promoted_logits"][latent]))
                    if i != PAD]
        return {"latent": latent, "density": float(t["density"][latent]), "mean": float(t["mean_act"][latent]),
                "max": float(t["max_act"][latent]), "contexts": contexts, "promoted": promoted}

    def label(self, latent: int, words: int = 2) -> str:
        """A short name for a latent's chip: its `kind` when it is a position or dense latent, else the
        distinct tokens its top contexts peak on, at most `words` ("cat · dog"), else its first
        logit-lens tokens, else "" (no context, no lens)."""
        if kind := self.kind(latent):
            return kind
        t = self.tensors
        vocab: dict[str, str] = self.info.get("vocab", {})
        w = int(self.info.get("window", 0))
        peaks = [int(t["window_ids"][latent, s, w]) for s in range(t["top_context"].shape[1])
                 if int(t["top_context"][latent, s]) >= 0]
        out: list[str] = []
        for i in peaks or _ints(t["promoted_ids"][latent]):
            word = vocab.get(str(i), f"<{i}>").strip() or repr(vocab.get(str(i), ""))
            if i != PAD and word not in out:
                out.append(word)
            if len(out) == words:
                break
        return " · ".join(out)

    def kind(self, latent: int) -> str:
        """What a latent is besides its tokens, from the same data as its label: "position (first
        token)" (or "token p") when its top contexts mostly peak at one position (POSITION_SHARE), "dense
        (fires on N% of tokens)" when it fires on at least DENSE of them, both joined by " · ", else ""."""
        if not 0 <= latent < self.d_sae:
            raise IndexError(f"latent {latent} out of range 0..{self.d_sae - 1}")
        t = self.tensors
        out: list[str] = []
        if "top_position" in t:  # position 0 is the start token, so 1 is a text's first token
            where = [p for p, c in zip(_ints(t["top_position"][latent]), _ints(t["top_context"][latent])) if c >= 0]
            top = max(set(where), key=where.count) if where else 0
            if len(where) >= POSITION_PEAKS and where.count(top) >= POSITION_SHARE * len(where):
                out.append("position (first token)" if top == 1 else f"position (token {top})")
        density = float(t["density"][latent])
        if density >= DENSE:
            out.append(f"dense (fires on {100 * density:.0f}% of tokens)")
        return " · ".join(out)


def _ints(t: Tensor) -> list[int]:
    """A 1-D tensor's values as ints (torch annotates tolist() as a bare list)."""
    return [int(v) for v in t.tolist()]  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType, reportUnknownArgumentType]


def _floats(t: Tensor) -> list[float]:
    """A 1-D tensor's values as floats."""
    return [float(v) for v in t.tolist()]  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType, reportUnknownArgumentType]


# --- storage --------------------------------------------------------------------------------


def weights_digest(checkpoint_dir: str | Path) -> str:
    """The sha256 the checkpoint's weights file carries (cards record it to detect staleness); ""
    when the file is missing or unreadable, or records none (e.g. a SAELens-format checkpoint)."""
    f = Path(checkpoint_dir) / WEIGHTS
    try:
        with cast(Any, safe_open(f, framework="pt")) as fh:  # safetensors' stub leaves its methods unannotated
            header: dict[str, str] = fh.metadata() or {}
            return header.get("progsae_sha256", "")
    except (OSError, SafetensorError):
        return ""


def save(checkpoint_dir: str | Path, cards: FeatureCards) -> Path:
    """Write features.safetensors then features.json (each atomically) into the checkpoint dir."""
    path = Path(checkpoint_dir)
    tensors = {k: v.contiguous() for k, v in cards.tensors.items()}
    info = {**cards.info, "weights_sha256": weights_digest(path)}
    atomic_write(path / TENSORS, st_save(tensors, metadata={"format": FORMAT}))
    atomic_write(path / INFO, json.dumps(info, ensure_ascii=False, separators=(",", ":")))
    return path / TENSORS


def exists(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / TENSORS).is_file() and (Path(checkpoint_dir) / INFO).is_file()


def load(checkpoint_dir: str | Path) -> FeatureCards:
    """Read the cards back (no pickle); `info["stale"]` is set if the weights changed since."""
    path = Path(checkpoint_dir)
    try:
        info: dict[str, Any] = json.loads((path / INFO).read_text())
        with cast(Any, safe_open(path / TENSORS, framework="pt")) as fh:  # (unannotated stub, as above)
            tensors: dict[str, Tensor] = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no readable feature cards ({e}); run `progsae features`") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path / INFO}: unsupported format {info.get('format')!r}")
    info["stale"] = bool(info.get("weights_sha256")) and info["weights_sha256"] != weights_digest(path)
    return FeatureCards(tensors, info)
