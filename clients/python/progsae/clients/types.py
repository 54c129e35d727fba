"""Results the Python clients return (numpy), and request builders shared by sync and async."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1.convert import SparseArrays

PAYLOADS = {"reconstruction": pb.PAYLOAD_RECONSTRUCTION, "delta": pb.PAYLOAD_DELTA, "none": pb.PAYLOAD_NONE}
STOP_REASONS = convert.STOP_REASONS


class ProgsaeError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `details` the server's one-line message."""

    def __init__(self, code, details: str, method: str = ""):
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")
        self.code = code
        self.details = details
        self.method = method


@dataclass(frozen=True)
class Encoded:
    """Codes of N tokens."""

    model_id: str
    codes: SparseArrays
    """CSR codes; `codes.padded()` gives [N, kmax] arrays, `codes.token(n)` one token's."""
    scale: float
    """Normalisation scale the server applied (folded into its weights)."""
    granularity: int
    """Every index is below this (M for a full encode, G for prefix)."""
    prefix: bool


@dataclass(frozen=True)
class Decoded:
    model_id: str
    granularity: int
    reconstruction: np.ndarray
    l0: np.ndarray


@dataclass(frozen=True)
class Rung:
    """One rung of a stream."""

    index: int
    g: int
    mean_l0: float
    l0: np.ndarray | None
    tensor: np.ndarray | None
    """Reconstruction or delta (per the payload asked), None for payload "none"."""
    fvu: float | None
    elapsed_ms: float
    """Server time since the call started."""
    client_ms: float
    """Client time since the call was sent."""


@dataclass
class StreamResult:
    """Filled while a stream is iterated: header facts, then the end message."""

    model_id: str = ""
    ladder: tuple[int, ...] = ()
    codes: SparseArrays | None = None
    stop_reason: str | None = None
    rungs: int = 0
    final_g: int = 0
    final_fvu: float | None = None
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class TextEncoded:
    model_id: str
    token_ids: list[int]
    tokens: list[str]
    codes: SparseArrays
    activations: np.ndarray
    language_model: str
    layer: int


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    architecture: str
    d_in: int
    d_sae: int
    k: int
    ladder: tuple[int, ...]
    ordering: str
    available_orderings: tuple[str, ...]
    language_model: str
    layer: int | None
    hook: str
    scale: float
    training_tokens: int
    evaluation: dict[str, Any] = field(default_factory=dict)
    text_available: bool = False

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(m.model_id, m.architecture, m.d_in, m.d_sae, m.k, tuple(m.ladder), m.ordering,
                   tuple(m.available_orderings), m.language_model, None if m.layer < 0 else m.layer, m.hook,
                   m.normalisation.scale, m.training_tokens, json.loads(m.evaluation_json or "{}"),
                   m.text_available)


def codes_msg(codes: SparseArrays | tuple[np.ndarray, np.ndarray] | Encoded) -> pb.SparseCodes:
    if isinstance(codes, Encoded):
        codes = codes.codes
    if isinstance(codes, SparseArrays):
        return convert.codes_from_csr(codes, packed=True)
    idx, val = codes
    return convert.codes_from_arrays(idx, val, drop_zeros=False, packed=True)


def encode_request(x: np.ndarray, model: str, prefix_g: int | None, dtype: str) -> pb.EncodeRequest:
    req = pb.EncodeRequest(model_id=model, activations=convert.from_numpy(np.asarray(x), dtype), packed_codes=True)
    if prefix_g is not None:
        req.mode = pb.ENCODE_MODE_PREFIX
        req.granularity = prefix_g
    return req


def encoded(resp: pb.EncodeResponse) -> Encoded:
    return Encoded(resp.model_id, convert.codes_to_arrays(resp.codes), resp.normalisation.scale,
                   resp.granularity, resp.mode == pb.ENCODE_MODE_PREFIX)


def decoded(resp: pb.DecodeResponse) -> Decoded:
    return Decoded(resp.model_id, resp.granularity, convert.to_numpy(resp.reconstruction),
                   np.array(resp.l0, dtype=np.int64))


def stream_request(inputs, model: str, max_g: int | None, deadline_ms: int | None, target_fvu: float | None,
                   payload: str, ladder, per_token_l0: bool, dtype: str) -> pb.StreamDecodeRequest:
    req = pb.StreamDecodeRequest(model_id=model, payload=PAYLOADS[payload], per_token_l0=per_token_l0,
                                 ladder=list(ladder or ()), packed_codes=True)
    if isinstance(inputs, np.ndarray):
        req.activations.CopyFrom(convert.from_numpy(inputs, dtype))
    else:
        req.codes.CopyFrom(codes_msg(inputs))
    if max_g is not None:
        req.budget.max_granularity = max_g
    if deadline_ms is not None:
        req.budget.deadline_ms = deadline_ms
    if target_fvu is not None:
        req.budget.target_fvu = target_fvu
    return req


def absorb(msg: pb.StreamDecodeResponse, result: StreamResult, client_ms: float) -> Rung | None:
    """Update `result` from a stream message (header, rung and/or end); return the Rung if it has one."""
    if msg.HasField("header"):
        h = msg.header
        result.model_id, result.ladder = h.model_id, tuple(h.ladder)
        result.codes = convert.codes_to_arrays(h.codes) if h.HasField("codes") else None
    rung = None
    if msg.HasField("rung"):
        r = msg.rung
        rung = Rung(r.index, r.g, r.mean_l0, np.array(r.l0, dtype=np.int64) if len(r.l0) else None,
                    convert.to_numpy(r.tensor) if r.HasField("tensor") else None,
                    r.fvu if r.HasField("fvu") else None, r.elapsed_ms, client_ms)
    if msg.HasField("end"):
        e = msg.end
        result.stop_reason = STOP_REASONS.get(e.stop_reason, str(e.stop_reason))
        result.rungs, result.final_g, result.elapsed_ms = e.rungs, e.final_g, e.elapsed_ms
        result.final_fvu = e.final_fvu if e.HasField("final_fvu") else None
    return rung


def text_encoded(resp: pb.EncodeTextResponse) -> TextEncoded:
    return TextEncoded(resp.model_id, list(resp.token_ids), list(resp.tokens), convert.codes_to_arrays(resp.codes),
                       convert.to_numpy(resp.activations), resp.language_model, resp.layer)
