"""CE loss recovered and KL: x_hat_G spliced into the real model's forward pass (SPEC §5).

For each evaluated context (a held-out cache context of `context` tokens, position 0 the
start token):

* hidden_L is *not* recomputed: positions 1.. are the cached clean activations, and
  position 0 (the start token, never cached) is hidden_at_layer of the start token alone.
  That is exact for a causal model (position 0 attends only to itself) and saves running
  layers 0..L-1; `splice_check` records the max relative error against a real
  hidden_at_layer on the first batch.
* only layers L.. run, once per variant: clean, zero-ablated, and x_hat_G for every
  (ordering, G). At G = M every ordering's x_hat is the same sum (up to float order), so
  it is computed once and shared.
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

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

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


def _load(ck: checkpoint.Checkpoint, cache: ActivationCache) -> tuple[nn.Module, str]:
    from progsae.lm.models import load_model

    man = cache.manifest
    lm = load_model(ck.meta.model or man.model, start_token=man.bos or None)
    if lm.d_model != man.d_model:
        raise ValueError(f"model {lm.alias} has d_model {lm.d_model}, the cache {man.d_model}")
    return lm.model, lm.alias


def _splice(hidden: Tensor, keep: Tensor, repl: Tensor) -> Tensor:
    """hidden [B, T, d] with positions 1.. where keep [B, T-1] replaced by repl [B*(T-1), d]."""
    B, T = hidden.shape[:2]
    h = hidden.clone()
    body = h[:, 1:]  # a view: writing into it writes into h
    body[keep] = repl.view(B, T - 1, -1)[keep].to(h.dtype)
    return h


@torch.no_grad()
def splice_eval(ck: checkpoint.Checkpoint, sae: SAE, variants: list[OrderedSAE], cache: ActivationCache,
                keep: np.ndarray, n_contexts: int, batch: int, progress: bool = False,
                model: nn.Module | None = None) -> tuple[CEBaseline, dict[tuple[str, int], CERung]]:
    """CE baselines and the CE numbers of every (ordering, G), over `n_contexts` held-out contexts
    (`batch` per forward pass)."""
    from progsae.lm.models import forward_from_layer, hidden_at_layer

    if model is None:
        model, _ = _load(ck, cache)
    layer, ladder = cache.manifest.layer, ck.ladder
    tokens = cache.tokens()
    T = tokens.shape[1]
    per = T - 1
    if T < 3:
        raise ValueError(f"{cache.dir}: contexts of {T} tokens leave nothing to score")
    n_avail = min(tokens.shape[0], len(keep) // per)
    ctx = pick_contexts(n_avail, n_contexts)
    if len(ctx) == 0:
        raise ValueError("no whole context available for the CE evaluation")
    if len(np.unique(tokens[ctx, 0])) != 1:
        raise ValueError(f"{cache.dir}: contexts start with different tokens; expected one start token")
    ids_all = torch.from_numpy(tokens[ctx].astype(np.int64))
    h0 = hidden_at_layer(model, ids_all[:1, :1], layer).float()  # [1, 1, d]

    clean, zero = TokenLossAccumulator(), TokenLossAccumulator()
    accs = {(v.name, g): TokenLossAccumulator() for v in variants for g in ladder}
    check = 0.0
    n_fwd = 2 + len(variants) * (len(ladder) - 1) + 1
    bar = tqdm(total=len(ctx) * n_fwd, desc=f"eval CE ({len(ctx)} contexts)", unit="fwd",
               disable=not progress)
    for b0 in range(0, len(ctx), batch):
        cb = ctx[b0:b0 + batch]
        ids = ids_all[b0:b0 + len(cb)]
        B = len(cb)
        rows = (cb[:, None] * per + np.arange(per)[None, :]).reshape(-1)
        x = cache.gather(rows)
        kb = torch.from_numpy(keep[rows]).view(B, per)
        hidden = torch.cat([h0.expand(B, 1, -1), x.view(B, per, -1)], dim=1)
        if b0 == 0:
            real = hidden_at_layer(model, ids, layer).float()
            err = (real[:, 1:] - hidden[:, 1:]).norm(dim=-1) / hidden[:, 1:].norm(dim=-1).clamp_min(1e-12)
            err0 = (real[:, :1] - hidden[:, :1]).norm(dim=-1) / hidden[:, :1].norm(dim=-1).clamp_min(1e-12)
            check = float(torch.cat([err.reshape(-1), err0.reshape(-1)]).max())
        targets = ids[:, 2:].reshape(-1)

        def run(h: Tensor, n: int = B) -> Tensor:
            logits = forward_from_layer(model, h, layer)[:, 1:-1].float()
            bar.update(n)
            return torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])

        lp_clean = run(hidden)
        clean.update(lp_clean, lp_clean, targets, contexts=B)
        zero.update(lp_clean, run(_splice(hidden, kb, torch.zeros_like(x))), targets, contexts=B)
        codes = sae.encode(x)
        full_done = False
        for v in variants:
            for rung in v.sae.progressive(v.relabel(codes), ladder):
                if rung.g == sae.d_sae and full_done:
                    continue
                assert rung.recon is not None  # progressive() yields reconstructions unless told not to
                accs[(v.name, rung.g)].update(lp_clean, run(_splice(hidden, kb, rung.recon)), targets, contexts=B)
                full_done = full_done or rung.g == sae.d_sae
    bar.close()
    first_full = accs[(variants[0].name, sae.d_sae)]
    out = {key: _rung(clean, zero, first_full if key[1] == sae.d_sae else acc) for key, acc in accs.items()}
    base = CEBaseline(clean.ce, zero.ce, len(ctx), clean.n, check, POLICY, contexts=[int(c) for c in ctx],
                      context_tokens=clean.context_tokens, clean_sums=clean.context_ce, zero_sums=zero.context_ce)
    return base, out


def _rung(clean: TokenLossAccumulator, zero: TokenLossAccumulator, sae: TokenLossAccumulator) -> CERung:
    """One variant's CE, CE recovered and KL, with their bootstrap SEs over the contexts."""
    rec = ce_recovered_bootstrap(clean.context_ce, zero.context_ce, sae.context_ce)
    kl = per_token_mean_bootstrap(sae.context_kl, sae.context_tokens)
    return CERung(sae.ce, ce_loss_recovered(clean.ce, zero.ce, sae.ce), sae.kl, rec.se, kl.se, list(sae.context_ce))
