"""`progsae client models|encode|decode|stream`: talk to a running server from the shell.

Activations come from a .npy file ([N, d_in] float) or `--random N` rows; codes are written
and read as .npz (offsets, indices, values).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """`progsae client ...` of the light distribution (progsae-client), which has no other command."""
    parser = argparse.ArgumentParser(prog="progsae", description="Call a running progsae server.")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="call a running progsae server (models, encode, decode, stream)")
    p.add_argument("--target", default="localhost:9000", help="gRPC address (default localhost:9000)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    p.add_argument("--token", default=None,
                   help="bearer token for servers with auth on (default: $PROGSAE_TOKEN, else none)")
    p.add_argument("--tls-ca", default="", metavar="PEM", help="speak TLS, trusting this CA / certificate file")
    csub = p.add_subparsers(dest="client_command", metavar="CALL", required=True)

    m = csub.add_parser("models", help="list served models")
    m.set_defaults(func=run_models)

    def inputs(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default="", help="model id (default: the server's default)")
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--npy", help="activations [N, d_in] as .npy")
        src.add_argument("--random", type=int, metavar="N", help="N random Gaussian rows (smoke test)")

    e = csub.add_parser("encode", help="activations -> codes")
    inputs(e)
    e.add_argument("--prefix", type=int, default=None, metavar="G", help="prefix encode at G (cheap mode)")
    e.add_argument("--out", help="write codes to this .npz")
    e.set_defaults(func=run_encode)

    d = csub.add_parser("decode", help="codes (.npz from encode) -> reconstruction at G")
    d.add_argument("--model", default="")
    d.add_argument("codes", help=".npz written by `progsae client encode --out`")
    d.add_argument("-g", "--granularity", type=int, required=True)
    d.add_argument("--out", help="write the reconstruction to this .npy")
    d.set_defaults(func=run_decode)

    s = csub.add_parser("stream", help="progressive decode under a budget; prints a live table")
    inputs(s)
    s.add_argument("--max-g", type=int, default=None, help="highest granularity")
    s.add_argument("--deadline-ms", type=int, default=None, help="server-side compute budget")
    s.add_argument("--target-fvu", type=float, default=None, help="stop once FVU <= this")
    s.set_defaults(func=run_stream)


def _client(args):
    import os

    from progsae.clients.client import Client

    token = args.token if args.token is not None else os.environ.get("PROGSAE_TOKEN", "")
    return Client(args.target, timeout=args.timeout, token=token, tls_ca_file=args.tls_ca)


def _activations(args, d_in: int):
    import numpy as np

    if args.npy:
        return np.load(args.npy).astype(np.float32)
    return np.random.default_rng(0).standard_normal((args.random, d_in)).astype(np.float32)


def _call(fn):
    from progsae.clients import ProgsaeError

    try:
        return fn()
    except ProgsaeError as e:
        print(f"progsae client: {e.code.name}: {e.details}", file=sys.stderr)
        raise SystemExit(1) from None


def run_models(args) -> int:
    with _client(args) as c:
        for m in _call(c.models):
            lm = f"{m.language_model}" + (f" layer {m.layer}" if m.layer is not None else "") \
                if m.language_model else "-"
            print(f"{m.model_id:28s} {m.architecture:10s} d_in={m.d_in:<5d} M={m.d_sae:<7d} k={m.k:<4d} "
                  f"ladder={','.join(map(str, m.ladder))}  lm={lm}")
    return 0


def run_encode(args) -> int:
    import numpy as np

    with _client(args) as c:
        info = _call(lambda: c.model(args.model))
        x = _activations(args, info.d_in)
        t0 = time.perf_counter()
        enc = _call(lambda: c.encode(x, model=args.model, prefix_g=args.prefix))
        ms = 1e3 * (time.perf_counter() - t0)
    l0 = np.diff(enc.codes.offsets)
    print(f"{enc.model_id}: {enc.codes.tokens} tokens, mean L0 {l0.mean():.2f}, "
          f"{'prefix G=' + str(enc.granularity) if enc.prefix else 'full'} encode, {ms:.1f} ms")
    if args.out:
        np.savez(args.out, offsets=enc.codes.offsets, indices=enc.codes.indices, values=enc.codes.values,
                 model_id=enc.model_id)
        print(f"codes written to {args.out}")
    return 0


def run_decode(args) -> int:
    import numpy as np

    from progsae.v1.convert import SparseArrays

    z = np.load(args.codes)
    codes = SparseArrays(z["offsets"], z["indices"], z["values"])
    model = args.model or str(z["model_id"]) if "model_id" in z else args.model
    with _client(args) as c:
        dec = _call(lambda: c.decode_at(codes, args.granularity, model=model))
    print(f"{dec.model_id}: reconstruction {dec.reconstruction.shape} at G={dec.granularity}, "
          f"mean L0 {dec.l0.mean():.2f}")
    if args.out:
        np.save(args.out, dec.reconstruction)
    return 0


def run_stream(args) -> int:
    with _client(args) as c:
        info = _call(lambda: c.model(args.model))
        x = _activations(args, info.d_in)
        s = c.stream(x, model=args.model, max_g=args.max_g, deadline_ms=args.deadline_ms,
                     target_fvu=args.target_fvu, payload="none")
        print(f"{'G':>8} {'L0':>7} {'FVU':>8} {'server ms':>10} {'client ms':>10}", flush=True)

        def show():
            for r in s:
                fvu = f"{r.fvu:8.4f}" if r.fvu is not None else f"{'-':>8}"
                print(f"{r.g:8d} {r.mean_l0:7.2f} {fvu} {r.elapsed_ms:10.2f} {r.client_ms:10.2f}", flush=True)

        _call(show)
        res = s.result
    print(f"stop: {res.stop_reason} after {res.rungs} rungs (G={res.final_g}) in {res.elapsed_ms:.1f} ms")
    return 0
