// progsae dashboard: text -> tokens -> each token's features, refined rung by rung (POST /api/stream, SSE).
// api.js talks to the server (token, errors), card.js shows feature cards and chip labels.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: [],          // /api/models entries
  overview: null,      // /api/overview
  controller: null,    // AbortController of the running streams
  live: {},            // model_id -> [{g, fvu}] of the last stream (chart markers)
  limits: {},
  labels: {},          // model_id -> Map(latent -> short label from its feature card)
};
const PALETTE = ["#3056d3", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad", "#f08c00", "#5c7cfa"];
const STOP_TEXT = {
  ladder_done: "reached the top of the ladder",
  max_granularity: "max G reached",
  deadline: "deadline reached",
  target_fvu: "target FVU reached",
  token_target_fvu: "every token met its target",
  max_k: "max k′ reached",
  CANCELLED: "cancelled",
};
const FEATS_SHOWN = 3;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
}

function hue(latent) { return (Math.imul(latent + 1, 2654435761) >>> 0) % 360; }
function fmt(v, d = 3) { return v === null || v === undefined ? "–" : (+v).toFixed(d); }
function pct(v) { return v >= 0.01 ? (100 * v).toFixed(2) + "%" : (100 * v).toPrecision(2) + "%"; }
function showToken(t) { return t.replace(/\n/g, "⏎").replace(/ /g, "\u00a0") || "∅"; }

// --- models and budget controls ---------------------------------------------------------------

function modelLabel(m) {
  const text = m.text_available ? "" : " · no text";
  const kl = m.k_ladder.length ? ` · k′ ${m.k_ladder.join(",")}` : "";
  return `${m.model_id} (${m.architecture}, M=${m.d_sae}, k=${m.k}${kl}${text})`;
}

function fillModels() {
  const params = new URLSearchParams(location.search);
  for (const id of ["model-a", "model-b"]) {
    const sel = $(id);
    sel.replaceChildren(...state.models.map((m) => el("option", { value: m.model_id }, modelLabel(m))));
  }
  const withText = state.models.filter((m) => m.text_available);
  const mat = withText.find((m) => m.architecture === "matryoshka");
  const a = params.get("model") || (mat || withText[0] || state.models[0] || {}).model_id;
  if (a && !state.models.some((m) => m.model_id === a)) {
    $("model-a").append(el("option", { value: a }, `${a} (not served)`));
  }
  if (a) $("model-a").value = a;
  const aName = (a || "").split("@")[0];
  const b = withText.find((m) => m.architecture === "topk" && m.ordering !== "none" && !m.model_id.startsWith(aName + "@"))
    || withText.find((m) => !m.model_id.startsWith(aName + "@")) || state.models[0];
  if (b) $("model-b").value = b.model_id;
  if (params.get("text")) $("text").value = params.get("text");
  if (params.get("side") === "1") $("side-by-side").checked = true;
  $("model-b").disabled = !$("side-by-side").checked;
  updateLadder();
}

function selectedModels() {
  const ids = [$("model-a").value];
  if ($("side-by-side").checked && $("model-b").value) ids.push($("model-b").value);
  return ids;
}

function modelOf(id) { return state.models.find((x) => x.model_id === id); }
function ladderOf(id) { const m = modelOf(id); return m ? m.ladder : []; }
function kLadderOf(id) { const m = modelOf(id); return m ? m.k_ladder : []; }

function updateLadder() {
  // Max G slides over the union of the selected models' ladders; the top position means "no limit".
  const gs = [...new Set(selectedModels().flatMap(ladderOf))].sort((a, b) => a - b);
  const slider = $("max-g");
  const atTop = +slider.value >= +slider.max;
  slider.dataset.ladder = JSON.stringify(gs);
  slider.max = Math.max(1, gs.length);
  if (atTop || +slider.value > gs.length) slider.value = slider.max;
  // k′ (the largest codes kept per token) only for models trained for it (ModelInfo.k_ladder)
  const ks = [...new Set(selectedModels().flatMap(kLadderOf))].sort((a, b) => a - b);
  const kSlider = $("max-k");
  $("k-controls").hidden = !ks.length;
  const kAtTop = +kSlider.value >= +kSlider.max;
  kSlider.dataset.ladder = JSON.stringify(ks);
  kSlider.max = Math.max(1, ks.length);
  if (kAtTop || +kSlider.value > ks.length) kSlider.value = kSlider.max;
  showMaxG();
}

function sliderValue(id) {
  // a slider over a ladder; its top position means "no limit" (null)
  const vs = JSON.parse($(id).dataset.ladder || "[]");
  const i = +$(id).value;
  return !vs.length || i >= vs.length ? null : vs[i - 1];
}
function maxG() { return sliderValue("max-g"); }
function maxK() { return $("k-controls").hidden ? null : sliderValue("max-k"); }

function showMaxG() {
  const g = maxG(), k = maxK();
  $("max-g-label").textContent = g === null ? "full ladder" : `G ≤ ${g}`;
  $("max-k-label").textContent = k === null ? "all k" : `k′ ≤ ${k}`;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : +v;
}

function request(modelId) {
  // the budget controls as a POST /api/stream body; k′ settings only reach models trained for them
  const budget = {};
  const d = number("deadline"), t = number("target-fvu"), tt = number("token-target"), g = maxG();
  if (d !== null) budget.deadline_ms = Math.max(1, Math.round(d));
  if (t !== null) budget.target_fvu = t;
  if (tt !== null) budget.token_target_fvu = tt;
  if (g !== null) budget.max_granularity = g;
  const body = { model_id: modelId, budget, top: 8 };
  if (kLadderOf(modelId).length) {
    const k = maxK();
    if (k !== null && k <= modelOf(modelId).k) budget.max_k = k;
    if ($("axis-k").checked) Object.assign(body, { axis: "k", k_ladder: kLadderOf(modelId) });
  }
  return body;
}

// --- streaming --------------------------------------------------------------------------------

async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: data ? JSON.parse(data) : null };
    }
  }
}

function colorOf(modelId) {
  const i = state.overview ? state.overview.checkpoints.findIndex((ck) => ck.name === modelId.split("@")[0]) : 0;
  return PALETTE[Math.max(0, i) % PALETTE.length];
}

function streamPanel(modelId) {
  const info = state.models.find((m) => m.model_id === modelId);
  const color = colorOf(modelId);
  const stat = (name, label) => el("div", { class: "stat" }, el("span", {}, label), el("b", { class: name }, "–"));
  return el("div", { class: "panel stream", style: `--c:${color}`, dataset: { model: modelId, state: "starting", rungs: "0" } },
    el("div", { class: "panel-head" },
      el("h2", {}, el("span", { class: "swatch", style: `background:${color}` }), modelId),
      el("span", { class: "badge" }, info ? `${info.architecture} · M=${info.d_sae} · k=${info.k}` : "unknown model")),
    el("div", { class: "ladder" }),
    el("div", { class: "stats" }, stat("rungcount", "rung"), stat("g", "G"), stat("k", "k′"), stat("l0", "mean L0"),
      stat("fvu", "FVU"), stat("refining", "refining"), stat("ms", "elapsed ms"), stat("stop", "stopped")),
    el("div", { class: "note trunc", hidden: "" }),
    el("div", { class: "note timing muted small", hidden: "" }),
    el("div", { class: "strip", hidden: "" }),
    el("div", { class: "tokens" }, el("span", { class: "muted" }, "running the language model…")));
}

function renderHeader(panel, h) {
  // the model's whole ladder (G, or k′ on a k′ climb), so a budget that stops early leaves the
  // upper rungs visibly unreached
  panel.dataset.axis = h.axis;
  const [full, got] = h.axis === "k" ? [kLadderOf(panel.dataset.model), h.k_ladder] : [ladderOf(panel.dataset.model), h.ladder];
  const ladder = full.length && (!got.length || full[full.length - 1] >= got[got.length - 1]) ? full : got;
  panel.dataset.ladderSize = ladder.length;
  panel.querySelector(".ladder").replaceChildren(...ladder.map((v) =>
    el("span", { class: "rung", dataset: { v } }, h.axis === "k" ? `k′ ${v}` : v)));
  panel._lm = h.lm_ms;
  const trunc = panel.querySelector(".trunc");
  trunc.hidden = !h.truncated;
  trunc.textContent = h.truncated ? `The text was cut to its first ${h.n_tokens} of ${h.text_tokens} tokens (the server's limit).` : "";
  const toks = (h.tokens || Array.from({ length: h.n_tokens }, (_, i) => `#${i}`));
  panel._toks = toks;
  panel._l0 = toks.map(() => 0);
  panel._feats = toks.map(() => new Map());
  panel.querySelector(".tokens").replaceChildren(...toks.map((t, i) =>
    el("div", { class: "tok", dataset: { i } },
      el("div", { class: "tok-text", title: JSON.stringify(t) }, showToken(t)),
      el("div", { class: "l0bar" }, el("span")),
      el("div", { class: "feats" }))));
}

function renderRung(panel, r, modelId) {
  const n = +panel.dataset.rungs + 1;
  panel.dataset.rungs = n;
  panel.dataset.g = r.g;
  const size = +panel.dataset.ladderSize || n;
  panel.querySelector(".rungcount").textContent = `${n} / ${size}`;
  panel.dataset.k = r.k || "";
  panel.querySelector(".g").textContent = r.g;
  panel.querySelector(".k").textContent = r.k || "all";
  panel.querySelector(".l0").textContent = fmt(r.mean_l0, 2);
  panel.querySelector(".fvu").textContent = fmt(r.fvu, 4);
  panel.querySelector(".refining").textContent = r.refining === null ? "–" : `${r.refining} / ${panel._toks.length}`;
  panel.querySelector(".ms").textContent = fmt(r.elapsed_ms, 1);
  const at = panel.dataset.axis === "k" ? r.k : r.g;
  panel.querySelectorAll(".ladder .rung").forEach((c) => {
    if (+c.dataset.v <= at) c.classList.add("reached");
  });
  if (r.fvu !== null && panel.dataset.axis !== "k") (state.live[modelId] = state.live[modelId] || []).push({ x: r.g, y: r.fvu });
  // with a per-token target a rung computes only the tokens still refining (r.tokens), one l0 row each
  const rows = r.tokens.length ? r.tokens : panel._toks.map((_, i) => i);
  rows.forEach((n, j) => { panel._l0[n] = r.l0[j] || 0; });
  const computed = new Set(rows);
  const maxL0 = Math.max(1, ...panel._l0);
  panel.querySelectorAll(".tok").forEach((tokEl, i) => {
    tokEl.classList.toggle("settled", !computed.has(i));
    const feats = panel._feats[i];
    const fresh = new Set();
    for (const [lat, v] of r.features[i] || []) { feats.set(lat, v); fresh.add(lat); }
    const top = [...feats.entries()].sort((a, b) => b[1] - a[1]);
    tokEl.querySelector(".feats").replaceChildren(...top.slice(0, FEATS_SHOWN).map(([lat, v]) =>
      el("button", {
        class: "feat" + (fresh.has(lat) ? " new" : ""), dataset: { latent: lat },
        style: `--h:${hue(lat)}`, title: `latent ${lat}: ${v.toFixed(3)} (first active at G=${r.g} or below)`,
        onclick: () => openCard(modelId, lat),
      }, el("span", { class: "idx" }, lat), el("span", { class: "lbl" }, labelOf(modelId, lat)),
      el("span", { class: "val" }, v.toFixed(2)))));
    tokEl.title = top.length ? top.map(([l, v]) => `${l}: ${v.toFixed(3)}`).join("\n") : "no active latent yet";
    tokEl.querySelector(".l0bar span").style.width = `${(100 * panel._l0[i]) / maxL0}%`;
  });
}

function renderStrip(panel, e) {
  // per-token target: each token coloured by the G (or k′) it stopped at, from green (first rung) to red
  if (!e.token_final_g.length) return;
  const k = panel.dataset.axis === "k";
  const finals = k ? e.token_final_k : e.token_final_g;
  const steps = [...panel.querySelectorAll(".ladder .rung")].map((c) => +c.dataset.v);
  const shade = (v) => `--t:${steps.length > 1 ? Math.max(0, steps.indexOf(v)) / (steps.length - 1) : 0}`;
  const met = e.token_met.filter(Boolean).length;
  const strip = panel.querySelector(".strip");
  strip.hidden = false;
  strip.replaceChildren(
    el("div", { class: "strip-head muted small" },
      `Each token's final ${k ? "k′" : "G"} under the per-token target (${met} / ${finals.length} met it):`,
      ...steps.map((v) => el("span", { class: "key", style: shade(v) }, v))),
    el("div", { class: "strip-text" }, ...panel._toks.map((t, i) => el("span", {
      class: "stok" + (e.token_met[i] ? "" : " unmet"), style: shade(finals[i]),
      dataset: { final: finals[i], met: e.token_met[i] ? "1" : "0" },
      title: `${JSON.stringify(t)}: final ${k ? "k′" : "G"} ${finals[i]}${e.token_met[i] ? "" : " (target not met)"}`,
    }, showToken(t)))));
}

function renderEnd(panel, e) {
  panel.dataset.state = "done";
  panel.dataset.stop = e.stop_reason;
  const size = +panel.dataset.ladderSize || e.rungs;
  const stop = panel.querySelector(".stop");
  stop.textContent = STOP_TEXT[e.stop_reason] || e.stop_reason.replace(/_/g, " ");
  stop.className = "stop " + (e.rungs >= size ? "full" : "early");
  panel.querySelector(".ms").textContent = fmt(e.elapsed_ms, 1);
  // the deadline counts the language model too: show its time and the SAE's apart
  const timing = panel.querySelector(".timing");
  if (panel._lm !== null && panel._lm !== undefined) {
    timing.hidden = false;
    timing.textContent = `language model ${fmt(panel._lm, 1)} ms · SAE ${fmt(Math.max(0, e.elapsed_ms - panel._lm), 1)} ms`;
    if (e.stop_reason === "deadline" && !e.rungs) {
      stop.textContent = `deadline shorter than the language model alone needs (${fmt(panel._lm, 0)} ms)`;
    }
  }
  if (!e.rungs) panel.querySelector(".rungcount").textContent = `0 / ${size}`;
  // a target the stream did not meet is said, never shown as a green finish
  const budget = (panel._request || {}).budget || {};
  const unmet = e.token_met.filter((m) => !m).length;
  let missed = "";
  if (budget.target_fvu !== undefined && e.stop_reason !== "target_fvu") {
    missed = `target FVU ${budget.target_fvu} not met (FVU ${fmt(e.final_fvu, 4)})`;
  } else if (unmet) {
    missed = `${unmet} token${unmet > 1 ? "s" : ""} never met the per-token target`;
  }
  panel.dataset.missed = missed ? "1" : "0";
  if (missed) {
    stop.textContent = `${stop.textContent}: ${missed}`;
    stop.className = "stop missed";
  }
  renderStrip(panel, e);
}

async function streamOne(modelId, panel, text, signal) {
  let resp;
  try {
    resp = await api("/api/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal,
      body: JSON.stringify({ ...(panel._request = request(modelId)), text }),
    });
  } catch (e) {
    if (signal.aborted) return;
    throw new Error(unreachable(e));
  }
  if (!resp.ok) throw await failure(resp, "/api/stream");
  state.live[modelId] = [];
  panel.dataset.state = "streaming";
  try {
    for await (const ev of sseEvents(resp)) {
      if (ev.event === "header") renderHeader(panel, ev.data);
      else if (ev.event === "rung") renderRung(panel, ev.data, modelId);
      else if (ev.event === "end") renderEnd(panel, ev.data);
      else if (ev.event === "error") throw new Error(`${modelId}: ${ev.data.message}`);
    }
  } catch (e) {
    if (signal.aborted) return;
    if (e instanceof TypeError) throw new Error(unreachable(e));
    throw e;
  }
  if (panel.dataset.state === "streaming") throw new Error(`${modelId}: the stream ended without an end message`);
  await fillLabels(panel, modelId);
}

async function run() {
  clearError();
  const text = $("text").value;
  if (!text.trim()) { showError("The text is empty: type a sentence to encode."); return; }
  const max = state.limits.max_text_chars;
  if (max && text.length > max) {
    showError(`The text is too long: ${text.length} characters, the server accepts at most ${max}.`);
    return;
  }
  if (state.controller) state.controller.abort();
  const ctl = (state.controller = new AbortController());
  const ids = selectedModels();
  const panels = ids.map((id) => streamPanel(id));
  $("streams").replaceChildren(...panels);
  $("streams").classList.toggle("two", ids.length > 1);
  document.body.dataset.running = "1";
  const results = await Promise.allSettled(ids.map((id, i) => streamOne(id, panels[i], text, ctl.signal)));
  if (ctl !== state.controller) return;
  const denied = results.find((r) => r.status === "rejected" && r.reason instanceof AuthError);
  if (denied) askToken(denied.reason.message);
  const errors = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  results.forEach((r, i) => {
    if (r.status === "rejected") {
      panels[i].dataset.state = "error";
      panels[i].querySelector(".tokens").replaceChildren(el("span", { class: "muted" }, "no result"));
    }
  });
  if (errors.length) showError([...new Set(errors)].join("\n"));
  delete document.body.dataset.running;
  drawCurves();
}

// --- chart ------------------------------------------------------------------------------------

const METRICS = { fvu: "FVU", ce_recovered: "CE loss recovered", l0: "L0" };

function orderingLabel(arch, o) {
  if (o === "none") return arch === "matryoshka" ? "Matryoshka (trained order)" : "unsorted";
  return { mean_sq: "sorted by E[a²]", freq: "sorted by frequency" }[o] || o;
}

function drawCurves() {
  const ov = state.overview;
  if (!ov) return;
  const metric = $("chart-metric").value || "fvu";
  const dashes = { none: "", mean_sq: "6 3", freq: "2 3" };
  const series = [];
  ov.checkpoints.forEach((ck, i) => {
    for (const [o, rungs] of Object.entries(ck.curves)) {
      const points = rungs.filter((r) => r[metric] !== null && r[metric] !== undefined).map((r) => ({ x: r.g, y: r[metric] }));
      if (points.length) {
        series.push({ label: `${ck.name} · ${orderingLabel(ck.architecture, o)}`, color: PALETTE[i % PALETTE.length],
          dash: o in dashes ? dashes[o] : "4 2 1 2", points });
      }
    }
  });
  const markers = [];
  if (metric === "fvu") {
    for (const [id, pts] of Object.entries(state.live)) {
      for (const p of pts) markers.push({ ...p, color: colorOf(id), label: `${id} (your text)` });
    }
  }
  const drawn = window.progsaeChart.drawChart($("chart"), series, {
    yLabel: METRICS[metric], yMin: metric === "l0" ? 0 : undefined, markers,
  });
  $("chart-empty").hidden = drawn;
  $("chart").dataset.series = series.length;
  const NS = "http://www.w3.org/2000/svg";
  $("chart-legend").replaceChildren(...series.map((s) => {
    const svg = document.createElementNS(NS, "svg"), line = document.createElementNS(NS, "line");
    Object.entries({ width: 26, height: 8 }).forEach(([k, v]) => svg.setAttribute(k, v));
    Object.entries({ x1: 0, x2: 26, y1: 4, y2: 4, stroke: s.color, "stroke-width": 2.5,
      "stroke-dasharray": s.dash }).forEach(([k, v]) => line.setAttribute(k, v));
    svg.append(line);
    return el("span", { class: "key" }, svg, s.label);
  }));
  if (markers.length) {
    $("chart-legend").append(el("span", { class: "key" }, el("span", { class: "marker-key" }), "your text (live stream)"));
  }
}

function fillMetrics() {
  const have = new Set(state.overview.checkpoints.flatMap((ck) =>
    Object.values(ck.curves).flatMap((rs) => rs.flatMap((r) => Object.keys(METRICS).filter((k) => r[k] !== null && r[k] !== undefined)))));
  const keys = Object.keys(METRICS).filter((k) => have.has(k));
  $("chart-metric").replaceChildren(...(keys.length ? keys : ["fvu"]).map((k) => el("option", { value: k }, METRICS[k])));
}

// --- start ------------------------------------------------------------------------------------

async function init() {
  try {
    const [models, overview] = await Promise.all([getJSON("/api/models"), getJSON("/api/overview")]);
    state.models = models.models;
    state.overview = overview;
    state.limits = overview.limits || {};
    $("server-status").textContent = `● connected · ${state.models.length} served models`;
    $("server-status").classList.add("ok");
  } catch (e) {
    if (e instanceof AuthError) {
      $("server-status").textContent = "● token needed";
      askToken(e.message);
      return;
    }
    $("server-status").textContent = "● offline";
    $("server-status").classList.add("down");
    showError(e.message);
    return;
  }
  $("server-status").classList.remove("down");
  fillModels();
  fillMetrics();
  drawCurves();
  document.body.dataset.ready = "1";
  if (new URLSearchParams(location.search).get("run") === "1") run();
}

$("run").addEventListener("click", run);
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
$("side-by-side").addEventListener("change", () => { $("model-b").disabled = !$("side-by-side").checked; updateLadder(); });
$("model-a").addEventListener("change", updateLadder);
$("model-b").addEventListener("change", updateLadder);
$("max-g").addEventListener("input", showMaxG);
$("max-k").addEventListener("input", showMaxG);
for (const id of ["max-g", "max-k", "axis-k"]) {
  $(id).addEventListener("change", () => { if ($("streams").children.length) run(); });
}
$("chart-metric").addEventListener("change", drawCurves);
$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("auth-token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("auth-token").value = "";
  $("auth").hidden = true;
  init();
});
$("card-close").addEventListener("click", () => { $("card").hidden = true; });
init();
