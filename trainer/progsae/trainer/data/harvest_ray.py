"""`progsae harvest --ray-address ADDR`: a harvest's forward passes on Ray workers, same bytes.

The driver (this process) does all but the forward passes, as a single-process harvest does
(harvest.py): it validates, tokenizes with the tokenizer alone (it never loads the weights), cuts
the context stream into the same shards and writes them in order with the same CacheWriter, so a
kill at any point resumes at the first shard not registered, and a cache grows in place. Each
worker is a Ray actor holding one model copy, loaded once, with `--threads` torch threads (the
cache's recorded count on resume; CPU matmul results may depend on it) that turns a whole shard
into activations with `harvest.shard_activations`, in the same batches. A shard's bytes thus do
not depend on which worker ran it: the cache is byte-identical to a single-process harvest on the
same device type, and either kind of run resumes the other's cache.

Scheduling. Shards go to the least loaded ready worker, at most two per worker at a time (one
running, one queued, so no worker waits on the driver); a finished shard waits in the driver until
every earlier one is written, so the driver holds at most 2 x workers shards of activations. Workers
join as they finish loading the model. One that is lost (its node died) is dropped and its shards
go to the others; when none is left the run stops, keeping the whole shards written.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from progsae.trainer.data.harvest import HarvestConfig, shard_activations

if TYPE_CHECKING:
    import numpy as np

    from progsae.lm.models import LoadedTokenizer

IN_FLIGHT = 2
"""Shards given to one worker at a time: one running, one queued behind it."""


@dataclass
class RayOptions:
    """Where `progsae harvest` runs its forward passes: this process, or a Ray cluster."""

    ray_address: str | None = None
    """Ray cluster for the forward passes, one model copy per worker: the head's host:port, 'auto', or
    any other address ray.init takes. Unset: this process. The cache's bytes are the same either way
    with the same --threads and device type."""
    ray_workers: int = 0
    """Workers (model copies); 0 = as many as the cluster's CPUs (GPUs with --ray-gpus) hold, at
    most one per shard left."""
    ray_cpus: float = 1.0
    """CPUs reserved per worker; the default --threads of a new cache."""
    ray_gpus: float | None = None
    """GPUs per worker; default 1 with a cuda --device (or auto on a cluster with GPUs), else 0."""
    ray_wait_s: float = 600.0
    """Seconds to wait for a worker to load the model when none is ready."""


class WorkerInfo(NamedTuple):
    """What a worker loaded, checked against the driver's tokenizer before it gets a shard."""

    node: str
    """Ray node id."""
    alias: str
    """Model name recorded in the cache."""
    d_model: int
    """Residual width of the loaded weights."""
    start_token_id: int
    """Id of the start-of-context token."""
    sep_token_id: int
    """Id of the document separator."""
    threads: int
    """torch threads of its forward passes."""


class _Worker:
    """One model copy on a Ray worker: loads the LM once, then computes whole shards."""

    def __init__(self, model: str, device: str, start_token: str | None, threads: int):
        import torch

        from progsae.lm.models import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(model, device=device, start_token=start_token)

    def describe(self) -> WorkerInfo:
        import ray
        import torch

        lm = self.lm
        return WorkerInfo(ray.get_runtime_context().get_node_id(), lm.alias, lm.d_model, lm.start_token_id,
                          lm.sep_token_id, torch.get_num_threads())

    def shard(self, ctx: np.ndarray, layer: int, batch: int) -> np.ndarray:
        return shard_activations(self.lm, ctx, layer, batch)


def ray_forward(cfg: HarvestConfig, opts: RayOptions, log: Callable[[str], None]) -> RayForward | None:
    """A RayForward when `--ray-address` is given, else None (this process); one-line errors for
    Ray flags without an address or out of range."""
    if not opts.ray_address:
        given = [f.name for f in fields(RayOptions) if getattr(opts, f.name) != f.default]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --ray-address")
        return None
    if opts.ray_workers < 0:
        raise ValueError("--ray-workers must be at least 0")
    if opts.ray_cpus < 0 or (opts.ray_gpus or 0) < 0 or opts.ray_cpus + (opts.ray_gpus or 0) <= 0:
        raise ValueError("--ray-cpus and --ray-gpus must be >= 0, and not both 0")
    if opts.ray_wait_s <= 0:
        raise ValueError("--ray-wait-s must be positive")
    return RayForward(cfg, opts, log)


class RayForward:
    """harvest.Forward on Ray actors (see the module docstring)."""

    def __init__(self, cfg: HarvestConfig, opts: RayOptions, log: Callable[[str], None]):
        self.cfg, self.opts, self.log = cfg, opts, log
        self.default_threads = max(1, int(opts.ray_cpus))
        self.gpus = opts.ray_gpus if opts.ray_gpus is not None else float(cfg.device.startswith("cuda"))
        self.text: LoadedTokenizer | None = None
        self.actors: list[Any] = []
        self.starting: dict[Any, Any] = {}  # describe() ref -> actor, until it answers
        self.node_of: dict[Any, str] = {}  # ready actor -> its node id
        self.connected = False
        self.deadline = 0.0

    def open(self, threads: int, n_shards: int) -> LoadedTokenizer:
        from progsae.lm.models import load_tokenizer

        if n_shards:
            self._start_workers(threads, n_shards)
        self.text = load_tokenizer(self.cfg.model, self.cfg.start_token)  # while the workers load
        return self.text

    def _start_workers(self, threads: int, n_shards: int) -> None:
        import ray

        address = self.opts.ray_address
        if not ray.is_initialized():
            _probe(address or "")
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"cannot connect to Ray at {address}: {first}") from None
            self.connected = True
        if self.opts.ray_gpus is None and self.cfg.device == "auto":  # workers resolve auto to what they see
            self.gpus = float(ray.cluster_resources().get("GPU", 0) >= 1)
        n = self._n_workers(n_shards)
        worker = ray.remote(_Worker).options(num_cpus=self.opts.ray_cpus, num_gpus=self.gpus,
                                             scheduling_strategy="SPREAD")
        self.actors = [worker.remote(self.cfg.model, self.cfg.device, self.cfg.start_token, threads)
                       for _ in range(n)]
        self.starting = {a.describe.remote(): a for a in self.actors}
        self.deadline = time.monotonic() + self.opts.ray_wait_s
        self.log(f"ray: {n} workers ({self.opts.ray_cpus:g} CPUs, {self.gpus:g} GPUs, {threads} threads each) "
                 f"at {address} for {n_shards} shards; loading {self.cfg.model} on each ...")

    def _n_workers(self, n_shards: int) -> int:
        import ray

        if self.opts.ray_workers:
            return min(self.opts.ray_workers, n_shards)
        res = ray.cluster_resources()
        kind, per = ("GPU", self.gpus) if self.gpus else ("CPU", self.opts.ray_cpus)
        fit = int(res.get(kind, 0) // per)
        if fit < 1:
            raise ValueError(f"the Ray cluster at {self.opts.ray_address} has {res.get(kind, 0):g} {kind}s, "
                             f"fewer than one worker's {per:g}; lower --ray-{kind.lower()}s or add nodes")
        return min(fit, n_shards)

    def run(self, shards: Iterator[np.ndarray], progress: Callable[[int], None]
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

        lost_errors = (RayActorError, ActorUnavailableError)
        cfg, ready, load = self.cfg, [], {}
        nodes: dict[str, int] = {}  # shards computed per node
        inflight: dict[Any, tuple[int, np.ndarray, Any]] = {}
        retry: list[tuple[int, np.ndarray]] = []  # (index, contexts) of lost workers' shards, lowest first
        finished: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        source, next_out, more, last_loss, joined = enumerate(shards), 0, True, "", 0
        while True:
            free = [a for a in ready if load[a] < IN_FLIGHT]
            while free and (retry or more):
                if retry:
                    i, ctx = heapq.heappop(retry)
                else:
                    nxt = next(source, None)
                    if nxt is None:
                        more = False
                        break
                    i, ctx = nxt
                a = min(free, key=lambda w: load[w])
                inflight[a.shard.remote(ctx, cfg.layer, cfg.batch)] = (i, ctx, a)
                load[a] += 1
                free = [w for w in ready if load[w] < IN_FLIGHT]
            if not inflight and not retry and not more:
                break
            waiting = [*inflight, *self.starting]
            if not waiting and not joined:
                raise ValueError(f"no Ray worker could load {cfg.model}: {last_loss}")
            if not waiting:
                raise ValueError(f"every Ray worker was lost ({last_loss}); the whole shards written are kept: "
                                 "rerun the same command to resume")
            timeout = None if ready else max(0.0, self.deadline - time.monotonic())
            done, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
            if not done:
                raise ValueError(f"no Ray worker loaded {cfg.model} within --ray-wait-s {self.opts.ray_wait_s:g} s "
                                 f"(the cluster may lack free {'GPUs' if self.gpus else 'CPUs'} for a worker)")
            ref = done[0]
            if ref in self.starting:
                a = self.starting.pop(ref)
                try:
                    info: WorkerInfo = ray.get(ref)
                except lost_errors as e:
                    last_loss = _one_line(e)
                    self.log(f"ray: a worker failed to start: {last_loss}")
                    continue
                self._check(info)
                self.node_of[a] = info.node
                ready.append(a)
                load[a] = 0
                joined += 1
                self.log(f"ray: worker {joined} of {len(self.actors)} ready on node {info.node[:8]}")
                continue
            i, ctx, a = inflight.pop(ref)
            load[a] -= 1
            try:
                acts = ray.get(ref)
            except (*lost_errors, ObjectLostError) as e:  # the worker, or the node holding its result, is gone
                last_loss = _one_line(e)
                if a in ready and isinstance(e, lost_errors):
                    ready.remove(a)
                    self.log(f"ray: lost a worker ({last_loss}); {len(ready)} left, its shards go to them")
                heapq.heappush(retry, (i, ctx))
                continue
            except (RayTaskError, GetTimeoutError) as e:
                raise ValueError(f"a Ray worker failed on shard {i}: {_one_line(e)}") from None
            node = self.node_of.get(a, "?")
            nodes[node] = nodes.get(node, 0) + 1
            finished[i] = (ctx, acts)
            progress(len(acts))
            while next_out in finished:
                yield finished.pop(next_out)
                next_out += 1
        if nodes:
            self.log(f"ray: {sum(nodes.values())} shards on {len(nodes)} nodes "
                     f"({', '.join(f'{n[:8]}: {c}' for n, c in sorted(nodes.items()))})")

    def _check(self, info: WorkerInfo) -> None:
        text = self.text
        assert text is not None
        want = WorkerInfo(info.node, text.alias, text.d_model, text.start_token_id, text.sep_token_id, info.threads)
        if info != want:
            raise ValueError(f"a Ray worker on node {info.node[:8]} loaded {info.alias} (d_model {info.d_model}, "
                             f"start/separator ids {info.start_token_id}/{info.sep_token_id}), the driver's "
                             f"tokenizer says {text.alias} ({text.d_model}, {text.start_token_id}/{text.sep_token_id}):"
                             " every node needs the same model files")

    def close(self) -> None:
        if not self.actors and not self.connected:
            return
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception as e:  # noqa: BLE001 - close() runs in cleanup: it says so and goes on
                self.log(f"ray: could not stop a worker (already gone, or the cluster is): {type(e).__name__}: {e}")
        self.actors, self.starting = [], {}
        if self.connected:
            ray.shutdown()
            self.connected = False


def _probe(address: str, timeout: float = 10.0) -> None:
    """A host:port address must answer a TCP connect: Ray's own init retries an unreachable one for minutes."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # 'auto', 'local', ray://...: Ray answers those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cannot connect to Ray at {address}: {e.strerror or e}") from None


def _one_line(e: BaseException) -> str:
    """A Ray error's cause in one line (Ray's own text spans a traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
