"""Interpretability measures (`progsae interp`) on constructed cases whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.cli import main
from progsae.trainer.interp import absorption as ab
from progsae.trainer.interp import simulation as sim
from progsae.trainer.interp import splitting as spl
from progsae.trainer.interp.measure import INTERP, InterpConfig, InterpResult, interp, load_result
from tests.support import eval_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")

# --- simulation -------------------------------------------------------------------------------


def _token_stream(n: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    tok = np.random.default_rng(seed).integers(0, vocab, size=n)
    prev = np.concatenate([[0], tok[:-1]])
    return tok, prev


def _codes(dense: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(dense, idx, axis=1)


def _constructed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Latent 0 fires 2.0 on token 5; latent 1 fires 1.0 on token 7 only after token 3; latent 2 is
    token-independent noise; latent 3 never fires."""
    vocab = 10
    tok, prev = _token_stream(n, vocab, seed)
    rng = np.random.default_rng(seed + 100)
    dense = np.zeros((n, 4))
    dense[tok == 5, 0] = 2.0
    dense[(tok == 7) & (prev == 3), 1] = 1.0
    noise = rng.random(n) < 0.2
    dense[noise, 2] = rng.uniform(0.5, 1.5, size=int(noise.sum()))
    idx, val = _codes(dense, 3)
    return idx, val, prev, tok


def test_simulation_scores_token_and_pair_latents_high_and_noise_low():
    idx, val, prev, tok = _constructed(4000, seed=0)
    e = sim.explain(idx[:2000], val[:2000], prev[:2000], tok[:2000], d_sae=4, vocab=10, min_count=2)
    corr = sim.score(e, idx[2000:], val[2000:], prev[2000:], tok[2000:], d_sae=4, n_top=50, n_random=200)
    assert corr[0] == pytest.approx(1.0, abs=1e-9)  # a token feature is exactly a lookup
    assert corr[1] == pytest.approx(1.0, abs=1e-9)  # a (previous, current) pair feature too
    assert abs(corr[2]) < 0.3  # noise is not explained by the tokens
    assert np.isnan(corr[3])  # never fires: no score


def test_simulation_back_off_pair_then_token_then_global():
    # explain half: token 4 after 1 twice (latent 0: 3.0, 1.0), token 4 after 2 once (latent 0: 5.0)
    prev = np.array([1, 1, 2, 6])
    tok = np.array([4, 4, 4, 8])
    idx = np.array([[0], [0], [0], [0]])
    val = np.array([[3.0], [1.0], [5.0], [0.0]])
    e = sim.explain(idx, val, prev, tok, d_sae=1, vocab=10, min_count=2)
    out = sim.simulate(e, np.zeros(4, dtype=np.int64), np.array([1, 2, 9, 9]), np.array([4, 4, 4, 9]))
    assert out[0] == pytest.approx(2.0)  # pair (1, 4) seen twice: its mean
    assert out[1] == pytest.approx(3.0)  # pair (2, 4) seen once: token 4's mean (3 + 1 + 5) / 3
    assert out[2] == pytest.approx(3.0)  # pair (9, 4) never: token 4's mean
    assert out[3] == pytest.approx(9.0 / 4)  # token 9 never: the latent's global mean over 4 rows


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5))
def test_grouped_pearson_matches_numpy(seed, groups):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), 20)
    x, y = rng.normal(size=len(g)), rng.normal(size=len(g))
    y[g == 0] = 2 * x[g == 0] + 1  # one exact linear relation
    got = sim._pearson_by_group(g, x, y, groups)
    for j in range(groups):
        assert got[j] == pytest.approx(np.corrcoef(x[g == j], y[g == j])[0, 1], abs=1e-9)
    const = sim._pearson_by_group(np.zeros(5, dtype=np.int64), np.ones(5), np.arange(5.0), 1)
    assert np.isnan(const[0])  # constant simulation: undefined, not 0


# --- absorption -------------------------------------------------------------------------------


def _unit(*v: float) -> np.ndarray:
    a = np.array(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def test_absorption_fraction_and_full_absorption_on_known_words():
    # probe p = e0; latent 0 (main) W_dec = e0; latent 1 = (e0 + e1)/sqrt2 (absorber, cos 0.707)
    W = np.stack([_unit(1, 0), _unit(1, 1), _unit(0, 1)])
    p = _unit(1, 0)
    dec_proj, cos = W @ p, W @ p
    cfg = ab.AbsorptionConfig()
    a = np.array([[1.0, 0.0, 0.0],     # main fires, explains all: no absorption
                  [0.0, np.sqrt(2), 0.0],  # main silent, absorber carries all: full absorption
                  [0.5, 0.7, 0.0],     # main carries half, absorber the rest: partial
                  [0.0, 0.0, 3.0]])    # main silent but nothing aligned fires: not absorption
    act = np.array([1.0, 1.0, 1.0, 1.0])
    r = ab.absorption(act, a, dec_proj, cos, [0], cfg)
    assert r.full.tolist() == [False, True, False, False]
    part = 0.7 / np.sqrt(2)
    assert r.fraction == pytest.approx([0.0, 1.0, part / (part + 0.5), 0.0])


def test_main_latents_pick_the_letter_latent_and_stop_when_f1_stops_rising():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.2
    a = rng.random((400, 6)) * (rng.random((400, 6)) < 0.1)
    a[:, 3] = np.where(y, 1.0 + rng.random(400), 0.0)  # latent 3 is the letter
    got = ab.main_latents(a[:300], y[:300], a[300:], y[300:], ab.AbsorptionConfig())
    assert got == [3]


def test_probes_separate_letters_linearly_encoded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 26, size=1300)
    dirs = rng.normal(size=(26, 64))
    x = torch.from_numpy(dirs[y] * 3 + rng.normal(size=(1300, 64)) + 5.0).float()
    probes = ab.train_probes(x[:1000], y[:1000], x[1000:], y[1000:], steps=200)
    assert np.nanmean(probes.f1) > 0.9
    assert probes.W.shape == (26, 64)


# --- splitting --------------------------------------------------------------------------------


def _split_case() -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Inner latent 0 fires on tokens 0..99, outer 2 and 3 on its halves (a split); inner 1 on
    100..199 and outer 4 on exactly the same tokens (a duplicate, not a split)."""
    n = 200
    idx = np.full((n, 2), 7)
    val = np.zeros((n, 2))
    t = np.arange(n)
    idx[:, 0] = np.where(t < 100, 0, 1)
    val[:, 0] = 1.0
    idx[:, 1] = np.where(t < 50, 2, np.where(t < 100, 3, 4))
    val[:, 1] = 1.0
    W = torch.eye(8, 16, dtype=torch.float64)
    W[2] = W[0]  # outer latent 2 reuses inner latent 0's direction
    return idx, val, W


def test_splitting_counts_a_split_and_not_a_duplicate():
    idx, val, W = _split_case()
    co = spl.cofiring(idx, val, 8)
    bands = spl.splitting(co, W, torch.arange(8), (2, 8), min_fires=5)
    assert np.isnan(bands[0].split_fraction) and np.isnan(bands[0].decoder_cos)
    b = bands[1]
    assert (b.g_lo, b.g_hi) == (2, 8)
    assert b.split_fraction == pytest.approx(0.5)  # latent 0 split, latent 1 not
    assert b.child_fraction == pytest.approx(2 / 3)  # 2 and 3 are children, 4 is not; 5..7 never fire
    assert b.children == pytest.approx(2.0)
    assert b.decoder_cos == pytest.approx(1 / 6)  # one of six outer latents repeats an inner direction


def test_splitting_follows_the_order():
    idx, val, W = _split_case()
    co = spl.cofiring(idx, val, 8)
    # put latents 2 and 3 first: the prefix is now the halves, the band holds their parent
    perm = torch.tensor([2, 3, 0, 1, 4, 5, 6, 7])
    b = spl.splitting(co, W, perm, (2, 8), min_fires=5)[1]
    assert b.split_fraction == pytest.approx(0.0)  # a parent is no subset of its halves
    assert b.child_fraction == pytest.approx(0.0)


# --- end to end -------------------------------------------------------------------------------


def test_interp_end_to_end_bands_orders_and_json(tmp_path, capsys):
    acts = fx.make_cache(tmp_path / "acts", n_contexts=160)
    topk, mat = fx.make_checkpoints(tmp_path)
    r = interp(topk, acts, InterpConfig(absorption=False, n_top=10, n_random=60), log=lambda m: None)
    assert set(r.variants) == {"none", "mean_sq", "freq"}
    for v in r.variants.values():
        assert [(b.g_lo, b.g_hi) for b in v.bands] == list(zip((0, *fx.LADDER[:-1]), fx.LADDER))
        assert not v.absorption
    # the same latents in every order: scored latents and their total are order-independent
    totals = {n: (sum(b.scored for b in v.bands), sum(b.simulation * b.scored for b in v.bands if b.scored))
              for n, v in r.variants.items()}
    assert len({t[0] for t in totals.values()}) == 1
    assert max(t[1] for t in totals.values()) - min(t[1] for t in totals.values()) < 1e-9
    assert totals["none"][0] == int(np.isfinite(r.simulation_per_latent).sum()) > 0

    assert main(["interp", str(mat), "--activations", str(acts), "--no-absorption", "--n-top", "10",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "sim" in out
    raw = json.loads((mat / INTERP).read_text())
    assert list(raw["variants"]) == ["none"] and raw["ladder"] == list(fx.LADDER)
    back = load_result(mat)
    assert isinstance(back, InterpResult) and back.variants["none"].bands[1].g_lo == fx.LADDER[0]


def test_pruned_topk_interpretability_per_latent_does_not_depend_on_its_index(tmp_path):
    """A TopK SAE whose latents are physically permuted into its E[a²] order scores every latent as
    before (simulation per latent), and its trained-order bands equal the original's mean_sq bands:
    the measures follow the latent, not where the ordering puts it."""
    from progsae.sae import checkpoint
    from progsae.sae.ordering import apply

    acts = fx.make_cache(tmp_path / "acts", n_contexts=160)
    topk, _ = fx.make_checkpoints(tmp_path)
    ck = checkpoint.load(topk)
    order = ck.orderings["mean_sq"]
    assert not torch.equal(order.perm, torch.arange(len(order.perm)))
    moved = checkpoint.save(tmp_path / "moved", apply(ck.sae, order), ck.meta)
    cfg = InterpConfig(absorption=False, n_top=10, n_random=60)
    a, b = (interp(c, acts, cfg, log=lambda m: None) for c in (topk, moved))
    per_a, per_b = np.asarray(a.simulation_per_latent), np.asarray(b.simulation_per_latent)
    np.testing.assert_allclose(per_b, per_a[order.perm.numpy()], rtol=1e-9, equal_nan=True)
    for x, y in zip(a.variants["mean_sq"].bands, b.variants["none"].bands, strict=True):  # NaN: no prefix
        np.testing.assert_allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), rtol=1e-9,
                                   equal_nan=True)


def test_interp_needs_token_ids(tmp_path, capsys):
    from progsae.trainer.data.activations import CacheWriter, Manifest

    w = CacheWriter(tmp_path / "acts", Manifest(model="synthetic", layer=1, d_model=fx.D, corpus=["s"],
                                                split="heldout", context=fx.CONTEXT, target_tokens=64))
    w.add_shard(fx.sample(64, seed=1).numpy())  # no token ids
    w.finish()
    _, mat = fx.make_checkpoints(tmp_path)
    assert main(["interp", str(mat), "--activations", str(tmp_path / "acts"), "--no-absorption"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stores no token ids" in err[0]
    assert not (mat / INTERP).exists()


# --- report -----------------------------------------------------------------------------------


def test_report_renders_interp_tables_and_a_figure_per_measure(tmp_path):
    from progsae.trainer.evaluation.evaluate import EvalConfig, evaluate, save_result
    from progsae.trainer.interp.measure import save_result as save_interp

    acts = fx.make_cache(tmp_path / "acts", n_contexts=160)
    topk, mat = fx.make_checkpoints(tmp_path)
    for ck in (topk, mat):
        save_result(evaluate(ck, acts, EvalConfig(progress=False, rsa_tokens=200)), ck)
    save_interp(interp(mat, acts, InterpConfig(absorption=False, n_top=10, n_random=60), log=lambda m: None),
                mat / INTERP)
    out = tmp_path / "report"
    assert main(["report", str(mat), str(topk), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Interpretability across granularities" in md and "not a language model" in md
    assert "No interp.json for: topk" in md
    for key in ("simulation", "decoder_cos", "split_fraction"):
        f = out / f"interp_{key}_vs_g.png"
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({f.name})" in md
    assert not (out / "interp_full_rate_vs_g.png").exists()  # absorption not measured: no figure
    assert "| Matryoshka | " in md.split("### Simulation correlation")[1]


def test_report_interp_claims_resolve_only_beyond_two_standard_errors():
    from progsae.trainer.report.interp_section import InterpVariant, claims

    def v(label, sim, se):
        return InterpVariant(label, label, [8, 16], {"simulation": sim}, {"simulation": se})

    got = dict((c, (verdict, d)) for c, verdict, d in claims([v("Matryoshka", [0.6, 0.4], [0.01, 0.01]),
                                                              v("TopK sorted by E[a²]", [0.61, 0.5], [0.01, 0.01])]))
    outer, vs_topk = got.values()
    assert outer[0] == "yes"  # 0.4 vs 0.6, far beyond 2 se
    assert vs_topk[0] == "unresolved" and "within 2 se" in vs_topk[1]  # 0.60 vs 0.61 is not resolved
    got = claims([v("Matryoshka", [0.6, 0.7], [0.01, 0.01])])
    assert got[0][1] == "**no**"


# --- the real language model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from progsae.lm.models import load_model

    return load_model("smollm2-135m")


def test_word_activations_with_the_cached_prefix_equal_a_full_forward(smollm2):
    from progsae.lm.models import hidden_at_layer

    words = ab.first_letter_words(smollm2.tokenizer, max_words=40, seed=1)
    assert all(w.isalpha() and len(w) >= 2 for w in words.words)
    assert [smollm2.tokenizer.decode([i]) for i in words.token_ids[:5]] == [" " + w for w in words.words[:5]]
    prefix = ab.icl_prefix(smollm2, words, n_icl=2)
    ids = words.token_ids[2:7]
    got = ab.word_activations(smollm2, prefix, ids, layer=15, batch=3)
    full = hidden_at_layer(smollm2.model, torch.tensor([[*prefix, t] for t in ids]), 15)[:, -1]
    assert got.shape == (5, smollm2.d_model)
    assert torch.allclose(got, full, rtol=1e-4, atol=1e-3 * float(full.abs().max()))
