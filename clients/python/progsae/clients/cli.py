"""`progsae client models|encode|decode|stream`: talk to a running server from the shell.

Its flags come from dataclasses (progsae.clients.flags): the connection's from `ClientConfig`
(`--token` defaults to $PROGSAE_TOKEN), each call's from the `*Call` classes below.
Activations come from a .npy file ([N, d_in] float) or `--random N` rows; codes are written
and read as .npz (offsets, indices, values).

This is `progsae-client`, the one command of the light distribution (clients/python), and
`progsae client` of the full one (progsae.cli.client): the same flags and calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .flags import Bound, Parser, add_dataclass

if TYPE_CHECKING:
    import numpy as np

    from .client import Client, ClientConfig

HELP = "call a running progsae server (models, encode, decode, stream)"
TOKEN_ENV = "PROGSAE_TOKEN"


@dataclass
class Inputs:
    """Which model, and the activations to send."""

    model: str = ""
    """Model id (default: the server's default)."""
    npy: str | None = field(default=None, metadata={"one_of": "activations"})
    """Activations [N, d_in] as .npy."""
    random: int | None = field(default=None, metadata={"one_of": "activations", "metavar": "N"})
    """N random Gaussian rows (smoke test)."""


@dataclass
class EncodeCall:
    """activations -> codes."""

    prefix: int | None = field(default=None, metadata={"metavar": "G"})
    """Prefix encode at G (cheap mode)."""
    out: str | None = None
    """Write the codes to this .npz."""


@dataclass
class DecodeCall:
    """codes -> reconstruction at G."""

    codes: str = field(metadata={"positional": True})
    """.npz written by `progsae client encode --out`."""
    granularity: int = field(metadata={"flags": ("-g", "--granularity")})
    """Granularity G of the reconstruction."""
    model: str = ""
    """Model id (default: the one recorded in the .npz, else the server's default)."""
    out: str | None = None
    """Write the reconstruction to this .npy."""


@dataclass
class StreamCall:
    """A progressive decode under a budget."""

    max_g: int | None = None
    """Highest granularity."""
    deadline_ms: int | None = None
    """Server-side compute budget, ms."""
    target_fvu: float | None = None
    """Stop once FVU <= this."""
    token_target_fvu: float | None = None
    """Per-token budget: each token stops refining once its own relative error is <= this."""
    max_k: int | None = None
    """Decode each token from at most its k' largest codes (below G)."""
    axis: Literal["g", "k"] = "g"
    """Climb the granularity G, or k' (at G = --max-g, or M)."""
    k_ladder: tuple[int, ...] = ()
    """The k' rungs of --axis k (default 1,2,4,...,k)."""


def main(argv: list[str] | None = None) -> int:
    """`progsae-client ...`, the light distribution's own command: the same flags and calls as the full
    distribution's `progsae client ...` (each distribution installs one script, named for it)."""
    parser = Parser(prog="progsae-client", description=HELP)
    configure(parser)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the connection flags and one sub-command per call to `parser`."""
    from .client import ClientConfig

    parser.description = f"{HELP}; --token defaults to ${TOKEN_ENV}"
    conn = add_dataclass(parser, ClientConfig, meta={"tls_ca_file": {"flags": "--tls-ca", "metavar": "PEM"}})
    parser.set_defaults(token=None)  # absent: $PROGSAE_TOKEN, so that `--token ''` can still turn it off
    calls = parser.add_subparsers(dest="client_command", metavar="CALL", required=True)

    def call(name: str, text: str, fn: Any, *classes: type) -> None:
        p = calls.add_parser(name, help=text, description=text)
        bound = [add_dataclass(p, c) for c in classes]
        p.set_defaults(run=lambda args: fn(_connection(conn, args), *(b.build(args) for b in bound)))

    call("models", "list served models", run_models)
    call("encode", "activations -> codes", run_encode, Inputs, EncodeCall)
    call("decode", "codes (.npz from encode) -> reconstruction at G", run_decode, DecodeCall)
    call("stream", "progressive decode under a budget; prints a live table", run_stream, Inputs, StreamCall)


def _connection(conn: Bound[ClientConfig], args: argparse.Namespace) -> ClientConfig:
    return conn.build(args, token=args.token if args.token is not None else os.environ.get(TOKEN_ENV, ""))


def _client(cfg: ClientConfig) -> Client:
    from .client import Client

    return Client(**dataclasses.asdict(cfg))


def _activations(inputs: Inputs, d_in: int) -> np.ndarray:
    import numpy as np

    if inputs.npy:
        return np.load(inputs.npy).astype(np.float32)
    return np.random.default_rng(0).standard_normal((inputs.random or 0, d_in)).astype(np.float32)


def _call(fn):
    from progsae.clients import ProgsaeError

    try:
        return fn()
    except ProgsaeError as e:
        print(f"progsae client: {e.code.name}: {e.details}", file=sys.stderr)
        raise SystemExit(1) from None


def run_models(cfg: ClientConfig) -> int:
    with _client(cfg) as c:
        for m in _call(c.models):
            lm = f"{m.language_model}" + (f" layer {m.layer}" if m.layer is not None else "") \
                if m.language_model else "-"
            print(f"{m.model_id:28s} {m.architecture:10s} d_in={m.d_in:<5d} M={m.d_sae:<7d} k={m.k:<4d} "
                  f"ladder={','.join(map(str, m.ladder))}  lm={lm}")
    return 0


def run_encode(cfg: ClientConfig, inputs: Inputs, call: EncodeCall) -> int:
    import numpy as np

    with _client(cfg) as c:
        info = _call(lambda: c.model(inputs.model))
        x = _activations(inputs, info.d_in)
        t0 = time.perf_counter()
        enc = _call(lambda: c.encode(x, model=inputs.model, prefix_g=call.prefix))
        ms = 1e3 * (time.perf_counter() - t0)
    l0 = np.diff(enc.codes.offsets)
    print(f"{enc.model_id}: {enc.codes.tokens} tokens, mean L0 {l0.mean():.2f}, "
          f"{'prefix G=' + str(enc.granularity) if enc.prefix else 'full'} encode, {ms:.1f} ms")
    if call.out:
        np.savez(call.out, offsets=enc.codes.offsets, indices=enc.codes.indices, values=enc.codes.values,
                 model_id=enc.model_id)
        print(f"codes written to {call.out}")
    return 0


def run_decode(cfg: ClientConfig, call: DecodeCall) -> int:
    import numpy as np

    from progsae.v1.convert import SparseArrays

    z = np.load(call.codes)
    codes = SparseArrays(z["offsets"], z["indices"], z["values"])
    model = call.model or str(z["model_id"]) if "model_id" in z else call.model
    with _client(cfg) as c:
        dec = _call(lambda: c.decode_at(codes, call.granularity, model=model))
    print(f"{dec.model_id}: reconstruction {dec.reconstruction.shape} at G={dec.granularity}, "
          f"mean L0 {dec.l0.mean():.2f}")
    if call.out:
        np.save(call.out, dec.reconstruction)
    return 0


def run_stream(cfg: ClientConfig, inputs: Inputs, call: StreamCall) -> int:
    with _client(cfg) as c:
        info = _call(lambda: c.model(inputs.model))
        x = _activations(inputs, info.d_in)
        s = c.stream(x, model=inputs.model, max_g=call.max_g, deadline_ms=call.deadline_ms,
                     target_fvu=call.target_fvu, payload="none", token_target_fvu=call.token_target_fvu,
                     max_k=call.max_k, axis=call.axis, k_ladder=call.k_ladder)
        print(f"{'G':>8} {'k':>4} {'L0':>7} {'FVU':>8} {'refining':>8} {'server ms':>10} {'client ms':>10}",
              flush=True)

        def show():
            for r in s:
                fvu = f"{r.fvu:8.4f}" if r.fvu is not None else f"{'-':>8}"
                k = str(r.k) if r.k else "-"
                refining = "-" if r.refining is None else str(r.refining)
                print(f"{r.g:8d} {k:>4} {r.mean_l0:7.2f} {fvu} {refining:>8} {r.elapsed_ms:10.2f} "
                      f"{r.client_ms:10.2f}", flush=True)

        _call(show)
        res = s.result
    k = f", k'={res.final_k}" if res.final_k else ""
    print(f"stop: {res.stop_reason} after {res.rungs} rungs (G={res.final_g}{k}) in {res.elapsed_ms:.1f} ms")
    if res.token_met is not None and res.token_final_g is not None:
        print(f"tokens: {int(res.token_met.sum())}/{len(res.token_met)} met the per-token target; "
              f"mean final G {res.token_final_g.mean():.1f}")
    return 0
