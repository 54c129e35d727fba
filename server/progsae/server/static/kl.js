// progsae dashboard: what each rung does to the language model (issue 21). With "show KL" (or a KL
// target) a text stream asks for kl and predictions: each rung carries, per computed token, the KL of
// the next-token distribution from the clean one, top-1 agreement and the top predictions; the first
// rung the clean predictions. Each token shows its rung's prediction beside the clean one, a strip
// colours tokens by their latest KL, and the end says how many met the KL target. Loaded after
// panel.js, before app.js (which calls klRequest, klHeader, klRung, klEnd).
"use strict";

const KL_PREDICTIONS = 3;

function klRequest(body) {
  // the KL controls into a POST /api/stream body: a target implies kl
  const t = number("token-target-kl");
  if (t !== null) body.budget.token_target_kl = t;
  if ($("show-kl").checked || t !== null) Object.assign(body, { kl: true, predictions: KL_PREDICTIONS });
  return body;
}

function klShade(kl) {
  // 0 → green, ≥ 1 nat → red (log scale below it: 0.01 reads apart from 0.3)
  const t = kl === null || kl === undefined ? 1 : Math.min(1, Math.max(0, (Math.log10(kl + 1e-4) + 3) / 3));
  return `--t:${t.toFixed(3)}`;
}

function predText(p) { return p && p.length ? `${JSON.stringify(p[0][0])} ${fmt(p[0][1], 2)}` : "–"; }

function klHeader(panel, h) {
  const on = !!(panel._request && panel._request.kl);
  panel.dataset.kl = on ? "1" : "0";
  if (!on) return;
  const n = panel._toks.length;
  panel._kl = Array(n).fill(null);
  panel._pred = Array(n).fill(null);
  panel._clean = Array(n).fill(null);
  panel._top1 = Array(n).fill(null);
  panel._klg = Array(n).fill(null);
  let strip = panel.querySelector(".klstrip");
  if (!strip) {
    strip = el("div", { class: "klstrip" });
    panel.querySelector(".strip").before(strip);
  }
  strip.replaceChildren(el("div", { class: "strip-head muted small" }, "running the language model…"));
  panel.querySelectorAll(".tok").forEach((t) => t.append(el("div", { class: "pred small" })));
}

function klRung(panel, r) {
  if (panel.dataset.kl !== "1" || !r.kl) return;
  const rows = r.tokens.length ? r.tokens : panel._toks.map((_, i) => i);
  if (r.clean_predictions) r.clean_predictions.forEach((p, i) => { panel._clean[i] = p; });
  rows.forEach((i, j) => {
    panel._kl[i] = r.kl[j];
    panel._top1[i] = r.top1 ? r.top1[j] : null;
    panel._pred[i] = r.predictions ? r.predictions[j] : null;
    panel._klg[i] = r.g;
  });
  panel.querySelectorAll(".tok").forEach((tokEl) => {
    const i = +tokEl.dataset.i;
    const pred = tokEl.querySelector(".pred");
    if (!pred) return;
    const agree = panel._top1[i];
    pred.className = "pred small" + (agree === false ? " disagree" : "");
    pred.dataset.kl = panel._kl[i] === null ? "" : panel._kl[i];
    pred.title = (panel._pred[i] || []).map(([t, p]) => `rung ${JSON.stringify(t)} ${fmt(p, 3)}`).concat(
      (panel._clean[i] || []).map(([t, p]) => `clean ${JSON.stringify(t)} ${fmt(p, 3)}`)).join("\n");
    pred.replaceChildren(el("span", { class: "rung-pred" }, `rung: ${predText(panel._pred[i])}`), " | ",
      el("span", { class: "clean-pred" }, `clean: ${predText(panel._clean[i])}`),
      el("span", { class: "kl-val muted" }, ` KL ${fmt(panel._kl[i], 3)}`));
  });
  klStrip(panel, null);
}

function klStrip(panel, e) {
  const target = ((panel._request || {}).budget || {}).token_target_kl;
  const strip = panel.querySelector(".klstrip");
  const kl = e && e.token_kl ? e.token_kl : panel._kl;
  const met = target === undefined ? null : kl.filter((v) => v !== null && v <= target).length;
  const head = e
    ? (target === undefined ? `Each token's KL at its last rung (mean ${fmt(mean(kl), 4)} nats):`
      : `${met} / ${kl.length} tokens met the KL target ${target}:`)
    : `Each token's KL from the clean prediction at its latest rung (nats):`;
  strip.replaceChildren(
    el("div", { class: "strip-head muted small" }, head,
      ...[0.001, 0.01, 0.1, 1].map((v) => el("span", { class: "key", style: klShade(v) }, `${v}`))),
    el("div", { class: "strip-text" }, ...tokenCells(panel._toks, panel._layout, (t, i) => el("span", {
      class: "kltok" + (target !== undefined && e && !(kl[i] <= target) ? " unmet" : ""), style: klShade(kl[i]),
      dataset: { kl: kl[i] === null ? "" : kl[i], g: panel._klg[i] || "" },
      title: `${JSON.stringify(t)}: KL ${fmt(kl[i], 4)} at G=${panel._klg[i]}; predicts ${predText(panel._pred[i])}, clean ${predText(panel._clean[i])}`,
    }, tokenText(panel._layout, t, i)), stripGroup)));
  if (e && met !== null) panel.dataset.klMet = met;
}

function mean(xs) { const v = xs.filter((x) => x !== null); return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null; }

function klEnd(panel, e) {
  if (panel.dataset.kl !== "1") return;
  if (e.token_kl) klStrip(panel, e);
  // each stopped token says what the model predicts there
  panel.querySelectorAll(".tok").forEach((tokEl) => {
    const i = +tokEl.dataset.i;
    if (e.token_final_g && e.token_final_g.length) tokEl.dataset.finalG = e.token_final_g[i];
  });
}
