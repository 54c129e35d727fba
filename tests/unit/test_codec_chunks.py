"""Chunked encode (bounded memory) gives the codes of an unchunked encode, for any chunk size.

Exactness: a token's selection depends only on its own row of pre-activations, so chunking
cannot change which latents win except through rounding: BLAS blocks the d_in-long dot
products differently for a different number of rows (measured: float32 rows move by up to a
few ulps between a 1-row and a 1000-row addmm). The properties run in float64 on continuous
random data, where such a shift (~1e-15) cannot reorder two pre-activations, so the indices
must agree exactly and the values to 1e-12.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.sae.codec import SAE, Codes
from tests.conftest import random_sae

cases = st.tuples(
    st.integers(1, 16),  # d_in
    st.integers(2, 80),  # d_sae
    st.integers(0, 10_000),  # seed
    st.integers(1, 40),  # tokens
    st.sampled_from([1.0, 0.37]),  # normalisation scale
)


def make(d: int, m: int, seed: int, n: int, scale: float, activation: str) -> tuple[SAE, torch.Tensor]:
    k = max(1, min(m - 1, 1 + seed % 8))
    sae = random_sae(d, m, k, seed, scale, dtype=torch.float64)
    if activation == "relu":
        sae = replace(sae, activation="relu")
    elif activation == "jumprelu":
        th = torch.rand(m, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) * 3
        sae = replace(sae, activation="jumprelu", threshold=th)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 3
    return sae, x


def by_index(codes: Codes) -> Codes:
    """Each token's codes sorted by latent index (top-k's order within a token is unspecified)."""
    order = codes.indices.argsort(dim=1)
    return Codes(codes.indices.gather(1, order), codes.values.gather(1, order))


def active(codes: Codes, row: int) -> dict[int, float]:
    keep = codes.values[row] != 0
    return dict(zip(codes.indices[row][keep].tolist(), codes.values[row][keep].tolist(), strict=True))


@settings(max_examples=80, deadline=None)
@given(cases, st.integers(1, 50), st.sampled_from(["topk", "relu", "jumprelu"]))
def test_chunked_encode_equals_unchunked(case, rows, activation):
    sae, x = make(*case, activation)
    whole = sae.encode(x, chunk_bytes=2**40)
    chunked = sae.encode(x, chunk_bytes=rows * sae.d_sae * 8)  # float64: `rows` tokens per chunk
    assert chunked.indices.shape == whole.indices.shape
    assert chunked.indices.dtype == torch.int64
    if activation == "topk":
        a, b = by_index(whole), by_index(chunked)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.values, b.values, rtol=1e-12, atol=1e-12)
    else:
        # width = the busiest token's count in both; the padding entries are zero-valued and
        # may sit at other (unused) indices, so compare the active codes of every token
        for row in range(x.shape[0]):
            want, got = active(whole, row), active(chunked, row)
            assert want.keys() == got.keys()
            for i in want:
                assert got[i] == pytest.approx(want[i], rel=1e-12, abs=1e-12)
    # every token's indices stay distinct (the wire format rejects duplicates)
    for row in chunked.indices.tolist():
        assert len(set(row)) == len(row)
    torch.testing.assert_close(sae.decode(chunked), sae.decode(whole), rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(cases, st.integers(1, 30), st.data())
def test_chunked_prefix_encode_equals_unchunked(case, rows, data):
    sae, x = make(*case, "topk")
    g = data.draw(st.integers(1, sae.d_sae))
    a = by_index(sae.prefix_encode(x, g, chunk_bytes=2**40))
    b = by_index(sae.prefix_encode(x, g, chunk_bytes=rows * g * 8))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, rtol=1e-12, atol=1e-12)


def test_chunk_rows_follow_the_byte_bound(monkeypatch):
    """The pre-activations of one chunk never exceed chunk_bytes (at least one row per chunk)."""
    sae, x = make(4, 64, 3, 37, 1.0, "topk")
    seen: list[tuple[int, int]] = []
    real = SAE.pre_acts

    def spy(self: SAE, xs: torch.Tensor, g: int | None = None) -> torch.Tensor:
        out = real(self, xs, g)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(SAE, "pre_acts", spy)
    sae.encode(x, chunk_bytes=10 * 64 * 8 + 7)  # room for 10 float64 rows of 64
    assert [s[0] for s in seen] == [10, 10, 10, 7]
    seen.clear()
    sae.encode(x, chunk_bytes=1)  # less than one row: one row at a time
    assert len(seen) == 37 and all(s == (1, 64) for s in seen)
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        sae.encode(x, chunk_bytes=0)
