"""Pruning orderings: scores, permutation round-trips, prefixes keep the top latents."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.sae import ordering as om
from progsae.sae.codec import Codes
from tests.conftest import random_sae


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 80), st.integers(0, 10_000))
def test_apply_then_undo_is_identity_and_full_decode_unchanged(m, seed):
    sae = random_sae(d=8, m=m, k=min(4, m - 1) or 1, seed=seed)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    o = om.Ordering("test", perm, torch.rand(m, dtype=torch.float64))
    back = om.undo(om.apply(sae, o), o)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(seed + 1))
    ordered = om.apply(sae, o)
    torch.testing.assert_close(ordered.decode(ordered.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-4)
    assert torch.equal(o.inverse()[o.perm], torch.arange(m))


def test_scores_match_hand_computation_and_prefix_keeps_top_g():
    sae = random_sae(d=6, m=10, k=3, seed=2, scale=2.0)
    # two batches of hand-made codes (the accumulator must not care how tokens are batched)
    c1 = Codes(torch.tensor([[0, 3, 7], [3, 4, 9]]), torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.5, 3.0]]))
    c2 = Codes(torch.tensor([[3, 7, 8]]), torch.tensor([[1.0, 1.0, 2.0]]))
    acc = om.ImportanceAccumulator(sae)
    acc.update(c1)
    acc.update(c2)
    norm_sq = (sae.W_dec.double().norm(dim=1) / sae.scale) ** 2
    expect_sq = torch.zeros(10, dtype=torch.float64)
    expect_fr = torch.zeros(10, dtype=torch.float64)
    for codes in (c1, c2):
        for idx, val in zip(codes.indices.flatten().tolist(), codes.values.flatten().tolist()):
            expect_sq[idx] += val**2
            expect_fr[idx] += val > 0
    torch.testing.assert_close(acc.scores("mean_sq"), expect_sq * norm_sq / 3)
    torch.testing.assert_close(acc.scores("freq"), expect_fr / 3)
    # latent 7 fired twice but once with 0: frequency counts only a > 0
    assert acc.scores("freq")[7] == 1 / 3
    o = acc.ordering("mean_sq")
    scores = acc.scores("mean_sq")
    for g in range(1, 10):  # the first G positions hold G latents scoring >= every other latent
        assert scores[o.perm[:g]].min() >= scores[o.perm[g:]].max()
    # an ordered SAE's first G latents are exactly the top-G original latents by score
    ordered = om.apply(sae, o)
    assert torch.equal(ordered.W_dec[:4], sae.W_dec[o.perm[:4]])
    assert (o.sorted_scores()[:-1] >= o.sorted_scores()[1:]).all()


def test_decoder_norm_changes_the_ranking():
    sae = random_sae(d=4, m=3, k=2)
    sae = type(sae)(**{**sae.__dict__, "W_dec": torch.tensor([[1.0, 0, 0, 0], [10.0, 0, 0, 0], [0, 1.0, 0, 0]])})
    acc = om.ImportanceAccumulator(sae)
    acc.update(Codes(torch.tensor([[0, 1]]), torch.tensor([[2.0, 1.0]])))
    assert acc.ordering("mean_sq").perm[0].item() == 1  # 1*10 beats 2*1
    assert acc.ordering("freq").perm.tolist() == [0, 1, 2]  # ties keep original order


def test_invalid_permutations_and_empty_accumulator():
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0, 1]), torch.tensor([0.0, 1.0, 2.0])):
        try:
            om.check_permutation(bad, 3)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    try:
        om.ImportanceAccumulator(random_sae()).scores("mean_sq")
    except ValueError as e:
        assert "no tokens" in str(e)
    else:
        raise AssertionError("empty accumulator scored")
