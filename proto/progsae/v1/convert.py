"""numpy <-> wire messages (Tensor, SparseCodes): shared by the server and the clients.

numpy only (no torch, no grpc). Every malformed message raises `WireError` with a one-line
message naming the field; the server maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import progsae_pb2 as pb

STOP_REASONS: dict[int, str] = {v.number: v.name.removeprefix("STOP_REASON_").lower()
                                for v in pb.StopReason.DESCRIPTOR.values if v.number}
"""The one spelling of a stream's stop reason (gRPC client, SSE stream, HTTP, metrics): ladder_done,
max_granularity, deadline, target_fvu."""


class WireError(ValueError):
    """A message does not describe a valid tensor or code set."""


class SparseArrays(NamedTuple):
    """Codes of N tokens in CSR layout (numpy)."""

    offsets: np.ndarray
    """[N+1] int64, offsets[0] == 0."""
    indices: np.ndarray
    """[nnz] int64 latent indices."""
    values: np.ndarray
    """[nnz] float32 activations."""

    @property
    def tokens(self) -> int:
        return len(self.offsets) - 1

    def token(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, values) of token n."""
        a, b = self.offsets[n], self.offsets[n + 1]
        return self.indices[a:b], self.values[a:b]

    def padded(self, pad_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Dense [N, kmax] (indices, values); padding has value 0 (inactive)."""
        counts = np.diff(self.offsets)
        n = len(counts)
        kmax = int(counts.max()) if n else 0
        idx = np.full((n, kmax), pad_index, dtype=np.int64)
        val = np.zeros((n, kmax), dtype=np.float32)
        if len(self.indices):
            rows = np.repeat(np.arange(n), counts)
            cols = np.arange(len(self.indices)) - self.offsets[rows]
            idx[rows, cols] = self.indices
            val[rows, cols] = self.values
        return idx, val


_DTYPES: dict[int, tuple[str, np.dtype]] = {
    pb.DTYPE_FLOAT32: ("float32", np.dtype("<f4")),
    pb.DTYPE_FLOAT16: ("float16", np.dtype("<f2")),
    pb.DTYPE_BFLOAT16: ("bfloat16", np.dtype("<u2")),
    pb.DTYPE_FLOAT64: ("float64", np.dtype("<f8")),
}
_BY_NAME = {name: code for code, (name, _) in _DTYPES.items()}


def dtype_code(name: str | np.dtype | int) -> int:
    """DType enum value for a name ("float32", "bfloat16", ...) or a numpy dtype."""
    if isinstance(name, int):
        return name
    key = name if isinstance(name, str) else np.dtype(name).name
    if key not in _BY_NAME:
        raise WireError(f"unsupported dtype {key!r}; use one of {', '.join(_BY_NAME)}")
    return _BY_NAME[key]


def dtype_name(code: int) -> str:
    return _DTYPES[code][0] if code in _DTYPES else f"DType({code})"


def to_numpy(t: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """Decode a Tensor into a float32 (or float64) numpy array, checking every field."""
    if t.dtype not in _DTYPES:
        raise WireError(f"{what}.dtype is {'unset' if t.dtype == 0 else f'unknown ({t.dtype})'}; "
                        f"use one of {', '.join(_BY_NAME)}")
    name, np_dtype = _DTYPES[t.dtype]
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise WireError(f"{what}.shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # Python ints: a product of huge dimensions cannot wrap around
    if count * np_dtype.itemsize != len(t.data):
        raise WireError(f"{what}: shape {list(shape)} x {name} needs {count * np_dtype.itemsize} bytes, "
                        f"got {len(t.data)}")
    try:
        a = np.frombuffer(t.data, dtype=np_dtype).reshape(shape)
    except ValueError:  # numpy refuses the shape (e.g. a zero-size tensor with a 2**62 dimension)
        raise WireError(f"{what}.shape {list(shape)} is not a valid array shape") from None
    if name == "bfloat16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    elif name == "float16":
        a = a.astype(np.float32)
    return a


def from_numpy(a: np.ndarray, dtype: str | int = "float32") -> pb.Tensor:
    """Encode an array as a Tensor of the given dtype (little-endian, C order)."""
    code = dtype_code(dtype) if not isinstance(dtype, int) or dtype != 0 else pb.DTYPE_FLOAT32
    name, np_dtype = _DTYPES[code]
    a = np.asarray(a)
    if name == "bfloat16":
        f = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        # round to nearest even on the dropped 16 bits
        f = f + (np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1)))
        raw = (f >> np.uint32(16)).astype("<u2")
    else:
        raw = np.ascontiguousarray(a, dtype=np_dtype)
    # protoc's .pyi types an enum field as the enum class alone; the runtime takes any int
    return pb.Tensor(data=raw.tobytes(), shape=list(a.shape), dtype=code)  # pyright: ignore[reportArgumentType]


def codes_from_arrays(indices: np.ndarray, values: np.ndarray, drop_zeros: bool = True,
                      packed: bool = False) -> pb.SparseCodes:
    """[N, k] (indices, values) -> SparseCodes, per token sorted by index, zeros dropped."""
    indices = np.asarray(indices, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    if indices.ndim != 2 or indices.shape != values.shape:
        raise WireError(f"codes must be two [N, k] arrays of one shape, got {indices.shape} and {values.shape}")
    order = np.argsort(indices, axis=1, kind="stable")
    indices = np.take_along_axis(indices, order, 1)
    values = np.take_along_axis(values, order, 1)
    if drop_zeros:
        keep = values != 0
        counts = keep.sum(1)
        indices, values = indices[keep], values[keep]
    else:
        counts = np.full(indices.shape[0], indices.shape[1])
        indices, values = indices.reshape(-1), values.reshape(-1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return codes_from_csr(SparseArrays(offsets, indices, values), packed)


_PACKED = (("packed_offsets", "offsets", np.dtype("<i8")), ("packed_indices", "indices", np.dtype("<i4")),
           ("packed_values", "values", np.dtype("<f4")))


def codes_from_csr(s: SparseArrays, packed: bool = False) -> pb.SparseCodes:
    """CSR arrays -> SparseCodes: repeated fields (revision 1), or packed bytes (revision 2, a copy each)."""
    if packed:
        if len(s.indices) and int(np.max(s.indices)) >= 2**31:
            raise WireError("codes: a latent index does not fit the packed int32 form")
        return pb.SparseCodes(**{f: np.ascontiguousarray(getattr(s, a), dtype=t).tobytes() for f, a, t in _PACKED})
    msg = pb.SparseCodes()
    msg.offsets.extend(np.asarray(s.offsets, dtype=np.int64).tolist())
    msg.indices.extend(np.asarray(s.indices, dtype=np.int64).tolist())
    msg.values.extend(np.asarray(s.values, dtype=np.float32).tolist())
    return msg


def code_count(msg: pb.SparseCodes) -> int:
    """Entries a SparseCodes message carries, in whichever form (for size limits before decoding)."""
    return max(len(msg.indices), len(msg.packed_indices) // 4)


def codes_to_arrays(msg: pb.SparseCodes, what: str = "codes") -> SparseArrays:
    """SparseCodes (either form) -> CSR arrays, checking the layout (not the index range: see check_codes)."""
    if msg.packed_offsets or msg.packed_indices or msg.packed_values:
        if len(msg.offsets) or len(msg.indices) or len(msg.values):
            raise WireError(f"{what}: both the packed and the repeated fields are set; send one form")
        arrays = []
        for f, _, t in _PACKED:
            raw = getattr(msg, f)
            if len(raw) % t.itemsize:
                raise WireError(f"{what}.{f}: {len(raw)} bytes is not a whole number of {t.itemsize}-byte entries")
            arrays.append(np.frombuffer(raw, dtype=t).astype(t.newbyteorder("="), copy=False))
        offsets, indices, values = arrays[0], arrays[1].astype(np.int64), arrays[2]
    else:
        offsets = np.array(msg.offsets, dtype=np.int64)
        indices = np.array(msg.indices, dtype=np.int64)
        values = np.array(msg.values, dtype=np.float32)
    if len(indices) != len(values):
        raise WireError(f"{what}: {len(indices)} indices but {len(values)} values")
    if len(offsets) < 1 or offsets[0] != 0:
        raise WireError(f"{what}.offsets must start with 0 (N+1 entries for N tokens)")
    if np.any(np.diff(offsets) < 0):
        raise WireError(f"{what}.offsets must be non-decreasing")
    if offsets[-1] != len(indices):
        raise WireError(f"{what}.offsets ends at {offsets[-1]} but there are {len(indices)} indices")
    return SparseArrays(offsets, indices, values)


def check_codes(s: SparseArrays, d_sae: int, what: str = "codes") -> None:
    """Index range, per-token uniqueness and finiteness of code values."""
    if len(s.indices):
        lo, hi = int(s.indices.min()), int(s.indices.max())
        if lo < 0 or hi >= d_sae:
            bad = lo if lo < 0 else hi
            raise WireError(f"{what}: latent index {bad} out of range 0..{d_sae - 1}")
        counts = np.diff(s.offsets)
        rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        keys = rows * d_sae + s.indices
        if len(np.unique(keys)) != len(keys):
            keys_sorted = np.sort(keys)
            dup = keys_sorted[1:][keys_sorted[1:] == keys_sorted[:-1]][0]
            raise WireError(f"{what}: latent {int(dup % d_sae)} repeated in token {int(dup // d_sae)}")
        if not np.isfinite(s.values).all():
            raise WireError(f"{what}: values contain NaN or Inf")
