"""Hierarchical top-k (`--k-ladder`): the loss at each k', its gradients, and what training buys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.sae import checkpoint
from progsae.sae.codec import Codes, topk_prefix
from progsae.sae.metrics import fvu as batch_fvu
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.training.config import TrainConfig
from progsae.trainer.training.losses import band_partials, forward, rank_partials, total_variance
from progsae.trainer.training.sparse_topk import topk_encode, topk_encode_dense
from progsae.trainer.training.train import train
from tests.support.caches import make_cache
from tests.unit.test_train_losses import LADDER, batch, grads, make_sae

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
K_LADDER = (1, 2, 4)
M = 32


def naive_fvu_at(x: torch.Tensor, sae, sel, g: int, k_prime: int) -> torch.Tensor:
    """FVU of decoding each token from its k' largest codes with index < g (codec.topk_prefix)."""
    c = topk_prefix(Codes(sel.indices, sel.values), g, k_prime)
    v = c.values * (c.indices < g)
    x_hat = F.embedding_bag(c.indices, sae.W_dec, per_sample_weights=v, mode="sum") + sae.b_dec
    return (x - x_hat).square().sum() / total_variance(x)


@pytest.mark.parametrize("ladder", [LADDER, (M,)])
def test_k_ladder_of_k_alone_is_todays_loss_exactly(ladder):
    x, dead = batch(), torch.tensor([2, 3, 11])
    w = torch.full((len(ladder),), 1 / len(ladder), dtype=torch.float64)
    res = []
    for k_ladder in ((), (K,)):
        sae = make_sae()
        o = forward(sae, x, K, ladder, w, dead, k_aux=3, k_ladder=k_ladder)
        o.loss.backward()
        res.append((o.loss.detach(), grads(sae)))
    assert torch.equal(res[0][0], res[1][0])
    assert res[0][1].keys() == res[1][1].keys() == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for n in res[0][1]:
        assert torch.equal(res[0][1][n], res[1][1][n]), n


def test_one_rank_band_is_the_full_decode_exactly():
    sae, x = make_sae(), batch()
    sel = topk_encode(x - sae.b_dec, sae.W_enc, sae.b_enc, K)
    assert torch.equal(rank_partials(sae.W_dec, sel, (K,)), band_partials(sae.W_dec, sel, (M,)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k_ladder=st.sampled_from([(1, 4), (1, 2, 4), (2, 3, 4), (3, 4)]))
def test_rank_bands_sum_to_the_k_prime_largest_codes(seed, k_ladder):
    sae, x = make_sae(seed), batch(seed)
    sel = topk_encode(x - sae.b_dec, sae.W_enc, sae.b_enc, K)
    cum = rank_partials(sae.W_dec, sel, k_ladder).cumsum(0) + sae.b_dec
    for j, kp in enumerate(k_ladder):
        c = topk_prefix(Codes(sel.indices, sel.values), M, kp)
        want = F.embedding_bag(c.indices, sae.W_dec, per_sample_weights=c.values, mode="sum") + sae.b_dec
        torch.testing.assert_close(cum[j], want)


@pytest.mark.parametrize("arch_ladder", [(M,), LADDER])
def test_k_ladder_loss_is_mean_over_k_prime(arch_ladder):
    """TopK: HierarchicalTopK's mean of FVU(M, k'). Matryoshka: (prefix loss at k + FVU(M, k') for
    k' < k) / n."""
    x = batch()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4][: len(arch_ladder)], dtype=torch.float64)
    w = w / w.sum()
    sae = make_sae()
    o = forward(sae, x, K, arch_ladder, w, k_ladder=K_LADDER)
    sel = o.sel
    prefix = sum(wj * naive_fvu_at(x, sae, sel, g, K) for wj, g in zip(w, arch_ladder))
    lower = [naive_fvu_at(x, sae, sel, M, kp) for kp in K_LADDER[:-1]]
    torch.testing.assert_close(o.loss, (prefix + sum(lower)) / len(K_LADDER))
    torch.testing.assert_close(o.fvus_k, torch.stack([*lower, naive_fvu_at(x, sae, sel, M, K)]).detach())


@pytest.mark.parametrize("ladder", [LADDER, (M,)])
def test_k_ladder_sparse_gradients_match_plain_autograd(ladder):
    x, dead = batch(), torch.tensor([2, 3, 11, 12, 13, 29])
    w = torch.full((len(ladder),), 1 / len(ladder), dtype=torch.float64)
    res = []
    for enc in (topk_encode, topk_encode_dense):
        sae = make_sae()
        o = forward(sae, x, K, ladder, w, dead, k_aux=3, auxk_coef=0.5, encode=enc, k_ladder=K_LADDER)
        o.loss.backward()
        res.append((o.loss.detach(), grads(sae)))
    torch.testing.assert_close(res[0][0], res[1][0])
    for n in res[1][1]:
        torch.testing.assert_close(res[0][1][n], res[1][1][n], msg=n)


def test_gradient_of_the_k1_term_reaches_exactly_each_tokens_largest_code():
    """2 * grad(loss with k ladder (1, k)) - grad(loss without) = grad FVU(M, 1): nonzero on the
    decoder rows and encoder biases of the latents that are some token's largest code, only those."""
    x = batch()
    w = torch.ones(1, dtype=torch.float64)
    g = {}
    for kl in ((), (1, K)):
        sae = make_sae()
        o = forward(sae, x, K, (M,), w, k_ladder=kl)
        o.loss.backward()
        g[kl] = grads(sae)
    top1 = set(o.sel.indices.gather(1, o.sel.values.argmax(1, keepdim=True)).flatten().tolist())
    for name, rows in (("W_dec", lambda t: t.abs().sum(1)), ("b_enc", torch.abs)):
        d = rows(2 * g[(1, K)][name] - g[()][name])
        touched = set(torch.nonzero(d > 1e-12).flatten().tolist())
        assert touched == top1, name


@pytest.mark.parametrize("kw, msg", [
    ({"k_ladder": (1, 2, 3)}, "must equal --k"),
    ({"k_ladder": (2, 1, 4)}, "strictly increasing"),
    ({"k_ladder": (0, 4)}, "strictly increasing"),
])
def test_config_rejects_bad_k_ladder(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(d_sae=M, k=K, **kw).validate()


def test_config_records_k_ladder_only_when_set():
    assert "k_ladder" not in TrainConfig(d_sae=M, k=K).to_dict()
    d = TrainConfig(d_sae=M, k=K, k_ladder=K_LADDER).to_dict()
    assert d["k_ladder"] == list(K_LADDER) and TrainConfig.from_dict(d).k_ladder == K_LADDER


def _fvu_at_k_prime(ck: Path, cache: Path, k_prime: int) -> float:
    c = checkpoint.load(ck)
    x = torch.cat(list(ActivationCache(cache).batches(512, shuffle=False))).double()
    sae = c.sae.to(dtype=torch.float64)
    codes = topk_prefix(sae.encode(x), sae.d_sae, k_prime)
    return batch_fvu(x, sae.decode(codes))


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_training_with_k_ladder_decodes_better_at_small_k_prime(tmp_path, arch):
    cache = make_cache(tmp_path / "acts", n=1200)
    base = dict(arch=arch, d_sae=M, k=K, granularities=(8, 16, M), batch_size=64, lr=4e-3, seed=1,
                tokens=64 * 150, checkpoint_every=0, log_every=50)
    plain = train(TrainConfig(**base), cache, tmp_path / "plain", progress=False)
    hier = train(TrainConfig(**base, k_ladder=K_LADDER), cache, tmp_path / "hier", progress=False)
    assert checkpoint.load_meta(hier).extra["k_ladder"] == list(K_LADDER)
    assert "k_ladder" not in checkpoint.load_meta(plain).extra
    f_plain, f_hier = (_fvu_at_k_prime(p, cache, 1) for p in (plain, hier))
    assert f_hier < 0.95 * f_plain, (f_hier, f_plain)  # seen: topk 0.46 vs 0.53, matryoshka 0.44 vs 0.57


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), g=st.integers(1, 64), k_prime=st.integers(1, 10))
def test_topk_prefix_keeps_the_k_prime_largest_codes_below_g(seed, g, k_prime):
    from tests.conftest import random_sae

    sae = random_sae(seed=seed, dtype=torch.float64)
    x = torch.randn(12, sae.d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    codes = sae.encode(x)
    c = topk_prefix(codes, g, k_prime)
    below = torch.where(codes.indices < g, codes.values, torch.zeros_like(codes.values))
    want = below.sort(1, descending=True).values[:, :k_prime]
    got = torch.where(c.indices < g, c.values, torch.zeros_like(c.values)).sort(1, descending=True).values
    torch.testing.assert_close(got, want[:, : got.shape[1]])
    assert bool(((c.values == 0) | (c.indices < g)).all())  # nothing at or above g is active
    if k_prime >= sae.k:
        torch.testing.assert_close(sae.decode(c, g), sae.decode(codes, g))
        torch.testing.assert_close(sae.decode(c), sae.decode(codes, g))
