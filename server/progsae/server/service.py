"""The transport-free service: validated requests in, wire responses (or a stream's typed events) out.

The servicer (progsae.server.servicer) calls these methods for every transport, after it has
authorised the call and resolved its model; errors are ServiceErrors, which the servicer answers
with the call's own status. Streams are progsae.server.stream's one rung loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from progsae.sae import budgets
from progsae.sae.codec import Codes
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import stream, validate
from .errors import ServiceError, Status, internal, invalid
from .fidelity import Fidelity
from .registry import ModelCard, ServedModel
from .stats import Stats
from .text import TextActivations, TextBackend


@dataclass(frozen=True)
class ServiceConfig:
    """Behaviour of the service layer, shared by every transport."""

    limits: validate.Limits = field(default_factory=validate.Limits)
    """Per-request size limits."""
    torch_threads: int = 0
    """torch intra-op threads in this process; 0 leaves torch's default."""
    compute_threads: int = 2
    """Threads that run torch work off the event loop (encode, decode, rungs): calls beyond this many
    wait their turn while the loop keeps answering health, metadata and other streams."""
    memory_bytes: int = 0
    """Most memory one call may need, its model's weights included when not loaded yet; a call priced
    above it is refused with RESOURCE_EXHAUSTED before it runs (progsae.server.admission). 0 = half the
    memory this process may use, over `compute_threads`; -1 = no check."""


class CodecService:
    """Encode / decode / stream over loaded models; keeps the process's counters."""

    def __init__(self, config: ServiceConfig | None = None, stats: Stats | None = None,
                 text_available: Callable[[ModelCard], bool] | None = None, lms: TextBackend | None = None):
        self.config = config or ServiceConfig()
        self.limits = self.config.limits
        self.stats = stats or Stats()
        self._text_available = text_available or (lambda card: False)
        self.lms = lms or TextBackend()
        """The process's language models, for a text stream's fidelity (the layers after the SAE's)."""
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)

    # --- bookkeeping ----------------------------------------------------------------------

    @contextmanager
    def observe(self, method: str, model: str = ""):
        """Time a call and count it by status; unexpected exceptions become INTERNAL."""
        t0 = time.perf_counter()
        status = "OK"
        try:
            yield
        except ServiceError as e:
            status = e.status.value
            raise
        except Exception as e:  # noqa: BLE001  (never a traceback to the caller)
            status = Status.INTERNAL.value
            raise internal(e) from e
        except BaseException:  # the call was cancelled (asyncio) or the process is stopping
            status = Status.CANCELLED.value
            raise
        finally:
            self.stats.request(method, status, model, time.perf_counter() - t0)

    # --- encode ---------------------------------------------------------------------------

    def encode(self, model: ServedModel, req: pb.EncodeRequest) -> pb.EncodeResponse:
        out = self.encode_batch([(model, req)])[0]
        if isinstance(out, ServiceError):
            raise out
        return out

    def encode_batch(
        self, items: Sequence[tuple[ServedModel, pb.EncodeRequest]]
    ) -> list[pb.EncodeResponse | ServiceError]:
        """Encode many requests; requests for the same model and mode share one matmul."""
        results: list[pb.EncodeResponse | ServiceError | None] = [None] * len(items)
        groups: dict[tuple[str, pb.EncodeMode, int], list[tuple[int, torch.Tensor]]] = {}
        models: dict[str, ServedModel] = {}
        for i, (model, req) in enumerate(items):
            try:
                if not req.HasField("activations"):
                    raise invalid("EncodeRequest.activations is missing")
                x = validate.activations(req.activations, model, self.limits)
                g = self._encode_granularity(model, req)
            except ServiceError as e:
                results[i] = e
                continue
            models[model.id] = model
            groups.setdefault((model.id, req.mode, g), []).append((i, x))
        self.stats.batch(len(items))
        for (mid, mode, g), members in groups.items():
            self.stats.count("encode")
            model = models[mid]
            x = torch.cat([x for _, x in members]) if len(members) > 1 else members[0][1]
            x = x.to(model.device)
            with torch.inference_mode():
                codes = model.sae.prefix_encode(x, g) if mode == pb.ENCODE_MODE_PREFIX else model.sae.encode(x)
            idx, val = _np(codes.indices), _np(codes.values)
            start = 0
            for i, xi in members:
                n = xi.shape[0]
                results[i] = pb.EncodeResponse(
                    model_id=model.id,
                    codes=convert.codes_from_arrays(idx[start:start + n], val[start:start + n],
                                                    packed=items[i][1].packed_codes),
                    normalisation=_normalisation(model.card),
                    mode=mode,
                    granularity=g,
                )
                start += n
        return results  # type: ignore[return-value]

    def _encode_granularity(self, model: ServedModel, req: pb.EncodeRequest) -> int:
        if req.mode == pb.ENCODE_MODE_FULL:
            if req.granularity not in (0, model.d_sae):
                raise invalid("granularity is only for ENCODE_MODE_PREFIX; a full encode covers all M latents")
            return model.d_sae
        if req.mode == pb.ENCODE_MODE_PREFIX:
            return validate.granularity(req.granularity, model)
        raise invalid(f"mode: unknown EncodeMode {req.mode}")

    # --- decode ---------------------------------------------------------------------------

    def decode_at(self, model: ServedModel, req: pb.DecodeRequest) -> pb.DecodeResponse:
        if not req.HasField("codes"):
            raise invalid("DecodeRequest.codes is missing")
        g = validate.granularity(req.granularity, model)
        dtype = validate.out_dtype(req.output_dtype)
        codes = _to(validate.codes(req.codes, model, self.limits), model.device)
        validate.response_size(codes.indices.shape[0], model, dtype, self.limits)
        k = validate.k_prime(req.max_k, model, "max_k") if req.HasField("max_k") else None
        with torch.inference_mode():
            if k is None:
                recon = model.sae.decode(codes, g)
                l0 = ((codes.indices < g) & (codes.values != 0)).sum(-1)
            else:  # revision 3: decode at (G, k')
                recon = budgets.decode_at(model.sae, codes, g, k)
                l0 = budgets.select(codes, g, k).sum(-1)
        return pb.DecodeResponse(model_id=model.id, granularity=g,
                                 reconstruction=convert.from_numpy(_np(recon), dtype), l0=l0.tolist())

    # --- stream ---------------------------------------------------------------------------

    def stream(
        self,
        model: ServedModel,
        req: pb.StreamDecodeRequest,
        cancelled: Callable[[], bool] | None = None,
        t0: float | None = None,
        text: TextActivations | None = None,
    ) -> Generator[pb.StreamDecodeResponse, None, str | None]:
        """StreamDecode's messages: one per rung (header on the first, end on the last). Validation
        errors raise before the first message. `text`: what the language model made of a text input
        (the servicer runs it), streamed in place of the request's input.

        `cancelled` is polled before every rung; when it answers True (or the consumer
        closes the generator) computing stops at once and the stream counts as cancelled.
        """
        t0 = time.perf_counter() if t0 is None else t0
        x = self.text_activations(model, text) if text is not None else None
        plan = validate.stream_plan(req, model, self.limits, x=x)
        return stream.messages(self.events(model, plan, cancelled or (lambda: False), t0, text=text), plan)

    def events(self, model: ServedModel, plan: validate.StreamPlan, cancelled: Callable[[], bool], t0: float,
               top: int = 0, text: TextActivations | None = None) -> Generator[stream.Event, None, str | None]:
        """A validated stream's typed events (progsae.server.stream): it encodes the activations once,
        then climbs (scoring each rung with the language model when fidelity is on); counted in the
        stats whichever transport consumes it."""
        self.stats.stream_started()
        reason: str | None = None
        try:
            if plan.x is not None:
                codes = self._encode(model, plan.x)
            else:
                assert plan.codes is not None  # the plan holds one input
                codes = _to(plan.codes, model.device)
            fid = None
            if plan.fidelity is not None:
                assert plan.x is not None  # validated: fidelity needs a text input
                self.stats.count("fidelity")
                fid = Fidelity(model, plan.x, plan.fidelity, self.lms)
            reason = yield from stream.events(model.sae, model.id, plan, codes, plan.x is not None, cancelled, t0,
                                              lambda: self.stats.rung(model.id), top, text, fid)
            return reason
        finally:
            self.stats.stream_ended(reason)

    def _encode(self, model: ServedModel, x: torch.Tensor) -> Codes:
        self.stats.count("encode")
        with torch.inference_mode():
            return model.sae.encode(x.to(model.device))

    # --- metadata -------------------------------------------------------------------------

    def model_info(self, card: ModelCard) -> pb.ModelInfo:
        m = card.meta
        architecture = m.architecture
        return pb.ModelInfo(
            model_id=card.spec.id, architecture=architecture, d_in=m.d_in, d_sae=m.d_sae, k=m.k,
            ladder=list(card.ladder), ordering=card.spec.ordering, available_orderings=list(card.orderings),
            language_model=m.model or "", layer=-1 if m.layer is None else int(m.layer), hook=m.hook or "",
            normalisation=_normalisation(card), training_tokens=int(m.training_tokens),
            evaluation_json=json.dumps(card.evaluation, sort_keys=True),
            text_available=bool(self._text_available(card)),
            k_ladder=[int(v) for v in m.extra.get("k_ladder") or ()],
        )

    def server_stats(self, loaded: Mapping[str, ServedModel], loads: int = 0) -> pb.ServerStats:
        """This process's counters; `loaded`: the models it holds, `loads`: checkpoints it has loaded."""
        s = self.stats
        return pb.ServerStats(
            replica=s.replica, streams_started=s.streams_started, streams_completed=s.streams_completed,
            streams_cancelled=s.streams_cancelled, rungs_computed=s.rungs_computed,
            requests=dict(s.requests), loaded_models=list(loaded), work={**s.work, "load": loads},
            loaded_bytes=sum(m.nbytes for m in loaded.values()),
        )

    def text_activations(self, model: ServedModel, ta: TextActivations) -> torch.Tensor:
        """The language model's activations for `model`: [N, d_in] float32 (FAILED_PRECONDITION when the
        checkpoint's LM and layer give another width)."""
        x = torch.from_numpy(np.ascontiguousarray(ta.activations, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != model.d_in:
            raise ServiceError(Status.FAILED_PRECONDITION,
                               f"language model {ta.language_model!r} layer {ta.layer} gives width "
                               f"{tuple(x.shape)[1:]}, model {model.id} expects d_in={model.d_in}")
        return x

    def encode_text_response(self, model: ServedModel, ta: TextActivations, packed: bool = False
                             ) -> pb.EncodeTextResponse:
        x = self.text_activations(model, ta)
        codes = self._encode(model, x)
        return pb.EncodeTextResponse(
            model_id=model.id, token_ids=list(ta.token_ids), tokens=list(ta.tokens),
            codes=convert.codes_from_arrays(_np(codes.indices), _np(codes.values), packed=packed),
            activations=convert.from_numpy(x.numpy()), language_model=ta.language_model, layer=ta.layer,
            text_tokens=ta.text_tokens or len(ta.token_ids),
        )

def _np(t: torch.Tensor) -> np.ndarray:
    """A (possibly CUDA) tensor as a CPU numpy array."""
    return t.detach().cpu().numpy()


def _to(codes, device: torch.device):
    return type(codes)(codes.indices.to(device), codes.values.to(device)) if codes.indices.device != device else codes


def _normalisation(card: ModelCard) -> pb.Normalisation:
    return pb.Normalisation(scale=float(card.meta.scale), folded_into_weights=True)
