"""`progsae demo`: the main job end to end on the embedded defaults."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded defaults")
    p.add_argument("--out", default="demo_out", help="working directory for artifacts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from progsae.sae import checkpoint, metrics
    from progsae.sae import ordering as ordmod
    from progsae.sae.codec import SAE

    out = Path(args.out)
    torch.manual_seed(0)
    d, m, k = 64, 1024, 16
    # Data with a power-law spectrum of sparse causes, so an ordering has something to find.
    atoms = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    freq = 0.05 * torch.arange(1, m + 1).float() ** -0.7
    def sample(n: int) -> torch.Tensor:
        on = torch.rand(n, m) < freq
        return (on * torch.rand(n, m) * 3) @ atoms + 0.01 * torch.randn(n, d)
    x_train, x_test = sample(8192), sample(2048)
    sae = SAE(W_enc=atoms.T.clone(), W_dec=atoms.clone(), b_enc=torch.zeros(m), b_dec=x_train.mean(0), k=k)
    acc = ordmod.ImportanceAccumulator(sae)
    acc.update(sae.encode(x_train))
    orderings = {c: acc.ordering(c) for c in ordmod.CRITERIA}
    meta = checkpoint.CheckpointMeta(architecture="topk", d_in=d, d_sae=m, k=k, granularities=(64, 128, 256, 512, 1024),
                                     model="synthetic", extra={"demo": True})
    path = checkpoint.save(out / "ckpt" / "synthetic-topk", sae, meta, orderings)
    ck = checkpoint.load(path, ordering="mean_sq")
    print(f"saved {path}; streaming {len(ck.ladder)} rungs of {x_test.shape[0]} tokens (sorted by E[a^2]):")
    codes = ck.sae.encode(x_test)
    t0 = time.perf_counter()
    for rung in ck.sae.progressive(codes, ck.ladder):
        fvu = metrics.fvu(x_test, rung.recon)
        print(f"  G={rung.g:5d}  L0={rung.l0.float().mean():5.1f}  FVU={fvu:.4f}  "
              f"t={1e3 * (time.perf_counter() - t0):6.1f} ms")
    return 0
