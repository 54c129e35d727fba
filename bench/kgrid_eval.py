"""Issue 12 items 2-3 on SmolLM2 layer 15: the (G, k') grid of each checkpoint on the held-out
cache (FVU, L0, CE recovered over 32 contexts), the cost figure, and the auto ladder (chosen on
the train cache, as `progsae order --ladder auto:5`) against the geometric one by the mean FVU
over a log-uniform decode budget, measured on held-out rows. Writes runs/kgrid/*.json (OUT) and
docs/results/fvu_vs_cost_k_grid.png (FIG); prints everything.

    python bench/kgrid_eval.py CKPT...    (env TRAIN, CE_CONTEXTS, OUT, FIG override the defaults)
"""

import json
import os
import sys
from pathlib import Path

import torch

from progsae.sae import checkpoint
from progsae.sae import ordering as ordmod
from progsae.sae.ladders import area_under_steps
from progsae.trainer.data import outlier_policy
from progsae.trainer.data.activations import ActivationCache
from progsae.trainer.evaluation import auto_ladder
from progsae.trainer.evaluation.k_grid import evaluate_grid, format_grid
from progsae.trainer.report.plots import k_grid_figure

torch.set_num_threads(1)
HELD, TRAIN = "acts/smollm2-l15-heldout", os.environ.get("TRAIN", "acts/smollm2-l15-train600k")
CE = int(os.environ.get("CE_CONTEXTS", "32"))
out = Path(os.environ.get("OUT", "runs/kgrid"))
out.mkdir(parents=True, exist_ok=True)
grids = []
for ck in sys.argv[1:]:
    name = Path(ck).resolve().name
    r = evaluate_grid(ck, HELD, (4, 8, 16, 32), ordering="mean_sq", ce=CE > 0, ce_contexts=max(CE, 1), ce_batch=4)
    (out / f"{name}.json").write_text(json.dumps(r.to_json(), indent=1))
    print(f"== {name}\n{format_grid(r)}", flush=True)
    grids.append((name, r))
    c = checkpoint.load(ck)
    policy = outlier_policy.resolve(None, c.meta)
    ords = {"mean_sq": c.orderings["mean_sq"]} if c.meta.architecture == "topk" else {}
    choice = auto_ladder.for_checkpoint(ck, TRAIN, 5, ords, policy, tokens=16384)
    print(auto_ladder.format_choice(choice), flush=True)
    sae = ordmod.apply(c.sae, ords["mean_sq"]) if ords else c.sae
    held = auto_ladder.measure_curve(sae, ActivationCache(HELD, outliers=policy), choice.curve.grid, 32768)
    lo = held.at(choice.geometric)[0][0]
    areas = {n: area_under_steps(*held.at(lad), lo, 32.0) for n, lad in (("auto", choice.ladder),
                                                                            ("geometric", choice.geometric))}
    rec = {"choice": choice.record(tuple(c.meta.granularities)), "ladder": list(choice.ladder),
           "held_auto": dict(zip(["l0", "fvu"], held.at(choice.ladder))),
           "held_geometric": dict(zip(["l0", "fvu"], held.at(choice.geometric))),
           "held_area": areas, "budget": [lo, 32.0]}
    (out / f"{name}.ladder.json").write_text(json.dumps(rec, indent=1))
    print(f"held-out mean FVU over log-uniform budget [{lo:.2f}, 32]: auto {areas['auto']:.4f}, "
          f"geometric {areas['geometric']:.4f}", flush=True)
f = k_grid_figure(grids, Path(os.environ.get("FIG", "docs/results")))
print(f"wrote {f}")
