"""Serve's autoscaler, told about the fast path.

Serve counts the requests that pass through its proxies and handles. Calls on a codec replica's own
gRPC port (the fast path, `AppConfig.direct_grpc_port`) bypass both, so each replica reports them
itself through the deployment's `record_autoscaling_stats` (`replica_stats`), and the Codec
deployment's `autoscaling_config.policy` is `fast_path_policy`, Serve's own queue-length rule over
proxy and direct load together. Serve wraps a custom policy with the rest of the config itself:
min/max replicas, up/downscale delays and factors.

    record_autoscaling_stats -> {"direct_ongoing": calls in flight on the replica's own port,
                                 "compute_pending": torch work items queued or running}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

    from .stats import Stats

DIRECT_ONGOING = "direct_ongoing"
COMPUTE_PENDING = "compute_pending"
POLICY = "progsae.server.autoscaling:fast_path_policy"
"""The import path Serve's controller loads (`autoscaling_config.policy.policy_function`)."""


def replica_stats(stats: Stats) -> dict[str, float]:
    """What a codec replica reports to Serve's controller every `metrics_interval_s`."""
    return {DIRECT_ONGOING: float(stats.in_flight["direct"]), COMPUTE_PENDING: float(stats.compute_pending)}


def direct_load(ctx: AutoscalingContext) -> float:
    """Calls in flight on the replicas' own ports, summed over the replicas (averaged over the look-back
    window by Serve)."""
    per_replica = (ctx.aggregated_metrics or {}).get(DIRECT_ONGOING) or {}
    return float(sum(per_replica.values()))


def fast_path_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas wanted for proxy and direct load together: their sum over `target_ongoing_requests`,
    Serve's default rule (replica_queue_length_autoscaling_policy) with the direct calls added."""
    if ctx.current_num_replicas == 0 or ctx.config is None:
        return ctx.target_num_replicas, {}
    load = float(ctx.total_num_requests) + direct_load(ctx)
    return load / ctx.config.get_target_ongoing_requests(), {}


def with_policy(autoscaling: dict[str, Any]) -> dict[str, Any]:
    """`autoscaling` (a Serve autoscaling_config) with `fast_path_policy` unless it names a policy."""
    out = dict(autoscaling)
    out.setdefault("policy", {"policy_function": POLICY})
    return out
