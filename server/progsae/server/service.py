"""The transport-free service: validated requests in, wire responses out.

Both transports (the Ray Serve deployment and the plain grpcio server) and the HTTP
endpoints call these methods; they only resolve the model, map `ServiceError` to their
status, and pass a cancellation check into `stream`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from progsae.sae import budgets, metrics
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

from . import budget_stream, validate
from .errors import ServiceError, Status, internal, invalid
from .registry import ModelCard, ServedModel
from .stats import Stats


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


class CodecService:
    """Encode / decode / stream over loaded models; keeps the process's counters."""

    def __init__(self, config: ServiceConfig | None = None, stats: Stats | None = None,
                 text_available: Callable[[ModelCard], bool] | None = None):
        self.config = config or ServiceConfig()
        self.limits = self.config.limits
        self.stats = stats or Stats()
        self._text_available = text_available or (lambda card: False)
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
    ) -> Generator[pb.StreamDecodeResponse, None, None]:
        """One message per rung (header on the first, end on the last). Validation errors raise
        before the first message.

        `cancelled` is polled before every rung; when it answers True (or the consumer
        closes the generator) computing stops at once and the stream counts as cancelled.
        """
        t0 = time.perf_counter() if t0 is None else t0
        plan = validate.stream_plan(req, model, self.limits)
        return self._stream(model, plan, cancelled or (lambda: False), t0)

    def _stream(self, model: ServedModel, plan: validate.StreamPlan, cancelled: Callable[[], bool],
                t0: float) -> Generator[pb.StreamDecodeResponse, None, None]:
        self.stats.stream_started()
        reason_name: str | None = None
        try:
            header = pb.StreamHeader(model_id=model.id, ladder=plan.ladder, payload=plan.payload)
            if plan.k_ladder:
                header.axis = pb.STREAM_AXIS_K
                header.k_ladder.extend(plan.k_ladder)
            if plan.x is not None:
                with torch.inference_mode():
                    codes = model.sae.encode(plan.x.to(model.device))
                header.codes.CopyFrom(convert.codes_from_arrays(_np(codes.indices), _np(codes.values),
                                                                packed=plan.packed_codes))
            else:
                codes = _to(plan.codes, model.device)
            assert codes is not None
            header.tokens = codes.indices.shape[0]
            out = pb.StreamDecodeResponse(header=header)  # the header rides on the first message
            if plan.steps is not None:  # a revision-3 budget (per-token target, k'); else revision 2's path
                reason_name = yield from budget_stream.messages(model, plan, codes, out, cancelled, t0,
                                                                lambda: self.stats.rung(model.id))
                return
            reason, sent, last_g, last_fvu = None, 0, 0, None
            rungs = model.sae.progressive(codes, plan.ladder)
            last = len(plan.ladder) - 1
            for i in range(len(plan.ladder)):
                if cancelled():
                    return
                if plan.deadline_s is not None and time.perf_counter() - t0 >= plan.deadline_s:
                    reason = pb.STOP_REASON_DEADLINE
                    break
                rung = next(rungs)
                self.stats.rung(model.id)
                out.rung.CopyFrom(self._rung_message(i, rung, plan, t0))
                sent, last_g = i + 1, rung.g
                last_fvu = out.rung.fvu if out.rung.HasField("fvu") else None
                if plan.target_fvu is not None and last_fvu is not None and last_fvu <= plan.target_fvu:
                    reason = pb.STOP_REASON_TARGET_FVU
                elif i == last:
                    reason = pb.STOP_REASON_MAX_GRANULARITY if plan.cut else pb.STOP_REASON_LADDER_DONE
                if reason is not None:
                    break
                yield out
                out = pb.StreamDecodeResponse()
            assert reason is not None  # the last rung sets one
            end = pb.StreamEnd(stop_reason=reason, rungs=sent, final_g=last_g,
                               elapsed_ms=1e3 * (time.perf_counter() - t0))
            if last_fvu is not None:
                end.final_fvu = last_fvu
            out.end.CopyFrom(end)  # the end rides on the last rung's message
            reason_name = convert.STOP_REASONS[reason]
            yield out
        finally:
            self.stats.stream_ended(reason_name)

    def _rung_message(self, i: int, rung, plan: validate.StreamPlan, t0: float) -> pb.Rung:
        msg = pb.Rung(index=i, g=rung.g, mean_l0=float(rung.l0.double().mean()))
        if plan.per_token_l0:
            msg.l0.extend(rung.l0.tolist())
        if plan.payload == pb.PAYLOAD_RECONSTRUCTION:
            msg.tensor.CopyFrom(convert.from_numpy(_np(rung.recon), plan.out_dtype))
        elif plan.payload == pb.PAYLOAD_DELTA:
            delta = rung.recon if i == 0 else rung.delta  # the first delta carries b_dec
            msg.tensor.CopyFrom(convert.from_numpy(_np(delta), plan.out_dtype))
        if plan.x is not None:
            f = metrics.fvu(plan.x, rung.recon.cpu())
            if np.isfinite(f):
                msg.fvu = f
        msg.elapsed_ms = 1e3 * (time.perf_counter() - t0)
        return msg

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

    def server_stats(self, loaded: Sequence[str]) -> pb.ServerStats:
        s = self.stats
        return pb.ServerStats(
            replica=s.replica, streams_started=s.streams_started, streams_completed=s.streams_completed,
            streams_cancelled=s.streams_cancelled, rungs_computed=s.rungs_computed,
            requests=dict(s.requests), loaded_models=list(loaded),
        )

    def encode_text_response(self, model: ServedModel, token_ids: Sequence[int], tokens: Sequence[str],
                             acts: np.ndarray, lm_name: str, layer: int,
                             packed: bool = False) -> pb.EncodeTextResponse:
        x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != model.d_in:
            raise ServiceError(Status.FAILED_PRECONDITION,
                               f"language model {lm_name!r} layer {layer} gives width {tuple(x.shape)[1:]}, "
                               f"model {model.id} expects d_in={model.d_in}")
        with torch.inference_mode():
            codes = model.sae.encode(x.to(model.device))
        return pb.EncodeTextResponse(
            model_id=model.id, token_ids=list(token_ids), tokens=list(tokens),
            codes=convert.codes_from_arrays(_np(codes.indices), _np(codes.values), packed=packed),
            activations=convert.from_numpy(x.numpy()), language_model=lm_name, layer=layer,
        )


def _np(t: torch.Tensor) -> np.ndarray:
    """A (possibly CUDA) tensor as a CPU numpy array."""
    return t.detach().cpu().numpy()


def _to(codes, device: torch.device):
    return type(codes)(codes.indices.to(device), codes.values.to(device)) if codes.indices.device != device else codes


def _normalisation(card: ModelCard) -> pb.Normalisation:
    return pb.Normalisation(scale=float(card.meta.scale), folded_into_weights=True)
