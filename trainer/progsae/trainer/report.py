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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from progsae.sae import checkpoint
from progsae.sae.metrics import PairedDifference, ce_recovered_difference
from progsae.trainer.eval_types import CEBaseline

LABELS = {("matryoshka", "none"): "Matryoshka", ("topk", "mean_sq"): "TopK sorted by E[a²]",
          ("topk", "freq"): "TopK sorted by freq", ("topk", "none"): "TopK unsorted"}
STYLE = {"Matryoshka": ("C3", "o", "-"), "TopK sorted by E[a²]": ("C0", "s", "-"),
         "TopK sorted by freq": ("C2", "^", "--"), "TopK unsorted": ("C7", "x", ":")}
METRICS = [("fvu", "FVU (outlier policy)", "lower is better"), ("fvu_all", "FVU (all rows)", "lower"),
           ("l0", "L0", ""), ("dead_fraction", "dead fraction of first G", ""), ("rsa", "RSA", "higher"),
           ("ce_recovered", "CE loss recovered", "higher"), ("kl", "KL(p_clean‖p_sae) nats/token", "lower"),
           ("ce", "CE with x̂_G spliced (nats)", "lower")]


@dataclass
class Variant:
    """One (checkpoint, ordering) curve."""

    label: str
    arch: str
    ordering: str
    ckpt: str
    g: list[int]
    rungs: list[dict[str, Any]]
    power_law: dict[str, Any] | None
    scores_sorted: list[float]
    importance_in_order: list[float]

    def series(self, key: str) -> list[float | None]:
        return [r.get(key) for r in self.rungs]


@dataclass
class CheckpointInfo:
    path: str
    name: str
    arch: str
    meta: checkpoint.CheckpointMeta
    eval: dict[str, Any]
    tokens_per_s: float | None
    throughput_source: str


def load_all(paths: list[str]) -> tuple[list[CheckpointInfo], list[Variant]]:
    infos, variants = [], []
    archs = [checkpoint.load_meta(p).architecture for p in paths]
    for p, arch in zip(paths, archs):
        meta = checkpoint.load_meta(p)
        mfile = Path(p) / checkpoint.METRICS
        if not mfile.is_file():
            raise ValueError(f"{p}: no metrics.json; run `progsae eval {p} --activations <held-out cache>` first")
        m = json.loads(mfile.read_text())
        tps, src = training_throughput(Path(p), meta)
        name = Path(p).resolve().name
        infos.append(CheckpointInfo(str(p), name, arch, meta, m.get("eval", {}), tps, src))
        for ordering in ("none", "mean_sq", "freq"):
            if ordering not in m:
                continue
            o = m[ordering]
            label = LABELS.get((arch, ordering), f"{arch} ordered by {ordering}")
            if archs.count(arch) > 1:
                label = f"{label} ({name})"
            variants.append(Variant(label, arch, ordering, str(p), [r["g"] for r in o["rungs"]], o["rungs"],
                                    o.get("power_law"), o.get("scores_sorted", []), o.get("importance_in_order", [])))
    rank = {label: i for i, label in enumerate(STYLE)}
    variants.sort(key=lambda v: (rank.get(v.label.split(" (")[0], len(rank)), v.label))
    return infos, variants


def training_throughput(path: Path, meta: checkpoint.CheckpointMeta) -> tuple[float | None, str]:
    """Training tokens/s: from the checkpoint's meta, else the last line of a jsonl training log."""
    found = _find_key(meta.extra or {}, ("tokens_per_s", "train_tokens_per_s", "tokens_per_sec"))
    if found is not None:
        return found, "checkpoint meta"
    for log in sorted(path.glob("*.jsonl")) + sorted(path.parent.glob(f"{path.name}*.jsonl")):
        rows = [json.loads(s) for s in log.read_text().splitlines() if s.strip().startswith("{")]
        for row in reversed(rows):
            v = _find_key(row, ("tokens_per_s", "tok_per_s", "tokens/s"))
            if v is not None:
                return v, f"training log {log.name}"
    return None, "not recorded"


def _find_key(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool):
            return float(d[key])
    for v in d.values():
        if isinstance(v, dict):
            found = _find_key(v, keys)
            if found is not None:
                return found
    return None


# --- claims -------------------------------------------------------------------------------


@dataclass
class Claim:
    claim: str
    holds: bool | None
    """None: not measurable from these checkpoints, or (with `unresolved`) not resolved by them."""
    detail: str
    unresolved: list[int] = field(default_factory=list)
    """Rungs G at which the data cannot tell the compared variants apart."""

    @property
    def verdict(self) -> str:
        """The report's "holds?" cell."""
        if self.holds is False:
            return "**no**"
        if self.unresolved:
            return "unresolved"
        return "n/a" if self.holds is None else "yes"


def _by_label(variants: list[Variant]) -> dict[str, Variant]:
    return {v.label: v for v in variants}


def _paired_diffs(have: list[Variant], j: int, baselines: dict[str, CEBaseline]) -> list[PairedDifference] | None:
    """CE recovered of each variant minus the next one's at rung j, paired over shared contexts.

    None unless every variant has per-context CE sums at rung j and all were evaluated on
    the same contexts (same indices, token counts, clean and zero-ablated losses).
    """
    base = [baselines.get(v.ckpt) for v in have]
    given = [v.rungs[j].get("ce_context_sums") for v in have]
    sums = [s for s in given if s is not None]
    b0 = base[0]
    if b0 is None or any(b is None or not b0.same_contexts(b) for b in base) or len(sums) < len(given):
        return None
    if any(len(s) != len(b0.clean_sums or []) for s in sums):
        return None
    return [ce_recovered_difference(b0.clean_sums or [], b0.zero_sums or [], a, b) for a, b in zip(sums, sums[1:])]


def _pairs_hold(diffs: list[PairedDifference], higher: bool) -> bool | None:
    """False if some pair is resolved in the wrong direction, None if some is unresolved, else True."""
    if any((d.hi < 0) if higher else (d.lo > 0) for d in diffs):
        return False
    return True if all(d.resolved() for d in diffs) else None


def _ordered(vs: dict[str, Variant], chain: list[str], key: str, higher: bool,
             baselines: dict[str, CEBaseline] | None = None) -> Claim:
    have = [vs[c] for c in chain if c in vs]
    name = f"{' > '.join(chain)} in {key} at every G < M"
    if len(have) < 2:
        return Claim(name, None, "needs at least two of these variants")
    gs = have[0].g[:-1]
    fails, unresolved, cells = [], [], []
    for j, g in enumerate(gs):
        given = [v.rungs[j].get(key) for v in have]
        vals = [x for x in given if x is not None]
        if len(vals) < len(given):
            return Claim(name, None, f"{key} not measured (run eval with --ce)" if key.startswith(("ce", "kl"))
                         else f"{key} missing")
        ok: bool | None = all((a > b) if higher else (a < b) for a, b in zip(vals, vals[1:]))
        cell = f"G={g}: " + " vs ".join(f"{x:.4g}" for x in vals)
        diffs = _paired_diffs(have, j, baselines or {}) if key == "ce_recovered" else None
        if diffs is not None:
            ok = _pairs_hold(diffs, higher)
            cell += ", paired Δ " + ", ".join(f"{d.diff:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}]" for d in diffs)
        cells.append(cell)
        if ok is None:
            unresolved.append(g)
        elif not ok:
            fails.append(g)
    parts = ([f"fails at G = {', '.join(map(str, fails))}"] if fails else []) + (
        [f"unresolved at G = {', '.join(map(str, unresolved))} (95% bootstrap interval of the paired difference "
         "contains 0)"] if unresolved else [])
    verdict = "; ".join(parts) or "holds at every G < M"
    holds = False if fails else (None if unresolved else True)
    return Claim(name, holds, f"{verdict} ({'; '.join(cells)})", unresolved)


def _baselines(infos: list[CheckpointInfo]) -> dict[str, CEBaseline]:
    """{checkpoint path: its CE baseline} for the checkpoints evaluated with --ce."""
    return {i.path: CEBaseline.from_json(i.eval["ce"]) for i in infos if i.eval.get("ce")}


def claims(variants: list[Variant], infos: list[CheckpointInfo]) -> list[Claim]:
    vs, base = _by_label(variants), _baselines(infos)
    chain = ["Matryoshka", "TopK sorted by E[a²]", "TopK unsorted"]
    out = [_ordered(vs, chain, "fvu", False), _ordered(vs, chain, "ce_recovered", True, base),
           _ordered(vs, chain, "rsa", True)]
    pair = ["TopK sorted by E[a²]", "TopK sorted by freq"]
    out += [_ordered(vs, pair, "fvu", False), _ordered(vs, pair, "ce_recovered", True, base),
            _ordered(vs, pair, "rsa", True)]
    for v in variants:
        pl = v.power_law
        if v.ordering == "mean_sq" and pl:
            out.append(Claim(f"importance follows a power law ({v.label} scores)", pl["r2"] >= 0.9,
                             f"alpha = {pl['alpha']:.3f}, R² = {pl['r2']:.3f} over {pl['n']} latents "
                             f"(holds if R² ≥ 0.9 in log-log)"))
    tps = {i.arch: i.tokens_per_s for i in infos if i.tokens_per_s}
    if "topk" in tps and "matryoshka" in tps:
        ratio = tps["topk"] / tps["matryoshka"]
        out.append(Claim("Matryoshka training time per token ≤ 1.10× TopK (paper: ~1.25×)", ratio <= 1.10,
                         f"time/token ratio Matryoshka/TopK = {ratio:.3f} ({tps['matryoshka']:.0f} vs "
                         f"{tps['topk']:.0f} tokens/s)"))
    else:
        out.append(Claim("Matryoshka vs TopK training cost", None, "training tokens/s not recorded for both"))
    return out


# --- output -------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _fmt_se(v: Any, se: Any) -> str:
    """`value ± se` where the standard error is known, else the plain value."""
    if isinstance(se, float) and math.isfinite(se) and _fmt(v) != "–":
        return f"{_fmt(v)} ± {se:.4f}"
    return _fmt(v)


def metric_tables(variants: list[Variant]) -> str:
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
    from progsae.trainer import report_plots as plots

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
    from progsae.trainer.report_interp import section  # imports matplotlib, as report_plots does

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
