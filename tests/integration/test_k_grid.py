"""The (G, k') grid evaluation (`progsae eval --k-grid`), its cost frontiers and its figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from progsae.cli import main
from progsae.sae import checkpoint
from progsae.sae.codec import topk_prefix
from progsae.sae.metrics import FVUAccumulator
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.data.outlier_policy import DEFAULT
from progsae.trainer.evaluation.evaluate import EvalConfig, evaluate
from progsae.trainer.evaluation.k_grid import GridPoint, KGridResult, area_under, evaluate_grid, fvu_at_cost, pareto
from tests.integration.test_eval import perfect_sae, tiny_llama, tiny_llama_cache
from tests.support import eval_fixtures as fx

KG = (1, 2, 4)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kgrid")
    acts = fx.make_cache(root / "acts")
    topk, mat = fx.make_checkpoints(root)
    return {"root": root, "acts": acts, "topk": topk, "mat": mat}


@pytest.mark.parametrize("which, ordering", [("topk", "mean_sq"), ("mat", "none")])
def test_grid_matches_direct_decode_and_eval_at_full_k(world, which, ordering):
    r = evaluate_grid(world[which], world["acts"], KG, batch_size=100)
    assert r.ordering == ordering and len(r.points) == len(fx.LADDER) * len(KG)
    sae = checkpoint.load(world[which], ordering=ordering).sae
    x = ActivationCache(world["acts"], outliers=DEFAULT).gather(ActivationCache(world["acts"], outliers=DEFAULT).rows())
    codes = sae.encode(x)
    for p in r.points:
        c = topk_prefix(codes, p.g, p.k_prime)
        acc = FVUAccumulator()
        acc.update(x, sae.decode(c, p.g))
        assert p.fvu == pytest.approx(acc.value(), rel=1e-5)
        assert p.l0 == pytest.approx(float(((c.indices < p.g) & (c.values != 0)).sum()) / len(x))
        assert p.l0 <= p.k_prime
    e = evaluate(world[which], world["acts"], EvalConfig(progress=False, rsa_tokens=200, ordering=ordering))
    for q, p in zip(e.orderings[ordering].rungs, r.g_only()):
        assert (q.g, p.k_prime) == (p.g, fx.K)
        assert p.fvu == pytest.approx(q.fvu, rel=1e-5) and p.l0 == pytest.approx(q.l0)
    # each axis alone spends more along its ladder, and both end at the full decode
    for curve in (r.g_only(), r.k_only()):
        assert all(a.l0 <= b.l0 for a, b in zip(curve, curve[1:]))
    assert r.g_only()[-1] == r.k_only()[-1] == r.at(fx.M, fx.K)


def _p(g: int, k: int, fvu: float, l0: float) -> GridPoint:
    return GridPoint(g, k, fvu, l0)


def test_pareto_and_fvu_at_cost_on_a_constructed_grid():
    pts = [_p(8, 1, 0.8, 1.0), _p(8, 2, 0.7, 2.0), _p(16, 1, 0.6, 1.0), _p(16, 2, 0.65, 2.5), _p(16, 4, 0.3, 4.0)]
    assert pareto(pts) == [pts[2], pts[4]]
    assert fvu_at_cost(pts, 0.5) == float("inf") and fvu_at_cost(pts, 2.4) == 0.6 and fvu_at_cost(pts, 4) == 0.3


def test_area_under_is_the_mean_fvu_of_a_log_uniform_budget():
    curve = [_p(1, 1, 0.5, 2.0), _p(2, 1, 0.25, 4.0)]
    # over log2 cost in [1, 4]: FVU 1 on [1, 2), 0.5 on [2, 4)
    assert area_under(curve, 1.0, 4.0) == pytest.approx((1.0 + 0.5) / 2)
    assert area_under(curve, 2.0, 8.0) == pytest.approx((0.5 + 0.25) / 2)
    cheaper = [_p(1, 1, 0.5, 1.5), _p(2, 1, 0.25, 4.0)]  # the same rungs, the first one cheaper
    assert area_under(cheaper, 1.0, 4.0) < area_under(curve, 1.0, 4.0)
    with pytest.raises(ValueError):
        area_under(curve, 4.0, 1.0)


def test_cli_eval_k_grid_writes_metrics_and_rejects_bad_grids(world, tmp_path, capsys):
    ck = tmp_path / "mat"
    import shutil

    shutil.copytree(world["mat"], ck)
    assert main(["eval", str(ck), "--activations", str(world["acts"]), "--k-grid", "1,2,4",
                      "--rsa-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "(G, k') grid" in out and "best path" in out
    m = json.loads((ck / "metrics.json").read_text())
    r = KGridResult.from_json(m["k_grid"])
    assert r.k_grid == [1, 2, 4] and len(r.points) == 12 and "none" in m
    for bad in ("2,1", "1,8", "0,4"):
        assert main(["eval", str(ck), "--activations", str(world["acts"]), "--k-grid", bad]) != 0
        err = capsys.readouterr().err
        assert "--k-grid" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_grid_ce_through_tiny_llama(tmp_path):
    model, layer = tiny_llama(), 1
    tiny_llama_cache(model, layer, 4, tmp_path / "acts")
    meta = checkpoint.CheckpointMeta(architecture="matryoshka", d_in=fx.D, d_sae=2 * fx.D, k=fx.D,
                                     granularities=(16, 64), model="tiny", layer=layer,
                                     extra={"train_config": {"outlier_factor": None}})
    ck = checkpoint.save(tmp_path / "perfect", perfect_sae(), meta)
    r = evaluate_grid(ck, tmp_path / "acts", (1, 8, fx.D), ce=True, ce_contexts=4, ce_batch=3, model=model)
    full, one = r.at(64, fx.D), r.at(64, 1)
    assert full.fvu < 1e-10 and full.ce_recovered == pytest.approx(1.0, abs=1e-4)
    assert one.ce_recovered is not None and one.ce_recovered < 1.0 and one.ce_recovered_se is not None


def test_report_draws_the_cost_figure(world, tmp_path):
    from progsae.trainer.report import plots as report_plots

    r = evaluate_grid(world["mat"], world["acts"], KG)
    f = report_plots.k_grid_figure([("mat", r)], tmp_path)
    assert f is not None and f.stat().st_size > 5000
    assert report_plots.k_grid_figure([], tmp_path) is None


def test_a_later_eval_without_k_grid_keeps_the_grid(world, tmp_path):
    ck = tmp_path / "mat"
    import shutil

    shutil.copytree(world["mat"], ck)
    args = ["eval", str(ck), "--activations", str(world["acts"]), "--rsa-tokens", "100"]
    assert main([*args, "--k-grid", "2,4"]) == 0
    assert main(args) == 0
    assert json.loads((ck / "metrics.json").read_text())["k_grid"]["k_grid"] == [2, 4]
    other = fx.make_cache(tmp_path / "other")  # other activations: the old grid no longer applies
    assert main(["eval", str(ck), "--activations", str(other), "--rsa-tokens", "100", "--max-tokens", "200"]) == 0
    assert "k_grid" not in json.loads((ck / "metrics.json").read_text())
