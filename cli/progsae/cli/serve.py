"""`progsae serve CKPT...`: the app on a local Ray instance (AppConfig + LocalCluster); Ctrl-C stops it cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

from .main import UserError

if TYPE_CHECKING:
    from progsae.server.config import AppConfig
    from progsae.server.launch import LocalCluster

HELP = "serve checkpoints over gRPC (and HTTP) with Ray Serve on a local Ray instance"

APP_FLAGS_EXCLUDED = (
    "checkpoint_root", "models",  # from the positional checkpoints
    "limits",  # nested: set it in a Serve config
    "auth_token",  # a literal token on the command line is visible to every user: --auth-token-env
    "access_log",  # LocalCluster's --access-log (the proxies') is the one a local run wants
    "direct_grpc_port", "direct_grpc_host",  # LocalCluster's --direct-grpc-port, bound on --host
)


@dataclass
class ServeRun:
    """What to serve."""

    checkpoints: tuple[str, ...] = field(metadata={"positional": True})
    """Checkpoint directories to serve (ids = their paths under their common root)."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.server.config import AppConfig
    from progsae.server.launch import LocalCluster

    run_options = add_dataclass(parser, ServeRun)
    cluster = add_dataclass(parser, LocalCluster)
    app = add_dataclass(parser, AppConfig, exclude=APP_FLAGS_EXCLUDED,
                        meta={"auth_token_env": {"metavar": "VAR"}})

    def start(args: argparse.Namespace) -> int:
        root, ids = roots_and_ids(run_options.build(args).checkpoints)
        return run(app.build(args, checkpoint_root=str(root), models=tuple(ids)), cluster.build(args))

    parser.set_defaults(run=start)


def roots_and_ids(paths: tuple[str, ...] | list[str]) -> tuple[Path, list[str]]:
    """The common parent of the checkpoints, and each one's id (its path relative to it)."""
    from progsae.sae import checkpoint

    dirs = [Path(p).resolve() for p in paths]
    for d in dirs:
        checkpoint.load_meta(d)  # fail early, in one line, on a bad checkpoint
    root = Path(os.path.commonpath([d.parent for d in dirs]))
    return root, [d.relative_to(root).as_posix() for d in dirs]


def run(app: AppConfig, cluster: LocalCluster) -> int:
    from progsae.server import launch

    if app.auth_token_env and not os.environ.get(app.auth_token_env):
        raise UserError(f"--auth-token-env {app.auth_token_env}: that variable is empty")
    print(f"starting Ray Serve for {', '.join(app.models)} (root {app.checkpoint_root}) ...", flush=True)
    stop = threading.Event()
    try:
        addrs = launch.start(app, cluster)
        # Installed after ray.init (which sets its own crash handlers): Ctrl-C and SIGTERM both
        # stop cleanly, also when the shell started us in the background with SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"gRPC    {addrs['grpc']}   (progsae.v1.Progsae, grpc.health.v1.Health, reflection; Serve's proxy)")
        if addrs["direct"]:
            print(f"gRPC    {addrs['direct']}   (the same service on the codec replicas' own port: the fast path)")
        print(f"HTTP    {addrs['http']}/api/models")
        if addrs["metrics"]:
            print(f"metrics {addrs['metrics']}")
        print(f"try: progsae client --target {addrs['direct'] or addrs['grpc']} models    (Ctrl-C stops)", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        launch.stop()
        print("stopped", flush=True)
    return 0
