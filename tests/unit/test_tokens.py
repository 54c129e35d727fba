"""How a text's tokens read on the page (progsae.server.tokens, issue 22 item 6): byte-level tokens that
spell one character together are grouped under it, with their bytes, on SmolLM2's real tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from progsae.server import tokens

LM = "smollm2-135m"


@pytest.fixture(scope="module")
def tokenizer():
    from progsae.lm.models import load_tokenizer

    return load_tokenizer(LM).tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", ["🧬🧬 hi", "中文字符", "a  b", "x \n y", "café", "👍🏽 ok", "plain words"])
def test_token_bytes_spell_the_text(tokenizer, text):
    assert b"".join(tokens.token_bytes(tokenizer, ids_of(tokenizer, text))).decode() == text


def test_a_line_of_emoji_is_one_cell_per_emoji(tokenizer):
    """The issue's case: 12 emoji are 36 tokens that each decode to U+FFFD alone."""
    ids = ids_of(tokenizer, "\U0001F9EC" * 12)
    assert len(ids) == 36 and {tokenizer.decode([i]) for i in ids} == {"\ufffd"}
    shown = tokens.display(LM, ids)
    assert shown["token_groups"] == [[3 * i, 3 * i + 3, "\U0001F9EC"] for i in range(12)]
    assert shown["token_bytes"][:3] == ["f0 9f", "a7", "ac"]


def test_cjk_groups_only_the_split_character(tokenizer):
    ids = ids_of(tokenizer, "中文字符")
    shown = tokens.display(LM, ids)
    assert shown["token_groups"] == [[3, 5, "符"]] and shown["token_bytes"] == ["", "", "", "e7 ac", "a6"]


def test_groups_by_hand():
    emoji = "\U0001F9EC".encode()
    assert tokens.groups([b"a", emoji[:2], emoji[2:3], emoji[3:], b" b"]) == [(1, 4, "\U0001F9EC")]
    assert tokens.groups([b"x" + emoji[:1], emoji[1:]]) == [(0, 2, "x\U0001F9EC")]  # a word and a split character
    assert tokens.groups([emoji[:2]]) == []  # cut mid-character: no run decodes
    assert tokens.groups([b"\xff", b"a", b"b"]) == []  # never valid UTF-8
    assert tokens.groups([b"\xf0"] * (tokens.MAX_RUN + 2)) == []


@given(st.text(min_size=1, max_size=12), st.lists(st.integers(1, 4), min_size=1, max_size=40))
def test_groups_decode_to_the_text_they_cover(text, cuts):
    """Any text cut into byte pieces anywhere: every group decodes to its pieces' bytes, groups do not
    overlap, and a piece outside every group decodes alone or starts no run that decodes."""
    data, pieces, i = text.encode(), [], 0
    for c in cuts * len(text.encode()):
        if i >= len(data):
            break
        pieces.append(data[i:i + c])
        i += c
    if i < len(data):
        pieces.append(data[i:])
    got = tokens.groups(pieces)
    end = 0
    for first, stop, shown in got:
        assert first >= end and 2 <= stop - first <= tokens.MAX_RUN
        assert b"".join(pieces[first:stop]).decode() == shown
        end = stop
    grouped = {j for first, stop, _ in got for j in range(first, stop)}
    for j in set(range(len(pieces))) - grouped:
        runs = [b"".join(pieces[j:k]) for k in range(j + 1, min(len(pieces), j + tokens.MAX_RUN) + 1)]
        assert tokens._text(runs[0]) is not None or all(tokens._text(r) is None for r in runs)


def test_side_by_side_streams_load_the_tokenizer_once_without_error():
    """Two streams' first emoji at once: in a fresh process, where transformers is not yet imported,
    two threads loading the tokenizer together failed one with an ImportError (its lazy module)."""
    code = """if True:
        import threading
        from progsae.server import tokens
        errors = []
        def show():
            try:
                tokens.display("smollm2-135m", [10813, 117, 122])
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=show) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(errors)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
