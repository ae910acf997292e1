// Small SVG line charts for the optdiag tab: no library, one function. docs/tensorboard-tab.md shows them.

const SVG = "http://www.w3.org/2000/svg";
const M = { left: 58, right: 12, top: 22, bottom: 30 };

// A number as the server sent it: a number, or "nan" / "inf" / "-inf" (strict JSON has no NaN).
export function num(value) {
  if (typeof value === "number") return value;
  if (value === "inf") return Infinity;
  if (value === "-inf") return -Infinity;
  return NaN;
}

// Four significant digits, like Python's "{:.4g}" (the demo's and the console's format).
export function fmt(value) {
  const x = num(value);
  if (value === null || value === undefined) return "—";
  if (!Number.isFinite(x)) return String(value);
  if (x === 0) return "0";
  const exponent = Math.floor(Math.log10(Math.abs(x)));
  if (exponent < -4 || exponent >= 4) {
    const [mantissa, power] = x.toExponential(3).split("e");
    return `${String(Number(mantissa))}e${power[0]}${power.slice(1).padStart(2, "0")}`;
  }
  return String(Number(x.toPrecision(4)));
}

export function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let i = Math.ceil(lo / step); i * step <= hi + step * 1e-9; i++) ticks.push(Number((i * step).toPrecision(12)));
  return ticks;
}

// Ticks of a log axis spanning 10^lo .. 10^hi: the decades, with 2 and 5 between them when there are few.
function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of hi - lo < 2.5 ? [1, 2, 5] : [1]) {
      const t = m * 10 ** e;
      if (Math.log10(t) >= lo && Math.log10(t) <= hi) ticks.push(Number(t.toPrecision(12)));
    }
  }
  return ticks;
}

// lineChart({title, series: [{name, points: [[step, value]], cls, dots}], markers: [{step, cls, label, title,
// data, row}], hlines: [{value, cls, label}], logY, zero, xRange, width, height, cls, data}) -> <figure> with an
// <svg>. zero: the linear y axis starts at 0, so that heights compare as ratios (lambda_max against its threshold).
// width and height are the drawing's units: text keeps its size when a wider chart gets a wider viewBox.
// Points with a non-finite value are left out (the line breaks there); logY uses only positive values.
export function lineChart(spec) {
  const W = spec.width || 640, H = spec.height || 220;
  const series = spec.series.map((s) => ({ ...s, points: s.points.map(([x, y]) => [x, num(y)]) }));
  const finite = (y) => Number.isFinite(y) && (!spec.logY || y > 0);
  const ys = series.flatMap((s) => s.points.map((p) => p[1])).concat((spec.hlines || []).map((h) => num(h.value)))
    .filter(finite);
  if (spec.zero && !spec.logY && ys.length) ys.push(0);
  const xs = series.flatMap((s) => s.points.map((p) => p[0])).concat((spec.markers || []).map((m) => m.step));
  const figure = document.createElement("figure");
  figure.className = "chart " + (spec.cls || "");
  for (const [k, v] of Object.entries(spec.data || {})) figure.dataset[k] = v;
  const caption = document.createElement("figcaption");
  caption.textContent = spec.title;
  figure.appendChild(caption);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title });
  figure.appendChild(root);
  if (!ys.length) {
    root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return figure;
  }
  const [x0, x1] = spec.xRange || [Math.min(...xs), Math.max(...xs)];
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const tr = spec.logY ? Math.log10 : (v) => v;
  if (spec.logY) { y0 = tr(y0); y1 = tr(y1); }
  const pad = (y1 - y0) * 0.06 || Math.abs(y1) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const px = (x) => M.left + ((x - x0) / (x1 - x0 || 1)) * (W - M.left - M.right);
  const py = (y) => H - M.bottom - ((tr(y) - y0) / (y1 - y0)) * (H - M.top - M.bottom);
  const axes = svg("g", { class: "axes" });
  root.appendChild(axes);
  for (const t of niceTicks(x0, x1, 6)) {
    axes.appendChild(svg("line", { x1: px(t), x2: px(t), y1: M.top, y2: H - M.bottom, class: "grid" }));
    axes.appendChild(svg("text", { x: px(t), y: H - M.bottom + 14, "text-anchor": "middle" }, fmt(t)));
  }
  const yTicks = spec.logY ? logTicks(y0, y1) : niceTicks(y0, y1, 5);
  for (const t of yTicks) {
    axes.appendChild(svg("line", { x1: M.left, x2: W - M.right, y1: py(t), y2: py(t), class: "grid" }));
    axes.appendChild(svg("text", { x: M.left - 5, y: py(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  axes.appendChild(svg("text", { x: W - M.right, y: H - 4, "text-anchor": "end", class: "unit" }, "step"));
  for (const h of spec.hlines || []) {
    const v = num(h.value);
    if (!finite(v)) continue;
    root.appendChild(svg("line", { x1: M.left, x2: W - M.right, y1: py(v), y2: py(v), class: `hline ${h.cls || ""}` }));
    root.appendChild(svg("text", { x: W - M.right - 4, y: py(v) - 4, "text-anchor": "end", class: "hlabel" }, h.label));
  }
  const legend = svg("g", { class: "legend" });
  let lx = M.left;
  for (const s of series) {
    const line = svg("g", { class: `series ${s.cls || ""}`, "data-name": s.name });
    let d = "", pen = "M";
    for (const [x, y] of s.points) {
      if (!finite(y)) { pen = "M"; continue; }
      d += `${pen}${px(x).toFixed(1)},${py(y).toFixed(1)}`;
      pen = "L";
    }
    if (d) line.appendChild(svg("path", { d }));
    if (s.dots) {
      for (const [x, y] of s.points.filter((p) => finite(p[1]))) {
        const dot = svg("circle", { cx: px(x), cy: py(y), r: 3 });
        dot.appendChild(svg("title", {}, `${s.name} = ${fmt(y)} at step ${x}`));
        line.appendChild(dot);
      }
    }
    root.appendChild(line);
    legend.appendChild(svg("rect", { x: lx, y: 6, width: 10, height: 10, class: `swatch ${s.cls || ""}` }));
    legend.appendChild(svg("text", { x: lx + 14, y: 15 }, s.name));
    lx += 24 + 6.5 * s.name.length;
  }
  root.appendChild(legend);
  for (const m of spec.markers || []) {
    const g = svg("g", { class: `marker ${m.cls || ""}` });
    for (const [k, v] of Object.entries(m.data || {})) g.setAttribute(`data-${k}`, v);
    g.appendChild(svg("line", { x1: px(m.step), x2: px(m.step), y1: M.top, y2: H - M.bottom }));
    if (m.label) {
      const left = px(m.step) > W - 150; // a label near the right edge goes on the marker's left, not off the chart
      g.appendChild(svg("text", { x: px(m.step) + (left ? -3 : 3), y: M.top + 10 + (m.row || 0) * 11,
        "text-anchor": left ? "end" : "start" }, m.label));
    }
    if (m.title) g.appendChild(svg("title", {}, m.title));
    root.appendChild(g);
  }
  return figure;
}
