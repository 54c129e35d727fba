"""Flags generated from dataclasses (progsae.clients.flags), the outlier policy's one spelling, and
every `progsae` subcommand built from its config."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from progsae.cli import build_parser, main
from progsae.cli.main import COMMANDS
from progsae.clients.flags import Parser, add_dataclass, field_docs
from progsae.trainer.data import outlier_policy
from progsae.trainer.data.outlier_policy import DEFAULT, KEEP_ALL, OutlierPolicy


@dataclass
class Options:
    """A bit of everything the helper maps."""

    path: str = field(metadata={"positional": True})
    """Where to read
    (a docstring over two lines)."""
    out: str
    """Where to write; 100% required."""
    batch_size: int = 4096
    """Rows per step."""
    lr: float = 1e-3
    """Step size."""
    arch: Literal["topk", "matryoshka"] = "matryoshka"
    """Which loss."""
    ladder: tuple[int, ...] = ()
    """Nested sizes."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    limit: int | None = None
    """At most this many."""
    verbose: bool = False
    """Say more."""
    progress: bool = True
    """Show a progress bar."""
    extra: dict | None = None
    """Free-form options."""
    outlier_factor: OutlierPolicy = DEFAULT
    """Row policy."""
    tokens_wanted: int = field(default=0, metadata={"flags": "--tokens"})
    """Renamed flag."""
    no_docstring: int = 3


def parser_for(*classes, **kw) -> tuple[argparse.ArgumentParser, list]:
    p = Parser(prog="t")
    return p, [add_dataclass(p, c, **kw) for c in classes]


def test_docstrings_are_read_once_per_class():
    docs = field_docs(Options)
    assert docs["path"] == "Where to read (a docstring over two lines)."
    assert docs["batch_size"] == "Rows per step." and "no_docstring" not in docs
    assert field_docs(Options) is docs


def test_defaults_round_trip():
    p, (b,) = parser_for(Options)
    o = b.build(p.parse_args(["in.npy", "--out", "o"]))
    assert o == Options(path="in.npy", out="o")


def test_every_kind_of_flag():
    p, (b,) = parser_for(Options)
    o = b.build(p.parse_args([
        "in", "--out", "o", "--batch-size", "8", "--lr", "0.5", "--arch", "topk", "--ladder", "4,8,16",
        "--betas", "0.5,0.6", "--limit", "3", "--verbose", "--no-progress", "--extra", '{"a": 1}',
        "--outlier-factor", "off", "--tokens", "7", "--no-docstring", "9",
    ]))
    assert o == Options(path="in", out="o", batch_size=8, lr=0.5, arch="topk", ladder=(4, 8, 16), betas=(0.5, 0.6),
                        limit=3, verbose=True, progress=False, extra={"a": 1}, outlier_factor=KEEP_ALL,
                        tokens_wanted=7, no_docstring=9)


def test_help_is_the_docstring_and_the_default():
    p, _ = parser_for(Options)
    text = " ".join(p.format_help().split())
    assert "--batch-size BATCH_SIZE Rows per step. (default: 4096)" in text
    assert "Where to write; 100% required." in text and "(default: 0.9,0.999)" in text
    assert "--no-progress turn off: show a progress bar." in text
    assert "--outlier-factor OUTLIER_FACTOR Row policy. (default: 10)" in text
    assert "--tokens TOKENS Renamed flag." in text
    assert "--limit LIMIT At most this many." in text and "--extra JSON" in text
    assert "--ladder LADDER Nested sizes." in text  # an empty default is not shown


@pytest.mark.parametrize("argv,msg", [
    ([], "required: path, --out"),
    (["x", "--out", "o", "--arch", "dense"], "invalid choice: 'dense'"),
    (["x", "--out", "o", "--ladder", "4,x"], "expected comma-separated integers, got '4,x'"),
    (["x", "--out", "o", "--betas", "0.5"], "expected 2 comma-separated values"),
    (["x", "--out", "o", "--extra", "[1]"], "expected a JSON object"),
    (["x", "--out", "o", "--outlier-factor", "-1"], "--outlier-factor: expected a positive factor"),
])
def test_errors_are_one_line_exit_2(capsys, argv, msg):
    p, _ = parser_for(Options)
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("t: error: ") and msg in err, err


def test_only_exclude_and_meta():
    p, (b,) = parser_for(Options, only=["path", "out", "lr"], meta={"out": {"metavar": "DIR"}})
    assert "--out DIR" in p.format_help() and "--batch-size" not in p.format_help()
    assert b.names == ("path", "out", "lr")
    o = b.build(p.parse_args(["x", "--out", "o"]), batch_size=5)
    assert o.batch_size == 5 and o.lr == 1e-3
    with pytest.raises(ValueError, match="no field"):
        parser_for(Options, exclude=["nope"])


def test_two_classes_one_parser_and_a_mutually_exclusive_group():
    @dataclass
    class Source:
        npy: str | None = field(default=None, metadata={"one_of": "src"})
        random: int | None = field(default=None, metadata={"one_of": "src", "metavar": "N"})

    @dataclass
    class Call:
        files: tuple[str, ...] = field(metadata={"positional": True})
        granularity: int = field(metadata={"flags": ("-g", "--granularity")})

    p, (src, call) = parser_for(Source, Call)
    args = p.parse_args(["a", "b", "-g", "4", "--random", "3"])
    assert src.build(args) == Source(random=3) and call.build(args) == Call(files=("a", "b"), granularity=4)
    for bad in (["a", "-g", "4"], ["a", "-g", "4", "--npy", "x", "--random", "3"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_unsupported_types_are_refused_at_registration():
    @dataclass
    class Nested:
        inner: Options | None = None

    with pytest.raises(TypeError, match="inner"):
        parser_for(Nested)


# --- OutlierPolicy ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,factor", [("10", 10.0), ("3", 3.0), ("1.5", 1.5), ("0", None), ("0.0", None),
                                         ("none", None), ("OFF", None)])
def test_outlier_policy_parse(text, factor):
    assert OutlierPolicy.parse(text).factor == factor


@pytest.mark.parametrize("text", ["-1", "-0.5", "nan", "inf", "ten", ""])
def test_outlier_policy_rejects(text):
    with pytest.raises(ValueError, match="positive factor"):
        OutlierPolicy.parse(text)
    with pytest.raises(ValueError):
        OutlierPolicy(-1.0)


def test_outlier_policy_records_and_inherits():
    from progsae.sae.checkpoint import CheckpointMeta

    def meta(extra):
        return CheckpointMeta(architecture="topk", d_in=4, d_sae=8, k=2, granularities=(4, 8), scale=1.0,
                              extra=extra)

    assert DEFAULT.factor == outlier_policy.DEFAULT_FACTOR == 10.0 and str(DEFAULT) == "10" and str(KEEP_ALL) == "off"
    assert KEEP_ALL.threshold(3.0) == float("inf") and OutlierPolicy(2).threshold(3.0) == 6.0
    assert OutlierPolicy.from_record(None) is KEEP_ALL and OutlierPolicy.from_record(3) == OutlierPolicy(3.0)
    assert outlier_policy.trained_with(meta({})) == DEFAULT  # e.g. SAELens: nothing recorded
    assert outlier_policy.trained_with(meta({"train_config": {"outlier_factor": 3.0}})) == OutlierPolicy(3.0)
    assert outlier_policy.trained_with(meta({"train_config": {"outlier_factor": None}})) == KEEP_ALL
    assert outlier_policy.resolve(None, meta({"outlier_factor": 2.0})) == OutlierPolicy(2.0)
    assert outlier_policy.resolve(KEEP_ALL, meta({"outlier_factor": 2.0})) == KEEP_ALL
    with pytest.raises(ValueError, match="outlier_factor=-1"):
        outlier_policy.trained_with(meta({"outlier_factor": -1}))


def test_train_config_records_a_float_or_null():
    from progsae.trainer.training.config import TrainConfig

    cfg = TrainConfig(d_sae=32, k=4, outlier_factor=OutlierPolicy(3))
    assert cfg.to_dict()["outlier_factor"] == 3.0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({**cfg.to_dict(), "outlier_factor": None}).outlier_factor == KEEP_ALL


# --- the `progsae` subcommands -----------------------------------------------------------------------


def test_every_subcommand_builds_its_flags():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    assert set(sub) == set(COMMANDS)
    for name, p in sub.items():
        calls = p._subparsers._group_actions[0].choices if name == "client" else {name: p}
        assert p.format_help() and all(c.get_default("run") for c in calls.values()), name


@pytest.mark.parametrize("command", ["train", "eval", "order", "features"])
def test_outlier_factor_spelled_once(command, capsys):
    """A negative factor is the same one-line error in every command; the default is the one constant."""
    flags = {"train": ["--activations", "a", "--out", "o"]}.get(command, ["ck", "--activations", "a"])
    with pytest.raises(SystemExit) as e:
        main([command, *flags, "--outlier-factor", "-2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"progsae {command}: error: argument --outlier-factor: expected a positive factor"), err
    p = build_parser([command])._subparsers._group_actions[0].choices[command]
    assert p.get_default("outlier_factor") == (DEFAULT if command == "train" else None)


def test_flags_and_defaults_kept():
    """The flags and defaults the commands had before they were generated (README, RESULTS, Makefile)."""
    sub = build_parser()._subparsers._group_actions[0].choices

    def defaults(cmd):
        return {a.option_strings[-1] if a.option_strings else a.dest: a.default
                for a in sub[cmd]._actions if a.dest != "help"}

    expect = {
        "harvest": {"--model": "smollm2-135m", "--layer": 15, "--corpus": "wikipedia,chitchat", "--split": "train",
                    "--tokens": 2_000_000, "--context": 128, "--batch": 8, "--shard-tokens": 65_536, "--seed": 0,
                    "--start-token": None, "--device": "cpu", "--threads": None, "--metrics-port": None,
                    "--no-progress": True},
        "train": {"--arch": "matryoshka", "--d-sae": 4096, "--k": 32, "--granularities": (), "--group-weights": (),
                  "--tokens": 0, "--batch-size": 4096, "--lr": 0.0, "--seed": 0, "--checkpoint-every": 100,
                  "--log-every": 10, "--dead-tokens": 0, "--outlier-factor": DEFAULT, "--threads": 0,
                  "--no-progress": True, "--metrics-port": None},
        "order": {"--by": ("mean_sq",), "--tokens": 0, "--batch-size": 4096, "--outlier-factor": None},
        "eval": {"--ordering": "all", "--ce": False, "--ce-contexts": 32, "--ce-batch": 4, "--rsa-tokens": 2000,
                 "--batch-size": 4096, "--outlier-factor": None, "--max-tokens": None, "--seed": 0,
                 "--no-write": True},
        "features": {"--top-n": 8, "--window": 8, "--promoted": 10, "--tokens": 0, "--batch-contexts": 32,
                     "--outlier-factor": None, "--no-lens": True},
        "report": {"--out": "report"},
        "serve": {"--grpc-port": 9000, "--http-port": 8000, "--host": "127.0.0.1", "--num-cpus": 2,
                  "--metrics-port": None, "--no-text": True, "--auth-token-env": "", "--autoscaling": None},
        "client": {"--target": "localhost:9000", "--timeout": 30.0, "--token": None, "--tls-ca": ""},
        "demo": {"--out": "demo_out", "--grpc-port": 9000, "--http-port": 8000, "--no-serve": True,
                 "--no-wait": True},
    }
    for cmd, want in expect.items():
        have = defaults(cmd)
        assert {k: have.get(k, "<missing>") for k in want} == want, cmd
    required = {cmd: sorted(a.option_strings[-1] for a in sub[cmd]._actions if a.required and a.option_strings)
                for cmd in ("harvest", "train", "order", "eval", "features")}
    assert required == {"harvest": ["--out"], "train": ["--activations", "--out"], "order": ["--activations"],
                        "eval": ["--activations"], "features": []}
    # features reads a cache or a text file: one of the two, required
    groups = [sorted(a.option_strings[-1] for a in g._group_actions)
              for g in sub["features"]._mutually_exclusive_groups if g.required]
    assert groups == [["--activations", "--texts"]]


def test_help_stays_light():
    """Listing the commands imports neither torch nor Ray nor transformers."""
    code = ("import sys; from progsae.cli import build_parser; build_parser([]).format_help(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
