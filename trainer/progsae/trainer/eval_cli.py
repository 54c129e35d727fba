"""`progsae eval` and `progsae report`: argument parsing only; the work lives in
trainer/evaluate.py, trainer/ce_loss.py and trainer/report.py (imported when run)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="every metric (FVU, L0, dead, density, RSA, CE/KL, power law) at every G")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--activations", required=True, help="held-out activation cache directory")
    p.add_argument("--ordering", default="all", choices=["none", "mean_sq", "freq", "all"],
                   help="progressive order to evaluate (TopK); 'all' = none + mean_sq + freq. "
                        "Matryoshka checkpoints are evaluated in their trained order")
    p.add_argument("--ce", action="store_true", help="also splice x_hat_G into the model: CE recovered, KL")
    p.add_argument("--ce-contexts", type=int, default=32, help="held-out contexts for the CE/KL evaluation")
    p.add_argument("--ce-batch", type=int, default=4, help="contexts per forward pass")
    p.add_argument("--rsa-tokens", type=int, default=2000, help="held-out tokens for RSA (>= 1000)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per encode batch")
    p.add_argument("--outlier-factor", type=float, default=None,
                   help="exclude rows with norm > factor x median (default: the factor the checkpoint "
                        "was trained with, else 10); 0 disables the policy")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N held-out rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the RSA sample")
    p.add_argument("--no-write", action="store_true", help="print only; do not write metrics.json")
    p.set_defaults(func=run_eval)

    r = sub.add_parser("report", help="report.md + PNG figures from evaluated checkpoints")
    r.add_argument("checkpoints", nargs="+", help="checkpoint directories with metrics.json")
    r.add_argument("--out", default="report", help="output directory")
    r.set_defaults(func=run_report)


def run_eval(args: argparse.Namespace) -> int:
    from progsae.cli import UserError

    if args.rsa_tokens < 3 or args.ce_contexts < 1 or args.batch_size < 1 or args.ce_batch < 1:
        raise UserError("--rsa-tokens must be >= 3; --ce-contexts, --ce-batch, --batch-size >= 1")
    if args.rsa_tokens < 1000:
        print(f"warning: RSA over {args.rsa_tokens} tokens; SPEC §5 asks for N >= 1000", flush=True)
    from progsae.trainer.activations import CacheError
    from progsae.trainer.evaluate import EvalConfig, evaluate, format_table, save_result

    cfg = EvalConfig(ordering=args.ordering, batch_size=args.batch_size, outlier_factor=args.outlier_factor,
                     rsa_tokens=args.rsa_tokens, ce=args.ce, ce_contexts=args.ce_contexts, ce_batch=args.ce_batch,
                     max_tokens=args.max_tokens, seed=args.seed)
    try:
        result = evaluate(args.checkpoint, args.activations, cfg)
    except CacheError as e:
        raise UserError(str(e)) from None
    print(format_table(result))
    if not args.no_write:
        save_result(result, args.checkpoint)
        print(f"wrote {args.checkpoint}/metrics.json")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from progsae.trainer.report import write_report

    f = write_report(args.checkpoints, args.out)
    print(f"wrote {f} and {len(list(f.parent.glob('*.png')))} figures")
    return 0
