// progsae dashboard: text -> tokens -> each token's features, refined rung by rung (POST /api/stream, SSE).
// api.js talks to the server (token, errors), card.js shows feature cards and chip labels, tokens.js
// how a text's tokens read.
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
  token_target_kl: "every token met its KL target",
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
  fitSlider($("max-g"), [...new Set(selectedModels().flatMap(ladderOf))].sort((a, b) => a - b));
  // k′ (the largest codes kept per token) only for models trained for it (ModelInfo.k_ladder)
  const ks = [...new Set(selectedModels().flatMap(kLadderOf))].sort((a, b) => a - b);
  $("k-controls").hidden = !ks.length;
  fitSlider($("max-k"), ks);
  showMaxG();
}

function fitSlider(slider, vs) {
  // positions 1..n over a ladder of n; a slider at the top stays there. With one rung or none (an
  // unknown model) there is nothing to choose: disabled, its thumb at the right, where "full" sits.
  const atTop = +slider.value >= +slider.max;
  slider.dataset.ladder = JSON.stringify(vs);
  slider.disabled = vs.length <= 1;
  slider.min = vs.length <= 1 ? 0 : 1;
  slider.max = Math.max(1, vs.length);
  if (atTop || slider.disabled || +slider.value > vs.length) slider.value = slider.max;
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
  return klRequest(body);
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

async function streamOne(modelIds, panels, text, signal) {
  // one request for all the panels: with several models the server runs the language model once for
  // them all (also_models) and tags each event with its panel's index (`stream`)
  const body = { ...(panels[0]._request = request(modelIds[0])), text };
  panels.slice(1).forEach((p, i) => { p._request = request(modelIds[i + 1]); });
  if (modelIds.length > 1) body.also_models = modelIds.slice(1);
  let resp;
  try {
    resp = await api("/api/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal, body: JSON.stringify(body),
    });
  } catch (e) {
    if (signal.aborted) return;
    throw new Error(unreachable(e));
  }
  if (!resp.ok) throw await failure(resp, "/api/stream");
  modelIds.forEach((id, i) => { state.live[id] = []; panels[i].dataset.state = "streaming"; });
  const name = modelIds.join(" + ");
  try {
    for await (const ev of sseEvents(resp)) {
      const i = (ev.data && ev.data.stream) || 0;
      if (ev.event === "header") renderHeader(panels[i], ev.data);
      else if (ev.event === "rung") renderRung(panels[i], ev.data, modelIds[i]);
      else if (ev.event === "end") renderEnd(panels[i], ev.data);
      else if (ev.event === "error") throw new Error(`${name}: ${ev.data.message}`);
    }
  } catch (e) {
    if (signal.aborted) return;
    if (e instanceof TypeError) throw new Error(unreachable(e));
    throw e;
  }
  if (panels.some((p) => p.dataset.state === "streaming")) throw new Error(`${name}: the stream ended without an end message`);
  await Promise.all(modelIds.map((id, i) => fillLabels(panels[i], id)));
}

function oneAsk(ids) {
  // the panels share one request (one language-model pass) when their models run text on the same
  // language model and the panels ask the same of them
  const lms = ids.map((id) => { const m = modelOf(id); return m && m.text_available ? m.language_model : null; });
  const asks = ids.map((id) => JSON.stringify({ ...request(id), model_id: "" }));
  return lms.every((lm) => lm && lm === lms[0]) && asks.every((a) => a === asks[0]);
}

function clearResults() {
  // a new run, or an error, leaves nothing of the previous run: panels and chart points
  $("streams").replaceChildren();
  state.live = {};
  drawCurves();
}

async function run() {
  clearError();
  clearResults();
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
  const results = oneAsk(ids)
    ? (await Promise.allSettled([streamOne(ids, panels, text, ctl.signal)])).flatMap((r) => ids.map(() => r))
    : await Promise.allSettled(ids.map((id, i) => streamOne([id], [panels[i]], text, ctl.signal)));
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
