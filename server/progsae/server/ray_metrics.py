"""MetricsSink on `ray.serve.metrics`: exported through Ray's Prometheus endpoint.

Ray prefixes every custom metric with `ray_`, so these appear as `ray_progsae_*`.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_MS: list[float] = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64]


class RayServeSink:
    """One per replica; created in the deployment's __init__."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "progsae_requests", description="progsae calls by method, status and model",
            tag_keys=("method", "status", "model"),  # pyright: ignore[reportArgumentType]  # Ray: Tuple[str], meant ...
        )
        self.latency = metrics.Histogram(
            "progsae_request_latency_ms", description="progsae call latency in the replica (ms), by method",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("method",),
        )
        self.batch_size = metrics.Histogram(
            "progsae_encode_batch_size", description="Encode requests handled per dynamic batch",
            boundaries=BATCH_BOUNDARIES,
        )
        self.rungs = metrics.Counter("progsae_rungs_streamed", description="stream rungs computed",
                                     tag_keys=("model",))
        self.stops = metrics.Counter("progsae_stream_stops", description="streams ended, by stop reason",
                                     tag_keys=("reason",))
        self.bytes = metrics.Counter("progsae_bytes_out", description="response bytes sent, by method",
                                     tag_keys=("method",))

    def request(self, method: str, status: str, model: str, seconds: float) -> None:
        self.requests.inc(tags={"method": method, "status": status, "model": model or "-"})
        self.latency.observe(1e3 * seconds, tags={"method": method})

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def rung(self, model: str) -> None:
        self.rungs.inc(tags={"model": model})

    def stop(self, reason: str) -> None:
        self.stops.inc(tags={"reason": reason})

    def bytes_out(self, method: str, n: int) -> None:
        self.bytes.inc(n, tags={"method": method})
