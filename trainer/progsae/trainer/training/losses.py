"""The training forward pass: one top-k, incremental nested-prefix losses, AuxK.

Everything runs in normalised scale (x already multiplied by the scalar c).

Reconstruction loss (TopK and Matryoshka alike): for the ladder G_1 < ... < G_n = M with
normalised weights w_j (TopK: the single rung M, w = 1)

    loss = sum_j w_j * ||x - x_hat_{G_j}||^2 / ||x - mean_batch(x)||^2,

i.e. a weighted sum of batch FVUs (SPEC §5's definition on one batch). All prefix
reconstructions come from the one top-k: each token's codes are grouped by band
[G_{j-1}, G_j) so that a single embedding_bag gives every band's partial decode, and a
running sum over bands gives every x_hat_{G_j} (`_PrefixSSE`, in place, one pass per rung).

Hierarchical top-k (`k_ladder` k'_1 < ... < k'_n = k): the HierarchicalTopK objective of
Balagansky et al. 2025 (arXiv 2505.24473), the mean over k' of the loss of decoding each token
from its k' largest codes of the same one top-k (Gao et al.'s Multi-TopK is the two-rung case
with other weights). The k' rungs are rank bands: each code's band is its rank within its token,
and the same banded embedding_bag and `_PrefixSSE` give every x_hat at k'. With R(k) the
reconstruction loss above at the full k,

    loss = (R(k) + sum_{j<n} FVU(G = M, k'_j)) / n.

TopK: R(k) = FVU(M, k), so this is exactly HierarchicalTopK's mean. Matryoshka: R(k) is the
weighted prefix loss, so the G axis is trained at the full k and the k' axis at the full
dictionary; the corners (G < M and k' < k together) get no term of their own (a full grid would
cost n_G * n_k decodes per step) and are measured, not trained. With no ladder, or (k,), the
loss is R(k), computed by the same operations as before.

AuxK (Gao et al. 2024, SPEC §3): the top-k_aux dead latents reconstruct the detached
residual e = x - x_hat_M of the full reconstruction, decoded without b_dec, as a
normalised MSE ||e_hat - e||^2 / ||e - mean_batch(e)||^2 (Gao's `normalized_mse`), scaled
by `auxk_coef` (1/32). `auxk_norm="batch"` (SAELens's scale) divides by the input batch's
total variance instead, like the reconstruction loss, times min(n_dead / k_aux, 1).

Decoder norm: unit rows (the default: parallel gradient removed, rows renormalised after each
step), or rows free in norm ("free", SAELens's `rescale_acts_by_decoder_norm`): with
n_i = ||W_dec_i||, the top-k runs over pre_i * n_i and the decode over W_dec_i / n_i, i.e.
a reparametrisation of a unit-row SAE (`TrainableSAE.effective`) that the checkpoint folds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from progsae.trainer.training.sparse_topk import Selection, decoder_grad, topk_encode


class Effective(NamedTuple):
    """The unit-row SAE that a TrainableSAE's parameters stand for (differentiable)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor


class TrainableSAE(nn.Module):
    """SAE parameters in SAELens layout, normalised scale; decoder rows of unit norm, or free in
    norm (`free_norm`, read through `effective`)."""

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None, free_norm: bool = False):
        super().__init__()
        self.free_norm = free_norm
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def effective(self) -> Effective:
        """Unit rows: the parameters themselves. Free rows (n = ||W_dec_i||): W_enc * n, b_enc * n,
        W_dec / n, so that top-k ranks pre * n and the decode is pre * W_dec (SAELens's rescaled TopK)."""
        if not self.free_norm:
            return Effective(self.W_enc, self.b_enc, self.W_dec)
        n = self.W_dec.norm(dim=1).clamp_min(torch.finfo(self.W_dec.dtype).eps)
        return Effective(self.W_enc * n, self.b_enc * n, self.W_dec / n[:, None])

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project each decoder row's gradient onto the row's orthogonal complement."""
        g, w = self.W_dec.grad, self.W_dec.data
        if g is not None:
            g -= ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)


class Output(NamedTuple):
    loss: Tensor
    """Scalar training loss (reconstruction + auxk_coef * auxk)."""
    fvus: Tensor
    """[n] detached batch FVU at each loss rung."""
    auxk: Tensor
    """Detached AuxK normalised MSE (0 without dead latents)."""
    sel: Selection
    """The selected codes."""
    fvus_k: Tensor
    """[n_k] detached batch FVU at G = M from each token's k' largest codes, per k' of the k
    ladder (without one: [1], the FVU at k)."""


def _argsort_small(keys: Tensor) -> Tensor:
    """Stable argsort of a 1-D tensor of small non-negative ints (numpy radix sort on CPU)."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.int8), kind="stable"))
    return keys.sort(stable=True).indices


def band_partials(W_dec: Tensor, sel: Selection, ladder: tuple[int, ...]) -> Tensor:
    """[n, B, d]: partial decode of each band [G_{j-1}, G_j) of the ladder, in one embedding_bag.

    Bags are (band, token) pairs, band-major: the flattened codes are stably sorted by band,
    so bag j * B + t holds token t's codes in band j and each band's [B, d] block is
    contiguous. W_dec's gradient is added sparsely from the selection's latent grouping
    (decoder_grad) when it has one.
    """
    idx = sel.indices
    if len(ladder) == 1:
        return _banded_decode(W_dec, sel, None, 1)
    inner = torch.tensor(ladder[:-1], dtype=idx.dtype, device=idx.device)
    band = torch.bucketize(idx, inner, right=True).reshape(-1)  # G_{j-1} <= i < G_j -> j
    return _banded_decode(W_dec, sel, band, len(ladder))


def rank_bands(values: Tensor, k_ladder: tuple[int, ...]) -> Tensor:
    """[B * k] band of each flat entry of values [B, k] by its rank within its token: band j
    holds the ranks [k'_{j-1}, k'_j) of the ladder k'_1 < ... < k'_n = k (rank 0 = the largest
    value; ties broken by position, as a stable sort)."""
    b, k = values.shape
    order = torch.sort(values.detach(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k, device=order.device).expand(b, k))
    inner = torch.tensor(k_ladder[:-1], dtype=rank.dtype, device=rank.device)
    return torch.bucketize(rank, inner, right=True).reshape(-1)


def rank_partials(W_dec: Tensor, sel: Selection, k_ladder: tuple[int, ...]) -> Tensor:
    """[n, B, d]: partial decode of each rank band of the k' ladder (see rank_bands), so that
    the running sum over bands gives every token's decode from its k'_j largest codes."""
    if len(k_ladder) == 1:
        return _banded_decode(W_dec, sel, None, 1)
    return _banded_decode(W_dec, sel, rank_bands(sel.values, k_ladder), len(k_ladder))


def _banded_decode(W_dec: Tensor, sel: Selection, band: Tensor | None, n: int) -> Tensor:
    """[n, B, d]: decode of each band's codes (band: [B * k] band per flat entry, None: one band)."""
    idx, vals = sel.indices, sel.values
    b, k = idx.shape[0], idx.shape[1]
    W = W_dec.detach() if sel.bags is not None else W_dec
    token = torch.arange(b * k, device=idx.device) // k
    if band is None:
        out, bag = F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum"), token
    else:
        bag = band * b + token
        order = _argsort_small(band)
        offsets = torch.zeros(b * n, dtype=torch.long, device=idx.device)
        offsets[1:] = torch.bincount(bag, minlength=b * n).cumsum(0)[:-1]
        out = F.embedding_bag(idx.reshape(-1)[order], W, offsets,
                              per_sample_weights=vals.reshape(-1)[order], mode="sum")
    if sel.bags is not None:
        out = decoder_grad(out, W_dec, bag, vals.reshape(-1), sel.bags)
    return out.view(n, b, -1)


CHUNK_ROWS = 256
"""Rows per cache-resident block in the prefix loss (the n rungs of a block stay in L2/L3)."""


class _PrefixSSE(torch.autograd.Function):
    """sse_j = ||sum_{i<=j} partials[i] - target||^2 for every rung j: in place, block by block.

    With r_j the signed residual, dL/dpartials[j] = sum_{i>=j} 2 g_i r_i: backward walks the
    rungs from the last, one fused add per rung, and rebuilds r_{j-1} = r_j - partials[j]
    instead of storing every r_j.
    """

    @staticmethod
    def forward(ctx: Any, target: Tensor, partials: Tensor) -> tuple[Tensor, Tensor]:
        n, b = partials.shape[0], partials.shape[1]
        r = torch.neg(target)
        blocks = range(0, b, CHUNK_ROWS)
        parts = target.new_empty(len(blocks), n)
        for c, row in enumerate(blocks):
            rc = r[row:row + CHUNK_ROWS]
            flat = rc.view(-1)
            for j in range(n):
                rc.add_(partials[j, row:row + CHUNK_ROWS])
                parts[c, j] = torch.dot(flat, flat)
        ctx.save_for_backward(partials, r)
        residual = torch.neg(r)
        ctx.mark_non_differentiable(residual)
        return parts.sum(0), residual

    @staticmethod
    def backward(ctx: Any, g: Tensor, _ge: Any):  # type: ignore[override]
        partials, r_last = ctx.saved_tensors
        n = partials.shape[0]
        gs = (2 * g).tolist()  # one device sync, not one per rung
        grad_p = torch.empty_like(partials)
        for row in range(0, r_last.shape[0], CHUNK_ROWS):
            sl = slice(row, row + CHUNK_ROWS)
            r = r_last[sl].clone() if n > 1 else r_last[sl]
            torch.mul(r, gs[-1], out=grad_p[n - 1, sl])
            for j in range(n - 2, -1, -1):
                r.sub_(partials[j + 1, sl])
                torch.add(grad_p[j + 1, sl], r, alpha=gs[j], out=grad_p[j, sl])
        return torch.neg(grad_p[0]), grad_p


def prefix_sse(target: Tensor, partials: Tensor) -> tuple[Tensor, Tensor]:
    """Squared errors [n] of target - cumsum(partials [n, B, d]) at every rung, and the last
    residual [B, d] (detached)."""
    return _PrefixSSE.apply(target.contiguous(), partials.contiguous())


def naive_prefix_sse(x: Tensor, sae: TrainableSAE, sel: Selection, ladder: tuple[int, ...]) -> Tensor:
    """Reference: decode each prefix from scratch (masking codes >= G); for tests."""
    out = []
    for g in ladder:
        v = sel.values * (sel.indices < g)
        x_hat = F.embedding_bag(sel.indices, sae.W_dec, per_sample_weights=v, mode="sum") + sae.b_dec
        out.append((x - x_hat).square().sum())
    return torch.stack(out)


def total_variance(x: Tensor) -> Tensor:
    """sum ||x - mean_batch(x)||^2 (no gradient: a per-batch constant of the loss)."""
    xc = (x - x.mean(0)).detach()
    return torch.dot(xc.view(-1), xc.view(-1))


def auxk_loss(W_dec: Tensor, sel: Selection, residual: Tensor, tv: Tensor | None = None) -> Tensor:
    """Normalised MSE of the dead latents' decode (no b_dec) against the detached residual: over
    the residual's total variance, or over `tv` when given."""
    if sel.aux_indices.shape[1] == 0:
        return residual.new_zeros(())
    e = residual.detach()
    idx, vals = sel.aux_indices, sel.aux_values
    if sel.aux_bags is None:
        e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
    else:
        e_hat = F.embedding_bag(idx, W_dec.detach(), per_sample_weights=vals, mode="sum")
        token = torch.arange(idx.numel(), device=idx.device) // idx.shape[1]
        e_hat = decoder_grad(e_hat, W_dec, token, vals.reshape(-1), sel.aux_bags)
    return ((e_hat - e).square().sum() / (total_variance(e) if tv is None else tv)).nan_to_num(0.0)


def forward(sae: TrainableSAE, x: Tensor, k: int, ladder: tuple[int, ...], weights: Tensor,
            dead: Tensor | None = None, k_aux: int = 0, auxk_coef: float = 1 / 32,
            encode: Callable[..., Selection] = topk_encode, k_ladder: tuple[int, ...] = (),
            auxk_norm: str = "residual") -> Output:
    """Loss of one batch x [B, d_in] (normalised scale). `dead`: int64 ids of dead latents.
    `k_ladder` (k'_1 < ... < k'_n = k): also train the decode from each token's k' largest codes
    (the module docstring's hierarchical top-k); empty or (k,): today's loss, computed as before.
    `auxk_norm`: "residual" (Gao) or "batch" (SAELens), see the module docstring."""
    x_in = x - sae.b_dec
    W_enc, b_enc, W_dec = sae.effective()
    sel = encode(x_in, W_enc, b_enc, k, dead, k_aux)
    partials = band_partials(W_dec, sel, ladder)
    sse, residual = prefix_sse(x_in, partials)
    tv = total_variance(x)
    fvus = sse / tv
    loss = (weights * fvus).sum()
    fvus_k = fvus[-1:].detach()
    if len(k_ladder) > 1:
        k_sse, _ = prefix_sse(x_in, rank_partials(W_dec, sel, k_ladder)[:-1])
        k_fvus = k_sse / tv
        loss = (loss + k_fvus.sum()) / len(k_ladder)
        fvus_k = torch.cat([k_fvus.detach(), fvus_k])
    n_aux = sel.aux_indices.shape[1]
    if auxk_norm == "batch":
        n_dead = 0 if dead is None else dead.numel()
        aux = auxk_loss(W_dec, sel, residual, tv) * min(n_dead / max(k_aux, 1), 1.0)
    else:
        aux = auxk_loss(W_dec, sel, residual)
    if n_aux:
        loss = loss + auxk_coef * aux
    return Output(loss, fvus.detach(), aux.detach(), sel, fvus_k)


def optimizer_step(sae: TrainableSAE, opt: torch.optim.Optimizer, x: Tensor, k: int, ladder: tuple[int, ...],
                   weights: Tensor, dead: Tensor | None = None, k_aux: int = 0, auxk_coef: float = 1 / 32,
                   encode: Callable[..., Selection] = topk_encode, k_ladder: tuple[int, ...] = (),
                   auxk_norm: str = "residual") -> Output:
    """forward, backward, Adam step; with unit decoder rows also parallel-gradient removal before
    the step and renormalisation after it."""
    out = forward(sae, x, k, ladder, weights, dead, k_aux, auxk_coef, encode, k_ladder, auxk_norm)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if not sae.free_norm:
        sae.remove_parallel_grad()
    opt.step()
    if not sae.free_norm:
        sae.normalise_decoder()
    return out
