"""`progsae train`: TopK or Matryoshka SAE on an activation cache; resumable after kill -9.

The run writing checkpoint OUT keeps its state in OUT.training/ (see train_state.py) and
checkpoints it every `checkpoint_every` steps. Rerunning the same command resumes from the
last state: data order (ActivationCache.batches with the seed, skipping done batches),
parameters, Adam moments, dead-latent counters and RNG are restored, so the final weights
equal those of an uninterrupted run. At the end OUT is written with checkpoint.save, the
log is copied to OUT/train_log.jsonl and OUT.training/ is removed.

Each log line's `fvu` (and `fvu_rungs`, and with a k ladder `fvu_k_rungs`: G = M at each k')
is the batch FVU the step's forward measured, before its
optimiser update. The last line also has `fvu_saved` (and `fvu_saved_rungs`): the float64 FVU
(SPEC §5) of the weights after that step, i.e. the saved ones, on the same batch, so that
decoding that batch through the saved checkpoint reproduces a logged number.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from progsae.sae import checkpoint
from progsae.sae.checkpoint import CheckpointMeta
from progsae.sae.codec import SAE
from progsae.sae.devices import resolve_device
from progsae.sae.metrics import fvu as batch_fvu
from progsae.sae.metrics import token_variance
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.training import train_state as ts
from progsae.trainer.training.config import TrainConfig
from progsae.trainer.training.dead_latents import DeadTracker
from progsae.trainer.training.losses import Output, TrainableSAE, band_partials, optimizer_step
from progsae.trainer.training.sae_init import init_b_dec, norm_scale
from progsae.trainer.training.sparse_topk import Selection, topk_encode

# Settings that may differ between a run and its resumption (they change no weights).
RESUMABLE_KEYS = ("checkpoint_every", "log_every")


def _prefetch(it: Iterator[torch.Tensor], depth: int = 2, pin: bool = False) -> Generator[torch.Tensor, None, None]:
    """Read batches on a background thread (numpy gathers release the GIL); `pin`: into pinned
    host memory, so the copy to a CUDA device can overlap."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for x in it:
                if not put(x.pin_memory() if pin else x):
                    return
        except BaseException as e:  # surfaced in the consumer
            put(e)
        put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (x := q.get()) is not done:
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


class _Metrics:
    """Optional Prometheus endpoint: training progress (tokens, loss, FVU, dead fraction, tokens/s)."""

    def __init__(self, port: int | None, arch: str, total_tokens: int):
        self.gauges: dict[str, Any] = {}
        if port is None:
            return
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        reg = CollectorRegistry()
        for name, doc in [("tokens", "Training tokens seen"), ("loss", "Training loss (last logged step)"),
                          ("fvu", "Batch FVU of the full reconstruction"), ("dead_frac", "Dead latent fraction"),
                          ("tokens_per_s", "Training throughput")]:
            metric = "progsae_train_tokens_per_second" if name == "tokens_per_s" else f"progsae_train_{name}"
            self.gauges[name] = Gauge(metric, doc, ["arch"], registry=reg).labels(arch)
        Gauge("progsae_train_target_tokens", "Token budget", ["arch"], registry=reg).labels(arch).set(total_tokens)
        start_http_server(port, registry=reg)

    def update(self, rec: dict[str, Any]) -> None:
        for name, g in self.gauges.items():
            g.set(rec[name])


def _plan(cfg: TrainConfig, n_rows: int) -> tuple[int, int]:
    """(total optimiser steps, epochs over the cache) for the token budget."""
    per_epoch = n_rows // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the cache holds {n_rows} usable tokens, fewer than one batch of {cfg.batch_size}")
    steps = (cfg.tokens or per_epoch * cfg.batch_size) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    return steps, math.ceil(steps / per_epoch)


@contextlib.contextmanager
def _precision(dtype: str, device: torch.device) -> Iterator[Callable[..., Selection]]:
    """The encoder for TrainConfig.dtype on `device` (tf32: CUDA matmuls allow TF32 inside)."""
    if dtype == "bfloat16":
        yield functools.partial(topk_encode, matmul_dtype=torch.bfloat16)
        return
    if dtype != "tf32":
        yield topk_encode
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield topk_encode
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def check_out(cfg: TrainConfig, out: Path, cache_id: dict[str, Any]) -> str:
    """'fresh', 'resume' or 'done' for this output path; ValueError if it belongs to another run."""
    sd = ts.state_dir(out)
    meta = ts.read_meta(sd)
    if meta is not None:
        for key in ("model", "layer", "d_model"):
            if meta.cache.get(key) != cache_id.get(key):
                raise ValueError(f"{sd} was started on activations with {key}={meta.cache.get(key)!r}, "
                                 f"these have {key}={cache_id.get(key)!r}; use another --out")
        if meta.cache != cache_id:
            raise ValueError(f"{sd} was started on other activations (different shards); use another --out")
        diff = _same_config(meta.config, cfg.to_dict())
        if diff:
            raise ValueError(f"{sd} holds a run with other settings ({', '.join(diff)}); "
                             f"use another --out or delete {sd}")
        return "resume"
    if out.exists():
        try:
            done = checkpoint.load_meta(out)
        except checkpoint.CheckpointError:
            raise ValueError(f"{out} exists and is not a checkpoint of this run; use another --out") from None
        prev = done.extra.get("train_config", {})
        if _same_config(prev, cfg.to_dict()) or done.extra.get("cache") != cache_id:
            raise ValueError(f"{out} already holds a checkpoint trained with other settings; use another --out")
        return "done"
    return "fresh"


def _log_line(out: Output, step: int, tokens: int, tok_s: float, dead: float, lr: float) -> dict[str, Any]:
    fvus = out.fvus.tolist()
    rec = {
        "step": step, "tokens": tokens, "loss": float(out.loss.detach()), "fvu": fvus[-1],
        "l0": float((out.sel.values > 0).sum(1).float().mean()), "dead_frac": dead,
        "auxk": float(out.auxk), "lr": lr, "tokens_per_s": tok_s,
    }
    if len(fvus) > 1:
        rec["fvu_rungs"] = fvus
    if out.fvus_k.shape[0] > 1:
        rec["fvu_k_rungs"] = out.fvus_k.tolist()
    return rec


@torch.no_grad()
def _fvus_now(sae: TrainableSAE, x: torch.Tensor, k: int, ladder: tuple[int, ...]) -> list[float]:
    """Float64 FVU at each rung of the ladder of batch x (normalised scale) by sae's current
    weights: the training forward's one top-k and nested prefix decode, without AuxK."""
    W_enc, b_enc, W_dec = sae.effective()
    sel = topk_encode(x - sae.b_dec, W_enc, b_enc, k)
    recon = band_partials(W_dec, sel, ladder).cumsum(0) + sae.b_dec
    return [batch_fvu(x, r) for r in recon]


def train(cfg: TrainConfig, activations: str | Path, out: str | Path, progress: bool = True,
          max_steps: int | None = None, metrics_port: int | None = None, device: str = "cpu") -> Path:
    """Train (or resume) and write the checkpoint `out`. `max_steps` stops early (tests);
    `metrics_port` serves Prometheus gauges of the progress; `device` (devices.resolve_device):
    where the weights, optimiser state and batches live. The initial weights are drawn on the
    CPU, so every device starts from the same ones; state and checkpoint are saved from CPU
    copies. A run resumed on the device it started on ends with the weights of an uninterrupted
    one; moved to another device type it continues from the same state, not bit for bit."""
    out = Path(out)
    run = _setup(cfg, activations, out, device)
    if run is None:
        print(f"{out}: already trained with these settings; nothing to do")
        return out
    log = _Log(run, progress, metrics_port)
    try:
        _loop(run, log, max_steps)
    finally:
        log.close()
    if run.meta.step < run.total_steps:  # stopped early (max_steps): leave a resumable state
        ts.save_state(run.state_dir, run.sae, run.opt, run.tracker.since_fired, run.meta)
        return out
    return _finish(run)


@dataclass
class _Run:
    """One run from setup to its checkpoint: what the loop updates and what the checkpoint records."""

    cfg: TrainConfig
    cache: ActivationCache
    out: Path
    dev: torch.device
    sae: TrainableSAE
    opt: torch.optim.Adam
    tracker: DeadTracker
    meta: ts.Meta
    """Step, tokens and seconds so far (restored on resume), the scale and the cache identity."""
    total_steps: int
    epochs: int
    """Passes over the cache the token budget needs (the batch order's epochs)."""
    window: int
    """Dead-latent window in tokens."""
    k_aux: int
    init_s: float
    """Seconds spent initialising the weights, or loading the saved state."""

    @property
    def state_dir(self) -> Path:
        return ts.state_dir(self.out)


def _setup(cfg: TrainConfig, activations: str | Path, out: Path, device: str) -> _Run | None:
    """Check the settings and the output path, then build the run: fresh (seeded weights, scale and
    b_dec from a sample of the cache) or from its saved state. None if `out` is already this run's
    checkpoint."""
    cfg.validate()
    dev = resolve_device(device)
    if cfg.dtype == "tf32" and dev.type != "cuda":
        raise ValueError(f"--dtype tf32 needs a CUDA device, this run is on {dev}; use float32 or bfloat16")
    cache = ActivationCache(activations, outliers=cfg.outlier_factor)
    d_in, man = cache.d_model, cache.manifest
    cache_id = ts.cache_identity(man)
    mode = check_out(cfg, out, cache_id)
    if mode == "done":
        return None
    total_steps, epochs = _plan(cfg, len(cache))
    total_tokens = total_steps * cfg.batch_size
    window, k_aux = cfg.dead_window(total_tokens), cfg.k_aux_for(d_in)

    torch.manual_seed(cfg.seed)
    sae = TrainableSAE(d_in, cfg.d_sae, torch.Generator().manual_seed(cfg.seed), cfg.decoder_norm == "free").to(dev)
    params = dict(sae.named_parameters())
    opt = torch.optim.Adam([params[n] for n in ts.PARAMS], lr=cfg.base_lr(), betas=cfg.betas, eps=cfg.eps)
    tracker = DeadTracker(cfg.d_sae, window, device=dev)
    sd = ts.state_dir(out)
    t_init = time.perf_counter()
    if mode == "resume":
        meta = ts.load_state(sd, sae, opt, tracker.since_fired)
        ts.truncate_log(sd, meta.step)
    else:
        sample = cache.sample(cfg.init_samples, seed=cfg.seed)
        scale = norm_scale(sample)
        with torch.no_grad():
            sae.b_dec.copy_(init_b_dec(sample * scale, cfg.b_dec_init))
        meta = ts.Meta(0, 0, scale, cfg.to_dict(), cache_id)
        sd.mkdir(parents=True, exist_ok=True)
        (sd / ts.LOG).write_text("")
    return _Run(cfg, cache, out, dev, sae, opt, tracker, meta, total_steps, epochs, window, k_aux,
                time.perf_counter() - t_init)


def _loop(run: _Run, log: _Log, max_steps: int | None) -> None:
    """Optimiser steps from run.meta.step to the budget (or `max_steps`), saving the state every
    `checkpoint_every` steps; run.meta ends at the step reached, with the seconds spent."""
    cfg, meta, sae, opt, tracker, dev = run.cfg, run.meta, run.sae, run.opt, run.tracker, run.dev
    B, scale, step = cfg.batch_size, meta.scale, meta.step
    ladder, weights, k_ladder = cfg.loss_ladder(), torch.tensor(cfg.weights(), device=dev), cfg.loss_k_ladder()
    t_run, seconds0 = time.perf_counter(), meta.seconds
    batches = _prefetch(run.cache.batches(B, shuffle=True, seed=cfg.seed, start_batch=step, epochs=run.epochs),
                        pin=dev.type == "cuda")
    stack = contextlib.ExitStack()
    encode = stack.enter_context(_precision(cfg.dtype, dev))
    try:
        for x in batches:
            if step >= run.total_steps or (max_steps is not None and step >= max_steps):
                break
            x = x.to(dev, non_blocking=True) * scale
            dead_mask = tracker.dead_mask()
            dead = tracker.dead_ids()
            lr = cfg.lr_at(step, run.total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            o = optimizer_step(sae, opt, x, cfg.k, ladder, weights, dead, run.k_aux, cfg.auxk_coef,
                               encode=encode, k_ladder=k_ladder, auxk_norm=cfg.auxk_norm)
            if not torch.isfinite(o.loss):
                raise RuntimeError(f"loss is {float(o.loss)} at step {step}; lower --lr (state kept in "
                                   f"{run.state_dir})")
            tracker.update(o.sel.indices, o.sel.values, B)
            step += 1
            meta.step, meta.tokens = step, meta.tokens + B
            log.step(o, x, lr, dead_mask)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.total_steps:
                meta.seconds = seconds0 + time.perf_counter() - t_run
                ts.save_state(run.state_dir, sae, opt, tracker.since_fired, meta)
    finally:
        stack.close()
        batches.close()
    meta.seconds = seconds0 + time.perf_counter() - t_run


class _Log:
    """A run's progress: a JSON line every `log_every` steps and at the last one, in the state's
    log (copied into the checkpoint at the end), the progress bar and the Prometheus gauges."""

    def __init__(self, run: _Run, progress: bool, metrics_port: int | None):
        from tqdm import tqdm

        self.run = run
        self.metrics = _Metrics(metrics_port, run.cfg.arch, run.total_steps * run.cfg.batch_size)
        self.bar = tqdm(total=run.total_steps, initial=run.meta.step, unit="step", disable=not progress,
                        dynamic_ncols=True, desc=f"train {run.cfg.arch}")
        self.file = open(run.state_dir / ts.LOG, "a")
        self.t_log, self.tok_log = time.perf_counter(), run.meta.tokens

    def step(self, o: Output, x: torch.Tensor, lr: float, dead_mask: torch.Tensor) -> None:
        """After the optimiser step run.meta now counts: `o` its output on the batch `x` (normalised
        scale), `dead_mask` the latents that were dead when it ran."""
        run, cfg, step, tokens = self.run, self.run.cfg, self.run.meta.step, self.run.meta.tokens
        self.bar.update(1)
        if step % cfg.log_every and step != run.total_steps:
            return
        now = time.perf_counter()
        tok_s = (tokens - self.tok_log) / max(now - self.t_log, 1e-9)
        rec = _log_line(o, step, tokens, tok_s, float(dead_mask.float().mean()), lr)
        if step == run.total_steps:  # these weights are the ones saved: their FVU on this batch
            saved = _fvus_now(run.sae, x, cfg.k, cfg.loss_ladder())
            rec["fvu_saved"] = saved[-1]
            if len(saved) > 1:
                rec["fvu_saved_rungs"] = saved
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.metrics.update(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", fvu=f"{rec['fvu']:.4f}", dead=f"{rec['dead_frac']:.3f}",
                             tok_s=f"{tok_s:,.0f}")
        self.t_log, self.tok_log = now, tokens

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def _finish(run: _Run) -> Path:
    """Write the checkpoint from the run's final weights, with its provenance; store an auto ladder
    if asked; copy the log in and remove the state."""
    cfg, cache, out, sae, meta = run.cfg, run.cache, run.out, run.sae, run.meta
    man, sd = cache.manifest, run.state_dir
    with torch.no_grad():  # free decoder rows: their norms folded into the encoder
        W_enc, b_enc, W_dec = (t.detach().cpu().clone() for t in sae.effective())
    final = SAE(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=sae.b_dec.detach().cpu().clone(), k=cfg.k,
                scale=meta.scale)  # CPU copies: the checkpoint names no device
    outliers = cache.outliers()
    extra = {
        "train_config": cfg.to_dict(),
        "cache": meta.cache,
        "activations": str(cache.dir),
        "outlier_policy": {"factor": cfg.outlier_factor.factor, "threshold": outliers["threshold"],
                           "excluded": outliers["excluded"], "total": outliers["total"]},
        "steps": run.total_steps,
        "lr": cfg.base_lr(),
        "warmup_steps": cfg.warmup_steps(run.total_steps),
        "dead_window_tokens": run.window,
        "k_aux": run.k_aux,
        "final_dead_fraction": float(run.tracker.dead_mask().float().mean()),
        "wall_time_s": meta.seconds,
        "init_time_s": run.init_s,
        "tokens_per_s": meta.tokens / meta.seconds if meta.seconds > 0 else None,
        "threads": torch.get_num_threads(),
        "trained_on": str(next(sae.parameters()).device),
    }
    if cfg.loss_k_ladder():  # trained for decode at each k' (eval and serving read it here)
        extra["k_ladder"] = list(cfg.k_ladder)
    layer = man.layer
    meta_ck = CheckpointMeta(
        architecture=cfg.arch, d_in=sae.d_in, d_sae=sae.d_sae, k=cfg.k, granularities=cfg.granularities,
        scale=meta.scale, model=man.model, layer=layer, hook=man.extra.get("hook") or f"hidden_states.{layer}",
        training_tokens=meta.tokens, extra=extra,
        # the FVU baseline of served texts, over the same sample the normalisation scalar was fitted on
        reference_variance=token_variance(cache.sample(cfg.init_samples, seed=cfg.seed)),
    )
    checkpoint.save(out, final, meta_ck)
    if cfg.auto_ladder:
        from progsae.trainer.evaluation import auto_ladder

        choice = auto_ladder.for_checkpoint(out, cache.dir, cfg.auto_ladder, {}, cfg.outlier_factor)
        auto_ladder.store(out, choice)
    log = sd / ts.LOG
    if log.is_file():
        checkpoint.atomic_write(out / "train_log.jsonl", log.read_text())
    shutil.rmtree(sd, ignore_errors=True)
    return out
