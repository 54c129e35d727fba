"""The report's interpretability section: tables and one figure per measure against G (CKPT/interp.json).

Reads what `progsae interp` wrote beside each checkpoint's metrics.json; checkpoints without
interp.json are left out of this section (it says so). Simulation correlation, decoder cosine and
splitting are per band [G_{j-1}, G_j), drawn at the band's upper edge G_j; absorption is of the SAE
truncated to its first G latents. Two claims are checked on the simulation numbers, each resolved
only where the difference exceeds twice the combined standard error (latents as samples):
Matryoshka's outermost band scores below its innermost one, and Matryoshka scores below
E[a²]-sorted TopK in the same band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from progsae.trainer.interp.measure import InterpResult, load_result
from progsae.trainer.report.curves import LABELS, CheckpointInfo

MEASURES = [
    ("simulation", "Simulation correlation (lookup-table explainer; per band)", "bands"),
    ("decoder_cos", "Max decoder cosine to the prefix (per band)", "bands"),
    ("split_fraction", "Prefix latents split by the band (per band)", "bands"),
    ("child_fraction", "Band latents refining a prefix latent (per band)", "bands"),
    ("full_rate", "First-letter full-absorption rate (SAE truncated to G)", "absorption"),
    ("fraction", "First-letter absorption fraction (SAE truncated to G)", "absorption"),
]


@dataclass
class InterpVariant:
    """One (checkpoint, ordering) with its interpretability numbers."""

    label: str
    ckpt: str
    g: list[int]
    """Upper edge of each band (= the prefix sizes of the ladder)."""
    values: dict[str, list[float]]
    """Per measure, one value per G."""
    se: dict[str, list[float]]
    """Standard errors where known (simulation)."""


def load_variants(infos: list[CheckpointInfo]) -> tuple[list[InterpVariant], list[str]]:
    """(variants with interp.json, names of checkpoints without one)."""
    out, missing = [], []
    archs = [i.arch for i in infos]
    for i in infos:
        r: InterpResult | None = load_result(i.path)
        if r is None:
            missing.append(i.name)
            continue
        for name, v in r.variants.items():
            label = LABELS.get((i.arch, name), f"{i.arch} ordered by {name}")
            if archs.count(i.arch) > 1:
                label = f"{label} ({i.name})"
            values: dict[str, list[float]] = {}
            for key, _, kind in MEASURES:
                rows: list[Any] = list(v.bands) if kind == "bands" else list(v.absorption)
                values[key] = [float(getattr(x, key)) for x in rows] if rows else []
            se = {"simulation": [b.simulation_se for b in v.bands]}
            out.append(InterpVariant(label, i.path, [b.g_hi for b in v.bands], values, se))
    return out, missing


def _cell(v: float, se: float | None = None) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.3f} ± {se:.3f}" if se is not None and math.isfinite(se) else f"{v:.3f}"


def tables(variants: list[InterpVariant]) -> list[str]:
    md: list[str] = []
    gs = sorted({g for v in variants for g in v.g})
    for key, title, kind in MEASURES:
        have = [v for v in variants if any(math.isfinite(x) for x in v.values.get(key, []))]
        if not have:
            continue
        bands = [f"G≤{gs[0]}", *[f"{a}<G≤{b}" for a, b in zip(gs, gs[1:])]]
        head = bands if kind == "bands" else [f"G={g}" for g in gs]
        md += [f"### {title}", "", "| variant | " + " | ".join(head) + " |", "|---|" + "---:|" * len(gs)]
        for v in have:
            ses = v.se.get(key, [float("nan")] * len(v.g))
            by_g = dict(zip(v.g, zip(v.values[key], ses)))
            md.append(f"| {v.label} | " + " | ".join(_cell(*by_g[g]) if g in by_g else "–" for g in gs) + " |")
        md.append("")
    return md


def _diff(a: float, sa: float, b: float, sb: float) -> tuple[float, bool]:
    """(a - b, resolved: |a - b| > 2 * combined se)."""
    d = a - b
    return d, math.isfinite(d) and abs(d) > 2 * math.hypot(sa, sb)


def claims(variants: list[InterpVariant]) -> list[tuple[str, str, str]]:
    """(claim, verdict, numbers) on simulation correlation."""
    by = {v.label: v for v in variants}
    out = []
    mat, top = by.get("Matryoshka"), by.get("TopK sorted by E[a²]")
    if mat is not None and len(mat.g) > 1:
        s, se = mat.values["simulation"], mat.se["simulation"]
        d, ok = _diff(s[-1], se[-1], s[0], se[0])
        verdict = "unresolved" if not ok else ("yes" if d < 0 else "**no**")
        out.append(("Matryoshka's outermost band is less interpretable than its innermost (simulation)", verdict,
                    f"{_cell(s[-1], se[-1])} (G≤{mat.g[-1]}) vs {_cell(s[0], se[0])} (G≤{mat.g[0]}), Δ = {d:+.3f}"))
    if mat is not None and top is not None and mat.g == top.g:
        cells, signs = [], []
        for j, g in enumerate(mat.g):
            a, sa = mat.values["simulation"][j], mat.se["simulation"][j]
            b, sb = top.values["simulation"][j], top.se["simulation"][j]
            d, ok = _diff(a, sa, b, sb)
            signs.append(None if not ok else d < 0)
            cells.append(f"G≤{g}: {_cell(a)} vs {_cell(b)} (Δ {d:+.3f}{'' if ok else ', within 2 se'})")
        verdict = ("**no**" if False in signs else "unresolved" if None in signs else "yes")
        out.append(("Matryoshka is less interpretable than TopK sorted by E[a²] in every band (simulation)",
                    verdict, "; ".join(cells)))
    return out


def figures(variants: list[InterpVariant], out: Path) -> list[tuple[str, Path]]:
    """One PNG per measure against G, every variant a line."""
    import matplotlib.pyplot as plt

    from progsae.trainer.report import plots as rp

    figs = []
    for key, title, _ in MEASURES:
        have = [v for v in variants if any(math.isfinite(x) for x in v.values.get(key, []))]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(6.2, 4.2))
        for i, v in enumerate(have):
            ys = v.values[key]
            ax.plot(v.g, ys, label=v.label, linewidth=1.8, markersize=5, **rp._style(v.label, i))
            se = v.se.get(key)
            if se and any(math.isfinite(x) for x in se):
                lo = [y - 2 * s for y, s in zip(ys, se)]
                hi = [y + 2 * s for y, s in zip(ys, se)]
                ax.fill_between(v.g, lo, hi, alpha=0.12, color=rp._style(v.label, i)["color"])
        gs = sorted({g for v in have for g in v.g})
        ax.set_xscale("log", base=2)
        ax.set_xticks(gs, [str(g) for g in gs])
        ax.minorticks_off()
        ax.set_xlabel("granularity G (band upper edge / prefix size)")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figs.append((title, rp._save(fig, out, f"interp_{key}_vs_g.png")))
    return figs


def section(infos: list[CheckpointInfo], out: Path) -> list[str]:
    """The report's markdown lines for interpretability (empty if no checkpoint has interp.json)."""
    variants, missing = load_variants(infos)
    if not variants:
        return []
    md = ["## Interpretability across granularities", "",
          "From `progsae interp` (CKPT/interp.json). Simulation correlation uses a lookup-table explainer "
          "(per token and per previous-token pair), not a language model: compare variants with each other, "
          "not with the paper's 0.74 / 0.57. ± is one standard error over the band's latents; the shaded "
          "region in the figure is ± 2 se."]
    if missing:
        md.append(f"No interp.json for: {', '.join(missing)} (run `progsae interp CKPT --activations ...`).")
    cl = claims(variants)
    if cl:
        md += ["", "| claim | holds? | numbers |", "|---|---|---|"] + [f"| {c} | {v} | {d} |" for c, v, d in cl]
    md += [""] + [f"![{t}]({f.name})" for t, f in figures(variants, out)] + [""] + tables(variants)
    return md
