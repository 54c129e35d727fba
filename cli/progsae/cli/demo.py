"""`progsae demo`: the main job end to end on the embedded defaults, in a few minutes on 2 cores.

harvest (real SmolLM2-135M, layer 15, Wikipedia + chit-chat) -> train a small Matryoshka SAE
and a TopK SAE -> order the TopK one by E[a^2] and by frequency -> evaluate both at every rung
-> feature cards -> report (markdown + FVU-vs-G figures) -> serve both with Ray Serve (gRPC + HTTP) -> stream a
real sentence's activations through gRPC, rung by rung -> print the dashboard's URL and keep
serving until Ctrl-C. Every step is the CLI command a user would type (printed as it runs);
steps whose output already exists are skipped, so a second `make demo` starts serving at once.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from progsae.clients.flags import add_dataclass

if TYPE_CHECKING:
    from progsae.server.launch import LocalCluster

HELP = "harvest, train, order, evaluate, report, serve and stream on the defaults"

DEMO_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, named after the engineer "
    "whose company designed and built it."
)


@dataclass
class DemoConfig:
    """Sizes of the demo run (small enough for a few minutes on 2 CPU cores)."""

    out: str = "demo_out"
    """Working directory for caches, checkpoints and the report."""
    model: str = "smollm2-135m"
    """Language model alias."""
    layer: int = 15
    """hidden_states index the SAEs read."""
    train_tokens: int = 48_000
    """Activations harvested for training."""
    heldout_tokens: int = 8_000
    """Held-out activations for ordering-free evaluation."""
    d_sae: int = 1024
    """Latents per SAE."""
    k: int = 16
    """Active latents per token."""
    ladder: str = "64,128,256,512,1024"
    """Matryoshka granularities (also the serving ladder)."""
    epochs: int = 6
    """Passes over the (small) training cache."""
    batch: int = 1024
    """Training batch size in tokens."""
    lr: float = 2e-3
    """Adam learning rate (higher than the large-run default: the demo takes few steps)."""


@dataclass
class DemoRun:
    """How far the demo goes."""

    serve: bool = True
    """Serve both checkpoints and stream an example after the report."""
    wait: bool = True
    """Keep serving after the streamed example, until Ctrl-C."""


def configure(parser: argparse.ArgumentParser) -> None:
    from progsae.server.launch import LocalCluster

    config, run_options = add_dataclass(parser, DemoConfig), add_dataclass(parser, DemoRun)
    cluster = add_dataclass(parser, LocalCluster, only=["grpc_port", "http_port"])
    parser.set_defaults(run=lambda args: run(config.build(args), run_options.build(args), cluster.build(args)))


def _step(title: str, argv: list[str], done: Path | None = None) -> None:
    from progsae.cli import main

    print(f"\n== {title}\n$ progsae {shlex.join(argv)}", flush=True)
    if done is not None and done.exists():
        print(f"   (exists: {done}; skipped)")
        return
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"demo: step failed: progsae {shlex.join(argv)}")
    print(f"   done in {time.perf_counter() - t0:.1f} s", flush=True)


def build(cfg: DemoConfig) -> tuple[Path, Path]:
    """Run the training half of the demo; return the two checkpoint directories."""
    out = Path(cfg.out)
    acts, ck = out / "acts", out / "ckpt"
    train, held = acts / "train", acts / "heldout"
    mat, topk = ck / "matryoshka", ck / "topk"
    common = ["--model", cfg.model, "--layer", str(cfg.layer), "--corpus", "wikipedia,chitchat"]
    _step("harvest training activations from the real model",
          ["harvest", *common, "--split", "train", "--tokens", str(cfg.train_tokens), "--out", str(train)],
          train / "manifest.json" if _complete(train) else None)
    _step("harvest held-out activations (documents never trained on)",
          ["harvest", *common, "--split", "heldout", "--tokens", str(cfg.heldout_tokens), "--out", str(held)],
          held / "manifest.json" if _complete(held) else None)
    budget = str(cfg.train_tokens * cfg.epochs)
    shared = ["--activations", str(train), "--d-sae", str(cfg.d_sae), "--k", str(cfg.k), "--tokens", budget,
              "--batch-size", str(cfg.batch), "--lr", str(cfg.lr), "--granularities", cfg.ladder,
              "--checkpoint-every", "50"]
    _step("train a Matryoshka SAE (one top-k, nested prefix losses)",
          ["train", "--arch", "matryoshka", *shared, "--out", str(mat)], mat / "cfg.json")
    _step("train a vanilla TopK SAE with the same data, seed and budget",
          ["train", "--arch", "topk", *shared, "--out", str(topk)], topk / "cfg.json")
    _step("order the TopK SAE's latents by E[(a*|W_dec|)^2] and by frequency",
          ["order", str(topk), "--activations", str(train), "--by", "mean_sq,freq"], topk / "ordering.safetensors")
    for ckpt in (mat, topk):
        _step(f"evaluate {ckpt.name} at every rung (FVU, L0, RSA, CE loss recovered)",
              ["eval", str(ckpt), "--activations", str(held), "--ordering", "all", "--ce", "--ce-contexts", "8",
               "--rsa-tokens", "1000"], ckpt / "metrics.json")
    for ckpt in (mat, topk):
        _step(f"feature cards for {ckpt.name} (density, top contexts, promoted tokens)",
              ["features", str(ckpt), "--activations", str(held)], ckpt / "features.json")
    _step("write the report (FVU / CE / RSA vs G, power law)",
          ["report", str(mat), str(topk), "--out", str(out / "report")])
    print(f"\nreport: {out / 'report' / 'report.md'}")
    return mat, topk


def _complete(cache: Path) -> bool:
    from progsae.trainer.data.activations import CacheError, Manifest

    try:
        return Manifest.load(cache).complete
    except CacheError:
        return False


def stream_example(grpc_target: str, model_id: str) -> None:
    """Encode a real sentence with the served LM, then stream its progressive decode."""
    from progsae.clients.client import Client

    with Client(grpc_target) as client:
        enc = client.encode_text(DEMO_TEXT, model=model_id)
        print(f"\n== stream a real sentence through gRPC ({len(enc.tokens)} tokens, model {model_id})")
        print(f"   text: {DEMO_TEXT!r}")
        print(f"   {'G':>6} {'mean L0':>8} {'FVU':>8} {'server ms':>10}")
        stream = client.stream(enc.activations, model=model_id)
        for rung in stream:
            fvu = f"{rung.fvu:8.4f}" if rung.fvu is not None else "       -"
            print(f"   {rung.g:6d} {rung.mean_l0:8.2f} {fvu} {rung.elapsed_ms:10.1f}", flush=True)
        print(f"   stopped: {stream.result.stop_reason}")


def run(cfg: DemoConfig, opts: DemoRun, cluster: LocalCluster) -> int:
    mat, topk = build(cfg)
    if not opts.serve:
        return 0
    from progsae.server import launch
    from progsae.server.config import AppConfig

    from .serve import roots_and_ids

    root, ids = roots_and_ids([str(mat), str(topk)])
    ports = f"--grpc-port {cluster.grpc_port} --http-port {cluster.http_port}"
    print(f"\n== serve both checkpoints (Ray Serve, gRPC :{cluster.grpc_port}, HTTP :{cluster.http_port})")
    print(f"$ progsae serve {mat} {topk} {ports}", flush=True)
    app = AppConfig(checkpoint_root=str(root), models=tuple(ids), text=True)
    addrs = launch.start(app, cluster)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # Ray may have replaced the SIGINT handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        fast = addrs["direct"] or addrs["grpc"]
        stream_example(fast, ids[0])
        print(f"\ngRPC      {addrs['grpc']}   (Serve's proxy)")
        print(f"gRPC      {fast}   (the codec replica's own port; try: progsae client --target {fast} models)")
        print(f"dashboard {addrs['http']}/   (type text, watch features refine as G climbs)")
        if opts.wait:
            print("serving; Ctrl-C stops", flush=True)
            while not stop.wait(1.0):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        launch.stop()
    return 0
