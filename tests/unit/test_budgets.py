"""Properties of (G, k') decode and the per-token step stream (SPEC §3, progsae.sae.budgets)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.sae.budgets import (
    Step,
    climb,
    decode_at,
    g_steps,
    k_ladder,
    k_steps,
    select,
    token_baseline,
)
from progsae.sae.codec import Codes, topk_prefix, value_rank
from tests.conftest import random_sae

dims = st.tuples(
    st.integers(1, 16),  # d_in
    st.integers(2, 64),  # d_sae
    st.integers(0, 10_000),  # seed
    st.integers(2, 10),  # batch
    st.sampled_from([1.0, 0.37]),  # normalisation scale
)


def make(d, m, seed, n, scale, dtype=torch.float64):
    k = max(1, min(m - 1, 1 + seed % 8))
    sae = random_sae(d, m, k, seed, scale, dtype=dtype)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype) * 3
    return sae, x, sae.encode(x)


def dense_reference(sae, codes: Codes, g: int, k: int | None) -> torch.Tensor:
    """Float64 dense decode of, per token, the k largest values among codes with index < g."""
    n = codes.indices.shape[0]
    z = torch.zeros(n, sae.d_sae, dtype=torch.float64)
    z.scatter_(1, codes.indices, codes.values.double())
    z[:, g:] = 0
    if k is not None and k < sae.d_sae:
        # values are distinct almost surely; keep the k largest nonzero
        thresh = z.topk(k, dim=1).values[:, -1:]
        z = torch.where(z >= thresh, z, torch.zeros_like(z))
    return (z @ sae.W_dec.double() + sae.b_dec.double()) / sae.scale


@settings(max_examples=40, deadline=None)
@given(dims, st.data())
def test_decode_at_g_k_matches_dense_reference(dims, data):
    sae, _, codes = make(*dims)
    g = data.draw(st.integers(1, sae.d_sae))
    k = data.draw(st.integers(1, sae.k))
    torch.testing.assert_close(decode_at(sae, codes, g, k), dense_reference(sae, codes, g, k), rtol=1e-10, atol=1e-10)
    assert (select(codes, g, k).sum(1) <= k).all()
    assert (select(codes, g, k).sum(1) == torch.clamp(select(codes, g).sum(1), max=k)).all()


@settings(max_examples=60, deadline=None)
@given(dims, st.data())
def test_k_prime_k_equals_plain_decode_at_g(dims, data):
    sae, _, codes = make(*dims)
    g = data.draw(st.integers(1, sae.d_sae))
    torch.testing.assert_close(decode_at(sae, codes, g, sae.k), sae.decode(codes, g), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(decode_at(sae, codes, g, None), sae.decode(codes, g), rtol=1e-10, atol=1e-10)


def test_ties_go_to_the_earlier_code():
    codes = Codes(torch.tensor([[5, 2, 9, 1]]), torch.tensor([[1.0, 2.0, 2.0, 0.0]]))
    assert value_rank(codes, 10).tolist() == [[2, 0, 1, 4]]  # the zero is inactive: never selected
    assert value_rank(codes, 6).tolist() == [[1, 0, 4, 4]]  # index 9 is beyond G
    assert select(codes, 10, 1).tolist() == [[False, True, False, False]]


def test_a_cap_above_the_code_width_never_selects_codes_beyond_g():
    # a ReLU/JumpReLU model's k is d_sae, wider than a batch's padded codes: the cap must not
    # let a code at or above G (or a padding zero) in
    codes = Codes(torch.tensor([[5, 2, 9, 1]]), torch.tensor([[1.0, 2.0, 2.0, 0.0]]))
    assert select(codes, 6, 100).tolist() == [[True, True, False, False]]
    assert select(codes, 6, 100).tolist() == select(codes, 6, None).tolist()


@settings(max_examples=40, deadline=None)
@given(dims=dims, data=st.data())
def test_topk_prefix_is_the_selection_decode_at_uses(dims, data):
    # one definition of the (G, k') code: the trainer's compact form and the stream's mask agree,
    # ties included
    sae, _, codes = make(*dims)
    codes = Codes(codes.indices, codes.values.round(decimals=0))  # make ties common
    g = data.draw(st.integers(1, sae.d_sae))
    kp = data.draw(st.integers(1, sae.k + 2))
    compact = topk_prefix(codes, g, kp)
    chosen = {(n, int(i)) for n, row in enumerate(codes.indices) for j, i in enumerate(row)
              if select(codes, g, kp)[n, j]}
    kept = {(n, int(i)) for n, row in enumerate(compact.indices) for j, i in enumerate(row)
            if compact.values[n, j] != 0}
    assert kept == chosen
    torch.testing.assert_close(sae.decode(compact, g), decode_at(sae, codes, g, kp), rtol=1e-10, atol=1e-10)


def test_default_k_ladder():
    assert k_ladder(32) == (1, 2, 4, 8, 16, 32)
    assert k_ladder(12) == (1, 2, 4, 8, 12)
    assert k_ladder(1) == (1,)
    with pytest.raises(ValueError):
        k_ladder(0)


def _ladder(data, top: int) -> list[int]:
    return sorted(data.draw(st.sets(st.integers(1, top), min_size=1, max_size=6)))


@settings(max_examples=40, deadline=None)
@given(dims, st.data())
def test_incremental_steps_equal_direct_decode(dims, data):
    """Every step of a G climb (with or without a k' cap) and of a k' climb equals the direct
    (G, k') decode, in float64 and, within float tolerance, in float32."""
    sae, x, codes = make(*dims)
    cap = data.draw(st.one_of(st.none(), st.integers(1, sae.k)))
    steps = g_steps(_ladder(data, sae.d_sae), cap)
    if data.draw(st.booleans()):
        steps = k_steps(data.draw(st.integers(1, sae.d_sae)), _ladder(data, sae.k))
    n = x.shape[0]
    for r in climb(sae, codes, steps, x):
        assert r.tokens.tolist() == list(range(n)) and not r.done.any()
        direct = decode_at(sae, codes, r.step.g, r.step.k)
        torch.testing.assert_close(r.recon, direct, rtol=1e-10, atol=1e-10)
        assert (r.l0 == select(codes, r.step.g, r.step.k).sum(1)).all()
        assert r.err is not None
        torch.testing.assert_close(r.err, (x - direct).square().sum(1) / token_baseline(x))
    sae32, codes32 = sae.to(dtype=torch.float32), Codes(codes.indices, codes.values.float())
    for r in climb(sae32, codes32, steps):
        torch.testing.assert_close(r.recon, decode_at(sae32, codes32, r.step.g, r.step.k), rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(dims, st.data())
def test_plain_g_climb_is_the_progressive_stream(dims, data):
    sae, _, codes = make(*dims)
    ladder = _ladder(data, sae.d_sae)
    for a, b in zip(climb(sae, codes, g_steps(ladder)), sae.progressive(codes, ladder), strict=True):
        assert a.step.g == b.g and a.step.k is None
        assert b.recon is not None
        torch.testing.assert_close(a.recon, b.recon, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-10, atol=1e-10)
        assert (a.l0 == b.l0).all()


@settings(max_examples=50, deadline=None)
@given(dims, st.data())
def test_per_token_stop(dims, data):
    """A token stops at its first step with err <= target and is never computed again; no code
    changes; its last reconstruction is the direct decode at its final (G, k')."""
    sae, x, codes = make(*dims)
    n = x.shape[0]
    before = Codes(codes.indices.clone(), codes.values.clone())
    cap = data.draw(st.one_of(st.none(), st.integers(1, sae.k)))
    steps = g_steps(_ladder(data, sae.d_sae), cap)
    if data.draw(st.booleans()):
        steps = k_steps(data.draw(st.integers(1, sae.d_sae)), _ladder(data, sae.k))
    target = data.draw(st.floats(0.05, 1.0))
    baseline = token_baseline(x)
    last: dict[int, tuple[Step, torch.Tensor]] = {}
    met: set[int] = set()
    expected = list(range(n))
    for r in climb(sae, codes, steps, x, target):
        assert r.tokens.tolist() == expected  # exactly the tokens not done before
        assert r.err is not None
        for j, tok in enumerate(r.tokens.tolist()):
            direct = decode_at(sae, Codes(codes.indices[tok:tok + 1], codes.values[tok:tok + 1]), *r.step)
            err = float((x[tok] - direct[0]).square().sum() / baseline[tok])
            assert bool(r.done[j]) == (err <= target)
            last[tok] = (r.step, r.recon[j])
            if r.done[j]:
                met.add(tok)
        expected = [t for t in expected if t not in met]
    assert set(last) == set(range(n))  # every token got at least its first step
    for tok, (step, recon) in last.items():
        one = Codes(codes.indices[tok:tok + 1], codes.values[tok:tok + 1])
        torch.testing.assert_close(recon, decode_at(sae, one, step.g, step.k)[0], rtol=1e-10, atol=1e-10)
        if tok not in met:
            assert step == steps[-1]  # never met: finished at the last step
    assert torch.equal(codes.indices, before.indices) and torch.equal(codes.values, before.values)


def test_climb_rejects_bad_steps(sae):
    codes = sae.encode(torch.randn(3, sae.d_in))
    for steps in ([], [Step(0, None)], [Step(sae.d_sae + 1, None)], [Step(4, 0)]):
        with pytest.raises(ValueError):
            list(climb(sae, codes, steps))
    with pytest.raises(ValueError, match="activations"):
        list(climb(sae, codes, [Step(4, None)], None, 0.5))


def _l1_score(x: torch.Tensor, seen: list[tuple[list[int], torch.Tensor]]):
    """A per-token score other than err_n (relative L1 error), recording what the engine passed it."""
    def score(tokens: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        seen.append((tokens.tolist(), recon.clone()))
        return (x[tokens] - recon).abs().sum(1) / x[tokens].abs().sum(1).clamp_min(1e-12)
    return score


@settings(max_examples=50, deadline=None)
@given(dims, st.data())
def test_score_target_stops_tokens_as_the_error_target_does(dims, data):
    """A token stops at its first step where its score <= the score target (and, with an error target too,
    err <= that one): the score sees exactly the tokens still refining and their reconstructions; a
    finished token's last reconstruction is the direct decode at its final (G, k'); no code changes."""
    sae, x, codes = make(*dims)
    n = x.shape[0]
    before = Codes(codes.indices.clone(), codes.values.clone())
    steps = g_steps(_ladder(data, sae.d_sae), data.draw(st.one_of(st.none(), st.integers(1, sae.k))))
    if data.draw(st.booleans()):
        steps = k_steps(data.draw(st.integers(1, sae.d_sae)), _ladder(data, sae.k))
    t_score = data.draw(st.floats(0.05, 1.5))
    t_err = data.draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    seen: list[tuple[list[int], torch.Tensor]] = []
    baseline = token_baseline(x)
    last: dict[int, tuple[Step, torch.Tensor]] = {}
    met: set[int] = set()
    expected = list(range(n))
    rungs = list(climb(sae, codes, steps, x, t_err, _l1_score(x, seen), t_score))
    assert len(seen) == len(rungs)
    for r, (tokens, recon) in zip(rungs, seen, strict=True):
        assert r.tokens.tolist() == expected == tokens  # exactly the tokens not done before
        torch.testing.assert_close(recon, r.recon, rtol=0, atol=0)
        assert r.score is not None and r.err is not None
        for j, tok in enumerate(expected):
            one = Codes(codes.indices[tok:tok + 1], codes.values[tok:tok + 1])
            direct = decode_at(sae, one, *r.step)[0]
            s = float((x[tok] - direct).abs().sum() / x[tok].abs().sum())
            err = float((x[tok] - direct).square().sum() / baseline[tok])
            assert abs(float(r.score[j]) - s) <= 1e-9 * max(1.0, s)
            want = s <= t_score and (t_err is None or err <= t_err)
            if abs(s - t_score) > 1e-9 and (t_err is None or abs(err - t_err) > 1e-9):  # off the boundary
                assert bool(r.done[j]) == want
            last[tok] = (r.step, r.recon[j])
            if r.done[j]:
                met.add(tok)
        expected = [t for t in expected if t not in met]
    assert set(last) == set(range(n))
    for tok, (step, recon) in last.items():
        one = Codes(codes.indices[tok:tok + 1], codes.values[tok:tok + 1])
        torch.testing.assert_close(recon, decode_at(sae, one, step.g, step.k)[0], rtol=1e-10, atol=1e-10)
        if tok not in met:
            assert step == steps[-1]
    assert torch.equal(codes.indices, before.indices) and torch.equal(codes.values, before.values)


def test_a_score_alone_measures_and_stops_nothing(sae):
    x = torch.randn(5, sae.d_in)
    codes = sae.encode(x)
    seen: list[tuple[list[int], torch.Tensor]] = []
    rungs = list(climb(sae, codes, g_steps((4, 8, sae.d_sae)), None, None, _l1_score(x, seen)))
    assert len(rungs) == 3 and all(not r.done.any() and r.tokens.tolist() == list(range(5)) for r in rungs)
    assert all(r.score is not None and r.score.dtype == torch.float64 for r in rungs)
    with pytest.raises(ValueError, match="score target needs a score"):
        list(climb(sae, codes, g_steps((4,)), None, None, None, 0.5))
