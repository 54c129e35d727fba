"""Wire conversions (progsae.v1.convert): tensors and sparse codes round-trip; malformed ones fail in one line."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb


@pytest.mark.parametrize("dtype, tol", [("float32", 0), ("float64", 0), ("float16", 1e-3), ("bfloat16", 1e-2)])
def test_tensor_round_trip(dtype, tol):
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    t = convert.from_numpy(a, dtype)
    assert list(t.shape) == [5, 7] and t.dtype == convert.dtype_code(dtype)
    b = convert.to_numpy(t)
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


def test_tensor_is_little_endian_raw_bytes():
    a = np.array([[1.0, -2.5]], dtype=np.float32)
    t = convert.from_numpy(a)
    assert t.data == a.astype("<f4").tobytes()


@pytest.mark.parametrize("mutate, msg", [
    (lambda t: setattr(t, "dtype", 0), "unset"),
    (lambda t: setattr(t, "dtype", 42), "unknown"),
    (lambda t: t.shape.append(2), "bytes"),
    (lambda t: setattr(t, "data", t.data[:-1]), "bytes"),
    (lambda t: t.shape.__setitem__(0, -1), "negative"),
    # shapes whose int64 product wraps around: to 0, and to exactly the 6 elements sent
    (lambda t: t.shape.extend([2**32, 2**32]), "bytes"),
    (lambda t: t.shape.__setitem__(slice(None), [9, (3 * 2**64 + 6) // 9]), "bytes"),
    (lambda t: (t.shape.__setitem__(slice(None), [0, 2**62, 2**62]), setattr(t, "data", b"")), "not a valid"),
])
def test_bad_tensors(mutate, msg):
    t = convert.from_numpy(np.zeros((2, 3), np.float32))
    mutate(t)
    with pytest.raises(convert.WireError) as e:
        convert.to_numpy(t)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_codes_round_trip_sorted_and_sparse():
    idx = np.array([[5, 1, 3], [2, 0, 4]])
    val = np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 5.0]], np.float32)
    msg = convert.codes_from_arrays(idx, val)
    s = convert.codes_to_arrays(msg)
    assert s.tokens == 2 and list(s.offsets) == [0, 2, 5]
    assert s.token(0)[0].tolist() == [3, 5] and s.token(1)[0].tolist() == [0, 2, 4]  # zeros dropped, sorted
    pi, pv = s.padded()
    assert pi.shape == (2, 3) and pv[0, 2] == 0
    convert.check_codes(s, 6)


@pytest.mark.parametrize("offsets, indices, values, msg", [
    ([1, 2], [0], [1.0], "start with 0"),
    ([0, 2, 1], [0, 1], [1.0, 1.0], "non-decreasing"),
    ([0, 3], [0, 1], [1.0, 1.0], "ends at"),
    ([0, 1], [0, 1], [1.0], "values"),
])
def test_bad_code_layout(offsets, indices, values, msg):
    m = pb.SparseCodes(offsets=offsets, indices=indices, values=values)
    with pytest.raises(convert.WireError) as e:
        convert.codes_to_arrays(m)
    assert msg in str(e.value)


@pytest.mark.parametrize("indices, values, msg", [
    ([0, 9], [1.0, 1.0], "out of range"),
    ([-1, 2], [1.0, 1.0], "out of range"),
    ([3, 3], [1.0, 1.0], "repeated in token 0"),
    ([1, 2], [float("nan"), 1.0], "NaN"),
])
def test_bad_code_values(indices, values, msg):
    s = convert.SparseArrays(np.array([0, 2]), np.array(indices), np.array(values, np.float32))
    with pytest.raises(convert.WireError) as e:
        convert.check_codes(s, 8)
    assert msg in str(e.value)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_packed_and_repeated_codes_carry_the_same_arrays(data):
    n = data.draw(st.integers(0, 6))
    counts = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    nnz = sum(counts)
    idx = np.array(data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=nnz, max_size=nnz)), dtype=np.int64)
    val = np.array(data.draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=nnz, max_size=nnz)), dtype=np.float32)
    s = convert.SparseArrays(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), idx, val)
    packed, repeated = convert.codes_from_csr(s, packed=True), convert.codes_from_csr(s)
    assert not (packed.offsets or packed.indices or packed.values) and not repeated.packed_offsets
    assert packed.packed_indices == idx.astype("<i4").tobytes()  # raw little-endian, a copy of the array
    for msg in (packed, repeated):
        back = convert.codes_to_arrays(pb.SparseCodes.FromString(msg.SerializeToString()))
        for a, b in zip(back, s):
            np.testing.assert_array_equal(a, b)
        assert convert.code_count(msg) == nnz


@pytest.mark.parametrize("mutate, msg", [
    (lambda m: m.indices.append(1), "both"),
    (lambda m: setattr(m, "packed_values", m.packed_values[:-1]), "whole number"),
    (lambda m: setattr(m, "packed_indices", m.packed_indices[:-4]), "2 indices but 3 values"),
    (lambda m: setattr(m, "packed_offsets", np.array([0, 2], "<i8").tobytes()), "ends at 2"),
])
def test_bad_packed_codes(mutate, msg):
    m = convert.codes_from_csr(convert.SparseArrays(np.array([0, 3]), np.array([1, 5, 9]),
                                                    np.ones(3, np.float32)), packed=True)
    mutate(m)
    with pytest.raises(convert.WireError, match=msg):
        convert.codes_to_arrays(m)
