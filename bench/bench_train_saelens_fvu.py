"""progsae vs SAELens TopK on a real activation cache: training tokens/s and held-out FVU at each G.

    /tmp/sl-venv/bin/python bench/bench_train_saelens_fvu.py --train acts/smollm2-l15-train \\
        --heldout acts/smollm2-l15-heldout --batch 1024 --lr 2e-3 --threads 2

(side venv as in bench_train_saelens.py). Both SAEs see the same normalised batches in the
same order (ActivationCache.batches with the seed, x * c with our scalar c), the same lr
schedule (TrainConfig.lr_at), AuxK coefficient 1/32 and dead window. Ours is trained by
`progsae.trainer.train.train` (TopK). SAELens' TopKTrainingSAE is stepped like
SAETrainer._train_step, then its decoder norms are folded (its `fold_W_dec_norm`) and its
weights wrapped in progsae's codec to decode at every G in latent index order (unsorted)
and in E[a^2] order computed on the held-out set (an upper bound for the sorted variant).

`--save DIR` also writes SAELens's SAE as a progsae checkpoint (folded, unit rows), so that
`progsae order` (ordering measured on the training cache) and `progsae eval` treat it exactly
like ours; `--skip-ours` trains only SAELens's (the TopK recipe study in RESULTS.md):

    python bench/bench_train_saelens_fvu.py --train acts/smollm2-l15-train600k \
        --heldout acts/smollm2-l15-heldout --batch 1024 --lr 2e-3 --threads 1 --skip-ours \
        --save ckpt/smollm2-l15-600k-topk-saelens-s0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import NamedTuple

import torch

from progsae.sae import checkpoint
from progsae.sae.codec import SAE
from progsae.sae.metrics import FVUAccumulator
from progsae.sae.ordering import ImportanceAccumulator, apply
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.training.config import TrainConfig
from progsae.trainer.training.dead_latents import DeadTracker
from progsae.trainer.training.sae_init import init_b_dec, norm_scale
from progsae.trainer.training.train import _plan, train


def fvu_ladder(sae: SAE, held: ActivationCache, ladder: tuple[int, ...], batch: int = 4096) -> list[float]:
    accs = [FVUAccumulator() for _ in ladder]
    with torch.inference_mode():
        for x in held.batches(batch):
            for acc, rung in zip(accs, sae.progressive(sae.encode(x), ladder)):
                acc.update(x, rung.recon)
    return [a.value() for a in accs]


def sorted_by_mean_sq(sae: SAE, held: ActivationCache) -> SAE:
    acc = ImportanceAccumulator(sae)
    with torch.inference_mode():
        for x in held.batches(4096):
            acc.update(sae.encode(x))
    return apply(sae, acc.ordering("mean_sq"))


class Recipe(NamedTuple):
    """SAELens's TopK training as SAETrainer runs it, or with one part of it changed towards ours."""

    decoder_init_norm: float | None = 0.1
    """SAELens's default 0.1; None: unit rows (ours). The encoder starts as W_dec^T either way."""
    rescale: bool = True
    """rescale_acts_by_decoder_norm (SAELens's default); False: plain top-k on pre, no fold."""
    clip: float = 1.0
    """Gradient-norm clip of SAETrainer (0: none, as ours)."""
    b_dec_median: bool = False
    """Start b_dec at the geometric median of the init sample (ours) instead of zeros."""


def train_saelens(cfg: TrainConfig, cache: ActivationCache, scale: float,
                  recipe: Recipe | None = None) -> tuple[SAE, float]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    recipe = recipe or Recipe()
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cache.d_model, d_sae=cfg.d_sae, k=cfg.k, dtype="float32",
                                               device="cpu", aux_loss_coefficient=cfg.auxk_coef,
                                               decoder_init_norm=recipe.decoder_init_norm,
                                               rescale_acts_by_decoder_norm=recipe.rescale))
    if recipe.b_dec_median:
        with torch.no_grad():
            sl.b_dec.copy_(init_b_dec(cache.sample(cfg.init_samples, seed=cfg.seed) * scale))
    opt = torch.optim.Adam(sl.parameters(), lr=cfg.base_lr())
    steps, epochs = _plan(cfg, len(cache))
    tracker = DeadTracker(cfg.d_sae, cfg.dead_window(steps * cfg.batch_size))
    t0 = time.perf_counter()
    for step, x in enumerate(cache.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epochs=epochs)):
        if step >= steps:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step, steps)
        out = sl.training_forward_pass(TrainStepInput(
            sae_in=x * scale, coefficients={}, dead_neuron_mask=tracker.dead_mask(), n_training_steps=step,
            is_logging_step=False))
        idx = out.feature_acts.nonzero()
        tracker.since_fired += x.shape[0]
        tracker.since_fired[idx[:, 1].unique()] = 0
        out.loss.backward()
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(sl.parameters(), recipe.clip)
        opt.step()
        opt.zero_grad()
    tok_s = steps * cfg.batch_size / (time.perf_counter() - t0)
    if recipe.rescale:
        sl.fold_W_dec_norm()
    w = {n: getattr(sl, n).detach().clone() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    return SAE(**w, k=cfg.k, scale=scale), tok_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--granularities", default="256,512,1024,2048,4096")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--save", help="also write SAELens's SAE here as a progsae checkpoint")
    p.add_argument("--skip-ours", action="store_true", help="train only SAELens's SAE")
    p.add_argument("--sl-unit-init", action="store_true", help="SAELens with unit decoder rows at init (not 0.1)")
    p.add_argument("--sl-no-rescale", action="store_true", help="SAELens without rescale_acts_by_decoder_norm")
    p.add_argument("--sl-clip", type=float, default=1.0, help="SAELens's grad-norm clip (0: off)")
    p.add_argument("--sl-b-dec-median", action="store_true", help="SAELens with b_dec at the geometric median")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ladder = tuple(int(g) for g in args.granularities.split(","))
    cfg = TrainConfig(arch="topk", d_sae=args.d_sae, k=args.k, granularities=ladder, batch_size=args.batch,
                      lr=args.lr, tokens=args.tokens, seed=args.seed)
    cache, held = ActivationCache(args.train), ActivationCache(args.heldout)
    for key in ("model", "layer", "d_model"):
        if getattr(cache.manifest, key) != getattr(held.manifest, key):
            raise SystemExit(f"--train and --heldout differ in {key}")
    scale = norm_scale(cache.sample(cfg.init_samples, seed=cfg.seed))
    t0 = time.perf_counter()
    recipe = Recipe(None if args.sl_unit_init else 0.1, not args.sl_no_rescale, args.sl_clip, args.sl_b_dec_median)
    theirs, their_tps = train_saelens(cfg, cache, scale, recipe)
    if args.save:
        man = cache.manifest
        steps = _plan(cfg, len(cache))[0]
        checkpoint.save(args.save, theirs, checkpoint.CheckpointMeta(
            architecture="topk", d_in=cache.d_model, d_sae=cfg.d_sae, k=cfg.k, granularities=ladder, scale=scale,
            model=man.model, layer=man.layer, hook=man.extra.get("hook") or f"hidden_states.{man.layer}",
            training_tokens=steps * cfg.batch_size,
            extra={"trained_by": "sae-lens TopKTrainingSAE (bench/bench_train_saelens_fvu.py)",
                   "train_config": cfg.to_dict(), "sae_lens_recipe": recipe._asdict(),
                   "activations": str(cache.dir), "tokens_per_s": their_tps,
                   "wall_time_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}))
        print(f"wrote {args.save}")
    if args.skip_ours:
        print(json.dumps({"tokens_per_s": {"sae-lens": their_tps},
                          "fvu_unsorted": {"sae-lens": fvu_ladder(theirs, held, ladder)}}, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ck = checkpoint.load(train(cfg, args.train, f"{tmp}/ours", progress=False))
    ours, ours_tps = ck.sae, ck.meta.extra["tokens_per_s"]
    res = {
        "tokens": ck.meta.training_tokens, "ladder": list(ladder),
        "tokens_per_s": {"progsae": ours_tps, "sae-lens": their_tps},
        "fvu_unsorted": {"progsae": fvu_ladder(ours, held, ladder), "sae-lens": fvu_ladder(theirs, held, ladder)},
        "fvu_mean_sq_sorted_on_heldout": {"progsae": fvu_ladder(sorted_by_mean_sq(ours, held), held, ladder),
                                          "sae-lens": fvu_ladder(sorted_by_mean_sq(theirs, held), held, ladder)},
    }
    print(json.dumps(res, indent=1))
    print(f"\n| G | {' | '.join(f'{v} {s}' for v in ('unsorted', 'E[a^2]-sorted') for s in ('progsae', 'sae-lens'))} |")
    print("|---:|---:|---:|---:|---:|")
    for i, g in enumerate(ladder):
        cells = [res[key][s][i] for key in ("fvu_unsorted", "fvu_mean_sq_sorted_on_heldout")
                 for s in ("progsae", "sae-lens")]
        print(f"| {g} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    print(f"\ntokens/s: progsae {ours_tps:,.0f}, sae-lens {their_tps:,.0f} ({ours_tps / their_tps:.2f}x)")


if __name__ == "__main__":
    main()
