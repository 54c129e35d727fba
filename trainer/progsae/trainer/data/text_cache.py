"""Raw text through a language model into an activation cache (`progsae features --texts`).

The text is packed and run exactly as `progsae harvest` packs a corpus (harvest.corpus_contexts:
each context is the start token then `context - 1` tokens, a separator token after each document;
harvest.shard_activations: the hidden states at `layer`, start position dropped), so cards built
from it read the same activations a harvest of that text would hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from progsae.lm.models import LoadedModel
from progsae.trainer.data.activations import CacheWriter, Manifest
from progsae.trainer.data.harvest import corpus_contexts, shard_activations

SPLIT = "texts"
"""The manifest's split of a text cache (not a corpus split)."""


class TextCache(NamedTuple):
    """What `build` wrote."""

    manifest: Manifest
    tokens: int
    """Tokens of the texts, a separator after each document."""
    dropped: int
    """Tokens at the end that fill no whole context (not in the cache)."""


def read_documents(path: str | Path) -> list[str]:
    """A UTF-8 text file's documents: one per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read texts from {path}: {e}") from None
    docs = [line.strip() for line in lines if line.strip()]
    if not docs:
        raise ValueError(f"{path} has no text (one document per non-empty line)")
    return docs


def build(lm: LoadedModel, docs: list[str], layer: int, out: str | Path, context: int = 128,
          batch: int = 8, shard_contexts: int = 256, source: str = "texts") -> TextCache:
    """Write the activations of `docs` at hidden_states[layer] into a new cache at `out`.

    A text shorter than one context becomes one context of its length (start token included)."""
    if not 0 <= layer <= lm.n_layers:
        raise ValueError(f"layer {layer} out of range 0..{lm.n_layers} for {lm.alias}")
    if context < 2:
        raise ValueError(f"context must be >= 2 (the start token and one token), got {context}")
    tokens = sum(len(ids) + 1 for ids in lm.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"])
    context = min(context, tokens + 1)
    named = [(f"{source}:{i}", d) for i, d in enumerate(docs)]
    ctx = np.asarray(list(corpus_contexts(lm, named, context)), dtype=np.int32).reshape(-1, context)
    rows = len(ctx) * (context - 1)
    writer = CacheWriter(out, Manifest(
        model=lm.alias, layer=layer, d_model=lm.d_model, corpus=[source], split=SPLIT, context=context,
        target_tokens=rows, bos=lm.start_token,
        extra={"documents": len(docs), "separator": lm.sep_token, "model_source": lm.source}))
    for i in range(0, len(ctx), shard_contexts):
        part = ctx[i:i + shard_contexts]
        writer.add_shard(shard_activations(lm, part, layer, batch), part)
    return TextCache(writer.finish(), tokens, tokens - rows)
