"""The evaluated checkpoints a report reads: one `Curve` per (checkpoint, ordering) from its
metrics.json, and per checkpoint its meta, eval settings and training throughput (`CheckpointInfo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from progsae.sae import checkpoint

LABELS = {("matryoshka", "none"): "Matryoshka", ("topk", "mean_sq"): "TopK sorted by E[a²]",
          ("topk", "freq"): "TopK sorted by freq", ("topk", "none"): "TopK unsorted"}
STYLE = {"Matryoshka": ("C3", "o", "-"), "TopK sorted by E[a²]": ("C0", "s", "-"),
         "TopK sorted by freq": ("C2", "^", "--"), "TopK unsorted": ("C7", "x", ":")}


@dataclass
class Curve:
    """One (checkpoint, ordering): its metrics at every rung G, as metrics.json holds them."""

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


def load_all(paths: list[str]) -> tuple[list[CheckpointInfo], list[Curve]]:
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
            variants.append(Curve(label, arch, ordering, str(p), [r["g"] for r in o["rungs"]], o["rungs"],
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
