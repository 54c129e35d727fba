"""`progsae order`: orderings for our checkpoints and SAELens-format ones."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_sae
from safetensors.torch import save_file

from progsae import cli
from progsae.sae import checkpoint
from progsae.sae.checkpoint import CheckpointMeta
from progsae.sae.ordering import ImportanceAccumulator
from progsae.trainer.data.activations import ActivationCache
from tests.support.caches import make_cache

D, M = 8, 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("acts") / "acts", d=D, n=900)


def ours(path, scale: float = 2.0):
    sae = random_sae(d=D, m=M, k=8, scale=scale)
    meta = CheckpointMeta("topk", D, M, 8, (16, 32, 64), model="synthetic", layer=3)
    return checkpoint.save(path, sae, meta)


def expected(path, cache, criterion):
    sae = checkpoint.load(path).sae
    acc = ImportanceAccumulator(sae)
    for x in ActivationCache(cache).batches(4096):
        acc.update(sae.encode(x))
    return acc.ordering(criterion)


def test_order_both_criteria_ours(tmp_path, cache, capsys):
    ck = ours(tmp_path / "ck")
    assert cli.main(["order", str(ck), "--activations", str(cache), "--by", "mean_sq"]) == 0
    assert set(checkpoint.load(ck).orderings) == {"mean_sq"}
    assert cli.main(["order", str(ck), "--activations", str(cache), "--by", "freq"]) == 0
    loaded = checkpoint.load(ck)
    assert set(loaded.orderings) == {"mean_sq", "freq"}  # merged, not replaced
    for crit in ("mean_sq", "freq"):
        want = expected(ck, cache, crit)
        assert torch.equal(loaded.orderings[crit].perm, want.perm)
        torch.testing.assert_close(loaded.orderings[crit].scores, want.scores)
        s = loaded.orderings[crit].sorted_scores()
        assert torch.all(s[:-1] >= s[1:])
    assert "ordering mean_sq" in capsys.readouterr().out


def test_order_uses_the_outlier_factor_the_checkpoint_was_trained_with(tmp_path, cache):
    """Scored on the rows training saw: a checkpoint trained with factor f is ordered with f."""
    def order(meta_extra, *flags):
        ck = ours(tmp_path / f"ck{len(list(tmp_path.iterdir()))}")
        meta = json.loads((ck / "cfg.json").read_text())
        meta["progsae"]["extra"].update(meta_extra)
        (ck / "cfg.json").write_text(json.dumps(meta))
        assert cli.main(["order", str(ck), "--activations", str(cache), "--by", "mean_sq", *flags]) == 0
        return checkpoint.load(ck).orderings["mean_sq"].scores

    default = order({})
    tight = order({"outlier_factor": 1.01})  # drops about half of these rows
    assert not torch.allclose(tight, default)
    torch.testing.assert_close(tight, order({}, "--outlier-factor", "1.01"))
    torch.testing.assert_close(order({"outlier_factor": None}), order({}, "--outlier-factor", "0"))
    torch.testing.assert_close(order({"outlier_factor": 1.01}, "--outlier-factor", "10"), default)


def test_order_tokens_budget(tmp_path, cache):
    ck = ours(tmp_path / "ck")
    assert cli.main(["order", str(ck), "--activations", str(cache), "--by", "all", "--tokens", "100"]) == 0
    sae = checkpoint.load(ck).sae
    acc = ImportanceAccumulator(sae)
    acc.update(sae.encode(ActivationCache(cache).batches(4096).__next__()[:100]))
    torch.testing.assert_close(checkpoint.load(ck).orderings["freq"].scores, acc.scores("freq"))


def test_order_saelens_checkpoint(tmp_path, cache):
    sae = random_sae(d=D, m=M, k=8)
    d = tmp_path / "saelens"
    d.mkdir()
    save_file({"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec},
              d / "sae_weights.safetensors")
    (d / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": D, "d_sae": M, "activation_fn_kwargs": {"k": 8},
        "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3,
    }))
    assert cli.main(["order", str(d), "--activations", str(cache), "--by", "mean_sq,freq"]) == 0
    ck = checkpoint.load(d, ordering="mean_sq")
    assert set(ck.orderings) == {"mean_sq", "freq"}
    assert torch.equal(ck.orderings["mean_sq"].perm, expected(d, cache, "mean_sq").perm)


def test_order_rejects_wrong_width_and_model(tmp_path, cache, capsys):
    ck = ours(tmp_path / "ck")
    wide = make_cache(tmp_path / "wide", d=D + 2, n=90)
    other = make_cache(tmp_path / "other", d=D, n=90, model="another-lm")
    for acts, msg in [(wide, "width 10"), (other, "model='another-lm'")]:
        assert cli.main(["order", str(ck), "--activations", str(acts)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (ck / "ordering.safetensors").exists()
