"""Synchronous Python client: numpy in, numpy out, one exception type.

    from progsae.clients import Client
    with Client("localhost:9000") as c:
        enc = c.encode(x, model="topk")           # x: [N, d_in] float32
        x_hat = c.decode_at(enc, g=256).reconstruction
        for rung in c.stream(x, model="topk", target_fvu=0.2):
            print(rung.g, rung.mean_l0, rung.fvu)

Every call has a deadline (`timeout`), is retried on UNAVAILABLE with exponential backoff
(streams only before their first message), and raises `ProgsaeError` carrying the gRPC
status code and the server's one-line message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc

from . import types as t
from .types import ProgsaeError

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
_REPLICA_DIED = ("actor died", "actordiederror", "actorunavailableerror", "actor is unavailable")


def status_of(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The call's status and one-line message. Ray Serve's proxy answers INTERNAL (with a multi-line
    Ray message) when the replica serving the call dies; that is a transient UNAVAILABLE to us."""
    code, details = e.code(), e.details() or ""
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
            m in details.lower() for m in _REPLICA_DIED):
        return grpc.StatusCode.UNAVAILABLE, "the replica serving the call died (the service is replacing it)"
    return code, " ".join(details.split())


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to the server."""

    target: str = "localhost:9000"
    """host:port of the gRPC endpoint (Ray Serve's gRPC proxy or a plain server)."""
    timeout: float = 30.0
    """Default deadline of each call, seconds."""
    retries: int = 3
    """Extra attempts after an UNAVAILABLE answer."""
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


def channel_options(cfg: ClientConfig) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes)]


def credentials(cfg: ClientConfig):
    """TLS channel credentials, or None for a plaintext channel."""
    if not (cfg.tls or cfg.tls_ca_file):
        return None
    ca = None
    if cfg.tls_ca_file:
        with open(cfg.tls_ca_file, "rb") as f:
            ca = f.read()
    return grpc.ssl_channel_credentials(root_certificates=ca)


def make_channel(cfg: ClientConfig, aio: bool = False):
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
        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            try:
                return fn(request, timeout=timeout or self.config.timeout,
                          metadata=metadata(self.config, model, timeout))
            except grpc.RpcError as e:
                code, details = status_of(e)
                if code in RETRYABLE and attempt < self.config.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise ProgsaeError(code, details, method) from None
        raise AssertionError("unreachable")

    # --- calls ----------------------------------------------------------------------------

    def models(self) -> list[t.ModelInfo]:
        return [t.ModelInfo.from_proto(m) for m in self._call("ListModels", pb.ListModelsRequest()).models]

    def model(self, model: str = "") -> t.ModelInfo:
        return t.ModelInfo.from_proto(self._call("GetModel", pb.GetModelRequest(model_id=model)))

    def encode(self, x: np.ndarray, model: str = "", prefix_g: int | None = None, dtype: str = "float32",
               timeout: float | None = None) -> t.Encoded:
        """[N, d_in] activations -> codes (full top-k; `prefix_g` for the cheap prefix encode)."""
        return t.encoded(self._call("Encode", t.encode_request(x, model, prefix_g, dtype), model, timeout))

    def decode_at(self, codes, g: int, model: str = "", timeout: float | None = None) -> t.Decoded:
        """Codes (an `Encoded`, CSR arrays or a padded (indices, values) pair) -> reconstruction at G."""
        if isinstance(codes, t.Encoded) and not model:
            model = codes.model_id
        req = pb.DecodeRequest(model_id=model, codes=t.codes_msg(codes), granularity=g)
        return t.decoded(self._call("DecodeAtGranularity", req, model, timeout))

    def stream(self, inputs, model: str = "", max_g: int | None = None, deadline_ms: int | None = None,
               target_fvu: float | None = None, payload: str = "reconstruction", ladder: Sequence[int] = (),
               per_token_l0: bool = False, dtype: str = "float32", timeout: float | None = None) -> Stream:
        """Progressive decode of activations (np.ndarray) or codes under a budget: iterate for rungs."""
        req = t.stream_request(inputs, model, max_g, deadline_ms, target_fvu, payload, ladder, per_token_l0, dtype)
        return Stream(self, req, model, timeout)

    def encode_text(self, text: str, model: str = "", max_tokens: int = 0) -> t.TextEncoded:
        req = pb.EncodeTextRequest(model_id=model, text=text, max_tokens=max_tokens, packed_codes=True)
        return t.text_encoded(self._call("EncodeText", req, model))

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
        delay, received = cfg.backoff, False
        for attempt in range(cfg.retries + 1):
            t0 = time.perf_counter()
            self._call = self.client.stub.StreamDecode(self.request, timeout=self.timeout,
                                                       metadata=metadata(cfg, self.model, self.timeout))
            try:
                for msg in self._call:
                    received = True
                    rung = t.absorb(msg, self.result, 1e3 * (time.perf_counter() - t0))
                    if rung is not None:
                        yield rung
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                    return
                code, details = status_of(e)
                if code in RETRYABLE and not received and attempt < cfg.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise ProgsaeError(code, details, "StreamDecode") from None
