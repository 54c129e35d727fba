"""Which torch device a command runs on: one resolver for every `--device` flag and config.

    "cpu"              the CPU
    "cuda", "cuda:N"   a CUDA GPU (refused with one line when torch sees none)
    "auto"             "cuda" when torch sees a CUDA GPU, else "cpu"

Trainer, server and the benchmarks all resolve through `resolve_device`, so "auto" means the
same thing everywhere. Checkpoints never record a device: they are saved from CPU copies and
loaded onto whichever device the reader names.
"""

from __future__ import annotations

import re

import torch

DEVICE_HELP = '"cpu", "cuda", "cuda:N", or "auto" (CUDA when torch sees a GPU, else CPU)'
"""What a device setting accepts, for config docstrings and messages."""

_SPEC = re.compile(r"cpu|cuda(:\d+)?|auto")


def resolve_device(spec: str | torch.device) -> torch.device:
    """The torch device for `spec` (see the module docstring); ValueError with one line if it is
    malformed or names a CUDA device this process cannot use."""
    text = str(spec).strip().lower()
    if not _SPEC.fullmatch(text):
        raise ValueError(f"unknown device {str(spec)!r}; use {DEVICE_HELP}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {text!r} requested but {why}; use --device cpu or auto")
        if ":" in text and int(text.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"device {text!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def check_device(spec: str) -> None:
    """Validate a device setting's spelling without touching CUDA (config validation)."""
    if not _SPEC.fullmatch(str(spec).strip().lower()):
        raise ValueError(f"unknown device {spec!r}; use {DEVICE_HELP}")
