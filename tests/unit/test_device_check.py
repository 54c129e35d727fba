"""bench/device_check.py in its tiny CPU mode: the GPU pipeline's code path (synthetic harvest, train,
order, encode, stream, float64 check) runs and passes on a machine without CUDA, and says so."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from tests.conftest import random_sae

ROOT = Path(__file__).resolve().parents[2]


def load_device_check():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_mode_runs_the_pipeline_and_says_the_gpu_check_was_not_run(capsys, tmp_path, one_thread):
    dc = load_device_check()
    assert dc.main(["--device", "cpu", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "the GPU check was NOT run" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 32 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["128", "256"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[-1] == "ok" and float(cells[3].replace(",", "")) > 0 and float(cells[4].replace(",", "")) > 0
    assert out.rstrip().endswith("all checks passed")
    assert list(tmp_path.iterdir()) == []  # its caches and checkpoints are removed


def test_float64_check_catches_a_wrong_device_result():
    dc = load_device_check()
    sae = random_sae(d=16, m=64, k=4, seed=2)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    good = dc.check_against_float64(sae, torch.device("cpu"), x, recon_rtol=1e-4)
    assert good["ok"] == 1.0 and good["same_codes"] > 0.9
    assert dc.check_against_float64(sae, torch.device("cpu"), x, recon_rtol=0.0)["ok"] == 0.0
