"""`progsae harvest --ray-address` on a real two-node Ray cluster (tests/support/ray_cluster.py: `ray start --head`
plus `ray start --address`, one CPU each, on this machine) with the real model. A run SIGKILLed after its
first shard is resumed; the resumed run loses the worker node (its raylet SIGKILLed as soon as both
workers are ready, so the worker node holds shards) and finishes on the head's worker. The cache is
byte-identical to a single-process harvest of the same settings. Every Ray process the test started is
killed by pid.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from progsae.lm import models as M
from progsae.trainer.data import harvest as H
from progsae.trainer.data.activations import Manifest
from tests.support.ray_cluster import RayCluster, wait_for

SHARDS, PER_SHARD = 8, 32
SETTINGS = dict(corpus="wikipedia,chitchat", split="heldout", context=32, batch=4, threads=1,
                shard_tokens=PER_SHARD * 31, tokens=SHARDS * PER_SHARD * 31, progress=False)
"""8 shards of 32 contexts (8 forward passes each): each kill lands while shards are left."""
SLOW = 600
"""Seconds allowed for a run: Ray workers load the model on a busy 2-core machine."""


def argv(out: Path, address: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "progress"]
    return [sys.executable, "-m", "progsae.cli", "harvest", f"--out={out}", *flags, "--no-progress",
            f"--ray-address={address}"]


@pytest.fixture(scope="module")
def lm() -> M.LoadedModel:
    torch.set_num_threads(1)
    return M.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory) -> Path:
    """The single-process harvest of the same settings."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    H.harvest(H.HarvestConfig(out=str(out), **SETTINGS), lm=lm)
    return out


class Run:
    """`progsae harvest --ray-address` in a subprocess, its stderr collected as it comes."""

    def __init__(self, out: Path, cluster: RayCluster):
        self.proc = subprocess.Popen(argv(out, cluster.address), env=cluster.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def registered(self, out: Path) -> int:
        return len(Manifest.load(out).shards) if (out / "manifest.json").is_file() else 0

    def wait_registered(self, out: Path, n: int) -> None:
        wait_for(lambda: self.registered(out) >= n or self.proc.poll() is not None, SLOW, 0.02,
                 f"{n} shards registered")

    def finish(self, kill: bool = False) -> int:
        if kill:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=SLOW)
        self.reader.join(timeout=30)
        return rc


def nodes_used(err: str) -> dict[str, int]:
    """Shards computed per node, from the driver's last line."""
    m = re.search(r"ray: (\d+) shards on (\d+) nodes \((.*)\)", err)
    assert m, err[-3000:]
    return {n: int(c) for n, c in (kv.split(": ") for kv in m.group(3).split(", "))}


def same_cache(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names  # no stray temp or torn files
    for n in names:
        if n != "manifest.json":
            assert (got / n).read_bytes() == (want / n).read_bytes(), n
    # the manifest's bytes, once this run's timing is put in the reference's place
    g, w = (json.loads((d / "manifest.json").read_text()) for d in (got, want))
    assert g["extra"]["timing"]["rows_this_run"] > 0
    g["extra"]["timing"] = w["extra"]["timing"]
    assert json.dumps(g, indent=2) == (want / "manifest.json").read_text()


def test_ray_harvest_killed_then_node_lost_is_byte_identical_to_one_process(reference, tmp_path) -> None:
    out = tmp_path / "ray"
    with RayCluster() as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_node("worker", num_cpus=1)

        first = Run(out, cluster)  # SIGKILLed once its first shard is registered
        first.wait_registered(out, 1)
        first.finish(kill=True)
        written = first.registered(out)
        assert 1 <= written <= SHARDS // 2 and not Manifest.load(out).complete, (written, first.err[-3000:])
        assert "ray: 2 workers (1 CPUs, 0 GPUs, 1 threads each)" in first.err
        # the crash window between a shard's files and its registration: a torn file, never registered
        (out / f"acts-{written:05d}.npy").write_bytes(b"half a shard")

        second = Run(out, cluster)  # resumes; loses the worker node as soon as both workers are ready
        wait_for(lambda: second.err.count("ready on node") == 2 or second.proc.poll() is not None, SLOW,
                 what="both workers ready")
        # the driver gives a worker shards as it logs it ready: 4 or more were left when both started
        # loading the model and the other worker holds at most 2, so the worker node now computes shards
        cluster.kill_node("worker")
        assert second.finish() == 0, second.err[-3000:]
    err = second.err
    assert f"resuming after {written * PER_SHARD * 31:,} tokens in {written} shards" in err
    assert re.search(r"ray: lost a worker \(.+\); 1 left, its shards go to them", err), err[-3000:]
    per_node = nodes_used(err)
    assert sum(per_node.values()) == SHARDS - written, err[-3000:]  # each shard once, lost ones redone
    same_cache(out, reference)


def test_ray_flags_need_an_address_and_a_reachable_cluster(tmp_path, capsys) -> None:
    from progsae.cli import main
    from tests.support.synthetic import free_port

    assert main(["harvest", f"--out={tmp_path / 'x'}", "--ray-workers=2"]) == 2
    assert capsys.readouterr().err.strip() == "progsae harvest: error: --ray-workers needs --ray-address"
    port = free_port()  # nothing listens there: one line at once, not Ray's minutes of retries
    assert main(["harvest", f"--out={tmp_path / 'x'}", "--split=heldout", "--tokens=31",
                 f"--ray-address=127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"progsae harvest: error: cannot connect to Ray at 127.0.0.1:{port}: Connection refused"
    assert not (tmp_path / "x").exists()


def test_shard_bytes_do_not_depend_on_what_ran_before(lm, reference) -> None:
    """What makes a worker's shard equal the single-process one: `shard_activations` of a shard's
    contexts alone, after other passes on the same model, gives the reference shard's bytes."""
    import numpy as np

    ctx = np.load(reference / "tokens-00003.npy")
    acts = H.shard_activations(lm, ctx, 15, SETTINGS["batch"])
    assert acts.tobytes() == np.load(reference / "acts-00003.npy").tobytes()
