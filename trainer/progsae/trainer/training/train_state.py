"""Resumable training state: one safetensors file (tensors + JSON metadata), written atomically.

    RUN.training/state.safetensors   param.*, adam.<param>.{exp_avg,exp_avg_sq,step},
                                     since_fired (int64 [M]), torch_rng (uint8);
                                     metadata "progsae_train_state": JSON (step, tokens, scale,
                                     config, cache identity, seconds)
    RUN.training/log.jsonl           the training log so far

Never pickled: reading it runs no code. A single file means a kill -9 leaves either the
previous state or the new one, whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from progsae.sae.checkpoint import atomic_write

STATE = "state.safetensors"
LOG = "log.jsonl"
META_KEY = "progsae_train_state"
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


class StateError(ValueError):
    """A training-state file is unreadable or belongs to another run."""


def state_dir(out: Path) -> Path:
    """Where the run writing checkpoint `out` keeps its resumable state."""
    return out.with_name(out.name + ".training")


def cache_identity(manifest: Any) -> dict[str, Any]:
    """What must not change between a run and its resumption: model, layer, width, data."""
    shas = hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()
    return {
        "model": manifest.model, "layer": manifest.layer, "d_model": manifest.d_model,
        "split": manifest.split, "n_tokens": manifest.n_tokens, "shards_sha256": shas,
    }


@dataclass
class Meta:
    step: int
    tokens: int
    scale: float
    config: dict[str, Any]
    cache: dict[str, Any]
    seconds: float = 0.0
    """Training-loop wall time so far, summed over resumptions."""
    extra: dict[str, Any] = field(default_factory=dict)


def save_state(path: Path, sae: torch.nn.Module, opt: torch.optim.Optimizer,
               since_fired: torch.Tensor, meta: Meta) -> None:
    t: dict[str, torch.Tensor] = {}
    params = dict(sae.named_parameters())
    for name in PARAMS:
        p = params[name]
        t[f"param.{name}"] = p.detach()
        for key, v in opt.state.get(p, {}).items():
            t[f"adam.{name}.{key}"] = v.detach().reshape(v.shape)
    t["since_fired"] = since_fired
    t["torch_rng"] = torch.get_rng_state()
    t = {k: v.cpu().contiguous() for k, v in t.items()}
    md = {META_KEY: json.dumps(meta.__dict__)}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / STATE, st_save(t, metadata=md))


def read_meta(path: Path) -> Meta | None:
    """The metadata of a saved state, or None if there is none."""
    f = path / STATE
    if not f.is_file():
        return None
    try:
        with safe_open(f, framework="pt") as fh:
            return Meta(**json.loads((fh.metadata() or {})[META_KEY]))
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise StateError(f"{f}: unreadable training state ({e}); delete {path} to start over") from None


def load_state(path: Path, sae: torch.nn.Module, opt: torch.optim.Optimizer,
               since_fired: torch.Tensor) -> Meta:
    """Restore parameters, Adam moments, dead counters and the torch RNG in place."""
    meta = read_meta(path)
    if meta is None:
        raise StateError(f"{path}: no training state")
    with safe_open(path / STATE, framework="pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    params = dict(sae.named_parameters())
    with torch.no_grad():
        for name in PARAMS:
            src = t[f"param.{name}"]
            if src.shape != params[name].shape:
                raise StateError(f"{path}: {name} has shape {tuple(src.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(src)
    state = {}
    for i, name in enumerate(PARAMS):
        keys = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"adam.{name}.")}
        if keys:
            state[i] = keys
    groups = opt.state_dict()["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})
    since_fired.copy_(t["since_fired"])
    torch.set_rng_state(t["torch_rng"])
    return meta


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the state being resumed (step > `step`)."""
    f = path / LOG
    if not f.is_file():
        return
    keep = []
    for line in f.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a kill
    atomic_write(f, "".join(x + "\n" for x in keep))
