"""The messages of a stream under a revision-3 budget: a per-token target and/or a k' axis.

`CodecService.stream` hands a plan with `steps` here; a plan without them never reaches this
module, so a stream without a revision-3 budget stays byte for byte what it was. The compute is
`progsae.sae.budgets.climb`: every rung computes only the tokens still refining.

Per-token rungs list the tokens they computed (`Rung.tokens`) with one tensor row, and one l0,
per listed token, and say how many are still refining after them; `mean_l0` and `fvu` count
every token, a finished one at its final rung. The end gives each token's final G (and k'
under a k' cap) and whether it met the target.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import numpy as np
import torch

from progsae.sae import budgets
from progsae.sae.codec import Codes
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from .registry import ServedModel
from .validate import StreamPlan


def messages(model: ServedModel, plan: StreamPlan, codes: Codes, first: pb.StreamDecodeResponse,
             cancelled: Callable[[], bool], t0: float,
             on_rung: Callable[[], None]) -> Generator[pb.StreamDecodeResponse, None, str | None]:
    """One message per rung, the header riding on `first`, the end on the last; returns the stop
    reason's name, or None when cancelled."""
    steps = plan.steps
    assert steps is not None, "a plain G climb takes the revision-2 path"
    n = codes.indices.shape[0]
    per_token = plan.token_target_fvu is not None
    x = plan.x.to(model.device) if plan.x is not None else None
    climbing = budgets.climb(model.sae, codes, steps, x, plan.token_target_fvu)
    l0 = torch.zeros(n, dtype=torch.long)
    sse = torch.zeros(n, dtype=torch.float64)
    tv = float(budgets.token_baseline(plan.x).sum()) if plan.x is not None else 0.0
    final = torch.full((n,), -1, dtype=torch.long)  # index of each token's last rung
    met = torch.zeros(n, dtype=torch.bool)
    out, reason, sent, last_fvu = first, None, 0, None
    for i in range(len(steps)):
        if cancelled():
            return None
        if plan.deadline_s is not None and time.perf_counter() - t0 >= plan.deadline_s:
            reason = pb.STOP_REASON_DEADLINE
            break
        r = next(climbing)  # climb ends early only once every token is done, which stops us first
        on_rung()
        tokens, done = r.tokens.cpu(), r.done.cpu()
        l0[tokens] = r.l0.cpu()
        final[tokens] = i
        met[tokens[done]] = True
        refining = int(tokens.shape[0] - int(done.sum()))
        msg = pb.Rung(index=i, g=r.step.g, k=r.step.k or 0, mean_l0=float(l0.double().mean()))
        if plan.per_token_l0:
            msg.l0.extend(r.l0.tolist())
        if plan.payload == pb.PAYLOAD_RECONSTRUCTION:
            msg.tensor.CopyFrom(convert.from_numpy(_np(r.recon), plan.out_dtype))
        elif plan.payload == pb.PAYLOAD_DELTA:  # the first delta carries b_dec
            msg.tensor.CopyFrom(convert.from_numpy(_np(r.recon if i == 0 else r.delta), plan.out_dtype))
        if per_token:
            msg.tokens.extend(tokens.tolist())
            msg.refining = refining
        if r.sse is not None:
            sse[tokens] = r.sse.cpu()
            f = float(sse.sum()) / tv if tv > 0 else float("inf")
            if np.isfinite(f):
                msg.fvu = f
        msg.elapsed_ms = 1e3 * (time.perf_counter() - t0)
        out.rung.CopyFrom(msg)
        sent = i + 1
        last_fvu = msg.fvu if msg.HasField("fvu") else None
        if plan.target_fvu is not None and last_fvu is not None and last_fvu <= plan.target_fvu:
            reason = pb.STOP_REASON_TARGET_FVU
        elif per_token and refining == 0:
            reason = pb.STOP_REASON_TOKEN_TARGET_FVU
        elif i == len(steps) - 1:
            reason = (pb.STOP_REASON_MAX_K if plan.k_cut else
                      pb.STOP_REASON_MAX_GRANULARITY if plan.cut else pb.STOP_REASON_LADDER_DONE)
        if reason is not None:
            break
        yield out
        out = pb.StreamDecodeResponse()
    assert reason is not None  # the last rung sets one
    last = steps[sent - 1] if sent else None
    end = pb.StreamEnd(stop_reason=reason, rungs=sent, final_g=last.g if last else 0,
                       final_k=(last.k or 0) if last else 0, elapsed_ms=1e3 * (time.perf_counter() - t0))
    if last_fvu is not None:
        end.final_fvu = last_fvu
    if per_token:
        idx = final.tolist()
        end.token_final_g.extend(steps[j].g if j >= 0 else 0 for j in idx)
        if any(s.k is not None for s in steps):
            end.token_final_k.extend((steps[j].k or 0) if j >= 0 else 0 for j in idx)
        end.token_met.extend(met.tolist())
    out.end.CopyFrom(end)
    yield out
    return convert.STOP_REASONS[reason]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
