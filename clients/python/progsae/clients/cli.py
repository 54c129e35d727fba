"""`progsae client models|encode|decode|stream`: talk to a running server from the shell.

Its flags come from dataclasses (progsae.clients.flags): the connection's from `ClientConfig`
(`--token` defaults to $PROGSAE_TOKEN), each call's from the `*Call` classes below.
Activations come from a .npy file ([N, d_in] float) or `--random N` rows, or the server makes them
from `--text` with the checkpoint's language model; codes are written and read as .npz (offsets,
indices, values). `stream --text ... --kl` shows what each rung does to the language model's
next-token prediction (revision 5), and `--token-target-kl` stops each token once it is close enough.

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
    text: str | None = field(default=None, metadata={"one_of": "activations"})
    """A text: the server runs the checkpoint's language model up to its layer (EncodeText)."""
    max_tokens: int = 0
    """With --text: most tokens to keep (0 = the server's limit)."""


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
    kl: bool = False
    """With --text: each rung's KL of the language model's next-token prediction, per token."""
    predictions: int = 0
    """With --text: show the n most probable next tokens of each token at its final rung (turns --kl on)."""
    token_target_kl: float | None = None
    """With --text: per-token KL budget (nats); each token stops refining once its KL is <= this."""


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
        t0 = time.perf_counter()
        if inputs.text is not None:
            if call.prefix is not None:
                print("progsae client: --prefix takes activations, not --text", file=sys.stderr)
                return 2
            text = _call(lambda: c.encode_text(inputs.text or "", model=inputs.model, max_tokens=inputs.max_tokens))
            model_id, codes, mode = text.model_id, text.codes, f"text ({text.language_model} layer {text.layer})"
        else:
            info = _call(lambda: c.model(inputs.model))
            x = _activations(inputs, info.d_in)
            t0 = time.perf_counter()
            enc = _call(lambda: c.encode(x, model=inputs.model, prefix_g=call.prefix))
            model_id, codes, mode = enc.model_id, enc.codes, f"prefix G={enc.granularity}" if enc.prefix else "full"
        ms = 1e3 * (time.perf_counter() - t0)
    l0 = np.diff(codes.offsets)
    print(f"{model_id}: {codes.tokens} tokens, mean L0 {l0.mean():.2f}, {mode} encode, {ms:.1f} ms")
    if call.out:
        np.savez(call.out, offsets=codes.offsets, indices=codes.indices, values=codes.values, model_id=model_id)
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
    from .types import Prediction

    kl = call.kl or call.predictions > 0 or call.token_target_kl is not None
    with _client(cfg) as c:
        if inputs.text is not None:
            source: Any = inputs.text
        else:
            info = _call(lambda: c.model(inputs.model))
            source = _activations(inputs, info.d_in)
        s = c.stream(source, model=inputs.model, max_g=call.max_g, deadline_ms=call.deadline_ms,
                     target_fvu=call.target_fvu, payload="none", token_target_fvu=call.token_target_fvu,
                     max_k=call.max_k, axis=call.axis, k_ladder=call.k_ladder, kl=kl, predictions=call.predictions,
                     token_target_kl=call.token_target_kl, max_tokens=inputs.max_tokens)
        kl_col = f" {'mean KL':>8}" if kl else ""
        print(f"{'G':>8} {'k':>4} {'L0':>7} {'FVU':>8}{kl_col} {'refining':>8} {'server ms':>10} {'client ms':>10}",
              flush=True)
        last: dict[int, list[Prediction]] = {}

        def show():
            for r in s:
                fvu = f"{r.fvu:8.4f}" if r.fvu is not None else f"{'-':>8}"
                k = str(r.k) if r.k else "-"
                refining = "-" if r.refining is None else str(r.refining)
                mean_kl = "" if not kl else f" {r.mean_kl:8.4f}" if r.mean_kl is not None else f" {'-':>8}"
                print(f"{r.g:8d} {k:>4} {r.mean_l0:7.2f} {fvu}{mean_kl} {refining:>8} {r.elapsed_ms:10.2f} "
                      f"{r.client_ms:10.2f}", flush=True)
                rows = r.tokens.tolist() if r.tokens is not None else range(s.result.tokens)
                for j, n in enumerate(rows):
                    if r.predictions is not None:
                        last[n] = r.predictions[j]

        _call(show)
        res = s.result
    k = f", k'={res.final_k}" if res.final_k else ""
    print(f"stop: {res.stop_reason} after {res.rungs} rungs (G={res.final_g}{k}) in {res.elapsed_ms:.1f} ms")
    if res.token_met is not None and res.token_final_g is not None:
        print(f"tokens: {int(res.token_met.sum())}/{len(res.token_met)} met the per-token target; "
              f"mean final G {res.token_final_g.mean():.1f}")
    if res.token_kl is not None:
        _token_table(res, last)
    return 0


def _token_table(res: Any, last: dict[int, Any]) -> None:
    """One line per token of a text stream with fidelity: its final G, KL, top-1 and predictions."""
    clean = res.clean_predictions or []
    print(f"{'token':>16} {'G':>6} {'KL':>8} {'top1':>5} {'met':>4}  predicted (clean)")
    for n, kl in enumerate(res.token_kl.tolist()):
        word = res.token_strings[n] if n < len(res.token_strings) else str(n)
        g = int(res.token_final_g[n]) if res.token_final_g is not None else res.final_g
        met = "-" if res.token_met is None else "yes" if res.token_met[n] else "no"
        preds = " ".join(f"{p.token!r}:{p.prob:.2f}" for p in last.get(n, []))
        ref = " ".join(f"{p.token!r}:{p.prob:.2f}" for p in clean[n]) if n < len(clean) else ""
        print(f"{word!r:>16} {g:6d} {kl:8.4f} {'yes' if res.token_top1[n] else 'no':>5} {met:>4}  {preds}"
              + (f"  ({ref})" if ref else ""))
