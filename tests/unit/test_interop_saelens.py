"""SAELens interop against the real sae-lens (dev extra): SAEs saved by SAELens itself load into
progsae and encode/decode exactly as SAELens's own encode/decode; progsae checkpoints load in
SAELens and run exactly as in progsae. Every cfg flag that changes the computation is covered,
or refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.sae import checkpoint as ck
from progsae.sae import saelens_cfg
from progsae.sae.codec import SAE

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import sae_lens
    from sae_lens.training.activation_scaler import ActivationScaler

D, M, K = 64, 256, 16
TOL = dict(rtol=1e-5, atol=1e-5)


def randomise(sae: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values (SAELens initialises biases to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_dec":  # rows of varied norm, so decoder-norm rescaling matters
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 + 0.3 * torch.rand(p.shape[0], 1, generator=g)))
            elif name == "threshold":  # some negative: SAELens's ReLU must still apply
                p.copy_(torch.rand(p.shape, generator=g) * 0.6 - 0.1)
            elif name in ("W_enc", "b_enc", "b_dec"):
                p.copy_(torch.randn(p.shape, generator=g) * {"W_enc": 0.15, "b_enc": 0.2, "b_dec": 0.5}[name])
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.4)


def inputs(seed: int = 1, n: int = 48) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def dense(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    codes = sae.encode(x)
    return torch.zeros(x.shape[0], sae.d_sae).scatter_(1, codes.indices, codes.values)


def progsae_run(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    got = ck.load(path).sae
    return dense(got, x), got.decode(got.encode(x))


@torch.no_grad()
def saelens_run(sae: sae_lens.SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = sae.encode(x)
    return acts, sae.decode(acts)


def assert_same(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    torch.testing.assert_close(ours[1], theirs[1], **TOL)
    assert (ours[0] > 0).sum() > 0  # not a vacuous comparison of empty codes


META = {"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post", "hook_layer": 6}


def inference_sae(arch: str, seed: int, **cfg) -> sae_lens.SAE:
    cls, cfg_cls = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
                    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}[arch]
    c = cfg_cls(d_in=D, d_sae=M, **cfg)
    for key, v in META.items():
        c.metadata[key] = v
    sae = cls(c)
    randomise(sae, seed)
    return sae


FLAGS = [(arch, b, r) for arch in ("standard", "jumprelu", "topk") for b in (True, False)
         for r in ((False, True) if arch == "topk" else (False,))]


@pytest.mark.parametrize("arch,apply_b_dec,rescale", FLAGS)
def test_saelens_inference_saes_load_exactly(tmp_path, arch, apply_b_dec, rescale):
    kw = {"k": K, "rescale_acts_by_decoder_norm": rescale} if arch == "topk" else {}
    sae = inference_sae(arch, seed=len(str(tmp_path)), apply_b_dec_to_input=apply_b_dec, **kw)
    sae.save_model(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is apply_b_dec  # SAELens wrote the flag under test
    x = inputs()
    assert_same(progsae_run(tmp_path / "sl", x), saelens_run(sae, x))
    meta = ck.load_meta(tmp_path / "sl")
    assert (meta.model, meta.hook, meta.layer) == ("gpt2", "blocks.6.hook_resid_post", 6)  # v6 metadata


def training_sae(arch: str, seed: int, **cfg) -> sae_lens.TrainingSAE:
    cls, cfg_cls = {"topk": (sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig),
                    "batchtopk": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig),
                    "matryoshka_batchtopk": (sae_lens.MatryoshkaBatchTopKTrainingSAE,
                                             sae_lens.MatryoshkaBatchTopKTrainingSAEConfig),
                    "jumprelu": (sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig),
                    "standard": (sae_lens.StandardTrainingSAE, sae_lens.StandardTrainingSAEConfig)}[arch]
    c = cfg_cls(d_in=D, d_sae=M, **cfg)
    c.metadata["model_name"], c.metadata["hook_name"] = "gpt2", "blocks.6.hook_resid_post"
    sae = cls(c)
    randomise(sae, seed)
    return sae


TRAINING = [("topk", {"k": K}), ("topk", {"k": K, "rescale_acts_by_decoder_norm": False}),
            ("topk", {"k": K, "apply_b_dec_to_input": False}),
            ("batchtopk", {"k": K}), ("batchtopk", {"k": K, "rescale_acts_by_decoder_norm": False}),
            ("batchtopk", {"k": K, "apply_b_dec_to_input": False}),
            ("matryoshka_batchtopk", {"k": K, "matryoshka_widths": [32, 128, M]}),
            ("jumprelu", {}), ("jumprelu", {"apply_b_dec_to_input": False}), ("standard", {})]


@pytest.mark.parametrize("arch,cfg", TRAINING, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in c.items())}"
                                                     for a, c in TRAINING])
def test_saelens_training_saes_both_save_forms_load_exactly(tmp_path, arch, cfg):
    """save_model (the training cfg: TopK's rescale_acts_by_decoder_norm defaults to true) and
    save_inference_model both load, equal to SAELens's inference SAE from save_inference_model."""
    sae = training_sae(arch, seed=len(arch) + len(cfg), **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.save_model(tmp_path / "train")
        sae.save_inference_model(tmp_path / "inf")
        reference = sae_lens.SAE.load_from_disk(tmp_path / "inf")
    assert json.loads((tmp_path / "train" / "cfg.json").read_text())["architecture"] == arch
    x = inputs(seed=2)
    theirs = saelens_run(reference, x)
    if arch in ("topk", "standard"):  # SAELens's own training SAE encodes per token too (its JumpReLU
        assert_same(saelens_run(sae, x), theirs)  # training encode omits the ReLU below a negative threshold)
    for form in ("train", "inf"):
        assert_same(progsae_run(tmp_path / form, x), theirs)
    if arch == "matryoshka_batchtopk":
        assert ck.load_meta(tmp_path / "train").granularities == (32, 128, M)


def test_expected_average_only_in_uses_saelens_scaler(tmp_path):
    """normalize_activations=expected_average_only_in: the factor from SAELens's activation_scaler.json
    is progsae's input scale; compared with SAELens's ActivationScaler around its encode/decode."""
    sae = inference_sae("topk", seed=7, k=K, normalize_activations="expected_average_only_in")
    sae.save_model(tmp_path / "sl")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(tmp_path / "sl")
    assert "activation_scaler.json" in str(e.value) and "\n" not in str(e.value)
    scaler = ActivationScaler(scaling_factor=0.37)
    scaler.save(str(tmp_path / "sl" / "activation_scaler.json"))
    x = inputs(seed=3) * 4
    with torch.no_grad():
        acts = sae.encode(scaler.scale(x))
        recon = scaler.unscale(sae.decode(acts))
    assert_same(progsae_run(tmp_path / "sl", x), (acts, recon))
    assert ck.load_meta(tmp_path / "sl").scale == pytest.approx(0.37)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm", "covariance_whitening"])
def test_per_token_normalisations_are_refused(tmp_path, norm):
    sae = inference_sae("standard", seed=1, normalize_activations=norm)
    sae.save_model(tmp_path / "sl")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(tmp_path / "sl")
    assert f"normalize_activations={norm!r} is not supported" in str(e.value) and "\n" not in str(e.value)


def edit_cfg(path: Path, **changes) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_refusals_are_one_clear_line(tmp_path):
    sae = inference_sae("topk", seed=2, k=K)
    sae.save_model(tmp_path / "sl")
    cases = [
        ({"k": 0}, "k=0 must be in 1..d_sae=256"),
        ({"k": K, "d_sae": 512}, "W_enc has shape (64, 256), expected (64, 512)"),  # cfg contradicts weights
        ({"d_sae": M, "d_in": 32}, "W_enc has shape (64, 256), expected (32, 256)"),
        ({"d_in": D, "architecture": "gated"}, "unsupported SAELens architecture 'gated'"),
        ({"architecture": "standard", "rescale_acts_by_decoder_norm": True}, "not defined for a standard SAE"),
        ({"architecture": "topk", "rescale_acts_by_decoder_norm": False, "apply_b_dec_to_input": "no"},
         "'apply_b_dec_to_input' must be true or false"),
        ({"apply_b_dec_to_input": True, "reshape_activations": "weird"}, "reshape_activations='weird'"),
    ]
    for changes, want in cases:
        edit_cfg(tmp_path / "sl", **changes)
        with pytest.raises(ck.CheckpointError) as e:
            ck.load(tmp_path / "sl")
        assert want in str(e.value) and "\n" not in str(e.value), (changes, str(e.value))


def test_legacy_top_level_fields(tmp_path):
    """A pre-6.0 cfg (no metadata.sae_lens_version): SAELens's own renames and defaults apply."""
    sae = inference_sae("topk", seed=4, k=K)
    sae.save_model(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    legacy = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
              "d_in": D, "d_sae": M, "hook_point": "blocks.3.hook_resid_pre", "hook_layer": 3, "model_name": "gpt2",
              "normalize_activations": False, "apply_b_dec_to_input": cfg["apply_b_dec_to_input"], "dtype": "float32"}
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(legacy))
    x = inputs(seed=5)
    assert_same(progsae_run(tmp_path / "sl", x), saelens_run(sae_lens.SAE.load_from_disk(tmp_path / "sl"), x))
    meta = ck.load_meta(tmp_path / "sl")
    assert (meta.architecture, meta.k, meta.model, meta.hook, meta.layer) == (
        "topk", K, "gpt2", "blocks.3.hook_resid_pre", 3)
    edit_cfg(tmp_path / "sl", finetuning_scaling_factor=True)
    with pytest.raises(ck.CheckpointError, match="finetuning_scaling_factor"):
        ck.load(tmp_path / "sl")


# --- the reverse direction: progsae checkpoints in SAELens -----------------------------------


def progsae_sae(activation: str, scale: float, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    return SAE(W_enc=torch.randn(D, M, generator=g) * 0.15, W_dec=torch.randn(M, D, generator=g) * 0.2,
               b_enc=torch.randn(M, generator=g) * 0.2, b_dec=torch.randn(D, generator=g) * 0.5, k=K if activation
               == "topk" else M, scale=scale, activation=activation,  # type: ignore[arg-type]
               threshold=torch.rand(M, generator=g) * 0.5 if activation == "jumprelu" else None)


REVERSE = [("topk", "topk", 1.0, "gpt2", "blocks.2.hook_resid_post"), ("matryoshka", "topk", 2.5, None, None),
           ("relu", "relu", 1.0, None, "blocks.1.hook_resid_pre"), ("jumprelu", "jumprelu", 0.5, "gpt2", None)]


@pytest.mark.parametrize("arch,activation,scale,model,hook", REVERSE)
def test_progsae_checkpoints_run_in_saelens(tmp_path, arch, activation, scale, model, hook):
    sae = progsae_sae(activation, scale, seed=len(arch))
    ladder = (M // 4, M) if arch == "matryoshka" else (M,)
    meta = ck.CheckpointMeta(arch, D, M, sae.k, ladder, model=model, hook=hook, layer=2 if hook else None)
    path = ck.save(tmp_path / "ours", sae, meta)
    cfg = json.loads((path / "cfg.json").read_text())
    assert None not in cfg["metadata"].values() and "hook_name" not in cfg  # never a null hook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(path)
    assert theirs.cfg.metadata.hook_name == hook and theirs.cfg.metadata.model_name == model
    x = inputs(seed=6) * 3
    assert_same(progsae_run(path, x), saelens_run(theirs, x))
    # and the other way round again: SAELens -> progsae -> SAELens keeps model and hook
    theirs.save_model(tmp_path / "again")
    again = ck.load(tmp_path / "again")
    assert (again.meta.model, again.meta.hook) == (model, hook)
    ck.save(tmp_path / "thrice", again.sae, again.meta)
    assert_same(progsae_run(tmp_path / "thrice", x), saelens_run(sae_lens.SAE.load_from_disk(tmp_path / "thrice"), x))


# --- the folds themselves, as a property over random weights and flags ------------------------


def reference(w: dict[str, torch.Tensor], x: torch.Tensor, arch: str, apply_b_dec: bool, rescale: bool, k: int,
              c: float) -> torch.Tensor:
    """SAELens's formulas written out in float64 (TopKSAE / StandardSAE / JumpReLUSAE + ActivationScaler)."""
    n = w["W_dec"].norm(dim=-1)
    pre = (x * c - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        pre = pre * n if rescale else pre
        v, i = pre.topk(k)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        z = z / n if rescale else z
    elif arch == "standard":
        z = pre.relu()
    else:
        z = pre.relu() * (pre > w["threshold"])
    return (z @ w["W_dec"] + w["b_dec"]) / c


@settings(max_examples=40, deadline=None)
@given(arch=st.sampled_from(["topk", "standard", "jumprelu"]), apply_b_dec=st.booleans(), rescale=st.booleans(),
       k=st.integers(1, 12), c=st.floats(0.1, 10), seed=st.integers(0, 2**16))
def test_folds_match_the_saelens_formulas(arch, apply_b_dec, rescale, k, c, seed):
    rescale = rescale and arch == "topk"
    g = torch.Generator().manual_seed(seed)
    d, m = 6, 24
    w = {"W_enc": torch.randn(d, m, generator=g, dtype=torch.float64),
         "W_dec": torch.randn(m, d, generator=g, dtype=torch.float64) * torch.rand(m, 1, generator=g,
                                                                                  dtype=torch.float64) * 3,
         "b_enc": torch.randn(m, generator=g, dtype=torch.float64), "b_dec": torch.randn(d, generator=g,
                                                                                      dtype=torch.float64),
         "threshold": torch.randn(m, generator=g, dtype=torch.float64)}
    spec = saelens_cfg.parse({"architecture": arch, "d_in": d, "d_sae": m, "k": k, "apply_b_dec_to_input": apply_b_dec,
                              "rescale_acts_by_decoder_norm": rescale, "metadata": {"sae_lens_version": "6.54.12"}})
    f = {n: t.double() for n, t in saelens_cfg.fold(spec, w, scale=c).items()}
    sae = SAE(f["W_enc"], f["W_dec"], f["b_enc"], f["b_dec"], spec.k, activation=spec.kind,
              threshold=f.get("threshold"))
    x = torch.randn(20, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sae.decode(sae.encode(x)), reference(w, x, arch, apply_b_dec, rescale, spec.k, c),
                               rtol=1e-5, atol=1e-5)


def test_inspect_shows_saelens_metadata_and_folds(tmp_path, capsys):
    from progsae.cli.main import main

    sae = inference_sae("topk", seed=9, k=K, apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)
    sae.save_model(tmp_path / "sl")
    (tmp_path / "sl" / "ordering.safetensors").write_bytes(b"\x08\x00\x00\x00truncated")
    assert main(["inspect", str(tmp_path / "sl")]) == 0
    out = capsys.readouterr().out
    assert "model        gpt2   layer 6   hook blocks.6.hook_resid_post" in out
    assert "topk (SAELens topk; folded in: b_dec not subtracted, decoder norms)" in out
    assert "ordering     unreadable:" in out and "ordering.safetensors" in out
