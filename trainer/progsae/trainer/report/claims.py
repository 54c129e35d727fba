"""The paper's claims, checked on the evaluated curves: each holds, fails, or is unresolved where a
paired bootstrap over the shared contexts cannot tell the compared curves apart."""

from __future__ import annotations

from dataclasses import dataclass, field

from progsae.sae.metrics import PairedDifference, ce_recovered_difference
from progsae.trainer.evaluation.results import CEBaseline
from progsae.trainer.report.curves import CheckpointInfo, Curve


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


def _by_label(variants: list[Curve]) -> dict[str, Curve]:
    return {v.label: v for v in variants}


def _paired_diffs(have: list[Curve], j: int, baselines: dict[str, CEBaseline]) -> list[PairedDifference] | None:
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


def _ordered(vs: dict[str, Curve], chain: list[str], key: str, higher: bool,
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


def claims(variants: list[Curve], infos: list[CheckpointInfo]) -> list[Claim]:
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
