"""`progsae interp`: interpretability per granularity group, offline (simulation, absorption, splitting).

For a checkpoint and a held-out activation cache that stores its token ids:

  * simulation correlation per latent (simulation.py: a lookup-table explainer, NOT an LLM;
    its numbers are not on the paper's 0.74 / 0.57 scale, only comparable between variants),
    averaged over each band [G_{j-1}, G_j) of the ladder;
  * feature splitting per band (splitting.py): decoder cosine to the prefix, and how often
    a prefix latent's firing is split among several latents of the band;
  * first-letter feature absorption (absorption.py, SAEBench's definitions) of the SAE
    truncated to each prefix G; needs the checkpoint's language model.

Every measure is computed for each progressive order of the latents: a Matryoshka SAE in its
trained order; a TopK SAE unsorted ("none") and in each stored pruning order ("mean_sq" sorted by
E[a^2], "freq"). The latents of a TopK SAE are the same in every order, so its per-latent
simulation scores are computed once and only their grouping into bands differs.

One encode of the cache's kept rows (the checkpoint's outlier policy) feeds simulation and
splitting. The result is written to CKPT/interp.json, beside metrics.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from progsae.sae import checkpoint
from progsae.sae import ordering as ordmod
from progsae.trainer.data import outlier_policy
from progsae.trainer.data.activations import ActivationCache, CacheError
from progsae.trainer.data.outlier_policy import OutlierPolicy
from progsae.trainer.evaluation.results import ORDERING_NAMES
from progsae.trainer.interp.absorption import AbsorptionScore

INTERP = "interp.json"


@dataclass
class InterpConfig:
    """How to measure (recorded in interp.json under settings)."""

    ordering: Literal["none", "mean_sq", "freq", "all"] = "all"
    """Progressive order(s) to measure: "all" = the trained order plus every stored ordering."""
    max_tokens: int | None = None
    """Use only the first this many kept held-out rows (quick runs)."""
    min_count: int = 2
    """Simulation back-off: use a (previous, current) token pair, else the token, only if it occurred
    at least this often in the explain half; else the latent's global mean."""
    n_top: int = 50
    """Simulation scoring: each latent's top-activating tokens in the simulate half."""
    n_random: int = 200
    """Simulation scoring: random simulate-half tokens (the same for every latent)."""
    split_min_fires: int = 5
    """Splitting: a latent takes part only if it fires on at least this many held-out tokens."""
    split_subset: float = 0.8
    """Splitting: an outer latent is a child of an inner one if >= this share of its firings are
    also the inner latent's ..."""
    split_share: float = 0.5
    """... and it covers <= this share of the inner latent's firings."""
    absorption: bool = True
    """Measure first-letter absorption (loads the checkpoint's language model)."""
    model: str | None = None
    """Language model for absorption (default: the one the checkpoint names)."""
    words: int = 8000
    """Single-token words sampled for the first-letter task (80% probe-train, 20% test). SmolLM2 has
    31.5k; with 3000 only 14 of 26 letters reached probe F1 0.6, with 8000 24 (mean F1 0.76)."""
    probe_steps: int = 1000
    """Full-batch Adam steps of the first-letter probes."""
    n_icl: int = 4
    """In-context examples before each word."""
    lm_batch: int = 64
    """Words per language-model forward pass."""
    outlier_factor: OutlierPolicy | None = None
    """Exclude rows with norm > this factor x the median token norm (0, none or off: keep every
    row). Default: the policy the checkpoint was trained with."""
    batch_size: int = 4096
    """Tokens per encode batch."""
    threads: int | None = None
    """torch threads (default: torch's choice)."""
    seed: int = 0
    """Seeds the random scoring tokens and the word sample."""

    def validate(self) -> None:
        """Raise ValueError with a one-line message on bad settings."""
        if min(self.min_count, self.n_top, self.n_random, self.split_min_fires, self.words, self.lm_batch,
               self.batch_size, self.probe_steps) < 1 or self.n_icl < 0:
            raise ValueError("--min-count, --n-top, --n-random, --split-min-fires, --words, --lm-batch and "
                             "--batch-size must be >= 1, --n-icl >= 0")
        if not (0 < self.split_subset <= 1 and 0 < self.split_share <= 1):
            raise ValueError("--split-subset and --split-share must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError("--max-tokens must be >= 2")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")


class BandInterp(NamedTuple):
    """Simulation and splitting of one band [g_lo, g_hi) of one order."""

    g_lo: int
    g_hi: int
    simulation: float
    """Mean simulation correlation over the band's scored latents."""
    simulation_se: float
    """Its standard error (sd / sqrt(scored))."""
    scored: int
    """Latents of the band with a simulation score."""
    decoder_cos: float
    """Mean max decoder cosine of the band's latents to the prefix [0, g_lo) (NaN for the first band)."""
    split_fraction: float
    """Fraction of eligible prefix latents split among >= 2 latents of this band."""
    child_fraction: float
    """Fraction of the band's eligible latents that refine (are a child of) a prefix latent."""
    children: float
    """Mean children per split prefix latent."""


class VariantInterp(NamedTuple):
    """Every measure for one progressive order."""

    ordering: str
    bands: list[BandInterp]
    absorption: list[AbsorptionScore]
    """One per rung G of the ladder (empty when absorption was not measured)."""


@dataclass
class InterpResult:
    checkpoint: str
    architecture: str
    activations: str
    ladder: list[int]
    d_sae: int
    k: int
    n_tokens: int
    """Held-out rows used (after the outlier policy)."""
    variants: dict[str, VariantInterp]
    simulation_per_latent: list[float]
    """[d_sae] per original latent (NaN: unscored)."""
    probe_f1: list[float] = field(default_factory=list[float])
    """Per letter a..z, the first-letter probe's test F1 (empty without absorption)."""
    settings: dict[str, Any] = field(default_factory=dict[str, Any])
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = {n: {"ordering": v.ordering, "bands": [b._asdict() for b in v.bands],
                             "absorption": [a._asdict() for a in v.absorption]} for n, v in self.variants.items()}
        return _clean(d)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InterpResult:
        def num(x: Any) -> Any:
            return float("nan") if x is None else x

        variants = {n: VariantInterp(v["ordering"],
                                     [BandInterp(**{k: num(x) for k, x in b.items()}) for b in v["bands"]],
                                     [AbsorptionScore(**{k: num(x) for k, x in a.items()}) for a in v["absorption"]])
                    for n, v in d["variants"].items()}
        kw = {k: d[k] for k in ("checkpoint", "architecture", "activations", "ladder", "d_sae", "k", "n_tokens",
                                "settings", "seconds") if k in d}
        return cls(**kw, variants=variants, simulation_per_latent=[num(x) for x in d.get("simulation_per_latent", [])],
                   probe_f1=[num(x) for x in d.get("probe_f1", [])])


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return None if not math.isfinite(o) else round(o, 6)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def resolve_orderings(ck: checkpoint.Checkpoint, ordering: str) -> list[str]:
    """"all": the trained order plus every stored ordering; a named one must be stored."""
    if ordering not in (*ORDERING_NAMES, "all"):
        raise ValueError(f"unknown ordering {ordering!r}; choose from none, mean_sq, freq, all")
    if ordering == "all":
        return ["none", *[o for o in ORDERING_NAMES[1:] if o in ck.orderings]]
    if ordering != "none" and ordering not in ck.orderings:
        raise ValueError(f"{ck.path}: no stored ordering {ordering}; run `progsae order {ck.path} --by {ordering} "
                         "--activations <train cache>` first")
    return [ordering]


class TokenCodes(NamedTuple):
    """Codes of the kept held-out rows with their token ids."""

    indices: np.ndarray
    """[N, k] int64 original latent indices."""
    values: np.ndarray
    """[N, k] float32 activations."""
    tok: np.ndarray
    """[N] token id of the row."""
    prev: np.ndarray
    """[N] token id before it (the start token at the first stored position)."""
    context: np.ndarray
    """[N] index of the context the row came from."""


def token_ids(cache: ActivationCache, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tok, prev, context) of global rows, from the cache's stored token ids (see activations.py)."""
    tokens = cache.tokens()
    per = cache.manifest.context - 1
    if tokens.shape != (-(-cache.manifest.n_tokens // per), cache.manifest.context):
        raise CacheError(f"{cache.dir}: token ids of shape {tokens.shape} do not cover its "
                         f"{cache.manifest.n_tokens} rows; interp needs every shard's token ids")
    c, p = rows // per, rows % per + 1
    return tokens[c, p].astype(np.int64), tokens[c, p - 1].astype(np.int64), c


@torch.no_grad()
def encode_cache(sae: Any, cache: ActivationCache, cfg: InterpConfig) -> TokenCodes:
    rows = cache.rows()
    if cfg.max_tokens is not None:
        rows = rows[:cfg.max_tokens]
    tok, prev, ctx = token_ids(cache, rows)
    idx, val = [], []
    for i in range(0, len(rows), cfg.batch_size):
        codes = sae.encode(cache.gather(rows[i:i + cfg.batch_size]))
        idx.append(codes.indices.numpy())
        val.append(codes.values.numpy().astype(np.float32))
    return TokenCodes(np.concatenate(idx).astype(np.int64), np.concatenate(val), tok, prev, ctx)


def _band_sim(scores: np.ndarray, lo: int, hi: int) -> tuple[float, float, int]:
    s = scores[lo:hi]
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan"), 0
    se = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
    return float(s.mean()), se, len(s)


def interp(ckpt_path: str | Path, acts_dir: str | Path, cfg: InterpConfig | None = None, lm: Any = None,
           log: Any = print) -> InterpResult:
    """Measure a checkpoint on a held-out cache; `lm` (a LoadedModel) skips loading the language model."""
    from progsae.trainer.evaluation.evaluate import check_compatible
    from progsae.trainer.interp import simulation as sim
    from progsae.trainer.interp import splitting as spl

    cfg = cfg or InterpConfig()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    ck = checkpoint.load(ckpt_path)
    names = resolve_orderings(ck, cfg.ordering)
    rule = outlier_policy.resolve(cfg.outlier_factor, ck.meta)
    cache = ActivationCache(acts_dir, outliers=rule)
    check_compatible(ck, cache)
    sae, ladder, m = ck.sae.fold_scale(), tuple(ck.ladder), ck.meta.d_sae
    perms = {n: (ordmod.identity(m) if n == "none" else ck.orderings[n]).perm for n in names}

    log(f"encoding {acts_dir} ...")
    tc = encode_cache(sae, cache, cfg)
    vocab = int(max(tc.tok.max(), tc.prev.max())) + 1
    ex, si = tc.context % 2 == 0, tc.context % 2 == 1
    if not ex.any() or not si.any():
        raise ValueError(f"{acts_dir}: simulation needs at least two contexts (one to explain, one to simulate)")
    log(f"[{time.perf_counter() - t0:.0f}s] simulation over {int(ex.sum()):,} explain / {int(si.sum()):,} "
        "simulate tokens ...")
    e = sim.explain(tc.indices[ex], tc.values[ex], tc.prev[ex], tc.tok[ex], m, vocab, cfg.min_count)
    corr = sim.score(e, tc.indices[si], tc.values[si], tc.prev[si], tc.tok[si], m, cfg.n_top, cfg.n_random,
                     cfg.seed)
    log(f"[{time.perf_counter() - t0:.0f}s] splitting ...")
    co = spl.cofiring(tc.indices, tc.values, m)
    absorb: dict[str, list[AbsorptionScore]] = {n: [] for n in names}
    f1: list[float] = []
    if cfg.absorption:
        log(f"[{time.perf_counter() - t0:.0f}s] absorption ...")
        absorb, f1 = _absorption(ck, sae, perms, ladder, cfg, lm, log)
    variants = {}
    for n in names:
        perm = perms[n]
        split = spl.splitting(co, sae.W_dec, perm, ladder, cfg.split_min_fires, cfg.split_subset, cfg.split_share)
        ordered = corr[perm.numpy()]
        bands = [BandInterp(s.g_lo, s.g_hi, *_band_sim(ordered, s.g_lo, s.g_hi), s.decoder_cos, s.split_fraction,
                            s.child_fraction, s.children) for s in split]
        variants[n] = VariantInterp(n, bands, absorb[n])
    settings = {k: (v.factor if isinstance(v, OutlierPolicy) else v) for k, v in asdict(cfg).items()}
    settings["outlier_factor"] = rule.factor
    return InterpResult(str(ck.path), ck.meta.architecture, str(Path(acts_dir).resolve()), list(ladder), m,
                        ck.meta.k, len(tc.tok), variants, corr.tolist(), f1, settings, time.perf_counter() - t0)


def _absorption(ck: checkpoint.Checkpoint, sae: Any, perms: dict[str, torch.Tensor], ladder: tuple[int, ...],
                cfg: InterpConfig, lm: Any, log: Any) -> tuple[dict[str, list[AbsorptionScore]], list[float]]:
    from progsae.trainer.interp import absorption as ab

    if lm is None:
        from progsae.lm.models import load_model

        name = cfg.model or ck.meta.model
        if not name:
            raise ValueError(f"{ck.path}: the checkpoint names no language model; pass --model or --no-absorption")
        log(f"loading {name} for the first-letter task ...")
        lm = load_model(name)
    if ck.meta.layer is None:
        raise ValueError(f"{ck.path}: the checkpoint names no layer; absorption needs it (or --no-absorption)")
    words = ab.first_letter_words(lm.tokenizer, cfg.words + cfg.n_icl, cfg.seed)
    prefix = ab.icl_prefix(lm, words, cfg.n_icl)
    ids, labels = words.token_ids[cfg.n_icl:], words.letters[cfg.n_icl:]
    log(f"first-letter task: {len(ids)} words after a {len(prefix)}-token prefix ...")
    x = ab.word_activations(lm, prefix, ids, ck.meta.layer, cfg.lm_batch)
    n_train = int(0.8 * len(ids))
    probes = ab.train_probes(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], steps=cfg.probe_steps)
    task = ab.LetterTask(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], probes)
    codes = sae.encode(x)
    dense = ab.dense_codes(codes.indices, codes.values, sae.d_sae)
    a_train, a_test = dense[:n_train], dense[n_train:]
    acfg = ab.AbsorptionConfig()
    out = {n: [ab.absorption_at(g, p.numpy(), task, a_train, a_test, sae.W_dec, sae.b_dec, acfg) for g in ladder]
           for n, p in perms.items()}
    return out, probes.f1


def save_result(result: InterpResult, path: str | Path) -> Path:
    f = Path(path)
    checkpoint.atomic_write(f, json.dumps(result.to_json(), indent=1))
    return f


def load_result(ckpt: str | Path) -> InterpResult | None:
    """CKPT/interp.json, or None if the checkpoint has none."""
    f = Path(ckpt) / INTERP
    if not f.is_file():
        return None
    try:
        return InterpResult.from_json(json.loads(f.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: malformed ({type(e).__name__}: {e})") from None


def _f(v: float, w: int = 7, p: int = 3) -> str:
    return f"{v:{w}.{p}f}" if math.isfinite(v) else f"{'–':>{w}}"


def format_table(r: InterpResult) -> str:
    """Plain-text tables: per band (simulation, splitting) and per prefix G (absorption)."""
    lines = [f"{'ordering':9} {'band':>12} {'sim':>7} {'±se':>6} {'n':>5} {'dec_cos':>7} {'split':>7} {'child':>7}"]
    for n, v in r.variants.items():
        for b in v.bands:
            lines.append(f"{n:9} {f'{b.g_lo}-{b.g_hi}':>12} {_f(b.simulation)} {_f(b.simulation_se, 6)} "
                         f"{b.scored:5d} {_f(b.decoder_cos)} {_f(b.split_fraction)} {_f(b.child_fraction)}")
    if any(v.absorption for v in r.variants.values()):
        lines.append(f"{'ordering':9} {'G':>6} {'full_abs':>8} {'abs_frac':>8} {'letters':>7} {'main':>5} {'words':>6}")
        for n, v in r.variants.items():
            for a in v.absorption:
                lines.append(f"{n:9} {a.g:6d} {_f(a.full_rate, 8)} {_f(a.fraction, 8)} {a.letters:7d} "
                             f"{_f(a.main_latents, 5, 1)} {a.words:6d}")
        ok = [x for x in r.probe_f1 if math.isfinite(x)]
        if ok:
            lines.append(f"first-letter probes: mean test F1 {np.mean(ok):.3f} over {len(ok)} letters")
    lines.append(f"{r.n_tokens:,} held-out tokens; {r.seconds:.1f}s")
    return "\n".join(lines)
