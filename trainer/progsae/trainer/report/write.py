"""`progsae report CKPT... --out DIR`: report.md + PNG figures from evaluated checkpoints.

Reads each checkpoint's metrics.json (written by `progsae eval`) and meta; draws FVU, CE
loss recovered and RSA against G for every evaluated variant (Matryoshka; TopK sorted by
E[a^2], by frequency, unsorted), the log-log importance curves with their power-law fits,
the latent density histograms and training throughput per architecture; checks the
paper's claims on the numbers and states plainly whether each holds. CE loss recovered is
shown with its bootstrap standard error where metrics.json has one, and an ordering claim in
CE recovered is "unresolved" at a G where a paired bootstrap over the shared contexts cannot
tell the two variants apart (its 95% interval of the difference contains 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from progsae.trainer.report.claims import claims
from progsae.trainer.report.curves import Curve, load_all

METRICS = [("fvu", "FVU (outlier policy)", "lower is better"), ("fvu_all", "FVU (all rows)", "lower"),
           ("l0", "L0", ""), ("dead_fraction", "dead fraction of first G", ""), ("rsa", "RSA", "higher"),
           ("ce_recovered", "CE loss recovered", "higher"), ("kl", "KL(p_clean‖p_sae) nats/token", "lower"),
           ("ce", "CE with x̂_G spliced (nats)", "lower")]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _fmt_se(v: Any, se: Any) -> str:
    """`value ± se` where the standard error is known, else the plain value."""
    if isinstance(se, float) and math.isfinite(se) and _fmt(v) != "–":
        return f"{_fmt(v)} ± {se:.4f}"
    return _fmt(v)


def metric_tables(variants: list[Curve]) -> str:
    lines = []
    for key, title, _ in METRICS:
        if not any(x is not None for v in variants for x in v.series(key)):
            continue
        gs = sorted({g for v in variants for g in v.g})
        lines += [f"### {title}", "", "| variant | " + " | ".join(f"G={g}" for g in gs) + " |",
                  "|---|" + "---:|" * len(gs)]
        for v in variants:
            by_g = dict(zip(v.g, zip(v.series(key), v.series(f"{key}_se"))))
            lines.append(f"| {v.label} | " + " | ".join(_fmt_se(*by_g.get(g, (None, None))) for g in gs) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(paths: list[str], out: str | Path) -> Path:
    from progsae.trainer.report import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos, variants = load_all(paths)
    figs = plots.draw_all(variants, infos, out)
    md = ["# progsae evaluation report", ""]
    for i in infos:
        e, ce = i.eval, i.eval.get("ce") or {}
        o = e.get("outliers", {})
        md.append(f"- **{i.name}**: {i.arch}, d_sae={i.meta.d_sae}, k={i.meta.k}, model {i.meta.model}, "
                  f"layer {i.meta.layer}, {i.meta.training_tokens:,} training tokens; eval on "
                  f"{e.get('n_tokens', 0):,} held-out rows ({o.get('excluded', 0)} of {o.get('total', 0)} "
                  f"excluded as outliers, factor {o.get('factor')}), RSA on {e.get('rsa_tokens')} tokens"
                  + (f", CE on {ce['n_tokens']:,} tokens of {ce['n_contexts']} contexts (clean "
                     f"{ce['ce_clean']:.4f}, zero-ablated {ce['ce_zero']:.4f} nats)" if ce else "")
                  + f"; dead latents {_fmt(e.get('dead_fraction'))}; training "
                  + (f"{i.tokens_per_s:,.0f} tokens/s ({i.throughput_source})" if i.tokens_per_s else "tokens/s n/a"))
    md += ["", "## Claims", "", "| claim | holds? | numbers |", "|---|---|---|"]
    for c in claims(variants, infos):
        md.append(f"| {c.claim} | {c.verdict} | {c.detail} |")
    md += ["", "## Figures", ""] + [f"![{t}]({f.name})" for t, f in figs] + ["", "## Every metric at every G", ""]
    md.append(metric_tables(variants))
    from progsae.trainer.report.interp_section import section  # imports matplotlib, as report_plots does

    md += section(infos, out)
    md += ["## Power-law fits of the ordering scores", "", "| variant | scores | alpha | R² | n |",
           "|---|---|---:|---:|---:|"]
    for v in variants:
        if v.power_law:
            pl = v.power_law
            src = "stored ordering" if v.ordering != "none" else "eval E[a²] sorted"
            md.append(f"| {v.label} | {src} | {pl['alpha']:.3f} | {pl['r2']:.3f} | {pl['n']} |")
    f = out / "report.md"
    f.write_text("\n".join(md) + "\n")
    return f
