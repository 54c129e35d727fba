from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from progsae.sae.codec import SAE  # noqa: E402


def random_sae(d: int = 16, m: int = 64, k: int = 8, seed: int = 0, scale: float = 1.0,
               dtype: torch.dtype = torch.float32) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(m, d, generator=g, dtype=dtype)
    W_dec = W_dec * (0.5 + torch.rand(m, 1, generator=g, dtype=dtype))  # rows not unit norm
    return SAE(
        W_enc=torch.randn(d, m, generator=g, dtype=dtype),
        W_dec=W_dec,
        b_enc=0.1 * torch.randn(m, generator=g, dtype=dtype),
        b_dec=torch.randn(d, generator=g, dtype=dtype),
        k=k,
        scale=scale,
    )


@pytest.fixture
def sae() -> SAE:
    return random_sae()


@pytest.fixture
def one_thread():
    """One torch thread: on tiny tensors a thread pool only adds synchronisation cost (2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
