// progsae dashboard: how a text's tokens read. A whitespace-only token gets a visible mark per
// character; byte-level tokens that spell one character together (an emoji, a CJK character: each
// alone decodes to "�") sit in one cell under that character, each still its own token with its
// features, showing its bytes (the stream header's token_groups and token_bytes). Loaded before app.js.
"use strict";

const WS_MARKS = { " ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍" };

function isBlank(t) { return t.length > 0 && t.trim() === ""; }

function showToken(t) {
  if (isBlank(t)) return [...t].map((c) => WS_MARKS[c] || "·").join("");
  return t.replace(/\n/g, "⏎").replace(/ /g, "\u00a0") || "∅";
}

function tokenLayout(h) {
  // runs [[first, end, text]] and, per token, the run it belongs to and its bytes (hex, or "")
  const runs = h.token_groups || [], bytes = h.token_bytes || [];
  const run = new Map();
  runs.forEach(([a, b], g) => { for (let i = a; i < b; i++) run.set(i, g); });
  return { runs, bytes, run };
}

function tokenText(layout, t, i) {
  // what a token's own cell says: its bytes when it does not decode alone, else the token
  return layout.bytes[i] || showToken(t);
}

// One element per token, in order, from cell(t, i); each run wrapped by wrap(text, first, end, cells).
function tokenCells(toks, layout, cell, wrap) {
  const out = [];
  for (let i = 0; i < toks.length; i++) {
    const g = layout.run.get(i);
    if (g === undefined) { out.push(cell(toks[i], i)); continue; }
    const [a, b, text] = layout.runs[g];
    const cells = [];
    for (let j = a; j < Math.min(b, toks.length); j++) cells.push(cell(toks[j], j));
    out.push(wrap(text, a, b, cells));
    i = b - 1;
  }
  return out;
}

function groupCell(text, a, b, cells) {
  return el("div", { class: "tok-group", title: `${JSON.stringify(text)}: ${b - a} byte-level tokens`, dataset: { first: a, end: b } },
    el("div", { class: "group-text" }, text), el("div", { class: "group-toks" }, ...cells));
}

function stripGroup(text, a, b, cells) {
  // in the per-token strip a run reads as its character, its later tokens as thin continuations
  cells.forEach((c, j) => { c.textContent = j ? "+" : text; if (j) c.classList.add("cont"); });
  return el("span", { class: "sgroup", title: `${JSON.stringify(text)}: ${b - a} byte-level tokens` }, ...cells);
}
