"""Synchronous Python client: numpy in, numpy out, one exception type.

    from progsae.clients import Client
    with Client("localhost:9000") as c:
        enc = c.encode(x, model="topk")           # x: [N, d_in] float32
        x_hat = c.decode_at(enc, g=256).reconstruction
        for rung in c.stream(x, model="topk", target_fvu=0.2):
            print(rung.g, rung.mean_l0, rung.fvu)
        s = c.stream("The Eiffel Tower is in", model="topk", token_target_kl=0.1, predictions=3)
        for rung in s:                            # a text: the server runs its language model first
            print(rung.g, rung.mean_kl)          # KL of the next-token prediction, rung by rung
        print(s.result.token_final_g, s.result.token_kl, s.result.token_met)

Every call has a deadline (`timeout`), is retried on UNAVAILABLE with exponential backoff, and
raises `ProgsaeError` carrying the gRPC status code and the server's one-line message. Every
progsae RPC only reads, so a retry is safe; a stream interrupted after it delivered rungs (its
replica or node died) is resumed: the retry replays it and the rungs already delivered are
checked and skipped (`Replay`), so the caller sees each rung once, in order.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import grpc
import numpy as np

from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc

from . import types as t
from .types import ProgsaeError

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_REPLICA_LOST = re.compile(
    r"actor ?died|actordiederror|actorunavailableerror|actor (?:\w+ )?is (?:temporarily )?unavailable"
    r"|nodediederror|workercrashederror|localrayletdiederror|objectlosterror|ownerdiederror", re.IGNORECASE)
"""Ray's words for a lost replica (its worker, its node, or a result it held)."""


def status_of(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The call's status and one-line message. A stock Ray Serve gRPC proxy answers INTERNAL, with a
    multi-line Ray message, when the replica serving the call or its node dies (progsae's proxy hook,
    progsae.server.ray_proxy, answers UNAVAILABLE itself); that is a transient UNAVAILABLE to us."""
    code, details = e.code(), e.details() or ""
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and _REPLICA_LOST.search(details):
        return grpc.StatusCode.UNAVAILABLE, "the replica serving the call was lost (the service is replacing it)"
    if code == grpc.StatusCode.CANCELLED:  # callers check their own cancels first: this one is the server's
        return grpc.StatusCode.UNAVAILABLE, "the server cancelled the call (its replica is stopping)"
    return code, " ".join(details.split())


_LOST_WHILE_SERVING = re.compile(
    r"replica serving the call was lost|server cancelled the call|socket closed|connection reset|broken pipe"
    r"|stream removed|rst_stream|end of file", re.IGNORECASE)
"""An UNAVAILABLE whose call had reached a replica that went away under it (Ray's lost-replica answer, or
the replica's own port dropping the connection mid-call), as opposed to one that never got a replica."""
_NEVER_SENT = re.compile(r"failed to connect|all backends failing|connection refused|no healthy|not ready",
                         re.IGNORECASE)
"""An UNAVAILABLE of a call that no replica received (no connection could carry it): always safe to retry."""


class Retries:
    """When a failed call is tried again. UNAVAILABLE is transient: retried up to `retries` times with
    exponential backoff. But a call whose replica died while serving it may be what killed it (an
    out-of-memory request, a crash): it is retried once only, so one poison request costs at most two
    replica restarts, not `retries + 1`."""

    def __init__(self, cfg: ClientConfig):
        self.cfg, self.attempt, self.lost, self.delay = cfg, 0, 0, cfg.backoff

    def again(self, code: grpc.StatusCode, details: str) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if code not in RETRYABLE or self.attempt >= self.cfg.retries:
            return None
        if _LOST_WHILE_SERVING.search(details) and not _NEVER_SENT.search(details):
            if self.lost >= 1:
                return None
            self.lost += 1
        self.attempt += 1
        delay, self.delay = self.delay, self.delay * 2
        return delay


class Diverged(Exception):
    """A resumed stream did not replay what the interrupted one had delivered."""


class Replay:
    """One StreamDecode call across its attempts: what was delivered, so that an attempt after an
    UNAVAILABLE part-way (a replica or node lost) resumes the stream instead of failing it.

    StreamDecode only reads, and its messages are a function of the request and the checkpoint, so
    the retry sends the same request (its `deadline_ms` budget less the time already spent) and this
    drops what the caller already has: the header must match the first one byte for byte (model,
    tokens, ladder, payload, the server's codes), each replayed rung must have the granularity and
    mean L0 delivered before, and the first new rung must follow the last delivered one. Anything else
    raises `Diverged` and the caller gets the original error. If the shortened budget ends the retry
    before the last delivered rung, the result keeps the rungs delivered.
    """

    def __init__(self, request: pb.StreamDecodeRequest):
        self.first = request
        self.t0 = time.perf_counter()
        self.header: bytes | None = None
        self.delivered: list[tuple[int, float]] = []
        """(g, mean_l0) of every rung handed to the caller, by index."""
        self.last_fvu: float | None = None
        self._fresh = True

    @property
    def resuming(self) -> bool:
        return self.header is not None or bool(self.delivered)

    def request(self) -> pb.StreamDecodeRequest:
        """The request of the next attempt."""
        self._fresh = True
        if not self.resuming or self.first.budget.deadline_ms <= 0:
            return self.first
        req = pb.StreamDecodeRequest()
        req.CopyFrom(self.first)
        spent = int(1e3 * (time.perf_counter() - self.t0))
        req.budget.deadline_ms = max(1, self.first.budget.deadline_ms - spent)
        return req

    def absorb(self, msg: pb.StreamDecodeResponse, result: t.StreamResult, client_ms: float) -> t.Rung | None:
        """Update `result` from msg; the rung to hand to the caller, or None (none, or already delivered)."""
        fresh, self._fresh = self._fresh, False
        if msg.HasField("header"):
            header = msg.header.SerializeToString(deterministic=True)
            if self.header is None:
                self.header = header
            elif header != self.header:
                raise Diverged("the resumed stream's header differs")
        elif fresh and self.header is not None:
            raise Diverged("the resumed stream sent no header")
        rung = t.absorb(msg, result, client_ms)
        if rung is not None:
            n = len(self.delivered)
            if rung.index < n:
                if self.delivered[rung.index] != (rung.g, rung.mean_l0):
                    raise Diverged(f"the resumed stream's rung {rung.index} differs")
                rung = None
            elif rung.index == n:
                self.delivered.append((rung.g, rung.mean_l0))
                self.last_fvu = rung.fvu
                t.accumulate(result, rung)  # per-token rows, once per rung however often it is replayed
            else:
                raise Diverged(f"the resumed stream skipped to rung {rung.index} after {n}")
        if msg.HasField("end") and result.rungs < len(self.delivered):
            result.rungs, result.final_g = len(self.delivered), self.delivered[-1][0]
            result.final_fvu = self.last_fvu
        return rung


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to the server."""

    target: str = "localhost:9000"
    """host:port of the gRPC endpoint (Ray Serve's gRPC proxy or a plain server)."""
    timeout: float = 30.0
    """Default deadline of each call, seconds."""
    retries: int = 5
    """Extra attempts after an UNAVAILABLE answer (one only when the call's replica died under it)."""
    backoff: float = 0.1
    """First retry delay, seconds; doubles each attempt."""
    max_message_bytes: int = 256 * 1024 * 1024
    """Largest message sent or received."""
    application: str = ""
    """Ray Serve application name (metadata `application`); empty when the cluster runs one app."""
    token: str = ""
    """Bearer token sent as metadata `authorization: Bearer <token>` (servers with auth on); empty = none."""
    tls: bool = False
    """Speak TLS (system roots, or `tls_ca_file`)."""
    tls_ca_file: str = ""
    """PEM file of the CA (or self-signed certificate) to trust; implies `tls`."""
    load_balancing: str = "round_robin"
    """gRPC load-balancing policy over the addresses `target` resolves to: "round_robin" spreads calls
    over every replica a DNS name lists (a Kubernetes headless Service), re-resolving when a connection
    closes (the replicas' maximum connection age); "pick_first" sticks to one."""


def channel_options(cfg: ClientConfig) -> list[tuple[str, int | str]]:
    return [("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.lb_policy_name", cfg.load_balancing),
            # a replica that went away is reconnected to (or replaced) within 0.1 s, not gRPC's default 1 s,
            # so retries land while the service re-forms (a redeploy, a scale-down, a node lost)
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # each client its own connections: gRPC otherwise shares one subchannel per address among all
            # the channels of a process, so a process's clients all land on, and move between, the same
            # replica together (seen: 12 clients on one replica while a new one stood idle)
            ("grpc.use_local_subchannel_pool", 1)]


def credentials(cfg: ClientConfig):
    """TLS channel credentials, or None for a plaintext channel."""
    if not (cfg.tls or cfg.tls_ca_file):
        return None
    ca = None
    if cfg.tls_ca_file:
        with open(cfg.tls_ca_file, "rb") as f:
            ca = f.read()
    return grpc.ssl_channel_credentials(root_certificates=ca)


@overload
def make_channel(cfg: ClientConfig, aio: Literal[False] = False) -> grpc.Channel: ...
@overload
def make_channel(cfg: ClientConfig, aio: Literal[True]) -> grpc.aio.Channel: ...
def make_channel(cfg: ClientConfig, aio: bool = False) -> grpc.Channel | grpc.aio.Channel:
    """A (grpc.aio when `aio`) channel to cfg.target: TLS when configured, else plaintext."""
    mod = grpc.aio if aio else grpc
    creds = credentials(cfg)
    if creds is None:
        return mod.insecure_channel(cfg.target, options=channel_options(cfg))
    return mod.secure_channel(cfg.target, creds, options=channel_options(cfg))


TIMEOUT_METADATA = "progsae-timeout-ms"
"""The call's deadline, relative, in ms: Ray Serve does not forward gRPC deadlines to replicas, so
the client sends it as metadata and the replica stops computing once it has passed."""


def metadata(cfg: ClientConfig, model: str, timeout: float | None = None) -> list[tuple[str, str]]:
    md = [("multiplexed_model_id", model)] if model else []
    md.append((TIMEOUT_METADATA, str(max(1, int(1e3 * (timeout or cfg.timeout))))))
    if cfg.application:
        md.append(("application", cfg.application))
    if cfg.token:
        md.append(("authorization", f"Bearer {cfg.token}"))
    return md


class Client:
    """Blocking client over one channel; use as a context manager or call `close()`."""

    def __init__(self, target: str = "localhost:9000", **options):
        self.config = ClientConfig(target=target, **options)
        self.channel = make_channel(self.config)
        self.stub = pb_grpc.ProgsaeStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request, model: str = "", timeout: float | None = None):
        fn = getattr(self.stub, method)
        retries = Retries(self.config)
        while True:
            try:
                return fn(request, timeout=timeout or self.config.timeout,
                          metadata=metadata(self.config, model, timeout))
            except grpc.RpcError as e:
                code, details = status_of(e)
                delay = retries.again(code, details)
                if delay is None:
                    raise ProgsaeError(code, details, method) from None
                time.sleep(delay)

    # --- calls ----------------------------------------------------------------------------

    def models(self) -> list[t.ModelInfo]:
        return [t.ModelInfo.from_proto(m) for m in self._call("ListModels", pb.ListModelsRequest()).models]

    def model(self, model: str = "") -> t.ModelInfo:
        return t.ModelInfo.from_proto(self._call("GetModel", pb.GetModelRequest(model_id=model)))

    def encode(self, x: np.ndarray, model: str = "", prefix_g: int | None = None, dtype: str = "float32",
               timeout: float | None = None) -> t.Encoded:
        """[N, d_in] activations -> codes (full top-k; `prefix_g` for the cheap prefix encode)."""
        return t.encoded(self._call("Encode", t.encode_request(x, model, prefix_g, dtype), model, timeout))

    def decode_at(self, codes, g: int, model: str = "", timeout: float | None = None,
                  max_k: int | None = None) -> t.Decoded:
        """Codes (an `Encoded`, CSR arrays or a padded (indices, values) pair) -> reconstruction at G
        (at (G, k') with `max_k`: each token's k' largest codes below G)."""
        if isinstance(codes, t.Encoded) and not model:
            model = codes.model_id
        req = pb.DecodeRequest(model_id=model, codes=t.codes_msg(codes), granularity=g, max_k=max_k)
        return t.decoded(self._call("DecodeAtGranularity", req, model, timeout))

    def stream(self, inputs, model: str = "", max_g: int | None = None, deadline_ms: int | None = None,
               target_fvu: float | None = None, payload: str = "reconstruction", ladder: Sequence[int] = (),
               per_token_l0: bool = False, dtype: str = "float32", timeout: float | None = None,
               token_target_fvu: float | None = None, max_k: int | None = None, axis: str = "g",
               k_ladder: Sequence[int] = (), *, kl: bool = False, predictions: int = 0,
               token_target_kl: float | None = None, max_tokens: int = 0) -> Stream:
        """Progressive decode of activations (np.ndarray), codes or a text (str: the server runs the
        checkpoint's language model up to its layer first, at most `max_tokens` tokens) under a budget:
        iterate for rungs.

        `token_target_fvu`: each token stops refining once its own relative error is <= it; after the
        stream, `result.token_final_g`, `result.token_met` and (tensor payloads) `result.reconstruction`
        hold each token's outcome. `max_k`: decode at (G, k'). `axis="k"`: climb k' up `k_ladder`
        (default 1, 2, 4, ..., k) at G = `max_g` or M.

        Text streams only (revision 5): `kl` gives each rung, per computed token, the KL of the language
        model's next-token prediction with the rung's reconstruction spliced in (`rung.kl`, `rung.top1`,
        `rung.mean_kl`; `result.token_kl` at the end); `predictions=n` adds the n most probable next
        tokens (`rung.predictions`, `result.clean_predictions`); `token_target_kl` stops each token at its
        first rung with KL <= it (as token_target_fvu does)."""
        req = t.stream_request(inputs, model, max_g, deadline_ms, target_fvu, payload, ladder, per_token_l0, dtype,
                               token_target_fvu, max_k, axis, k_ladder, kl=kl, predictions=predictions,
                               token_target_kl=token_target_kl, max_tokens=max_tokens)
        return Stream(self, req, model, timeout)

    def encode_text(self, text: str, model: str = "", max_tokens: int = 0) -> t.TextEncoded:
        req = pb.EncodeTextRequest(model_id=model, text=text, max_tokens=max_tokens, packed_codes=True)
        return t.text_encoded(self._call("EncodeText", req, model))

    def encode_texts(self, texts: Sequence[str], models: Sequence[str] = (), max_tokens: int = 0,
                     timeout: float | None = None) -> t.TextsEncoded:
        """Several texts through several SAEs (all on one language model), the language model run once
        (revision 6): `.results[text][model]`."""
        req = pb.EncodeTextsRequest(model_ids=list(models), texts=list(texts), max_tokens=max_tokens,
                                    packed_codes=True)
        return t.texts_encoded(self._call("EncodeTexts", req, models[0] if len(models) == 1 else "", timeout),
                               len(texts))

    def stats(self) -> pb.ServerStats:
        return self._call("GetServerStats", pb.ServerStatsRequest())


class Stream:
    """An iterator of `Rung`s; `result` holds the header facts and, after the last, the stop reason.

    `cancel()` (or leaving a `with` block early) cancels the call; the server stops computing.
    """

    def __init__(self, client: Client, request: pb.StreamDecodeRequest, model: str, timeout: float | None):
        self.client, self.request, self.model = client, request, model
        self.timeout = timeout or client.config.timeout
        self.result = t.StreamResult()
        self.resumed = 0
        """How many times the stream was resumed after it was cut part-way (UNAVAILABLE after rungs)."""
        self._call = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[t.Rung]:
        cfg = self.client.config
        retries, replay = Retries(cfg), Replay(self.request)
        failed: tuple[grpc.StatusCode, str] | None = None
        while True:
            t0 = time.perf_counter()
            self.resumed += replay.resuming
            self._call = self.client.stub.StreamDecode(replay.request(), timeout=self.timeout,
                                                       metadata=metadata(cfg, self.model, self.timeout))
            try:
                for msg in self._call:
                    rung = replay.absorb(msg, self.result, 1e3 * (time.perf_counter() - t0))
                    if rung is not None:
                        yield rung
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                    return
                code, details = failed = status_of(e)
                delay = retries.again(code, details)
                if delay is None:
                    raise ProgsaeError(code, details, "StreamDecode") from None
                time.sleep(delay)
            except Diverged as d:
                self._call.cancel()
                code, details = failed or (grpc.StatusCode.INTERNAL, "")
                raise ProgsaeError(code, f"{details} (not resumed: {d})", "StreamDecode") from None
