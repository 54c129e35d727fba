// A small SVG line chart (no library): metric vs granularity G on a log2 x axis.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, n) {
  const span = hi - lo || 1;
  const step0 = span / n;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

// series: [{label, color, dash, points: [{x, y}]}]; opts: {yLabel, yMin, yMax, markers: [{x, y, color}]}
function drawChart(svg, series, opts) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 560, H = 300, m = { l: 52, r: 14, t: 12, b: 40 };
  const pts = series.flatMap((s) => s.points).concat(opts.markers || []);
  if (!pts.length) return false;
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const x0 = Math.log2(Math.min(...xs)), x1 = Math.log2(Math.max(...xs));
  let y0 = opts.yMin !== undefined ? Math.min(opts.yMin, ...ys) : Math.min(...ys);
  let y1 = opts.yMax !== undefined ? Math.max(opts.yMax, ...ys) : Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (v) => m.l + (x1 === x0 ? 0.5 : (Math.log2(v) - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v) => H - m.b - ((v - y0) / (y1 - y0)) * (H - m.t - m.b);
  const axes = svgEl("g", { class: "axes" });
  for (const t of niceTicks(y0, y1, 5)) {
    axes.appendChild(svgEl("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid" }));
    axes.appendChild(svgEl("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end" }, +t.toFixed(3)));
  }
  const gs = [...new Set(xs)].sort((a, b) => a - b);
  const step = Math.max(1, Math.ceil(gs.length / 9));
  gs.forEach((g, i) => {
    if (i % step) return;
    axes.appendChild(svgEl("line", { x1: X(g), x2: X(g), y1: H - m.b, y2: H - m.b + 4, class: "tick" }));
    axes.appendChild(svgEl("text", { x: X(g), y: H - m.b + 16, "text-anchor": "middle" }, g));
  });
  axes.appendChild(svgEl("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
  axes.appendChild(svgEl("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }));
  axes.appendChild(svgEl("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle", class: "label" },
    "granularity G (latents, log scale)"));
  axes.appendChild(svgEl("text", { x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle", class: "label",
    transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})` }, opts.yLabel));
  svg.appendChild(axes);
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" ");
    const g = svgEl("g", { class: "series" });
    g.appendChild(svgEl("path", { d, stroke: s.color, "stroke-dasharray": s.dash || "", class: "line" }));
    for (const p of s.points) {
      const c = svgEl("circle", { cx: X(p.x), cy: Y(p.y), r: 3, fill: s.color });
      c.appendChild(svgEl("title", {}, `${s.label}: G=${p.x}, ${opts.yLabel}=${p.y.toFixed(4)}`));
      g.appendChild(c);
    }
    svg.appendChild(g);
  }
  for (const p of opts.markers || []) {
    const c = svgEl("rect", { x: X(p.x) - 5, y: Y(p.y) - 5, width: 10, height: 10, fill: "none",
      stroke: p.color, "stroke-width": 2, class: "marker" });
    c.appendChild(svgEl("title", {}, `${p.label}: G=${p.x}, FVU on your text=${p.y.toFixed(4)}`));
    svg.appendChild(c);
  }
  return true;
}

window.progsaeChart = { drawChart };
