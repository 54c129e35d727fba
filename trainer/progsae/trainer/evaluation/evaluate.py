"""`progsae eval`: every SPEC §5 metric at every rung G of a checkpoint's ladder.

One pass over the held-out cache, one encode per batch: encoding is equivariant under a
permutation of the latents, so the codes of every ordering are the same codes with their
indices relabelled (position of latent i in ordering o = inverse(o.perm)[i]). Each ordering
then streams all rungs progressively (one sparse decode in total per ordering).

Rows are read *without* the outlier policy, and the policy's keep mask is applied per
batch, so one encode feeds both FVU (policy rows; the headline) and FVU over all rows.
L0, densities and dead latents use the policy rows. RSA uses a fixed random sample of
policy rows. CE / KL splice x_hat_G into the model (see ce_loss.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from progsae.sae import checkpoint
from progsae.sae.codec import SAE, Codes
from progsae.sae.devices import resolve_device
from progsae.sae.metrics import FVUAccumulator, RSAReference, density_histogram, fit_power_law
from progsae.trainer.data import outlier_policy
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.data.outlier_policy import OutlierPolicy
from progsae.trainer.evaluation.ordered import OrderedSAE
from progsae.trainer.evaluation.results import (
    ORDERING_NAMES,
    EvalResult,
    OrderingResult,
    RungMetrics,
    merge,
)


@dataclass
class EvalConfig:
    """How to evaluate (recorded in metrics.json under eval.settings)."""

    ordering: Literal["none", "mean_sq", "freq", "all"] = "all"
    """Progressive order to evaluate (TopK): "all" = none + mean_sq + freq, those stored.
    Matryoshka checkpoints are evaluated in their trained order."""
    batch_size: int = 4096
    """Tokens per encode batch."""
    outlier_factor: OutlierPolicy | None = None
    """Exclude rows with norm > this factor x the median token norm (0, none or off: keep every
    row). Default: the policy the checkpoint was trained with."""
    rsa_tokens: int = 2000
    """Held-out tokens in the RSA sample (SPEC §5 asks for >= 1000)."""
    ce: bool = False
    """Also splice x_hat_G into the language model: CE loss recovered and KL."""
    ce_contexts: int = 32
    """Held-out contexts for the CE / KL evaluation."""
    ce_batch: int = 4
    """Contexts per language-model forward pass."""
    max_tokens: int | None = None
    """Evaluate only the first this many held-out rows (quick runs)."""
    seed: int = 0
    """Seed of the RSA sample."""
    device: str = "cpu"
    """Where to encode and decode: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU).
    Metrics accumulate in float64 on it; the --ce language model runs on the CPU."""
    k_grid: tuple[int, ...] = ()
    """Also evaluate the (G, k') grid at these k' (e.g. 4,8,16,32): FVU, L0 (and with --ce CE
    recovered) decoding each token from its k' largest codes with index < G (k_grid.py);
    stored in metrics.json under k_grid. Empty: skip."""
    progress: bool = True
    """Show progress bars (stderr)."""

    def validate(self) -> None:
        """Raise ValueError with a one-line message on bad settings."""
        if self.rsa_tokens < 3 or self.ce_contexts < 1 or self.batch_size < 1 or self.ce_batch < 1:
            raise ValueError("--rsa-tokens must be >= 3; --ce-contexts, --ce-batch, --batch-size >= 1")
        if self.outlier_factor is not None and not isinstance(self.outlier_factor, OutlierPolicy):
            raise TypeError(f"outlier_factor must be an OutlierPolicy or None, got {self.outlier_factor!r}")
        from progsae.sae.devices import check_device

        check_device(self.device)


def resolve_orderings(ck: checkpoint.Checkpoint, ordering: str) -> list[str]:
    """The orderings to evaluate; Matryoshka SAEs are progressive in their trained order."""
    if ordering not in (*ORDERING_NAMES, "all"):
        raise ValueError(f"unknown ordering {ordering!r}; choose from none, mean_sq, freq, all")
    if ck.meta.architecture == "matryoshka":
        if ordering == "all":
            return ["none", *[o for o in ("mean_sq", "freq") if o in ck.orderings]]
        names = [ordering]
    else:
        names: list[str] = list(ORDERING_NAMES) if ordering == "all" else [ordering]
    missing = [n for n in names if n != "none" and n not in ck.orderings]
    if missing:
        raise ValueError(
            f"{ck.path}: no stored ordering {', '.join(missing)}; run `progsae order {ck.path} --by "
            f"{missing[0]} --activations <train cache>` first"
        )
    return names


def check_compatible(ck: checkpoint.Checkpoint, cache: ActivationCache) -> None:
    m, man = ck.meta, cache.manifest
    if man.d_model != m.d_in:
        raise ValueError(f"{cache.dir}: activations have width {man.d_model}, the SAE expects d_in={m.d_in}")
    if m.layer is not None and man.layer != m.layer:
        raise ValueError(f"{cache.dir}: activations are from layer {man.layer}, the SAE reads layer {m.layer}")
    if m.model and man.model and Path(m.model).name != Path(man.model).name:
        raise ValueError(f"{cache.dir}: activations are from model {man.model!r}, the SAE from {m.model!r}")
    if man.split == "train":
        print(f"warning: {cache.dir} is a training split; evaluate on held-out activations", flush=True)


def evaluate(ckpt_path: str | Path, acts_dir: str | Path, cfg: EvalConfig | None = None,
             model: Any = None) -> EvalResult:
    """Evaluate a checkpoint on a held-out cache; `model` (an nn.Module) overrides loading the LM
    named by the checkpoint for the CE path."""
    cfg = cfg or EvalConfig()
    cfg.validate()
    t0 = time.perf_counter()
    ck = checkpoint.load(ckpt_path)
    names = resolve_orderings(ck, cfg.ordering)
    rule = outlier_policy.resolve(cfg.outlier_factor, ck.meta)
    factor = rule.factor
    cache_all = ActivationCache(acts_dir, outliers=outlier_policy.KEEP_ALL)
    check_compatible(ck, cache_all)
    policy = ActivationCache(acts_dir, outliers=rule)
    total = cache_all.manifest.n_tokens
    keep = np.zeros(total, dtype=bool)
    keep[policy.rows()] = True
    n_rows = total if cfg.max_tokens is None else min(total, cfg.max_tokens)
    keep = keep[:n_rows]
    if not keep.any():
        raise ValueError(f"{acts_dir}: the outlier policy excludes every row")

    sae, ladder = ck.sae, ck.ladder
    variants = [OrderedSAE.of(ck, n) for n in names]
    dev = resolve_device(cfg.device)
    sae_dev, on_dev = sae.to(dev), [v.to(dev) for v in variants]
    stream = _stream_pass(sae_dev, on_dev, ladder, cache_all, keep, cfg)
    rsa = _rsa_pass(sae_dev, on_dev, ladder, cache_all, keep, cfg)
    del sae_dev, on_dev
    ce, ce_rungs = (None, {})
    if cfg.ce:
        from progsae.trainer.evaluation.ce_loss import splice_eval

        ce, ce_rungs = splice_eval(ck, sae, variants, cache_all, keep, cfg.ce_contexts, cfg.ce_batch,
                                   progress=cfg.progress, model=model)

    fires, sum_sq, n_kept = stream.fires.cpu(), stream.sum_sq.cpu(), int(keep.sum())
    importance = (sum_sq * (sae.W_dec.double().norm(dim=1) / sae.scale) ** 2 / n_kept).cpu()
    orderings = {}
    for v in variants:
        rungs = []
        for j, g in enumerate(ladder):
            ce_v = ce_rungs.get((v.name, g))
            rungs.append(RungMetrics(
                g=g,
                fvu=stream.fvu[v.name][j].value(),
                fvu_all=stream.fvu_all[v.name][j].value(),
                l0=stream.l0[v.name][j] / n_kept,
                dead_fraction=float((fires[v.perm][:g] == 0).double().mean()),
                rsa=rsa[v.name][j],
                **({} if ce_v is None else ce_v._asdict()),
            ))
        orderings[v.name] = _ordering_result(ck, v, rungs, importance)
    settings = {"outlier_factor": factor, "max_tokens": cfg.max_tokens, "rsa_tokens": cfg.rsa_tokens,
                "seed": cfg.seed}
    return EvalResult(
        checkpoint=str(ck.path), architecture=ck.meta.architecture, activations=str(Path(acts_dir).resolve()),
        ladder=list(ladder), d_sae=ck.meta.d_sae, k=ck.meta.k, n_tokens=n_kept, n_tokens_all=n_rows,
        outliers={"factor": factor, "threshold": policy.threshold, "excluded": int(n_rows - n_kept),
                  "total": n_rows, "median_norm": cache_all.manifest.norm_median},
        rsa_tokens=min(cfg.rsa_tokens, n_kept), dead_fraction=float((fires == 0).double().mean()),
        density=density_histogram(fires.numpy(), n_kept), ce=ce, orderings=orderings,
        seconds=time.perf_counter() - t0, settings=settings,
    )


@dataclass
class _Stream:
    fvu: dict[str, list[FVUAccumulator]]
    fvu_all: dict[str, list[FVUAccumulator]]
    l0: dict[str, list[float]]
    fires: Tensor
    """[d_sae] float64 firing counts per original latent over kept rows."""
    sum_sq: Tensor
    """[d_sae] float64 sum of squared activations per original latent over kept rows."""


@torch.no_grad()
def _stream_pass(sae: SAE, variants: list[OrderedSAE], ladder: tuple[int, ...], cache: ActivationCache,
                 keep: np.ndarray, cfg: EvalConfig) -> _Stream:
    names = [v.name for v in variants]
    s = _Stream(
        fvu={n: [FVUAccumulator() for _ in ladder] for n in names},
        fvu_all={n: [FVUAccumulator() for _ in ladder] for n in names},
        l0={n: [0.0 for _ in ladder] for n in names},
        fires=torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device),
        sum_sq=torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device),
    )
    n, bs = len(keep), cfg.batch_size
    bar = tqdm(total=n, unit="tok", desc="eval FVU/L0", disable=not cfg.progress, smoothing=0.1)
    for start in range(0, n, bs):
        rows = np.arange(start, min(start + bs, n))
        x = cache.gather(rows).to(sae.W_dec.device, non_blocking=True)
        kb = torch.from_numpy(keep[rows]).to(x.device)
        codes = sae.encode(x)
        kc = Codes(codes.indices[kb], codes.values[kb])
        idx, val = kc.indices.reshape(-1), kc.values.reshape(-1).double()
        s.fires.index_add_(0, idx, (val > 0).double())
        s.sum_sq.index_add_(0, idx, val.square())
        xk = x[kb]
        for v in variants:
            for j, rung in enumerate(v.sae.progressive(v.relabel(codes), ladder)):
                assert rung.recon is not None  # progressive() yields reconstructions unless told not to
                s.fvu_all[v.name][j].update(x, rung.recon)
                if len(xk):
                    s.fvu[v.name][j].update(xk, rung.recon[kb])
                    s.l0[v.name][j] += float(rung.l0[kb].sum())
        bar.update(len(rows))
    bar.close()
    return s


@torch.no_grad()
def _rsa_pass(sae: SAE, variants: list[OrderedSAE], ladder: tuple[int, ...], cache: ActivationCache,
              keep: np.ndarray, cfg: EvalConfig) -> dict[str, list[float]]:
    kept = np.flatnonzero(keep)
    pick = np.random.default_rng(cfg.seed).choice(len(kept), size=min(cfg.rsa_tokens, len(kept)), replace=False)
    x = cache.gather(kept[np.sort(pick)])
    if x.shape[0] < 3:
        return {v.name: [float("nan")] * len(ladder) for v in variants}
    ref = RSAReference(x)  # on the CPU (numpy ranks), as are the reconstructions it scores
    codes = sae.encode(x.to(sae.W_dec.device))
    out: dict[str, list[float]] = {}
    bar = tqdm(total=len(variants) * len(ladder), desc=f"eval RSA ({x.shape[0]} tok)", disable=not cfg.progress)
    for v in variants:
        out[v.name] = []
        for rung in v.sae.progressive(v.relabel(codes), ladder):
            assert rung.recon is not None  # progressive() yields reconstructions unless told not to
            out[v.name].append(ref.score(rung.recon.cpu()))
            bar.update(1)
    bar.close()
    return out


def _ordering_result(ck: checkpoint.Checkpoint, v: OrderedSAE, rungs: list[RungMetrics],
                     importance: Tensor) -> OrderingResult:
    from scipy.stats import spearmanr

    if v.name == "none":
        scores = torch.sort(importance, descending=True).values
        source = "eval-set E[(a_i ||W_dec[i]||)^2], sorted"
    else:
        scores = ck.orderings[v.name].sorted_scores()
        source = f"stored '{v.name}' ordering scores (computed by `progsae order`)"
    try:
        law = fit_power_law(scores)
    except ValueError:
        law = None
    in_order = importance[v.perm]
    # scipy ships no annotations, and pyright's inference of spearmanr's result misses .statistic
    mono = spearmanr(np.arange(len(in_order)), in_order.numpy()).statistic  # pyright: ignore[reportAttributeAccessIssue]
    return OrderingResult(v.name, rungs, law, source, scores.tolist(), in_order.tolist(), float(mono))


def save_result(result: EvalResult, ckpt_path: str | Path) -> dict[str, Any]:
    """Merge into the checkpoint's metrics.json (atomic) and return what was written."""
    old = checkpoint.load(ckpt_path).metrics
    merged = merge(old if isinstance(old, dict) else {}, result.to_json())
    checkpoint.write_metrics(ckpt_path, merged)
    return merged


def format_table(result: EvalResult) -> str:
    """Plain-text table of every rung of every ordering."""
    ce = result.ce is not None
    head = f"{'ordering':9} {'G':>6} {'FVU':>8} {'FVU_all':>8} {'L0':>6} {'dead':>6} {'RSA':>6}"
    head += f" {'CE':>7} {'CE_rec ± se':>15} {'KL':>7}" if ce else ""
    lines = [head]
    for name, o in result.orderings.items():
        for r in o.rungs:
            line = (f"{name:9} {r.g:6d} {r.fvu:8.4f} {r.fvu_all:8.4f} {r.l0:6.2f} {r.dead_fraction:6.3f} "
                    f"{r.rsa:6.3f}")
            if ce and r.ce is not None:
                known = r.ce_recovered_se is not None and np.isfinite(r.ce_recovered_se)
                se = f"±{r.ce_recovered_se:.4f}" if known else ""
                line += f" {r.ce:7.4f} {f'{r.ce_recovered:.4f}{se}':>15} {r.kl:7.4f}"
            lines.append(line)
        if o.power_law is not None:
            pl = o.power_law
            lines.append(f"{name:9} power law alpha={pl.alpha:.3f} R^2={pl.r2:.3f} over {pl.n} scores")
    if result.ce is not None:
        lines.append(f"CE clean={result.ce.ce_clean:.4f} zero-ablated={result.ce.ce_zero:.4f} "
                     f"over {result.ce.n_tokens} tokens ({result.ce.n_contexts} contexts)")
    o = result.outliers
    lines.append(f"outlier policy: factor={o['factor']} threshold={o['threshold']:.1f} "
                 f"excluded {o['excluded']}/{o['total']} rows; dead latents {result.dead_fraction:.3f}; "
                 f"{result.seconds:.1f}s")
    return "\n".join(lines)
