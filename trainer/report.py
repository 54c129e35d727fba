"""`progsae report CKPT... --out DIR`: report.md + PNG figures from evaluated checkpoints.

Reads each checkpoint's metrics.json (written by `progsae eval`) and meta; draws FVU, CE
loss recovered and RSA against G for every evaluated variant (Matryoshka; TopK sorted by
E[a^2], by frequency, unsorted), the log-log importance curves with their power-law fits,
the latent density histograms and training throughput per architecture; checks the
paper's claims on the numbers and states plainly whether each holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from progsae.sae import checkpoint

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
    """None: not measurable from these checkpoints."""
    detail: str


def _by_label(variants: list[Variant]) -> dict[str, Variant]:
    return {v.label: v for v in variants}


def _ordered(vs: dict[str, Variant], chain: list[str], key: str, higher: bool) -> Claim:
    have = [vs[c] for c in chain if c in vs]
    name = f"{' > '.join(chain)} in {key} at every G < M"
    if len(have) < 2:
        return Claim(name, None, "needs at least two of these variants")
    gs = have[0].g[:-1]
    fails, cells = [], []
    for j, g in enumerate(gs):
        vals = [v.rungs[j].get(key) for v in have]
        if any(x is None for x in vals):
            return Claim(name, None, f"{key} not measured (run eval with --ce)" if key.startswith(("ce", "kl"))
                         else f"{key} missing")
        good = all((a > b) if higher else (a < b) for a, b in zip(vals, vals[1:]))
        cells.append(f"G={g}: " + " vs ".join(f"{x:.4g}" for x in vals))
        if not good:
            fails.append(g)
    verdict = "holds at every G < M" if not fails else f"fails at G = {', '.join(map(str, fails))}"
    return Claim(name, not fails, f"{verdict} ({'; '.join(cells)})")


def claims(variants: list[Variant], infos: list[CheckpointInfo]) -> list[Claim]:
    vs = _by_label(variants)
    chain = ["Matryoshka", "TopK sorted by E[a²]", "TopK unsorted"]
    out = [_ordered(vs, chain, "fvu", False), _ordered(vs, chain, "ce_recovered", True),
           _ordered(vs, chain, "rsa", True)]
    pair = ["TopK sorted by E[a²]", "TopK sorted by freq"]
    out += [_ordered(vs, pair, "fvu", False), _ordered(vs, pair, "ce_recovered", True),
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


def metric_tables(variants: list[Variant]) -> str:
    lines = []
    for key, title, _ in METRICS:
        if not any(x is not None for v in variants for x in v.series(key)):
            continue
        gs = sorted({g for v in variants for g in v.g})
        lines += [f"### {title}", "", "| variant | " + " | ".join(f"G={g}" for g in gs) + " |",
                  "|---|" + "---:|" * len(gs)]
        for v in variants:
            by_g = dict(zip(v.g, v.series(key)))
            lines.append(f"| {v.label} | " + " | ".join(_fmt(by_g.get(g)) for g in gs) + " |")
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
                  + (f", CE on {ce['n_tokens']:,} tokens (clean {ce['ce_clean']:.4f}, zero-ablated "
                     f"{ce['ce_zero']:.4f} nats)" if ce else "")
                  + f"; dead latents {_fmt(e.get('dead_fraction'))}; training "
                  + (f"{i.tokens_per_s:,.0f} tokens/s ({i.throughput_source})" if i.tokens_per_s else "tokens/s n/a"))
    md += ["", "## Claims", "", "| claim | holds? | numbers |", "|---|---|---|"]
    for c in claims(variants, infos):
        md.append(f"| {c.claim} | {'n/a' if c.holds is None else ('yes' if c.holds else '**no**')} | {c.detail} |")
    md += ["", "## Figures", ""] + [f"![{t}]({f.name})" for t, f in figs] + ["", "## Every metric at every G", ""]
    md.append(metric_tables(variants))
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
