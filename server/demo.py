"""The serving step of `make demo`: start the app on checkpoints, stream activations through it, stop.

    from progsae.server.demo import serve_and_stream
    serve_and_stream(["demo_out/ckpt/mat", "demo_out/ckpt/topk"], x, model="mat", target_fvu=0.2)
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np


def _free_port(preferred: int) -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", preferred))
    except OSError:
        s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve_and_stream(checkpoints: Sequence[str], activations: np.ndarray, model: str = "",
                     max_g: int | None = None, deadline_ms: int | None = None, target_fvu: float | None = None,
                     text: bool = False, print_fn=print) -> dict:
    """Serve `checkpoints` with Ray Serve, stream `activations` (real LM activations) through gRPC
    printing G / L0 / FVU / ms per rung, then stop Ray. Returns the stream's end facts."""
    from progsae.clients import Client
    from progsae.server import launch
    from progsae.server.cli import roots_and_ids
    from progsae.server.config import AppConfig

    root, ids = roots_and_ids(list(checkpoints))
    cluster = launch.LocalCluster(grpc_port=_free_port(9000), http_port=_free_port(8000))
    addrs = launch.start(AppConfig(checkpoint_root=str(root), models=tuple(ids), text=text), cluster)
    try:
        print_fn(f"serving {', '.join(ids)}: gRPC {addrs['grpc']}, HTTP {addrs['http']}")
        with Client(addrs["grpc"]) as c:
            s = c.stream(np.asarray(activations, dtype=np.float32), model=model or ids[0], max_g=max_g,
                         deadline_ms=deadline_ms, target_fvu=target_fvu, payload="none")
            print_fn(f"{'G':>8} {'L0':>7} {'FVU':>8} {'server ms':>10} {'client ms':>10}")
            for r in s:
                fvu = f"{r.fvu:8.4f}" if r.fvu is not None else f"{'-':>8}"
                print_fn(f"{r.g:8d} {r.mean_l0:7.2f} {fvu} {r.elapsed_ms:10.2f} {r.client_ms:10.2f}")
            res = s.result
        print_fn(f"stop: {res.stop_reason} after {res.rungs} rungs (G={res.final_g})")
        return {"stop_reason": res.stop_reason, "rungs": res.rungs, "final_g": res.final_g,
                "final_fvu": res.final_fvu, **addrs}
    finally:
        launch.stop()
