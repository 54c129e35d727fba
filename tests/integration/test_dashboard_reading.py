"""The dashboard as a new user reads it (issue 22 items 3, 5, 6, 7, 9), in headless Chromium against
the real Ray Serve app: what FVU divides by, emoji and blank tokens, position-latent chips, a chart
and a page that keep nothing of the previous run, the slider of an unknown model, the visible
explanation of G and FVU, and a model menu wide enough for its labels.

The checkpoints are test_dashboard's (tests/support/dashboard_fixtures.py); `mat` records the
reference variance of its activations as a newly trained checkpoint does, `topk` none (an older
one), and a checkpoint with a long name stands in for the demo's long menu labels.
"""

from __future__ import annotations

import json
import shutil

import pytest

from progsae.sae import metrics
from progsae.server import launch
from progsae.server.config import AppConfig
from progsae.trainer.data.activations import ActivationCache
from tests.integration.test_dashboard import encode, open_page
from tests.support import synthetic as testing
from tests.support.dashboard_fixtures import LADDER
from tests.support.dashboard_fixtures import build as build_fixtures
from tests.support.synthetic import free_port

TEXT = "The cat sat on the mat because it was warm."
LONG = "a_checkpoint_whose_name_runs_on_and_on_like_a_demo_path"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    paths = build_fixtures(root)
    cache = ActivationCache(root / "acts")
    cfg = json.loads((paths["mat"] / "cfg.json").read_text())
    cfg["progsae"]["reference_variance"] = metrics.token_variance(cache.gather(cache.rows()))
    (paths["mat"] / "cfg.json").write_text(json.dumps(cfg))
    shutil.rmtree(root / "acts")
    testing.make_checkpoint(root / LONG, d=32, m=256, k=8)
    cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port())
    addrs = launch.start(AppConfig(checkpoint_root=str(root)), cluster)
    yield {"root": root, "reference": cfg["progsae"]["reference_variance"], **paths, **addrs}
    launch.stop()


def marker_labels(page) -> list[str]:
    """The model of each "your text" point on the chart, once the run has drawn them (at its end)."""
    page.wait_for_function("() => !document.body.dataset.running")
    return page.eval_on_selector_all("#chart .marker title",
                                     "ts => ts.map(t => t.textContent.split(' (your text)')[0])")


def test_fvu_says_what_it_divides_by(page, app):
    """Item 5: "hello world" scored FVU 4 at full G against its two tokens' own variance; against the
    checkpoint's reference it reads like a sentence's, and each panel says which baseline it used."""
    open_page(page, app, "?side=1")
    encode(page, "hello world")
    mat, topk = page.locator(".stream").nth(0), page.locator(".stream").nth(1)
    assert mat.get_attribute("data-model") == "mat@none" and topk.get_attribute("data-model") == "topk@mean_sq"
    assert mat.get_attribute("data-fvu-baseline") == "checkpoint"
    assert f"{app['reference']:.1f} per token" in mat.locator(".baseline").inner_text()
    assert float(mat.locator(".fvu").inner_text()) < 1
    assert topk.get_attribute("data-fvu-baseline") == "batch"  # its checkpoint records no reference
    assert "own variance" in topk.locator(".baseline").inner_text() and float(topk.locator(".fvu").inner_text()) > 1
    assert mat.locator(".baseline").is_visible() and topk.locator(".baseline").is_visible()


def test_emoji_read_as_emoji_and_a_blank_token_shows(page, app):
    """Item 6: two emoji are six byte-level tokens, each "\ufffd" alone: two cells under the emoji, each
    token still with its own features, showing its bytes; a lone space shows a mark, not an empty box.
    Side by side: both panels' first emoji at once load the tokenizer once, without an error."""
    open_page(page, app, "?side=1")
    page.fill("#token-target", "0.5")
    encode(page, "\U0001F9EC\U0001F9EC a  b")
    assert page.locator(".stream[data-state='done']").count() == 2
    assert page.locator(".stream").nth(1).locator(".tok-group").count() == 2
    page.uncheck("#side-by-side")
    encode(page, "\U0001F9EC\U0001F9EC a  b")
    groups = page.locator(".stream .tok-group")
    assert groups.count() == 2 and groups.locator(".group-text").all_inner_texts() == ["\U0001F9EC"] * 2
    assert groups.nth(0).locator(".tok").count() == 3 and groups.nth(0).locator(".tok .feats").count() == 3
    assert groups.nth(0).locator(".tok-text").all_inner_texts() == ["f0 9f", "a7", "ac"]
    texts = page.locator(".stream .tok-text").all_inner_texts()
    assert "\ufffd" not in "".join(texts) and "␣" in texts
    assert page.locator(".stream .tok").count() == page.locator(".stream .stok").count() >= 9
    # the per-token strip reads the same way
    assert page.locator(".stream .sgroup").count() == 2
    assert page.locator(".stream .sgroup").first.locator(".stok").first.inner_text() == "\U0001F9EC"


def test_the_first_token_chip_names_a_position_latent(page, app):
    """Item 7: the top latent of a text's first token fires there on every text; its chip says so."""
    open_page(page, app)
    encode(page, "hello world")
    page.wait_for_selector(".stream[data-labels='1']")
    first = page.locator(".stream .tok").first.locator(".feat .lbl").first
    assert first.inner_text() == "position (first token)" and first.get_attribute("title") == "position (first token)"


def test_the_chart_keeps_only_the_last_runs_points(page, app):
    """Item 3: after a side-by-side run, a run of one model leaves only that model's points."""
    open_page(page, app, "?side=1")
    encode(page, TEXT)
    assert sorted(set(marker_labels(page))) == ["mat@none", "topk@mean_sq"]
    page.uncheck("#side-by-side")
    encode(page, "Birds migrate south when the weather turns cold.")
    assert marker_labels(page) == ["mat@none"] * len(LADDER)


def test_an_error_leaves_no_stale_results(page, app):
    """Item 9: an error banner stands alone, not above the previous run's panels and points."""
    open_page(page, app)
    encode(page, TEXT)
    assert page.locator(".stream").count() == 1 and len(marker_labels(page)) == len(LADDER)
    encode(page, "   ")
    assert "empty" in page.inner_text("#error") and page.is_visible("#error")
    assert page.locator(".stream").count() == 0 and marker_labels(page) == []


def slider(page) -> dict:
    return page.eval_on_selector("#max-g", "e => ({min: +e.min, max: +e.max, value: +e.value, disabled: e.disabled})")


def test_an_unknown_models_slider_sits_where_its_label_says(page, app):
    """Item 9: with an unknown model the slider said "full ladder" with its thumb at the far left
    (min = max); now it is disabled at the right, and a served model's ladder brings it back."""
    open_page(page, app, "?model=nope")
    s = slider(page)
    assert s["disabled"] and s["min"] < s["max"] == s["value"] and page.inner_text("#max-g-label") == "full ladder"
    page.select_option("#model-a", "mat@none")
    assert slider(page) == {"min": 1, "max": len(LADDER), "value": len(LADDER), "disabled": False}


def test_g_and_fvu_explained_and_the_menu_shows_whole_labels(page, app):
    """Item 9: G and FVU are explained on the page, not only in tooltips; the model menus are as wide
    as their longest label (a 380 px cap cut the demo's)."""
    open_page(page, app)
    explain = page.inner_text("#explain")
    assert page.is_visible("#explain") and "G (granularity)" in explain and "FVU (fraction of variance" in explain
    page.check("#side-by-side")
    for menu in ("#model-a", "#model-b"):
        fit = page.eval_on_selector(menu, """s => {
            const ctx = document.createElement('canvas').getContext('2d'), cs = getComputedStyle(s);
            ctx.font = cs.font;
            const need = Math.max(...[...s.options].map(o => ctx.measureText(o.text).width));
            return {need, room: s.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight),
                    longest: Math.max(...[...s.options].map(o => o.text.length))};
        }""")
        assert fit["longest"] > 60 and fit["need"] + 12 <= fit["room"], (menu, fit)
