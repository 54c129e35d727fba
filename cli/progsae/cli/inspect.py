"""`progsae inspect CKPT`: what a checkpoint is, in a few lines."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from progsae.clients.flags import add_dataclass

HELP = "print a checkpoint's architecture, shapes, ladder, ordering, metrics"


@dataclass
class InspectRun:
    """The checkpoint to describe."""

    checkpoint: str = field(metadata={"positional": True})
    """Checkpoint directory (ours or SAELens)."""


def configure(parser: argparse.ArgumentParser) -> None:
    options = add_dataclass(parser, InspectRun)
    parser.set_defaults(run=lambda args: run(options.build(args)))


def describe(path: str) -> str:
    from progsae.sae import checkpoint

    ck = checkpoint.load(path)
    m = ck.meta
    source = m.extra.get("source")
    if source == "saelens":
        folds = [f for f, v in (("b_dec not subtracted", not m.extra.get("apply_b_dec_to_input", True)),
                                ("decoder norms", m.extra.get("rescale_acts_by_decoder_norm"))) if v]
        arch = f"{m.architecture} (SAELens {m.extra.get('saelens_architecture', '?')}"
        arch += f"; folded in: {', '.join(folds)})" if folds else ")"
    elif source == "sparsify":
        arch = f"{m.architecture} (EleutherAI sparsify)"
    else:
        arch = m.architecture
    lines = [
        f"checkpoint   {ck.path}",
        f"architecture {arch}",
        f"d_in         {m.d_in}",
        f"d_sae        {m.d_sae}",
        f"k            {m.k}",
        f"granularities {', '.join(map(str, m.granularities))}",
        f"normalisation scale c = {m.scale:.6g} (folded into weights)",
        f"model        {m.model or '-'}   layer {m.layer if m.layer is not None else '-'}   hook {m.hook or '-'}",
        f"trained on   {m.training_tokens:,} tokens",
        "reference    " + (f"variance {m.reference_variance:.6g} per token (the FVU baseline of served texts)"
                           if m.reference_variance is not None else
                           "none recorded (a served text's FVU divides by its own variance)"),
    ]
    if ck.orderings_error:
        lines.append(f"ordering     unreadable: {ck.orderings_error}")
    elif ck.orderings:
        for name, o in ck.orderings.items():
            top = o.sorted_scores()[:3].tolist()
            lines.append(f"ordering     {name}: top scores {', '.join(f'{s:.4g}' for s in top)}")
    else:
        lines.append("ordering     none stored (trained order)")
    fvu = ck.metrics.get("summary", {}) if isinstance(ck.metrics, dict) else {}
    if fvu:
        lines.append("metrics      " + ", ".join(f"{k}={v}" for k, v in fvu.items()))
    elif ck.metrics:
        lines.append(f"metrics      {', '.join(sorted(ck.metrics))}")
    else:
        lines.append("metrics      none (run `progsae eval`)")
    return "\n".join(lines)


def run(opts: InspectRun) -> int:
    print(describe(opts.checkpoint))
    return 0
