"""Training end to end on tiny synthetic caches: checkpoint contents, kill -9 resume, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from progsae import cli
from progsae.sae import checkpoint, metrics
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.training.train import train
from progsae.trainer.training.train_state import state_dir
from tests.support.caches import D, make_cache, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def last_batch(cache: Path, meta: checkpoint.CheckpointMeta) -> torch.Tensor:
    """The raw activations of the last optimiser step: the trainer's shuffled order of the rows its
    outlier policy keeps (ActivationCache.batches with the run's seed), batch number steps - 1."""
    cfg, steps = meta.extra["train_config"], meta.extra["steps"]
    acts = ActivationCache(cache)  # the default outlier policy, the one the run recorded:
    assert {k: acts.outliers()[k] for k in ("threshold", "excluded", "total")} == {
        k: meta.extra["outlier_policy"][k] for k in ("threshold", "excluded", "total")}
    epochs = -(-steps // (len(acts) // cfg["batch_size"]))
    (x,) = acts.batches(cfg["batch_size"], shuffle=True, seed=cfg["seed"], start_batch=steps - 1, epochs=epochs)
    return x


def weights(path: Path) -> dict[str, torch.Tensor]:
    ck = checkpoint.load(path)
    return {"W_enc": ck.sae.W_enc, "W_dec": ck.sae.W_dec, "b_enc": ck.sae.b_enc, "b_dec": ck.sae.b_dec}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("acts") / "train")


FREE = {"decoder_norm": "free", "auxk_norm": "batch"}
"""SAELens's TopK recipe: rows free in norm (folded into the checkpoint), AuxK on the batch's scale."""


@pytest.mark.parametrize("arch,recipe", [("matryoshka", {}), ("topk", {}), ("topk", FREE), ("matryoshka", FREE)])
def test_train_writes_checkpoint(cache, tmp_path, arch, recipe):
    out = train(tiny(arch, **recipe), cache, tmp_path / "ck", progress=False)
    ck = checkpoint.load(out)
    m = ck.meta
    assert (m.architecture, m.d_in, m.d_sae, m.k) == (arch, D, 32, 4)
    assert m.granularities == (4, 8, 16, 32) and m.model == "synthetic" and m.layer == 3
    assert m.training_tokens == (1200 // 32) * 32 and m.scale > 0
    assert m.extra["train_config"]["arch"] == arch and m.extra["outlier_policy"]["factor"] == 10.0
    tc = m.extra["train_config"]  # the defaults are not recorded: older runs compare equal
    assert {k: tc[k] for k in FREE if k in tc} == recipe
    assert m.extra["tokens_per_s"] > 0 and m.extra["dead_window_tokens"] == 118
    # the FVU baseline of served texts: per-token variance of the kept rows (the sample covers all 1,200)
    kept = ActivationCache(cache)
    assert m.reference_variance == pytest.approx(metrics.token_variance(kept.gather(kept.rows())), rel=1e-9)
    torch.testing.assert_close(ck.sae.W_dec.norm(dim=1) * m.scale, torch.ones(32), rtol=1e-4, atol=1e-4)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 37]
    assert {"step", "tokens", "loss", "fvu", "l0", "dead_frac", "tokens_per_s"} <= log[0].keys()
    assert log[-1]["fvu"] < 1.0 and log[-1]["l0"] <= 4
    assert not state_dir(out).exists()
    assert ("fvu_rungs" in log[0]) == ("fvu_saved_rungs" in log[-1]) == (arch == "matryoshka")
    assert "fvu_saved" in log[-1] and not any("fvu_saved" in r for r in log[:-1])
    # decoding the last step's batch through the saved checkpoint reproduces the logged FVU of the
    # saved weights (`fvu` is measured before that step's update, `fvu_saved` after it); with free
    # decoder rows this checks the fold into unit rows
    x = last_batch(cache, ck.meta)
    codes = ck.sae.encode(x)
    rungs = log[-1].get("fvu_saved_rungs", [log[-1]["fvu_saved"]])
    ladder = m.granularities if arch == "matryoshka" else (m.d_sae,)
    fvus = [metrics.fvu(x, ck.sae.decode(codes, g)) for g in ladder]
    assert fvus == pytest.approx(rungs, rel=1e-6) and fvus[-1] == pytest.approx(log[-1]["fvu_saved"], rel=1e-6)
    # the same batch before the update (float32, in the step's forward): the step lowered its FVU, a little
    assert fvus[-1] < log[-1]["fvu"] < fvus[-1] + 0.05


@pytest.mark.parametrize("recipe", [{}, FREE])
def test_interrupted_run_resumes_to_identical_weights(cache, tmp_path, recipe):
    ref = train(tiny(**recipe), cache, tmp_path / "ref", progress=False)
    out = tmp_path / "res"
    train(tiny(**recipe), cache, out, progress=False, max_steps=12)  # stops after step 12, state at 12
    assert state_dir(out).exists() and not out.exists()
    train(tiny(**recipe), cache, out, progress=False)
    for name, t in weights(ref).items():
        assert torch.equal(t, weights(out)[name]), name
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 37]


def _cmd(cache: Path, out: Path, tokens: int) -> list[str]:
    return [sys.executable, "-m", "progsae.cli", "train", "--activations", str(cache), "--arch", "matryoshka",
            "--d-sae", "32", "--k", "4", "--granularities", "4,8,16,32", "--out", str(out), "--batch-size", "32",
            "--tokens", str(tokens), "--seed", "3", "--checkpoint-every", "20", "--log-every", "10",
            "--threads", "1", "--no-progress"]


KILL_TOKENS = 32 * 600


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref"
    return train(tiny(tokens=KILL_TOKENS, checkpoint_every=20, log_every=10), cache, out, progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_and_rerun_gives_same_weights(cache, uninterrupted, tmp_path, seed):
    """SIGKILL at a random point (after 1..12 log lines: mid-step, mid-state-write, between) then rerun."""
    tokens, ref = KILL_TOKENS, uninterrupted
    kill_after = random.Random(seed).randint(1, 12)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd(cache, out, tokens), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = state_dir(out) / "log.jsonl"
    deadline = time.time() + 300  # generous: a loaded machine starts Python slowly
    while time.time() < deadline and proc.poll() is None:  # kill once a few states are written
        if log.is_file() and log.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert state_dir(out).exists() and not out.exists(), f"the run ended before it was killed: {err.decode()}"
    subprocess.run(_cmd(cache, out, tokens), check=True, env=env, capture_output=True)
    for name, t in weights(ref).items():
        assert torch.equal(t, weights(out)[name]), name
    assert not state_dir(out).exists()


def _main(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("flags,msg", [
    (["--d-sae", "16", "--granularities", "8,32"], "smaller than the largest granularity"),
    (["--d-sae", "32", "--granularities", "16,8,32"], "strictly increasing"),
    (["--d-sae", "32", "--k", "32"], "--k must be"),
    (["--d-sae", "32", "--batch-size", "4096"], "fewer than one batch"),
])
def test_bad_input_one_line_nothing_written(cache, tmp_path, capsys, flags, msg):
    out = tmp_path / "ck"
    rc, err = _main(capsys, "train", "--activations", str(cache), "--out", str(out), "--k", "4", *flags)
    assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert not out.exists() and not state_dir(out).exists()


def test_resume_refuses_other_model_width_or_settings(cache, tmp_path, capsys):
    out = tmp_path / "ck"
    train(tiny(), cache, out, progress=False, max_steps=6)
    other = make_cache(tmp_path / "other", model="another-lm")
    wide = make_cache(tmp_path / "wide", d=12)
    base = ["train", "--out", str(out), "--d-sae", "32", "--k", "4", "--granularities", "4,8,16,32",
            "--batch-size", "32", "--seed", "3", "--checkpoint-every", "5", "--log-every", "5"]
    for acts, extra, msg in [(other, [], "model='synthetic'"), (wide, [], "d_model=8"),
                             (cache, ["--k", "5"], "other settings (k)")]:
        before = sorted(p.name for p in state_dir(out).iterdir())
        rc, err = _main(capsys, *base, "--activations", str(acts), *extra)
        assert rc == 2 and msg in err and err.count("\n") == 1, err
        assert sorted(p.name for p in state_dir(out).iterdir()) == before and not out.exists()


def test_metrics_port_exposes_progress(cache, tmp_path):
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train(tiny("topk"), cache, tmp_path / "ck", progress=False, metrics_port=port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["progsae_train_tokens"].value == 37 * 32
    assert samples["progsae_train_tokens"].labels == {"arch": "topk"}
    assert samples["progsae_train_target_tokens"].value == 37 * 32
    assert 0 < samples["progsae_train_fvu"].value < 1.5 and samples["progsae_train_tokens_per_second"].value > 0
