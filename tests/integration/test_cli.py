"""The `progsae` entry point as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from progsae.cli import build_parser, main
from tests.unit.test_checkpoint import write


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "progsae.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("inspect", "demo"):
        assert cmd in out.stdout
    assert set(build_parser()._subparsers._group_actions[0].choices) >= {"inspect", "demo"}


def test_inspect_prints_the_checkpoint(tmp_path, capsys):
    path, _ = write(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture matryoshka" in out and "d_sae        32" in out
    assert "granularities 4, 8, 16, 32" in out and "mean_sq" in out and "layer 3" in out
    assert "reference    none recorded" in out  # written before checkpoints recorded one
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["progsae"]["reference_variance"] = 12.5
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(path)]) == 0
    assert "reference    variance 12.5 per token" in capsys.readouterr().out


def test_inspect_of_a_broken_checkpoint_is_one_line(tmp_path, capsys):
    path, _ = write(tmp_path)
    (path / "cfg.json").write_text("{")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cfg.json" in err and "Traceback" not in err
