"""Fixtures of the browser tests: one headless Chromium per module, a fresh page per test on the
module's own `app` (tests/support/browser.py)."""

from __future__ import annotations

import pytest

from tests.support.browser import chromium, new_page


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, app):
    with new_page(browser) as pg:
        yield pg
