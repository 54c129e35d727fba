"""Budgets over a progressive stream: decode at (G, k'), and a stream of (G, k') steps in which
each token stops at the first step that reconstructs it well enough (SPEC §3).

Pure functions over an `SAE` and its `Codes`, like progsae.sae.codec; no Ray, no gRPC, no I/O.

  * Decode at (G, k'): of a token's active codes with index < G, only the k' largest by value
    (codec.value_rank, the one ranking the trainer's codec.topk_prefix uses too; ties: the
    earlier entry of the token's codes, as a stable sort; codes that travelled on the wire are
    sorted by index, so there the lower index wins). k' at least the token's number of codes
    is nested truncation at G.
  * A step stream climbs a sequence of (G, k') steps: up a G ladder (k' fixed, or no cap) or up a
    k' ladder at one G. Each step multiplies in only the codes whose selection changed since the
    previous step, signed: climbing k', or G with no cap, only adds codes; climbing G under a k'
    cap can also drop some (a larger prefix can push a code out of the k' largest).
  * Per-token target: err_n = ||x_n - x_hat_n||^2 / ||x_n - mean(x)||^2 with the mean over the
    batch's tokens. A token is done at the first step where err_n <= target: later steps compute
    nothing for it, and no step ever changes a code (codes are only read).
  * A per-token score from outside (`Score`): the caller measures each step's reconstruction of the
    tokens still refining by whatever it likes (the server: the language model's next-token KL when
    the reconstruction is spliced in, progsae.server.fidelity), and a score target stops a token at
    the first step where its score <= that target, exactly as the error target does. With both
    targets a token is done at the first step that meets both. The core knows no language model:
    it only compares the numbers the callable returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .codec import SAE, Codes, check_ladder, sparse_sum, value_rank


class Step(NamedTuple):
    """One point of a (G, k') stream."""

    g: int
    """Granularity: codes with index < g."""
    k: int | None
    """k': keep each token's k' largest of those; None = no cap (nested truncation at g)."""


class StepRung(NamedTuple):
    """What one step computed, for the tokens still refining before it."""

    step: Step
    tokens: Tensor
    """[A] int64 rows of the batch this step computed (ascending): the tokens not done before it."""
    l0: Tensor
    """[A] codes decoded at this step, per listed token."""
    delta: Tensor
    """[A, d_in] raw-scale change since each listed token's previous step (the first step's
    excludes b_dec, as codec.Rung.delta does)."""
    recon: Tensor
    """[A, d_in] raw-scale reconstruction of the listed tokens at this step."""
    sse: Tensor | None
    """[A] float64 ||x_n - x_hat_n||^2 (None without activations)."""
    err: Tensor | None
    """[A] float64 per-token relative error err_n (None without activations)."""
    done: Tensor
    """[A] bool: the token met every per-token target here and stops (all False without one)."""
    score: Tensor | None = None
    """[A] float64 the `Score` of each listed token's reconstruction (None without a score)."""


Score = Callable[[Tensor, Tensor], Tensor]
"""score(tokens [A] int64 rows of the batch, recon [A, d_in] raw-scale reconstructions at a step) ->
[A] float64 per-token score, lower is better. Called once per step, with the tokens still refining."""


def select(codes: Codes, g: int, k: int | None = None) -> Tensor:
    """[N, w] bool: the codes decoded at (g, k') (at g alone when k is None)."""
    if k is None:
        return (codes.indices < g) & (codes.values != 0)
    return value_rank(codes, g) < min(k, codes.indices.shape[1])


def decode_at(sae: SAE, codes: Codes, g: int, k: int | None = None) -> Tensor:
    """Raw-scale reconstruction [N, d_in] at (G, k'): b_dec plus each token's k' largest codes
    with index < g (all of them when k is None)."""
    check_ladder((g,), sae.d_sae)
    _check_k(k)
    return _unscale(sae, sparse_sum(sae.W_dec, codes, select(codes, g, k)) + sae.b_dec)


def k_ladder(k: int) -> tuple[int, ...]:
    """Default k' ladder: 1, 2, 4, ... below k, then k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = [1 << i for i in range(k.bit_length()) if (1 << i) < k]
    return (*out, k)


def g_steps(ladder: Sequence[int], k: int | None = None) -> tuple[Step, ...]:
    """Climb G up `ladder`, every step at k' = k."""
    return tuple(Step(int(g), k) for g in ladder)


def k_steps(g: int, ladder: Sequence[int]) -> tuple[Step, ...]:
    """Climb k' up `ladder` at one G."""
    return tuple(Step(g, int(k)) for k in ladder)


def token_errors(x: Tensor, recon: Tensor, baseline: Tensor) -> tuple[Tensor, Tensor]:
    """(sse, err) per token, float64: sse_n = ||x_n - recon_n||^2 and err_n = sse_n / baseline_n,
    where baseline_n = ||x_n - mean(x)||^2. A token at the mean (baseline 0) has err 0 when it is
    reconstructed exactly, else inf."""
    sse = (x.double() - recon.double()).square().sum(-1)
    exact = torch.where(sse == 0, torch.zeros_like(sse), torch.full_like(sse, float("inf")))
    return sse, torch.where(baseline > 0, sse / baseline.clamp_min(torch.finfo(sse.dtype).tiny), exact)


def token_baseline(x: Tensor) -> Tensor:
    """[N] float64 ||x_n - mean(x)||^2, the mean over the N tokens (SPEC §5)."""
    x64 = x.double()
    return (x64 - x64.mean(0)).square().sum(-1)


def climb(sae: SAE, codes: Codes, steps: Sequence[Step], x: Tensor | None = None,
          target: float | None = None, score: Score | None = None,
          score_target: float | None = None) -> Iterator[StepRung]:
    """Yield one StepRung per step. With a per-token `target` (needs `x`) and/or a `score_target`
    (needs `score`), a token done at a step (every target set met) is left out of every later one;
    the stream ends early when every token is done. `score` alone only measures.

    Work per step is proportional to the tokens still refining: their codes are gathered, their
    changed codes multiplied in, their error measured. A token's last reconstruction is
    decode_at(sae, its codes, its last step's g, k) up to float rounding.
    """
    if not steps:
        raise ValueError("a step stream needs at least one step")
    for s in steps:
        check_ladder((s.g,), sae.d_sae)
        _check_k(s.k)
    if target is not None and x is None:
        raise ValueError("a per-token target needs the activations")
    if score_target is not None and score is None:
        raise ValueError("a score target needs a score")
    per_token = target is not None or score_target is not None
    n = codes.indices.shape[0]
    device = codes.indices.device
    active = torch.arange(n, device=device)
    prev = torch.zeros_like(codes.indices, dtype=torch.bool)
    acc = sae.b_dec.expand(n, -1)  # normalised-scale reconstruction of the active tokens
    baseline = token_baseline(x) if x is not None else None
    for step in steps:
        sub = Codes(codes.indices[active], codes.values[active]) if active.shape[0] < n else codes
        sel = select(sub, step.g, step.k)
        changed = sel ^ prev
        signed = Codes(sub.indices, torch.where(sel, sub.values, -sub.values))
        delta = sparse_sum(sae.W_dec, signed, changed)
        acc = acc + delta
        recon = _unscale(sae, acc)
        sse = err = scored = None
        done = torch.full((active.shape[0],), per_token, dtype=torch.bool, device=device)
        if x is not None and baseline is not None:
            rows = x[active] if active.shape[0] < n else x
            sse, err = token_errors(rows.to(recon.device), recon, baseline[active])
            if target is not None:
                done &= err <= target
        if score is not None:
            scored = score(active, recon).to(device=device, dtype=torch.float64)
            if score_target is not None:
                done &= scored <= score_target
        yield StepRung(step, active, sel.sum(-1), _unscale(sae, delta), recon, sse, err, done, scored)
        if bool(done.any()):
            keep = ~done
            active, acc, prev = active[keep], acc[keep], sel[keep]
            if active.shape[0] == 0:
                return
        else:
            prev = sel


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k' must be >= 1, got {k}")


def _unscale(sae: SAE, y: Tensor) -> Tensor:
    return y / sae.scale if sae.scale != 1.0 else y
