"""Properties of the progressive codec (SPEC §3)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.sae.codec import Codes, check_ladder, default_ladder, l0, sparse_sum
from tests.conftest import random_sae

dims = st.tuples(
    st.integers(1, 24),  # d_in
    st.integers(2, 96),  # d_sae
    st.integers(0, 10_000),  # seed
    st.integers(1, 12),  # batch
    st.sampled_from([1.0, 0.37, 5.0]),  # normalisation scale
)


def dense_reference(sae, codes: Codes, g: int) -> torch.Tensor:
    """Float64 dense masked decode: z (dense M-wide) truncated at g, @ W_dec."""
    n = codes.indices.shape[0]
    z = torch.zeros(n, sae.d_sae, dtype=torch.float64)
    z.scatter_(1, codes.indices, codes.values.double())
    z[:, g:] = 0
    return (z @ sae.W_dec.double() + sae.b_dec.double()) / sae.scale


def make(d, m, seed, n, scale):
    k = max(1, min(m - 1, 1 + seed % 8))
    sae = random_sae(d, m, k, seed, scale)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)) * 3
    return sae, x


@settings(max_examples=60, deadline=None)
@given(dims, st.data())
def test_sparse_decode_matches_dense_float64_reference(dims, data):
    sae, x = make(*dims)
    codes = sae.encode(x)
    g = data.draw(st.integers(1, sae.d_sae))
    got = sae.to(dtype=torch.float64).decode(codes, g)
    torch.testing.assert_close(got, dense_reference(sae, codes, g), rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(dims)
def test_encode_is_one_topk_of_relu_over_full_dictionary(dims):
    sae, x = make(*dims)
    codes = sae.encode(x)
    pre = ((x * sae.scale - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    assert codes.indices.shape == (x.shape[0], sae.k)
    # the selected values are the k largest ReLU'd pre-activations, at their own indices
    torch.testing.assert_close(codes.values.sort(-1).values, pre.topk(sae.k).values.sort(-1).values)
    torch.testing.assert_close(torch.gather(pre, 1, codes.indices), codes.values)
    assert (codes.values >= 0).all()


@settings(max_examples=60, deadline=None)
@given(dims, st.data())
def test_progressive_stream_equals_direct_decode_at_every_rung(dims, data):
    sae, x = make(*dims)
    ladder = sorted(data.draw(st.sets(st.integers(1, sae.d_sae), min_size=1, max_size=6)) | {sae.d_sae})
    codes = sae.encode(x)
    prev_l0, prev = None, None
    rungs = list(sae.progressive(codes, ladder))
    assert [r.g for r in rungs] == ladder
    for r in rungs:
        torch.testing.assert_close(r.recon, sae.decode(codes, r.g), rtol=1e-5, atol=1e-4)
        assert torch.equal(r.l0, l0(codes, r.g))
        if prev is not None:
            torch.testing.assert_close(r.recon, prev + r.delta, rtol=1e-5, atol=1e-4)
            assert (r.l0 >= prev_l0).all()
        prev, prev_l0 = r.recon, r.l0
    # a delta-only stream sums (with b_dec) to the same reconstructions
    total = sae.b_dec / sae.scale
    for r, d in zip(rungs, sae.progressive(codes, ladder, with_recon=False), strict=True):
        assert d.recon is None and d.g == r.g and torch.equal(d.l0, r.l0)
        total = total + d.delta
        torch.testing.assert_close(total, r.recon, rtol=1e-5, atol=1e-4)
    # top rung is the full reconstruction
    torch.testing.assert_close(rungs[-1].recon, sae.decode(codes), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(dims, st.data())
def test_nested_truncation_keeps_only_latents_below_g(dims, data):
    sae, x = make(*dims)
    codes = sae.encode(x)
    g = data.draw(st.integers(1, sae.d_sae))
    keep = codes.indices < g
    truncated = Codes(codes.indices, torch.where(keep, codes.values, 0.0))
    torch.testing.assert_close(sae.decode(codes, g), sae.decode(truncated), rtol=1e-5, atol=1e-4)
    assert (l0(codes, g) <= l0(codes, sae.d_sae)).all()


@settings(max_examples=40, deadline=None)
@given(dims, st.data())
def test_prefix_encode_is_topk_within_prefix(dims, data):
    sae, x = make(*dims)
    g = data.draw(st.integers(1, sae.d_sae))
    codes = sae.prefix_encode(x, g)
    assert codes.indices.shape[1] == min(sae.k, g)
    assert (codes.indices < g).all()
    pre = ((x * sae.scale - sae.b_dec) @ sae.W_enc[:, :g] + sae.b_enc[:g]).relu()
    torch.testing.assert_close(codes.values.sort(-1).values, pre.topk(min(sae.k, g)).values.sort(-1).values)
    if g == sae.d_sae:
        torch.testing.assert_close(sae.decode(codes), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-4)


def test_prefix_encode_differs_from_nested_truncation():
    """The cheap path is a different code: a latent outside the full top-k can win the prefix."""
    sae = random_sae(d=16, m=64, k=2, seed=3)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(sae.decode(sae.prefix_encode(x, 16), 16), sae.decode(sae.encode(x), 16))


@settings(max_examples=30, deadline=None)
@given(dims)
def test_folding_the_scale_changes_nothing(dims):
    sae, x = make(*dims)
    folded = sae.fold_scale()
    assert folded.scale == 1.0
    a, b = sae.encode(x), folded.encode(x)
    torch.testing.assert_close(a.values.sort(-1).values, b.values.sort(-1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decode(a), folded.decode(b), rtol=1e-4, atol=1e-3)


def test_relu_and_jumprelu_keep_every_active_latent():
    sae = random_sae(d=8, m=32, k=32, seed=1)
    x = torch.randn(5, 8)
    relu = type(sae)(**{**sae.__dict__, "activation": "relu"})
    codes = relu.encode(x)
    pre = relu.pre_acts(x).relu()
    assert torch.equal((codes.values > 0).sum(-1), (pre > 0).sum(-1))
    torch.testing.assert_close(relu.decode(codes), pre @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-4)
    thr = torch.full((32,), 0.5)
    jump = type(sae)(**{**sae.__dict__, "activation": "jumprelu", "threshold": thr})
    pre = jump.pre_acts(x)
    dense = pre * (pre > thr)
    torch.testing.assert_close(jump.decode(jump.encode(x)), dense @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-4)


def test_empty_rungs_and_empty_bags():
    sae = random_sae(d=4, m=16, k=2)
    codes = Codes(torch.tensor([[14, 15], [0, 15]]), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    rungs = list(sae.progressive(codes, [1, 2, 16]))
    assert rungs[1].l0.tolist() == [0, 1] and rungs[2].l0.tolist() == [2, 1]
    torch.testing.assert_close(rungs[0].recon[0], sae.b_dec)  # nothing below G=1 for token 0
    assert sparse_sum(sae.W_dec, codes, torch.zeros(2, 2, dtype=torch.bool)).abs().sum() == 0


def test_bad_granularities_are_rejected():
    sae = random_sae(d=4, m=16, k=2)
    codes = sae.encode(torch.randn(3, 4))
    for bad in (0, 17, -1):
        try:
            sae.decode(codes, bad)
        except ValueError as e:
            assert "out of range 1..16" in str(e)
        else:
            raise AssertionError(f"G={bad} accepted")
    for ladder in ([], [4, 4], [8, 4], [0, 16]):
        try:
            check_ladder(ladder, 16)
        except ValueError:
            pass
        else:
            raise AssertionError(f"ladder {ladder} accepted")
    assert default_ladder(4096) == (256, 512, 1024, 2048, 4096)
