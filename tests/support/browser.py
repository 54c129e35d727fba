"""Headless Debian Chromium through playwright, for the dashboard's browser tests
(tests/integration/test_dashboard.py, and the token prompt in tests/integration/test_security_ray.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("PROGSAE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched browser (playwright's sync API)."""
    import playwright.sync_api as pw

    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM}: `make test` installs Debian's chromium"
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def new_page(browser: Any) -> Iterator[Any]:
    """A fresh page (own context: own cookies and sessionStorage); fails the test on a page error."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 1000}, device_scale_factor=1)
    pg = ctx.new_page()
    pg.set_default_timeout(45_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors, errors
