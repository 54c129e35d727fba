"""SPEC §5 metric definitions against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from progsae.sae.metrics import (
    FVUAccumulator,
    RSAReference,
    TokenLossAccumulator,
    bootstrap_weights,
    ce_loss_recovered,
    ce_recovered_bootstrap,
    ce_recovered_difference,
    density_histogram,
    fit_power_law,
    fvu,
    per_token_mean_bootstrap,
    rsa,
    token_variance,
)


def test_fvu_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    # mean (2, 3); sum ||x - mean||^2 = 1+1+1+1 = 4; sse = 1
    assert fvu(x, x_hat) == pytest.approx(0.25, abs=1e-15)
    # about the mean, not about zero: sum ||x||^2 = 30 would give 1/30
    assert fvu(x, x_hat) != pytest.approx(1 / 30)


def test_fvu_against_a_fixed_variance():
    """A checkpoint's reference variance as the baseline (issue 22 item 5): per token, about the
    sample's own mean; as the denominator it gives the batch FVU back for the batch's own variance,
    and is small for two similar tokens reconstructed well, whose own variance makes it above 1."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert token_variance(x) == pytest.approx(2.0, abs=1e-15)  # (1+1+1+1) / 2 tokens
    assert fvu(x, x_hat, variance=token_variance(x)) == pytest.approx(fvu(x, x_hat), abs=1e-15)
    assert fvu(x, x_hat, variance=10.0) == pytest.approx(1 / 20, abs=1e-15)
    g = torch.Generator().manual_seed(0)
    train = 3 * torch.randn(5000, 8, generator=g)
    two = 3 * torch.randn(1, 8, generator=g) + 0.2 * torch.randn(2, 8, generator=g)  # two similar tokens
    close = two + 0.5 * torch.randn(2, 8, generator=g)  # error 2 per token; training variance 72, theirs 0.16
    assert token_variance(train) == pytest.approx(72, rel=0.05)
    assert fvu(two, close, variance=token_variance(train)) < 0.1 < 1 < fvu(two, close)


def test_fvu_is_mean_over_whole_set_not_per_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g) + torch.arange(100.0)[:, None] / 10  # drifting mean
    x_hat = x + 0.3 * torch.randn(100, 5, generator=g)
    whole = fvu(x, x_hat)
    for splits in ([50, 50], [1, 99], [7, 13, 80], [33, 33, 34]):
        acc = FVUAccumulator()
        for xs, hs in zip(x.split(splits), x_hat.split(splits)):
            acc.update(xs, hs)
        assert acc.value() == pytest.approx(whole, rel=1e-12)
    per_batch = np.mean([fvu(a, b) for a, b in zip(x.split(50), x_hat.split(50))])
    assert abs(per_batch - whole) > 1e-3  # the per-batch mean is a different (wrong) number


def test_fvu_float64_accumulation():
    x = torch.full((1000, 3), 1e4) + torch.randn(1000, 3)
    x_hat = x + 0.1  # float32: the data sit near 1e4, their spread is ~1
    acc = FVUAccumulator()
    for xs, hs in zip(x.split(10), x_hat.split(10)):
        acc.update(xs, hs)
    xd = x.double()
    exact = float(((xd - x_hat.double()) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert acc.value() == pytest.approx(exact, rel=1e-6)


def _at_angles(deg: list[float]) -> torch.Tensor:
    a = np.radians(deg)
    return torch.tensor(np.stack([np.cos(a), np.sin(a)], 1))


def test_rsa_identical_is_one_and_scale_invariant():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    assert rsa(x, x) == pytest.approx(1.0)
    assert rsa(x, 3.0 * x) == pytest.approx(1.0)  # cosine distances ignore scale


def test_rsa_known_value():
    # Pair order (0,1),(0,2),(0,3),(1,2),(1,3),(2,3). x at 0,20,50,110 deg: angle gaps
    # 20,50,110,30,90,60 -> ranks 1,3,6,2,5,4. x_hat at 0,40,55,100: gaps 40,55,100,15,60,45
    # -> ranks 2,4,6,1,5,3. d = -1,-1,0,1,0,1: rho = 1 - 6*4 / (6*35) = 31/35.
    x, x_hat = _at_angles([0, 20, 50, 110]), _at_angles([0, 40, 55, 100])
    assert rsa(x, x_hat) == pytest.approx(31 / 35, abs=1e-12)
    ref = RSAReference(x)
    assert ref.score(x_hat) == pytest.approx(31 / 35, abs=1e-12)
    assert ref.score(x) == pytest.approx(1.0)


def test_rsa_matches_scipy_spearman():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    nx, ny = torch.nn.functional.normalize(x.double(), dim=1), torch.nn.functional.normalize(y.double(), dim=1)
    iu = torch.triu_indices(40, 40, 1)
    dx, dy = (1 - nx @ nx.T)[iu[0], iu[1]], (1 - ny @ ny.T)[iu[0], iu[1]]
    assert rsa(x, y) == pytest.approx(spearmanr(dx, dy).statistic, abs=1e-10)


def test_rsa_constant_reconstruction_is_nan():
    x = torch.randn(10, 4)
    assert math.isnan(rsa(x, torch.ones(10, 4)))


def test_power_law_recovers_alpha():
    r = np.arange(1, 2001)
    fit = fit_power_law(np.concatenate([3.0 * r**-0.7, np.zeros(50)]))  # dead latents excluded
    assert fit.alpha == pytest.approx(0.7, abs=1e-9)
    assert fit.C == pytest.approx(3.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.n == 2000
    noisy = 3.0 * r**-1.2 * np.exp(np.random.default_rng(0).normal(0, 0.1, r.size))
    nf = fit_power_law(noisy)
    assert nf.alpha == pytest.approx(1.2, abs=0.02) and 0.9 < nf.r2 < 1.0


def test_ce_recovered_arithmetic():
    assert ce_loss_recovered(ce_clean=2.0, ce_zero=10.0, ce_sae=2.0) == 1.0
    assert ce_loss_recovered(ce_clean=2.0, ce_zero=10.0, ce_sae=10.0) == 0.0
    assert ce_loss_recovered(ce_clean=2.0, ce_zero=10.0, ce_sae=4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(ce_clean=2.0, ce_zero=10.0, ce_sae=12.0) == pytest.approx(-0.25)
    assert math.isnan(ce_loss_recovered(2.0, 2.0, 3.0))


def test_token_loss_accumulator_by_hand():
    p_clean = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    p = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    t = torch.tensor([0, 1])
    acc = TokenLossAccumulator()
    acc.update(p_clean.log()[:1], p.log()[:1], t[:1])  # two batches: sums, then one mean
    acc.update(p_clean.log()[1:], p.log()[1:], t[1:])
    assert acc.ce == pytest.approx((-math.log(0.25) - math.log(0.1)) / 2)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert acc.kl == pytest.approx(kl0 / 2, rel=1e-6)
    same = TokenLossAccumulator()
    same.update(p_clean.log(), p_clean.log(), t)
    assert same.kl == 0.0


def test_density_histogram():
    h = density_histogram(np.array([0, 0, 1, 10, 100, 1000]), n_tokens=1000, lo=-4.0, bins=4)
    assert h.dead == 2
    assert h.edges == [-4.0, -3.0, -2.0, -1.0, 0.0]
    assert h.counts == [0, 1, 1, 2]  # freq 1e-3, 1e-2, 1e-1 and 1 (edges fall in the upper bin)
    assert sum(h.counts) + h.dead == 6


def test_token_loss_accumulator_per_context_sums():
    g = torch.Generator().manual_seed(3)
    lp_clean = torch.log_softmax(torch.randn(12, 5, generator=g), -1)
    lp = torch.log_softmax(torch.randn(12, 5, generator=g), -1)
    t = torch.randint(0, 5, (12,), generator=g)
    acc = TokenLossAccumulator()
    acc.update(lp_clean[:8], lp[:8], t[:8], contexts=2)  # two contexts of 4 tokens
    acc.update(lp_clean[8:], lp[8:], t[8:], contexts=1)
    assert acc.context_tokens == [4, 4, 4]
    for c in range(3):
        sl = slice(4 * c, 4 * c + 4)
        ce = -lp[sl].double().gather(-1, t[sl, None]).sum()
        kl = (lp_clean[sl].double().exp() * (lp_clean[sl].double() - lp[sl].double())).sum()
        assert acc.context_ce[c] == pytest.approx(float(ce), rel=1e-6)
        assert acc.context_kl[c] == pytest.approx(float(kl), rel=1e-5)
    assert acc.ce_sum == pytest.approx(sum(acc.context_ce), rel=1e-12) and acc.n == 12
    with pytest.raises(ValueError, match="equal contexts"):
        acc.update(lp_clean[:5], lp[:5], t[:5], contexts=2)


def test_bootstrap_weights_are_resamples():
    w = bootstrap_weights(7, n_boot=50, seed=1)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    assert np.array_equal(w, bootstrap_weights(7, n_boot=50, seed=1))  # seeded
    assert not np.array_equal(w, bootstrap_weights(7, n_boot=50, seed=2))


def test_bootstrap_se_of_a_mean_is_std_over_sqrt_n():
    # Equal token counts: the per-token mean is the plain mean of the per-context values,
    # whose bootstrap SE is the (ddof=0) sample std / sqrt(n).
    rng = np.random.default_rng(0)
    n = 400
    vals = rng.gamma(2.0, 1.5, n)
    est = per_token_mean_bootstrap(vals * 10, np.full(n, 10.0), n_boot=4000, seed=0)
    assert est.value == pytest.approx(vals.mean(), rel=1e-12)
    assert est.se == pytest.approx(vals.std() / math.sqrt(n), rel=0.05)
    # CE recovered with CE_clean = 0 and a constant CE_zero = z per context is 1 - mean(sae) / z:
    # its SE is std(sae) / (z sqrt(n)).
    z = 20.0
    rec = ce_recovered_bootstrap(np.zeros(n), np.full(n, z), vals, n_boot=4000, seed=1)
    assert rec.value == pytest.approx(1 - vals.mean() / z, rel=1e-12)
    assert rec.se == pytest.approx(vals.std() / (z * math.sqrt(n)), rel=0.05)
    assert math.isnan(ce_recovered_bootstrap([1.0], [3.0], [2.0]).se)  # one context: no spread


def test_ce_recovered_bootstrap_resamples_clean_zero_and_sae_together():
    # Contexts differ wildly in difficulty but the SAE always recovers exactly half of
    # each: paired resampling keeps the ratio at 0.5, so the SE is (numerically) zero.
    rng = np.random.default_rng(4)
    clean = rng.uniform(1, 50, 64)
    zero = clean + rng.uniform(10, 200, 64)
    sae = (clean + zero) / 2
    est = ce_recovered_bootstrap(clean, zero, sae)
    assert est.value == pytest.approx(0.5) and est.se < 1e-12
    with pytest.raises(ValueError, match="one length"):
        ce_recovered_bootstrap(clean, zero, sae[:-1])


def test_paired_difference():
    rng = np.random.default_rng(5)
    n = 32
    clean = rng.uniform(200, 300, n)
    zero = clean + 600
    a = clean + rng.uniform(50, 150, n)
    same = ce_recovered_difference(clean, zero, a, a.copy())
    assert same.diff == 0.0 and same.se == 0.0 and same.lo == 0.0 and same.hi == 0.0 and not same.resolved()
    # b worse than a by a constant 30 nats per context: Δ = 30 n / (600 n) = 0.05 exactly,
    # and pairing removes every bit of the context-to-context spread.
    d = ce_recovered_difference(clean, zero, a, a + 30)
    assert d.diff == pytest.approx(0.05) and d.se < 1e-12 and d.resolved()
    # b = a plus zero-mean noise much larger than its mean shift: unresolved
    e = rng.normal(0, 40, n)
    noisy = ce_recovered_difference(clean, zero, a, a + e - e.mean() + 0.5)
    assert noisy.lo < 0 < noisy.hi and not noisy.resolved()
    assert noisy.se == pytest.approx(e.std() / (600 * math.sqrt(n)), rel=0.15)
