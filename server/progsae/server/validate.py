"""Request validation: wire messages -> checked tensors, or a ServiceError with one line.

Every check names the field and the expected value. Size limits answer RESOURCE_EXHAUSTED,
everything else about the input INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from progsae.sae import budgets
from progsae.sae.codec import Codes, check_ladder
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import fidelity
from .errors import ServiceError, Status, exhausted, invalid
from .registry import ServedModel


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request beyond them gets RESOURCE_EXHAUSTED."""

    max_tokens: int = 16384
    """Most tokens (rows) in one request."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest activations payload accepted, in bytes (the gRPC transport limit is set to match)."""
    max_response_bytes: int = 256 * 1024 * 1024
    """Largest tensor one response (or one stream message) may carry, in bytes; a request whose answer
    would be larger gets RESOURCE_EXHAUSTED before any compute (the transport send limit is set to match)."""
    max_rungs: int = 4096
    """Most rungs one stream may climb."""
    max_text_chars: int = 20000
    """Longest EncodeText input, in characters."""
    max_text_tokens: int = 512
    """Most tokens EncodeText runs through the language model."""
    max_texts: int = 64
    """Most texts in one EncodeTexts (one padded batch of the language model)."""


_OUT_DTYPES = (pb.DTYPE_UNSPECIFIED, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64)


def texts(texts: Sequence[str], limits: Limits) -> None:
    """Texts for the language model: 1..max_texts of them, none empty or over max_text_chars."""
    if not texts:
        raise invalid("no text")
    if len(texts) > limits.max_texts:
        raise exhausted(f"{len(texts)} texts exceed the limit of {limits.max_texts}")
    for i, text in enumerate(texts):
        which = "text" if len(texts) == 1 else f"text {i}"
        if not text.strip():
            raise invalid(f"{which} is empty")
        if len(text) > limits.max_text_chars:
            raise exhausted(f"{which} of {len(text)} characters exceeds {limits.max_text_chars}")


def activations(msg: pb.Tensor, model: ServedModel, limits: Limits, field: str = "activations") -> torch.Tensor:
    """[N, d_in] float32 activations, finite, N in 1..max_tokens."""
    if len(msg.data) > limits.max_request_bytes:
        raise exhausted(f"{field}: {len(msg.data)} bytes exceed the limit of {limits.max_request_bytes}")
    try:
        a = convert.to_numpy(msg, field)
    except convert.WireError as e:
        raise invalid(str(e)) from None
    if a.ndim != 2:
        raise invalid(f"{field} must have shape [N, {model.d_in}], got {list(a.shape)}")
    n, d = a.shape
    if n == 0:
        raise invalid(f"{field} is an empty batch (N = 0)")
    if n > limits.max_tokens:
        raise exhausted(f"{field}: {n} tokens exceed the limit of {limits.max_tokens}")
    if d != model.d_in:
        raise invalid(f"{field} width {d} does not match model {model.id} d_in={model.d_in}")
    if not np.isfinite(a).all():
        raise invalid(f"{field} contains NaN or Inf")
    a = np.ascontiguousarray(a, dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def codes(msg: pb.SparseCodes, model: ServedModel, limits: Limits, field: str = "codes") -> Codes:
    """Sparse codes -> padded [N, kmax] Codes (padding: index 0, value 0)."""
    if 12 * convert.code_count(msg) > limits.max_request_bytes:
        raise exhausted(f"{field}: {convert.code_count(msg)} entries exceed the request size limit")
    try:
        s = convert.codes_to_arrays(msg, field)
        if s.tokens == 0:
            raise invalid(f"{field} is an empty batch (N = 0 tokens)")
        if s.tokens > limits.max_tokens:
            raise exhausted(f"{field}: {s.tokens} tokens exceed the limit of {limits.max_tokens}")
        convert.check_codes(s, model.d_sae, field)
    except convert.WireError as e:
        raise invalid(str(e)) from None
    idx, val = s.padded()
    return Codes(torch.from_numpy(idx), torch.from_numpy(val))


def granularity(g: int, model: ServedModel, field: str = "granularity") -> int:
    if not 1 <= g <= model.d_sae:
        raise invalid(f"{field} G={g} out of range 1..{model.d_sae} (M of model {model.id})")
    return int(g)


def k_prime(k: int, model: ServedModel, field: str = "budget.max_k") -> int:
    """k' of a (G, k') decode, 1..k of the model."""
    if not 1 <= k <= model.meta.k:
        raise invalid(f"{field} k'={k} out of range 1..{model.meta.k} (k of model {model.id})")
    return int(k)


_ITEMSIZE: dict[int, int] = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_FLOAT64: 8}


def response_size(tokens: int, model: ServedModel, dtype: int, limits: Limits, what: str = "reconstruction") -> None:
    """RESOURCE_EXHAUSTED when a [tokens, d_in] tensor of `dtype` would exceed max_response_bytes."""
    size = tokens * model.d_in * _ITEMSIZE.get(dtype, 4)
    if size > limits.max_response_bytes:
        raise exhausted(f"{what} of {size} bytes would exceed the response limit of {limits.max_response_bytes}")


def out_dtype(code: int, field: str = "output_dtype") -> int:
    if code not in _OUT_DTYPES:
        raise invalid(f"{field}: unknown dtype {code}")
    return code or pb.DTYPE_FLOAT32


@dataclass(frozen=True)
class StreamPlan:
    """A validated StreamDecode request."""

    x: torch.Tensor | None
    """Input activations (None when codes were sent)."""
    codes: Codes | None
    """Input codes (None when activations were sent: the stream encodes them)."""
    ladder: tuple[int, ...]
    """Rungs to climb, already cut at max_granularity."""
    cut: bool
    """True when max_granularity shortened the ladder (end reason MAX_GRANULARITY)."""
    deadline_s: float | None
    """Server-side compute budget in seconds."""
    target_fvu: float | None
    """Stop once FVU <= this."""
    payload: pb.PayloadKind
    out_dtype: int
    per_token_l0: bool
    packed_codes: bool
    """Send the header's codes in the packed form (revision 2)."""
    token_target_fvu: float | None = None
    """Per-token budget (revision 3): a token stops refining once its own relative error is <= this."""
    max_k: int | None = None
    """k' cap of every rung of a G climb (revision 3); None = nested truncation."""
    k_ladder: tuple[int, ...] = ()
    """STREAM_AXIS_K (revision 3): the k' rungs, at G = ladder[0], already cut at max_k; empty = a G climb."""
    k_cut: bool = False
    """True when max_k shortened the k' ladder (end reason MAX_K)."""
    fidelity: fidelity.Ask | None = None
    """Revision 5, a text stream's per-rung fidelity (KL, top-1, predictions; a per-token KL budget)."""
    fvu_variance: float | None = None
    """The per-token variance a rung's FVU divides by: the checkpoint's reference_variance for a text
    the server encoded (a few tokens' own variance is a poor baseline), None = the batch's own, for
    activations a client sent (as ever) and for a checkpoint that records none."""

    @property
    def per_token(self) -> bool:
        """A per-token budget (FVU and/or KL): rungs list the tokens they compute."""
        return self.token_target_fvu is not None or self.token_target_kl is not None

    @property
    def token_target_kl(self) -> float | None:
        return self.fidelity.token_target_kl if self.fidelity is not None else None

    @property
    def steps(self) -> tuple[budgets.Step, ...] | None:
        """The (G, k') steps of a stream that uses a revision-3 budget or fidelity; None for a plain G
        climb, which takes the revision-2 path unchanged."""
        if self.k_ladder:
            return budgets.k_steps(self.ladder[0], self.k_ladder)
        if self.token_target_fvu is not None or self.max_k is not None or self.fidelity is not None:
            return budgets.g_steps(self.ladder, self.max_k)
        return None


def stream_plan(req: pb.StreamDecodeRequest, model: ServedModel, limits: Limits,
                x: torch.Tensor | None = None) -> StreamPlan:
    """The checked plan of a stream; `x` is activations the server made itself (a text's), in place of
    the request's input."""
    text = x is not None
    fvu_variance = model.meta.reference_variance if text else None
    which = "activations" if x is not None else req.WhichOneof("input")
    if which is None:
        raise invalid("StreamDecodeRequest needs an input: activations, codes or text")
    if which == "text":
        raise invalid("a text input is run by the server's language model first; this path takes activations")
    if x is None and which == "activations":
        x = activations(req.activations, model, limits)
    c = codes(req.codes, model, limits) if which == "codes" else None
    if req.ladder:
        ladder = tuple(int(g) for g in req.ladder)
        if len(ladder) > limits.max_rungs:
            raise exhausted(f"ladder: {len(ladder)} rungs exceed the limit of {limits.max_rungs}")
        try:
            check_ladder(ladder, model.d_sae)  # the codec's own rule, named once
        except ValueError as e:
            raise invalid(f"ladder: {e} (M of model {model.id} is {model.d_sae})") from None
    else:
        ladder = model.ladder
    b = req.budget
    cut = False
    if b.HasField("max_granularity"):
        gmax = granularity(b.max_granularity, model, "budget.max_granularity")
        if gmax < ladder[-1]:
            ladder = tuple(g for g in ladder if g < gmax) + (gmax,)
            cut = True
    deadline = None
    if b.HasField("deadline_ms"):
        if b.deadline_ms <= 0:
            raise invalid(f"budget.deadline_ms must be > 0, got {b.deadline_ms}")
        deadline = b.deadline_ms / 1000.0
    target = None
    if b.HasField("target_fvu"):
        t = b.target_fvu
        if not (math.isfinite(t) and 0 < t <= 1):
            raise invalid(f"budget.target_fvu must be in (0, 1], got {t}")
        if x is None:
            raise invalid("budget.target_fvu needs activations as the input (FVU is measured against them)")
        if x.shape[0] < 2 and fvu_variance is None:
            raise invalid("budget.target_fvu needs at least 2 tokens (FVU of one token is undefined)")
        target = float(t)
    if req.payload not in (pb.PAYLOAD_RECONSTRUCTION, pb.PAYLOAD_DELTA, pb.PAYLOAD_NONE):
        raise invalid(f"payload: unknown kind {req.payload}")
    dtype = out_dtype(req.output_dtype)
    if req.payload != pb.PAYLOAD_NONE:
        if x is not None:
            n = x.shape[0]
        else:
            assert c is not None  # `which` named one input
            n = c.indices.shape[0]
        response_size(n, model, dtype, limits, "a rung's tensor")
    token_target = _token_target(b, x)
    max_k, k_ladder, k_cut = _k_budget(req, model, limits)
    if k_ladder:
        ladder, cut = (int(b.max_granularity) if b.HasField("max_granularity") else model.d_sae,), False
    return StreamPlan(x, c, ladder, cut, deadline, target, req.payload, dtype, req.per_token_l0, req.packed_codes,
                      token_target, max_k, k_ladder, k_cut, _fidelity(req, model, text), fvu_variance)


def _fidelity(req: pb.StreamDecodeRequest, model: ServedModel, text: bool) -> fidelity.Ask | None:
    """Revision 5: what a text stream measures downstream (None: nothing, the stream of revision 4)."""
    b, f = req.budget, req.fidelity
    target = None
    if b.HasField("token_target_kl"):
        t = b.token_target_kl
        if not (math.isfinite(t) and t > 0):
            raise invalid(f"budget.token_target_kl must be a finite number of nats > 0, got {t}")
        target = float(t)
    if not 0 <= f.predictions <= fidelity.MAX_PREDICTIONS:
        raise invalid(f"fidelity.predictions must be in 0..{fidelity.MAX_PREDICTIONS}, got {f.predictions}")
    if not (f.kl or f.predictions or target is not None):
        return None
    if not text:
        what = "budget.token_target_kl" if target is not None else "fidelity"
        raise invalid(f"{what} needs a text input (StreamDecodeRequest.text): the next-token predictions are "
                      "the language model's over the text's own tokens, which activations or codes do not carry")
    if not model.meta.model or model.meta.layer is None:
        raise ServiceError(Status.FAILED_PRECONDITION,
                           f"model {model.id} names no language model and layer; fidelity needs both")
    return fidelity.Ask(int(f.predictions), target)


def _token_target(b: pb.Budget, x: torch.Tensor | None) -> float | None:
    if not b.HasField("token_target_fvu"):
        return None
    t = b.token_target_fvu
    if not (math.isfinite(t) and 0 < t <= 1):
        raise invalid(f"budget.token_target_fvu must be in (0, 1], got {t}")
    if x is None:
        raise invalid("budget.token_target_fvu needs activations as the input (each token's error is measured "
                      "against them)")
    if x.shape[0] < 2:
        raise invalid("budget.token_target_fvu needs at least 2 tokens (the baseline is the mean over the tokens)")
    return float(t)


def _k_budget(req: pb.StreamDecodeRequest, model: ServedModel,
              limits: Limits) -> tuple[int | None, tuple[int, ...], bool]:
    """(max_k, the k' ladder of a STREAM_AXIS_K stream (empty for a G climb), whether max_k cut it)."""
    k = int(model.meta.k)
    max_k = k_prime(req.budget.max_k, model) if req.budget.HasField("max_k") else None
    if req.axis == pb.STREAM_AXIS_G:
        if req.k_ladder:
            raise invalid("k_ladder is for axis STREAM_AXIS_K; a G stream climbs `ladder`")
        return max_k, (), False
    if req.axis != pb.STREAM_AXIS_K:
        raise invalid(f"axis: unknown StreamAxis {req.axis}")
    if req.ladder:
        raise invalid("ladder is for axis STREAM_AXIS_G; a k' stream climbs k_ladder at one G "
                      "(budget.max_granularity, or M)")
    ks = tuple(int(v) for v in req.k_ladder) or budgets.k_ladder(k)
    if len(ks) > limits.max_rungs:
        raise exhausted(f"k_ladder: {len(ks)} rungs exceed the limit of {limits.max_rungs}")
    prev = 0
    for v in ks:
        if not 1 <= v <= k:
            raise invalid(f"k_ladder: k'={v} out of range 1..{k} (k of model {model.id})")
        if v <= prev:
            raise invalid(f"k_ladder: k' values must be strictly increasing, got {v} after {prev}")
        prev = v
    if max_k is not None and max_k < ks[-1]:
        return max_k, tuple(v for v in ks if v < max_k) + (max_k,), True
    return max_k, ks, False
