"""EleutherAI sparsify interop against the real eai-sparsify (dev extra): folders written by
`SparseCoder.save_to_disk` load as TopK SAEs that encode/decode exactly as sparsify does, refuse
what progsae does not serve in one line, become progressive with `progsae order`, and are served
over real gRPC."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo

from progsae import cli
from progsae.clients import Client
from progsae.sae import checkpoint as ck
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from progsae.server.service import ServiceConfig
from progsae.server.validate import Limits
from tests.support.caches import make_cache

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sparsify import SparseCoder, SparseCoderConfig

D, M, K = 64, 256, 16


def coder(seed: int, **cfg) -> SparseCoder:
    sc = SparseCoder(D, SparseCoderConfig(num_latents=M, k=K, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sc.encoder.weight.copy_(torch.randn(M, D, generator=g) * 0.15)
        sc.encoder.bias.copy_(torch.randn(M, generator=g) * 0.2)
        sc.W_dec.copy_(torch.randn(M, D, generator=g) * (0.5 + torch.rand(M, 1, generator=g)) * 0.2)
        sc.b_dec.copy_(torch.randn(D, generator=g) * 0.5)
    return sc


@torch.no_grad()
def sparsify_run(sc: SparseCoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch._dynamo.config.patch(disable=True):  # its fused encoder is torch.compile'd; same maths eager
        out = sc.encode(x)
    acts = torch.zeros(x.shape[0], M).scatter_(1, out.top_indices, out.top_acts)
    return acts, sc.decode(out.top_acts, out.top_indices)


def progsae_run(path: Path, x: torch.Tensor, ordering: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    sae = ck.load(path, ordering=ordering).sae
    codes = sae.encode(x)
    return torch.zeros(x.shape[0], M).scatter_(1, codes.indices, codes.values), sae.decode(codes)


def inputs(seed: int = 1, n: int = 40) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 1.5 + 3.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, SparseCoder]:
    """A two-hookpoint root as sparsify's trainer lays it out; the coder for layers.6."""
    root = tmp_path_factory.mktemp("sparsify")
    coder(3).save_to_disk(root / "layers.3")
    sc = coder(6)
    sc.save_to_disk(root / "layers.6")
    return root, sc


def test_sparsify_folder_loads_exactly(saved):
    root, sc = saved
    assert sorted(p.name for p in (root / "layers.6").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert set(SparseCoder.load_many(str(root), local=True)) == {"layers.3", "layers.6"}  # sparsify's own layout
    x = inputs()
    ours, theirs = progsae_run(root / "layers.6", x), sparsify_run(sc, x)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert (ours[0] > 0).sum(1).max() == K
    meta = ck.load_meta(root / "layers.6")
    assert (meta.architecture, meta.d_in, meta.d_sae, meta.k, meta.hook) == ("topk", D, M, K, "layers.6")
    with pytest.raises(ck.CheckpointError) as e:  # the root holds several SAEs: say which to pick
        ck.load(root)
    assert "layers.3, layers.6" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flag,want", [({"transcode": True}, "transcode=true"),
                                       ({"skip_connection": True}, "skip_connection=true"),
                                       ({"activation": "groupmax", "k": 16}, "activation 'groupmax'")])
def test_unsupported_variants_are_refused(tmp_path, flag, want):
    SparseCoder(D, SparseCoderConfig(**{"num_latents": M, "k": K, **flag})).save_to_disk(tmp_path / "sc")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(tmp_path / "sc")
    assert want in str(e.value) and "\n" not in str(e.value)


def test_bad_cfg_and_weights(tmp_path):
    coder(1).save_to_disk(tmp_path / "sc")
    cfg = json.loads((tmp_path / "sc" / "cfg.json").read_text())
    for changes, want in [({"k": 0}, "k=0 must be in 1..num_latents=256"),
                          ({"k": K, "num_latents": 128}, "encoder.weight has shape (256, 64), expected (128, 64)"),
                          ({"num_latents": 0, "expansion_factor": 2}, "expected (128, 64)"),  # M = 2 * d_in
                          ({"d_in": None}, "missing field 'd_in'")]:
        cfg.update(changes)
        (tmp_path / "sc" / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(ck.CheckpointError) as e:
            ck.load(tmp_path / "sc")
        assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
    cfg.update(d_in=D, expansion_factor=4)  # num_latents 0: sparsify's default M = expansion_factor * d_in
    (tmp_path / "sc" / "cfg.json").write_text(json.dumps(cfg))
    assert ck.load(tmp_path / "sc").sae.d_sae == M


def test_order_makes_it_progressive_and_it_serves(saved, tmp_path):
    src, sc = saved
    root = tmp_path / "served"
    root.mkdir()
    sc.save_to_disk(root / "pythia" / "layers.6")
    folder = root / "pythia" / "layers.6"
    acts = make_cache(tmp_path / "acts", d=D, n=600)
    assert cli.main(["order", str(folder), "--activations", str(acts), "--by", "mean_sq,freq"]) == 0
    ordered = ck.load(folder, ordering="mean_sq")
    assert set(ordered.orderings) == {"mean_sq", "freq"}
    s = ordered.orderings["mean_sq"].sorted_scores()
    assert torch.all(s[:-1] >= s[1:]) and s[0] > s[-1]
    x = inputs(seed=2)
    theirs = sparsify_run(sc, x)
    torch.testing.assert_close(ordered.sae.decode(ordered.sae.encode(x)), theirs[1], rtol=1e-5, atol=1e-5)
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=Limits(max_request_bytes=1 << 20))) as srv, \
            Client(srv.address, timeout=30) as client:
        assert client.model("pythia/layers.6").ordering == "mean_sq"  # the preferred ordering, once stored
        enc = client.encode(x.numpy(), model="pythia/layers.6")
        full = client.decode_at(enc, M, model="pythia/layers.6")
        np.testing.assert_allclose(full.reconstruction, theirs[1].numpy(), rtol=1e-5, atol=1e-4)
        rungs = list(client.stream(x.numpy(), model="pythia/layers.6"))
    assert [r.g for r in rungs] == list(ordered.meta.granularities) and rungs[-1].g == M
    np.testing.assert_allclose(rungs[-1].tensor, theirs[1].numpy(), rtol=1e-5, atol=1e-4)
    codes = ordered.sae.encode(x)
    for r in rungs:  # each rung is the nested truncation of the mean_sq-ordered SAE at its G
        np.testing.assert_allclose(r.tensor, ordered.sae.decode(codes, r.g).numpy(), rtol=1e-5, atol=1e-4)


def test_a_damaged_ordering_file_still_serves_in_trained_order(saved, tmp_path):
    from progsae.server.registry import Registry

    _, sc = saved
    sc.save_to_disk(tmp_path / "layers.6")
    (tmp_path / "layers.6" / "ordering.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    reg = Registry(RegistryConfig(root=str(tmp_path)))
    assert reg.resolve("layers.6").id == "layers.6@none"
    x = inputs(seed=4)
    torch.testing.assert_close(reg.get("layers.6").sae.decode(reg.get("layers.6").sae.encode(x)),
                               sparsify_run(sc, x)[1], rtol=1e-5, atol=1e-5)
