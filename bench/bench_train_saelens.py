"""Training tokens/s: progsae vs SAELens at equal config, interleaved in one process.

Needs sae-lens importable next to progsae, e.g. a side venv that sees the project's:

    python -m venv /tmp/sl-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/sl-venv/lib/python3.11/site-packages/main.pth
    cp .venv/lib/python3.11/site-packages/__editable__.progsae-*.pth \
       /tmp/sl-venv/lib/python3.11/site-packages/zz-progsae.pth
    /tmp/sl-venv/bin/pip install sae-lens
    /tmp/sl-venv/bin/python bench/bench_train_saelens.py --threads 1

A SAELens step replicates SAETrainer._train_step: training_forward_pass (TopK, AuxK),
backward, clip_grad_norm_, Adam step, zero_grad, firing bookkeeping. Ours is
losses.optimizer_step plus the DeadTracker update. No dead latents on either side
(AuxK inactive), float32, same synthetic batches. SAELens' `use_sparse_activations=True`
is not benchmarked: its backward fails on CPU (sae-lens 6.54.12, torch 2.13: "Could not run
'aten::view' with arguments from the 'SparseCPU' backend").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import synthetic  # noqa: E402

from progsae.trainer.training.dead_latents import DeadTracker  # noqa: E402
from progsae.trainer.training.losses import TrainableSAE, optimizer_step  # noqa: E402


def ours(args: argparse.Namespace, ladder: tuple[int, ...]) -> Callable[[torch.Tensor], None]:
    sae = TrainableSAE(args.d_in, args.d_sae, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    w = torch.full((len(ladder),), 1 / len(ladder))
    tracker = DeadTracker(args.d_sae, 10_000_000)

    def step(x: torch.Tensor) -> None:
        o = optimizer_step(sae, opt, x, args.k, ladder, w, tracker.dead_ids(), args.d_in // 2)
        tracker.update(o.sel.indices, o.sel.values, x.shape[0])

    return step


def saelens(args: argparse.Namespace, sparse: bool) -> Callable[[torch.Tensor], None]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu",
                                use_sparse_activations=sparse, aux_loss_coefficient=1 / 32)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    since = torch.zeros(args.d_sae)
    n = [0]

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=since > 10_000_000 / x.shape[0],
            n_training_steps=n[0], is_logging_step=False))
        with torch.no_grad():
            fired = out.feature_acts.bool().float().sum(-2).bool()
            fired = fired.to_dense() if fired.is_sparse else fired
            since.add_(1)
            since[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n[0] += 1

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sae_lens

    data = synthetic(args.batch * 4, args.d_in)
    variants = {
        "progsae topk": ours(args, (args.d_sae,)),
        "progsae matryoshka (5 rungs)": ours(args, tuple(args.d_sae >> i for i in range(4, -1, -1))),
        "sae-lens topk": saelens(args, sparse=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.repeats + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for s in range(args.steps):
                i = (rep * args.steps + s) % 4
                fn(data[i * args.batch:(i + 1) * args.batch])
            if rep:
                times[name].append(time.perf_counter() - t0)
    tps = {k: args.steps * args.batch / statistics.median(v) for k, v in times.items()}
    best_sl = max(v for k, v in tps.items() if k.startswith("sae-lens"))
    print(f"`{' '.join(['python', *sys.argv])}`\n")
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}; "
          f"median of {args.repeats} x {args.steps} steps\n")
    print("| variant | tokens/s | vs best sae-lens |\n|---|---:|---:|")
    for k, v in tps.items():
        print(f"| {k} | {v:,.0f} | {v / best_sl:.2f}x |")


if __name__ == "__main__":
    main()
