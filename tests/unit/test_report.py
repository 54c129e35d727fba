"""`progsae report` writes report.md and readable PNGs from evaluated checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from progsae.cli import main
from progsae.sae import checkpoint
from progsae.sae.metrics import ce_loss_recovered
from progsae.trainer.evaluation.evaluate import EvalConfig, evaluate, save_result
from progsae.trainer.evaluation.results import CEBaseline
from progsae.trainer.report.claims import claims
from progsae.trainer.report.curves import CheckpointInfo, Curve, load_all
from progsae.trainer.report.write import metric_tables
from tests.support import eval_fixtures as fx


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


# --- CE recovered claims with a paired bootstrap over shared contexts -----------------------

N_CTX, TOK = 32, 100


def _baseline(contexts: list[int] | None = None) -> CEBaseline:
    rng = np.random.default_rng(0)
    clean = rng.uniform(2.0, 3.0, N_CTX) * TOK
    return CEBaseline(float(clean.sum() / (N_CTX * TOK)), 0.0, N_CTX, N_CTX * TOK, 0.0, "test",
                      contexts=contexts or list(range(0, 2 * N_CTX, 2)), context_tokens=[TOK] * N_CTX,
                      clean_sums=clean.tolist(), zero_sums=(clean + 6.0 * TOK).tolist())


def _variant(label: str, arch: str, ordering: str, ckpt: str, base: CEBaseline, sums: np.ndarray,
             per_context: bool = True) -> Curve:
    c, z, s = (float(np.sum(v)) for v in (base.clean_sums, base.zero_sums, sums))
    rung = {"g": 8, "ce": s / base.n_tokens, "ce_recovered": ce_loss_recovered(c, z, s), "ce_recovered_se": 0.01}
    if per_context:
        rung["ce_context_sums"] = sums.tolist()
    top = {"g": 16, "ce_recovered": 1.0}
    return Curve(label, arch, ordering, ckpt, [8, 16], [rung, top], None, [], [])


def _info(path: str, arch: str, base: CEBaseline) -> CheckpointInfo:
    meta = checkpoint.CheckpointMeta(architecture=arch, d_in=4, d_sae=16, k=2, granularities=(8, 16))
    return CheckpointInfo(path, path, arch, meta, {"ce": asdict(base)}, None, "not recorded")


def _ce_claim(shift: float, per_context: bool = True, contexts_b: list[int] | None = None):
    """Matryoshka vs TopK sorted, TopK worse by `shift` nats per context plus large zero-mean noise."""
    base_a, base_b = _baseline(), _baseline(contexts_b)
    rng = np.random.default_rng(1)
    a = np.asarray(base_a.clean_sums) + rng.uniform(0.5, 1.5, N_CTX) * TOK
    noise = rng.normal(0, 0.3 * TOK, N_CTX)
    b = a + noise - noise.mean() + shift
    vs = [_variant("Matryoshka", "matryoshka", "none", "mat", base_a, a, per_context),
          _variant("TopK sorted by E[a²]", "topk", "mean_sq", "topk", base_b, b, per_context)]
    infos = [_info("mat", "matryoshka", base_a), _info("topk", "topk", base_b)]
    cl = claims(vs, infos)
    return next(c for c in cl if c.claim.startswith("Matryoshka > TopK sorted by E[a²] > TopK unsorted in ce_rec")), vs


def test_ce_claim_within_noise_is_unresolved():
    c, vs = _ce_claim(shift=0.02 * TOK)  # Δ CE recovered ≈ 0.003, paired SE ≈ 0.009
    assert vs[0].rungs[0]["ce_recovered"] > vs[1].rungs[0]["ce_recovered"]  # the point values do order
    assert c.holds is None and c.unresolved == [8] and c.verdict == "unresolved"
    assert "unresolved at G = 8" in c.detail and "paired Δ +0.00" in c.detail
    # the same numbers without per-context sums keep the old point comparison
    old, _ = _ce_claim(shift=0.02 * TOK, per_context=False)
    assert old.holds is True and old.verdict == "yes" and "paired" not in old.detail
    # ... and so do sums on different contexts: they cannot be paired
    other, _ = _ce_claim(shift=0.02 * TOK, contexts_b=list(range(1, 2 * N_CTX, 2)))
    assert other.verdict == "yes" and "paired" not in other.detail


def test_ce_claim_clearly_separated_holds_or_fails():
    c, _ = _ce_claim(shift=0.5 * TOK)  # Δ ≈ 0.083, about 9 SE
    assert c.holds is True and c.verdict == "yes" and c.unresolved == [] and "paired Δ +0.08" in c.detail
    bad, _ = _ce_claim(shift=-0.5 * TOK)
    assert bad.holds is False and bad.verdict == "**no**" and "fails at G = 8" in bad.detail


def test_metric_table_shows_standard_errors():
    _, vs = _ce_claim(shift=0.0)
    table = metric_tables(vs)
    ce_rec = table.split("### CE loss recovered")[1].split("###")[0]
    assert f"| Matryoshka | {vs[0].rungs[0]['ce_recovered']:.4f} ± 0.0100 | 1.0000 |" in ce_rec
