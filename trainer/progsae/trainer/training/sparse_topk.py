"""TopK encoder and decoder with sparse backwards: the only dense [B, M] work is the forward matmul.

Encoder forward: pre = x_in @ W_enc + b_enc, one top-k over all M latents (ReLU applied to
the k winners), optionally a second top-k_aux among the dead latents (AuxK). Its backward
touches only the selected entries: with g the [B, k'] gradient of the selected values,

    dL/dx_in   = sum_j g[b, j] W_enc[:, idx[b, j]]            (embedding_bag over W_enc^T)
    dL/dW_enc  = sum over entries (b, j) with idx = i of g x_in[b]   (embedding_bag over x_in,
                                                                bags = latents)
    dL/db_enc  = index_add of g

i.e. B * k' * d multiply-adds instead of two dense B * M * d matmuls. The grouping of the
entries by latent (`LatentBags`, a counting sort) is computed once per selection and reused
by the decoder's weight gradient (`decoder_grad`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class LatentBags(NamedTuple):
    """The entries of an [N, w] index array, grouped by latent."""

    order: Tensor
    """[N * w] flat entry positions, sorted by latent (stable)."""
    offsets: Tensor
    """[M] start of each latent's run in `order`."""


class Selection(NamedTuple):
    values: Tensor
    """[B, k] ReLU'd top-k values (differentiable)."""
    indices: Tensor
    """[B, k] int64 latent indices."""
    aux_values: Tensor
    """[B, k_aux'] ReLU'd top values among dead latents ([B, 0] without dead latents)."""
    aux_indices: Tensor
    """[B, k_aux'] their latent indices."""
    bags: LatentBags | None = None
    """`indices` grouped by latent (for sparse weight gradients)."""
    aux_bags: LatentBags | None = None
    """`aux_indices` grouped by latent."""


def latent_bags(indices: Tensor, n_latents: int) -> LatentBags:
    """Stable sort of the flattened entries by latent. On CPU numpy's radix sort of int16/int32
    keys (torch's parallel sort stalls on oversubscribed cores)."""
    flat = indices.reshape(-1)
    if flat.device.type == "cpu":
        key = flat.numpy().astype(np.int16 if n_latents <= 2**15 else np.int32)
        order = torch.from_numpy(np.argsort(key, kind="stable"))
    else:
        order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_latents)
    offsets = torch.zeros(n_latents, dtype=torch.long, device=flat.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    return LatentBags(order, offsets)


def scatter_rows_by_latent(bags: LatentBags, rows: Tensor, row_of_entry: Tensor, weights: Tensor) -> Tensor:
    """[M, d]: out[i] = sum over entries e with latent i of weights[e] * rows[row_of_entry[e]]."""
    o = bags.order
    return F.embedding_bag(row_of_entry[o], rows, bags.offsets, per_sample_weights=weights[o], mode="sum")


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                dead: Tensor | None, k_aux: int, matmul_dtype: torch.dtype | None) -> tuple[Tensor, ...]:
        if matmul_dtype is None or matmul_dtype == x_in.dtype:
            pre = torch.addmm(b_enc, x_in, W_enc)
        else:
            pre = torch.addmm(b_enc.to(matmul_dtype), x_in.to(matmul_dtype), W_enc.to(matmul_dtype))
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = vals.clamp_min(0).to(x_in.dtype)
        if dead is not None and dead.numel() > 0 and k_aux > 0:
            a_vals, a_pos = pre.index_select(1, dead).topk(min(k_aux, dead.numel()), dim=-1, sorted=False)
            a_idx, a_vals = dead[a_pos], a_vals.clamp_min(0).to(x_in.dtype)
        else:
            a_idx = idx.new_zeros(idx.shape[0], 0)
            a_vals = vals.new_zeros(vals.shape[0], 0)
        m = W_enc.shape[1]
        bags, a_bags = latent_bags(idx, m), latent_bags(a_idx, m)
        ctx.mark_non_differentiable(idx, a_idx, *bags, *a_bags)
        ctx.save_for_backward(x_in, W_enc, idx, vals, a_idx, a_vals, *bags, *a_bags)
        return vals, idx, a_vals, a_idx, *bags, *a_bags

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor | None, _gi: Any, g_aux: Tensor | None, *_: Any):  # type: ignore[override]
        x_in, W_enc, idx, vals, a_idx, a_vals, *bags = ctx.saved_tensors
        parts = [(g_vals, vals, idx, LatentBags(*bags[:2])), (g_aux, a_vals, a_idx, LatentBags(*bags[2:]))]
        grad_x = grad_W = grad_b = None
        for g, v, i, lb in parts:
            if g is None or i.shape[1] == 0:
                continue
            g = (g * (v > 0)).to(x_in.dtype).contiguous()
            if ctx.needs_input_grad[0]:
                gx = F.embedding_bag(i, W_enc.t(), per_sample_weights=g, mode="sum")
                grad_x = gx if grad_x is None else grad_x.add_(gx)
            if ctx.needs_input_grad[1]:
                tokens = torch.arange(i.numel(), device=i.device) // i.shape[1]
                gw = scatter_rows_by_latent(lb, x_in, tokens, g.reshape(-1))
                grad_W = gw if grad_W is None else grad_W.add_(gw)
            if ctx.needs_input_grad[2]:
                # a sum per latent over its bag, not index_add_: CUDA's index_add_ adds with
                # atomics in no fixed order, and a resumed run must repeat the same floats
                flat = g.reshape(-1, 1)
                entry = torch.arange(flat.shape[0], device=flat.device)
                gb = scatter_rows_by_latent(lb, flat, entry, torch.ones_like(flat[:, 0])).squeeze(1)
                grad_b = gb if grad_b is None else grad_b.add_(gb)
        return grad_x, None if grad_W is None else grad_W.t(), grad_b, None, None, None, None


def topk_encode(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                dead: Tensor | None = None, k_aux: int = 0, matmul_dtype: torch.dtype | None = None) -> Selection:
    """Top-k of ReLU(x_in @ W_enc + b_enc) over all latents; with `dead` ([n] int64 latent ids,
    on x_in's device) also the top-min(k_aux, n) among those latents (for AuxK). Differentiable
    w.r.t. x_in, W_enc and b_enc through the selected values only. `matmul_dtype` (e.g.
    bfloat16): the dense matmul runs in it, values come back in x_in's dtype."""
    v, i, av, ai, o, off, ao, aoff = _TopKEncode.apply(x_in, W_enc, b_enc, k, dead, k_aux, matmul_dtype)
    return Selection(v, i, av, ai, LatentBags(o, off), LatentBags(ao, aoff))


def topk_encode_dense(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                      dead: Tensor | None = None, k_aux: int = 0) -> Selection:
    """Reference implementation with plain autograd (dense backward); for tests and benchmarks."""
    pre = torch.addmm(b_enc, x_in, W_enc)
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    if dead is not None and dead.numel() > 0 and k_aux > 0:
        a_vals, a_pos = pre[:, dead].topk(min(k_aux, dead.numel()), dim=-1, sorted=False)
        a_idx = dead[a_pos]
    else:
        a_idx, a_vals = idx.new_zeros(idx.shape[0], 0), vals.new_zeros(vals.shape[0], 0)
    return Selection(vals.relu(), idx, a_vals.relu(), a_idx)


class _DecoderGrad(torch.autograd.Function):
    """Identity on a decode computed with a detached W_dec; adds W_dec's gradient in backward:
    dL/dW_dec[i] = sum over entries e with latent i of value[e] * dL/dout[bag[e]]."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, W_dec: Tensor, bag_of_entry: Tensor, values: Tensor,
                order: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(bag_of_entry, values, order, offsets)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, g: Tensor):  # type: ignore[override]
        bag_of_entry, values, order, offsets = ctx.saved_tensors
        grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows_by_latent(LatentBags(order, offsets), g.contiguous(), bag_of_entry, values)
        return g, grad_W, None, None, None, None


def decoder_grad(out: Tensor, W_dec: Tensor, bag_of_entry: Tensor, values: Tensor, bags: LatentBags) -> Tensor:
    """Attach W_dec's sparse gradient to `out` [n_bags, d], a sum over bags of value * W_dec[latent]
    computed with W_dec detached. bag_of_entry/values: [E] per flat entry (the layout of `bags`)."""
    return _DecoderGrad.apply(out, W_dec, bag_of_entry, values.detach(), *bags)
