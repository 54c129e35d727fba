"""Start the app on a local Ray instance (the embedded default of `progsae serve`, tests, bench)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace

from .config import AppConfig

APP_NAME = "progsae"


@dataclass(frozen=True)
class LocalCluster:
    """How the local Ray instance and Serve's proxies are started."""

    grpc_port: int = 9000
    """Port of Serve's gRPC proxy."""
    http_port: int = 8000
    """Port of Serve's HTTP proxy."""
    host: str = "127.0.0.1"
    """Address both proxies bind (0.0.0.0 to accept remote clients)."""
    num_cpus: int = 2
    """CPUs given to the local Ray instance."""
    metrics_port: int | None = None
    """Port of Ray's Prometheus endpoint (None: Ray picks one)."""
    request_timeout_s: float | None = None
    """End-to-end timeout Serve's proxies apply to each request."""
    access_log: bool = False
    """Per-request access log lines of Serve's proxies."""
    direct_grpc_port: int | None = None
    """Port of the codec replicas' own gRPC servers, the fast path (AppConfig.direct_grpc_port), bound on
    `host`: None = the gRPC proxy's port + 1 (or a free port if that one is taken), 0 = off. A Serve
    config that sets AppConfig.direct_grpc_port itself keeps its own."""


def start(app: AppConfig, cluster: LocalCluster | None = None) -> dict[str, str]:
    """ray.init + serve.start + serve.run; returns the addresses (grpc: Serve's proxy, direct: the codec
    replicas' own port when `app.direct_grpc_port` is set, http, metrics)."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from .app import GRPC_SERVICER_FUNCTIONS, build_app

    cluster = cluster or LocalCluster()
    if not app.direct_grpc_port and cluster.direct_grpc_port != 0:
        port = cluster.direct_grpc_port or _free_or_other(cluster.host, cluster.grpc_port + 1)
        app = replace(app, direct_grpc_port=port, direct_grpc_host=cluster.host)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's gRPC proxy reads its message cap from the environment (default 2 GiB): match our limits.
    # (Only a Ray instance started here inherits it; on clusters set it in the pod env.)
    cap = max(app.limits.max_request_bytes, app.limits.max_response_bytes) + (1 << 20)
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(cap))
    if not ray.is_initialized():
        kwargs = {"num_cpus": cluster.num_cpus, "include_dashboard": False, "log_to_driver": False,
                  "configure_logging": False}
        if cluster.metrics_port is not None:
            kwargs["_metrics_export_port"] = cluster.metrics_port
        ray.init(**kwargs)
    serve.start(
        http_options=HTTPOptions(host=cluster.host, port=cluster.http_port),
        grpc_options=gRPCOptions(port=cluster.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS,
                                 request_timeout_s=cluster.request_timeout_s),
        logging_config={"enable_access_log": cluster.access_log},
    )
    serve.run(build_app(app.to_dict()), name=APP_NAME, route_prefix="/")
    return {
        "grpc": f"{cluster.host}:{cluster.grpc_port}",
        "direct": f"{app.direct_grpc_host}:{app.direct_grpc_port}" if app.direct_grpc_port else "",
        "http": f"http://{cluster.host}:{cluster.http_port}",
        "metrics": f"http://127.0.0.1:{cluster.metrics_port}/metrics" if cluster.metrics_port else "",
    }


def _free_or_other(host: str, port: int) -> int:
    """`port` if nothing listens there, else a free port."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            s.bind((host, 0))
            return s.getsockname()[1]


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
