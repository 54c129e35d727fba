"""The one rung loop behind every stream, whatever its budget, and the builders of its messages.

    events(...)   Header, then one RungEvent per rung (the last carries the EndEvent), or a bare
                  EndEvent when the deadline stops the stream before a rung. Typed events, no wire
                  format: StreamDecode turns them into protobuf messages (`messages`), the HTTP API
                  into server-sent events.

The compute is the codec's: `SAE.progressive` for a plain G climb (proto revision 1/2, whose
streams stay byte for byte what they were), `budgets.climb` for a revision-3 budget (a per-token
target and/or a k' axis), where every rung computes only the tokens still refining.

Per-token rungs list the tokens they computed, with one payload row and one l0 per listed token,
and say how many are still refining after them; `mean_l0` and `fvu` count every token, a finished
one at its final rung. The end gives each token's final G (and k' under a k' cap) and whether it
met the target. On request (`top` > 0) each rung also carries, per computed token, the latents it
decoded that no earlier rung did, largest first: the dashboard's feature chips.

A text stream with fidelity (revision 5) climbs with `budgets.climb` too, scoring each rung with
progsae.server.fidelity (the layers after the SAE's, run on the rung's reconstruction): its rungs carry
each computed token's KL and top-1 (and predictions), its end each token's last KL, and a per-token KL
budget stops tokens through the same engine as the FVU one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from progsae.sae import budgets, metrics
from progsae.sae.codec import SAE, Codes
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import fidelity as fid
from .text import TextActivations
from .validate import StreamPlan

Latents = list[tuple[int, float]]
"""(latent index, value) pairs, largest value first."""


@dataclass(frozen=True)
class Header:
    """What a stream will do, sent before its first rung."""

    model_id: str
    tokens: int
    ladder: tuple[int, ...]
    k_ladder: tuple[int, ...]
    """Non-empty for a k' climb (then `ladder` is its one G)."""
    codes: Codes
    """The codes the stream decodes (CPU)."""
    encoded: bool
    """True when the stream encoded activations itself (StreamDecode then returns the codes)."""
    text: TextActivations | None = None
    """A text input's tokens (StreamDecode's header names them; the HTTP API sends them itself)."""
    spliced: list[bool] | None = None
    """Fidelity only: per token, whether its reconstruction is spliced into the language model."""
    fvu_variance: float | None = None
    """The per-token variance its FVU divides by (StreamPlan.fvu_variance); None = the batch's own."""


@dataclass(frozen=True)
class EndEvent:
    """Why and where a stream stopped."""

    reason: pb.StopReason
    rungs: int
    final_g: int
    final_k: int | None
    elapsed_ms: float
    final_fvu: float | None
    token_final_g: list[int] | None
    """Per-token budget only: each token's last G (0 when it got no rung)."""
    token_final_k: list[int] | None
    """Per-token budget under a k' cap only: each token's last k'."""
    token_met: list[bool] | None
    token_kl: list[float] | None = None
    """Fidelity only: each token's KL at its final rung (NaN when it got none)."""
    token_top1: list[bool] | None = None
    """Fidelity only: whether each token's top-1 prediction at its final rung is the clean one."""


@dataclass(frozen=True)
class RungEvent:
    """What one rung computed."""

    index: int
    g: int
    k: int | None
    tokens: Tensor
    """[A] rows of the batch this rung computed (ascending)."""
    listed: bool
    """True under a per-token budget: the rung lists its tokens and says how many still refine."""
    l0: Tensor
    """[A] codes decoded per computed token."""
    mean_l0: float
    payload: Tensor | None
    """[A, d_in] reconstruction or delta (the plan's payload kind), None for PAYLOAD_NONE."""
    fvu: float | None
    refining: int
    elapsed_ms: float
    fresh: list[Latents] | None
    """Per token of the batch, the latents this rung decoded that no earlier rung did (at most `top`;
    none for a token it did not compute); None unless asked."""
    end: EndEvent | None
    """Set on the stream's last rung."""
    fidelity: fid.RungFidelity | None = None
    """Fidelity only: what the rung did to the language model's predictions."""


Event = Header | RungEvent | EndEvent


def events(sae: SAE, model_id: str, plan: StreamPlan, codes: Codes, encoded: bool, cancelled: Callable[[], bool],
           t0: float, on_rung: Callable[[], None], top: int = 0, text: TextActivations | None = None,
           fidelity: fid.Fidelity | None = None) -> Generator[Event, None, str | None]:
    """The stream's events; returns the stop reason's name, or None when `cancelled` stopped it."""
    spliced = fidelity.spliced.tolist() if fidelity is not None else None
    yield Header(model_id, int(codes.indices.shape[0]), plan.ladder, plan.k_ladder, _cpu(codes), encoded, text,
                 spliced, plan.fvu_variance)
    steps = plan.steps or budgets.g_steps(plan.ladder)
    n = codes.indices.shape[0]
    per_token = plan.per_token
    x = plan.x.to(sae.W_dec.device) if plan.x is not None else None
    score = fidelity.score if fidelity is not None else None
    source = (budgets.climb(sae, codes, steps, x, plan.token_target_fvu, score, plan.token_target_kl)
              if plan.steps is not None else _progressive(sae, codes, plan.ladder))
    fvu = _FVU(plan.x, per_token, plan.fvu_variance)
    l0 = torch.zeros(n, dtype=torch.long)
    final = torch.full((n,), -1, dtype=torch.long)  # index of each token's last rung
    met = torch.zeros(n, dtype=torch.bool)
    seen = torch.zeros_like(codes.indices, dtype=torch.bool, device="cpu") if top > 0 else None
    cpu_codes = _cpu(codes) if top > 0 else None
    sent, last_fvu = 0, None
    for i, step in enumerate(steps):
        if cancelled():
            return None
        if plan.deadline_s is not None and time.perf_counter() - t0 >= plan.deadline_s:
            end = _end(pb.STOP_REASON_DEADLINE, steps, sent, last_fvu, t0, per_token, final, met, fidelity)
            yield end
            return convert.STOP_REASONS[end.reason]
        r = next(source)  # climb ends early only once every token is done, which stops us first
        on_rung()
        tokens, done = r.tokens.cpu(), r.done.cpu()
        l0[tokens] = r.l0.cpu()
        final[tokens] = i
        met[tokens[done]] = True
        refining = int(tokens.shape[0] - int(done.sum()))
        f = fvu.rung(tokens, r)
        payload = (r.recon if plan.payload == pb.PAYLOAD_RECONSTRUCTION else
                   (r.recon if i == 0 else r.delta) if plan.payload == pb.PAYLOAD_DELTA else None)  # 1st delta: b_dec
        fresh = _fresh(cpu_codes, seen, tokens, step, top) if seen is not None and cpu_codes is not None else None
        rung_fidelity = fidelity.rung(i == 0) if fidelity is not None else None
        sent, last_fvu = i + 1, f
        reason = None
        if plan.target_fvu is not None and f is not None and f <= plan.target_fvu:
            reason = pb.STOP_REASON_TARGET_FVU
        elif per_token and refining == 0:
            reason = (pb.STOP_REASON_TOKEN_TARGET_KL if plan.token_target_kl is not None
                      else pb.STOP_REASON_TOKEN_TARGET_FVU)
        elif i == len(steps) - 1:
            reason = (pb.STOP_REASON_MAX_K if plan.k_cut else
                      pb.STOP_REASON_MAX_GRANULARITY if plan.cut else pb.STOP_REASON_LADDER_DONE)
        elapsed = 1e3 * (time.perf_counter() - t0)
        end = None if reason is None else _end(reason, steps, sent, f, t0, per_token, final, met, fidelity)
        yield RungEvent(i, step.g, step.k, tokens, per_token, r.l0.cpu(), float(l0.double().mean()), payload, f,
                        refining, elapsed, fresh, end, rung_fidelity)
        if end is not None:
            return convert.STOP_REASONS[end.reason]
    raise AssertionError("the last rung sets a stop reason")


def _end(reason: pb.StopReason, steps: tuple[budgets.Step, ...], sent: int, last_fvu: float | None, t0: float,
         per_token: bool, final: Tensor, met: Tensor, fidelity: fid.Fidelity | None = None) -> EndEvent:
    last = steps[sent - 1] if sent else None
    token_g = token_k = token_met = None
    if per_token:
        idx = final.tolist()
        token_g = [steps[j].g if j >= 0 else 0 for j in idx]
        if any(s.k is not None for s in steps):
            token_k = [(steps[j].k or 0) if j >= 0 else 0 for j in idx]
        token_met = met.tolist()
    kl = top1 = None
    if fidelity is not None:
        kl, top1 = fidelity.token_kl.tolist(), fidelity.token_top1.tolist()
    return EndEvent(reason, sent, last.g if last else 0, last.k if last else None, 1e3 * (time.perf_counter() - t0),
                    last_fvu, token_g, token_k, token_met, kl, top1)


class _FVU:
    """A rung's FVU over the whole batch. A plain climb measures each rung's full reconstruction
    (metrics.fvu); a per-token climb keeps every token's last squared error, since a rung computes
    only the tokens still refining. Both divide by `variance` per token when given (a checkpoint's
    reference), else by the batch's own total variance."""

    def __init__(self, x: Tensor | None, per_token: bool, variance: float | None = None):
        self.x, self.per_token, self.variance = x, per_token, variance
        n = 0 if x is None else x.shape[0]
        self.sse = torch.zeros(n, dtype=torch.float64)
        self.tv = 0.0
        if x is not None and per_token:
            self.tv = n * variance if variance is not None else float(budgets.token_baseline(x).sum())

    def rung(self, tokens: Tensor, r: budgets.StepRung) -> float | None:
        if self.x is None:
            return None
        if self.per_token:
            assert r.sse is not None
            self.sse[tokens] = r.sse.cpu()
            f = float(self.sse.sum()) / self.tv if self.tv > 0 else float("inf")
        else:
            f = metrics.fvu(self.x, r.recon.cpu(), self.variance)
        return f if np.isfinite(f) else None


def _progressive(sae: SAE, codes: Codes, ladder: tuple[int, ...]) -> Iterator[budgets.StepRung]:
    """The codec's plain G climb (every code multiplied in once) as step rungs over every token."""
    n = codes.indices.shape[0]
    every = torch.arange(n, device=codes.indices.device)
    none_done = torch.zeros(n, dtype=torch.bool)
    for rung in sae.progressive(codes, ladder):
        assert rung.recon is not None
        yield budgets.StepRung(budgets.Step(rung.g, None), every, rung.l0, rung.delta, rung.recon, None, None,
                               none_done)


def _fresh(codes: Codes, seen: Tensor, rows: Tensor, step: budgets.Step, top: int) -> list[Latents]:
    """Per token, the latents decoded at this step that no earlier step decoded, by value (at most
    `top`; none for a token not in `rows`). `seen` ([N, w] bool) is updated in place."""
    sub = Codes(codes.indices[rows], codes.values[rows])
    sel = budgets.select(sub, step.g, step.k)
    new = sel & ~seen[rows]
    seen[rows] |= sel
    out: list[Latents] = [[] for _ in range(codes.indices.shape[0])]
    for j, n in enumerate(rows.tolist()):
        idx, val = sub.indices[j][new[j]], sub.values[j][new[j]]
        order = torch.argsort(-val, stable=True)[:top]
        out[n] = [(int(i), round(float(v), 5)) for i, v in zip(idx[order].tolist(), val[order].tolist(), strict=True)]
    return out


# --- protobuf ---------------------------------------------------------------------------------


def messages(stream: Generator[Event, None, str | None], plan: StreamPlan) -> Generator[
        pb.StreamDecodeResponse, None, str | None]:
    """StreamDecode's messages: the header rides on the first, the end on the last."""
    out = pb.StreamDecodeResponse()
    ev = None
    while True:
        try:
            ev = next(stream)
        except StopIteration as stop:
            return stop.value
        if isinstance(ev, Header):
            out.header.CopyFrom(header_message(ev, plan))
            continue
        if isinstance(ev, RungEvent):
            out.rung.CopyFrom(rung_message(ev, plan))
        end = ev.end if isinstance(ev, RungEvent) else ev
        if end is not None:
            out.end.CopyFrom(end_message(end))
        yield out
        out = pb.StreamDecodeResponse()


def header_message(h: Header, plan: StreamPlan) -> pb.StreamHeader:
    msg = pb.StreamHeader(model_id=h.model_id, ladder=h.ladder, payload=plan.payload)
    if h.k_ladder:
        msg.axis = pb.STREAM_AXIS_K
        msg.k_ladder.extend(h.k_ladder)
    if h.encoded:
        msg.codes.CopyFrom(convert.codes_from_arrays(h.codes.indices.numpy(), h.codes.values.numpy(),
                                                     packed=plan.packed_codes))
    msg.tokens = h.tokens
    if h.text is not None:
        t = h.text
        msg.token_ids.extend(t.token_ids)
        msg.token_strings.extend(t.tokens)
        msg.text_tokens, msg.language_model, msg.layer = t.text_tokens or len(t.token_ids), t.language_model, t.layer
    if h.spliced is not None:
        msg.spliced.extend(h.spliced)
    if h.fvu_variance is not None:
        msg.fvu_reference_variance = h.fvu_variance
    return msg


def rung_message(r: RungEvent, plan: StreamPlan) -> pb.Rung:
    msg = pb.Rung(index=r.index, g=r.g, k=r.k or 0, mean_l0=r.mean_l0)
    if plan.per_token_l0:
        msg.l0.extend(r.l0.tolist())
    if r.payload is not None:
        msg.tensor.CopyFrom(convert.from_numpy(r.payload.detach().cpu().numpy(), plan.out_dtype))
    if r.listed:
        msg.tokens.extend(r.tokens.tolist())
        msg.refining = r.refining
    if r.fvu is not None:
        msg.fvu = r.fvu
    msg.elapsed_ms = r.elapsed_ms
    if r.fidelity is not None:
        fid.fill_rung(msg, r.fidelity)
    return msg


def end_message(e: EndEvent) -> pb.StreamEnd:
    msg = pb.StreamEnd(stop_reason=e.reason, rungs=e.rungs, final_g=e.final_g, final_k=e.final_k or 0,
                       elapsed_ms=e.elapsed_ms)
    if e.final_fvu is not None:
        msg.final_fvu = e.final_fvu
    if e.token_final_g is not None:
        msg.token_final_g.extend(e.token_final_g)
    if e.token_final_k is not None:
        msg.token_final_k.extend(e.token_final_k)
    if e.token_met is not None:
        msg.token_met.extend(e.token_met)
    if e.token_kl is not None and e.token_top1 is not None:
        msg.token_kl.extend(e.token_kl)
        msg.token_top1.extend(e.token_top1)
    return msg


def _cpu(codes: Codes) -> Codes:
    return codes if codes.indices.device.type == "cpu" else Codes(codes.indices.cpu(), codes.values.cpu())
