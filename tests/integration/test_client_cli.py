"""`progsae client ...` against a plain grpcio server on a loopback port."""

from __future__ import annotations

import numpy as np
import pytest

from progsae.cli import main
from progsae.cli.serve import roots_and_ids
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from tests.support import synthetic as testing


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    testing.make_checkpoint(root / "mat", d=32, m=256, k=8, architecture="matryoshka", orderings=False)
    with PlainServer(RegistryConfig(root=str(root))) as s:
        yield s


def test_models_encode_decode_stream(server, tmp_path, capsys):
    t = ["client", "--target", server.address]
    assert main([*t, "models"]) == 0
    assert "mat@none" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", testing.sample_activations(32, d=32, m=256).numpy())
    assert main([*t, "encode", "--npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "c.npz")]) == 0
    assert "32 tokens" in capsys.readouterr().out
    assert main([*t, "decode", str(tmp_path / "c.npz"), "-g", "64", "--out", str(tmp_path / "r.npy")]) == 0
    assert np.load(tmp_path / "r.npy").shape == (32, 32)
    capsys.readouterr()
    assert main([*t, "stream", "--npy", str(tmp_path / "x.npy"), "--target-fvu", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "stop: target_fvu" in out
    assert main([*t, "stream", "--npy", str(tmp_path / "x.npy"), "--token-target-fvu", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "refining" in out and "met the per-token target" in out
    assert main([*t, "stream", "--npy", str(tmp_path / "x.npy"), "--axis", "k", "--k-ladder", "1,4",
                 "--max-g", "128"]) == 0
    out = capsys.readouterr().out
    assert "stop: ladder_done after 2 rungs (G=128, k'=4)" in out


def test_errors_are_one_line(server, capsys):
    with pytest.raises(SystemExit) as e:
        main(["client", "--target", server.address, "encode", "--model", "nope", "--random", "4"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOT_FOUND" in err


def test_serve_ids_from_paths(tmp_path):
    testing.make_checkpoint(tmp_path / "a" / "mat", d=8, m=32, k=4, orderings=False)
    testing.make_checkpoint(tmp_path / "b" / "topk", d=8, m=32, k=4, orderings=False)
    root, ids = roots_and_ids([str(tmp_path / "a" / "mat"), str(tmp_path / "b" / "topk")])
    assert root == tmp_path.resolve() and ids == ["a/mat", "b/topk"]
