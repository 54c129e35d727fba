"""GPU end-to-end check (issue 11): the pipeline on CUDA at real sizes, checked against CPU float64.

    .venv/bin/python bench/device_check.py                       # CUDA: d_in 2304, M 16384 and 65536
    .venv/bin/python bench/device_check.py --tiny                # CPU smoke of the same code path
    .venv/bin/python bench/device_check.py --d-sae 16384 --train-tokens 2000000 --dtype tf32

Per dictionary size M, on the chosen device (default auto; without CUDA it says so and runs the
tiny CPU smoke instead, exit 0 when its checks pass):

  1. harvest: a synthetic activation cache (sparse non-negative codes over random unit
     directions at d_in 2304, the width of Gemma-2-2B's residual stream: no model of that
     width ships here) written through the trainer's own CacheWriter;
  2. train: `progsae.trainer.train.train(device=...)` on it, tokens/s from the checkpoint;
  3. order: `compute_orderings` (mean_sq) on the device, written to the checkpoint;
  4. encode: the ordered checkpoint loaded onto the device, tokens/s of `SAE.encode`;
  5. stream: latency of the first rung and of all rungs of `SAE.progressive` (the codec's
     stream, no network) for a 1-token and a 128-token request;
  6. check: a slice re-encoded on the CPU in float64: per token the device's top-k index set
     must equal float64's except where float64's k-th and (k+1)-th pre-activations are closer
     than the device's float32 rounding can resolve (reported), and reconstructions agree to
     `--recon-rtol` relative to the activation norm.

Prints one table; exits 1 when a check fails. Synchronises CUDA around every timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from progsae.sae import checkpoint
from progsae.sae.codec import SAE, default_ladder
from progsae.sae.devices import resolve_device
from progsae.trainer.data.activations import ActivationCache, CacheWriter, Manifest
from progsae.trainer.order import OrderConfig, compute_orderings
from progsae.trainer.training.config import TrainConfig
from progsae.trainer.training.train import train


@dataclass
class Sizes:
    d_in: int
    d_sae: int
    k: int
    cache_tokens: int
    train_tokens: int
    batch: int
    encode_tokens: int
    check_tokens: int


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of `repeats` calls after one warm-up, synchronised."""
    fn()
    sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def synthetic_cache(path: Path, s: Sizes, dev: torch.device, seed: int = 0) -> Path:
    """Tokens x = 3 + codes @ dirs: 4 * d_in unit directions, ~2% active, exponential sizes."""
    g = torch.Generator(device=dev).manual_seed(seed)
    n_dirs = 4 * s.d_in
    dirs = torch.randn(n_dirs, s.d_in, generator=g, device=dev)
    dirs /= dirs.norm(dim=1, keepdim=True)
    w = CacheWriter(path, Manifest(model="synthetic", layer=0, d_model=s.d_in, corpus=["synthetic"],
                                   split="train", context=129, target_tokens=s.cache_tokens))
    shard = 16384
    for start in range(0, s.cache_tokens, shard):
        n = min(shard, s.cache_tokens - start)
        on = torch.rand(n, n_dirs, generator=g, device=dev) < 0.02
        codes = torch.empty(n, n_dirs, device=dev).exponential_(generator=g) * on
        w.add_shard((3.0 + codes @ dirs).cpu().numpy().astype(np.float32))
    w.finish()
    return path


def check_against_float64(sae: SAE, dev: torch.device, x: torch.Tensor, recon_rtol: float) -> dict[str, float]:
    """Device float32 encode/decode of x vs CPU float64; see the module docstring."""
    got = sae.to(dev).encode(x.to(dev))
    recon = sae.to(dev).decode(got).cpu().double()
    ref_sae = sae.to("cpu", torch.float64)
    x64 = x.double()
    want = ref_sae.encode(x64)
    pre = ref_sae.pre_acts(x64)
    top = pre.topk(sae.k + 1, dim=-1).values
    gap = (top[:, sae.k - 1] - top[:, sae.k]).abs()
    # float32 rounding of a d_in-long dot product: ~ sqrt(d_in) * eps32 * |x||w| per entry
    resolvable = gap > 8 * np.sqrt(sae.d_in) * 1.2e-7 * x64.norm(dim=1) * ref_sae.W_enc.norm(dim=0).max()
    same = torch.tensor([set(a) == set(b) for a, b in zip(got.indices.cpu().tolist(), want.indices.tolist(),
                                                           strict=True)])
    bad = int((~same & resolvable).sum())
    # reconstructions of the tokens whose codes agree (a near tie swaps a latent, by design)
    err = (recon - ref_sae.decode(want)).norm(dim=1) / x64.norm(dim=1)
    rel = float(err[same].max()) if bool(same.any()) else float("inf")
    return {"tokens": float(x.shape[0]), "same_codes": float(same.float().mean()), "mismatch_resolvable": float(bad),
            "near_ties": float((~resolvable).sum()), "recon_max_rel": rel, "ok": float(bad == 0 and rel <= recon_rtol)}


def run_size(s: Sizes, dev: torch.device, work: Path, dtype: str, recon_rtol: float) -> dict[str, float]:
    row: dict[str, float] = {}
    t0 = time.perf_counter()
    cache = synthetic_cache(work / f"acts-{s.d_sae}", s, dev)
    row["harvest_s"] = time.perf_counter() - t0
    cfg = TrainConfig(arch="topk", d_sae=s.d_sae, k=s.k, tokens=s.train_tokens, batch_size=s.batch,
                      init_samples=min(65536, s.cache_tokens), checkpoint_every=0, log_every=50, dtype=dtype)
    ck = train(cfg, cache, work / f"sae-{s.d_sae}", progress=False, device=str(dev))
    meta = checkpoint.load_meta(ck)
    row["train_tok_s"] = float(meta.extra["tokens_per_s"])
    t0 = time.perf_counter()
    orderings = compute_orderings(ck, cache, OrderConfig(by=("mean_sq",), device=str(dev), progress=False))
    checkpoint.write_orderings(ck, orderings)
    row["order_s"] = time.perf_counter() - t0
    sae = checkpoint.load(ck, ordering="mean_sq", device=dev).sae
    acts = ActivationCache(cache)
    x = acts.gather(np.arange(min(s.encode_tokens, len(acts))))
    xd = x.to(dev)
    row["encode_tok_s"] = xd.shape[0] / timed(dev, lambda: sae.encode(xd))
    ladder = default_ladder(s.d_sae)
    for n in (1, 128):
        codes = sae.encode(xd[:n])
        row[f"stream{n}_first_ms"] = 1e3 * timed(dev, lambda c=codes: next(iter(sae.progressive(c, ladder))).recon)
        row[f"stream{n}_all_ms"] = 1e3 * timed(dev, lambda c=codes: [r.recon for r in sae.progressive(c, ladder)])
    chk = check_against_float64(sae.to("cpu"), dev, x[: s.check_tokens], recon_rtol)
    row.update({f"check_{k}": v for k, v in chk.items()})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU smoke; also what runs without CUDA)")
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--cache-tokens", type=int, default=262_144)
    ap.add_argument("--train-tokens", type=int, default=1_048_576)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--encode-tokens", type=int, default=16384)
    ap.add_argument("--check-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "tf32", "bfloat16"], help="training precision")
    ap.add_argument("--recon-rtol", type=float, default=1e-4)
    ap.add_argument("--work", help="directory for the caches and checkpoints (default: a temporary one)")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    tiny = args.tiny
    if dev.type != "cuda" and not tiny:
        print(f"no CUDA device (device {args.device!r} resolved to {dev}): the GPU check was NOT run; "
              "running the tiny CPU smoke of the same code path instead")
        tiny = True
    if tiny:
        sizes = [Sizes(d_in=32, d_sae=m, k=8, cache_tokens=4096, train_tokens=4096, batch=256, encode_tokens=1024,
                       check_tokens=128) for m in (128, 256)]
    else:
        sizes = [Sizes(args.d_in, m, args.k, args.cache_tokens, args.train_tokens, args.batch, args.encode_tokens,
                       args.check_tokens) for m in args.d_sae]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {dev} ({name}), torch {torch.__version__}, training dtype {args.dtype}")
    ok = True
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        print("| d_in | M | k | train tok/s | encode tok/s | stream 1 tok: first / all rungs ms "
              "| stream 128 tok: first / all ms | codes = f64 | near ties | recon max rel | check |")
        print("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|")
        for s in sizes:
            r = run_size(s, dev, Path(work), args.dtype, args.recon_rtol)
            ok &= bool(r["check_ok"])
            print(f"| {s.d_in} | {s.d_sae} | {s.k} | {r['train_tok_s']:,.0f} | {r['encode_tok_s']:,.0f} "
                  f"| {r['stream1_first_ms']:.2f} / {r['stream1_all_ms']:.2f} "
                  f"| {r['stream128_first_ms']:.2f} / {r['stream128_all_ms']:.2f} "
                  f"| {r['check_same_codes']:.4f} | {r['check_near_ties']:.0f} | {r['check_recon_max_rel']:.2e} "
                  f"| {'ok' if r['check_ok'] else 'FAILED'} |", flush=True)
    print("all checks passed" if ok else "a check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
