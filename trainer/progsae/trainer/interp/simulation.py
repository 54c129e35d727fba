"""Simulation correlation with a deterministic explainer: how well "what a latent fires on" predicts it.

This follows the scoring of Bills et al. (OpenAI, 2023) that the progressive-SAE paper reports
(Pearson 0.74 for TopK latents, 0.57 for Matryoshka's outer groups), with one substitution:

    THE EXPLAINER IS A LOOKUP TABLE, NOT A LANGUAGE MODEL.

Explain. On the *explain half* of the tokens (held-out contexts with an even index), each latent
is explained by its mean activation (zeros included) per token id t and per (previous token,
token) pair (p, t), plus its global mean.

Simulate. On the *simulate half* (odd contexts), the explanation predicts the latent's
activation at a token from its (p, t), backing off when the table has too little evidence:

    sim = mean over explain-half rows with the pair (p, t)   if the pair occurred >= min_count times
        = mean over explain-half rows with the token t       else, if t occurred >= min_count times
        = the latent's global mean on the explain half      otherwise

Score. Pearson correlation between simulated and true activations over the latent's `n_top`
top-activating simulate-half tokens together with `n_random` random simulate-half tokens (one
random set for all latents), the token-level analogue of OpenAI's "top and random" mix. A latent
that never fires on either half, or whose simulated or true values are constant over its scoring
set, has no score (NaN).

What that means next to the paper's 0.74 / 0.57. An LLM explainer reads whole contexts and
writes a sentence; its simulator must generalise from that sentence. The lookup table instead
sees exactly the current and previous token and memorises them, so it scores "token-level"
latents (fires on " the", on "ing" after "runn") near 1 and any latent driven by longer context
or abstract meaning near 0, regardless of how easy a human would find it to describe. Its
numbers are therefore not on the paper's scale; only comparisons between variants measured the
same way (Matryoshka groups vs the same bands of a TopK SAE) carry meaning. It is deterministic,
needs no API and runs in seconds, which is why it is offered.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Explanation(NamedTuple):
    """Per-latent lookup tables learned on the explain half (sparse, as sorted int64 keys)."""

    vocab: int
    """Token ids are < vocab; keys are built in base `vocab`."""
    min_count: int
    """A pair (or token) is used only if it occurred at least this often in the explain half."""
    pair_keys: np.ndarray
    """[P] sorted keys (latent * vocab + prev) * vocab + tok of every (latent, pair) that fired."""
    pair_sums: np.ndarray
    """[P] sum of the latent's activations over the explain rows with that pair."""
    tok_keys: np.ndarray
    """[T] sorted keys latent * vocab + tok of every (latent, token) that fired."""
    tok_sums: np.ndarray
    """[T] sum of the latent's activations over the explain rows with that token."""
    pair_count_keys: np.ndarray
    """[Q] sorted keys prev * vocab + tok of every pair in the explain half."""
    pair_counts: np.ndarray
    """[Q] how often each pair occurred."""
    tok_counts: np.ndarray
    """[vocab] how often each token occurred."""
    global_mean: np.ndarray
    """[d_sae] each latent's mean activation over the explain half."""


def _sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inv, weights=weights, minlength=len(uniq))


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[key == query] for each query, 0 where the key is absent."""
    if len(keys) == 0:
        return np.zeros(len(query), dtype=np.float64)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[pos] == query, values[pos], 0.0).astype(np.float64)


def _flat(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, latent, value) of every active code; zero values (ReLU'd) are dropped."""
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    lat, val = indices.reshape(-1).astype(np.int64), values.reshape(-1).astype(np.float64)
    on = val > 0
    return rows[on], lat[on], val[on]


def explain(indices: np.ndarray, values: np.ndarray, prev: np.ndarray, tok: np.ndarray, d_sae: int,
            vocab: int, min_count: int = 2) -> Explanation:
    """Lookup tables from the explain half: codes [N, k] (indices, values), prev and tok ids [N]."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    n = len(tok)
    prev, tok = prev.astype(np.int64), tok.astype(np.int64)
    rows, lat, val = _flat(indices, values)
    pair = prev * vocab + tok
    pk, ps = _sum_by_key(lat * vocab * vocab + pair[rows], val)
    tk, ts = _sum_by_key(lat * vocab + tok[rows], val)
    qk, qc = np.unique(pair, return_counts=True)
    gm = np.bincount(lat, weights=val, minlength=d_sae) / max(n, 1)
    return Explanation(vocab, min_count, pk, ps, tk, ts, qk, qc.astype(np.int64),
                       np.bincount(tok, minlength=vocab).astype(np.int64), gm)


def simulate(e: Explanation, latents: np.ndarray, prev: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """[P] simulated activation of latent latents[i] at a token tok[i] preceded by prev[i] (back-off above)."""
    latents, prev, tok = latents.astype(np.int64), prev.astype(np.int64), tok.astype(np.int64)
    pair = prev * e.vocab + tok
    n_pair = _lookup(e.pair_count_keys, e.pair_counts, pair)
    n_tok = e.tok_counts[np.clip(tok, 0, e.vocab - 1)] * (tok < e.vocab)
    by_pair = _lookup(e.pair_keys, e.pair_sums, latents * e.vocab * e.vocab + pair) / np.maximum(n_pair, 1)
    by_tok = _lookup(e.tok_keys, e.tok_sums, latents * e.vocab + tok) / np.maximum(n_tok, 1)
    return np.where(n_pair >= e.min_count, by_pair,
                    np.where(n_tok >= e.min_count, by_tok, e.global_mean[latents]))


def _pearson_by_group(group: np.ndarray, x: np.ndarray, y: np.ndarray, n_groups: int) -> np.ndarray:
    def s(w: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=w, minlength=n_groups)

    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    sx, sy, sxx, syy, sxy = s(x), s(y), s(x * x), s(y * y), s(x * y)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        vx, vy = sxx - sx * sx / n, syy - sy * sy / n
        # a relative floor: float cancellation leaves ~1e-16 * sxx where the variance is truly 0
        ok = (vx > 1e-12 * np.maximum(sxx, 1e-300)) & (vy > 1e-12 * np.maximum(syy, 1e-300))
        return np.where(ok, cov / np.sqrt(np.where(ok, vx * vy, 1.0)), np.nan)


def score(e: Explanation, indices: np.ndarray, values: np.ndarray, prev: np.ndarray, tok: np.ndarray,
          d_sae: int, n_top: int = 50, n_random: int = 200, seed: int = 0) -> np.ndarray:
    """[d_sae] Pearson(simulated, true) per latent on the simulate half (codes [N, k]); NaN if unscored.

    Each latent's scoring set is its n_top highest activations plus n_random random rows
    (shared by all latents; a top row that is also random counts once).
    """
    n = len(tok)
    rows, lat, val = _flat(indices, values)
    rand = np.sort(np.random.default_rng(seed).choice(n, size=min(n_random, n), replace=False))
    is_rand = np.zeros(n, dtype=bool)
    is_rand[rand] = True
    # top rows per latent: sort by (latent, -value), keep the first n_top of each latent
    order = np.lexsort((-val, lat))
    lat_s, rows_s, val_s = lat[order], rows[order], val[order]
    start = np.searchsorted(lat_s, np.arange(d_sae))
    rank = np.arange(len(lat_s)) - start[lat_s]
    top = (rank < n_top) & ~is_rand[rows_s]
    t_lat, t_rows, t_val = lat_s[top], rows_s[top], val_s[top]
    # true activations on the random rows for every latent: dense [n_random, d_sae]
    dense = np.zeros((len(rand), d_sae))
    pos_in_rand = np.full(n, -1)
    pos_in_rand[rand] = np.arange(len(rand))
    r_on = is_rand[rows]
    dense[pos_in_rand[rows[r_on]], lat[r_on]] = val[r_on]
    r_lat = np.tile(np.arange(d_sae), len(rand))
    r_rows = np.repeat(rand, d_sae)
    group = np.concatenate([t_lat, r_lat])
    true = np.concatenate([t_val, dense.reshape(-1)])
    sim = simulate(e, group, prev[np.concatenate([t_rows, r_rows])], tok[np.concatenate([t_rows, r_rows])])
    corr = _pearson_by_group(group, sim, true, d_sae)
    fired = np.bincount(lat, minlength=d_sae) > 0
    return np.where(fired & (e.global_mean > 0), corr, np.nan)
