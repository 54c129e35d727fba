"""Admission before damage: a request whose memory would not fit the replica is refused before it runs.

A request that exhausts its replica's memory kills the replica (the OOM killer, or Ray's memory
monitor), fails every other call on it, and is retried elsewhere to do the same. Each call is
therefore priced before anything is allocated, from its shape and the model's card alone (no
weights are read), and refused with RESOURCE_EXHAUSTED, naming the numbers, when its working set
plus the model's weights (when the replica does not hold them yet) exceed the replica's budget:

    input       N x d_in x 4            the activations, as float32
    encode      min(N, chunk) x M x 4 x 2   pre-activations and their top-k (codec.ENCODE_CHUNK_BYTES)
    codes       N x k x 12              indices (int64) and values (float32)
    decode      N x d_in x 4 x 4        running sum, rung, delta and the response tensor
    weights     (2 x d_in x M + M + d_in) x 4   W_enc, W_dec, b_enc, b_dec, when not loaded

The budget is `AppConfig.replica_memory_bytes`, or by default half the memory the replica's
process can use when it starts (the cgroup limit or MemAvailable, whichever is less) divided by
the compute threads that may run requests at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from progsae.sae.codec import ENCODE_CHUNK_BYTES

from .errors import exhausted

FLOAT = 4
CODE_BYTES = 12


@dataclass(frozen=True)
class Shape:
    """What a request's memory depends on."""

    tokens: int
    d_in: int
    d_sae: int
    k: int
    encodes: bool
    """True when the request runs the encoder (activations in), False for codes in."""


def working_bytes(s: Shape) -> int:
    """Bytes a request allocates while it runs (the table above, weights excluded)."""
    n = s.tokens
    total = n * s.k * CODE_BYTES + n * s.d_in * FLOAT * 4
    if s.encodes:
        rows = max(1, min(n, ENCODE_CHUNK_BYTES // (s.d_sae * FLOAT)))
        total += n * s.d_in * FLOAT + rows * s.d_sae * FLOAT * 2
    return total


def weight_bytes(d_in: int, d_sae: int) -> int:
    return (2 * d_in * d_sae + d_sae + d_in) * FLOAT


def available_bytes() -> int:
    """Memory this process may use: its cgroup's limit (v2 or v1) or the machine's MemAvailable, whichever
    is less."""
    limits = []
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    if not limits:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(limits)


def default_budget(compute_threads: int) -> int:
    return available_bytes() // 2 // max(1, compute_threads)


class Admission:
    """Prices calls against one replica's budget (bytes); 0 = no budget (admit everything)."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes

    def check(self, what: str, model_id: str, s: Shape, loaded: bool) -> None:
        """RESOURCE_EXHAUSTED, with the numbers, when the call would not fit the budget."""
        if self.budget <= 0:
            return
        work = working_bytes(s)
        load = 0 if loaded else weight_bytes(s.d_in, s.d_sae)
        if work + load > self.budget:
            loading = f" plus {_mib(load)} to load its weights" if load else ""
            raise exhausted(
                f"{what} of {s.tokens} tokens on model {model_id} (d_in={s.d_in}, M={s.d_sae}, k={s.k}) needs about "
                f"{_mib(work)} of working memory{loading}; this replica admits {_mib(self.budget)} per call "
                "(replica_memory_bytes): send fewer tokens per call")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
