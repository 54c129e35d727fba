"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes started with
`ray start` (the way an operator starts one), each node in its own short temp dir, every port free,
token auth with a token made here (never ~/.ray's), and no dashboard UI.

Nothing here runs `ray stop`: it stops every Ray process on the machine, other sessions' too.
`stop()` kills exactly the processes this cluster started: every process whose command line names
one of its temp dirs or its GCS address, and all their descendants (workers and agents are children
of their node's raylet), so a test that fails half-way still leaves nothing behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support.synthetic import free_port

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


class RayCluster:
    """`ray start --head` plus `ray start --address` nodes, all on 127.0.0.1."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        """`env`: extra environment of every Ray process (RAY_* settings read by Ray and Serve)."""
        # Unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under 108
        # bytes: a short private root under /tmp, not pytest's deep tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix="psray-", dir="/tmp"))
        self.taken: set[int] = set()
        self.gcs_port = self.port()
        self.dashboard_port = self.port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), **(env or {})}
        self.nodes: dict[str, Path] = {}

    def port(self) -> int:
        """A free port not yet given to this cluster: free_port alone can return the same port twice
        (the kernel reuses a just-closed one), and `ray start` refuses two components on one port."""
        while (p := free_port()) in self.taken:
            pass
        self.taken.add(p)
        return p

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict[str, float]) -> None:
        temp = self.root / name
        self.nodes[name] = temp
        res = "{" + ",".join(f'"{k}": {v}' for k, v in resources.items()) + "}"
        cmd = [RAY, "start", *args, "--num-cpus", str(num_cpus), "--resources", res, "--temp-dir", str(temp),
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--min-worker-port", "0",
               "--max-worker-port", "0", "--dashboard-agent-listen-port", str(self.port()),
               "--metrics-export-port", str(self.port())]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start {name} failed ({out.returncode}):\n{out.stderr[-4000:]}")

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(self.port())],
                    num_cpus, resources or {})

    def add_node(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
        self._start(name, ["--address", self.address], num_cpus, resources or {})

    def _ours(self, cmd: list[str], node: str | None) -> bool:
        """Whether a command line is one of this cluster's processes (of `node`: its raylet)."""
        if node is not None:
            return bool(cmd) and cmd[0].endswith("raylet") and any(str(self.nodes[node]) + "/" in a for a in cmd)
        gcs = (f"--address=127.0.0.1:{self.gcs_port}", f"--gcs-address=127.0.0.1:{self.gcs_port}")
        return any(str(self.root) + "/" in a or a in gcs for a in cmd)

    def processes(self, node: str | None = None) -> list[psutil.Process]:
        """This cluster's processes, with their descendants (of one node: its raylet and what it runs)."""
        me = os.getpid()
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != me and self._ours(p.info["cmdline"] or [], node):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except psutil.Error:
                continue
        return list(found.values())

    def raylet(self, node: str) -> psutil.Process:
        for p in self.processes(node):
            try:
                if p.name() == "raylet":
                    return p
            except psutil.Error:
                continue
        raise LookupError(f"no raylet for node {node}")

    def kill_node(self, node: str) -> None:
        """SIGKILL the node's raylet: its workers (replicas) and agents exit with it, as on a lost machine."""
        self.raylet(node).send_signal(signal.SIGKILL)

    def serve_deploy(self, config_file: Path, timeout: float = 120) -> None:
        out = subprocess.run([SERVE, "deploy", str(config_file), "--address", self.dashboard], env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"serve deploy failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")

    def stop(self) -> None:
        for _ in range(3):
            procs = self.processes()
            if not procs:
                break
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(pred, timeout: float, every: float = 0.5, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
