"""Which rows of an activation cache a reader keeps: the outlier policy.

Attention sinks and separator positions carry up to ~100x the median token norm (RESULTS.md).
`OutlierPolicy` says which rows a reader of a cache keeps: rows whose norm exceeds `factor` x
the cache's median token norm are dropped, or none at all. It is the one spelling of that rule:

    flag `--outlier-factor`   "10" (a positive factor), or "0" / "none" / "off" (keep every row);
                              a negative or non-numeric value is an error, in every command
    recorded                  as the float `factor`, or null for "keep every row" (checkpoints'
                              train_config and outlier_policy, metrics.json, features.json)
    default                   DEFAULT (factor DEFAULT_FACTOR), for training and for checkpoints
                              that recorded none
    eval, order, features     apply what the checkpoint was trained with unless told otherwise
                              (`resolve`), so they score the rows the SAE saw in training
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from progsae.sae.checkpoint import CheckpointMeta

DEFAULT_FACTOR = 10.0
"""On SmolLM2-135M layer 15 every sink lies above 11.6x the median norm and every other row below
6.6x (RESULTS.md, "Outlier tokens"); Gemma-3-270m layer 9 needs 3."""

KEEP_ALL_WORDS = ("0", "none", "off")


@dataclass(frozen=True)
class OutlierPolicy:
    """Which rows of an activation cache a reader keeps."""

    factor: float | None = DEFAULT_FACTOR
    """Rows with norm > factor x the cache's median token norm are dropped; None keeps every row."""

    def __post_init__(self) -> None:
        f = self.factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                              or f <= 0):
            raise ValueError(f"outlier factor must be a positive number, or 0 / none / off to keep every row; "
                             f"got {f!r}")
        if f is not None:
            object.__setattr__(self, "factor", float(f))

    @classmethod
    def parse(cls, text: str) -> OutlierPolicy:
        """From a flag: a positive factor, or "0", "none" or "off" to keep every row."""
        word = text.strip().lower()
        if word in KEEP_ALL_WORDS:
            return KEEP_ALL
        try:
            factor = float(word)
        except ValueError:
            factor = math.nan
        if factor == 0:
            return KEEP_ALL
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"expected a positive factor, or 0 / none / off to keep every row; got {text!r}")
        return cls(factor)

    @classmethod
    def from_record(cls, factor: Any) -> OutlierPolicy:
        """From a recorded factor (a float, or null for every row)."""
        return KEEP_ALL if factor is None else cls.parse(str(factor))

    @property
    def keeps_all(self) -> bool:
        return self.factor is None

    def threshold(self, median_norm: float) -> float:
        """The largest norm kept in a cache whose median token norm is `median_norm`."""
        return math.inf if self.factor is None else self.factor * median_norm

    def __str__(self) -> str:
        return "off" if self.factor is None else f"{self.factor:g}"


DEFAULT = OutlierPolicy()
KEEP_ALL = OutlierPolicy(None)


def trained_with(meta: CheckpointMeta) -> OutlierPolicy:
    """The policy a checkpoint was trained with, from the factor its provenance records (our trainer
    writes it into `train_config`); DEFAULT when it records none (e.g. a SAELens checkpoint)."""
    ex = meta.extra or {}
    for d in (ex, *(v for v in ex.values() if isinstance(v, dict))):
        recorded = d.get("outlier_factor", "absent")
        if recorded is None or (isinstance(recorded, (int, float)) and not isinstance(recorded, bool)):
            try:
                return OutlierPolicy.from_record(recorded)
            except ValueError as e:
                raise ValueError(f"the checkpoint records outlier_factor={recorded!r}: {e}") from None
    return DEFAULT


def resolve(asked: OutlierPolicy | None, meta: CheckpointMeta) -> OutlierPolicy:
    """The policy eval, order and features apply: the one asked for, else the checkpoint's own."""
    return trained_with(meta) if asked is None else asked
