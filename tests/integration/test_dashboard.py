"""The dashboard against the real Ray Serve app: its HTTP routes, then the page in headless Chromium.

One module-scoped app serves two real-LM checkpoints (tests/support/dashboard_fixtures.py: SmolLM2
activations, a k-means dictionary, feature cards with the real tokenizer and logit lens)
plus a synthetic one without cards. Screenshots go to a tmp dir; with
PROGSAE_DOCS_SCREENSHOT=path the side-by-side view is also saved there (docs/dashboard.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from progsae.sae import checkpoint, feature_cards
from progsae.server import launch
from progsae.server.config import AppConfig
from progsae.server.validate import Limits
from tests.support import synthetic as testing
from tests.support.dashboard_fixtures import K_LADDER, LADDER
from tests.support.dashboard_fixtures import build as build_fixtures
from tests.support.synthetic import free_port

MAX_CHARS = 400


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    paths = build_fixtures(root)
    shutil.rmtree(root / "acts")  # not a checkpoint; keep the root to checkpoints only
    testing.make_checkpoint(root / "nofeat", d=32, m=256, k=8)
    cluster = launch.LocalCluster(grpc_port=free_port(), http_port=free_port())
    addrs = launch.start(AppConfig(checkpoint_root=str(root), limits=Limits(max_text_chars=MAX_CHARS)), cluster)
    yield {"root": root, **paths, **addrs}
    launch.stop()


def get(app, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(app["http"] + path, timeout=60) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def get_json(app, path: str) -> tuple[int, dict]:
    status, body, _ = get(app, path)
    return status, json.loads(body)


# --- HTTP routes, no browser ------------------------------------------------------------------


def test_page_and_static(app):
    status, body, ctype = get(app, "/")
    assert status == 200 and ctype.startswith("text/html") and b'id="streams"' in body
    scripts = ("app.js", "api.js", "card.js", "chart.js", "tokens.js", "panel.js", "kl.js")
    for name, kind in (*((f, "javascript") for f in scripts), ("style.css", "css")):
        status, body, ctype = get(app, f"/static/{name}")
        assert status == 200 and kind in ctype and body
    for name in ("/", *(f"/static/{f}" for f in (*scripts, "style.css"))):  # offline
        assert not re.findall(rb"https?://(?!www\.w3\.org/2000/svg)", get(app, name)[1]), name
    assert get(app, "/static/secret.py")[0] == 404
    assert get(app, "/static/..%2Fdashboard.py")[0] == 404


def test_overview(app):
    status, ov = get_json(app, "/api/overview")
    assert status == 200 and ov["limits"]["max_text_chars"] == MAX_CHARS
    cks = {c["name"]: c for c in ov["checkpoints"]}
    assert set(cks) == {"mat", "topk", "nofeat"}
    assert cks["mat"]["features"] and cks["topk"]["features"] and not cks["nofeat"]["features"]
    assert set(cks["topk"]["curves"]) == {"none", "mean_sq", "freq"} and list(cks["mat"]["curves"]) == ["none"]
    assert [r["g"] for r in cks["mat"]["curves"]["none"]] == list(LADDER)
    assert cks["mat"]["ladder"] == list(LADDER) and cks["mat"]["architecture"] == "matryoshka"


def test_feature_card_maps_served_index_to_trained_order(app):
    cards = feature_cards.load(app["topk"])
    perm = checkpoint.read_orderings(app["topk"], 256)["mean_sq"].perm
    status, c = get_json(app, "/api/feature?model_id=topk@mean_sq&latent=0")
    assert status == 200 and c["served_index"] == 0 and c["latent"] == int(perm[0])
    want = cards.card(int(perm[0]))
    assert c["density"] == pytest.approx(want["density"]) and c["contexts"] == want["contexts"]
    assert c["promoted"] and c["logit_lens"] and not c["stale"] and c["label"] == cards.label(int(perm[0]))
    _, same = get_json(app, f"/api/feature?model_id=topk@none&latent={int(perm[0])}")
    assert same["latent"] == c["latent"]
    _, top = get_json(app, "/api/feature?model_id=mat&latent=0")
    assert top["density"] > 0 and top["contexts"][0]["tokens"]


def test_labels_and_k_ladder(app):
    _, models = get_json(app, "/api/models")
    k_ladders = {m["model_id"]: m["k_ladder"] for m in models["models"]}
    assert k_ladders["mat@none"] == list(K_LADDER) and k_ladders["topk@mean_sq"] == []
    cards = feature_cards.load(app["topk"])
    perm = checkpoint.read_orderings(app["topk"], 256)["mean_sq"].perm
    status, got = get_json(app, "/api/labels?model_id=topk@mean_sq&latents=0,5,200")
    assert status == 200 and got["model_id"] == "topk@mean_sq"
    assert got["labels"] == {str(i): cards.label(int(perm[i])) for i in (0, 5, 200)}
    assert sum(bool(v) for v in got["labels"].values()) >= 2  # fixture latents fire on its sentences
    for query, words in (("model_id=mat&latents=1,x", "comma-separated"), ("model_id=mat&latents=256", "out of range"),
                         ("model_id=mat&latents=" + ",".join(["1"] * 1025), "at most 1024")):
        status, body = get_json(app, f"/api/labels?{query}")
        assert status == 400 and words in body["message"], query
    assert get_json(app, "/api/labels?model_id=nofeat&latents=1")[0] == 404


@pytest.mark.parametrize("query, status, code, words", [
    ("model_id=nope&latent=1", 404, "NOT_FOUND", "unknown model"),
    ("model_id=../etc&latent=1", 400, "INVALID_ARGUMENT", "relative path"),
    ("model_id=mat&latent=x", 400, "INVALID_ARGUMENT", "integer"),
    ("model_id=mat&latent=256", 400, "INVALID_ARGUMENT", "out of range"),
    ("model_id=nofeat&latent=1", 404, "NOT_FOUND", "progsae features"),
    ("model_id=nofeat@nope&latent=1", 404, "NOT_FOUND", "no ordering"),
])
def test_feature_errors(app, query, status, code, words):
    got, body = get_json(app, f"/api/feature?{query}")
    assert got == status and body["code"] == code and words in body["message"]


# --- the page in headless Chromium --------------------------------------------------------------


def open_page(page, app, query: str = "") -> None:
    page.goto(app["http"] + "/" + query)
    page.wait_for_selector("body[data-ready='1']")


def encode(page, text: str, max_g_index: int | None = None) -> None:
    page.fill("#text", text)
    if max_g_index is not None:
        page.eval_on_selector("#max-g", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }",
                              max_g_index)
    page.click("#run")
    page.wait_for_function("() => [...document.querySelectorAll('.stream')].every("
                           "p => p.dataset.state === 'done' || p.dataset.state === 'error')")


def test_browser_end_to_end(page, app, tmp_path):
    shots = Path(os.environ.get("PROGSAE_SCREENSHOTS", tmp_path))
    open_page(page, app)
    assert page.input_value("#model-a") == "mat@none"
    # chart: one curve per (checkpoint, ordering) with metrics.json
    assert page.locator("#chart path.line").count() == 4
    # a large budget: the stream climbs the whole ladder
    encode(page, "The cat sat on the mat because it was warm.")
    panel = page.locator(".stream").first
    assert panel.get_attribute("data-state") == "done"
    assert int(panel.get_attribute("data-rungs")) == len(LADDER) == int(panel.get_attribute("data-ladder-size"))
    assert panel.get_attribute("data-stop") == "ladder_done"
    assert page.locator(".stream .tok").count() >= 8 and page.locator(".stream .feat").count() > 8
    assert page.locator(".ladder .rung.reached").count() == len(LADDER)
    assert page.inner_text(".stream .rungcount") == f"{len(LADDER)} / {len(LADDER)}"
    assert float(page.inner_text(".stream .fvu")) < 1.0
    page.screenshot(path=str(shots / "full-ladder.png"), full_page=True)
    # a tight budget (max G = the second rung): the stream stops below the top
    encode(page, "The cat sat on the mat because it was warm.", max_g_index=2)
    assert int(panel.get_attribute("data-rungs")) == 2 and panel.get_attribute("data-stop") == "max_granularity"
    assert page.inner_text(".stream .rungcount") == f"2 / {len(LADDER)}"
    assert page.locator(".ladder .rung.reached").count() == 2
    assert "max G" in page.inner_text(".stream .stop")
    page.screenshot(path=str(shots / "tight-budget.png"), full_page=True)
    # a feature card
    page.locator(".stream .feat").first.click()
    page.wait_for_selector("#card[data-state='ready']")
    assert page.locator("#card .ctx").count() >= 1 and page.locator("#card .ctok.peak").count() >= 1
    assert page.locator("#card .ptok").count() >= 1
    # feature chips carry their card's short label
    page.wait_for_selector(".stream[data-labels='1']")
    cards = feature_cards.load(app["mat"])
    chips = page.locator(".stream .feat")
    named = [(int(chips.nth(i).get_attribute("data-latent")), chips.nth(i).locator(".lbl").inner_text())
             for i in range(chips.count())]
    assert all(text == cards.label(lat) for lat, text in named) and sum(bool(t) for _, t in named) > len(named) / 2
    assert page.inner_text("#card .card-label") == cards.label(int(page.get_attribute("#card", "data-latent")))
    # live FVU markers on the chart
    assert page.locator("#chart .marker").count() == 2
    page.screenshot(path=str(shots / "feature-card.png"), full_page=True)


def set_slider(page, selector: str, index: int) -> None:
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", index)


def panel_state(page) -> dict:
    p = page.locator(".stream").first
    return {"rungs": int(p.get_attribute("data-rungs")), "stop": p.get_attribute("data-stop"),
            "shown": page.inner_text(".stream .rungcount"), "stopped": page.inner_text(".stream .stop")}


def test_browser_every_budget_control(page, app):
    """Each budget control changes what the page shows: deadline, target FVU, per-token target
    (the per-token strip), max k' and the k' axis (max G: test_browser_end_to_end)."""
    text = "The cat sat on the mat because it was warm."
    open_page(page, app)
    n = len(LADDER)
    assert page.is_visible("#k-controls")  # mat records a k' ladder
    # deadline: 1 ms is spent before the first rung (the language model runs inside it)
    page.fill("#deadline", "1")
    encode(page, text)
    state = panel_state(page)
    assert {k: state[k] for k in ("rungs", "stop", "shown")} == {"rungs": 0, "stop": "deadline", "shown": f"0 / {n}"}
    # said plainly: the deadline is shorter than the language model alone (issue 22 item 1)
    assert state["stopped"].startswith("deadline shorter than the language model alone needs (")
    assert page.locator(".ladder .rung.reached").count() == 0 and page.locator(".stream .feat").count() == 0
    page.fill("#deadline", "")
    # target FVU: the fixture's first rung reconstructs to FVU 0.88 (the full ladder to 0.2)
    page.fill("#target-fvu", "0.9")
    encode(page, text)
    assert panel_state(page) == {"rungs": 1, "stop": "target_fvu", "shown": f"1 / {n}", "stopped": "target FVU reached"}
    assert float(page.inner_text(".stream .fvu")) <= 0.9
    # a target the ladder cannot reach ends saying so, not green (issue 22 item 4)
    page.fill("#target-fvu", "0.01")
    encode(page, text)
    state = panel_state(page)
    assert state["stop"] == "ladder_done" and "target FVU 0.01 not met" in state["stopped"]
    assert page.get_attribute(".stream .stop", "class") == "stop missed"
    page.fill("#target-fvu", "")
    # per-token target: the strip colours each token by its final G; some stop early, some climb
    assert page.locator(".stream .strip").is_hidden()
    page.fill("#token-target", "0.5")
    encode(page, text)
    strip = page.locator(".stream .stok")
    assert strip.count() == page.locator(".stream .tok").count() >= 8
    finals = [int(strip.nth(i).get_attribute("data-final")) for i in range(strip.count())]
    assert set(finals) <= set(LADDER) and min(finals) < max(finals) == LADDER[-1]
    met = [strip.nth(i).get_attribute("data-met") == "1" for i in range(strip.count())]
    assert page.locator(".stream .stok.unmet").count() == met.count(False)
    assert f"{sum(met)} / {len(met)} met it" in page.inner_text(".stream .strip-head")
    assert page.locator(".stream .tok.settled").count() >= 1  # a token that stopped before the last rung
    assert re.fullmatch(r"\d+ / \d+", page.inner_text(".stream .refining"))
    if met.count(False):  # tokens that never met it are said at the end, not a green finish
        assert f"{met.count(False)} token" in page.inner_text(".stream .stop")
        assert page.get_attribute(".stream .stop", "class") == "stop missed"
    page.fill("#token-target", "")
    # max k': every rung decodes each token's 2 largest codes
    set_slider(page, "#max-k", K_LADDER.index(2) + 1)
    assert page.inner_text("#max-k-label") == "k′ ≤ 2"
    encode(page, text)
    assert panel_state(page)["rungs"] == n and page.inner_text(".stream .k") == "2"
    assert float(page.inner_text(".stream .l0")) <= 2
    # climb k' instead of G (at the whole ladder's G), cut at max k' = 2
    page.check("#axis-k")
    encode(page, text)
    assert page.locator(".stream .ladder .rung").all_inner_texts() == [f"k′ {k}" for k in K_LADDER]
    assert panel_state(page) == {"rungs": 2, "stop": "max_k", "shown": f"2 / {len(K_LADDER)}",
                                 "stopped": "max k′ reached"}
    assert page.locator(".ladder .rung.reached").count() == 2 and page.inner_text(".stream .g") == str(LADDER[-1])


def test_browser_side_by_side(page, app, tmp_path):
    shots = Path(os.environ.get("PROGSAE_SCREENSHOTS", tmp_path))
    open_page(page, app, "?side=1")
    assert page.input_value("#model-b") == "topk@mean_sq"
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/api/stream") else None)
    encode(page, "Paris is the capital of France, and Berlin is a large city.")
    # both panels from one request: the server runs the language model once for the two models
    assert len(sent) == 1 and sent[0]["also_models"] == ["topk@mean_sq"]
    panels = page.locator(".stream")
    assert panels.count() == 2
    for i in range(2):
        assert panels.nth(i).get_attribute("data-stop") == "ladder_done"
    fvus = [float(panels.nth(i).locator(".fvu").inner_text()) for i in range(2)]
    assert all(0 <= f < 1 for f in fvus)
    page.locator(".stream").nth(0).locator(".feat").first.click()
    page.wait_for_selector("#card[data-state='ready']")
    page.screenshot(path=str(shots / "side-by-side.png"), full_page=True)
    docs = os.environ.get("PROGSAE_DOCS_SCREENSHOT")
    if docs:
        page.screenshot(path=docs, full_page=True)


def test_browser_errors(page, app):
    open_page(page, app)
    encode(page, "   ")
    assert "empty" in page.inner_text("#error")
    encode(page, "word " * 100)
    assert "too long" in page.inner_text("#error") and str(MAX_CHARS) in page.inner_text("#error")
    # a model without a language model: the server's one-line reason
    page.select_option("#model-a", "nofeat@mean_sq")
    encode(page, "Hello there.")
    assert "language model" in page.inner_text("#error")
    # server down (the stream request cannot connect)
    page.route("**/api/stream", lambda route: route.abort())
    page.select_option("#model-a", "mat@none")
    encode(page, "Hello there.")
    assert "Cannot reach the progsae server" in page.inner_text("#error")
    page.unroute("**/api/stream")
    # unknown model named in the URL
    open_page(page, app, "?model=nope&run=1")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert "unknown model" in page.inner_text("#error")


def test_browser_shows_lm_and_sae_time_apart_and_a_cut_text(page, app):
    """The language model's time and the SAE's are shown apart, and they add up to the elapsed time; a
    text longer than the server's token limit is cut with a notice that keeps the whole count."""
    open_page(page, app)
    encode(page, "The cat sat on the mat because it was warm.")
    timing = page.inner_text(".stream .timing")
    lm, sae = (float(v) for v in re.findall(r"([0-9.]+) ms", timing))
    assert timing.startswith("language model") and lm > 0 and sae >= 0
    assert abs(lm + sae - float(page.inner_text(".stream .ms"))) < 0.2
    assert page.locator(".stream .trunc").is_hidden()
    long = "\U0001F9EC" * 190  # 380 UTF-16 units, within the page's 400, but 570 byte-level tokens (> 512)
    encode(page, long)
    note = page.inner_text(".stream .trunc")
    total = int(re.search(r"of (\d+) tokens", note).group(1))
    assert page.locator(".stream .trunc").is_visible() and "first 512 of" in note and total > 512
    assert page.locator(".stream .tok").count() == 512


def test_browser_kl_controls(page, app, tmp_path):
    """Issue 21 item 3: "show KL" puts each token's prediction at its rung beside the clean one and
    colours a strip by KL; a KL target stops tokens at a rung and the end says how many met it; a
    model without a language model gets the server's reason in the error banner."""
    text = "The cat sat on the mat because it was warm."
    open_page(page, app)
    assert page.is_visible("#show-kl") and page.is_visible("#token-target-kl")
    # no KL asked: no KL strip, no predictions (the stream is what it was)
    encode(page, text)
    assert page.locator(".stream .klstrip").count() == 0 and page.locator(".stream .pred").count() == 0
    # show KL: every token has a KL colour and its rung and clean predictions
    page.check("#show-kl")
    encode(page, text)
    n = page.locator(".stream .tok").count()
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert n >= 8 and page.get_attribute(".stream", "data-stop") == "ladder_done"
    cells = page.locator(".stream .klstrip .kltok")
    assert cells.count() == n
    kls = [float(cells.nth(i).get_attribute("data-kl")) for i in range(n)]
    assert all(v >= 0 for v in kls) and max(kls) > 0
    assert all("--t:" in (cells.nth(i).get_attribute("style") or "") for i in range(n))
    preds = page.locator(".stream .tok .pred")
    assert preds.count() == n
    for i in range(n):
        line = preds.nth(i).inner_text()
        assert re.search(r"rung: \".*\" \d\.\d\d \| clean: \".*\" \d\.\d\d KL \d", line), line
    assert page.inner_text(".stream .klstrip .strip-head").startswith("Each token's KL at its last rung (mean ")
    shots = Path(os.environ.get("PROGSAE_SCREENSHOTS", tmp_path))
    page.screenshot(path=str(shots / "kl-shown.png"), full_page=True)
    # a KL target: tokens stop at their first rung within it; the end says how many met it
    page.uncheck("#show-kl")
    target = round(sorted(kls)[len(kls) // 2] * 4, 4)  # the full ladder meets it for half the tokens or more
    page.fill("#token-target-kl", str(target))
    encode(page, text)
    panel = page.locator(".stream").first
    assert panel.get_attribute("data-kl") == "1"
    assert page.locator(".stream .klstrip .kltok").count() == n
    head = page.inner_text(".stream .klstrip .strip-head")
    met = int(panel.get_attribute("data-kl-met"))
    assert f"{met} / {n} tokens met the KL target {target}" in head and met >= 1
    got = page.locator(".stream .klstrip .kltok")
    end_kl = [float(got.nth(i).get_attribute("data-kl")) for i in range(n)]
    assert sum(v <= target for v in end_kl) == met
    assert page.locator(".stream .klstrip .kltok.unmet").count() == n - met
    if met < n:
        assert f"{n - met} token" in page.inner_text(".stream .stop") and "never met the KL target" in page.inner_text(
            ".stream .stop")
    else:
        assert panel.get_attribute("data-stop") == "token_target_kl"
        assert page.inner_text(".stream .stop") == "every token met its KL target"
    assert page.locator(".stream .tok.settled").count() >= 1  # a token stopped before the last rung
    finals = {int(page.locator(".stream .tok").nth(i).get_attribute("data-final-g")) for i in range(n)}
    assert finals <= set(LADDER) and min(finals) < LADDER[-1]
    # each stopped token shows what the model predicts at the rung it stopped at, within the target
    settled = page.locator(".stream .tok.settled .pred")
    assert settled.count() >= 1
    for i in range(settled.count()):
        assert "rung: " in settled.nth(i).inner_text() and float(settled.nth(i).get_attribute("data-kl")) <= target
    page.screenshot(path=str(shots / "kl-target.png"), full_page=True)
    # bad target: the server's reason in the banner
    page.fill("#token-target-kl", "-1")
    encode(page, text)
    assert "token_target_kl" in page.inner_text("#error")
    # a model without a language model
    page.fill("#token-target-kl", "")
    page.check("#show-kl")
    page.select_option("#model-a", "nofeat@mean_sq")
    encode(page, text)
    assert "language model" in page.inner_text("#error")
