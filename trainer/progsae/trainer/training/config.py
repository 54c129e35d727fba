"""Training configuration: one dataclass, every field documented, JSON round-trippable.

`progsae train` builds its flags from this class (cli/progsae/cli/train.py), so the module
stays light: torch-backed helpers are imported where they are used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from progsae.trainer.data.outlier_policy import DEFAULT, OutlierPolicy

Arch = Literal["topk", "matryoshka"]
ARCHS: tuple[Arch, ...] = ("topk", "matryoshka")
Precision = Literal["float32", "tf32", "bfloat16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "tf32", "bfloat16")
DecoderNorm = Literal["unit", "free"]
DECODER_NORMS: tuple[DecoderNorm, ...] = ("unit", "free")
AuxkNorm = Literal["residual", "batch"]
AUXK_NORMS: tuple[AuxkNorm, ...] = ("residual", "batch")

DEAD_TOKENS_MAX = 10_000_000
"""Gao et al.'s dead window; runs shorter than 10x this use a tenth of their budget."""


@dataclass
class TrainConfig:
    """How to train one TopK or Matryoshka SAE on an activation cache (SPEC §3)."""

    arch: Arch = "matryoshka"
    """"topk": loss = FVU of the full reconstruction. "matryoshka": weighted sum of the
    FVUs of the nested prefix reconstructions at every granularity."""

    d_sae: int = 4096
    """Number of latents M."""

    k: int = 32
    """Active latents per token (one top-k over all M)."""

    granularities: tuple[int, ...] = ()
    """Nested prefix sizes G_1 < ... < G_n = d_sae. Matryoshka trains one loss term per
    rung; topk only records them as its ladder. Empty: `codec.default_ladder(d_sae)`."""

    group_weights: tuple[float, ...] = ()
    """Matryoshka weight w_j of the loss at G_j; normalised to sum 1. Empty: equal."""

    k_ladder: tuple[int, ...] = ()
    """Hierarchical top-k: k'_1 < ... < k'_n = k. The loss is the mean over k' of the loss of
    decoding each token from its k' largest codes (at the full k: the arch's loss; below it: the
    FVU at G = d_sae), so the model decodes well at every k'. Empty: k only."""

    auto_ladder: int = 0
    """R > 0: after training, pick the served ladder as `progsae order --ladder auto:R` does, on the
    first 16384 rows of the training cache in the trained latent order (Matryoshka's groups stay
    what was trained and are recorded in extra.ladder). 0: serve the granularities."""

    tokens: int = 0
    """Training budget in tokens; 0 = one epoch of the cache. Rounded down to whole batches."""

    batch_size: int = 4096
    """Tokens per optimiser step."""

    lr: float = 0.0
    """Adam learning rate; 0 = sparsify's rule 2e-4 / sqrt(d_sae / 2^14)."""

    lr_warmup_steps: int = -1
    """Linear warm-up from 0; -1 = min(1000, 5% of the steps)."""

    lr_decay_frac: float = 0.2
    """Fraction of the steps at the end over which the learning rate decays linearly to 0."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""

    eps: float = 6.25e-10
    """Adam epsilon (Gao et al. 2024)."""

    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024)."""

    auxk_norm: AuxkNorm = "residual"
    """AuxK's scale. "residual": the dead latents' squared error over the residual's own variance
    (Gao et al.'s normalised MSE). "batch": over the input batch's variance, like the
    reconstruction loss, times min(dead / k_aux, 1) (SAELens's TopK: its sum of squares relative
    to its reconstruction loss), so it weighs less while few latents are dead."""

    decoder_norm: DecoderNorm = "unit"
    """"unit": decoder rows kept at norm 1 (gradient parallel to a row removed, rows renormalised
    after each step). "free": rows free in norm, top-k taken over pre * ||W_dec_i|| and decoded
    from pre (SAELens's TopK `rescale_acts_by_decoder_norm`); the checkpoint folds the norms into
    the encoder, so it decodes identically with unit rows."""

    k_aux: int = 0
    """Dead latents used by AuxK; 0 = d_in / 2."""

    dead_tokens: int = 0
    """A latent is dead after this many consecutive training tokens without firing.
    0 = min(10M, max(total_tokens / 10, batch_size)): Gao et al.'s 10M tokens for long
    runs, a tenth of the budget (at least one batch) for short ones."""

    init_samples: int = 65536
    """Tokens sampled (with `seed`) to fit the normalisation scalar and b_dec."""

    b_dec_init: Literal["median", "mean", "zeros"] = "median"
    """b_dec initialisation: geometric median (Weiszfeld) or mean of the sample, or zeros (SAELens:
    latents then learn the activations' offset, and a few dense ones lead an E[a²] ordering)."""

    outlier_factor: OutlierPolicy = DEFAULT
    """Cache read policy: drop tokens with norm > this factor x the median token norm (0, none or
    off: keep every token). Recorded as a float or null."""

    seed: int = 0
    """Seeds the initial weights, the init sample and the data order."""

    checkpoint_every: int = 100
    """Steps between resumable training-state checkpoints (0 = only at the end)."""

    log_every: int = 10
    """Steps between jsonl log lines."""

    dtype: Precision = "float32"
    """Precision of the encoder's dense [B, M] matmul, the bulk of a step: float32; tf32 (CUDA
    only: TensorFloat-32 matmuls, float32 accumulation); bfloat16 (inputs rounded to bfloat16,
    float32 accumulation on CUDA; the selection and the selected values come from it).
    Decode, losses, gradients and Adam stay float32. A resume must use the same."""

    def __post_init__(self) -> None:
        from progsae.sae.codec import default_ladder

        self.granularities = tuple(int(g) for g in self.granularities) or default_ladder(self.d_sae)
        self.group_weights = tuple(float(w) for w in self.group_weights)
        self.k_ladder = tuple(int(k) for k in self.k_ladder)
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def validate(self) -> None:
        """Raise ValueError with a one-line message on inconsistent settings."""
        from progsae.sae.codec import check_ladder, default_ladder

        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.d_sae < 1:
            raise ValueError(f"--d-sae must be positive, got {self.d_sae}")
        if not 1 <= self.k < self.d_sae:
            raise ValueError(f"--k must be in 1..d_sae-1 = {self.d_sae - 1}, got {self.k}")
        if self.granularities[-1] > self.d_sae:
            raise ValueError(
                f"--d-sae {self.d_sae} is smaller than the largest granularity {self.granularities[-1]}"
            )
        check_ladder(self.granularities, self.d_sae)
        if self.granularities[-1] != self.d_sae:
            raise ValueError(f"the last granularity must equal --d-sae {self.d_sae}, got {self.granularities[-1]}")
        if self.group_weights:
            if len(self.group_weights) != len(self.granularities):
                raise ValueError(
                    f"{len(self.group_weights)} group weights for {len(self.granularities)} granularities"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.group_weights) or sum(self.group_weights) <= 0:
                raise ValueError("group weights must be finite, non-negative and not all zero")
        if self.k_ladder:
            if any(b <= a for a, b in zip(self.k_ladder, self.k_ladder[1:])) or self.k_ladder[0] < 1:
                raise ValueError(f"--k-ladder must be strictly increasing positive ints, got {self.k_ladder}")
            if self.k_ladder[-1] != self.k:
                raise ValueError(f"the last --k-ladder entry must equal --k {self.k}, got {self.k_ladder[-1]}")
        r = self.auto_ladder
        if r and (r < 2 or len(default_ladder(self.d_sae, r)) != r):
            raise ValueError(f"--auto-ladder must be 0 or 2..{self.d_sae.bit_length()} rungs, got {r}")
        for name in ("batch_size", "init_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("tokens", "k_aux", "dead_tokens", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.log_every < 1:
            raise ValueError("log_every must be positive")
        if self.lr < 0 or not 0 <= self.lr_decay_frac <= 1:
            raise ValueError("lr must be >= 0 and lr_decay_frac in [0, 1]")
        if self.decoder_norm not in DECODER_NORMS:
            raise ValueError(f"unknown --decoder-norm {self.decoder_norm!r}; choose from {', '.join(DECODER_NORMS)}")
        if self.auxk_norm not in AUXK_NORMS:
            raise ValueError(f"unknown --auxk-norm {self.auxk_norm!r}; choose from {', '.join(AUXK_NORMS)}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose from {', '.join(PRECISIONS)}")
        if not isinstance(self.outlier_factor, OutlierPolicy):
            raise TypeError(f"outlier_factor must be an OutlierPolicy, got {self.outlier_factor!r}")

    # --- derived settings ---------------------------------------------------------------

    def weights(self) -> tuple[float, ...]:
        """Normalised loss weight per granularity (topk: all weight on the full SAE)."""
        if self.arch == "topk":
            return (1.0,)
        w = self.group_weights or (1.0,) * len(self.granularities)
        return tuple(x / sum(w) for x in w)

    def loss_ladder(self) -> tuple[int, ...]:
        """Granularities that carry a loss term."""
        return self.granularities if self.arch == "matryoshka" else (self.d_sae,)

    def loss_k_ladder(self) -> tuple[int, ...]:
        """The k' that carry a loss term (empty when only k does)."""
        return self.k_ladder if len(self.k_ladder) > 1 else ()

    def base_lr(self) -> float:
        return self.lr or 2e-4 / math.sqrt(self.d_sae / 2**14)

    def warmup_steps(self, total_steps: int) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps >= 0 else min(1000, total_steps // 20)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimiser step `step` (0-based): linear warm-up, flat, linear decay."""
        lr, warm = self.base_lr(), self.warmup_steps(total_steps)
        if step < warm:
            return lr * (step + 1) / (warm + 1)
        decay = int(total_steps * self.lr_decay_frac)
        if decay and step >= total_steps - decay:
            return lr * (total_steps - step) / (decay + 1)
        return lr

    def k_aux_for(self, d_in: int) -> int:
        return self.k_aux or max(1, d_in // 2)

    def dead_window(self, total_tokens: int) -> int:
        return self.dead_tokens or min(DEAD_TOKENS_MAX, max(total_tokens // 10, self.batch_size))

    # --- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["granularities"], d["group_weights"], d["betas"] = (
            list(self.granularities), list(self.group_weights), list(self.betas),
        )
        d["outlier_factor"] = self.outlier_factor.factor
        if self.k_ladder:
            d["k_ladder"] = list(self.k_ladder)
        else:  # recorded only when set: runs and checkpoints from before it compare equal
            del d["k_ladder"]
        if not self.auto_ladder:
            del d["auto_ladder"]
        for name, default in (("auxk_norm", "residual"), ("decoder_norm", "unit")):
            if d[name] == default:  # likewise
                del d[name]
        if self.dtype == "float32":  # likewise
            del d["dtype"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        if "outlier_factor" in kw:
            kw["outlier_factor"] = OutlierPolicy.from_record(kw["outlier_factor"])
        return cls(**kw)
