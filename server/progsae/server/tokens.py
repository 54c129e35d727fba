"""How a text's tokens read on the page: the bytes of each, and the runs that decode only together.

A byte-level tokenizer (GPT-2's, SmolLM2's) has no token for most emoji and many CJK characters, so
it splits one character into tokens of one or two of its UTF-8 bytes. Decoded alone, each such token
is "\ufffd"; a line of emoji becomes a row of identical boxes. Each token keeps its own row of the
stream (its features are its own), so the page shows a run of them as one cell under the character
they spell, with each token's bytes in hex.

    token_bytes(tokenizer, ids)  each token's raw bytes
    groups(pieces)               (first, end, text) of every run of 2+ tokens whose bytes decode
                                 only together, at most MAX_RUN tokens long (a run that never
                                 decodes, e.g. a text cut mid-character, stays ungrouped)
    display(alias, ids)          both for the HTTP stream's header: `token_groups` and
                                 `token_bytes` (hex, only for tokens that do not decode alone)
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

MAX_RUN = 8
"""Longest run grouped: a UTF-8 character is at most 4 bytes, a tokenizer's split of a few of them
(emoji with modifiers) a few more."""
_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""A SentencePiece byte-fallback token."""


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: each of its 256 printable characters -> the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """Each token's raw bytes: through the byte-level alphabet when the tokenizer decodes that way,
    from a byte-fallback token's hex, else its decoded string as UTF-8."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in repr(decoder)
    table = _byte_decoder()
    out: list[bytes] = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if byte_level and piece and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif m := _HEX_BYTE.fullmatch(piece or ""):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def _text(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def groups(pieces: list[bytes]) -> list[tuple[int, int, str]]:
    """(first, end, text) of each run of tokens pieces[first:end] (2 to MAX_RUN of them) that starts at
    a token that does not decode alone and ends at the first token where the run's bytes decode."""
    out: list[tuple[int, int, str]] = []
    i, n = 0, len(pieces)
    while i < n:
        if _text(pieces[i]) is not None:
            i += 1
            continue
        buf, j, text = pieces[i], i + 1, None
        while j < n and j - i < MAX_RUN:
            buf += pieces[j]
            j += 1
            if (text := _text(buf)) is not None:
                break
        if text is not None:
            out.append((i, j, text))
            i = j
        else:
            i += 1
    return out


_LOADING = threading.Lock()


def _tokenizer(alias: str) -> Any:
    # one load at a time: two side-by-side streams' first calls would import transformers from two
    # threads at once, and its lazy module then fails one of them with an ImportError
    with _LOADING:
        return _load(alias)


@functools.lru_cache(maxsize=4)
def _load(alias: str) -> Any:
    from progsae.lm.models import load_tokenizer

    return load_tokenizer(alias).tokenizer


def display(alias: str, ids: list[int]) -> dict[str, Any]:
    """The header fields the page draws a text's tokens with (see the module docstring)."""
    pieces = token_bytes(_tokenizer(alias), ids)
    return {"token_groups": [list(g) for g in groups(pieces)],
            "token_bytes": ["" if _text(p) is not None else p.hex(" ") for p in pieces]}
