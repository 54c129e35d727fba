"""Configuration of the Ray Serve application (the `args` of deploy/serve_config.yaml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .validate import Limits


@dataclass(frozen=True)
class AppConfig:
    """Everything `build_app` needs; every field can be set from serve_config.yaml `args`."""

    checkpoint_root: str = "ckpt"
    """Directory holding the checkpoints; model ids are paths under it."""
    models: tuple[str, ...] = ()
    """Checkpoint paths (relative to the root) to serve; empty = every checkpoint under the root."""
    default_model: str = ""
    """Model used when a request names none; empty = the first of `models`."""
    max_batch_size: int = 16
    """Most Encode requests merged into one dynamic batch (serve.batch)."""
    batch_wait_timeout_s: float = 0.001
    """How long a batch waits to fill before running (seconds); small keeps single-call latency low."""
    batch_max_tokens: int = 512
    """Encode calls with more tokens than this skip dynamic batching and run alone: they gain nothing from
    it, and a small call batched with one would wait for the whole large matmul."""
    limits: Limits = field(default_factory=Limits)
    """Per-request size limits."""
    codec_replicas: int = 1
    """Initial replicas of the codec deployment (when autoscaling is off)."""
    autoscaling: dict[str, Any] | None = None
    """Ray Serve autoscaling_config of the codec deployment (min/max_replicas, target_ongoing_requests...)."""
    max_ongoing_requests: int = 64
    """Concurrent requests one codec replica accepts (streams included)."""
    health_check_period_s: float = 2.0
    """How often Serve health-checks each codec replica: a replica that died is replaced within about this
    (Ray's default, 10 s, left a dead replica's calls queued for ~10 s; bench/faults.py)."""
    graceful_shutdown_timeout_s: float = 20.0
    """How long a codec replica being stopped (downscale, redeploy) may finish its requests."""
    replica_num_cpus: float = 0.0
    """CPUs reserved per codec replica (0 lets replicas share a small machine)."""
    text: bool = True
    """Deploy the language-model deployment for EncodeText (loaded on first use)."""
    lm_autoscaling: dict[str, Any] | None = None
    """autoscaling_config of the language-model deployment."""
    access_log: bool = False
    """Ray Serve per-request access log lines of the codec (off: they cost CPU on every call)."""
    device: str = "cpu"
    """Where codec replicas keep their models: "cpu", "cuda", "cuda:N", or "auto" (CUDA when the
    replica's torch sees a GPU; give replicas replica_num_gpus too, or Ray hides the GPUs)."""
    replica_num_gpus: float = 0.0
    """GPUs reserved per codec replica (e.g. 0.25 to pack four replicas on a GPU)."""
    torch_threads: int = 1
    """torch threads per codec replica (Ray sets 1 by default for 0-CPU actors)."""
    compute_threads: int = 2
    """Threads per codec replica that run torch work off its event loop (see ServiceConfig)."""
    model_memory_bytes: int = 0
    """Bytes of model weights a codec replica may hold (serve.multiplexed's LRU, bounded by bytes: the
    least recently used models are unloaded to make room; progsae.server.placement). 0 = a quarter of
    what the replica may use when it starts."""
    forward_direct_calls: bool = True
    """A call on a replica's own port for a model that replica does not hold is sent on, through Serve's
    multiplexed router, to a replica that holds it, instead of loading it there too (progsae.server.placement).
    Off: every replica loads the models it is asked for."""
    forward_wait_s: float = 2.0
    """How long a forwarded call waits on Ray for what takes milliseconds when all is well
    (progsae.server.placement): Serve's router placing it (past that, it is served on the replica it
    reached, which loads its model) and fetching a stream item the target replica has produced (past
    that, the target's node is taken as lost: UNAVAILABLE, which the project's clients retry or resume)."""
    replica_memory_bytes: int = 0
    """Most memory one call may need on a codec replica (ServiceConfig.memory_bytes): larger calls are
    refused with RESOURCE_EXHAUSTED before they run. 0 = half of what the replica may use, over
    compute_threads; -1 = no check."""
    direct_grpc_port: int = 0
    """If set, every codec replica also serves progsae.v1 (plus health and reflection) on its own grpc.aio
    server at this port, bound with SO_REUSEPORT so that the replicas of a node share it and the kernel
    spreads connections over them: the fast path, with no proxy hop (BENCHMARKS.md). 0 = off."""
    direct_grpc_host: str = "127.0.0.1"
    """Address the direct gRPC port binds (0.0.0.0 on a cluster node)."""
    direct_max_connection_age_s: float = 10.0
    """The direct port closes each client connection (HTTP/2 GOAWAY, +-10% jitter) after this long, so
    clients reconnect and the kernel (SO_REUSEPORT) or their round robin spreads them over the replicas
    there are now, new ones included. 0 = connections live forever (clients stay on their replica)."""
    direct_max_connection_age_grace_s: float = 30.0
    """How long calls in flight on a connection being closed for its age may still finish."""
    auth_token: str = ""
    """Bearer token every gRPC call (but health) and every /api HTTP route must carry; empty = auth off.
    Prefer `auth_token_env` on clusters: a literal token is visible in the Serve config."""
    auth_token_env: str = ""
    """Name of an environment variable of the replica processes holding the token (e.g. from a Secret)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AppConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown progsae app option(s): {', '.join(unknown)}")
        if "limits" in d and isinstance(d["limits"], dict):
            d["limits"] = Limits(**d["limits"])
        if "models" in d:
            d["models"] = tuple(d["models"] or ())
        if "device" in d:  # spelling only: the replica, not the driver, decides what "auto" means
            from progsae.sae.devices import check_device

            check_device(str(d["device"]))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["models"] = list(self.models)
        return out
