"""Ladders from the data (`progsae order --ladder auto:R`): the equal-share rule, the power-law
tie, the area comparison with the geometric ladder, and the stored, served ladder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.cli import main
from progsae.sae import checkpoint
from progsae.sae.ladders import area_under_steps, equal_share_ladder, power_law_curve
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.data.outlier_policy import DEFAULT
from progsae.trainer.evaluation.auto_ladder import choose, parse_auto
from tests.support import eval_fixtures as fx


def test_linear_curve_gives_evenly_spaced_rungs():
    grid = list(range(4, 17))
    assert equal_share_ladder(grid, [(16 - g) / 16 for g in grid], 5, 4) == (4, 7, 10, 13, 16)


def test_each_rung_reaches_its_share_at_the_first_grid_point_that_does():
    grid = [8, 16, 24, 32, 40, 48, 56, 64]
    fvu = [0.9, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.1]  # half the reduction by G = 16
    assert equal_share_ladder(grid, fvu, 3, 8) == (8, 16, 64)


@settings(max_examples=60, deadline=None)
@given(fvu=st.lists(st.floats(0, 1), min_size=6, max_size=30), rungs=st.integers(2, 6))
def test_ladder_is_strictly_increasing_with_r_rungs_on_any_curve(fvu, rungs):
    grid = [4 * (i + 1) for i in range(len(fvu))]
    lad = equal_share_ladder(grid, fvu, rungs, grid[0])
    assert len(lad) == rungs and lad[0] == grid[0] and lad[-1] == grid[-1]
    assert all(a < b for a, b in zip(lad, lad[1:])) and set(lad) <= set(grid)
    f = np.minimum.accumulate(fvu)
    f1, fm = f[0], f[-1]
    for j, g in enumerate(lad[1:-1], 1):  # a rung at or past its level, unless pushed by spacing
        i = grid.index(g)
        level = f1 - j / (rungs - 1) * (f1 - fm)
        assert f[i] <= level + 1e-12 or grid[i - 1] == lad[j - 1] or i == len(grid) - (rungs - j)


def test_bad_ladder_requests_raise():
    with pytest.raises(ValueError, match="auto:R"):
        parse_auto("geo:5")
    with pytest.raises(ValueError, match="auto:R"):
        parse_auto("auto:1")
    with pytest.raises(ValueError, match="cannot place"):
        equal_share_ladder([4, 8, 16], [1.0, 0.5, 0.1], 4, 4)


def test_power_law_of_alpha_zero_is_linear():
    grid = [16, 32, 48, 64]
    np.testing.assert_allclose(power_law_curve(grid, 0.0), [1 - g / 64 for g in grid])


def test_auto_ladder_beats_geometric_where_the_reduction_comes_late():
    """FVU falls little until G = 768 of M = 1024, then steeply: the geometric ladder spends its
    rungs where nothing happens, the auto ladder where the curve falls. Cost = G / 32."""
    m = 1024
    grid = list(range(64, m + 1, 4))
    fvu = [0.9 - 0.1 * g / m if g < 768 else 0.825 - 0.8 * (g - 768) / 256 for g in grid]
    cost = [g / 32 for g in grid]
    auto = equal_share_ladder(grid, fvu, 5, 64)
    geo = (64, 128, 256, 512, 1024)
    at = {g: (c, f) for g, c, f in zip(grid, cost, fvu)}
    area = {name: area_under_steps([at[g][0] for g in lad], [at[g][1] for g in lad], 2.0, 32.0)
            for name, lad in (("auto", auto), ("geo", geo))}
    assert auto[1] >= 768 and area["auto"] < area["geo"] - 0.01  # 0.859 vs 0.877


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    acts = fx.make_cache(root / "acts")
    topk, mat = fx.make_checkpoints(root)
    return {"acts": acts, "topk": topk, "mat": mat}


def test_power_law_decides_only_when_the_fit_is_good(world):
    ck = checkpoint.load(world["mat"])
    cache = ActivationCache(world["acts"], outliers=DEFAULT)
    law = torch.arange(1, fx.M + 1, dtype=torch.float64) ** -1.2
    good = choose(ck.sae, cache, 4, "mean_sq", law, tokens=256)
    assert good.source == "power_law" and good.r2 == pytest.approx(1.0) and good.alpha == pytest.approx(1.2)
    assert good.ladder == equal_share_ladder(good.curve.grid, power_law_curve(good.curve.grid, 1.2), 4, 8)
    noisy = torch.sort(torch.rand(fx.M, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1,
                       descending=True).values
    bad = choose(ck.sae, cache, 4, "mean_sq", noisy, tokens=256)
    assert bad.source == "measured" and bad.r2 is not None and bad.r2 < 0.95
    assert bad.ladder == equal_share_ladder(bad.curve.grid, bad.curve.fvu, 4, 8)
    none = choose(ck.sae, cache, 4, "none", None, tokens=256)
    assert none.source == "measured" and none.ladder == bad.ladder


@pytest.mark.parametrize("which", ["topk", "mat"])
def test_order_ladder_auto_stores_the_served_ladder(world, tmp_path, capsys, which):
    from progsae.server.registry import Registry, RegistryConfig

    ck = tmp_path / which
    shutil.copytree(world[which], ck)
    assert main(["order", str(ck), "--activations", str(world["acts"]), "--ladder", "auto:4"]) == 0
    out = capsys.readouterr().out
    assert "auto ladder" in out and "geometric" in out
    meta = checkpoint.load_meta(ck)
    rec = meta.extra["ladder"]
    assert rec["previous_granularities"] == list(fx.LADDER) and rec["rule"] == "auto:4"
    assert len(meta.granularities) == 4 and meta.granularities[0] == fx.M // 8 and meta.granularities[-1] == fx.M
    assert f"ladder {list(meta.granularities)} stored" in out
    assert checkpoint.load(ck).ladder == meta.granularities
    assert rec["ordering"] == ("mean_sq" if which == "topk" else "none")
    served = Registry(RegistryConfig(root=str(tmp_path))).get(which)
    assert served.ladder == meta.granularities  # what a stream uses when the request names no ladder
    json.loads((ck / checkpoint.CFG).read_text())  # still plain JSON
    assert main(["order", str(ck), "--activations", str(world["acts"]), "--ladder", "auto:x"]) != 0
    err = capsys.readouterr().err
    assert "auto:R" in err and "Traceback" not in err


def test_train_auto_ladder_stores_the_ladder_and_keeps_the_trained_groups(tmp_path):
    from progsae.trainer.training.config import TrainConfig
    from progsae.trainer.training.train import train
    from tests.support.caches import make_cache

    cache = make_cache(tmp_path / "acts", n=600)
    cfg = TrainConfig(arch="matryoshka", d_sae=32, k=4, granularities=(4, 8, 16, 32), batch_size=32, seed=3,
                      tokens=32 * 10, checkpoint_every=0, auto_ladder=3)
    out = train(cfg, cache, tmp_path / "mat", progress=False)
    meta = checkpoint.load_meta(out)
    assert meta.granularities[0] == 8 and meta.granularities[-1] == 32 and len(meta.granularities) == 3
    assert meta.extra["ladder"]["previous_granularities"] == [4, 8, 16, 32]
    assert meta.extra["train_config"]["auto_ladder"] == 3
    assert train(cfg, cache, out, progress=False) == out  # the same command again: done, not refused
    with pytest.raises(ValueError, match="auto-ladder"):
        TrainConfig(d_sae=32, k=4, auto_ladder=7).validate()
