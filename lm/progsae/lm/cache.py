"""Where progsae keeps what it derives once and reuses: converted models, unpacked corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$PROGSAE_CACHE, default ~/.cache/progsae (models and npm corpora live below it)."""
    return Path(os.environ.get("PROGSAE_CACHE") or Path.home() / ".cache" / "progsae").expanduser()
