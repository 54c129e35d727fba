"""Feature cards (progsae.trainer.features) on a tiny synthetic cache, checked against brute force."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from progsae.cli import main
from progsae.sae import checkpoint, feature_cards
from progsae.trainer import features
from progsae.trainer.data.activations import ActivationCache, CacheWriter, Manifest
from progsae.trainer.data.outlier_policy import KEEP_ALL
from tests.support import synthetic as testing

D, M, K, CONTEXT, N_CTX = 32, 256, 8, 17, 24


def make_cache(path, n_ctx=N_CTX, context=CONTEXT, shards=2, seed=0):
    rows = n_ctx * (context - 1)
    x = testing.sample_activations(rows, d=D, m=M, sample_seed=seed + 5).numpy()
    toks = np.random.default_rng(seed).integers(1, 500, size=(n_ctx, context)).astype(np.int32)
    toks[:, 0] = 0
    w = CacheWriter(path, Manifest(model="synthetic", layer=0, d_model=D, corpus=["synthetic"], split="heldout",
                                   context=context, target_tokens=rows))
    per = n_ctx // shards
    for s in range(shards):
        c0, c1 = s * per, (s + 1) * per if s < shards - 1 else n_ctx
        w.add_shard(x[c0 * (context - 1):c1 * (context - 1)], toks[c0:c1])
    w.finish()
    return x, toks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    ck = testing.make_checkpoint(root / "ck", d=D, m=M, k=K)
    x, toks = make_cache(root / "acts")
    return ck, root / "acts", x, toks


def fake_lens(rows):
    return rows[:, :5].topk(3, dim=-1)


def test_cards_match_brute_force(setup):
    ck, acts, x, toks = setup
    sae = checkpoint.load(ck).sae
    cache = ActivationCache(acts, outliers=KEEP_ALL)
    cfg = features.FeatureConfig(top_n=3, window=2, promoted=3, batch_contexts=5, batch_rows=7, progress=False)
    cards = features.compute(sae, cache, cfg, decode=lambda ids: [f"t{i}" for i in ids], lens=fake_lens)
    codes = sae.encode(torch.from_numpy(x))
    dense = torch.zeros(x.shape[0], M).scatter_(1, codes.indices, codes.values)
    t = cards.tensors
    per = CONTEXT - 1
    fires = (dense > 0).float()
    torch.testing.assert_close(t["density"], fires.mean(0))
    torch.testing.assert_close(t["max_act"], dense.max(0).values)
    torch.testing.assert_close(t["mean_act"], dense.sum(0) / fires.sum(0).clamp_min(1))
    # top contexts: per latent, the best value in each context, top 3 contexts
    by_ctx = dense.view(N_CTX, per, M).max(1).values  # [ctx, M]
    for lat in torch.nonzero(fires.sum(0) > 0).flatten()[:40].tolist():
        want = by_ctx[:, lat].topk(3).values
        want = want[want > 0]
        got = t["top_value"][lat, : want.numel()]
        torch.testing.assert_close(got, want)
        c, p = int(t["top_context"][lat, 0]), int(t["top_position"][lat, 0])
        assert dense[c * per + p - 1, lat] == t["top_value"][lat, 0]
        # window: ids and per-token activations around the peak
        assert t["window_ids"][lat, 0, 2] == toks[c, p]
        for j, q in enumerate(range(p - 2, p + 3)):
            if 1 <= q < CONTEXT:
                assert t["window_ids"][lat, 0, j] == toks[c, q]
                assert abs(float(t["window_acts"][lat, 0, j]) - float(dense[c * per + q - 1, lat])) < 1e-5
            else:
                assert t["window_ids"][lat, 0, j] == feature_cards.PAD
        if want.numel() < 3:
            assert t["top_context"][lat, want.numel()] == feature_cards.PAD
    dead = torch.nonzero(fires.sum(0) == 0).flatten()
    if dead.numel():
        assert (t["top_context"][dead] == feature_cards.PAD).all()
    torch.testing.assert_close(t["promoted_logits"], sae.W_dec[:, :5].topk(3, dim=-1).values)


def test_save_load_card_and_staleness(setup, tmp_path):
    ck, acts, *_ = setup
    cache = ActivationCache(acts)
    cfg = features.FeatureConfig(top_n=2, window=3, progress=False)
    cards = features.compute(checkpoint.load(ck).sae, cache, cfg)
    feature_cards.save(ck, cards)
    back = feature_cards.load(ck)
    assert not back.info["stale"] and back.info["vocab"]
    for k, v in cards.tensors.items():
        torch.testing.assert_close(back.tensors[k], v)
    lat = int(torch.argmax(back.tensors["density"]))
    card = back.card(lat)
    assert card["latent"] == lat and card["density"] > 0 and card["contexts"]
    c0 = card["contexts"][0]
    assert len(c0["tokens"]) == len(c0["acts"]) and c0["acts"][c0["peak"]] == pytest.approx(c0["value"], abs=1e-4)
    assert card["promoted"] == []  # no lens
    json.dumps(card)
    with pytest.raises(IndexError):
        back.card(M)
    # the weights change -> the cards are flagged stale
    ck2 = tmp_path / "ck2"
    testing.make_checkpoint(ck2, d=D, m=M, k=K)
    feature_cards.save(ck2, cards)
    testing.make_checkpoint(ck2, d=D, m=M, k=K, seed=7)
    (ck2 / feature_cards.TENSORS).write_bytes((ck / feature_cards.TENSORS).read_bytes())
    (ck2 / feature_cards.INFO).write_text((ck / feature_cards.INFO).read_text())
    assert feature_cards.load(ck2).info["stale"]


def test_top_tracker_keeps_one_peak_per_context():
    tr = features.TopTracker(2, 2)
    lat = torch.tensor([0, 0, 0, 1])
    tr.update(lat, torch.tensor([5.0, 4.0, 1.0, 2.0]), torch.tensor([0, 1, 9, 3]), torch.tensor([0, 0, 1, 0]))
    assert tr.value[0].tolist() == [5.0, 1.0] and tr.row[0].tolist() == [0, 9]
    tr.update(torch.tensor([0]), torch.tensor([3.0]), torch.tensor([20]), torch.tensor([2]))
    assert tr.value[0].tolist() == [5.0, 3.0] and tr.row[1].tolist() == [3, -1]


def test_cli(setup, capsys):
    ck, acts, *_ = setup
    assert main(["features", str(ck), "--activations", str(acts), "--top-n", "2", "--window", "1", "--no-lens",
                 "--tokens", "64"]) == 0
    assert "latents over" in capsys.readouterr().out
    info = json.loads((ck / feature_cards.INFO).read_text())
    assert info["top_n"] == 2 and info["window"] == 1 and info["tokens"] == 64
    assert info["outlier_factor"] == 10.0  # testing.make_checkpoint records no factor: the default
    assert main(["features", str(ck), "--activations", str(ck)]) == 2  # not a cache: one-line error


def test_cli_uses_the_outlier_factor_the_checkpoint_was_trained_with(setup, tmp_path):
    ck, acts, *_ = setup
    mine = tmp_path / "ck"
    shutil.copytree(ck, mine)
    cfg = json.loads((mine / "cfg.json").read_text())
    cfg["progsae"]["extra"]["outlier_factor"] = 1.01  # about half of these rows lie above 1.01x the median
    (mine / "cfg.json").write_text(json.dumps(cfg))
    args = ["features", str(mine), "--activations", str(acts), "--no-lens", "--top-n", "1", "--window", "0"]
    assert main(args) == 0
    tight = json.loads((mine / feature_cards.INFO).read_text())
    assert tight["outlier_factor"] == 1.01 and tight["tokens"] < N_CTX * (CONTEXT - 1) * 0.8
    assert main([*args, "--outlier-factor", "0"]) == 0
    every = json.loads((mine / feature_cards.INFO).read_text())
    assert every["outlier_factor"] is None and every["tokens"] == N_CTX * (CONTEXT - 1)


def test_label_names_a_latent_by_its_peaks_then_its_promoted_tokens():
    P = feature_cards.PAD
    win = torch.full((3, 3, 3), P)
    win[0, :, 1] = torch.tensor([5, 5, 6])  # latent 0 peaks on " cat" twice, then on " dog"
    win[0, :, 0] = 9  # context around the peak: never part of the label
    t = {"density": torch.tensor([0.05, 0.0, 0.0]), "top_context": torch.tensor([[0, 1, 2], [P, P, P], [P, P, P]]),
         "window_ids": win, "promoted_ids": torch.tensor([[8, 8], [7, 8], [P, P]])}
    cards = feature_cards.FeatureCards(t, {"window": 1, "vocab": {"5": " cat", "6": " dog", "7": "\n", "8": "x"}})
    assert cards.label(0) == "cat · dog" and cards.label(0, words=1) == "cat"
    assert cards.label(1) == "'\\n' · x"  # never fired: its logit-lens tokens, whitespace shown
    assert cards.label(2) == ""
    with pytest.raises(IndexError):
        cards.label(3)


def test_label_marks_position_and_dense_latents():
    """A latent whose top contexts peak on the first token is a position latent whatever tokens those
    are (issue 22: "of · and" fired first on every text), one that fires on many tokens is dense."""
    P = feature_cards.PAD
    win = torch.full((5, 4, 3), P)
    win[:, :, 1] = torch.tensor([5, 6, 5, 6])  # every latent peaks on " of" / " and"
    pos = torch.tensor([[1, 1, 1, 1], [1, 1, 7, 1], [1, 7, 7, 2], [4, 4, 4, 4], [1, 1, 9, 9]])
    ctx = torch.tensor([[0, 1, 2, 3]] * 4 + [[0, 1, P, P]])
    t = {"density": torch.tensor([0.02, 0.25, 0.03, 0.099, 0.01]), "top_context": ctx,
         "top_position": torch.where(ctx >= 0, pos, P), "window_ids": win, "promoted_ids": torch.full((5, 2), P)}
    cards = feature_cards.FeatureCards(t, {"window": 1, "vocab": {"5": " of", "6": " and"}})
    assert cards.label(0) == "position (first token)"
    assert cards.label(1) == "position (first token) · dense (fires on 25% of tokens)"  # 3 of 4 peaks
    assert cards.label(2) == "of · and"  # no position holds 3/4 of its peaks, and it is sparse
    assert cards.label(3) == "position (token 4)"
    assert cards.kind(4) == "" and cards.label(4) == "of · and"  # two peaks are too few to call
    t["density"][2] = 0.4
    assert cards.label(2) == "dense (fires on 40% of tokens)"
