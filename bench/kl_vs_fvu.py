"""FVU against the model's own verdict, per token and per rung (issue 21 item 4; RESULTS.md "Budgets the model
can feel").

For every seed of a Matryoshka checkpoint and a TopK one read in its E[a²] order, on held-out texts: the
first `--tokens` tokens of held-out cache contexts spread evenly over the cache (a context starts with the
start token, so a prefix of it is a text as the server's language model runs it; the cached activations
are that text's, exactly). Everything is measured on the server's own streams (CodecService.stream with
a text, the code every transport runs):

  per token, per rung     FVU_n = ||x_n - x_hat_n||^2 / ||x_n - mean(x)||^2 (mean over the text's tokens,
                          the token_target_fvu definition) against KL_n (Fidelity.kl: the rung's
                          reconstruction of every token spliced into SmolLM2 at layer 15) and top-1 agreement
  budgets                 a token_target_kl = t stream against token_target_fvu streams over a grid of f;
                          the FVU budget "tuned to match" is the largest f (the cheapest) whose outcome is at
                          least the KL budget's. The outcome of either: the fraction of tokens whose KL is
                          <= t when every token sits at its final reconstruction (the final state spliced in
                          once, progsae.lm.splice.TextSplice), which for the KL budget can differ from the KL
                          it measured when the token stopped (tokens before it refined on: "drift").
                          Codes: the last rung's mean L0 (each token at its final rung); bytes: serialized
                          messages, DELTA rows in float32, packed header codes, as in "Per-token budgets".
  where FVU misleads      per rung, tokens with FVU at or below the rung's median but KL in its top decile,
                          and the reverse, with examples.

Tokens the outlier policy keeps out of the splice (the first token's attention sink) are left out of the
per-token statistics (their KL is 0 whatever their FVU) but stay in the texts and the budgets' costs.

    python bench/kl_vs_fvu.py --root ckpt --mat 'smollm2-l15-600k-matryoshka-s{seed}' \\
        --topk 'smollm2-l15-600k-topk-s{seed}' --seeds 0,1,2 --activations acts/smollm2-l15-heldout20k \\
        --texts 64 --tokens 64 --targets 0.1,0.3,1.0 --out runs/kl_vs_fvu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr  # pyright: ignore[reportMissingTypeStubs]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from progsae.lm.splice import TextSplice
from progsae.sae import budgets
from progsae.sae.codec import Codes
from progsae.server.fidelity import spliced_tokens
from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import CodecService
from progsae.server.text import TextActivations, TextBackend
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb

FVU_GRID = (0.05, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
FVU_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, np.inf)


def load_texts(acts: Path, n: int, tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids [tokens], activations [tokens, d]) of n contexts spread evenly over the cache."""
    man = json.loads((acts / "manifest.json").read_text())
    out = []
    for shard in man["shards"]:
        ids = np.load(acts / shard["tokens"])
        a = np.load(acts / shard["acts"], mmap_mode="r")
        per = ids.shape[1] - 1
        for c in range(ids.shape[0]):
            out.append((ids[c, 1:tokens + 1].astype(np.int64), np.asarray(a[c * per:c * per + tokens], np.float32)))
    pick = np.unique(np.linspace(0, len(out) - 1, n).round().astype(int))
    return [out[i] for i in pick]


def stream(svc: CodecService, model, ta: TextActivations, **kw) -> list[pb.StreamDecodeResponse]:
    return list(svc.stream(model, pb.StreamDecodeRequest(**kw), text=ta))


def budget_outcome(msgs: list[pb.StreamDecodeResponse], codes: Codes, sae, ladder: list[int], splice: TextSplice,
                   t: float) -> dict:
    """What a per-token budget stream spent and the final state's KL."""
    end = msgs[-1].end
    final_g = np.array(end.token_final_g)
    state = np.zeros((len(final_g), sae.d_in), np.float32)
    for g in np.unique(final_g):
        rows = final_g == g
        state[rows] = budgets.decode_at(sae, codes, int(g)).numpy()[rows]
    kl = splice.score(torch.from_numpy(state), torch.arange(len(final_g))).kl.numpy()
    rungs = [m.rung for m in msgs if m.HasField("rung")]
    out = {"final_g": final_g.tolist(), "final_kl": kl.tolist(), "mean_l0": rungs[-1].mean_l0,
           "bytes": sum(m.ByteSize() for m in msgs), "tensor_bytes": sum(r.tensor.ByteSize() for r in rungs),
           "rung_rows": [ladder.index(g) + 1 for g in final_g.tolist()]}
    if len(end.token_kl):
        out["stop_kl"] = list(end.token_kl)
        out["met"] = list(end.token_met)
    return out


def measure(svc, model, ta: TextActivations, splice: TextSplice, targets: list[float]) -> dict:
    """Every stream of one (checkpoint, text)."""
    x = torch.from_numpy(ta.activations)
    ladder = list(model.ladder)
    plain = stream(svc, model, ta, fidelity=pb.Fidelity(kl=True, predictions=1), payload=pb.PAYLOAD_NONE)
    codes = Codes(*(torch.from_numpy(a) for a in convert.codes_to_arrays(plain[0].header.codes).padded()))
    base = budgets.token_baseline(x)
    fvu, sse, kl, top1, pred = [], [], [], [], []
    for m in plain:
        r = m.rung
        s, e = budgets.token_errors(x, budgets.decode_at(model.sae, codes, r.g), base)
        fvu.append(e.tolist())
        sse.append(s.tolist())
        kl.append(list(r.kl))
        top1.append(list(r.top1))
        pred.append([p.tokens[0] for p in r.predictions])
    clean = [p.tokens[0] for p in plain[0].rung.clean_predictions]
    common = {"payload": pb.PAYLOAD_DELTA, "packed_codes": True}
    kl_budgets = {t: budget_outcome(stream(svc, model, ta, budget=pb.Budget(token_target_kl=t), **common), codes,
                                    model.sae, ladder, splice, t) for t in targets}
    fvu_budgets = {f: budget_outcome(stream(svc, model, ta, budget=pb.Budget(token_target_fvu=f), **common), codes,
                                     model.sae, ladder, splice, f) for f in FVU_GRID}
    return {"g": ladder, "fvu": fvu, "sse": sse, "kl": kl, "top1": top1, "pred": pred, "clean": clean,
            "kl_budget": kl_budgets, "fvu_budget": fvu_budgets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder holding the checkpoints")
    ap.add_argument("--mat", required=True, help="Matryoshka checkpoint name under --root, with {seed}")
    ap.add_argument("--topk", required=True, help="TopK checkpoint name under --root, with {seed} (read @mean_sq)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--activations", required=True, help="held-out activation cache (its contexts are the texts)")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--targets", default="0.1,0.3,1.0", help="token_target_kl values (nats)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON of every measurement (summarised by --report)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    targets = [float(v) for v in a.targets.split(",")]
    reg = Registry(RegistryConfig(root=a.root))
    models = {(arch, s): reg.get(name.format(seed=s) + ("@mean_sq" if arch == "topk" else ""))
              for s in map(int, a.seeds.split(",")) for arch, name in (("mat", a.mat), ("topk", a.topk))}
    first = next(iter(models.values()))
    alias, layer = first.meta.model, first.meta.layer
    assert alias and layer is not None
    lm = TextBackend().lm(alias)
    svc = CodecService()
    texts = load_texts(Path(a.activations), a.texts, a.tokens)
    results: dict[str, list] = {f"{arch}-s{s}": [] for arch, s in models}
    words = []
    t0 = time.perf_counter()
    for i, (ids, acts) in enumerate(texts):
        toks = [lm.tokenizer.decode([t]) for t in ids.tolist()]
        words.append(toks)
        ta = TextActivations(ids.tolist(), toks, acts, alias, int(layer), len(ids))
        splices: dict[bytes, TextSplice] = {}
        for (arch, s), model in models.items():
            mask = spliced_tokens(model, torch.from_numpy(acts))
            key = mask.numpy().tobytes()
            if key not in splices:
                with TextBackend().holding(alias):
                    splices[key] = TextSplice(lm.model, int(layer), lm.start_token_id, torch.from_numpy(acts), mask)
            with TextBackend().holding(alias):
                r = measure(svc, model, ta, splices[key], targets)
            r["spliced"] = mask.tolist()
            results[f"{arch}-s{s}"].append(r)
        print(f"text {i + 1}/{len(texts)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    Path(a.out).write_text(json.dumps({"targets": targets, "fvu_grid": FVU_GRID, "texts": words,
                                       "results": results}))
    report(Path(a.out))


# --- the summary ----------------------------------------------------------------------------------


def spread(xs: list[float], digits: int = 3) -> str:
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs) if len(xs) > 1 else float('nan'):.{digits}f}"


def per_token(rs: list[dict]) -> dict[str, np.ndarray]:
    """[texts x rungs x tokens] arrays of one checkpoint, spliced tokens only (flattened per rung)."""
    keep = np.array([r["spliced"] for r in rs])[:, None, :].repeat(len(rs[0]["g"]), 1)
    out = {k: np.array([r[k] for r in rs], dtype=float) for k in ("fvu", "sse", "kl", "top1")}
    out["keep"] = keep
    return out


def report(path: Path) -> None:
    d = json.loads(path.read_text())
    res, targets, grid = d["results"], d["targets"], d["fvu_grid"]
    arches = {"mat": "Matryoshka", "topk": "TopK sorted by E[a²]"}
    seeds = sorted({k.split("-s")[1] for k in res})
    any_rs = next(iter(res.values()))
    ladder = any_rs[0]["g"]
    print(f"{len(any_rs)} texts x {len(any_rs[0]['spliced'])} tokens, seeds {', '.join(seeds)}; ladder {ladder}\n")
    print("Spearman rho of per-token FVU and KL (spliced tokens; mean ± sd over seeds):\n")
    print("| | pooled over rungs | " + " | ".join(f"G={g}" for g in ladder) + " | sse vs KL, pooled |")
    print("|---|---:|" + "---:|" * len(ladder) + "---:|")
    for arch, name in arches.items():
        pooled, per_g, sse = [], [[] for _ in ladder], []
        for s in seeds:
            a = per_token(res[f"{arch}-s{s}"])
            k = a["keep"]
            pooled.append(spearmanr(a["fvu"][k], a["kl"][k]).statistic)
            sse.append(spearmanr(a["sse"][k], a["kl"][k]).statistic)
            for j in range(len(ladder)):
                kj = k[:, j]
                per_g[j].append(spearmanr(a["fvu"][:, j][kj], a["kl"][:, j][kj]).statistic)
        print(f"| {name} | {spread(pooled)} | " + " | ".join(spread(v) for v in per_g) + f" | {spread(sse)} |")
    print("\nKL (nats) by FVU bin, every rung pooled (median, 90th percentile; top-1 agreement; share of tokens):\n")
    print("| FVU bin | " + " | ".join(arches.values()) + " |")
    print("|---|" + "---|" * len(arches))
    for lo, hi in zip(FVU_BINS, FVU_BINS[1:]):
        cells = []
        for arch in arches:
            med, p90, agree, share = [], [], [], []
            for s in seeds:
                a = per_token(res[f"{arch}-s{s}"])
                k = a["keep"]
                sel = k & (a["fvu"] >= lo) & (a["fvu"] < hi)
                if sel.sum() == 0:
                    continue
                med.append(float(np.median(a["kl"][sel])))
                p90.append(float(np.quantile(a["kl"][sel], 0.9)))
                agree.append(float(a["top1"][sel].mean()))
                share.append(float(sel.sum() / k.sum()))
            cells.append(f"{spread(med)}; {spread(p90)}; {spread(agree, 2)}; {spread(share, 3)}" if med else "-")
        print(f"| [{lo:g}, {hi:g}) | " + " | ".join(cells) + " |")
    budgets_table(res, arches, seeds, targets, grid)
    misleading(d, arches, seeds, ladder)


def budget_numbers(rs: list[dict], kind: str, key: float, t: float) -> dict[str, float]:
    """One budget over the texts: outcome (final-state KL <= t), codes, bytes per token, drift."""
    key_s = str(key) if str(key) in rs[0][kind] else repr(key)
    bs = [r[kind][key_s] for r in rs]
    n = sum(len(b["final_g"]) for b in bs)
    kl = np.concatenate([b["final_kl"] for b in bs])
    out = {"outcome": float((kl <= t).mean()), "mean_kl": float(kl.mean()),
           "g": float(np.mean(np.concatenate([b["final_g"] for b in bs]))),
           "l0": float(np.mean([b["mean_l0"] for b in bs])),
           "bytes": sum(b["bytes"] for b in bs) / n, "tensor_bytes": sum(b["tensor_bytes"] for b in bs) / n}
    if "met" in bs[0]:
        met = np.concatenate([b["met"] for b in bs]).astype(bool)
        out["met"] = float(met.mean())
        out["drift"] = float(((kl > t) & met).sum() / max(1, met.sum()))
    return out


COSTS = ("g", "l0", "tensor_bytes", "bytes", "outcome", "mean_kl")


def interpolated(cands: list[tuple[float, dict]], outcome: float) -> tuple[str, dict]:
    """The FVU budget tuned to `outcome`, as a client would tune it: tightening f from the loosest (cheapest)
    grid value until the outcome is reached, its costs linear between that f and the looser one before it
    (the outcome need not be monotone in f); the tightest f when none reaches it."""
    pts = sorted(cands, key=lambda fc: -fc[0])
    for i, (f, c) in enumerate(pts):
        if c["outcome"] >= outcome:
            if i == 0:
                return f"{f:g}", c
            f0, c0 = pts[i - 1]
            w = (outcome - c0["outcome"]) / (c["outcome"] - c0["outcome"])
            return f"{f:g}..{f0:g}", {k: (1 - w) * c0[k] + w * c[k] for k in COSTS}
    f, c = pts[-1]
    return f"{f:g} (short of it)", c


def whole_ladder(rs: list[dict], t: float) -> dict[str, float]:
    """Every token at the last rung: the plain stream's last KL is that final state's; its bytes are every
    rung's row of every token, at the row size and header size of the FVU budget streams."""
    kl = np.concatenate([r["kl"][-1] for r in rs])
    tight = [r["fvu_budget"][min(r["fvu_budget"], key=float)] for r in rs]
    row = sum(b["tensor_bytes"] for b in tight) / sum(sum(b["rung_rows"]) for b in tight)
    header = sum(b["bytes"] - b["tensor_bytes"] for b in tight) / sum(len(b["final_g"]) for b in tight)
    tensor = len(rs[0]["g"]) * row
    return {"outcome": float((kl <= t).mean()), "g": float(rs[0]["g"][-1]), "l0": float("nan"),
            "tensor_bytes": tensor, "bytes": tensor + header}


def budgets_table(res, arches, seeds, targets, grid) -> None:
    print("\nKL budget against the FVU budget tuned to match (outcome: share of tokens whose KL is <= t with every "
          "token at its final reconstruction; the matched FVU budget's costs are interpolated linearly between the "
          "two grid values of f whose outcomes bracket the KL budget's; mean ± sd over seeds):\n")
    print("| t | SAE | budget | outcome | met at its stop | drift | mean final G | mean L0 | tensor B/token "
          "| all B/token |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        for arch, name in arches.items():
            kl_rows, fvu_rows, fs = [], [], []
            for s in seeds:
                rs = res[f"{arch}-s{s}"]
                k = budget_numbers(rs, "kl_budget", t, t)
                f, c = interpolated([(f, budget_numbers(rs, "fvu_budget", f, t)) for f in grid], k["outcome"])
                kl_rows.append(k)
                fvu_rows.append(c)
                fs.append(f)
            ladder_rows = [whole_ladder(res[f"{arch}-s{s}"], t) for s in seeds]
            for label, rows in ((f"token_target_kl = {t:g}", kl_rows),
                                (f"token_target_fvu = {'; '.join(fs)}", fvu_rows),
                                ("no per-token budget (every token to G = M)", ladder_rows)):
                met = spread([r["met"] for r in rows]) if "met" in rows[0] else "-"
                drift = spread([r["drift"] for r in rows]) if "drift" in rows[0] else "-"
                print(f"| {t:g} | {name} | {label} | {spread([r['outcome'] for r in rows])} | {met} | {drift} | "
                      f"{spread([r['g'] for r in rows], 0)} | "
                      f"{spread([r['l0'] for r in rows], 2) if np.isfinite(rows[0]['l0']) else 'k'} | "
                      f"{spread([r['tensor_bytes'] for r in rows], 0)} | {spread([r['bytes'] for r in rows], 0)} |")


def misleading(d, arches, seeds, ladder, examples: int = 4) -> None:
    res, words = d["results"], d["texts"]
    print("\nWhere FVU misleads, per rung: low FVU (<= the rung's median) with KL in the rung's top decile, and high "
          "FVU (>= the rung's 90th percentile) with KL <= the rung's median; share of spliced tokens, mean ± sd "
          "over seeds:\n")
    print("| SAE | low FVU, high KL | high FVU, low KL | top-1 kept: low FVU, high KL | top-1 kept: high FVU, low KL |")
    print("|---|---:|---:|---:|---:|")
    picked: dict[str, list[tuple]] = {}
    for arch, name in arches.items():
        lh, hl, lh_top, hl_top = [], [], [], []
        for s in seeds:
            rs = res[f"{arch}-s{s}"]
            a = per_token(rs)
            k = a["keep"]
            m_lh = np.zeros_like(k)
            m_hl = np.zeros_like(k)
            for j in range(len(ladder)):
                f, kl, kj = a["fvu"][:, j], a["kl"][:, j], k[:, j]
                m_lh[:, j] = kj & (f <= np.median(f[kj])) & (kl >= np.quantile(kl[kj], 0.9))
                m_hl[:, j] = kj & (f >= np.quantile(f[kj], 0.9)) & (kl <= np.median(kl[kj]))
            lh.append(float(m_lh.sum() / k.sum()))
            hl.append(float(m_hl.sum() / k.sum()))
            lh_top.append(float(a["top1"][m_lh.astype(bool)].mean()))
            hl_top.append(float(a["top1"][m_hl.astype(bool)].mean()))
            if s == seeds[0]:
                picked[arch] = [("low FVU, high KL", m_lh), ("high FVU, low KL", m_hl)]
        print(f"| {name} | {spread(lh)} | {spread(hl)} | {spread(lh_top, 2)} | {spread(hl_top, 2)} |")
    print(f"\nExamples (seed {seeds[0]}, the most extreme of each kind, one per text; the token in context, its "
          "FVU and KL at the rung, the model's top-1 next token with the rung spliced in vs clean):\n")
    for arch, name in arches.items():
        rs = res[f"{arch}-s{seeds[0]}"]
        a = per_token(rs)
        for label, m in picked[arch]:
            idx = np.argwhere(m)
            score = a["kl"][m.astype(bool)] - a["fvu"][m.astype(bool)] if label.startswith("low") else \
                a["fvu"][m.astype(bool)] - a["kl"][m.astype(bool)]
            seen: set[int] = set()
            chosen = []
            for i, j, n in idx[np.argsort(-score)]:
                if i not in seen:
                    seen.add(i)
                    chosen.append((i, j, n))
            for i, j, n in chosen[:examples]:
                ctx = "".join(words[i][max(0, n - 6):n]) + "[" + words[i][n] + "]"
                r = rs[i]
                print(f"- {name}, {label}, G={ladder[j]}: `{ctx!r}` FVU {r['fvu'][j][n]:.3f}, KL {r['kl'][j][n]:.3f}; "
                      f"predicts {r['pred'][j][n]!r}, clean {r['clean'][n]!r}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(Path(sys.argv[2]))
    else:
        main()
