"""The dashboard's HTTP text stream: time to the first rung and to the end, p50 over N calls.

Starts the Ray Serve app (`progsae serve`'s local default) on the given checkpoints, warms each model
(its checkpoint and the language model load on first use), then sends N `POST /api/stream` calls with
a real sentence, one after another, reading the server-sent events as they arrive:

    first rung   request sent -> the first `rung` event read
    end          request sent -> the `end` event read

Run it alone (2-core machine): Ray and the language model share the CPUs with nothing else.

    .venv/bin/python bench/bench_http_stream.py demo_out/ckpt --models mat,topk --calls 30

To compare with another commit, run the same command from a checkout of it (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower in Paris, named after the engineer "
        "whose company designed and built it.")


def one_stream(base: str, body: dict) -> tuple[float, float, int]:
    """(ms to the first rung event, ms to the end event, rungs) of one streamed call."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/api/stream", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = end = None
    rungs = 0
    event = ""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            now = 1e3 * (time.perf_counter() - t0)
            if event == "rung":
                rungs += 1
                first = first if first is not None else now
            elif event == "end":
                end = now
            elif event == "error":
                raise RuntimeError(f"stream failed: {line[6:]}")
    conn.close()
    if first is None or end is None:
        raise RuntimeError("stream ended without a rung or an end event")
    return first, end, rungs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="checkpoint root (e.g. demo_out/ckpt)")
    p.add_argument("--models", default="mat,topk", help="comma-separated model ids under the root")
    p.add_argument("--calls", type=int, default=30, help="timed calls per model")
    p.add_argument("--top", type=int, default=8, help="features per token per rung (the dashboard's)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    a = p.parse_args()

    from progsae.server import launch
    from progsae.server.config import AppConfig

    root = Path(a.root).resolve()
    cluster = launch.LocalCluster(grpc_port=_free(), http_port=_free(), num_cpus=2, direct_grpc_port=0)
    addrs = launch.start(AppConfig(checkpoint_root=str(root), torch_threads=1), cluster)
    out = {}
    try:
        for model in a.models.split(","):
            body = {"model_id": model, "text": TEXT, "top": a.top}
            for _ in range(3):
                one_stream(addrs["http"], body)  # loads the checkpoint and the language model
            runs = [one_stream(addrs["http"], body) for _ in range(a.calls)]
            first = statistics.median(r[0] for r in runs)
            end = statistics.median(r[1] for r in runs)
            out[model] = {"first_rung_ms_p50": round(first, 1), "end_ms_p50": round(end, 1), "rungs": runs[0][2],
                          "calls": a.calls}
            print(f"{model:10s} first rung p50 {first:7.1f} ms   end p50 {end:7.1f} ms   ({runs[0][2]} rungs, "
                  f"{a.calls} calls)", flush=True)
    finally:
        launch.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


def _free() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
