"""--device and --dtype: one resolver, device-independent checkpoints, the training precisions.

CUDA itself is exercised by bench/device_check.py on a GPU machine; here the CPU side of the
same code paths, and the refusals a CPU-only machine must give in one line.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from progsae import cli
from progsae.sae import checkpoint
from progsae.sae.devices import check_device, resolve_device
from progsae.trainer.training.sparse_topk import topk_encode
from progsae.trainer.training.train import train
from tests.support.caches import make_cache, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)
        with pytest.raises(ValueError, match="unknown device"):
            check_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ValueError, match="only"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="requested but"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="requested but"):
            resolve_device("cuda:0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("acts") / "acts")


def test_checkpoint_saved_from_cpu_and_loaded_onto_a_named_device(cache, tmp_path):
    out = train(tiny(tokens=32 * 40), cache, tmp_path / "ck", progress=False, device="cpu")
    with safe_open(out / "sae_weights.safetensors", framework="pt") as f:
        assert all(f.get_tensor(name).device.type == "cpu" for name in f.keys())
    meta = checkpoint.load_meta(out)
    assert meta.extra["trained_on"] == "cpu"
    assert "dtype" not in meta.extra["train_config"]  # float32: recorded only when set, like k_ladder
    ck = checkpoint.load(out, device=resolve_device("auto"))
    assert ck.sae.W_dec.device == resolve_device("auto")
    on_cpu = checkpoint.load(out, device="cpu").sae
    torch.testing.assert_close(ck.sae.W_enc.cpu(), on_cpu.W_enc, rtol=0, atol=0)


def test_bfloat16_encoder_matmul(cache, tmp_path):
    """bfloat16 changes the weights (the matmul ran in it), trains as well, and is recorded."""
    f32 = train(tiny(tokens=32 * 60), cache, tmp_path / "f32", progress=False)
    bf16 = train(tiny(tokens=32 * 60, dtype="bfloat16"), cache, tmp_path / "bf16", progress=False)
    a, b = checkpoint.load(f32).sae, checkpoint.load(bf16).sae
    assert a.W_dec.dtype == b.W_dec.dtype == torch.float32
    assert not torch.equal(a.W_enc, b.W_enc)
    meta = checkpoint.load_meta(bf16)
    assert meta.extra["train_config"]["dtype"] == "bfloat16"
    fvu = {p.name: _last_fvu(p) for p in (f32, bf16)}
    assert fvu["bf16"] < 0.5 and abs(fvu["bf16"] - fvu["f32"]) < 0.1, fvu


def _last_fvu(path) -> float:
    import json

    lines = (path / "train_log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["fvu_saved"]


def test_topk_encode_matmul_dtype_selects_on_the_rounded_matmul():
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(64, 16, generator=g), torch.randn(16, 128, generator=g), torch.randn(128, generator=g)
    sel = topk_encode(x, W, b, 8, matmul_dtype=torch.bfloat16)
    pre = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16())
    want_vals, want_idx = pre.topk(8, dim=-1)
    assert sel.values.dtype == torch.float32
    got_idx, order = sel.indices.sort(-1)
    assert torch.equal(got_idx, want_idx.sort(-1).values)
    torch.testing.assert_close(sel.values.gather(1, order),
                               want_vals.float().clamp_min(0).gather(1, want_idx.sort(-1).indices))


def test_b_enc_gradient_is_the_per_latent_sum():
    """The sparse backward's b_enc gradient (a bag sum, deterministic on CUDA) equals index_add."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    W = torch.randn(12, 40, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    dead = torch.tensor([3, 7, 11, 30])
    sel = topk_encode(x, W, b, 5, dead, 2)
    w1, w2 = torch.randn(sel.values.shape, generator=g, dtype=torch.float64), torch.randn(
        sel.aux_values.shape, generator=g, dtype=torch.float64)
    ((sel.values * w1).sum() + (sel.aux_values * w2).sum()).backward()
    want = torch.zeros(40, dtype=torch.float64)
    want.index_add_(0, sel.indices.reshape(-1), (w1 * (sel.values > 0)).reshape(-1))
    want.index_add_(0, sel.aux_indices.reshape(-1), (w2 * (sel.aux_values > 0)).reshape(-1))
    assert b.grad is not None
    torch.testing.assert_close(b.grad, want, rtol=1e-12, atol=1e-12)


CUDA_99 = "only" if torch.cuda.is_available() else "requested but"


@pytest.mark.parametrize(("flags", "msg"), [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "cuda:99"], CUDA_99),
    (["--device", "cpu", "--dtype", "tf32"], "needs a CUDA device"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_device_flags_one_line_nothing_written(cache, tmp_path, capsys, flags, msg):
    out = tmp_path / "ck"
    try:
        rc = cli.main(["train", "--activations", str(cache), "--out", str(out), "--d-sae", "32", "--k", "4",
                       "--no-progress", *flags])
    except SystemExit as e:  # argparse's own errors (a bad choice) exit from the parser
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "ck.training").exists()


def test_order_on_a_named_device(cache, tmp_path):
    from progsae.trainer.order import OrderConfig, compute_orderings

    out = train(tiny(arch="topk", tokens=32 * 20), cache, tmp_path / "ck", progress=False)
    on_cpu = compute_orderings(out, cache, OrderConfig(by=("all",), device="cpu", progress=False))
    auto = compute_orderings(out, cache, OrderConfig(by=("all",), device="auto", progress=False))
    for name, o in auto.items():
        assert o.perm.device.type == "cpu"  # written as is by checkpoint.write_orderings
        torch.testing.assert_close(o.scores, on_cpu[name].scores)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        OrderConfig(device="tpu")


def test_serving_config_checks_the_device_spelling():
    from progsae.server.config import AppConfig

    assert AppConfig.from_dict({"device": "auto"}).device == "auto"
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        AppConfig.from_dict({"device": "gpu0"})


def test_eval_on_a_named_device(cache, tmp_path):
    from progsae.trainer.evaluation.evaluate import EvalConfig, evaluate

    out = train(tiny(tokens=32 * 20), cache, tmp_path / "ck", progress=False)
    cfg = dict(ordering="none", rsa_tokens=64, max_tokens=600, progress=False)
    a = evaluate(out, cache, EvalConfig(**cfg, device="cpu"))
    b = evaluate(out, cache, EvalConfig(**cfg, device="auto"))
    for ra, rb in zip(a.orderings["none"].rungs, b.orderings["none"].rungs, strict=True):
        assert ra.fvu == pytest.approx(rb.fvu, rel=1e-5) and ra.l0 == pytest.approx(rb.l0, rel=1e-6)
        assert ra.rsa == pytest.approx(rb.rsa, rel=1e-4)
    with pytest.raises(ValueError, match="unknown device"):
        EvalConfig(device="npu").validate()


def test_features_on_a_named_device(tmp_path, capsys):
    from progsae.trainer import features
    from progsae.trainer.data.activations import ActivationCache
    from progsae.trainer.data.outlier_policy import KEEP_ALL
    from tests.support import synthetic as testing
    from tests.unit.test_features import D, K, M
    from tests.unit.test_features import make_cache as make_token_cache

    ck = testing.make_checkpoint(tmp_path / "ck", d=D, m=M, k=K)
    make_token_cache(tmp_path / "acts")
    sae = checkpoint.load(ck).sae
    cache = ActivationCache(tmp_path / "acts", outliers=KEEP_ALL)
    cfg = features.FeatureConfig(top_n=3, window=2, batch_contexts=5, batch_rows=7, progress=False)
    a = features.compute(sae, cache, cfg, device="cpu").tensors
    b = features.compute(sae, cache, cfg, device="auto").tensors
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].device.type == "cpu"
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert cli.main(["features", str(ck), "--activations", str(tmp_path / "acts"), "--no-lens",
                     "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'gpu'" in err and err.count("\n") == 1
