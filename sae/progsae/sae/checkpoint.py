"""Checkpoint directories (SPEC §4): cfg.json + safetensors, SAELens-compatible, no pickle.

    CKPT/cfg.json                  SAELens fields + our own under "progsae"
    CKPT/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec
    CKPT/ordering.safetensors      per criterion: "<crit>.perm" int64, "<crit>.scores" f64
    CKPT/metrics.json              evaluation results

Weights are stored at raw activation scale (the normalisation scalar c is folded in and
recorded in cfg), so SAELens users get correct outputs without knowing about c. Each
safetensors file we write carries a sha256 of its tensor bytes in its header metadata, so
a corrupted file is caught on load. Every file is written to a temp name and renamed;
`save` builds the whole directory aside and renames it into place.

Foreign folders load too: SAELens checkpoints (every flag honoured exactly or refused, see
progsae.sae.saelens_cfg) and EleutherAI sparsify ones (progsae.sae.sparsify_format). An
unreadable ordering.safetensors does not stop a load in trained order; asking for one of its
orderings names the damage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from safetensors import SafetensorError, safe_open

from . import ordering as ordmod
from . import saelens_cfg, sparsify_format
from .codec import SAE, Activation, check_ladder, default_ladder
from .ordering import Ordering
from .safe_files import atomic_write, tensor_digest, umask
from .safe_files import st_bytes as _st_bytes

FORMAT_VERSION = 1
CFG, WEIGHTS, ORDERING, METRICS = "cfg.json", "sae_weights.safetensors", "ordering.safetensors", "metrics.json"
ARCHITECTURES = ("topk", "matryoshka", "relu", "jumprelu")
_ACTIVATION: dict[str, Activation] = {"topk": "topk", "matryoshka": "topk", "relu": "relu", "jumprelu": "jumprelu"}
"""How each architecture selects its latents (a Matryoshka SAE is a TopK SAE)."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed, corrupted or inconsistent."""


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself besides its tensors."""

    architecture: str
    """"topk" or "matryoshka" (ours), "relu"/"jumprelu" (SAELens standard/JumpReLU)."""
    d_in: int
    """Width of the activations (the LM's d_model)."""
    d_sae: int
    """Number of latents M."""
    k: int
    """Active latents per token."""
    granularities: tuple[int, ...]
    """Progressive ladder G_1 < ... < G_n = d_sae (trained groups for Matryoshka)."""
    scale: float = 1.0
    """Normalisation scalar c with E||c x||^2 = d_in on training data (folded into weights)."""
    model: str | None = None
    """Language model alias or path the activations came from."""
    layer: int | None = None
    """hidden_states index (0 = embeddings) the SAE reads."""
    hook: str | None = None
    """Human-readable hook point name."""
    training_tokens: int = 0
    """Tokens seen in training."""
    reference_variance: float | None = None
    """E||x - E[x]||^2 per token of the training activations at raw scale (metrics.token_variance over
    the trainer's normalisation sample, outlier policy applied): the FVU baseline of a text the
    server encodes. None in checkpoints older than it and in foreign ones (the batch's own then)."""
    extra: dict[str, Any] = field(default_factory=dict[str, Any])
    """Free-form provenance (trainer config, outlier policy, ...)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the (possibly ordered) SAE and everything beside it."""

    path: Path
    sae: SAE
    meta: CheckpointMeta
    orderings: dict[str, Ordering]
    metrics: dict[str, Any]
    applied: str = "none"
    """Which ordering was applied to `sae` ("none" = original latent order)."""
    orderings_error: str | None = None
    """Why ordering.safetensors could not be read (then `orderings` is empty), else None."""

    @property
    def ladder(self) -> tuple[int, ...]:
        return self.meta.granularities


# --- writing ------------------------------------------------------------------------------


def _cfg_dict(meta: CheckpointMeta) -> dict[str, Any]:
    ours = asdict(meta)
    ours["granularities"] = list(meta.granularities)
    ours["format_version"] = FORMAT_VERSION
    sl = saelens_cfg.saelens_fields(meta.architecture, meta.d_in, meta.d_sae, meta.k, meta.model, meta.hook,
                                    meta.layer)
    return {**sl, "progsae": ours}


def _weights(sae: SAE) -> dict[str, torch.Tensor]:
    folded = sae.fold_scale() if sae.scale != 1.0 else sae
    t = {"W_enc": folded.W_enc, "W_dec": folded.W_dec, "b_enc": folded.b_enc, "b_dec": folded.b_dec}
    if folded.threshold is not None:
        t["threshold"] = folded.threshold
    return {k: v.float() for k, v in t.items()}


def save(
    path: str | Path,
    sae: SAE,
    meta: CheckpointMeta,
    orderings: dict[str, Ordering] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a whole checkpoint directory atomically (built aside, then renamed in)."""
    path = Path(path)
    meta.scale = float(sae.scale) if sae.scale != 1.0 else meta.scale
    _check_meta(meta, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~umask())
        (tmp / WEIGHTS).write_bytes(_st_bytes(_weights(sae)))
        if orderings:
            (tmp / ORDERING).write_bytes(_st_bytes(_ordering_tensors(orderings)))
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2, default=_json_default))
        (tmp / CFG).write_text(json.dumps(_cfg_dict(meta), indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "ckpt")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _ordering_tensors(orderings: dict[str, Ordering]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, o in orderings.items():
        out[f"{name}.perm"] = o.perm.long().cpu()
        out[f"{name}.scores"] = o.scores.double().cpu()
    return out


def write_orderings(path: str | Path, orderings: dict[str, Ordering]) -> None:
    """Add or replace orderings (merged with those already stored), atomically."""
    path = Path(path)
    d_sae = load_meta(path).d_sae
    try:
        existing = read_orderings(path, d_sae)
    except CheckpointError:
        existing = {}  # an unreadable orderings file is replaced, not merged
    existing.update(orderings)
    atomic_write(path / ORDERING, _st_bytes(_ordering_tensors(existing)))


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    atomic_write(Path(path) / METRICS, json.dumps(metrics, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]  # torch: -> bare list
    if hasattr(o, "_asdict"):
        return o._asdict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --- reading ------------------------------------------------------------------------------


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    f = path / CFG
    if not f.is_file():
        if layers := sparsify_format.hookpoint_folders(path):
            more = ", ..." if len(layers) > 8 else ""
            raise CheckpointError(f"{path}: a sparsify folder of {len(layers)} hookpoints; load one of them, "
                                  f"e.g. {path / layers[0]} ({', '.join(layers[:8])}{more})")
        raise CheckpointError(f"{f}: missing")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return cast(dict[str, Any], cfg)  # a JSON object's keys are strings


def _need(d: dict[str, Any], key: str, where: Path, typ: type | tuple[type, ...]) -> Any:
    if key not in d or d[key] is None:
        raise CheckpointError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], typ) or isinstance(d[key], bool):
        raise CheckpointError(f"{where}: field {key!r} has wrong type {type(d[key]).__name__}")
    return d[key]


class _Source(NamedTuple):
    """Where a checkpoint's weights are and how they become progsae's (SAELens-layout) tensors."""

    meta: CheckpointMeta
    weights: Path
    shapes: dict[str, tuple[int, ...]]
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _source(cfg: dict[str, Any], path: Path) -> _Source:
    where = path / CFG
    if "progsae" in cfg:
        meta = _ours(cfg, where)
        d, m = meta.d_in, meta.d_sae
        shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, m), "W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
        if meta.architecture == "jumprelu":
            shapes["threshold"] = (m,)
        src = _Source(meta, path / WEIGHTS, shapes, _as_stored)
    elif sparsify_format.is_sparsify(path):
        sp = sparsify_format.parse(cfg, path)
        meta = CheckpointMeta("topk", sp.d_in, sp.d_sae, sp.k, default_ladder(sp.d_sae), hook=sp.hook,
                              extra={"source": "sparsify"})
        src = _Source(meta, path / sparsify_format.WEIGHTS, sparsify_format.tensor_shapes(sp),
                      sparsify_format.to_saelens_layout)
    else:
        sl = saelens_cfg.parse(cfg)
        scale = saelens_cfg.read_scale(path) if sl.needs_scaler else 1.0
        folds = {"apply_b_dec_to_input": sl.apply_b_dec_to_input,
                 "rescale_acts_by_decoder_norm": sl.rescale_acts_by_decoder_norm}
        meta = CheckpointMeta(
            sl.kind, sl.d_in, sl.d_sae, sl.k, sl.ladder or default_ladder(sl.d_sae), scale=scale, model=sl.model,
            layer=sl.layer, hook=sl.hook, extra={"source": "saelens", "saelens_architecture": sl.source_arch, **folds},
        )
        src = _Source(meta, path / WEIGHTS, saelens_cfg.tensor_shapes(sl), partial(saelens_cfg.fold, sl, scale=scale))
    _check_meta(src.meta, path)
    return src


def _as_stored(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return t


def _ours(cfg: dict[str, Any], where: Path) -> CheckpointMeta:
    ours = cfg["progsae"]
    if not isinstance(ours, dict):
        raise CheckpointError(f"{where}: field 'progsae' must be an object")
    ours = cast(dict[str, Any], ours)
    if ours.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported format_version {ours.get('format_version')!r}")
    fields: dict[str, Any] = {k: ours[k] for k in CheckpointMeta.__dataclass_fields__ if k in ours}
    for key, typ in (("architecture", str), ("d_in", int), ("d_sae", int), ("k", int), ("granularities", list)):
        _need(ours, key, where, typ)
    fields["granularities"] = tuple(ours["granularities"])
    meta = CheckpointMeta(**fields)
    # the SAELens fields beside ours are what SAELens runs: they must say the same thing
    agree = {"d_in": meta.d_in, "d_sae": meta.d_sae, "apply_b_dec_to_input": True}
    if meta.architecture in ("topk", "matryoshka"):
        agree.update(k=meta.k, rescale_acts_by_decoder_norm=False)
    for key, want in agree.items():
        if key in cfg and cfg[key] != want:
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} contradicts the checkpoint ({key}={want!r})")
    if cfg.get("normalize_activations") not in (None, "none"):
        raise CheckpointError(f"{where}: normalize_activations={cfg['normalize_activations']!r} contradicts "
                              "the checkpoint (its scale is folded into the weights: 'none')")
    return meta


def _check_meta(meta: CheckpointMeta, path: Path) -> None:
    where = path / CFG
    if meta.architecture not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unknown architecture {meta.architecture!r}")
    if meta.d_in < 1 or meta.d_sae < 1:
        raise CheckpointError(f"{where}: d_in and d_sae must be positive")
    if not 1 <= meta.k <= meta.d_sae:
        raise CheckpointError(f"{where}: k={meta.k} must be in 1..d_sae={meta.d_sae}")
    try:
        check_ladder(meta.granularities, meta.d_sae)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if meta.granularities[-1] != meta.d_sae:
        raise CheckpointError(f"{where}: the last granularity must equal d_sae={meta.d_sae}")
    scale = cast(object, meta.scale)  # read from JSON: the field's annotation is what this checks
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{where}: normalisation scale must be a positive finite number")
    var = cast(object, meta.reference_variance)
    if var is not None and not (isinstance(var, (int, float)) and not isinstance(var, bool)
                                and math.isfinite(var) and var > 0):
        raise CheckpointError(f"{where}: reference_variance must be a positive finite number or null, got {var!r}")


def _read_tensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        with cast(Any, safe_open(f, framework="pt")) as fh:  # safetensors' stub leaves its methods unannotated
            tensors: dict[str, torch.Tensor] = {k: fh.get_tensor(k) for k in fh.keys()}
            header: dict[str, str] = fh.metadata() or {}
            digest = header.get("progsae_sha256")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    if digest is not None and digest != tensor_digest(tensors):
        raise CheckpointError(f"{f}: checksum mismatch (file corrupted)")
    return tensors


def _check_tensor(t: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], f: Path) -> torch.Tensor:
    if name not in t:
        raise CheckpointError(f"{f}: missing tensor {name!r}")
    x = t[name]
    if tuple(x.shape) != shape:
        raise CheckpointError(f"{f}: {name} has shape {tuple(x.shape)}, expected {shape}")
    if not x.is_floating_point():
        raise CheckpointError(f"{f}: {name} has dtype {x.dtype}, expected floating point")
    if not torch.isfinite(x).all():
        raise CheckpointError(f"{f}: {name} contains NaN or Inf")
    return x.float()


def read_orderings(path: Path, d_sae: int) -> dict[str, Ordering]:
    f = path / ORDERING
    if not f.exists():
        return {}
    t = _read_tensors(f)
    out: dict[str, Ordering] = {}
    for key in sorted(k for k in t if k.endswith(".perm")):
        name = key[: -len(".perm")]
        scores = t.get(f"{name}.scores")
        if scores is None or scores.shape != (d_sae,):
            raise CheckpointError(f"{f}: ordering {name!r} lacks scores of shape ({d_sae},)")
        try:
            ordmod.check_permutation(t[key], d_sae)
        except ValueError as e:
            raise CheckpointError(f"{f}: ordering {name!r}: {e}") from None
        out[name] = Ordering(name, t[key], scores.double())
    return out


def load_meta(path: str | Path) -> CheckpointMeta:
    path = Path(path)
    return _load_source(path).meta


def _load_source(path: Path) -> _Source:
    cfg = _read_cfg(path)
    try:
        return _source(cfg, path)
    except CheckpointError:
        raise
    except ValueError as e:  # the foreign-format readers' one-line refusals
        raise CheckpointError(f"{path / CFG}: {e}") from None
    except (TypeError, KeyError, AttributeError, OverflowError) as e:  # a field of a wrong type/value
        raise CheckpointError(f"{path / CFG}: malformed field ({type(e).__name__}: {e})") from None


def load(path: str | Path, ordering: str = "none", device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; apply the named ordering ("none" keeps trained order)."""
    path = Path(path)
    src = _load_source(path)
    meta, f = src.meta, src.weights
    raw = _read_tensors(f)
    checked = {name: _check_tensor(raw, name, shape, f) for name, shape in src.shapes.items()}
    try:
        t = src.convert(raw | checked)
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    d, m = meta.d_in, meta.d_sae
    sae = SAE(
        W_enc=_check_tensor(t, "W_enc", (d, m), f),
        W_dec=_check_tensor(t, "W_dec", (m, d), f),
        b_enc=_check_tensor(t, "b_enc", (m,), f),
        b_dec=_check_tensor(t, "b_dec", (d,), f),
        k=meta.k,
        activation=_ACTIVATION[meta.architecture],
        threshold=_check_tensor(t, "threshold", (m,), f) if meta.architecture == "jumprelu" else None,
    ).to(device)
    orderings_error = None
    try:
        orderings = read_orderings(path, m)
    except CheckpointError as e:
        if ordering != "none":
            raise
        orderings, orderings_error = {}, str(e)
    metrics: dict[str, Any] = {}
    if (path / METRICS).exists():
        try:
            metrics = json.loads((path / METRICS).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / METRICS}: not valid JSON ({e})") from None
    if ordering != "none":
        if ordering not in orderings:
            have = ", ".join(orderings) or "none stored"
            raise CheckpointError(f"{path}: no ordering {ordering!r} ({have}); run `progsae order` first")
        sae = ordmod.apply(sae, orderings[ordering])
    return Checkpoint(path, sae, meta, orderings, metrics, ordering, orderings_error)
