"""Feature cards: what each latent of a checkpoint does, for the dashboard.

Per latent (in the checkpoint's trained order, ordering "none"):
  density      fraction of the cache's tokens (outlier policy applied) on which it fires
  mean / max   mean activation over its firing tokens, and the largest one
  top contexts the `top_n` most activating contexts (one peak per context): a window of
               `window` tokens either side of the peak, with the latent's activation at each
  promoted     logit lens: the LM's unembedding applied to the final norm of its decoder row

Two streaming passes over the cache; memory is O(d_sae * top_n * (2 window + 1)), never
O(tokens * d_sae):
  1. in chunks of whole contexts: encode, accumulate fires / sums / maxima, and merge the
     chunk's best (latent, context) peaks into a running [d_sae, top_n] top list (torch.topk);
  2. encode only the rows inside the winning windows, and read each latent's activation there.

Stored beside the weights as CKPT/features.safetensors + features.json: the format, and its
save / load, are progsae.sae.feature_cards (the server reads cards without the trainer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from progsae.sae.codec import SAE, Codes
from progsae.sae.devices import resolve_device
from progsae.sae.feature_cards import FORMAT, PAD, FeatureCards
from progsae.trainer.data.activations import ActivationCache, CacheError

Decode = Callable[[list[int]], list[str]]
"""Token ids -> one display string per id."""
Lens = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Decoder rows [B, d_in] -> (top logits [B, P], token ids [B, P])."""


@dataclass(frozen=True)
class FeatureConfig:
    """How feature cards are computed (recorded in features.json)."""

    top_n: int = 8
    """Top-activating contexts kept per latent (at most one peak per context)."""
    window: int = 8
    """Tokens shown on each side of the peak."""
    promoted: int = 10
    """Promoted output tokens kept per latent."""
    batch_contexts: int = 32
    """Contexts encoded per step of pass 1."""
    batch_rows: int = 4096
    """Rows encoded per step of pass 2."""
    max_tokens: int = field(default=0, metadata={"flags": "--tokens"})
    """Use only the cache's first contexts holding about this many tokens (0 = all)."""
    progress: bool = True
    """Show progress bars (stderr)."""


# --- pass 1: statistics and running top-N ----------------------------------------------------


class TopTracker:
    """Per latent, the `n` largest (value, row) peaks seen so far, one per context."""

    def __init__(self, d_sae: int, n: int):
        self.n = n
        self.value = torch.full((d_sae, n), -float("inf"))
        self.row = torch.full((d_sae, n), PAD, dtype=torch.long)

    def update(self, latent: Tensor, value: Tensor, row: Tensor, ctx: Tensor) -> None:
        """Merge candidate peaks (flat tensors); candidates must come from whole contexts not seen before."""
        if latent.numel() == 0:
            return
        # keep each (latent, context)'s largest entry: sort by value, then stably by key
        key = latent * (int(ctx.max()) + 1) + ctx
        o = torch.argsort(value, descending=True, stable=True)
        o = o[torch.argsort(key[o], stable=True)]
        k = key[o]
        first = torch.ones_like(k, dtype=torch.bool)
        first[1:] = k[1:] != k[:-1]
        o = o[first]
        # within each latent, by value: rank < n survive
        o = o[torch.argsort(value[o], descending=True, stable=True)]
        o = o[torch.argsort(latent[o], stable=True)]
        lat = latent[o]
        new = torch.ones_like(lat, dtype=torch.bool)
        new[1:] = lat[1:] != lat[:-1]
        pos = torch.arange(lat.numel())
        start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), 0).values
        rank = pos - start
        keep = rank < self.n
        cand_v = torch.full_like(self.value, -float("inf"))
        cand_r = torch.full_like(self.row, PAD)
        cand_v[lat[keep], rank[keep]] = value[o][keep]
        cand_r[lat[keep], rank[keep]] = row[o][keep]
        v, j = torch.cat([self.value, cand_v], 1).topk(self.n, dim=1)
        self.value, self.row = v, torch.cat([self.row, cand_r], 1).gather(1, j)


@torch.inference_mode()
def _pass_stats(sae: SAE, cache: ActivationCache, cfg: FeatureConfig, n_ctx: int) -> tuple[dict[str, Tensor], Tensor]:
    m, per_ctx = sae.d_sae, cache.manifest.context - 1
    fires = torch.zeros(m, dtype=torch.float64)
    total = torch.zeros(m, dtype=torch.float64)
    peak = torch.zeros(m)
    top = TopTracker(m, cfg.top_n)
    keep = np.concatenate(cache.keep_masks())
    tokens = 0
    bar = tqdm(total=n_ctx * per_ctx, unit="tok", unit_scale=True, disable=not cfg.progress, desc="features 1/2")
    for c0 in range(0, n_ctx, cfg.batch_contexts):
        c1 = min(n_ctx, c0 + cfg.batch_contexts)
        r0, r1 = c0 * per_ctx, c1 * per_ctx
        rows = np.arange(r0, r1)[keep[r0:r1]]
        bar.update(r1 - r0)
        if rows.size == 0:
            continue
        codes = _encode(sae, cache.gather(rows))
        on = codes.values > 0
        lat, val = codes.indices[on], codes.values[on].float()
        fires.index_add_(0, lat, torch.ones_like(val, dtype=torch.float64))
        total.index_add_(0, lat, val.double())
        peak.scatter_reduce_(0, lat, val, reduce="amax")
        row = torch.from_numpy(rows).unsqueeze(1).expand_as(on)[on]
        top.update(lat, val, row, row // per_ctx)
        tokens += rows.size
    bar.close()
    if tokens == 0:
        raise CacheError(f"{cache.dir}: no tokens left after the outlier policy")
    stats = {"density": (fires / tokens).float(), "mean_act": (total / fires.clamp_min(1)).float(), "max_act": peak,
             "top_value": torch.where(top.row >= 0, top.value, torch.zeros(())).float()}
    return {**stats, "tokens": torch.tensor(tokens)}, top.row


# --- pass 2: windows ------------------------------------------------------------------------


@torch.inference_mode()
def _pass_windows(sae: SAE, cache: ActivationCache, cfg: FeatureConfig, top_row: Tensor,
                  token_ids: np.ndarray) -> dict[str, Tensor]:
    m, n = top_row.shape
    per_ctx, w = cache.manifest.context - 1, cfg.window
    width = 2 * w + 1
    ctx, pos = top_row // per_ctx, top_row % per_ctx + 1  # position 0 is the (unstored) start token
    q = pos.unsqueeze(-1) + torch.arange(-w, w + 1)  # [M, N, W] positions in the context
    valid = (top_row.unsqueeze(-1) >= 0) & (q >= 1) & (q <= per_ctx)
    ids = torch.full((m, n, width), PAD, dtype=torch.int32)
    c_idx, q_idx = ctx.unsqueeze(-1).expand_as(q)[valid], q[valid]
    ids[valid] = torch.from_numpy(np.asarray(token_ids[c_idx.numpy(), q_idx.numpy()], dtype=np.int32))
    acts = torch.zeros(m, n, width)
    e_row = c_idx * per_ctx + q_idx - 1
    e_lat = torch.arange(m).view(m, 1, 1).expand(m, n, width)[valid]
    order = torch.argsort(e_row, stable=True)
    e_row, e_lat = e_row[order], e_lat[order]
    flat = valid.flatten().nonzero().squeeze(1)[order]
    uniq = torch.unique(e_row)
    bar = tqdm(total=int(uniq.numel()), unit="tok", unit_scale=True, disable=not cfg.progress, desc="features 2/2")
    out = torch.zeros(e_row.numel())
    for u0 in range(0, uniq.numel(), cfg.batch_rows):
        chunk = uniq[u0:u0 + cfg.batch_rows]
        codes = _encode(sae, cache.gather(chunk.numpy()))
        lo = int(torch.searchsorted(e_row, chunk[0]))
        hi = int(torch.searchsorted(e_row, chunk[-1], right=True))
        local = torch.searchsorted(chunk, e_row[lo:hi])
        hit = codes.indices[local] == e_lat[lo:hi].unsqueeze(1)
        out[lo:hi] = (codes.values[local] * hit).sum(1).float()
        bar.update(chunk.numel())
    bar.close()
    acts.view(-1)[flat] = out
    return {"top_context": torch.where(top_row >= 0, ctx, PAD), "top_position": torch.where(top_row >= 0, pos, PAD),
            "window_ids": ids, "window_acts": acts}


# --- everything -----------------------------------------------------------------------------


def _encode(sae: SAE, x: Tensor) -> Codes:
    """Codes of x by `sae` on its device, handed back on the CPU (the bookkeeping's side)."""
    codes = sae.encode(x.to(sae.W_dec.device, non_blocking=True))
    return Codes(codes.indices.cpu(), codes.values.cpu())


def compute(sae: SAE, cache: ActivationCache, cfg: FeatureConfig, decode: Decode | None = None,
            lens: Lens | None = None, device: str = "cpu") -> FeatureCards:
    """All cards of `sae` (trained order) over `cache`; `decode` / `lens` add strings and promoted tokens.
    `device` (devices.resolve_device): where the encodes run; statistics and the lens stay on the CPU."""
    if cache.d_model != sae.d_in:
        raise ValueError(f"{cache.dir} holds activations of width {cache.d_model}, the SAE expects d_in={sae.d_in}")
    if cfg.top_n < 1 or cfg.window < 0 or cfg.batch_contexts < 1 or cfg.batch_rows < 1:
        raise ValueError("top_n, batch sizes must be positive and window >= 0")
    token_ids = cache.tokens()
    per_ctx = cache.manifest.context - 1
    n_ctx = min(token_ids.shape[0], cache.manifest.n_tokens // per_ctx)
    if cfg.max_tokens:
        n_ctx = max(1, min(n_ctx, -(-cfg.max_tokens // per_ctx)))
    sae = sae.to(device="cpu", dtype=torch.float32)
    enc = sae.to(resolve_device(device))
    stats, top_row = _pass_stats(enc, cache, cfg, n_ctx)
    tokens = int(stats.pop("tokens"))
    tensors = {**stats, **_pass_windows(enc, cache, cfg, top_row, token_ids)}
    tensors.update(promoted(sae.W_dec, lens, cfg.promoted))
    used = torch.cat([tensors["window_ids"].flatten(), tensors["promoted_ids"].flatten()])
    vocab_ids = sorted(set(torch.unique(used[used >= 0]).tolist()))
    strings = decode(vocab_ids) if decode is not None and vocab_ids else [f"<{i}>" for i in vocab_ids]
    info = {"format": FORMAT, "top_n": cfg.top_n, "window": cfg.window, "promoted": cfg.promoted,
            "tokens": tokens, "contexts": n_ctx, "d_sae": sae.d_sae, "order": "none",
            "activations": str(cache.dir), "model": cache.manifest.model, "layer": cache.manifest.layer,
            "outlier_factor": cache.outlier_policy.factor,
            "logit_lens": lens is not None, "vocab": dict(zip(map(str, vocab_ids), strings))}
    return FeatureCards(tensors, info)


class LogitLens:
    """A `Lens` and a `Decode` from a loaded language model: decoder direction -> final norm ->
    unembedding -> top-p logits, and token ids -> strings with its tokenizer."""

    def __init__(self, lm: Any, p: int):
        model = lm.model
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None) or getattr(base, "ln_f", None)
        if norm is None:
            raise ValueError(f"cannot find the final norm of {type(model).__name__}")
        self.norm = norm
        self.unembed = model.get_output_embeddings()
        self.tokenizer, self.p = lm.tokenizer, p

    def __call__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            logits = self.unembed(self.norm(rows.unsqueeze(0)))[0]
            return logits.topk(self.p, dim=-1)

    def decode(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


@torch.inference_mode()
def promoted(W_dec: Tensor, lens: Lens | None, p: int, batch: int = 256) -> dict[str, Tensor]:
    """Top-p promoted token ids and logits per decoder row (PAD / 0 without a lens)."""
    m = W_dec.shape[0]
    ids, logits = torch.full((m, p), PAD, dtype=torch.int32), torch.zeros(m, p)
    if lens is not None:
        for i in range(0, m, batch):
            v, j = lens(W_dec[i:i + batch].float())
            logits[i:i + batch], ids[i:i + batch] = v.float(), j.int()
    return {"promoted_ids": ids, "promoted_logits": logits}
