"""`progsae eval` end to end on tiny synthetic caches and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from progsae.cli import main
from progsae.sae import checkpoint
from progsae.sae.metrics import FVUAccumulator, rsa
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.data.outlier_policy import DEFAULT, KEEP_ALL
from progsae.trainer.evaluation.evaluate import EvalConfig, evaluate, format_table, save_result
from progsae.trainer.evaluation.results import CEBaseline, RungMetrics
from tests.support import eval_fixtures as fx


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    acts = fx.make_cache(root / "acts")
    topk, mat = fx.make_checkpoints(root)
    return {"root": root, "acts": acts, "topk": topk, "mat": mat}


def quick(**kw) -> EvalConfig:
    return EvalConfig(progress=False, rsa_tokens=200, **kw)


def test_topk_all_orderings_match_direct_decode(world):
    r = evaluate(world["topk"], world["acts"], quick(batch_size=100))
    assert list(r.orderings) == ["none", "mean_sq", "freq"]
    assert r.outliers["excluded"] == 3 and r.n_tokens == 512 - 3 and r.n_tokens_all == 512
    kept = ActivationCache(world["acts"], outliers=DEFAULT)
    x_kept = kept.gather(kept.rows())
    x_all = ActivationCache(world["acts"], outliers=KEEP_ALL).gather(np.arange(512))
    for name, o in r.orderings.items():
        sae = checkpoint.load(world["topk"], ordering=name).sae  # independent path: load + decode
        codes, codes_all = sae.encode(x_kept), sae.encode(x_all)
        assert [q.g for q in o.rungs] == list(fx.LADDER)
        for q in o.rungs:
            acc, acc_all = FVUAccumulator(), FVUAccumulator()
            acc.update(x_kept, sae.decode(codes, q.g))
            acc_all.update(x_all, sae.decode(codes_all, q.g))
            assert q.fvu == pytest.approx(acc.value(), rel=1e-6)
            assert q.fvu_all == pytest.approx(acc_all.value(), rel=1e-6)
            l0 = ((codes.indices < q.g) & (codes.values > 0)).sum(-1).double().mean()
            assert q.l0 == pytest.approx(float(l0))
            assert -1 <= q.rsa <= 1 and q.ce is None
        assert o.power_law is not None and o.power_law.n > 3
    tops = [o.rungs[-1] for o in r.orderings.values()]
    assert max(t.fvu for t in tops) - min(t.fvu for t in tops) < 1e-6  # G = M: order irrelevant
    l0s = [q.l0 for q in r.orderings["none"].rungs]
    assert l0s == sorted(l0s) and l0s[-1] <= fx.K
    # the sorted orders put the important latents first
    assert r.orderings["mean_sq"].rungs[0].fvu < r.orderings["none"].rungs[0].fvu
    assert r.orderings["mean_sq"].order_monotonicity < -0.5


def test_batch_split_invariance(world):
    a = evaluate(world["topk"], world["acts"], quick(batch_size=37, ordering="mean_sq"))
    b = evaluate(world["topk"], world["acts"], quick(batch_size=4096, ordering="mean_sq"))
    assert len(a.orderings["mean_sq"].rungs) == len(b.orderings["mean_sq"].rungs) > 0
    for qa, qb in zip(a.orderings["mean_sq"].rungs, b.orderings["mean_sq"].rungs):
        assert qa.fvu == pytest.approx(qb.fvu, rel=1e-9)
        assert qa.fvu_all == pytest.approx(qb.fvu_all, rel=1e-9)
        assert qa.l0 == pytest.approx(qb.l0, rel=1e-12) and qa.rsa == qb.rsa


def test_rsa_matches_direct(world):
    r = evaluate(world["topk"], world["acts"], quick(ordering="none"))
    kept = ActivationCache(world["acts"], outliers=DEFAULT)
    rows = kept.rows()
    pick = np.sort(np.random.default_rng(0).choice(len(rows), size=200, replace=False))
    x = kept.gather(rows[pick])
    sae = checkpoint.load(world["topk"]).sae
    codes = sae.encode(x)
    assert r.orderings["none"].rungs
    for q in r.orderings["none"].rungs:
        assert q.rsa == pytest.approx(rsa(x, sae.decode(codes, q.g)), abs=1e-6)  # float32 sum order


def test_matryoshka_evaluates_its_trained_order(world):
    r = evaluate(world["mat"], world["acts"], quick())
    assert list(r.orderings) == ["none"]
    assert r.orderings["none"].power_law_source.startswith("eval-set")
    with pytest.raises(ValueError, match="no stored ordering"):
        evaluate(world["mat"], world["acts"], quick(ordering="freq"))


def test_outlier_policy_off(world):
    r = evaluate(world["topk"], world["acts"], quick(ordering="none", outlier_factor=KEEP_ALL))
    assert r.outliers["excluded"] == 0 and r.n_tokens == 512
    q = r.orderings["none"].rungs[-1]
    assert q.fvu == pytest.approx(q.fvu_all)


def test_cli_writes_strict_json_and_merges(world, tmp_path, capsys):
    ck = tmp_path / "topk"
    checkpoint.save(ck, *_copy(world["topk"]))
    assert main(["eval", str(ck), "--activations", str(world["acts"]), "--rsa-tokens", "100",
                 "--ordering", "freq"]) == 0
    out = capsys.readouterr().out
    assert "freq" in out and "outlier policy" in out
    assert main(["eval", str(ck), "--activations", str(world["acts"]), "--rsa-tokens", "100",
                 "--ordering", "mean_sq"]) == 0

    def no_nan(s):
        raise AssertionError(f"non-strict JSON constant {s}")

    m = json.loads((ck / "metrics.json").read_text(), parse_constant=no_nan)
    assert {"freq", "mean_sq", "summary", "eval"} <= set(m)  # the first run's ordering survives
    assert m["summary"]["tokens"] == 509 and "fvu" in m["summary"]
    assert m["eval"]["density"]["dead"] + sum(m["eval"]["density"]["counts"]) == fx.M
    assert main(["inspect", str(ck)]) == 0


def _copy(path: Path):
    ck = checkpoint.load(path)
    return ck.sae, ck.meta, ck.orderings


def test_bad_input_is_one_line_error(world, tmp_path, capsys):
    wide = fx.make_cache(tmp_path / "wide", d=fx.D + 1)
    assert main(["eval", str(world["topk"]), "--activations", str(wide)]) == 2
    assert "width" in capsys.readouterr().err
    other = fx.make_cache(tmp_path / "other", layer=7)
    assert main(["eval", str(world["topk"]), "--activations", str(other)]) == 2
    assert "layer 7" in capsys.readouterr().err
    assert main(["eval", str(world["topk"]), "--activations", str(tmp_path / "nope")]) == 2
    assert main(["eval", str(world["mat"]), "--activations", str(world["acts"]), "--ordering", "mean_sq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error" in e for e in err)


# --- CE loss recovered through a real (tiny, randomly initialised) transformers model -----


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=fx.VOCAB, hidden_size=fx.D, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def perfect_sae():
    """x = relu(x) - relu(-x): M = 2D latents, k = D, exact reconstruction at G = M."""
    from progsae.sae.codec import SAE

    eye = torch.eye(fx.D)
    return SAE(W_enc=torch.cat([eye, -eye], 1), W_dec=torch.cat([eye, -eye], 0), b_enc=torch.zeros(2 * fx.D),
               b_dec=torch.zeros(fx.D), k=fx.D)


def tiny_llama_cache(model, layer: int, n_ctx: int, out: Path) -> torch.Tensor:
    """A held-out cache of n_ctx random contexts through `model` at `layer`; returns their token ids."""
    from progsae.lm.models import hidden_at_layer
    from progsae.trainer.data.activations import CacheWriter, Manifest

    ids = torch.from_numpy(np.random.default_rng(0).integers(2, fx.VOCAB, size=(n_ctx, fx.CONTEXT)))
    ids[:, 0] = fx.BOS
    h = hidden_at_layer(model, ids, layer)[:, 1:].reshape(-1, fx.D)
    w = CacheWriter(out, Manifest(model="tiny", layer=layer, d_model=fx.D, corpus=["x"],
                                  split="heldout", context=fx.CONTEXT, target_tokens=len(h)))
    w.add_shard(h.numpy(), ids.numpy().astype(np.int32))
    w.finish()
    return ids


def test_ce_splice_through_tiny_llama(tmp_path):
    model, layer = tiny_llama(), 1
    ids = tiny_llama_cache(model, layer, 6, tmp_path / "acts")
    meta = checkpoint.CheckpointMeta(architecture="topk", d_in=fx.D, d_sae=2 * fx.D, k=fx.D,
                                     granularities=(16, 32, 64), model="tiny", layer=layer)
    ck = checkpoint.save(tmp_path / "perfect", perfect_sae(), meta)
    cfg = quick(ordering="none", ce=True, ce_contexts=4, ce_batch=3, outlier_factor=KEEP_ALL)
    r = evaluate(ck, tmp_path / "acts", cfg, model=model)
    assert r.ce is not None and r.ce.n_contexts == 4 and r.ce.n_tokens == 4 * (fx.CONTEXT - 2)
    assert r.ce.splice_check < 1e-5
    # CE_clean equals the plain full forward's loss on the same contexts and positions
    picked = ids[[0, 2, 3, 5]]  # pick_contexts(6, 4)
    with torch.no_grad():
        logits = model(input_ids=picked).logits
    logp = torch.log_softmax(logits[:, 1:-1].double(), -1)
    direct = -logp.gather(-1, picked[:, 2:, None]).mean()
    assert r.ce.ce_clean == pytest.approx(float(direct), abs=1e-5)
    assert abs(r.ce.ce_zero - r.ce.ce_clean) > 1e-3  # (a random model need not get worse)
    full = r.orderings["none"].rungs[-1]
    assert full.fvu < 1e-10 and full.ce_recovered == pytest.approx(1.0, abs=1e-4) and full.kl < 1e-6
    half = r.orderings["none"].rungs[0]
    assert half.kl > 1e-4 and half.ce_recovered < 1.0
    # per-context sums: the contexts picked, and totals that add up to the reported means
    assert r.ce.contexts == [0, 2, 3, 5] and r.ce.context_tokens == [fx.CONTEXT - 2] * 4
    assert sum(r.ce.clean_sums or []) / r.ce.n_tokens == pytest.approx(r.ce.ce_clean, rel=1e-9)
    assert sum(r.ce.zero_sums or []) / r.ce.n_tokens == pytest.approx(r.ce.ce_zero, rel=1e-9)
    direct_ctx = -logp.gather(-1, picked[:, 2:, None]).sum((1, 2))
    assert r.ce.clean_sums == pytest.approx(direct_ctx.tolist(), abs=1e-4)
    for q in r.orderings["none"].rungs:
        assert len(q.ce_context_sums) == 4 and sum(q.ce_context_sums) / r.ce.n_tokens == pytest.approx(q.ce)
        assert q.ce_recovered_se is not None and q.ce_recovered_se >= 0 and q.kl_se is not None and q.kl_se >= 0
    assert half.ce_recovered_se > 1e-6 and full.ce_recovered_se < 1e-3  # exact at G = M: no spread
    assert f"{half.ce_recovered:.4f}±{half.ce_recovered_se:.4f}" in format_table(r)
    save_result(r, ck)
    m = json.loads((ck / "metrics.json").read_text())
    assert m["eval"]["ce"]["ce_clean"] == pytest.approx(r.ce.ce_clean)
    assert CEBaseline.from_json(m["eval"]["ce"]) == r.ce  # round trip, per-context sums included
    assert [RungMetrics.from_json(q) for q in m["none"]["rungs"]] == r.orderings["none"].rungs
    # a later eval without --ce (same settings) keeps the CE numbers
    save_result(evaluate(ck, tmp_path / "acts", quick(ordering="none", outlier_factor=KEEP_ALL)), ck)
    m = json.loads((ck / "metrics.json").read_text())
    assert m["none"]["rungs"][-1]["ce_recovered"] == pytest.approx(full.ce_recovered)
    assert m["none"]["rungs"][0]["ce_context_sums"] == half.ce_context_sums
    assert m["none"]["rungs"][0]["ce_recovered_se"] == half.ce_recovered_se
    assert CEBaseline.from_json(m["eval"]["ce"]) == r.ce
    assert m["eval"]["ce"]["n_contexts"] == 4 and m["summary"]["ce_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_metrics_json_without_per_context_fields_still_loads():
    """metrics.json written before the bootstrap: the new fields are simply absent -> None."""
    old_rung = {"g": 8, "fvu": 0.5, "fvu_all": 0.6, "l0": 3.0, "dead_fraction": 0.1, "rsa": 0.9, "ce": 3.1,
                "ce_recovered": 0.8, "kl": 0.2}
    q = RungMetrics.from_json(old_rung)
    assert q.ce_recovered == 0.8 and q.ce_recovered_se is None and q.kl_se is None and q.ce_context_sums is None
    assert q._asdict() == {**old_rung, "ce_recovered_se": None, "kl_se": None, "ce_context_sums": None}
    old_ce = {"ce_clean": 2.0, "ce_zero": 8.0, "n_contexts": 4, "n_tokens": 28, "splice_check": 1e-6, "policy": "p"}
    b = CEBaseline.from_json(old_ce)
    assert b.contexts is None and b.clean_sums is None and not b.has_contexts() and not b.same_contexts(b)
    new = CEBaseline(2.0, 8.0, 2, 14, 0.0, "p", contexts=[0, 3], context_tokens=[7, 7], clean_sums=[13.0, 15.0],
                     zero_sums=[50.0, 62.0])
    back = CEBaseline.from_json(json.loads(json.dumps(new.__dict__)))
    assert back == new and back.same_contexts(new) and not back.same_contexts(b)
    moved = CEBaseline.from_json({**new.__dict__, "contexts": [0, 4]})
    assert not moved.same_contexts(new)
