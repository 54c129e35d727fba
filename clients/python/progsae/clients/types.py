"""Results the Python clients return (numpy), and request builders shared by sync and async."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1.convert import SparseArrays

PAYLOADS = {"reconstruction": pb.PAYLOAD_RECONSTRUCTION, "delta": pb.PAYLOAD_DELTA, "none": pb.PAYLOAD_NONE}
AXES = {"g": pb.STREAM_AXIS_G, "k": pb.STREAM_AXIS_K}
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


class Prediction(NamedTuple):
    """One of the most probable next tokens after a token (revision 5)."""

    id: int
    prob: float
    token: str
    """As the tokenizer decodes it."""


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
    k: int = 0
    """k' of this rung, codes kept per token (0 = no k' cap)."""
    tokens: np.ndarray | None = None
    """Per-token budget: the tokens this rung computed, one row of `tensor` and `l0` each (None = all)."""
    refining: int | None = None
    """Per-token budget: tokens still refining after this rung."""
    kl: np.ndarray | None = None
    """Fidelity (text streams with kl): per computed token (one per row, as `l0`), KL(p_clean || p) in nats
    of the next-token distribution after it, this rung's reconstruction spliced into the language model."""
    top1: np.ndarray | None = None
    """Fidelity: per computed token, whether the most probable next token is the clean one."""
    mean_kl: float | None = None
    """Fidelity: mean KL over every token, a finished one at its final rung."""
    predictions: list[list[Prediction]] | None = None
    """Fidelity with predictions: per computed token, the most probable next tokens."""


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
    payload: int = pb.PAYLOAD_RECONSTRUCTION
    tokens: int = 0
    axis: str = "g"
    """The axis climbed: "g", or "k" (k' at the one G `ladder[0]`, up `k_ladder`)."""
    k_ladder: tuple[int, ...] = ()
    final_k: int = 0
    """k' of the last rung (0 = no k' cap)."""
    token_final_g: np.ndarray | None = None
    """Per-token budget: [N] each token's final G (where it met the target, else the last rung)."""
    token_final_k: np.ndarray | None = None
    """Per-token budget under a k' cap: [N] each token's final k'."""
    token_met: np.ndarray | None = None
    """Per-token budget: [N] bool, whether the token met the target."""
    reconstruction: np.ndarray | None = None
    """Per-token budget with a tensor payload: [N, d_in] each token's reconstruction at its latest rung
    (after the end: its final one), assembled from the rungs' rows."""
    token_ids: list[int] = field(default_factory=list)
    """Text input: the text's token ids (one per streamed token)."""
    token_strings: list[str] = field(default_factory=list)
    """Text input: each token as the tokenizer decodes it."""
    text_tokens: int = 0
    """Text input: tokens of the whole text (more than `tokens` when the server cut it)."""
    language_model: str = ""
    layer: int = -1
    spliced: np.ndarray | None = None
    """Fidelity: [N] bool, whether each token's reconstruction is spliced into the language model (False:
    an outlier kept at its clean activation)."""
    clean_predictions: list[list[Prediction]] | None = None
    """Fidelity with predictions: per token, the clean model's most probable next tokens (first rung)."""
    token_kl: np.ndarray | None = None
    """Fidelity: [N] each token's KL at its final rung (NaN when it got no rung)."""
    token_top1: np.ndarray | None = None
    """Fidelity: [N] bool, whether each token's top-1 prediction at its final rung is the clean one."""


@dataclass(frozen=True)
class TextEncoded:
    model_id: str
    token_ids: list[int]
    tokens: list[str]
    codes: SparseArrays
    activations: np.ndarray
    language_model: str
    layer: int
    text_tokens: int = 0
    """Tokens of the whole text: more than len(tokens) when the server cut it (revision 4; 0 from older servers)."""

    @property
    def truncated(self) -> bool:
        return self.text_tokens > len(self.tokens)


@dataclass(frozen=True)
class TextsEncoded:
    """EncodeTexts' answer: `results[t][m]` is text t through model m (revision 6)."""

    results: list[list[TextEncoded]]
    lm_ms: float
    """Time the language model took for the whole batch (one pass), ms."""


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
                   payload: str, ladder, per_token_l0: bool, dtype: str, token_target_fvu: float | None = None,
                   max_k: int | None = None, axis: str = "g", k_ladder=(), *, kl: bool = False,
                   predictions: int = 0, token_target_kl: float | None = None,
                   max_tokens: int = 0) -> pb.StreamDecodeRequest:
    """`inputs`: activations (np.ndarray), codes, or a text (str, revision 5)."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    req = pb.StreamDecodeRequest(model_id=model, payload=PAYLOADS[payload], per_token_l0=per_token_l0,
                                 ladder=list(ladder or ()), packed_codes=True, axis=AXES[axis],
                                 k_ladder=list(k_ladder or ()))
    if isinstance(inputs, str):
        req.text.text, req.text.max_tokens = inputs, max_tokens
    elif isinstance(inputs, np.ndarray):
        req.activations.CopyFrom(convert.from_numpy(inputs, dtype))
    else:
        req.codes.CopyFrom(codes_msg(inputs))
    if kl or predictions:
        req.fidelity.kl, req.fidelity.predictions = True, predictions
    if token_target_kl is not None:
        req.budget.token_target_kl = token_target_kl
    if max_g is not None:
        req.budget.max_granularity = max_g
    if deadline_ms is not None:
        req.budget.deadline_ms = deadline_ms
    if target_fvu is not None:
        req.budget.target_fvu = target_fvu
    if token_target_fvu is not None:
        req.budget.token_target_fvu = token_target_fvu
    if max_k is not None:
        req.budget.max_k = max_k
    return req


def absorb(msg: pb.StreamDecodeResponse, result: StreamResult, client_ms: float) -> Rung | None:
    """Update `result` from a stream message (header, rung and/or end); return the Rung if it has one."""
    if msg.HasField("header"):
        h = msg.header
        result.model_id, result.ladder = h.model_id, tuple(h.ladder)
        result.codes = convert.codes_to_arrays(h.codes) if h.HasField("codes") else None
        result.payload, result.tokens = h.payload, h.tokens
        result.axis, result.k_ladder = "k" if h.axis == pb.STREAM_AXIS_K else "g", tuple(h.k_ladder)
        result.token_ids, result.token_strings = list(h.token_ids), list(h.token_strings)
        result.text_tokens, result.language_model = h.text_tokens, h.language_model
        result.layer = h.layer if h.token_ids else -1
        result.spliced = np.array(h.spliced, dtype=bool) if len(h.spliced) else None
    rung = None
    if msg.HasField("rung"):
        r = msg.rung
        rung = Rung(r.index, r.g, r.mean_l0, np.array(r.l0, dtype=np.int64) if len(r.l0) else None,
                    convert.to_numpy(r.tensor) if r.HasField("tensor") else None,
                    r.fvu if r.HasField("fvu") else None, r.elapsed_ms, client_ms, r.k,
                    np.array(r.tokens, dtype=np.int64) if r.HasField("refining") else None,
                    r.refining if r.HasField("refining") else None,
                    np.array(r.kl, dtype=np.float64) if r.HasField("mean_kl") else None,
                    np.array(r.top1, dtype=bool) if r.HasField("mean_kl") else None,
                    r.mean_kl if r.HasField("mean_kl") else None,
                    _predictions(r.predictions) if len(r.predictions) else None)
        if len(r.clean_predictions):
            result.clean_predictions = _predictions(r.clean_predictions)
    if msg.HasField("end"):
        e = msg.end
        result.stop_reason = STOP_REASONS.get(e.stop_reason, str(e.stop_reason))
        result.rungs, result.final_g, result.elapsed_ms = e.rungs, e.final_g, e.elapsed_ms
        result.final_fvu = e.final_fvu if e.HasField("final_fvu") else None
        result.final_k = e.final_k
        if len(e.token_met):
            result.token_final_g = np.array(e.token_final_g, dtype=np.int64)
            result.token_final_k = np.array(e.token_final_k, dtype=np.int64) if len(e.token_final_k) else None
            result.token_met = np.array(e.token_met, dtype=bool)
        if len(e.token_kl):
            result.token_kl = np.array(e.token_kl, dtype=np.float64)
            result.token_top1 = np.array(e.token_top1, dtype=bool)
    return rung


def _predictions(msgs) -> list[list[Prediction]]:
    return [[Prediction(int(i), float(p), s) for i, p, s in zip(m.ids, m.probs, m.tokens, strict=True)]
            for m in msgs]


def accumulate(result: StreamResult, rung: Rung) -> None:
    """Per-token streams: write a newly delivered rung's rows into `result.reconstruction` (a
    reconstruction row replaces the token's, a delta row adds to it). Other streams: nothing."""
    if rung.tokens is None or rung.tensor is None:
        return
    if result.reconstruction is None:
        result.reconstruction = np.zeros((result.tokens, rung.tensor.shape[1]), dtype=rung.tensor.dtype)
    if result.payload == pb.PAYLOAD_DELTA:
        result.reconstruction[rung.tokens] += rung.tensor
    else:
        result.reconstruction[rung.tokens] = rung.tensor


def texts_encoded(resp: pb.EncodeTextsResponse, texts: int) -> TextsEncoded:
    flat = [text_encoded(r) for r in resp.results]
    per = len(flat) // max(1, texts)
    return TextsEncoded([flat[i * per:(i + 1) * per] for i in range(texts)], resp.lm_ms)


def text_encoded(resp: pb.EncodeTextResponse) -> TextEncoded:
    return TextEncoded(resp.model_id, list(resp.token_ids), list(resp.tokens), convert.codes_to_arrays(resp.codes),
                       convert.to_numpy(resp.activations), resp.language_model, resp.layer, resp.text_tokens)
