"""What per-rung fidelity costs (issue 21): text streams with KL on and off, SmolLM2-135M layer 15.

A plain grpc.aio server (progsae.server.grpc_server.PlainServer, in this process) serves one checkpoint;
the sync client sends text streams (StreamDecode with a text input, payload none) of held-out Wikipedia
documents cut to `--tokens` tokens, one call at a time, the modes interleaved text by text:

    off          the text stream as it was: LM up to the layer, encode, every rung
    kl           Fidelity.kl: every rung's reconstruction spliced in, layers 15..29 and the head per rung
    kl budget    Budget.token_target_kl = --target-kl: rungs after the first compute only the tokens
                 still refining (layers up to the last of them, the head at them)

Client-side times: to the first rung (request sent -> first rung received) and to the end. Beside them,
in the same process with the server idle, one full forward pass of the model over the same tokens
(start token + text, logits at every position) and the part of it up to the layer. Targets:

    first rung, kl / off                 <= 2
    whole kl stream / full forward       <= 1 + (layers after the SAE's / all layers) x rungs

Run it alone (2 cores; the server and the model share them with nothing else):

    flock /tmp/progsae-cpu.lock .venv/bin/python bench/bench_kl_cost.py --checkpoint ckpt/smollm2-l15-600k-matryoshka-s0
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from progsae.clients import Client
from progsae.lm.models import hidden_at_layer
from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from progsae.server.service import ServiceConfig
from progsae.server.text import TextBackend
from progsae.trainer.data.corpora import load_documents


def held_out_texts(tokenizer, n: int, tokens: int) -> list[str]:
    """The first n held-out Wikipedia lead summaries of at least `tokens` tokens (the stream cuts them)."""
    out = []
    for _, text in load_documents("wikipedia", split="heldout"):
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens:
            out.append(text)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} held-out documents have {tokens} tokens")


def one(c: Client, model: str, text: str, tokens: int, **kw) -> dict:
    t0 = time.perf_counter()
    first = None
    computed = 0
    s = c.stream(text, model=model, payload="none", max_tokens=tokens, **kw)
    for r in s:
        first = first if first is not None else 1e3 * (time.perf_counter() - t0)
        computed += len(r.tokens) if r.tokens is not None else s.result.tokens
    end = 1e3 * (time.perf_counter() - t0)
    res = s.result
    met = int(res.token_met.sum()) if res.token_met is not None else None
    return {"first_ms": first, "end_ms": end, "rungs": res.rungs, "tokens": res.tokens, "computed": computed,
            "met": met, "server_ms": res.elapsed_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint of SmolLM2-135M layer 15")
    p.add_argument("--texts", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target-kl", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="also write the numbers here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ck = Path(a.checkpoint).resolve()
    cfg = ServiceConfig(torch_threads=a.threads, compute_threads=1)
    modes = {"off": {}, "kl": {"kl": True}, "kl budget": {"token_target_kl": a.target_kl}}
    with PlainServer(RegistryConfig(root=str(ck.parent)), cfg) as srv, Client(srv.address, timeout=600) as c:
        info = c.model(ck.name)
        assert info.language_model and info.layer is not None, "the checkpoint names no language model and layer"
        lm = TextBackend().lm(info.language_model)
        texts = held_out_texts(lm.tokenizer, a.texts, a.tokens)
        for kw in modes.values():  # warm: the checkpoint, the LM, torch's first calls
            one(c, ck.name, texts[0], a.tokens, **kw)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        full, upto = [], []
        for rep in range(a.repeats):
            for i, text in enumerate(texts):
                order = list(modes)[(i + rep) % 3:] + list(modes)[:(i + rep) % 3]
                for m in order:
                    runs[m].append(one(c, ck.name, text, a.tokens, **modes[m]))
                ids = torch.tensor([[lm.start_token_id, *lm.tokenizer(text, add_special_tokens=False)
                                     ["input_ids"][: a.tokens]]])
                with TextBackend().holding(info.language_model), torch.inference_mode():
                    t0 = time.perf_counter()
                    lm.model(input_ids=ids, use_cache=False)
                    full.append(1e3 * (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    hidden_at_layer(lm.model, ids, info.layer)
                    upto.append(1e3 * (time.perf_counter() - t0))
    med = statistics.median
    n_layers, layer = lm.n_layers, info.layer
    frac = (n_layers - layer) / n_layers
    out = {"checkpoint": str(ck), "model": info.model_id, "layer": layer, "layers": n_layers, "tokens": a.tokens,
           "texts": a.texts, "repeats": a.repeats, "threads": a.threads, "target_kl": a.target_kl,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "full_forward_ms": med(full), "lm_to_layer_ms": med(upto)}
    for m, rs in runs.items():
        out[m] = {k: med([r[k] for r in rs]) for k in ("first_ms", "end_ms", "rungs", "computed", "server_ms")}
        if rs[0]["met"] is not None:
            out[m]["met"] = med([r["met"] for r in rs])
    rungs = out["kl"]["rungs"]
    out["first_rung_ratio"] = out["kl"]["first_ms"] / out["off"]["first_ms"]
    out["stream_over_full"] = out["kl"]["end_ms"] / out["full_forward_ms"]
    out["stream_bound"] = 1 + frac * rungs
    out["budget_stream_over_full"] = out["kl budget"]["end_ms"] / out["full_forward_ms"]
    print(json.dumps(out, indent=2))
    print(f"\n{info.model_id}, {a.tokens}-token texts, {a.texts} texts x {a.repeats}, {a.threads} threads "
          f"(medians, ms)")
    print("| mode | first rung | whole stream | rungs | token-rungs computed |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        r = out[m]
        print(f"| {m} | {r['first_ms']:.1f} | {r['end_ms']:.1f} | {r['rungs']:.0f} | {r['computed']:.0f} |")
    print(f"\nfull forward {out['full_forward_ms']:.1f} ms, LM up to layer {layer} {out['lm_to_layer_ms']:.1f} ms")
    print(f"first rung kl/off = {out['first_rung_ratio']:.2f} (target <= 2)")
    print(f"whole kl stream / full forward = {out['stream_over_full']:.2f} (target <= 1 + {frac:.2f} x {rungs:.0f} "
          f"= {out['stream_bound']:.2f}); with the KL budget {out['budget_stream_over_full']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
