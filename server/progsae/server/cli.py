"""`progsae serve CKPT...`: the app on a local Ray instance; Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve checkpoints over gRPC (and HTTP) with Ray Serve on a local Ray instance")
    p.add_argument("checkpoints", nargs="+",
                   help="checkpoint directories to serve (ids = paths under their common root)")
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for remote clients)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--metrics-port", type=int, default=None, help="port of Ray's Prometheus endpoint")
    p.add_argument("--no-text", action="store_true", help="do not deploy the language model (no EncodeText)")
    p.add_argument("--auth-token-env", default="", metavar="VAR",
                   help="require `authorization: Bearer <token>` on every call, the token being the value of "
                        "environment variable VAR (default: no auth)")
    p.add_argument("--autoscaling", default=None, metavar="JSON",
                   help='codec autoscaling_config, e.g. \'{"min_replicas": 1, "max_replicas": 2}\'')
    p.set_defaults(func=run)


def roots_and_ids(paths: list[str]) -> tuple[Path, list[str]]:
    """The common parent of the checkpoints, and each one's id (its path relative to it)."""
    from progsae.sae import checkpoint

    dirs = [Path(p).resolve() for p in paths]
    for d in dirs:
        checkpoint.load_meta(d)  # fail early, in one line, on a bad checkpoint
    root = Path(os.path.commonpath([d.parent for d in dirs]))
    return root, [d.relative_to(root).as_posix() for d in dirs]


def run(args: argparse.Namespace) -> int:
    import json

    from progsae.server import launch
    from progsae.server.config import AppConfig

    if args.auth_token_env and not os.environ.get(args.auth_token_env):
        raise SystemExit(f"progsae serve: --auth-token-env {args.auth_token_env}: that variable is empty")
    root, ids = roots_and_ids(args.checkpoints)
    cfg = AppConfig(checkpoint_root=str(root), models=tuple(ids), text=not args.no_text,
                    auth_token_env=args.auth_token_env,
                    autoscaling=json.loads(args.autoscaling) if args.autoscaling else None)
    cluster = launch.LocalCluster(grpc_port=args.grpc_port, http_port=args.http_port, host=args.host,
                                  num_cpus=args.num_cpus, metrics_port=args.metrics_port)
    print(f"starting Ray Serve for {', '.join(ids)} (root {root}) ...", flush=True)
    stop = threading.Event()
    try:
        addrs = launch.start(cfg, cluster)
        # Installed after ray.init (which sets its own crash handlers): Ctrl-C and SIGTERM both
        # stop cleanly, also when the shell started us in the background with SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"gRPC    {addrs['grpc']}   (progsae.v1.Progsae, grpc.health.v1.Health, reflection)")
        print(f"HTTP    {addrs['http']}/api/models")
        if addrs["metrics"]:
            print(f"metrics {addrs['metrics']}")
        print(f"try: progsae client --target {addrs['grpc']} models    (Ctrl-C stops)", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        launch.stop()
        print("stopped", flush=True)
    return 0
