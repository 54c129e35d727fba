"""Small real-LM checkpoints for the dashboard tests: SmolLM2 layer-20 activations of a few
sentences, a k-means dictionary over them (so features group similar tokens), feature cards
with the real tokenizer and logit lens, and metrics.json curves. Builds in seconds on a CPU.

    mat   architecture "matryoshka", latents in frequency order (ordering "none")
    topk  the same dictionary shuffled, with stored mean_sq / freq orderings
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from progsae.sae import checkpoint, feature_cards, metrics
from progsae.sae import ordering as ordmod
from progsae.sae.codec import SAE
from progsae.trainer import features
from progsae.trainer.data.activations import ActivationCache, CacheWriter, Manifest
from progsae.trainer.features import LogitLens

LM, LAYER, CONTEXT = "smollm2-135m", 20, 33
M, K, LADDER = 256, 8, (16, 32, 64, 128, 256)
K_LADDER = (1, 2, 4, 8)
"""mat says it decodes at these k' (a checkpoint of `progsae train --k-ladder` records it so)."""
SENTENCES = """The cat sat on the mat because it was warm.
A dog barked at the mailman every single morning.
Paris is the capital of France and a famous city.
She poured a cup of coffee and opened the newspaper.
The stock market fell sharply after the announcement.
Water boils at one hundred degrees Celsius at sea level.
He played the piano while his sister sang a song.
The children ran across the park to the playground.
Scientists discovered a new species of frog in the rainforest.
I think we should leave before the rain starts.
The train to London departs from platform nine.
My grandmother bakes bread every Sunday afternoon.
The committee will vote on the proposal next week.
Mount Everest is the highest mountain on Earth.
They watched the sunset from the top of the hill.
The software update fixed several security problems.
Our teacher asked us to read two chapters tonight.
The river flooded the village after three days of rain.
Can you pass me the salt and the pepper, please?
The museum opened a new exhibition about ancient Egypt.
He forgot his keys at the office again yesterday.
The football team won the championship last season.
Birds migrate south when the weather turns cold.
She wrote a letter to her friend in Tokyo.
The doctor said that I need to sleep more.
Berlin and Madrid are two large European capitals.
The moon orbits the Earth about once a month.
We bought apples, oranges and bananas at the market.
The old castle stands on a cliff above the sea.
Please close the window, it is getting cold in here.""".split("\n")


def harvest(lm, out: Path) -> Path:
    """Pack the sentences into contexts of CONTEXT tokens (start token first) and store the layer's activations."""
    from progsae.lm.models import hidden_at_layer

    ids: list[int] = []
    for s in SENTENCES:
        ids += lm.tokenizer(s + " ", add_special_tokens=False)["input_ids"] + [lm.sep_token_id]
    per = CONTEXT - 1
    n_ctx = len(ids) // per
    toks = np.zeros((n_ctx, CONTEXT), dtype=np.int32)
    toks[:, 0] = lm.start_token_id
    toks[:, 1:] = np.asarray(ids[: n_ctx * per]).reshape(n_ctx, per)
    with torch.inference_mode():
        h = hidden_at_layer(lm.model, torch.from_numpy(toks).long(), LAYER)[:, 1:]
    w = CacheWriter(out, Manifest(model=LM, layer=LAYER, d_model=lm.d_model, corpus=["fixture"], split="heldout",
                                  context=CONTEXT, target_tokens=n_ctx * per, bos=lm.start_token))
    w.add_shard(h.reshape(-1, lm.d_model).float().numpy(), toks)
    w.finish()
    return out


def kmeans(x: torch.Tensor, m: int, iters: int = 12, seed: int = 0) -> torch.Tensor:
    """Unit-norm directions of spherical k-means clusters of the centred rows of x."""
    g = torch.Generator().manual_seed(seed)
    xn = torch.nn.functional.normalize(x, dim=1)
    c = xn[torch.randperm(x.shape[0], generator=g)[:m]].clone()
    for _ in range(iters):
        assign = (xn @ c.T).argmax(1)
        new = torch.zeros_like(c).index_add_(0, assign, xn)
        empty = new.norm(dim=1) == 0
        new[empty] = xn[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=g)]
        c = torch.nn.functional.normalize(new, dim=1)
    return c


def freq_order(codes) -> torch.Tensor:
    counts = torch.zeros(M).index_add_(0, codes.indices.flatten(), (codes.values > 0).float().flatten())
    return torch.sort(counts, descending=True, stable=True).indices


def progressive_fit(z: torch.Tensor, target: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Decoder rows fitted band by band of the ladder (in `order`), each by ridge on what the earlier bands left."""
    W = torch.zeros(M, target.shape[1])
    resid, lo = target.clone(), 0
    for g in LADDER:
        band = order[lo:g]
        zb = z[:, band]
        W[band] = torch.linalg.solve(zb.T @ zb + 0.1 * torch.eye(len(band)), zb.T @ resid)
        resid = resid - zb @ W[band]
        lo = g
    return W


def build(root: Path, with_lm: bool = True) -> dict:
    """Write mat/ and topk/ checkpoints (+ cards, metrics) and the cache under root."""
    from progsae.lm.models import load_model

    lm = load_model(LM)
    acts = harvest(lm, root / "acts")
    cache = ActivationCache(acts)
    x = cache.gather(cache.rows())
    mu = x.mean(0)
    atoms = kmeans(x - mu, M)
    scale = float((x - mu).norm(dim=1).mean())
    enc = SAE(W_enc=atoms.T.clone() / scale * 4, W_dec=atoms.clone(), b_enc=torch.zeros(M), b_dec=mu.clone(), k=K)
    codes = enc.encode(x)
    z = torch.zeros(x.shape[0], M).scatter_(1, codes.indices, codes.values)
    W_dec = progressive_fit(z, x - mu, freq_order(codes))
    base = SAE(W_enc=enc.W_enc, W_dec=W_dec, b_enc=enc.b_enc, b_dec=mu.clone(), k=K)
    acc = ordmod.ImportanceAccumulator(base)
    acc.update(base.encode(x))
    by_freq = acc.ordering("freq")
    mat = ordmod.apply(base, by_freq)  # "Matryoshka": latents already in importance order
    shuffled = ordmod.apply(base, ordmod.Ordering("rand", torch.randperm(M, generator=torch.Generator().manual_seed(1)),
                                                  torch.zeros(M, dtype=torch.float64)))
    acc2 = ordmod.ImportanceAccumulator(shuffled)
    acc2.update(shuffled.encode(x))
    orderings = {c: acc2.ordering(c) for c in ordmod.CRITERIA}
    lens = LogitLens(lm, 8)
    out = {}
    for name, sae, arch, ords in (("mat", mat, "matryoshka", None), ("topk", shuffled, "topk", orderings)):
        meta = checkpoint.CheckpointMeta(architecture=arch, d_in=lm.d_model, d_sae=M, k=K, granularities=LADDER,
                                         model=LM, layer=LAYER, hook=f"hidden_states[{LAYER}]",
                                         extra={"fixture": "dashboard k-means",
                                                **({"k_ladder": list(K_LADDER)} if name == "mat" else {})})
        path = checkpoint.save(root / name, sae, meta, ords, metrics=curves(sae, x, ords))
        cards = features.compute(sae, cache, features.FeatureConfig(top_n=4, window=6, promoted=8, progress=False),
                                 decode=lens.decode, lens=lens)
        feature_cards.save(path, cards)
        out[name] = path
    return out


def curves(sae: SAE, x: torch.Tensor, ords: dict | None) -> dict:
    """metrics.json in `progsae eval`'s shape: per ordering, FVU and L0 at every rung."""
    out = {}
    for name, o in {"none": None, **(ords or {})}.items():
        s = sae if o is None else ordmod.apply(sae, o)
        codes = s.encode(x)
        rungs = [{"g": r.g, "fvu": float(metrics.fvu(x, r.recon)), "l0": float(r.l0.float().mean())}
                 for r in s.progressive(codes, LADDER)]
        out[name] = {"ordering": name, "rungs": rungs}
    out["summary"] = {"fvu": out["none"]["rungs"][-1]["fvu"]}
    return out
