"""The progressive SAE codec: encode once, decode at any granularity G, stream rungs.

Pure functions over an `SAE` (frozen tensors + a few ints); no Ray, no gRPC, no I/O.
Trainer, evaluator and server all import this module, so there is one definition of
what "decode at G" means.

Semantics (SPEC §3):
  * input normalisation: encode sees ``scale * x``; decode returns ``x_hat / scale``,
    so callers always pass and get raw activations.
  * encode: pre = W_enc^T (scale*x - b_dec) + b_enc;  z = TopK_k(ReLU(pre)), one top-k
    over all M latents (``activation="relu"`` / ``"jumprelu"`` keep every active latent
    instead, for SAELens standard / JumpReLU checkpoints).
  * codes are sparse: (indices, values) of shape [N, k]; a value may be 0 (ReLU'd).
  * nested truncation: x_hat_G = sum over codes with index < G of z_i W_dec[i] + b_dec.
  * progressive stream: each rung adds only the codes with index in [G_prev, G).
  * prefix encode: a *different* code, top-k within the first G encoder columns only.
  * bounded memory: encode works through the tokens in chunks whose [rows, M] pre-activations
    take at most ``chunk_bytes`` (default ENCODE_CHUNK_BYTES, 256 MiB); each token's code depends only
    on its own row, so chunking changes no selection, only BLAS's summation blocking (values
    agree to float rounding; see ``encode``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["topk", "relu", "jumprelu"]

ENCODE_CHUNK_BYTES = 256 * 2**20
"""Default bound on one encode chunk's [rows, M] pre-activations, in bytes (256 MiB: 1024 rows at
M=65536 in float32). Peak extra memory of an encode is about 2x this for top-k (pre-activations
plus top-k's workspace) and 3x for relu/jumprelu (plus the activations), whatever N is. Chosen
by measurement at d_in 2304, M 65536 (BENCHMARKS.md): 1024-row chunks run at the speed of one
big product, 256-row ones ~13-25% slower; 64 MiB would hold memory to 79 MiB extra instead."""


class Codes(NamedTuple):
    """Sparse codes of a batch of tokens."""

    indices: Tensor
    """[N, k] int64 latent indices (positions in the progressive order)."""
    values: Tensor
    """[N, k] activations (normalised scale); zero entries are inactive."""


class Rung(NamedTuple):
    """One step of a progressive stream."""

    g: int
    """Granularity: latents with index < g are included."""
    l0: Tensor
    """[N] number of active latents with index < g."""
    delta: Tensor
    """[N, d_in] raw-scale contribution of the latents in [previous g, g).

    Deltas exclude b_dec: recon at g = b_dec / scale + the sum of deltas up to g."""
    recon: Tensor | None
    """[N, d_in] raw-scale reconstruction at granularity g (None in a delta-only stream)."""


@dataclass(frozen=True)
class SAE:
    """Weights of a sparse autoencoder in SAELens layout, plus what encode needs."""

    W_enc: Tensor
    """[d_in, d_sae] encoder."""
    W_dec: Tensor
    """[d_sae, d_in] decoder; row i is latent i's direction."""
    b_enc: Tensor
    """[d_sae] encoder bias."""
    b_dec: Tensor
    """[d_in] decoder bias (normalised scale), subtracted before encoding."""
    k: int
    """Active latents per token (top-k); an upper bound for relu/jumprelu."""
    scale: float = 1.0
    """Input normalisation c: encode sees c*x, decode returns x_hat/c."""
    activation: Activation = "topk"
    """How latents are selected: top-k, plain ReLU, or JumpReLU with `threshold`."""
    threshold: Tensor | None = None
    """[d_sae] JumpReLU thresholds (activation == "jumprelu" only)."""

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """Copy onto a device and/or floating dtype (float64 for evaluation)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return replace(
            self,
            W_enc=move(self.W_enc),
            W_dec=move(self.W_dec),
            b_enc=move(self.b_enc),
            b_dec=move(self.b_dec),
            threshold=None if self.threshold is None else move(self.threshold),
        )

    def fold_scale(self) -> SAE:
        """Equivalent SAE with scale 1: c folded into W_enc, W_dec and b_dec."""
        c = self.scale
        return replace(
            self, W_enc=self.W_enc * c, W_dec=self.W_dec / c, b_dec=self.b_dec / c, scale=1.0
        )

    def permute(self, perm: Tensor) -> SAE:
        """Reorder latents by a [d_sae] permutation: new latent j is old latent perm[j]."""
        th = None if self.threshold is None else self.threshold[perm]
        return replace(
            self, W_enc=self.W_enc[:, perm], W_dec=self.W_dec[perm], b_enc=self.b_enc[perm],
            threshold=th,
        )

    # --- encode -------------------------------------------------------------------------

    def pre_acts(self, x: Tensor, g: int | None = None) -> Tensor:
        """Encoder pre-activations [N, g] (all M latents when g is None). Dense: N * g values."""
        g = self.d_sae if g is None else g
        x_in = x * self.scale - self.b_dec if self.scale != 1.0 else x - self.b_dec
        return torch.addmm(self.b_enc[:g], x_in, self.W_enc[:, :g])

    def encode(self, x: Tensor, chunk_bytes: int = ENCODE_CHUNK_BYTES) -> Codes:
        """One selection over the full dictionary: [N, d_in] raw activations -> codes.

        Works through at most max(1, chunk_bytes // (M * itemsize)) tokens at a time, so the
        dense [rows, M] pre-activations never exceed `chunk_bytes` however large N is. A
        token's code is the same in any chunking up to float rounding: BLAS may block the
        d_in-long dot products differently for a different row count, which moves values by
        a few ulps (and can swap latents only at such near-ties).
        """
        return self._encode_chunked(x, self.d_sae, self.k, chunk_bytes)

    def prefix_encode(self, x: Tensor, g: int, chunk_bytes: int = ENCODE_CHUNK_BYTES) -> Codes:
        """The cheap path: only the first g encoder columns, top-min(k, g) among them.

        Costs g/M of a full encode, chunked as `encode` is. NOT nested truncation: latents
        that would have lost the full top-k can win here, so
        decode(prefix_encode(x, g), g) != decode(encode(x), g).
        """
        _check_g(g, self.d_sae)
        return self._encode_chunked(x, g, min(self.k, g), chunk_bytes)

    def _encode_chunked(self, x: Tensor, g: int, k: int, chunk_bytes: int) -> Codes:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        rows = max(1, chunk_bytes // (g * self.W_enc.element_size()))
        n = x.shape[0]
        if n <= rows:
            return self._select(self.pre_acts(x, g), k)
        parts = [self._select(self.pre_acts(x[i : i + rows], g), k) for i in range(0, n, rows)]
        if self.activation != "topk":
            # relu/jumprelu codes are as wide as the batch's busiest token: widen each
            # chunk's codes to the widest chunk's with zero-valued entries.
            width = max(p.indices.shape[1] for p in parts)
            parts = [_widen(p, width) for p in parts]
        return Codes(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))

    def _select(self, pre: Tensor, k: int) -> Codes:
        if self.activation == "topk":
            # ReLU commutes with top-k (monotone), so clamp only the k winners.
            values, indices = pre.topk(k, dim=-1, sorted=False)
            return Codes(indices, values.clamp_min(0))
        if self.activation == "relu":
            acts = pre.relu()
        else:
            assert self.threshold is not None, "a jumprelu SAE needs its thresholds"
            acts = pre * (pre > self.threshold[: pre.shape[1]])
        width = int((acts > 0).sum(-1).max().item()) if acts.numel() else 0
        values, indices = acts.topk(max(width, 1), dim=-1, sorted=False)
        return Codes(indices, values)

    # --- decode -------------------------------------------------------------------------

    def decode(self, codes: Codes, g: int | None = None) -> Tensor:
        """Nested truncation: raw-scale reconstruction [N, d_in] from the codes with index < g."""
        g = self.d_sae if g is None else g
        _check_g(g, self.d_sae)
        keep = codes.indices < g if g < self.d_sae else None
        return self._unscale(sparse_sum(self.W_dec, codes, keep) + self.b_dec)

    def progressive(self, codes: Codes, ladder: Sequence[int], with_recon: bool = True) -> Iterator[Rung]:
        """Yield one rung per granularity in `ladder`, each built from the previous one.

        Every code is multiplied into the output exactly once over the whole stream, so
        streaming all rungs costs one sparse decode (k * d_in multiply-adds per token) plus
        one [N, d_in] write per rung. `with_recon=False` yields deltas only (the client
        sums them), saving the running-sum pass.
        """
        check_ladder(ladder, self.d_sae)
        n = codes.indices.shape[0]
        recon = self.b_dec.expand(n, -1) if with_recon else None
        # One pass over the codes assigns each to its rung and counts L0 for every rung.
        bounds = torch.tensor(list(ladder), device=codes.indices.device)
        rung_of = torch.bucketize(codes.indices, bounds, right=True)  # band j = [G_{j-1}, G_j)
        counts = torch.zeros(n, len(ladder) + 1, dtype=torch.long, device=bounds.device)
        l0s = counts.scatter_add_(1, rung_of, (codes.values != 0).long())[:, :-1].cumsum(1)
        for j, g in enumerate(ladder):
            delta = sparse_sum(self.W_dec, codes, rung_of == j)
            if recon is not None:
                recon = recon + delta
                yield Rung(g, l0s[:, j], self._unscale(delta), self._unscale(recon))
            else:
                yield Rung(g, l0s[:, j], self._unscale(delta), None)

    def _unscale(self, y: Tensor) -> Tensor:
        return y / self.scale if self.scale != 1.0 else y


def sparse_sum(W_dec: Tensor, codes: Codes, keep: Tensor | None = None) -> Tensor:
    """sum_j values[n, j] * W_dec[indices[n, j]] over the kept entries: [N, d_in].

    Gathers only the kept decoder rows (embedding_bag), never a dense [N, M] @ [M, d].
    """
    n = codes.indices.shape[0]
    if keep is None:
        if codes.indices.shape[1] == 0:
            return W_dec.new_zeros(n, W_dec.shape[1])
        return F.embedding_bag(
            codes.indices, W_dec, per_sample_weights=codes.values.to(W_dec.dtype), mode="sum"
        )
    flat_idx = codes.indices[keep]
    if flat_idx.numel() == 0:
        return W_dec.new_zeros(n, W_dec.shape[1])
    counts = keep.sum(-1)
    offsets = torch.zeros(n, dtype=torch.long, device=counts.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    return F.embedding_bag(
        flat_idx, W_dec, offsets, per_sample_weights=codes.values[keep].to(W_dec.dtype), mode="sum"
    )


def _widen(codes: Codes, width: int) -> Codes:
    """Codes padded to `width` per token with zero values at indices the token does not use
    (the smallest free ones: a token with w codes has at least width - w free in [0, width))."""
    n, w = codes.indices.shape
    if w >= width:
        return codes
    used = torch.zeros(n, width + 1, dtype=torch.bool, device=codes.indices.device)
    used.scatter_(1, codes.indices.clamp_max(width), True)  # column `width` collects the rest
    free = torch.sort((~used[:, :width]).to(torch.uint8), dim=1, descending=True, stable=True).indices
    pad = free[:, : width - w]
    return Codes(torch.cat([codes.indices, pad], 1), torch.cat([codes.values, codes.values.new_zeros(n, width - w)], 1))


def l0(codes: Codes, g: int) -> Tensor:
    """[N] active latents with index < g."""
    return ((codes.indices < g) & (codes.values != 0)).sum(-1)


def value_rank(codes: Codes, g: int) -> Tensor:
    """[N, w] rank of each code among its token's active codes with index < g, largest value
    first (0 = the largest; ties: the earlier entry, as a stable sort); a code that is not
    among them ranks w, so `rank < min(k', w)` selects the (G, k') code."""
    idx, val = codes
    n, w = idx.shape
    eligible = (idx < g) & (val != 0)
    key = torch.where(eligible, val, torch.full_like(val, float("-inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(w, device=idx.device).expand(n, w))
    return torch.where(eligible, rank, torch.full_like(rank, w))


def topk_prefix(codes: Codes, g: int, k_prime: int) -> Codes:
    """The (G, k') code: of the codes with index < g, each token's k' largest values ([N, k'],
    ranked by `value_rank`; a token with fewer gets zero-valued entries, which are inactive).
    decode(topk_prefix(c, g, k'), g) is the decode at (G, k'); with k' >= the codes' width it
    equals decode(c, g)."""
    if k_prime < 1:
        raise ValueError(f"k' must be positive, got {k_prime}")
    rank = value_rank(codes, g)
    w = min(k_prime, codes.indices.shape[1])
    pos = rank.argsort(dim=1, stable=True)[:, :w]
    keep = rank.gather(1, pos) < w
    values = codes.values.gather(1, pos)
    return Codes(codes.indices.gather(1, pos), torch.where(keep, values, torch.zeros_like(values)))


def default_ladder(d_sae: int, rungs: int = 5) -> tuple[int, ...]:
    """Geometric ladder ending at d_sae: d_sae/2^(rungs-1), ..., d_sae/2, d_sae."""
    return tuple(sorted({max(1, d_sae >> i) for i in range(rungs)}))


def check_ladder(ladder: Sequence[int], d_sae: int) -> None:
    """Raise ValueError unless `ladder` is strictly increasing within 1..d_sae."""
    if len(ladder) == 0:
        raise ValueError("granularity ladder is empty")
    prev = 0
    for g in ladder:
        _check_g(g, d_sae)
        if g <= prev:
            raise ValueError(f"granularities must be strictly increasing, got {g} after {prev}")
        prev = g


def _check_g(g: int, d_sae: int) -> None:
    if not 1 <= g <= d_sae:
        raise ValueError(f"granularity G={g} out of range 1..{d_sae}")
