"""`progsae report` writes report.md and readable PNGs from evaluated checkpoints."""

from __future__ import annotations

import json

from progsae.cli import main
from progsae.trainer.evaluate import EvalConfig, evaluate, save_result
from progsae.trainer.report import claims, load_all
from tests import eval_fixtures as fx


def test_report_end_to_end(tmp_path, capsys):
    acts = fx.make_cache(tmp_path / "acts")
    topk, mat = fx.make_checkpoints(tmp_path)
    for ck in (topk, mat):
        save_result(evaluate(ck, acts, EvalConfig(progress=False, rsa_tokens=200)), ck)
    out = tmp_path / "report"
    assert main(["report", str(mat), str(topk), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for png in ("fvu_vs_g.png", "rsa_vs_g.png", "importance_loglog.png", "density.png", "train_throughput.png"):
        f = out / png
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
        assert f"({png})" in md
    assert not (out / "ce_recovered_vs_g.png").exists()  # no --ce: no CE figure, and the claim says so
    for label in ("Matryoshka", "TopK sorted by E[a²]", "TopK sorted by freq", "TopK unsorted"):
        assert f"| {label} |" in md
    assert "## Claims" in md and "run eval with --ce" in md
    infos, variants = load_all([str(mat), str(topk)])
    cl = {c.claim: c for c in claims(variants, infos)}
    cost = next(c for name, c in cl.items() if name.startswith("Matryoshka training time"))
    assert cost.holds is False and "1.111" in cost.detail  # 1000 / 900 tokens/s from the fixtures
    fvu_claim = next(c for name, c in cl.items() if name.startswith("Matryoshka > TopK sorted by E[a²] > TopK")
                     and "fvu" in name)
    m = json.loads((mat / "metrics.json").read_text())
    assert fvu_claim.holds is not None and str(fx.LADDER[0]) in fvu_claim.detail and "summary" in m


def test_report_needs_metrics(tmp_path, capsys):
    _, mat = fx.make_checkpoints(tmp_path)
    assert main(["report", str(mat), "--out", str(tmp_path / "r")]) == 2
    assert "progsae eval" in capsys.readouterr().err
