"""Training math: sparse backward, incremental Matryoshka loss, AuxK, decoder norm, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from progsae.trainer.training.config import TrainConfig
from progsae.trainer.training.dead_latents import DeadTracker
from progsae.trainer.training.losses import (
    TrainableSAE,
    auxk_loss,
    band_partials,
    forward,
    naive_prefix_sse,
    prefix_sse,
    total_variance,
)
from progsae.trainer.training.sae_init import geometric_median, init_b_dec, norm_scale
from progsae.trainer.training.sparse_topk import topk_encode, topk_encode_dense

D, M, K, B = 8, 32, 4, 64

pytestmark = pytest.mark.usefixtures("one_thread")

LADDER = (4, 8, 16, 32)


def make_sae(seed: int = 0, dtype: torch.dtype = torch.float64) -> TrainableSAE:
    sae = TrainableSAE(D, M, torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return sae


def batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(sae: TrainableSAE) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dead", [None, torch.tensor([0, 3, 5, 9, 17, 30])])
def test_sparse_encoder_backward_matches_autograd(dead):
    x, W, b = batch(), torch.randn(D, M, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
    r, r_aux = torch.randn(B, K, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    out = []
    for enc in (topk_encode, topk_encode_dense):
        xs, Ws, bs = (t.clone().requires_grad_() for t in (x, W, b))
        s = enc(xs, Ws, bs, K, dead, 3)
        loss = (s.values * r).sum() + (s.aux_values * r_aux[:, : s.aux_values.shape[1]]).sum()
        loss.backward()
        out.append((s.indices, s.aux_indices, xs.grad, Ws.grad, bs.grad))
    for a, b_ in zip(*out):
        torch.testing.assert_close(a, b_)


def test_sparse_encoder_gradcheck():
    x, W, b = batch()[:6].requires_grad_(), torch.randn(D, M, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
    W.requires_grad_(), b.requires_grad_()
    dead = torch.tensor([1, 2, 7])
    f = lambda x, W, b: sum(t.sum() for t in topk_encode(x, W, b, K, dead, 2)[:4:2])  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, W, b))


@pytest.mark.parametrize("ladder", [LADDER, (M,)])
def test_sparse_training_gradients_match_plain_autograd(ladder):
    """Whole forward (encoder, banded decoder, AuxK): sparse backward == dense autograd."""
    x, dead = batch(), torch.tensor([2, 3, 11, 12, 13, 29])
    w = torch.full((len(ladder),), 1 / len(ladder), dtype=torch.float64)
    res = []
    for enc in (topk_encode, topk_encode_dense):
        sae = make_sae()
        o = forward(sae, x, K, ladder, w, dead, k_aux=3, auxk_coef=0.5, encode=enc)
        o.loss.backward()
        res.append((o.loss.detach(), grads(sae)))
    torch.testing.assert_close(res[0][0], res[1][0])
    for n in res[1][1]:
        torch.testing.assert_close(res[0][1][n], res[1][1][n], msg=n)


def test_incremental_matryoshka_loss_equals_naive_per_prefix_loss():
    x = batch()
    res = []
    for incremental in (True, False):
        sae = make_sae()
        sel = topk_encode(x - sae.b_dec, sae.W_enc, sae.b_enc, K)
        if incremental:
            sse, _ = prefix_sse(x - sae.b_dec, band_partials(sae.W_dec, sel, LADDER))
        else:
            sse = naive_prefix_sse(x, sae, sel, LADDER)
        (sse * torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)).sum().backward()
        res.append((sse.detach(), grads(sae)))
    torch.testing.assert_close(res[0][0], res[1][0])
    assert res[0][1].keys() == res[1][1].keys() == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for n in res[0][1]:
        torch.testing.assert_close(res[0][1][n], res[1][1][n], msg=n)


def test_prefix_loss_is_fvu_at_each_rung_and_topk_is_full_fvu():
    x, sae = batch(), make_sae()
    w = torch.tensor([0.25] * 4, dtype=torch.float64)
    o = forward(sae, x, K, LADDER, w)
    sel = o.sel
    tv = ((x - x.mean(0)) ** 2).sum()
    for j, g in enumerate(LADDER):
        v = sel.values * (sel.indices < g)
        x_hat = F.embedding_bag(sel.indices, sae.W_dec, per_sample_weights=v, mode="sum") + sae.b_dec
        assert float(o.fvus[j]) == pytest.approx(float(((x - x_hat) ** 2).sum().detach() / tv), rel=1e-10)
    assert float(o.loss.detach()) == pytest.approx(float((w * o.fvus).sum()), rel=1e-12)
    top = forward(make_sae(), x, K, (M,), torch.ones(1, dtype=torch.float64))
    assert float(top.loss.detach()) == pytest.approx(float(o.fvus[-1]), rel=1e-10)
    assert float(total_variance(x)) == pytest.approx(float(tv), rel=1e-12)


def test_group_weights_normalised():
    cfg = TrainConfig(d_sae=32, k=4, granularities=LADDER, group_weights=(1, 1, 2, 4))
    cfg.validate()
    assert cfg.weights() == pytest.approx((0.125, 0.125, 0.25, 0.5))
    assert math.isclose(sum(cfg.weights()), 1.0)
    assert TrainConfig(d_sae=32, k=4, granularities=LADDER).weights() == pytest.approx((0.25,) * 4)
    assert TrainConfig(arch="topk", d_sae=32, k=4, granularities=LADDER).weights() == (1.0,)
    assert TrainConfig(arch="topk", d_sae=32, k=4).loss_ladder() == (32,)
    for bad in [(1, 1), (1, -1, 1, 1), (0, 0, 0, 0)]:
        with pytest.raises(ValueError):
            TrainConfig(d_sae=32, k=4, granularities=LADDER, group_weights=bad).validate()


@pytest.mark.parametrize("kw,msg", [
    ({"d_sae": 16, "k": 4, "granularities": (8, 32)}, "smaller than the largest granularity"),
    ({"d_sae": 32, "k": 4, "granularities": (16, 8, 32)}, "strictly increasing"),
    ({"d_sae": 32, "k": 32}, "--k"),
    ({"d_sae": 32, "k": 4, "granularities": (8, 16)}, "last granularity"),
    ({"d_sae": 32, "k": 4, "decoder_norm": "loose"}, "--decoder-norm"),
    ({"d_sae": 32, "k": 4, "auxk_norm": "none"}, "--auxk-norm"),
])
def test_config_rejects_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw).validate()


def test_parallel_gradient_removed_and_rows_renormalised():
    sae, x = make_sae(), batch()
    forward(sae, x, K, LADDER, torch.full((4,), 0.25, dtype=torch.float64)).loss.backward()
    g0 = sae.W_dec.grad.clone()
    w = sae.W_dec.detach()
    sae.remove_parallel_grad()
    g = sae.W_dec.grad
    torch.testing.assert_close((g * w).sum(1), torch.zeros(M, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g, g0 - (g0 * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w)
    with torch.no_grad():
        sae.W_dec.sub_(0.5 * g)
    sae.normalise_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M, dtype=torch.float64))


def test_init_encoder_is_decoder_transpose_with_unit_rows():
    sae = TrainableSAE(D, M, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))


# --- AuxK -------------------------------------------------------------------------------


def test_auxk_target_is_detached_residual():
    sae, x = make_sae(), batch()
    dead = torch.arange(0, M, 2)
    o = forward(sae, x, K, LADDER, torch.zeros(4, dtype=torch.float64), dead, k_aux=4, auxk_coef=1.0)
    assert o.sel.aux_indices.shape == (B, 4)
    o.loss.backward()  # loss = auxk only
    used = torch.zeros(M, dtype=torch.bool)
    used[o.sel.aux_indices] = True
    # no gradient reaches the live (non-aux) decoder rows: the residual is detached
    assert torch.all(sae.W_dec.grad[~used] == 0)
    assert sae.W_dec.grad[used].abs().sum() > 0
    residual = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    auxk_loss(sae.W_dec, o.sel._replace(aux_values=o.sel.aux_values.detach()), residual).backward()
    assert residual.grad is None


def test_auxk_decodes_without_b_dec_against_full_residual():
    sae, x = make_sae(), batch()
    dead = torch.arange(1, M, 3)
    o = forward(sae, x, K, LADDER, torch.full((4,), 0.25, dtype=torch.float64), dead, k_aux=5)
    s = o.sel
    x_hat = F.embedding_bag(s.indices, sae.W_dec, per_sample_weights=s.values, mode="sum") + sae.b_dec
    e = (x - x_hat).detach()  # residual of the FULL reconstruction, not of a prefix
    e_hat = F.embedding_bag(s.aux_indices, sae.W_dec, per_sample_weights=s.aux_values, mode="sum")
    want = ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert float(o.auxk) == pytest.approx(float(want.detach()), rel=1e-10)
    with_b_dec = ((e_hat + sae.b_dec - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert float(o.auxk) != pytest.approx(float(with_b_dec.detach()), rel=1e-3)
    assert set(s.aux_indices.unique().tolist()) <= set(dead.tolist())


def test_auxk_coefficient_and_defaults():
    cfg = TrainConfig(d_sae=32, k=4)
    assert cfg.auxk_coef == 1 / 32
    assert cfg.k_aux_for(576) == 288
    x, dead = batch(), torch.arange(M)
    w = torch.full((4,), 0.25, dtype=torch.float64)
    o = forward(make_sae(), x, K, LADDER, w, dead, k_aux=D // 2, auxk_coef=cfg.auxk_coef)
    assert o.sel.aux_indices.shape[1] == D // 2
    recon = float((w * o.fvus).sum())
    assert float(o.loss.detach()) == pytest.approx(recon + float(o.auxk) / 32, rel=1e-12)
    o2 = forward(make_sae(), x, K, LADDER, w, None, k_aux=D // 2)
    assert float(o2.loss.detach()) == pytest.approx(recon, rel=1e-12) and float(o2.auxk) == 0


def test_dead_window_counted_in_tokens():
    t = DeadTracker(4, window=100)
    idx, val = torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]])  # latent 1 selected but zero: not firing
    for _ in range(3):
        t.update(idx, val, n_tokens=30)
    assert t.since_fired.tolist() == [0, 90, 90, 90] and t.dead_ids() is None
    t.update(idx, val, n_tokens=30)  # 120 tokens >= 100
    assert t.dead_ids().tolist() == [1, 2, 3]
    t.update(torch.tensor([[2]]), torch.tensor([[0.5]]), n_tokens=1)
    assert t.since_fired.tolist() == [1, 121, 0, 121] and t.dead_ids().tolist() == [1, 3]
    big = DeadTracker(4, window=100)
    big.update(idx, val, n_tokens=100)  # one batch of 100 tokens is a whole window
    assert big.dead_ids().tolist() == [1, 2, 3]


def test_dead_window_rule():
    cfg = TrainConfig(d_sae=32, k=4, batch_size=4096)
    assert cfg.dead_window(2_000_000) == 200_000
    assert cfg.dead_window(10_000) == 4096
    assert cfg.dead_window(10**10) == 10_000_000
    assert TrainConfig(d_sae=32, k=4, dead_tokens=123).dead_window(10**9) == 123


# --- init and schedule ------------------------------------------------------------------


def test_norm_scale_and_geometric_median():
    x = 3.0 * torch.randn(1000, D)
    c = norm_scale(x)
    assert float((c * x).double().square().sum(1).mean()) == pytest.approx(D, rel=1e-6)
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts)
    assert gm.norm() < 2.0  # robust to the outlier, unlike the mean
    torch.testing.assert_close(geometric_median(torch.tensor([[1.0, 2.0]] * 3)), torch.tensor([1.0, 2.0]))
    assert torch.equal(init_b_dec(pts, "zeros"), torch.zeros(2))
    torch.testing.assert_close(init_b_dec(pts, "mean"), pts.mean(0))
    with pytest.raises(ValueError, match="median, mean or zeros"):
        init_b_dec(pts, "mode")


def test_lr_schedule_warmup_flat_decay():
    cfg = TrainConfig(d_sae=4096, k=32)
    assert cfg.base_lr() == pytest.approx(4e-4)
    lrs = [cfg.lr_at(s, 100) for s in range(100)]
    assert cfg.warmup_steps(100) == 5
    assert lrs[0] < lrs[4] < lrs[5] == lrs[50] == cfg.base_lr()
    assert lrs[79] == cfg.base_lr() and lrs[80] < cfg.base_lr() and 0 < lrs[99] < lrs[90]


# --- SAELens's TopK recipe: free decoder rows, AuxK on the batch's scale ------------------


def _free_sae(seed: int = 0) -> TrainableSAE:
    sae = make_sae(seed)
    sae.free_norm = True
    with torch.no_grad():  # rows of norms 0.2 .. 3: the free parametrisation differs from unit rows
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, M, dtype=torch.float64)[torch.randperm(M)][:, None])
    return sae


def test_free_decoder_rows_train_like_saelens_rescaled_topk():
    """Loss and every gradient of our sparse forward with free rows == SAELens's own
    TopKTrainingSAE (rescale_acts_by_decoder_norm) under plain autograd, on the same weights."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    x, ours = batch(), _free_sae()
    o = forward(ours, x, K, (M,), torch.ones(1, dtype=torch.float64))
    o.loss.backward()
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, dtype="float64", device="cpu",
                                               rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sl, n).copy_(getattr(ours, n))
    feats, _ = sl.encode_with_hidden_pre(x)
    theirs = ((x - sl.decode(feats)) ** 2).sum() / total_variance(x)
    theirs.backward()
    assert float(o.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-10)
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, n).grad, getattr(sl, n).grad, msg=n)


def test_free_rows_fold_into_an_identical_unit_row_sae():
    sae, x = _free_sae(1), batch(1)
    W_enc, b_enc, W_dec = sae.effective()
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(M, dtype=torch.float64))
    unit = make_sae(1)
    with torch.no_grad():
        unit.W_enc.copy_(W_enc), unit.b_enc.copy_(b_enc), unit.W_dec.copy_(W_dec)
    w = torch.full((4,), 0.25, dtype=torch.float64)
    a, b = forward(sae, x, K, LADDER, w), forward(unit, x, K, LADDER, w)
    assert torch.equal(a.sel.indices, b.sel.indices)
    torch.testing.assert_close(a.fvus, b.fvus)
    # the raw rows are not unit: a step keeps their norms free (no renormalisation)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(M, dtype=torch.float64))


@pytest.mark.parametrize("n_dead", [3, 12])
def test_auxk_batch_norm_is_saelens_scale(n_dead):
    sae, x = make_sae(), batch()
    dead, k_aux = torch.arange(n_dead) * 2, 6
    w = torch.full((4,), 0.25, dtype=torch.float64)
    gao = forward(sae, x, K, LADDER, w, dead, k_aux=k_aux)
    sl = forward(sae, x, K, LADDER, w, dead, k_aux=k_aux, auxk_norm="batch")
    s = sl.sel
    x_hat = F.embedding_bag(s.indices, sae.W_dec, per_sample_weights=s.values, mode="sum") + sae.b_dec
    e = (x - x_hat).detach()
    sse = ((F.embedding_bag(s.aux_indices, sae.W_dec, per_sample_weights=s.aux_values, mode="sum") - e) ** 2).sum()
    want = sse / total_variance(x) * min(n_dead / k_aux, 1.0)
    assert float(sl.auxk) == pytest.approx(float(want.detach()), rel=1e-10)
    assert float(gao.auxk) == pytest.approx(float((sse / total_variance(e)).detach()), rel=1e-10)
    assert float(sl.loss.detach()) == pytest.approx(float((w * sl.fvus).sum() + sl.auxk / 32), rel=1e-12)
