"""EleutherAI sparsify checkpoints (`SparseCoder.save_to_disk`): read as progsae TopK SAEs.

A sparsify folder holds cfg.json (SparseCoderConfig fields plus "d_in") and sae.safetensors:

    encoder.weight [M, d]   encoder.bias [M]   W_dec [M, d]   b_dec [d]

sparsify encodes top_k(ReLU(encoder(x - b_dec))) and decodes top_acts @ W_dec + b_dec. ReLU
commutes with top-k, so this is progsae's TopK SAE with W_enc = encoder.weight^T, b_enc =
encoder.bias, same W_dec and b_dec (the codes may differ only in which zero-valued latents
fill a row). normalize_decoder and multi_topk only shape training. Refused, one line each:
groupmax activation, transcoders (transcode), skip connections (skip_connection, embed_skip),
gram_lookup, and a multi-hookpoint root (`layers.N/` folders: point at one of them). A folder's
name (e.g. "layers.6") is kept as its hook name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

WEIGHTS = "sae.safetensors"
_REFUSED = {
    "transcode": "a transcoder (predicts another module's output)",
    "skip_connection": "a skip connection (W_skip)",
    "embed_skip": "an embedding skip connection",
    "gram_lookup": "an n-gram lookup table subtracted from its input",
}


class SparsifySpec(NamedTuple):
    """What a sparsify cfg.json says."""

    d_in: int
    d_sae: int
    k: int
    hook: str | None
    """The folder's name (sparsify names folders by hookpoint)."""


def is_sparsify(path: Path) -> bool:
    """A folder sparsify wrote: sae.safetensors beside cfg.json (and no SAELens weights)."""
    return (path / WEIGHTS).is_file() and not (path / "sae_weights.safetensors").exists()


def hookpoint_folders(path: Path) -> list[str]:
    """Sub-folders of a multi-hookpoint root (`SparseCoder.load_many` layout)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "cfg.json").is_file()
                  and (p / WEIGHTS).is_file())


def _int(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"field {key!r} has wrong type {type(v).__name__}")
    return v


def parse(cfg: dict[str, Any], path: Path) -> SparsifySpec:
    """Read a sparsify cfg.json; ValueError (one line) for what progsae does not honour."""
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise ValueError(f"sparsify {key}=true is not supported: this is {what}, not an autoencoder progsae serves")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"sparsify activation {activation!r} is not supported (topk)")
    d_in = _int(cfg, "d_in")
    d_sae = _int(cfg, "num_latents", 0) or d_in * _int(cfg, "expansion_factor", 32)
    k = _int(cfg, "k", 32)
    if d_in < 1 or d_sae < 1:
        raise ValueError("d_in and the number of latents must be positive")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k={k} must be in 1..num_latents={d_sae}")
    return SparsifySpec(d_in, d_sae, k, path.resolve().name or None)


def tensor_shapes(spec: SparsifySpec) -> dict[str, tuple[int, ...]]:
    """The tensors sae.safetensors must hold, by name and shape."""
    d, m = spec.d_in, spec.d_sae
    return {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}


def to_saelens_layout(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """sparsify tensors -> progsae's (SAELens) layout: W_enc [d, M], W_dec [M, d], b_enc, b_dec."""
    return {"W_enc": t["encoder.weight"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["encoder.bias"],
            "b_dec": t["b_dec"]}
