"""Typed results of `progsae eval`, and their (only) JSON form: metrics.json.

metrics.json, written into the checkpoint directory:

    {"summary":  {...a few headline numbers...},
     "eval":     {activations, tokens, outlier policy, density histogram, CE baselines, ...},
     "<ordering>": {"ordering": ..., "rungs": [{"g", "fvu", "fvu_all", "l0", ...}, ...],
                    "power_law": {...}, "scores_sorted": [...], "importance_in_order": [...]},
     ...}

Orderings are "none" (trained order; the Matryoshka order), "mean_sq" (sorted by E[a^2])
and "freq" (sorted by firing frequency). Evaluating one ordering keeps the others' entries
if they were computed on the same activations with the same settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from progsae.sae.metrics import DensityHistogram, PowerLaw

ORDERING_NAMES = ("none", "mean_sq", "freq")


class RungMetrics(NamedTuple):
    """Every per-granularity metric of SPEC §5 for one ordering at one rung G."""

    g: int
    fvu: float
    """FVU over the held-out rows kept by the outlier policy (the headline number)."""
    fvu_all: float
    """FVU over all held-out rows, outliers included."""
    l0: float
    """Mean active latents with index < G per kept token."""
    dead_fraction: float
    """Fraction of the first G latents (in this order) that never fired on the kept rows."""
    rsa: float
    """Spearman RSA of cosine-distance matrices over the RSA sample (NaN if undefined)."""
    ce: float | None = None
    """Next-token CE (nats) with x_hat_G spliced in at the hooked layer."""
    ce_recovered: float | None = None
    """(CE_zero - CE) / (CE_zero - CE_clean)."""
    kl: float | None = None
    """Mean per-token KL(p_clean || p_sae) in nats."""
    ce_recovered_se: float | None = None
    """Bootstrap standard error of ce_recovered, resampling the evaluated contexts."""
    kl_se: float | None = None
    """Bootstrap standard error of kl, resampling the evaluated contexts."""
    ce_context_sums: list[float] | None = None
    """CE summed over each evaluated context (nats), in the order of CEBaseline.contexts."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RungMetrics:
        """From a metrics.json rung; fields it lacks (older files) take their defaults."""
        return cls(**{k: d[k] for k in cls._fields if k in d})


CE_KEYS = ("ce", "ce_recovered", "kl", "ce_recovered_se", "kl_se", "ce_context_sums")
"""The RungMetrics fields measured by the CE splice evaluation."""


class CERung(NamedTuple):
    """The CE splice numbers of one (ordering, G)."""

    ce: float
    ce_recovered: float
    kl: float
    ce_recovered_se: float
    kl_se: float
    ce_context_sums: list[float]


@dataclass
class OrderingResult:
    """One progressive order of the latents, evaluated at every rung of the ladder."""

    ordering: str
    rungs: list[RungMetrics]
    power_law: PowerLaw | None
    """Fit of score ~ C rank^-alpha on `scores_sorted` (None if too few positive scores)."""
    power_law_source: str
    """Which scores were fitted: the stored ordering scores or eval-set E[a^2]."""
    scores_sorted: list[float]
    """The fitted scores, descending."""
    importance_in_order: list[float]
    """Eval-set E[(a_i ||W_dec[i]||)^2] of the latent at each position of this order."""
    order_monotonicity: float
    """Spearman correlation of position vs eval-set E[a^2] (-1: perfectly importance-sorted)."""


@dataclass
class CEBaseline:
    """The reference losses of the splice evaluation."""

    ce_clean: float
    ce_zero: float
    n_contexts: int
    n_tokens: int
    """Scored next-token predictions."""
    splice_check: float
    """Max relative error of the model's hidden_L vs the cached activations (sanity check)."""
    policy: str
    """How positions were treated (what is spliced where)."""
    contexts: list[int] | None = None
    """Cache context indices evaluated (`pick_contexts`), in order (None: metrics.json from before)."""
    context_tokens: list[int] | None = None
    """Scored tokens per evaluated context."""
    clean_sums: list[float] | None = None
    """Clean-model CE summed over each evaluated context (nats)."""
    zero_sums: list[float] | None = None
    """Zero-ablated CE summed over each evaluated context (nats)."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CEBaseline:
        """From metrics.json's eval.ce; fields it lacks (older files) take their defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def has_contexts(self) -> bool:
        """Per-context sums were recorded (needed for paired comparisons)."""
        return None not in (self.contexts, self.context_tokens, self.clean_sums, self.zero_sums)

    def same_contexts(self, other: CEBaseline, rtol: float = 1e-5) -> bool:
        """Both evaluated the same contexts: same indices and token counts, same clean and zero CE."""
        if not (self.has_contexts() and other.has_contexts()):
            return False
        if self.contexts != other.contexts or self.context_tokens != other.context_tokens:
            return False
        return all(math.isclose(a, b, rel_tol=rtol) for mine, theirs in
                   ((self.clean_sums, other.clean_sums), (self.zero_sums, other.zero_sums))
                   for a, b in zip(mine or [], theirs or []))


@dataclass
class EvalResult:
    """Everything `progsae eval` measured on one checkpoint."""

    checkpoint: str
    architecture: str
    activations: str
    ladder: list[int]
    d_sae: int
    k: int
    n_tokens: int
    """Held-out rows kept by the outlier policy (FVU, L0, densities use these)."""
    n_tokens_all: int
    outliers: dict[str, Any]
    """Outlier policy: factor, norm threshold, excluded / total rows."""
    rsa_tokens: int
    dead_fraction: float
    density: DensityHistogram
    ce: CEBaseline | None
    orderings: dict[str, OrderingResult]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return summarise(self.to_json())

    def to_json(self) -> dict[str, Any]:
        meta = {k: v for k, v in asdict(self).items() if k != "orderings"}
        meta["density"] = self.density._asdict()
        out: dict[str, Any] = {"eval": meta}
        for name, o in self.orderings.items():
            d = asdict(o)
            d["rungs"] = [r._asdict() for r in o.rungs]
            d["power_law"] = None if o.power_law is None else o.power_law._asdict()
            d["scores_sorted"] = [_sig(v) for v in o.scores_sorted]
            d["importance_in_order"] = [_sig(v) for v in o.importance_in_order]
            out[name] = d
        out = _clean(out)
        out["summary"] = summarise(out)
        return out


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """New results win; old entries survive if measured the same way.

    Same way = same activations, rows, outlier policy and settings. Then orderings not in
    `new` are kept (and a (G, k') grid, `k_grid`, from an earlier `--k-grid` run), and if `new`
    has no CE numbers (eval without --ce) the old CE numbers
    of the same (ordering, G) are carried over, with their baseline.
    """
    same = isinstance(old.get("eval"), dict) and all(
        old["eval"].get(k) == new["eval"].get(k) for k in ("activations", "n_tokens_all", "outliers", "settings")
    )
    if not same:
        return {**new, "summary": summarise(new)}
    out = {k: v for k, v in old.items() if k in ORDERING_NAMES or k == "k_grid"}  # k_grid: eval --k-grid
    new = {**new}
    if old["eval"].get("ce") and not new["eval"].get("ce"):
        new["eval"] = {**new["eval"], "ce": old["eval"]["ce"]}
        for name in ORDERING_NAMES:
            if name in new and name in old:
                prev = {r["g"]: r for r in old[name]["rungs"]}
                rungs = [{**r, **{k: prev.get(r["g"], {}).get(k) for k in CE_KEYS}} for r in new[name]["rungs"]]
                new[name] = {**new[name], "rungs": rungs}
    out.update(new)
    out["summary"] = summarise(out)
    return out


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: full-dictionary quality and each ordering at the smallest rung."""
    names = [n for n in ORDERING_NAMES if n in m]
    if not names:
        return {}
    top = m[names[0]]["rungs"][-1]
    s: dict[str, Any] = {
        "tokens": m["eval"]["n_tokens"],
        "fvu": _r(top["fvu"]),
        "fvu_all_rows": _r(top["fvu_all"]),
        "l0": _r(top["l0"]),
        "dead": _r(m["eval"]["dead_fraction"]),
    }
    if top.get("ce_recovered") is not None:
        s["ce_recovered"] = _r(top["ce_recovered"])
        if top.get("ce_recovered_se") is not None:
            s["ce_recovered_se"] = _r(top["ce_recovered_se"])
    g1 = m[names[0]]["rungs"][0]["g"]
    for n in names:
        s[f"fvu@{g1}[{n}]"] = _r(m[n]["rungs"][0]["fvu"])
    return s


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _sig(v: float) -> float:
    return float(f"{v:.6g}")


def _clean(o: Any) -> Any:
    """NaN/Inf -> null (metrics.json stays strict JSON); tuples -> lists."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o
