// progsae dashboard: a latent's feature card, and the short labels its chips carry (both from
// the checkpoint's feature cards; a model without cards keeps bare indices). Loaded before app.js.
"use strict";

function labelOf(modelId, latent) {
  const m = state.labels[modelId];
  return (m && m.get(latent)) || "";
}

async function fillLabels(panel, modelId) {
  const have = state.labels[modelId] = state.labels[modelId] || new Map();
  const want = [...new Set(panel._feats.flatMap((f) => [...f.keys()]))].filter((l) => !have.has(l));
  if (want.length) {
    try {
      const got = await getJSON(`/api/labels?model_id=${encodeURIComponent(modelId)}&latents=${want.slice(0, 1024).join(",")}`);
      for (const [l, text] of Object.entries(got.labels)) have.set(+l, text);
    } catch (e) {
      return;  // no cards for this model: chips keep their indices
    }
  }
  panel.querySelectorAll(".feat").forEach((b) => {
    const lbl = b.querySelector(".lbl");
    lbl.textContent = lbl.title = labelOf(modelId, +b.dataset.latent);  // the whole label, where the chip cuts it
  });
  panel.dataset.labels = "1";
}

async function openCard(modelId, latent) {
  const card = $("card"), body = $("card-body");
  card.hidden = false;
  card.dataset.state = "loading";
  $("card-title").textContent = `Latent ${latent}`;
  body.replaceChildren(el("p", { class: "muted" }, "loading…"));
  let c;
  try {
    c = await getJSON(`/api/feature?model_id=${encodeURIComponent(modelId)}&latent=${latent}`);
  } catch (e) {
    card.dataset.state = "error";
    body.replaceChildren(el("p", { class: "error inline" }, e.message));
    return;
  }
  card.dataset.state = "ready";
  card.dataset.latent = latent;
  $("card-title").replaceChildren(`Latent ${c.served_index}`, c.label ? el("span", { class: "card-label" }, c.label) : "",
    el("span", { class: "badge" }, c.model_id),
    c.ordering !== "none" ? el("span", { class: "muted small" }, ` trained index ${c.latent}`) : "");
  const stats = el("div", { class: "stats" },
    ...[["density", pct(c.density)], ["mean act", fmt(c.mean)], ["max act", fmt(c.max)],
      ["corpus tokens", (c.tokens || 0).toLocaleString()]].map(([k, v]) =>
      el("div", { class: "stat" }, el("span", {}, k), el("b", {}, v))));
  const contexts = c.contexts.length ? c.contexts.map((ctx) => {
    const peak = Math.max(1e-9, ...ctx.acts);
    return el("div", { class: "ctx" }, el("span", { class: "ctx-val" }, ctx.value.toFixed(2)),
      el("span", { class: "ctx-text" }, ...ctx.tokens.map((t, j) => el("span", {
        class: "ctok" + (j === ctx.peak ? " peak" : ""), title: `${ctx.acts[j].toFixed(3)}`,
        style: `--a:${Math.max(0, ctx.acts[j]) / peak}`,
      }, t.replace(/\n/g, "⏎ ")))));
  }) : [el("p", { class: "muted" }, "never fired on the corpus sample")];
  const promoted = c.promoted.length
    ? el("div", { class: "promoted" }, ...c.promoted.map((p) =>
      el("span", { class: "ptok", title: `logit ${p.logit}` }, showToken(p.token))))
    : el("p", { class: "muted" }, "no logit lens was computed for these cards");
  body.replaceChildren(
    c.stale ? el("p", { class: "error inline" }, "These cards predate the current weights: rerun progsae features.") : "",
    stats, el("h3", {}, "Top activating contexts"), el("div", { class: "contexts" }, ...contexts),
    el("h3", {}, "Promoted output tokens (logit lens)"), promoted);
  card.scrollIntoView({ behavior: "smooth", block: "nearest" });
}
