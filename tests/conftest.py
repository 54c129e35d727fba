from __future__ import annotations

import collections
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


# Fuzz-case tallies, by suite, for the report only (RELIABILITY.md quotes them): each fuzz test
# asserts on its own cases, so no test depends on which others ran or in what order.
FUZZ_CASES: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="session")
def fuzz_cases() -> collections.defaultdict[str, collections.Counter[str]]:
    """Add a test's case counts here (`fuzz_cases[suite].update(...)`); printed after the run."""
    return FUZZ_CASES


def pytest_terminal_summary(terminalreporter, config) -> None:
    seed = config.getoption("randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and isinstance(seed, int):  # in -q runs too, for a rerun
        terminalreporter.write_line(f"tests ran in random order; --randomly-seed={seed} repeats it")
    if FUZZ_CASES:
        terminalreporter.section("fuzz cases")
        for suite, counts in sorted(FUZZ_CASES.items()):
            terminalreporter.write_line(f"{suite}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))


# --- the browser tests: one headless Chromium per module, a fresh page per test on the module's `app` ---


@pytest.fixture(scope="module")
def browser():
    from tests.support.browser import chromium

    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, app):
    from tests.support.browser import new_page

    with new_page(browser) as pg:
        yield pg
