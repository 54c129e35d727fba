"""`progsae train` command line (registration is import-light; the work lives in train.py)."""

from __future__ import annotations

import argparse


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a TopK or Matryoshka SAE on an activation cache (resumes after interruption)",
        description="Train a TopK or Matryoshka SAE. Rerun the same command after an interruption to resume.",
    )
    p.add_argument("--activations", required=True, help="activation cache directory (progsae harvest)")
    p.add_argument("--arch", choices=("matryoshka", "topk"), default="matryoshka")
    p.add_argument("--d-sae", type=int, default=4096, help="latents M (default 4096)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--granularities", type=_ints, default=(),
                   help="nested ladder G_1<...<G_n=d_sae, e.g. 256,512,1024,2048,4096 (default: d_sae/16..d_sae)")
    p.add_argument("--group-weights", type=_floats, default=(),
                   help="Matryoshka loss weight per granularity, normalised to sum 1 (default equal)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tokens", type=int, default=0, help="training tokens (default: one epoch of the cache)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=0.0, help="Adam lr (default 2e-4/sqrt(d_sae/2^14))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable states")
    p.add_argument("--log-every", type=int, default=10, help="steps between jsonl log lines")
    p.add_argument("--dead-tokens", type=int, default=0,
                   help="tokens without firing before a latent is dead (default min(10M, budget/10))")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="drop tokens with norm > factor x median norm; 0 keeps all (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus progress gauges on this port")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):  # -> TrainConfig
    from .config import TrainConfig

    return TrainConfig(
        arch=args.arch, d_sae=args.d_sae, k=args.k, granularities=args.granularities,
        group_weights=args.group_weights, tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        dead_tokens=args.dead_tokens, outlier_factor=args.outlier_factor or None,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()  # before importing torch-heavy code or touching the disk
    import torch

    from .train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = train(cfg, args.activations, args.out, progress=not args.no_progress, metrics_port=args.metrics_port)
    print(f"wrote {out}")
    return 0
