"""Checkpoint format: bit-exact round trip, every corruption caught with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from progsae.sae import checkpoint as ck
from progsae.sae import ordering as om
from tests.conftest import random_sae


def write(tmp_path: Path, scale: float = 1.0) -> tuple[Path, object]:
    sae = random_sae(d=8, m=32, k=4, seed=5, scale=scale)
    acc = om.ImportanceAccumulator(sae)
    acc.update(sae.encode(torch.randn(50, 8)))
    meta = ck.CheckpointMeta("matryoshka", 8, 32, 4, (4, 8, 16, 32), model="m", layer=3, training_tokens=123)
    path = ck.save(tmp_path / "ckpt", sae, meta, {c: acc.ordering(c) for c in om.CRITERIA}, {"summary": {"fvu": 0.1}})
    return path, sae


def test_round_trip_is_bit_exact(tmp_path):
    path, sae = write(tmp_path)
    got = ck.load(path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(got.sae, name), getattr(sae, name))
    assert got.meta.granularities == (4, 8, 16, 32) and got.meta.training_tokens == 123
    assert set(got.orderings) == {"mean_sq", "freq"} and got.metrics["summary"]["fvu"] == 0.1
    again = ck.save(tmp_path / "ckpt2", got.sae, got.meta, got.orderings, got.metrics)
    for f in (ck.WEIGHTS, ck.ORDERING):
        assert (again / f).read_bytes() == (path / f).read_bytes()
    # ordering applied on load
    ordered = ck.load(path, ordering="mean_sq")
    assert torch.equal(ordered.sae.W_dec, sae.W_dec[got.orderings["mean_sq"].perm])
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left aside


def test_scale_is_folded_and_outputs_are_raw(tmp_path):
    path, sae = write(tmp_path, scale=3.5)
    got = ck.load(path)
    assert got.meta.scale == 3.5 and got.sae.scale == 1.0
    x = torch.randn(10, 8) * 4
    torch.testing.assert_close(got.sae.decode(got.sae.encode(x)), sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-3)


def expect_error(path, *fragments):
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_truncated_weights(tmp_path):
    path, _ = write(tmp_path)
    data = (path / ck.WEIGHTS).read_bytes()
    (path / ck.WEIGHTS).write_bytes(data[: len(data) // 2])
    expect_error(path, "sae_weights.safetensors", "unreadable")


def test_bit_flip_is_caught_by_checksum(tmp_path):
    path, _ = write(tmp_path)
    data = bytearray((path / ck.WEIGHTS).read_bytes())
    data[-5] ^= 0x10
    (path / ck.WEIGHTS).write_bytes(bytes(data))
    expect_error(path, "checksum mismatch")


def resave(path: Path, **tensors):
    ws = {k: v for k, v in ck._read_tensors(path / ck.WEIGHTS).items()}
    ws.update(tensors)
    save_file({k: v.contiguous() for k, v in ws.items()}, str(path / ck.WEIGHTS))


def test_wrong_shape_and_nan(tmp_path):
    path, _ = write(tmp_path)
    resave(path, W_dec=torch.zeros(31, 8))
    expect_error(path, "W_dec", "(31, 8)", "(32, 8)")
    resave(path, W_dec=torch.full((32, 8), float("nan")))
    expect_error(path, "W_dec", "NaN")


def test_reference_variance_round_trips_and_older_checkpoints_load_without_it(tmp_path):
    """The FVU baseline a checkpoint records for served texts (issue 22 item 5): kept through save and
    load; a cfg.json written before it loads with None; a value that is no variance is refused."""
    path, sae = write(tmp_path)
    assert ck.load_meta(path).reference_variance is None
    meta = ck.load_meta(path)
    meta.reference_variance = 12.5
    ck.save(path, sae, meta)
    assert ck.load_meta(path).reference_variance == 12.5
    cfg = json.loads((path / ck.CFG).read_text())
    del cfg["progsae"]["reference_variance"]  # as written before the field existed
    (path / ck.CFG).write_text(json.dumps(cfg))
    assert ck.load(path).meta.reference_variance is None
    for bad in (0, -1.0, "12", True):
        cfg["progsae"]["reference_variance"] = bad
        (path / ck.CFG).write_text(json.dumps(cfg))
        expect_error(path, "cfg.json", "reference_variance must be a positive finite number")


def test_missing_and_inconsistent_cfg(tmp_path):
    path, _ = write(tmp_path)
    cfg = json.loads((path / ck.CFG).read_text())
    del cfg["progsae"]["k"]
    (path / ck.CFG).write_text(json.dumps(cfg))
    expect_error(path, "cfg.json", "'k'")
    cfg["progsae"]["k"] = 4
    cfg["progsae"]["d_sae"] = 64
    cfg["progsae"]["granularities"] = [32, 64]
    (path / ck.CFG).write_text(json.dumps(cfg))
    expect_error(path, "cfg.json", "d_sae=32 contradicts", "d_sae=64")  # the SAELens field SAELens would run
    cfg["d_sae"] = 64
    (path / ck.CFG).write_text(json.dumps(cfg))
    expect_error(path, "W_enc", "(8, 32)", "(8, 64)")
    cfg["progsae"]["d_sae"] = cfg["d_sae"] = 32
    cfg["progsae"]["granularities"] = [8, 4, 32]
    (path / ck.CFG).write_text(json.dumps(cfg))
    expect_error(path, "strictly increasing")
    (path / ck.CFG).write_text("{not json")
    expect_error(path, "cfg.json", "JSON")
    expect_error(tmp_path / "nowhere", "not a checkpoint directory")


def test_bad_ordering_file(tmp_path):
    path, _ = write(tmp_path)
    bad = {"mean_sq.perm": torch.zeros(32, dtype=torch.int64), "mean_sq.scores": torch.zeros(32, dtype=torch.float64)}
    save_file(bad, str(path / ck.ORDERING))
    with pytest.raises(ck.CheckpointError, match="ordering.safetensors.*bijection"):
        ck.load(path, ordering="mean_sq")
    (path / ck.ORDERING).unlink()
    with pytest.raises(ck.CheckpointError, match="no ordering 'freq'"):
        ck.load(path, ordering="freq")


def test_damaged_ordering_file_blocks_only_the_orderings(tmp_path):
    """A truncated ordering.safetensors: trained order still loads; asking for an ordering names the file."""
    path, sae = write(tmp_path)
    data = (path / ck.ORDERING).read_bytes()
    (path / ck.ORDERING).write_bytes(data[: len(data) // 3])
    plain = ck.load(path)
    assert torch.equal(plain.sae.W_dec, sae.W_dec) and plain.orderings == {}
    assert plain.orderings_error is not None and "ordering.safetensors" in plain.orderings_error
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(path, ordering="mean_sq")
    assert "ordering.safetensors" in str(e.value) and "unreadable" in str(e.value) and "\n" not in str(e.value)
    acc = om.ImportanceAccumulator(sae)
    acc.update(sae.encode(torch.randn(20, 8)))
    ck.write_orderings(path, {"freq": acc.ordering("freq")})  # `progsae order` replaces the damaged file
    assert set(ck.load(path, ordering="freq").orderings) == {"freq"}


def write_saelens(dirpath: Path, arch: str, d=6, m=20, k=3, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d, m, generator=g), "W_dec": torch.randn(m, d, generator=g),
         "b_enc": torch.randn(m, generator=g), "b_dec": torch.randn(d, generator=g)}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(m, generator=g)
    dirpath.mkdir()
    save_file(w, str(dirpath / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d, "d_sae": m, "dtype": "float32", "model_name": "gpt2",
           "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8, "normalize_activations": "none",
           "apply_b_dec_to_input": True}
    if arch == "topk":
        cfg["activation_fn_kwargs"] = {"k": k}
    (dirpath / "cfg.json").write_text(json.dumps(cfg))
    return w


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_saelens_checkpoint_loads_and_decodes_like_hand_reference(tmp_path, arch):
    w = write_saelens(tmp_path / "sl", arch)
    got = ck.load(tmp_path / "sl")
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        v, i = pre.topk(3)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
    elif arch == "standard":
        z = pre.relu()
    else:
        z = pre * (pre > w["threshold"])
    ref = z @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(got.sae.decode(got.sae.encode(x)), ref, rtol=1e-5, atol=1e-4)
    assert got.meta.model == "gpt2" and got.meta.layer == 8
    # and it becomes progressive through an ordering
    acc = om.ImportanceAccumulator(got.sae)
    acc.update(got.sae.encode(x))
    ck.write_orderings(tmp_path / "sl", {"mean_sq": acc.ordering("mean_sq")})
    ordered = ck.load(tmp_path / "sl", ordering="mean_sq")
    torch.testing.assert_close(ordered.sae.decode(ordered.sae.encode(x)), ref, rtol=1e-5, atol=1e-4)


def test_atomic_save_replaces_existing_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path, sae = write(tmp_path)
    before = (path / ck.WEIGHTS).read_bytes()
    meta = ck.load_meta(path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_st_bytes", boom)
    with pytest.raises(OSError):
        ck.save(path, sae, meta)
    assert (path / ck.WEIGHTS).read_bytes() == before  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left
