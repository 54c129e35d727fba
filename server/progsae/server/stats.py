"""In-process counters every transport keeps, and the sink interface metrics plug into."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from typing import Protocol

from .errors import log


class MetricsSink(Protocol):
    """Where the service reports what it did (Ray Serve metrics, Prometheus, nothing)."""

    def request(self, method: str, status: str, model: str, seconds: float) -> None: ...
    def batch(self, size: int) -> None: ...
    def rung(self, model: str) -> None: ...
    def stop(self, reason: str) -> None: ...
    def bytes_out(self, method: str, n: int) -> None: ...


class NullSink:
    def request(self, method: str, status: str, model: str, seconds: float) -> None:
        pass

    def batch(self, size: int) -> None:
        pass

    def rung(self, model: str) -> None:
        pass

    def stop(self, reason: str) -> None:
        pass

    def bytes_out(self, method: str, n: int) -> None:
        pass


class Stats:
    """Counters of one process (thread-safe); GetServerStats reports them."""

    def __init__(self, sink: MetricsSink | None = None):
        self.sink: MetricsSink = sink or NullSink()
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.stop_reasons: Counter[str] = Counter()
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_cancelled = 0
        self.rungs_computed = 0
        self.in_flight: Counter[str] = Counter()
        """Calls being served now, by transport (progsae.server.call.Call.transport)."""
        self.compute_pending = 0
        """Torch work items submitted to the compute pool and not finished (queued or running)."""
        self.work: Counter[str] = Counter()
        """Units of work done, by kind ("resolve", "lm", "encode"): what one call cost, for tests and
        debugging."""

    def request(self, method: str, status: str, model: str, seconds: float) -> None:
        with self._lock:
            self.requests[f"{method}:{status}"] += 1
        # The model label is the caller's raw field: only a call that succeeded proves it names a served
        # model. Failed calls get "-" (arbitrary ids must not become metric labels: unbounded cardinality,
        # and Ray's metrics reject non-ASCII tags).
        try:
            self.sink.request(method, status, model if status == "OK" else "-", seconds)
        except Exception:  # noqa: BLE001  (metrics must never fail a call)
            log.warning("metrics sink failed", exc_info=True)

    def enter(self, transport: str) -> None:
        with self._lock:
            self.in_flight[transport] += 1

    def leave(self, transport: str) -> None:
        with self._lock:
            self.in_flight[transport] -= 1

    def compute_started(self) -> None:
        with self._lock:
            self.compute_pending += 1

    def compute_done(self, _future: object = None) -> None:
        with self._lock:
            self.compute_pending -= 1

    def count(self, what: str) -> None:
        with self._lock:
            self.work[what] += 1

    def stream_started(self) -> None:
        with self._lock:
            self.streams_started += 1

    def stream_ended(self, reason: str | None) -> None:
        """reason None = cancelled/expired/failed before its end message."""
        with self._lock:
            if reason is None:
                self.streams_cancelled += 1
            else:
                self.streams_completed += 1
                self.stop_reasons[reason] += 1
        if reason is not None:
            self.sink.stop(reason)

    def rung(self, model: str) -> None:
        with self._lock:
            self.rungs_computed += 1
        self.sink.rung(model)

    def batch(self, size: int) -> None:
        self.sink.batch(size)

    def bytes_out(self, method: str, n: int) -> None:
        self.sink.bytes_out(method, n)
