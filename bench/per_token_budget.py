"""Per-token budgets (issue 12 item 1): a per-token target against the batch-wide target_fvu on
held-out activations, at equal per-token error: mean decoded L0 and bytes sent.

    .venv/bin/python bench/per_token_budget.py --checkpoint CKPT --activations ACTS \
        [--shard 1] [--tokens 8192] [--request 512] [--targets 0.5,0.3,0.2] [--ladder 256,...]

Every number comes from StreamDecode itself (CodecService.stream, the code every transport runs):
bytes are the serialized StreamDecodeResponse messages (protobuf bytes; no gRPC framing), L0 is the
last rung's mean_l0 (per-token: each token at its final G). Requests of `--request` tokens (the
mean of err_n's baseline is over one request), PAYLOAD_DELTA in float32, header codes packed.

For each per-token target t the batch-wide comparison is the stream a client would have to send
for the same per-token guarantee: target_fvu set to the FVU of the first rung at which at least
as many tokens have err_n <= t as the per-token stream met, or, where no rung gets there, of the
first rung with the most such tokens (found from a full stream of the same request, then sent as
a real target_fvu stream). A second row sends target_fvu = the per-token stream's own final batch
FVU (equal batch FVU), or the whole ladder when no rung reaches it.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import CodecService
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb


class Outcome(NamedTuple):
    """One StreamDecode call, measured."""

    bytes: int
    """Serialized size of every message of the stream."""
    tensor_bytes: int
    """Bytes of the rung tensors alone."""
    mean_l0: float
    """The last rung's mean L0."""
    rungs: int
    final_fvu: float
    met: int
    """Tokens with err_n <= t at their final reconstruction."""
    final_g: np.ndarray
    """[N] G each token was last decoded at."""


def load_heldout(acts: Path, shard: int, tokens: int, outlier_factor: float) -> tuple[np.ndarray, int]:
    """The first `tokens` rows of a shard that pass the trainer's outlier policy (norm <= factor x the
    shard's median norm; 0 keeps every row), and how many rows it dropped on the way."""
    manifest = json.loads((acts / "manifest.json").read_text())
    a = np.load(acts / manifest["shards"][shard]["acts"], mmap_mode="r")
    a = np.asarray(a[: 2 * tokens], dtype=np.float32)
    if outlier_factor > 0:
        norms = np.linalg.norm(a, axis=1)
        keep = norms <= outlier_factor * np.median(norms)
        dropped = int((~keep[: np.searchsorted(np.cumsum(keep), tokens) + 1]).sum())
        a = a[keep]
    else:
        dropped = 0
    return np.ascontiguousarray(a[:tokens]), dropped


def run(svc: CodecService, model, req: pb.StreamDecodeRequest, x: np.ndarray, t: float) -> Outcome:
    """Send one stream; reassemble each token's final reconstruction to count tokens within t."""
    msgs = list(svc.stream(model, req))
    recon = np.zeros_like(x)
    size = tensor = 0
    last = None
    for m in msgs:
        size += m.ByteSize()
        if m.HasField("rung"):
            last = m.rung
            rows = convert.to_numpy(m.rung.tensor)
            tensor += m.rung.tensor.ByteSize()
            idx = list(m.rung.tokens) if m.rung.HasField("refining") else slice(None)
            recon[idx] += rows  # DELTA rows: the first carries b_dec
    assert last is not None
    end = msgs[-1].end
    err = ((x - recon) ** 2).sum(1) / ((x - x.mean(0)) ** 2).sum(1)
    final_g = np.array(end.token_final_g) if len(end.token_final_g) else np.full(len(x), end.final_g)
    return Outcome(size, tensor, last.mean_l0, end.rungs, end.final_fvu, int((err <= t).sum()), final_g)


def request(x: np.ndarray, ladder: list[int], **budget) -> pb.StreamDecodeRequest:
    return pb.StreamDecodeRequest(activations=convert.from_numpy(x), ladder=ladder, payload=pb.PAYLOAD_DELTA,
                                  packed_codes=True, budget=pb.Budget(**budget))


def per_rung_met(svc: CodecService, model, x: np.ndarray, ladder: list[int], t: float) -> list[tuple[float, int]]:
    """(batch FVU, tokens with err_n <= t) at every rung of a full plain stream."""
    out, recon = [], np.zeros_like(x)
    base = ((x - x.mean(0)) ** 2).sum(1)
    for m in svc.stream(model, request(x, ladder)):
        recon += convert.to_numpy(m.rung.tensor)
        out.append((m.rung.fvu, int((((x - recon) ** 2).sum(1) / base <= t).sum())))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--activations", required=True, help="activation cache directory (held-out)")
    p.add_argument("--shard", type=int, default=1, help="cache shard to read (one the SAE never trained on)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--request", type=int, default=512, help="tokens per StreamDecode request")
    p.add_argument("--targets", default="0.5,0.3,0.2")
    p.add_argument("--ladder", default="", help="G ladder (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="drop tokens with norm > this x the median, as `progsae train` does (0: keep all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ck = Path(a.checkpoint).resolve()
    reg = Registry(RegistryConfig(root=str(ck.parent), models=(ck.name,)))
    model = reg.get(f"{ck.name}@none")
    ladder = [int(g) for g in a.ladder.split(",")] if a.ladder else list(model.ladder)
    x_all, dropped = load_heldout(Path(a.activations), a.shard, a.tokens, a.outlier_factor)
    batches = [x_all[i:i + a.request] for i in range(0, len(x_all) - a.request + 1, a.request)]
    n = sum(len(b) for b in batches)
    svc = CodecService()
    print(f"# {ck.name}: M={model.d_sae} k={model.meta.k} ladder={ladder}; {n} held-out tokens "
          f"(shard {a.shard}; outlier factor {a.outlier_factor:g} dropped {dropped}) in {len(batches)} requests of "
          f"{a.request}; {platform.machine()}, torch threads {a.threads}")
    print("| t | mode | mean final G | tokens with err_n <= t | batch FVU | mean decoded L0 | bytes/token "
          "| tensor bytes/token |")
    print("|---|---|---|---|---|---|---|---|")
    for t in [float(v) for v in a.targets.split(",")]:
        rows: dict[str, list[Outcome]] = {"per-token": [], "batch, equal guarantee": [], "batch, equal FVU": []}
        for x in batches:
            pt = run(svc, model, request(x, ladder, token_target_fvu=t), x, t)
            rows["per-token"].append(pt)
            curve = per_rung_met(svc, model, x, ladder, t)
            most = max(met for _, met in curve)
            j = next(i for i, (_, met) in enumerate(curve) if met >= min(pt.met, most))
            eq = run(svc, model, request(x, ladder, target_fvu=min(1.0, curve[j][0] * (1 + 1e-9))), x, t)
            rows["batch, equal guarantee"].append(eq)
            fv = run(svc, model, request(x, ladder, target_fvu=min(1.0, pt.final_fvu * (1 + 1e-9))), x, t)
            rows["batch, equal FVU"].append(fv)
        for mode, outs in rows.items():
            w = [len(b) for b in batches]
            l0 = np.average([o.mean_l0 for o in outs], weights=w)
            fvu = np.average([o.final_fvu for o in outs], weights=w)
            met = sum(o.met for o in outs)
            by = sum(o.bytes for o in outs) / n
            tb = sum(o.tensor_bytes for o in outs) / n
            g = np.concatenate([o.final_g for o in outs])
            print(f"| {t} | {mode} | {g.mean():.0f} | {met}/{n} ({met / n:.1%}) | {fvu:.4f} | {l0:.2f} | {by:,.0f} | "
                  f"{tb:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
