"""SAELens checkpoints: every cfg.json flag that changes encode/decode is honoured exactly or refused.

Reading follows SAELens 6 (`SAE.load_from_disk`), including its conversion of pre-6.0 cfgs
(`handle_pre_6_0_config`: hook_point -> hook_name, activation_fn "topk" -> architecture topk,
boolean normalize_activations). Flags that shape the computation and what happens to each:

  architecture        standard -> relu, topk -> topk, jumprelu -> jumprelu; the training
                      checkpoints batchtopk / matryoshka_batchtopk (`save_model`) load as the
                      JumpReLU SAE their `save_inference_model` writes (threshold = topk_threshold
                      for every latent); matryoshka_widths become the granularity ladder.
                      Anything else (gated, transcoders, ...) is refused.
  apply_b_dec_to_input false (Gemma Scope): SAELens computes pre = W_enc^T x + b_enc, progsae
                      pre = W_enc^T (x - b_dec) + b_enc'. Folded exactly with
                      b_enc' = b_enc + W_enc^T b_dec (computed in float64).
  rescale_acts_by_decoder_norm true (topk, batchtopk): SAELens selects on pre_i * n_i with
                      n_i = ||W_dec[i]|| and decodes z_i / n_i * W_dec[i]. Folded exactly as
                      SAELens's own `_fold_norm_topk`: W_enc[:, i] *= n_i, b_enc[i] *= n_i,
                      W_dec[i] /= n_i, so progsae's pre IS SAELens's rescaled pre, its codes
                      are SAELens's feature acts and the decoder rows have unit norm. A batchtopk
                      threshold is already in rescaled units and is kept. Refused for standard
                      and jumprelu, whose SAELens configs have no such flag.
  jumprelu threshold  SAELens computes ReLU(pre) * (pre > t), progsae pre * (pre > t): equal
                      with t' = max(t, 0), which is what is stored (log_threshold: t = exp).
  normalize_activations  none: nothing. expected_average_only_in: the SAE expects c * x with
                      c = scaling_factor from SAELens's activation_scaler.json beside cfg.json;
                      that is progsae's input scale (encode sees c x, decode returns x_hat / c),
                      folded like SAELens's `fold_activation_norm_scaling_factor`. Refused
                      without that file, and for constant_norm_rescale / layer_norm (per-token
                      norms, not one scalar) and covariance_whitening.
  reshape_activations hook_z: SAELens flattens [.., n_heads, d_head] to d_in; progsae already
                      takes [N, d_in] rows, so the flattened rows encode identically.
  finetuning_scaling_factor (pre-6.0) true: refused (SAELens 6 no longer applies it).
  dtype               weights are read as float32 (bfloat16/float16 widen exactly).

Other fields (device, training hyperparameters, metadata besides model/hook/layer) do not
enter SAELens's encode/decode; unknown fields are dropped by SAELens too.

Writing: `saelens_fields` gives the SAELens part of a progsae cfg.json in the 6.x schema:
metadata.sae_lens_version (so SAELens skips its pre-6.0 conversion) and model/hook names only
when known, never null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

SCHEMA_VERSION = "6.0.0"
"""metadata.sae_lens_version written into progsae checkpoints: the cfg schema they follow."""
SCALER = "activation_scaler.json"
"""SAELens's file holding the expected_average_only_in scaling factor."""

_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
         "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
_BATCH = ("batchtopk", "matryoshka_batchtopk")
_RESCALABLE = ("topk", *_BATCH)
_LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "activation_fn_str": "activation_fn"}


class SAELensSpec(NamedTuple):
    """What a SAELens cfg.json says about the computation."""

    source_arch: str
    """Architecture as SAELens names it."""
    kind: str
    """progsae architecture: "topk", "relu" or "jumprelu"."""
    d_in: int
    d_sae: int
    k: int
    """Top-k for topk; d_sae (an upper bound) otherwise."""
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool
    needs_scaler: bool
    """normalize_activations == expected_average_only_in: read activation_scaler.json."""
    ladder: tuple[int, ...] | None
    """matryoshka_widths, when given."""
    model: str | None
    hook: str | None
    layer: int | None


def _legacy(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens's pre-6.0 conversion, for the fields that change the computation or naming."""
    version = cfg.get("sae_lens_version") or _obj(cfg.get("metadata")).get("sae_lens_version")
    if isinstance(version, str) and version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 6:
        return cfg
    new = {_LEGACY_RENAMES.get(k, k): v for k, v in cfg.items()}
    new.setdefault("architecture", "standard")
    fn = new.get("activation_fn", "relu")
    kwargs = _obj(new.get("activation_fn_kwargs"))
    if fn == "topk" and kwargs.get("k") is not None:
        new["architecture"], new["k"] = "topk", kwargs["k"]
    elif fn not in (None, "relu", "topk"):
        raise ValueError(f"SAELens activation_fn {fn!r} is not supported (relu or topk)")
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("finetuning_scaling_factor"):
        raise ValueError("finetuning_scaling_factor=true is not supported (SAELens 6 dropped it too)")
    return new


def _obj(v: Any) -> dict[str, Any]:
    return cast(dict[str, Any], v) if isinstance(v, dict) else {}


def _int(cfg: dict[str, Any], key: str) -> int:
    v = cfg.get(key)
    if v is None:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"field {key!r} has wrong type {type(v).__name__}")
    return v


def _flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"field {key!r} must be true or false, got {v!r}")
    return v


def _opt_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def parse(cfg: dict[str, Any]) -> SAELensSpec:
    """Read a SAELens cfg.json (6.x or older); ValueError (one line) for anything not honoured."""
    cfg = _legacy(cfg)
    arch = cfg.get("architecture", "standard")
    kind = _ARCH.get(arch) if isinstance(arch, str) else None
    if kind is None:
        raise ValueError(f"unsupported SAELens architecture {arch!r} (standard, topk, jumprelu, batchtopk, "
                         "matryoshka_batchtopk load)")
    d_in, d_sae = _int(cfg, "d_in"), _int(cfg, "d_sae")
    k = d_sae
    if arch in ("topk", *_BATCH):
        kwargs = _obj(cfg.get("activation_fn_kwargs"))  # pre-6.0 topk cfgs put k only here
        k = _int(cfg if "k" in cfg or "k" not in kwargs else kwargs, "k")
        if not 1 <= k <= d_sae:
            raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
    rescale = _flag(cfg, "rescale_acts_by_decoder_norm", False)
    if rescale and arch not in _RESCALABLE:
        raise ValueError(f"rescale_acts_by_decoder_norm=true is not defined for a {arch} SAE "
                         "(SAELens only applies it to topk/batchtopk)")
    norm = cfg.get("normalize_activations", "none")
    norm = "none" if norm is None else norm
    if norm not in ("none", "expected_average_only_in"):
        why = {"constant_norm_rescale": "scales every token by its own norm",
               "layer_norm": "layer-normalises every token",
               "covariance_whitening": "needs its whitening folded in (SAELens fold_activation_whitening)"}
        raise ValueError(f"normalize_activations={norm!r} is not supported: it {why.get(norm, 'is unknown')}"
                         if norm in why else f"normalize_activations={norm!r} is not supported")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none", "hook_z"):
        raise ValueError(f"reshape_activations={reshape!r} is not supported (none or hook_z)")
    ladder = cfg.get("matryoshka_widths")
    if ladder is not None:
        if not (isinstance(ladder, list) and all(isinstance(w, int) for w in cast(list[Any], ladder))):
            raise ValueError("matryoshka_widths must be a list of integers")
        ladder = tuple(cast(list[int], ladder))
        if ladder and ladder[-1] != d_sae:  # SAELens appends d_sae itself
            ladder = (*ladder, d_sae)
    meta = _obj(cfg.get("metadata"))
    layer = meta.get("hook_layer", cfg.get("hook_layer"))
    return SAELensSpec(
        source_arch=arch, kind=kind, d_in=d_in, d_sae=d_sae, k=k,
        apply_b_dec_to_input=_flag(cfg, "apply_b_dec_to_input", True),
        rescale_acts_by_decoder_norm=rescale,
        needs_scaler=norm == "expected_average_only_in",
        ladder=ladder or None,
        model=_opt_str(meta.get("model_name")) or _opt_str(cfg.get("model_name")),
        hook=_opt_str(meta.get("hook_name")) or _opt_str(cfg.get("hook_name")),
        layer=layer if isinstance(layer, int) and not isinstance(layer, bool) else None,
    )


def read_scale(path: Path) -> float:
    """The expected_average_only_in factor c from SAELens's activation_scaler.json in `path`."""
    f = path / SCALER
    if not f.is_file():
        raise ValueError(f"normalize_activations='expected_average_only_in' needs its scaling factor, "
                         f"and {SCALER} is not beside cfg.json")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{SCALER}: not valid JSON ({e})") from None
    c = _obj(data).get("scaling_factor")
    if _obj(data).get("has_whitening"):
        raise ValueError(f"{SCALER}: activation whitening is not supported")
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"{SCALER}: scaling_factor must be a positive finite number, got {c!r}")
    return float(c)


def tensor_shapes(spec: SAELensSpec) -> dict[str, tuple[int, ...]]:
    """The tensors sae_weights.safetensors must hold, by name and shape."""
    d, m = spec.d_in, spec.d_sae
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, m), "W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
    if spec.source_arch in _BATCH:
        shapes["topk_threshold"] = ()
    return shapes  # a jumprelu threshold is looked up by `fold` (older files store log_threshold)


def fold(spec: SAELensSpec, t: dict[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """SAELens weights -> progsae weights (W_enc, W_dec, b_enc, b_dec[, threshold]) that encode and
    decode raw activations exactly as SAELens does; the folds are listed in the module docstring."""
    W_enc, W_dec, b_enc, b_dec = (t[n].double() for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    threshold: Tensor | None = None
    if spec.source_arch in _BATCH:
        threshold = t["topk_threshold"].double().reshape(()).expand(spec.d_sae).clone()
    elif spec.kind == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"].double()
        elif "log_threshold" in t:  # as SAELens's JumpReLU process_state_dict_for_loading converts it
            threshold = t["log_threshold"].double().exp()
        else:
            raise ValueError("missing tensor 'threshold'")
    if not spec.apply_b_dec_to_input:
        b_enc = b_enc + b_dec @ W_enc
    if spec.rescale_acts_by_decoder_norm:
        n = W_dec.square().sum(-1).sqrt()
        W_enc, b_enc = W_enc * n, b_enc * n
        W_dec = torch.where(n[:, None] > 0, W_dec / torch.clamp(n, min=torch.finfo(torch.float64).tiny)[:, None], 0.0)
    if scale != 1.0:  # SAELens fold_activation_norm_scaling_factor; threshold stays (pre is unchanged)
        W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale
    out = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    if threshold is not None:
        out["threshold"] = threshold.clamp_min(0)
    return {k: v.float() for k, v in out.items()}


def saelens_fields(architecture: str, d_in: int, d_sae: int, k: int, model: str | None, hook: str | None,
                   layer: int | None) -> dict[str, Any]:
    """The SAELens 6 part of a progsae cfg.json (architecture is progsae's: topk/matryoshka/relu/jumprelu)."""
    arch = {"topk": "topk", "matryoshka": "topk", "relu": "standard", "jumprelu": "jumprelu"}[architecture]
    metadata: dict[str, Any] = {"sae_lens_version": SCHEMA_VERSION}
    for key, v in (("model_name", model), ("hook_name", hook), ("hook_layer", layer)):
        if v is not None:
            metadata[key] = v
    out: dict[str, Any] = {
        "architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": metadata,
    }
    if arch == "topk":
        out.update(k=k, rescale_acts_by_decoder_norm=False, activation_fn_kwargs={"k": k})
    return out
