"""Evaluation metrics with exact definitions (SPEC §5), shared by trainer and server.

All accumulators are float64 and streaming: feed batches, read the result once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class FVUAccumulator:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean per dimension over all batches."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = 0.0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """Add a batch: activations x and their reconstruction x_hat, both [N, d_in]."""
        x64 = x.detach().double()
        self.sse += float((x64 - x_hat.detach().double()).square().sum())
        s, s2 = x64.sum(0), x64.square().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = s2 if self.sumsq is None else self.sumsq + s2
        self.n += x.shape[0]

    def total_variance(self) -> float:
        if self.n == 0 or self.sum is None or self.sumsq is None:
            raise ValueError("FVU of an empty set is undefined")
        return float((self.sumsq - self.sum.square() / self.n).sum())

    def value(self) -> float:
        tv = self.total_variance()
        return self.sse / tv if tv > 0 else float("inf")


def fvu(x: Tensor, x_hat: Tensor, variance: float | None = None) -> float:
    """FVU of one batch, x and x_hat [N, d_in]: its own mean as the baseline, or with `variance` a
    fixed one, sum ||x - x_hat||^2 / (N * variance). A few tokens' own variance is a poor baseline
    (two tokens of a short text: FVU 1.4 at full G), a checkpoint's `reference_variance` is not."""
    if variance is not None:
        return float((x.detach().double() - x_hat.detach().double()).square().sum()) / (x.shape[0] * variance)
    acc = FVUAccumulator()
    acc.update(x, x_hat)
    return acc.value()


def token_variance(x: Tensor) -> float:
    """E||x - mean(x)||^2 per token of x [N, d_in] (float64): what FVU divides by, per token. Over a
    checkpoint's training sample it is the checkpoint's `reference_variance`."""
    acc = FVUAccumulator()
    acc.update(x, x)
    return acc.total_variance() / acc.n


class RSAReference:
    """RSA against a fixed x: the ranks of x's pairwise cosine distances are computed once.

    RSA(x, x_hat) = Spearman correlation between the upper triangles (i < j) of the pairwise
    cosine-distance matrices of x and x_hat (SPEC §5). Scoring several reconstructions of the
    same tokens (one per rung) reuses the reference ranks.
    """

    def __init__(self, x: Tensor):
        """x: [N, d_in] reference activations, N >= 3."""
        if x.shape[0] < 3:
            raise ValueError("RSA needs at least 3 tokens")
        self.n = x.shape[0]
        self._ref = _centred_ranks(_cosine_distances(x))

    def score(self, x_hat: Tensor) -> float:
        """Spearman rho of x_hat [N, d_in]; NaN when its distances are all equal (e.g. a constant x_hat)."""
        if x_hat.shape[0] != self.n:
            raise ValueError(f"x_hat has {x_hat.shape[0]} tokens, reference has {self.n}")
        r = _centred_ranks(_cosine_distances(x_hat))
        den = float(np.sqrt((self._ref**2).sum() * (r**2).sum()))
        return float((self._ref * r).sum() / den) if den > 0 else float("nan")


def rsa(x: Tensor, x_hat: Tensor) -> float:
    """Spearman correlation of the upper triangles of the pairwise cosine-distance matrices of x
    and x_hat, both [N, d_in]."""
    return RSAReference(x).score(x_hat)


def _cosine_distances(a: Tensor) -> np.ndarray:
    a = torch.nn.functional.normalize(a.detach().double(), dim=1)
    d = 1.0 - a @ a.T
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1)
    return d[iu[0], iu[1]].cpu().numpy()


def _centred_ranks(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata  # pyright: ignore[reportMissingTypeStubs, reportUnknownVariableType]  # no stubs

    # Distances equal up to float noise (e.g. a constant x_hat) are ties, not an order.
    r = rankdata(np.round(v, 12), method="average")
    return r - r.mean()


def ce_loss_recovered(ce_clean: float, ce_zero: float, ce_sae: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as clean, 0 = as bad as zeroing."""
    den = ce_zero - ce_clean
    return (ce_zero - ce_sae) / den if den != 0 else float("nan")


class CleanTerms(NamedTuple):
    """What KL(p_clean || p) needs of the clean side, computed once for rows scored against many variants."""

    p: Tensor
    """[N, V] p_clean, in the log-probabilities' precision."""
    neg_entropy: Tensor
    """[N] float64 sum_v p_clean log p_clean."""


def clean_terms(logp_clean: Tensor) -> CleanTerms:
    p = logp_clean.exp()
    return CleanTerms(p, (p * logp_clean).sum(-1, dtype=torch.float64))


def token_kl(clean: Tensor | CleanTerms, logp: Tensor) -> Tensor:
    """[N] float64 KL(p_clean || p) = sum_v p_clean log p_clean - sum_v p_clean log p in nats, of N
    next-token distributions: the clean ones by their log-probabilities [N, V] (or their `clean_terms`,
    computed once when the same clean rows meet many variants, e.g. a stream's rungs), the others by
    theirs, `logp` [N, V]. Products in the input precision (float32 log-probs are accurate to ~1e-7),
    sums in float64. The one definition: CE evaluation's KL and the server's per-token, per-rung KL."""
    c = clean if isinstance(clean, CleanTerms) else clean_terms(clean)
    return c.neg_entropy - (c.p * logp).sum(-1, dtype=torch.float64)


class TokenLossAccumulator:
    """Float64 sums of next-token CE and KL(p_clean || p) over scored tokens, in total and per context.

    `update` takes log-probabilities [N, V] of the clean model and of a variant for the
    same N scored positions, and the [N] target token ids. The N rows are `contexts` equal
    consecutive blocks, one per context (default: the whole batch is one context); each
    block's sums are kept in `context_ce`, `context_kl` and `context_tokens`, in order, for
    the bootstrap over contexts.
    """

    def __init__(self) -> None:
        self.ce_sum = 0.0
        self.kl_sum = 0.0
        self.n = 0
        self.context_ce: list[float] = []
        self.context_kl: list[float] = []
        self.context_tokens: list[int] = []

    def update(self, logp_clean: Tensor, logp: Tensor, targets: Tensor, contexts: int = 1) -> None:
        n = int(targets.shape[0])
        if contexts < 1 or n % contexts:
            raise ValueError(f"{n} scored tokens do not split into {contexts} equal contexts")
        ce = (-logp.gather(-1, targets[:, None])).reshape(contexts, -1).sum(1, dtype=torch.float64)
        kl = token_kl(logp_clean, logp).reshape(contexts, -1).sum(1)
        self.context_ce += ce.tolist()  # pyright: ignore[reportUnknownMemberType]  # torch: tolist() -> bare list
        self.context_kl += kl.tolist()  # pyright: ignore[reportUnknownMemberType]  # torch: tolist() -> bare list
        self.context_tokens += [n // contexts] * contexts
        self.ce_sum += float(ce.sum())
        self.kl_sum += float(kl.sum())
        self.n += n

    @property
    def ce(self) -> float:
        return self.ce_sum / self.n if self.n else float("nan")

    @property
    def kl(self) -> float:
        """Mean per-token KL(p_clean || p) in nats."""
        return self.kl_sum / self.n if self.n else float("nan")


# --- bootstrap over contexts ----------------------------------------------------------------
#
# Tokens within a context are correlated, so the resampling unit is the context. A resample
# draws n contexts with replacement; it is a row of multinomial counts w [n], and every total
# over it is w @ per-context sums. Variants scored on the same contexts are resampled together
# (paired), which is what makes a CE-recovered ratio and a difference of two SAEs well defined.


class BootstrapEstimate(NamedTuple):
    """A statistic over all contexts and its bootstrap standard error."""

    value: float
    se: float
    """Standard deviation of the statistic over the resamples (NaN with fewer than 2 contexts)."""


class PairedDifference(NamedTuple):
    """CE recovered of variant a minus that of b, on the same contexts, with its bootstrap spread."""

    diff: float
    se: float
    lo: float
    """Lower end of the percentile interval."""
    hi: float
    """Upper end of the percentile interval."""

    def resolved(self) -> bool:
        """The interval excludes 0: the sign of the difference is resolved."""
        return self.lo > 0 or self.hi < 0


def bootstrap_weights(n_contexts: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_boot, n_contexts] counts: how often each context is drawn in each resample (rows sum to n)."""
    if n_contexts < 1:
        raise ValueError("the bootstrap needs at least one context")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_contexts, np.full(n_contexts, 1.0 / n_contexts), size=n_boot).astype(np.float64)


def _vectors(*sums: np.ndarray | Sequence[float]) -> list[np.ndarray]:
    out = [np.asarray(s, dtype=np.float64) for s in sums]
    if len({v.shape for v in out}) != 1 or out[0].ndim != 1:
        raise ValueError(f"per-context sums must be 1-d and of one length, got {[v.shape for v in out]}")
    return out


def _recovered(w: np.ndarray, clean: np.ndarray, zero: np.ndarray, sae: np.ndarray) -> np.ndarray:
    """CE recovered per weight row; the token counts cancel (every variant scores the same tokens)."""
    z = w @ zero
    with np.errstate(divide="ignore", invalid="ignore"):
        return (z - w @ sae) / (z - w @ clean)


def _se(stats: np.ndarray, n_contexts: int) -> float:
    return float(np.std(stats, ddof=1)) if n_contexts >= 2 and len(stats) >= 2 else float("nan")


def ce_recovered_bootstrap(clean: np.ndarray | Sequence[float], zero: np.ndarray | Sequence[float],
                           sae: np.ndarray | Sequence[float], n_boot: int = 1000, seed: int = 0) -> BootstrapEstimate:
    """CE recovered from per-context CE sums [C] of clean, zero-ablated and SAE runs, with its bootstrap SE.

    All three are resampled with the same contexts (paired); each resample's CE recovered
    is (CE_zero - CE_sae) / (CE_zero - CE_clean) of its token-weighted totals.
    """
    c, z, s = _vectors(clean, zero, sae)
    value = float(_recovered(np.ones((1, len(c))), c, z, s)[0])
    return BootstrapEstimate(value, _se(_recovered(bootstrap_weights(len(c), n_boot, seed), c, z, s), len(c)))


def per_token_mean_bootstrap(sums: np.ndarray | Sequence[float], tokens: np.ndarray | Sequence[float],
                             n_boot: int = 1000, seed: int = 0) -> BootstrapEstimate:
    """Token-weighted mean sum(sums) / sum(tokens) over [C] contexts (e.g. KL per token), with its bootstrap SE."""
    s, t = _vectors(sums, tokens)
    w = bootstrap_weights(len(s), n_boot, seed)
    return BootstrapEstimate(float(s.sum() / t.sum()), _se((w @ s) / (w @ t), len(s)))


def ce_recovered_difference(clean: np.ndarray | Sequence[float], zero: np.ndarray | Sequence[float],
                            a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float], n_boot: int = 1000,
                            seed: int = 0, level: float = 0.95) -> PairedDifference:
    """CE recovered(a) - CE recovered(b) for two SAEs scored on the same [C] contexts (same clean / zero).

    Paired bootstrap: every resample takes the same contexts for a, b, clean and zero; the
    interval is the `level` percentile interval of the resampled differences.
    """
    c, z, sa, sb = _vectors(clean, zero, a, b)
    full = np.ones((1, len(c)))
    diff = float(_recovered(full, c, z, sa)[0] - _recovered(full, c, z, sb)[0])
    w = bootstrap_weights(len(c), n_boot, seed)
    boot = _recovered(w, c, z, sa) - _recovered(w, c, z, sb)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(diff, _se(boot, len(c)), float(lo), float(hi))


class DensityHistogram(NamedTuple):
    """Histogram of log10 firing frequency over live latents; dead latents counted apart."""

    edges: list[float]
    """Bin edges in log10(frequency)."""
    counts: list[int]
    """Live latents per bin (len(edges) - 1)."""
    dead: int
    """Latents that never fired."""


def density_histogram(fires: Tensor | np.ndarray, n_tokens: int, lo: float = -7.0, bins: int = 28) -> DensityHistogram:
    """Firing frequency fires_i / n_tokens per latent (fires: [d_sae] counts), binned on [lo, 0] in log10."""
    f = np.asarray(fires, dtype=np.float64) / max(n_tokens, 1)
    live = f[f > 0]
    edges = np.linspace(lo, 0.0, bins + 1)
    counts, _ = np.histogram(np.clip(np.log10(live), lo, 0.0), bins=edges)
    return DensityHistogram([float(e) for e in edges], [int(c) for c in counts], int((f <= 0).sum()))


class PowerLaw(NamedTuple):
    """score(rank) ~ C * rank^-alpha, fitted by least squares in log-log space."""

    alpha: float
    C: float
    r2: float
    n: int
    """Number of (positive) scores used in the fit."""


def fit_power_law(sorted_scores: Tensor | np.ndarray) -> PowerLaw:
    """Fit on [d_sae] descending scores; zero scores (dead latents) are excluded from the fit."""
    s = np.asarray(sorted_scores, dtype=np.float64)
    s = s[s > 0]
    if s.size < 3:
        raise ValueError("power-law fit needs at least 3 positive scores")
    logr, logs = np.log(np.arange(1, s.size + 1)), np.log(s)
    slope, intercept = np.polyfit(logr, logs, 1)
    pred = slope * logr + intercept
    ss_res = float(((logs - pred) ** 2).sum())
    ss_tot = float(((logs - logs.mean()) ** 2).sum())
    return PowerLaw(float(-slope), float(np.exp(intercept)), 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, int(s.size))
