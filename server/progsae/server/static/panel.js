// progsae dashboard: one model's stream panel, rung by rung: its ladder and stats, each token with its
// latest features, the per-token strip and how it stopped (the SSE events of POST /api/stream, in
// order: renderHeader, renderRung per rung, renderEnd). Loaded after tokens.js, before app.js.
"use strict";

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
    el("div", { class: "note baseline muted small", hidden: "" }),
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
  showBaseline(panel, h);
  const toks = (h.tokens || Array.from({ length: h.n_tokens }, (_, i) => `#${i}`));
  panel._toks = toks;
  panel._l0 = toks.map(() => 0);
  panel._feats = toks.map(() => new Map());
  const layout = panel._layout = tokenLayout(h);
  panel.querySelector(".tokens").replaceChildren(...tokenCells(toks, layout, (t, i) =>
    el("div", { class: "tok" + (isBlank(t) ? " blank" : ""), dataset: { i } },
      el("div", { class: "tok-text" + (layout.bytes[i] ? " bytes" : ""), title: JSON.stringify(t) }, tokenText(layout, t, i)),
      el("div", { class: "l0bar" }, el("span")),
      el("div", { class: "feats" })), groupCell));
  klHeader(panel, h);
}

function showBaseline(panel, h) {
  // what FVU divides by: the checkpoint's reference (a text), or the tokens' own variance
  const note = panel.querySelector(".baseline");
  panel.dataset.fvuBaseline = h.fvu_baseline || "batch";
  note.hidden = !h.tokens;
  note.textContent = h.fvu_baseline === "checkpoint"
    ? `FVU is measured against the checkpoint's training variance (${fmt(h.fvu_reference_variance, 1)} per token), `
      + "so a short text scores like a long one."
    : "FVU is measured against this text's own variance: the checkpoint records no reference variance "
      + "(trained before it did), and for a few tokens that baseline is poor, so FVU can exceed 1.";
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
  klRung(panel, r);
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
    el("div", { class: "strip-text" }, ...tokenCells(panel._toks, panel._layout, (t, i) => el("span", {
      class: "stok" + (e.token_met[i] ? "" : " unmet"), style: shade(finals[i]),
      dataset: { final: finals[i], met: e.token_met[i] ? "1" : "0" },
      title: `${JSON.stringify(t)}: final ${k ? "k′" : "G"} ${finals[i]}${e.token_met[i] ? "" : " (target not met)"}`,
    }, tokenText(panel._layout, t, i)), stripGroup)));
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
    const which = budget.token_target_fvu === undefined && budget.token_target_kl !== undefined ? "KL" : "per-token";
    missed = `${unmet} token${unmet > 1 ? "s" : ""} never met the ${which} target`;
  }
  panel.dataset.missed = missed ? "1" : "0";
  if (missed) {
    stop.textContent = `${stop.textContent}: ${missed}`;
    stop.className = "stop missed";
  }
  renderStrip(panel, e);
  klEnd(panel, e);
}
