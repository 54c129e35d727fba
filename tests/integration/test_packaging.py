"""Packaging: committed stubs match the .proto, the wheel carries them, and the light client
(clients/python) installs into a fresh virtualenv without torch or Ray and streams from a server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from tests.support import synthetic as testing

REPO = Path(__file__).resolve().parents[2]


def _wheel(src: Path, out: Path) -> Path:
    """Build a wheel of `src` into `out`, leaving no build/ folder behind in the source tree."""
    fresh = not (src / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(out), str(src)], check=True, capture_output=True, text=True)
    finally:
        if fresh:
            shutil.rmtree(src / "build", ignore_errors=True)
    (whl,) = out.glob("*.whl")
    return whl


def test_committed_stubs_are_what_protoc_makes():
    r = subprocess.run([sys.executable, str(REPO / "proto" / "build.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_wheel_carries_stubs_static_files_and_every_package(tmp_path):
    names = set(zipfile.ZipFile(_wheel(REPO, tmp_path)).namelist())
    for f in ("progsae/v1/progsae_pb2.py", "progsae/v1/progsae_pb2_grpc.py", "progsae/v1/progsae.proto",
              "progsae/server/static/index.html", "progsae/sae/codec.py", "progsae/lm/models.py",
              "progsae/trainer/training/train.py", "progsae/clients/client.py", "progsae/cli/main.py"):
        assert f in names, f
    assert "progsae/__init__.py" not in names  # a PEP 420 namespace: the light client can sit beside it
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(_wheel(REPO, tmp_path / "again")).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any("grpcio-tools" in r for r in requires), requires


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory):
    """A fresh virtualenv holding only the light client wheel and its dependencies."""
    tmp = tmp_path_factory.mktemp("light")
    whl = _wheel(REPO / "clients" / "python", tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(whl)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return venv


def test_light_client_installs_without_torch_or_ray_and_streams(light_venv, tmp_path):
    py = str(light_venv / "bin" / "python")
    probe = ("import importlib.util as u; "
             "print([m for m in ('torch', 'ray', 'transformers', 'matplotlib') if u.find_spec(m)])")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
    root = tmp_path / "ckpts"
    testing.make_checkpoint(root / "mat", d=32, m=256, k=8, architecture="matryoshka", orderings=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with PlainServer(RegistryConfig(root=str(root))) as s:
        # one console script per distribution: the light client's is progsae-client, never progsae
        assert not (light_venv / "bin" / "progsae").exists()
        r = subprocess.run([str(light_venv / "bin" / "progsae-client"), "--target", s.address, "stream",
                            "--random", "16", "--model", "mat"], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert "stop: ladder_done" in r.stdout and r.stdout.count("\n") >= 4, r.stdout
        code = ("from progsae.clients import Client; import numpy as np\n"
                f"with Client({s.address!r}) as c:\n"
                "    x = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)\n"
                "    rungs = list(c.stream(x, model='mat'))\n"
                "    print(len(rungs), rungs[-1].g)\n")
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[1] == "256"
