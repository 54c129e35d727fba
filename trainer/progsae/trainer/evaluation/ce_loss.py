"""CE loss recovered and KL: x_hat_G spliced into the real model's forward pass (SPEC §5).

The splice and its scoring are progsae.lm.splice (shared with the server); this module feeds it
held-out cache contexts of `context` tokens (position 0 the start token):

* hidden_L is *not* recomputed: positions 1.. are the cached clean activations, and
  position 0 (the start token, never cached) is hidden_at_layer of the start token alone.
  That is exact for a causal model (position 0 attends only to itself) and saves running
  layers 0..L-1; `splice_check` records the max relative error against a real
  hidden_at_layer on the first batch.
* only layers L.. run, once per variant: clean, zero-ablated, and x_hat_G for every
  (ordering, G). At G = M every ordering's x_hat is the same sum (up to float order), so
  it is computed once and shared. The (G, k') grid (k_grid.py) runs the same loop with its
  grid points as the variants.
* what is replaced: positions 1.. that the outlier policy keeps. Position 0 and the
  positions the policy excludes (the huge-norm attention-sink rows) keep their clean
  activation in *both* the SAE and the zero-ablation variants: the SAE was neither
  trained nor evaluated on them, and zeroing a sink row would wreck every later position,
  inflating CE_zero and with it CE loss recovered.
* scored: next-token predictions from positions 1..T-2 (targets 2..T-1). The prediction
  at position 0 is identical in every variant, so it is left out.

CE recovered(G) = (CE_zero - CE_sae) / (CE_zero - CE_clean) over all scored tokens;
KL(p_clean || p_sae) is the mean per scored token, in nats. Their standard errors come from
a bootstrap over the contexts (sae/metrics.py); the per-context CE sums are kept, with the
context indices, so two checkpoints evaluated on the same contexts can be compared paired.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from progsae.lm.splice import SpliceBatch, splice_losses
from progsae.sae import checkpoint
from progsae.sae.codec import SAE
from progsae.sae.metrics import (
    TokenLossAccumulator,
    ce_loss_recovered,
    ce_recovered_bootstrap,
    per_token_mean_bootstrap,
)
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.evaluation.ordered import OrderedSAE
from progsae.trainer.evaluation.results import CEBaseline, CERung

POLICY = ("positions 1.. kept by the outlier policy are replaced (x_hat_G, or 0 for CE_zero); the start "
          "position and outlier-excluded positions keep their clean activation; scored: predictions from "
          "positions 1..T-2")


def pick_contexts(n_available: int, n: int) -> np.ndarray:
    """n context indices spread evenly over the cache (deterministic)."""
    if n >= n_available:
        return np.arange(n_available)
    return np.unique(np.linspace(0, n_available - 1, n).round().astype(np.int64))


def load_lm(ck: checkpoint.Checkpoint, cache: ActivationCache) -> nn.Module:
    """The language model the checkpoint reads (else the cache's), with the cache's start token."""
    from progsae.lm.models import load_model

    man = cache.manifest
    lm = load_model(ck.meta.model or man.model, start_token=man.bos or None)
    if lm.d_model != man.d_model:
        raise ValueError(f"model {lm.alias} has d_model {lm.d_model}, the cache {man.d_model}")
    return lm.model


def eval_contexts(cache: ActivationCache, keep: np.ndarray, n: int) -> np.ndarray:
    """The n cache contexts the CE evaluation scores: whole contexts among the first len(keep)
    rows, spread evenly (`pick_contexts`)."""
    tokens = cache.tokens()
    T = tokens.shape[1]
    if T < 3:
        raise ValueError(f"{cache.dir}: contexts of {T} tokens leave nothing to score")
    ctx = pick_contexts(min(tokens.shape[0], len(keep) // (T - 1)), n)
    if len(ctx) == 0:
        raise ValueError("no whole context available for the CE evaluation")
    if len(np.unique(tokens[ctx, 0])) != 1:
        raise ValueError(f"{cache.dir}: contexts start with different tokens; expected one start token")
    return ctx


def cache_batches(cache: ActivationCache, keep: np.ndarray, ctx: np.ndarray, batch: int) -> Iterator[SpliceBatch]:
    """The contexts `ctx`, `batch` at a time: their token ids, cached activations, and the rows
    the outlier policy keeps (`keep`, by cache row) as the positions to replace."""
    tokens = cache.tokens()
    per = tokens.shape[1] - 1
    ids_all = torch.from_numpy(tokens[ctx].astype(np.int64))
    for b0 in range(0, len(ctx), batch):
        cb = ctx[b0:b0 + batch]
        rows = (cb[:, None] * per + np.arange(per)[None, :]).reshape(-1)
        yield SpliceBatch(ids_all[b0:b0 + len(cb)], cache.gather(rows), torch.from_numpy(keep[rows]).view(len(cb), per))


@torch.no_grad()
def splice_eval(ck: checkpoint.Checkpoint, sae: SAE, variants: list[OrderedSAE], cache: ActivationCache,
                keep: np.ndarray, n_contexts: int, batch: int, progress: bool = False,
                model: nn.Module | None = None) -> tuple[CEBaseline, dict[tuple[str, int], CERung]]:
    """CE baselines and the CE numbers of every (ordering, G), over `n_contexts` held-out contexts
    (`batch` per forward pass)."""
    if model is None:
        model = load_lm(ck, cache)
    ladder, full = ck.ladder, sae.d_sae
    ctx = eval_contexts(cache, keep, n_contexts)
    n_fwd = 2 + len(variants) * (len(ladder) - 1) + 1
    bar = tqdm(total=len(ctx) * n_fwd, desc=f"eval CE ({len(ctx)} contexts)", unit="fwd", disable=not progress)

    def rungs(x: Tensor) -> Iterator[tuple[tuple[str, int], Tensor]]:
        codes = sae.encode(x)
        full_done = False
        for v in variants:
            for rung in v.sae.progressive(v.relabel(codes), ladder):
                if rung.g == full and full_done:
                    continue
                assert rung.recon is not None  # progressive() yields reconstructions unless told not to
                yield (v.name, rung.g), rung.recon
                full_done = full_done or rung.g == full

    losses = splice_losses(model, cache.manifest.layer, cache_batches(cache, keep, ctx, batch), rungs, check=True,
                           on_forward=bar.update)
    bar.close()
    clean, zero, accs = losses.clean, losses.zero, losses.variants
    first_full = accs[(variants[0].name, full)]
    out = {(v.name, g): rung_numbers(clean, zero, first_full if g == full else accs[(v.name, g)])
           for v in variants for g in ladder}
    assert losses.check is not None  # asked for with check=True, and there is at least one batch
    base = CEBaseline(clean.ce, zero.ce, len(ctx), clean.n, losses.check, POLICY, contexts=[int(c) for c in ctx],
                      context_tokens=clean.context_tokens, clean_sums=clean.context_ce, zero_sums=zero.context_ce)
    return base, out


def rung_numbers(clean: TokenLossAccumulator, zero: TokenLossAccumulator, sae: TokenLossAccumulator) -> CERung:
    """One variant's CE, CE recovered and KL, with their bootstrap SEs over the contexts."""
    rec = ce_recovered_bootstrap(clean.context_ce, zero.context_ce, sae.context_ce)
    kl = per_token_mean_bootstrap(sae.context_kl, sae.context_tokens)
    return CERung(sae.ce, ce_loss_recovered(clean.ce, zero.ce, sae.ce), sae.kl, rec.se, kl.se, list(sae.context_ce))
