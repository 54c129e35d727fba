"""The report's PNG figures (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from progsae.trainer.evaluation.k_grid import KGridResult  # noqa: E402
from progsae.trainer.report.curves import STYLE, CheckpointInfo, Curve  # noqa: E402

DPI = 110


def _style(label: str, i: int) -> dict:
    c, m, ls = STYLE.get(label.split(" (")[0], (f"C{i % 10}", "d", "-"))
    return {"color": c, "marker": m, "linestyle": ls}


def _vs_g(ax, variants: list[Curve], key: str, ylabel: str) -> bool:
    drawn = False
    for i, v in enumerate(variants):
        ys = [np.nan if y is None else y for y in v.series(key)]
        if all(np.isnan(ys)):
            continue
        ax.plot(v.g, ys, label=v.label, linewidth=1.8, markersize=5, **_style(v.label, i))
        drawn = True
    ax.set_xscale("log", base=2)
    gs = sorted({g for v in variants for g in v.g})
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.minorticks_off()
    ax.set_xlabel("granularity G (latents kept)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return drawn


def _save(fig, out: Path, name: str) -> Path:
    f = out / name
    fig.tight_layout()
    fig.savefig(f, dpi=DPI)
    plt.close(fig)
    return f


def fvu_figure(variants: list[Curve], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _vs_g(axes[0], variants, "fvu", "FVU (outlier rows excluded)")
    axes[0].set_title("FVU vs G (lower is better)")
    _vs_g(axes[1], variants, "fvu_all", "FVU (all rows, outliers included)")
    axes[1].set_title("FVU vs G, all held-out rows")
    for ax in axes:
        _log_plain(ax)
    axes[0].legend(fontsize=8)
    return _save(fig, out, "fvu_vs_g.png")


def _log_plain(ax) -> None:
    """Log y axis with plain decimal tick labels."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    decades = np.log10(hi / lo) if lo > 0 else 9.0
    subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 1.2 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs="all"))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def ce_figure(variants: list[Curve], out: Path) -> Path | None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if not _vs_g(axes[0], variants, "ce_recovered", "CE loss recovered"):
        plt.close(fig)
        return None
    axes[0].set_title("CE loss recovered vs G (higher is better)")
    _vs_g(axes[1], variants, "kl", "KL(p_clean ‖ p_sae), nats/token")
    _log_plain(axes[1])
    axes[1].set_title("KL to the clean model vs G (lower is better)")
    axes[0].legend(fontsize=8)
    return _save(fig, out, "ce_recovered_vs_g.png")


def rsa_figure(variants: list[Curve], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    _vs_g(ax, variants, "rsa", "RSA (Spearman of cosine-distance matrices)")
    ax.set_title("RSA vs G (higher is better)")
    ax.legend(fontsize=8)
    return _save(fig, out, "rsa_vs_g.png")


def importance_figure(variants: list[Curve], out: Path) -> Path | None:
    """Left: sorted ordering scores with their power-law fit. Right: E[a^2] along each order."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    drawn = False
    sorted_ckpts = {v.ckpt for v in variants if v.ordering == "mean_sq"}
    for i, v in enumerate(variants):
        s = np.asarray(v.scores_sorted, dtype=float)
        if s.size == 0 or v.ordering == "freq" or (v.ordering == "none" and v.ckpt in sorted_ckpts):
            continue
        st = _style(v.label, i)
        rank = np.arange(1, s.size + 1)
        pos = s > 0
        name = "held-out E[a²]" if v.ordering == "none" else "E[a²] on training tokens"
        axes[0].loglog(rank[pos], s[pos], color=st["color"], linewidth=1.4, label=f"{v.label}: {name}")
        pl = v.power_law
        if pl:
            axes[0].loglog(rank[pos], pl["C"] * rank[pos] ** -pl["alpha"], color=st["color"], linestyle="--",
                           linewidth=1, label=f"fit α={pl['alpha']:.2f}, R²={pl['r2']:.2f}")
        drawn = True
    lows = [min(x for x in v.scores_sorted if x > 0) for v in variants if any(x > 0 for x in v.scores_sorted)]
    highs = [max(v.scores_sorted) for v in variants if v.scores_sorted]
    if lows and highs:
        axes[0].set_ylim(min(lows) / 2, max(highs) * 3)  # fit lines may overshoot the data
    axes[0].set_xlabel("rank")
    axes[0].set_ylabel("importance score (sorted)")
    axes[0].set_title("Latent importance, log-log, with power-law fit")
    axes[0].grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    for i, v in enumerate(variants):
        imp = np.asarray(v.importance_in_order, dtype=float)
        if imp.size == 0:
            continue
        w = max(1, imp.size // 64)  # running mean over windows of positions
        sm = np.convolve(imp, np.ones(w) / w, mode="valid")
        axes[1].plot(np.arange(sm.size) + w / 2, sm, label=v.label, color=_style(v.label, i)["color"],
                     linestyle=_style(v.label, i)["linestyle"], linewidth=1.4)
    for g in sorted({g for v in variants for g in v.g})[:-1]:
        axes[1].axvline(g, color="k", alpha=0.15, linewidth=0.8)
    _log_plain(axes[1])
    axes[1].set_xlabel("position in the progressive order")
    axes[1].set_ylabel("held-out E[(a‖W_dec‖)²] (running mean)")
    axes[1].set_title("Importance along each order (rungs as grey lines)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out, "importance_loglog.png")


def density_figure(infos: list[CheckpointInfo], out: Path) -> Path | None:
    have = [i for i in infos if i.eval.get("density")]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for j, i in enumerate(have):
        d = i.eval["density"]
        edges = np.asarray(d["edges"])
        ax.stairs(d["counts"], edges, label=f"{i.name} ({i.arch}); dead: {d['dead']}", color=f"C{j}",
                  linewidth=1.6)
    ax.set_xlabel("log10 firing frequency on held-out tokens")
    ax.set_ylabel("latents")
    ax.set_title("Latent density histogram")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, "density.png")


def throughput_figure(infos: list[CheckpointInfo], out: Path) -> Path | None:
    have = [(i, i.tokens_per_s) for i in infos if i.tokens_per_s]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    names = [f"{i.arch}\n({i.name})" for i, _ in have]
    vals = [v for _, v in have]
    bars = ax.bar(names, vals, color=["C3" if i.arch == "matryoshka" else "C0" for i, _ in have])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training tokens / s")
    ax.set_title("Training throughput per architecture")
    ax.set_ylim(0, max(vals) * 1.15)
    return _save(fig, out, "train_throughput.png")


def k_grid_figure(grids: list[tuple[str, KGridResult]], out: Path) -> Path | None:
    """FVU against decode cost (mean active codes multiplied in) per checkpoint: G only (k' = k),
    k' only (G = M), the best (G, k') path, and every grid point."""
    if not grids:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], grids):
        ax.scatter([p.l0 for p in r.points], [p.fvu for p in r.points], s=12, color="0.7", label="(G, k') grid")
        for label, curve, st in (("G only (k' = k)", r.g_only(), ("C0", "o", "-")),
                                 ("k' only (G = M)", r.k_only(), ("C2", "s", "--")),
                                 ("best (G, k')", r.best(), ("k", "", "-"))):
            c, m, ls = st
            ax.step([p.l0 for p in curve], [p.fvu for p in curve], where="post", color=c, linestyle=ls,
                    linewidth=1.2 if label.startswith("best") else 1.6, marker=m or None, markersize=5,
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode cost: mean active codes per token")
        ax.set_ylabel("FVU")
        trained = f"k ladder {r.k_ladder}" if r.k_ladder else "no k ladder"
        ax.set_title(f"{name} ({trained})", fontsize=9)
        ax.grid(alpha=0.3)
        _log_plain(ax)
        ax.legend(fontsize=7)
    return _save(fig, out, "fvu_vs_cost_k_grid.png")


def _k_grids(infos: list[CheckpointInfo]) -> list[tuple[str, KGridResult]]:
    import json

    out = []
    for i in infos:
        f = Path(i.path) / "metrics.json"
        g = json.loads(f.read_text()).get("k_grid") if f.is_file() else None
        if g:
            out.append((i.name, KGridResult.from_json(g)))
    return out


def draw_all(variants: list[Curve], infos: list[CheckpointInfo], out: Path) -> list[tuple[str, Path]]:
    figs = [("FVU vs G", fvu_figure(variants, out)), ("CE loss recovered vs G", ce_figure(variants, out)),
            ("RSA vs G", rsa_figure(variants, out)), ("Importance curves", importance_figure(variants, out)),
            ("Latent density", density_figure(infos, out)), ("Training throughput", throughput_figure(infos, out)),
            ("FVU vs decode cost on the (G, k') grid", k_grid_figure(_k_grids(infos), out))]
    return [(t, f) for t, f in figs if f is not None]
