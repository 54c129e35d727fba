"""Real-LM residual activations -> sharded on-disk cache (activations.py); `progsae harvest`.

Contexts. Each corpus's documents (its split, in the seeded hash order of corpora.py) are
tokenized without special tokens, joined with the model's separator token and cut into
pieces of `context - 1` tokens; each piece gets the start token in front. Corpora are
interleaved one context at a time (round robin; a corpus that runs out drops out). The
start position is never stored, so every context yields `context - 1` rows, and a cache
holds ceil(tokens / (context - 1)) whole contexts.

Determinism and resume. Shard i holds contexts [i*S, (i+1)*S) with S = shard_tokens //
(context - 1); its batches are formed from the shard's start, so a shard's bytes depend only
on (model, layer, corpora, split, context, seed, batch, threads). A shard is registered in
the manifest only once both its files are whole (CacheWriter), so after `kill -9` at any
point, rerunning the same command regenerates the same stream, skips the registered
contexts and writes the rest: the final shards are byte-identical to an uninterrupted run.
The manifest's `extra["timing"]` (tokens/s, seconds) is the only part that differs.
For the same reason a finished cache grows in place when rerun with a larger `--tokens`.

Where the passes run. `harvest` plans the shards, tokenizes and writes; a `Forward` turns each
shard's contexts into activations with `shard_activations`: `Local` in this process, or
`harvest_ray.RayForward` on Ray workers (one model copy each) for the same bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from progsae.lm.models import LoadedModel, LoadedTokenizer
    from progsae.trainer.data.activations import Manifest

DISK_MARGIN = 64 << 20  # bytes kept free beyond the cache's own size


@dataclass
class HarvestConfig:
    """Everything that determines a harvest (all of it but `out`/`metrics_port` is recorded)."""

    out: str
    """Cache directory (created; an existing one is resumed if it matches)."""
    model: str = "smollm2-135m"
    """Model alias, HF name or local folder."""
    layer: int = 15
    """hidden_states index to read (0 = embeddings)."""
    corpus: str = "wikipedia,chitchat"
    """Comma-separated corpora, interleaved in this order."""
    split: str = "train"
    """'train' or 'heldout' (by document, fixed by a hash of the document id)."""
    tokens: int = 2_000_000
    """Rows wanted; rounded up to whole contexts. Raising it on an existing cache grows that cache."""
    context: int = 128
    """Tokens per context including the start token (whose position is not stored)."""
    batch: int = 8
    """Contexts per forward pass."""
    shard_tokens: int = 65_536
    """Rows per shard (rounded down to whole contexts); also the resume granularity."""
    seed: int = 0
    """Document order within each corpus (the split does not depend on it)."""
    start_token: str | None = None
    """Override the model's default start-of-context token."""
    device: str = "cpu"
    """torch device for the forward pass: "cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a
    GPU). Shards from different device types are not byte-identical."""
    threads: int | None = None
    """torch threads (per model copy); default: the value recorded in an existing cache, else min(cores, 8)
    (with --ray-address: --ray-cpus). A cache's bytes may depend on it."""
    metrics_port: int | None = None
    """If set, serve Prometheus metrics (tokens, tokens/s) on this port."""
    progress: bool = True
    """Show a tqdm progress bar (stderr)."""


def _tokens_of(lm: LoadedModel | LoadedTokenizer, texts: list[str]) -> list[list[int]]:
    return lm.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def corpus_contexts(lm: LoadedModel | LoadedTokenizer, docs: list[tuple[str, str]], context: int,
                    chunk_docs: int = 32) -> Iterator[list[int]]:
    """One corpus's documents packed into [start] + (context - 1) tokens, separator between docs."""
    n = context - 1
    buf: list[int] = []
    for i in range(0, len(docs), chunk_docs):
        for ids in _tokens_of(lm, [t for _, t in docs[i:i + chunk_docs]]):
            buf.extend(ids)
            buf.append(lm.sep_token_id)
        pos = 0
        while len(buf) - pos >= n:
            yield [lm.start_token_id, *buf[pos:pos + n]]
            pos += n
        del buf[:pos]


def interleave(streams: list[Iterator[list[int]]]) -> Iterator[list[int]]:
    """Round robin over the streams; exhausted ones drop out."""
    live = list(streams)
    while live:
        for s in list(live):
            try:
                yield next(s)
            except StopIteration:
                live.remove(s)


def _existing_manifest(out: Path) -> Manifest | None:
    from progsae.trainer.data.activations import MANIFEST, Manifest

    return Manifest.load(out) if (out / MANIFEST).is_file() else None


def _check_existing(old: Manifest, cfg: HarvestConfig, alias: str, corpora: list[str]) -> None:
    from progsae.trainer.data.activations import CacheError

    want = {"model": alias, "layer": cfg.layer, "corpus": corpora, "split": cfg.split, "context": cfg.context}
    for key, value in want.items():
        if getattr(old, key) != value:
            raise CacheError(f"{cfg.out}: existing cache has {key}={getattr(old, key)!r}, asked for "
                             f"{value!r}; use another --out or delete it")
    if cfg.tokens < old.target_tokens:
        raise CacheError(f"{cfg.out}: existing cache was harvested for {old.target_tokens:,} tokens, asked for "
                         f"{cfg.tokens:,}; a cache only grows: use another --out or delete it")
    if cfg.tokens > old.target_tokens and old.extra.get("exhausted"):
        raise CacheError(f"{cfg.out}: its corpus ran out at {old.n_tokens:,} tokens, so it cannot grow to "
                         f"{cfg.tokens:,}; add a corpus (with another --out)")
    for key in ("seed", "batch", "shard_tokens", "device"):
        if key in old.extra and old.extra[key] != getattr(cfg, key):
            raise CacheError(f"{cfg.out}: existing cache was harvested with {key}={old.extra[key]!r}, "
                             f"asked for {getattr(cfg, key)!r}; use another --out or delete it")


def _check_disk(out: Path, rows: int, d_model: int, n_contexts: int, context: int) -> None:
    need = rows * d_model * 4 + n_contexts * context * 4 + DISK_MARGIN
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ValueError(f"not enough disk for {out}: needs {need / 1e9:.2f} GB more, {free / 1e9:.2f} GB free")


def validate(cfg: HarvestConfig) -> tuple[Any, list[str], dict[str, list[tuple[str, str]]]]:
    """Every cheap check, before the model loads: -> (model spec, corpora, documents)."""
    from progsae.lm.models import check_layer, resolve_model
    from progsae.trainer.data import corpora as C

    if cfg.split not in C.SPLITS:
        raise ValueError(f"unknown split {cfg.split!r}; choose from {', '.join(C.SPLITS)}")
    for name, lo in (("tokens", 1), ("context", 2), ("batch", 1), ("shard_tokens", 1)):
        if getattr(cfg, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {lo}")
    names = C.parse_corpora(cfg.corpus)
    spec = resolve_model(cfg.model)
    check_layer(spec, cfg.layer)
    out = Path(cfg.out)
    old = _existing_manifest(out)
    if old is not None:
        _check_existing(old, cfg, spec.alias, names)
    docs = {n: C.load_documents(n, cfg.split, cfg.seed) for n in names}
    return spec, names, docs


def plan(cfg: HarvestConfig) -> tuple[int, int]:
    """-> (contexts in the finished cache, contexts per shard)."""
    per = cfg.context - 1
    return math.ceil(cfg.tokens / per), max(1, cfg.shard_tokens // per)


class _Metrics:
    """Optional Prometheus endpoint: harvested tokens and tokens/s."""

    def __init__(self, port: int | None, target: int):
        self.enabled = port is not None
        if port is None:
            return
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        reg = CollectorRegistry()
        self.tokens = Gauge("progsae_harvest_tokens", "Activation rows in the cache", registry=reg)
        self.rate = Gauge("progsae_harvest_tokens_per_second", "Harvest throughput", registry=reg)
        Gauge("progsae_harvest_target_tokens", "Rows wanted", registry=reg).set(target)
        start_http_server(port, registry=reg)

    def update(self, tokens: int, rate: float) -> None:
        if self.enabled:
            self.tokens.set(tokens)
            self.rate.set(rate)


def shard_activations(lm: LoadedModel, ctx: np.ndarray, layer: int, batch: int,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """float32 [n * (context - 1), d] of one shard's int32 contexts [n, context], start position dropped.

    Batches are cut from the shard's start, so a shard's bytes do not depend on what ran before it
    or where; `progress(rows)` is called after each batch."""
    import numpy as np
    import torch

    from progsae.lm.models import hidden_at_layer

    device = next(lm.model.parameters()).device
    parts = []
    for i in range(0, len(ctx), batch):
        ids = torch.from_numpy(ctx[i:i + batch].astype(np.int64)).to(device)
        h = hidden_at_layer(lm.model, ids, layer)[:, 1:, :]
        parts.append(h.reshape(-1, h.shape[-1]).float().cpu().numpy())
        if progress is not None:
            progress(len(parts[-1]))
    return np.concatenate(parts)


class Forward(Protocol):
    """Where a harvest's forward passes run: `Local` (this process) or `harvest_ray.RayForward`."""

    default_threads: int
    """torch threads of a new cache when `--threads` is not given."""

    def open(self, threads: int, n_shards: int) -> LoadedModel | LoadedTokenizer:
        """Get ready to run up to `n_shards` shards with `threads` torch threads per model copy;
        -> what tokenizes the corpus (and records the start/separator tokens)."""
        ...

    def run(self, shards: Iterator[np.ndarray], progress: Callable[[int], None]
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(contexts, `shard_activations` of them) per shard, in the order of `shards`."""
        ...

    def close(self) -> None:
        """Release what `open` took (also after an error)."""
        ...


class Local:
    """The forward passes in this process, on `cfg.device` (on `lm` if given)."""

    def __init__(self, cfg: HarvestConfig, lm: LoadedModel | None = None, log: Callable[[str], None] = print):
        self.cfg, self.lm, self.log = cfg, lm, log
        self.default_threads = min(os.cpu_count() or 1, 8)

    def open(self, threads: int, n_shards: int) -> LoadedModel:
        import torch

        from progsae.lm.models import load_model

        torch.set_num_threads(threads)
        if self.lm is None:
            self.log(f"loading {self.cfg.model} ...")
            self.lm = load_model(self.cfg.model, device=self.cfg.device, start_token=self.cfg.start_token)
        elif self.cfg.start_token and self.cfg.start_token != self.lm.start_token:
            raise ValueError(f"model was loaded with start token {self.lm.start_token!r}, "
                             f"asked for {self.cfg.start_token!r}")
        return self.lm

    def run(self, shards: Iterator[np.ndarray], progress: Callable[[int], None]
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        assert self.lm is not None, "open() first"
        for ctx in shards:
            yield ctx, shard_activations(self.lm, ctx, self.cfg.layer, self.cfg.batch, progress)

    def close(self) -> None:
        pass


def _shards(stream: Iterator[list[int]], n_contexts: int, per_shard: int, context: int) -> Iterator[np.ndarray]:
    """The next `n_contexts` contexts of `stream` as int32 shards of `per_shard` (the last may be
    short: the target or the corpus ends there)."""
    import itertools

    import numpy as np

    while n_contexts > 0:
        want = min(per_shard, n_contexts)
        ctx = np.asarray(list(itertools.islice(stream, want)), dtype=np.int32).reshape(-1, context)
        if len(ctx):
            yield ctx
        if len(ctx) < want:
            return
        n_contexts -= want


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def harvest(cfg: HarvestConfig, lm: LoadedModel | None = None, log: Callable[[str], None] | None = None,
            forward: Forward | None = None) -> Manifest:
    """Run (or resume, or confirm finished) a harvest; returns the final manifest. The forward
    passes run in this process (on `lm` if given) unless `forward` runs them elsewhere."""
    import itertools

    from progsae.trainer.data.activations import CacheWriter, Manifest

    log = log or _stderr
    spec, names, docs = validate(cfg)
    out = Path(cfg.out)
    old = _existing_manifest(out)
    if old is not None and cfg.tokens > old.target_tokens:
        _grow(out, old, cfg, log)
    if old is not None and old.complete:
        log(f"{out}: already complete ({old.n_tokens:,} tokens); nothing to do")
        return old
    total, per_shard = plan(cfg)
    rows_per = cfg.context - 1
    done = 0 if old is None else old.n_tokens // rows_per
    _check_disk(out, (total - done) * rows_per, spec.d_model, total - done, cfg.context)
    forward = forward or Local(cfg, lm, log)
    threads = int(cfg.threads or (old.extra.get("threads") if old else None) or forward.default_threads)
    try:
        text = forward.open(threads, math.ceil((total - done) / per_shard))
        manifest = Manifest(
            model=text.alias, layer=cfg.layer, d_model=text.d_model, corpus=names, split=cfg.split,
            context=cfg.context, target_tokens=cfg.tokens, bos=text.start_token,
            extra={
                "seed": cfg.seed, "batch": cfg.batch, "shard_tokens": cfg.shard_tokens, "device": cfg.device,
                "threads": threads,
                "bos_id": text.start_token_id, "separator": text.sep_token, "separator_id": text.sep_token_id,
                "model_source": text.source, "documents": {n: len(d) for n, d in docs.items()},
                "tokens_rounding": "whole contexts: ceil(tokens / (context - 1)) * (context - 1) rows",
            },
        )
        _clean_temp(out)
        writer = CacheWriter(out, manifest)
        done = writer.n_tokens // rows_per
        if done:
            log(f"{out}: resuming after {writer.n_tokens:,} tokens in {writer.n_shards} shards")
        stream = interleave([corpus_contexts(text, docs[n], cfg.context) for n in names])
        stream = itertools.islice(stream, done, total)
        metrics = _Metrics(cfg.metrics_port, total * rows_per)
        from tqdm import tqdm

        bar = tqdm(total=total * rows_per, initial=writer.n_tokens, unit="tok", unit_scale=True,
                   disable=not cfg.progress, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                   desc=f"harvest {text.alias} L{cfg.layer} {cfg.split}")
        t0, new_rows, start_rows = time.perf_counter(), 0, writer.n_tokens

        def progress(rows: int) -> None:
            nonlocal new_rows
            new_rows += rows
            bar.update(rows)
            metrics.update(start_rows + new_rows, new_rows / max(time.perf_counter() - t0, 1e-9))

        with bar:
            for ctx, acts in forward.run(_shards(stream, total - done, per_shard, cfg.context), progress):
                try:
                    writer.add_shard(acts, ctx)
                except OSError as e:  # e.g. the disk filled up after the up-front check
                    raise ValueError(
                        f"writing {out} failed ({e.strerror or e}); its {writer.n_tokens:,} tokens in whole shards "
                        "are kept: free space and rerun the same command to resume") from None
    finally:
        forward.close()
    seconds = time.perf_counter() - t0
    if writer.n_tokens == 0:
        _remove_empty(out)
        raise ValueError(f"corpus {','.join(names)} ({cfg.split}) yields no whole {cfg.context}-token context")
    exhausted = writer.n_tokens < total * rows_per
    if exhausted:
        log(f"warning: corpus ran out at {writer.n_tokens:,} of {total * rows_per:,} tokens")
    rate = new_rows / seconds if seconds > 0 and new_rows else 0.0
    final = writer.finish(exhausted=exhausted, timing={"tokens_per_second": round(rate, 1),
                                                       "seconds": round(seconds, 1), "rows_this_run": new_rows})
    log(f"{out}: {final.n_tokens:,} tokens in {len(final.shards)} shards; {rate:,.0f} tokens/s this run")
    return final


def _grow(out: Path, old: Manifest, cfg: HarvestConfig, log: Any) -> None:
    """Raise a cache's target in place. The context stream does not depend on `--tokens`, so the
    whole shards already written are exactly those of a run asked for more; a trailing partial
    shard is dropped and regenerated whole. The result is byte-identical to a fresh run."""
    per_shard = plan(cfg)[1]
    keep = len(old.shards)
    while keep and old.shards[keep - 1].n_contexts != per_shard:
        keep -= 1
    dropped = old.shards[keep:]
    log(f"{out}: growing from {old.target_tokens:,} to {cfg.tokens:,} tokens; keeping {keep} whole shards"
        + (f", regenerating {sum(s.n_tokens for s in dropped):,} tokens of a partial shard" if dropped else ""))
    grown_from = old.extra.get("grown_from", []) + [old.target_tokens]
    old.shards, old.target_tokens, old.complete = old.shards[:keep], cfg.tokens, False
    for key in ("exhausted", "timing"):
        old.extra.pop(key, None)
    old.extra["grown_from"] = grown_from
    old.save(out)  # registered first, so a kill from here on resumes the grown cache
    for s in dropped:
        for name in (s.acts, s.tokens):
            if name:
                (out / name).unlink(missing_ok=True)


def _remove_empty(out: Path) -> None:
    """Undo an empty cache: its manifest, and the folder if nothing else is in it."""
    from progsae.trainer.data.activations import MANIFEST

    (out / MANIFEST).unlink(missing_ok=True)
    _clean_temp(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _clean_temp(out: Path) -> None:
    """Drop temp files an interrupted run left (registered shards are never temp files)."""
    if out.is_dir():
        for f in out.glob(".*.tmp"):
            f.unlink(missing_ok=True)
