"""`progsae features --texts FILE`: raw text through the checkpoint's language model (the real
SmolLM2-135M) into cards, and the text cache it builds, checked against the model's own forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from progsae.cli import main
from progsae.lm.models import hidden_at_layer, load_model
from progsae.sae import checkpoint, feature_cards
from progsae.trainer import features
from progsae.trainer.data import outlier_policy, text_cache
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.data.outlier_policy import KEEP_ALL
from tests.support import synthetic as testing

LM, LAYER = "smollm2-135m", 3
DOCS = ["The cat sat on the mat because it was warm.", "Paris is the capital of France.",
        "Dogs and cats are common pets in many homes."]


@pytest.fixture(scope="module")
def lm():
    return load_model(LM)


def test_text_cache_holds_the_layer_of_the_packed_text(lm, tmp_path):
    ids = [lm.tokenizer(d, add_special_tokens=False)["input_ids"] + [lm.sep_token_id] for d in DOCS]
    flat = [i for doc in ids for i in doc]
    made = text_cache.build(lm, DOCS, LAYER, tmp_path / "one", context=512)
    assert made.tokens == len(flat) and made.dropped == 0 and made.manifest.context == len(flat) + 1
    cache = ActivationCache(tmp_path / "one", outliers=KEEP_ALL)
    with torch.inference_mode():
        want = hidden_at_layer(lm.model, torch.tensor([[lm.start_token_id, *flat]]), LAYER)[0, 1:]
    got = cache.gather(cache.rows())
    assert got.shape == want.shape and torch.allclose(got, want.float(), atol=1e-4, rtol=1e-4)
    # short contexts: whole ones only, the tail reported
    made = text_cache.build(lm, DOCS, LAYER, tmp_path / "short", context=8)
    assert made.manifest.n_tokens == (len(flat) // 7) * 7 and made.dropped == len(flat) % 7
    assert made.manifest.model == lm.alias and made.manifest.layer == LAYER


def test_cli_texts_builds_cards_from_raw_text(lm, tmp_path, capsys):
    ck = testing.make_checkpoint(tmp_path / "ck", d=lm.d_model, m=64, k=4, model=LM, layer=LAYER)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(DOCS[:2]) + "\n\n" + DOCS[2] + "\n", encoding="utf-8")
    args = ["features", str(ck), "--texts", str(texts), "--top-n", "2", "--window", "2", "--promoted", "3"]
    assert main(args) == 0
    assert "latents over" in capsys.readouterr().out
    cards = feature_cards.load(ck)
    n_tokens = sum(len(lm.tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS)
    assert not cards.info["stale"] and cards.info["texts"] == str(texts) and cards.info["activations"] is None
    # the same cards as computing them by hand over the text cache
    made = text_cache.build(lm, DOCS, LAYER, tmp_path / "cache")
    assert made.manifest.n_tokens == n_tokens
    cache = ActivationCache(tmp_path / "cache", outliers=outlier_policy.resolve(None, checkpoint.load_meta(ck)))
    want = features.compute(checkpoint.load(ck).sae, cache,
                            features.FeatureConfig(top_n=2, window=2, promoted=3, progress=False))
    assert cards.info["tokens"] == want.info["tokens"] == len(cache) > n_tokens * 0.8
    assert torch.equal(cards.tensors["density"], want.tensors["density"])
    assert torch.equal(cards.tensors["window_ids"], want.tensors["window_ids"])
    # contexts show the text's own tokens, and chips get a label from them
    text_words = {lm.tokenizer.decode([i]) for d in DOCS
                  for i in lm.tokenizer(d, add_special_tokens=False)["input_ids"]}
    fired = [i for i in range(cards.d_sae) if cards.tensors["density"][i] > 0]
    assert fired
    for i in fired:
        card = cards.card(i)
        assert card["contexts"] and all(t in text_words | {lm.sep_token} for c in card["contexts"] for t in c["tokens"])
        assert cards.label(i)
    assert len(cards.card(fired[0])["promoted"]) == 3


def test_cli_texts_errors(tmp_path, capsys):
    nolm = testing.make_checkpoint(tmp_path / "nolm", d=32, m=64, k=4, model=None)
    texts = tmp_path / "t.txt"
    texts.write_text("Hello there.\n")
    assert main(["features", str(nolm), "--texts", str(texts)]) == 2
    assert "records no language model" in capsys.readouterr().err
    ck = testing.make_checkpoint(tmp_path / "ck", d=576, m=64, k=4, model=LM, layer=LAYER)
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["features", str(ck), "--texts", str(tmp_path / "empty.txt")]) == 2
    assert "has no text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["features", str(ck), "--texts", str(texts), "--activations", str(tmp_path)])
    assert e.value.code == 2
    assert not feature_cards.exists(ck) and json.loads((ck / "cfg.json").read_text())
