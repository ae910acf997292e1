// The optdiag tab. TensorBoard imports this module into the tab's frame and calls render(). Per run: the loss with
// the verdicts and spikes marked, the sharpness against the optimizer's stability threshold, lambda_min, and every
// verdict with its evidence, outcome and suggestions.
// The data comes from two JSON routes of the plugin (plugin.py); docs/tensorboard-tab.md explains every part.
import { fmt, lineChart, num } from "./chart.js";

const POLL_MS = 5000; // the tab follows a run while it trains
const MAX_DEFAULT_RUNS = 6; // runs shown at first; the others are one click away

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.text();
}

export async function render() {
  document.head.appendChild(el("link", { rel: "stylesheet", href: "style.css" }));
  const app = new App(document.body.appendChild(el("div", { id: "optdiag" })));
  await app.refresh();
  setInterval(() => app.refresh(), POLL_MS);
}

class App {
  constructor(root) {
    this.status = el("span", { class: "status" });
    this.picker = el("div", { class: "runs" });
    this.notice = el("p", { class: "notice" });
    this.sections = el("div", { class: "sections" });
    root.append(el("header", {}, el("h1", {}, "optdiag"), this.status), this.picker, this.notice, this.sections);
    this.runs = [];
    this.selected = new Map(); // run -> shown?
    // run=<name> parameters of the frame's address choose the runs shown first (a link to one run, the tests)
    this.asked = new URLSearchParams(window.location.search).getAll("run");
    this.texts = new Map(); // run -> last JSON text drawn (redraw only what changed)
  }

  async refresh() {
    try {
      const { runs } = JSON.parse(await getJSON("runs"));
      this.updatePicker(runs);
      const shown = runs.filter((r) => this.selected.get(r.run));
      for (const { run } of shown) await this.updateRun(run);
      for (const section of [...this.sections.children]) {
        if (!shown.some((r) => r.run === section.dataset.run)) {
          section.remove();
          this.texts.delete(section.dataset.run);
        }
      }
      this.notice.textContent = !runs.length
        ? "No runs in this logdir yet: start training with a TensorBoardLogger writing here."
        : !runs.some((r) => r.optdiag)
          ? "No run in this logdir has optdiag data. Add optdiag.OptDiag() to the Trainer's callbacks."
          : "";
      this.status.textContent = `updated ${new Date().toLocaleTimeString()}, every ${POLL_MS / 1000} s`;
    } catch (error) {
      this.status.textContent = `could not update (${error.message}); showing the last data`;
    }
  }

  updatePicker(runs) {
    const names = runs.map((r) => r.run).join("\n");
    if (names === this.runs.map((r) => r.run).join("\n")) return;
    let defaults = [...this.selected.values()].filter(Boolean).length;
    for (const r of runs) {
      if (!this.selected.has(r.run)) {
        const show = this.asked.length ? this.asked.includes(r.run) : r.optdiag && defaults < MAX_DEFAULT_RUNS;
        this.selected.set(r.run, show);
        defaults += this.selected.get(r.run) ? 1 : 0;
      }
    }
    this.runs = runs;
    this.picker.replaceChildren(el("span", {}, "runs:"), ...runs.map((r) => {
      const box = el("input", { type: "checkbox", checked: this.selected.get(r.run) });
      box.addEventListener("change", () => { this.selected.set(r.run, box.checked); this.refresh(); });
      return el("label", { class: r.optdiag ? "" : "no-data", title: r.optdiag ? "" : "no optdiag data" }, box, r.run);
    }));
  }

  async updateRun(run) {
    const text = await getJSON(`run?run=${encodeURIComponent(run)}`);
    if (this.texts.get(run) === text) return;
    this.texts.set(run, text);
    const section = runSection(JSON.parse(text));
    const old = [...this.sections.children].find((s) => s.dataset.run === run);
    if (old) old.replaceWith(section);
    else this.sections.append(section);
    const order = this.runs.map((r) => r.run);
    [...this.sections.children]
      .sort((a, b) => order.indexOf(a.dataset.run) - order.indexOf(b.dataset.run))
      .forEach((s) => this.sections.append(s));
  }
}

function last(points) {
  return points && points.length ? points[points.length - 1] : null;
}

function positiveSpan(values) {
  const v = values.map(num).filter(Number.isFinite);
  return v.length > 1 && v.every((x) => x > 0) ? Math.max(...v) / Math.min(...v) : 0;
}

function runSection(view) {
  const section = el("section", { class: "run", "data-run": view.run });
  const evidence = view.verdicts.length ? view.verdicts[view.verdicts.length - 1].evidence : {};
  const steps = last(view.loss && view.loss.points) || last(view.series.lambda_max);
  const meta = [
    evidence.optimizer ? `optimizer ${evidence.optimizer}` : null,
    steps ? `step ${steps[0]}` : null,
    view.has_optdiag ? `${view.verdicts.length} verdict${view.verdicts.length === 1 ? "" : "s"}` : null,
  ].filter(Boolean).join(" · ");
  section.append(el("h2", {}, view.run, el("span", { class: "meta" }, meta)));
  if (view.message) section.append(el("p", { class: view.has_optdiag ? "message" : "message no-data" }, view.message));
  if (!view.has_optdiag) return section;
  if (view.unreadable) {
    section.append(el("p", { class: "message" },
      `${view.unreadable} line(s) of events.jsonl are not shown: records this version of the tab does not know.`));
  }
  const xs = [view.loss ? view.loss.points : [], ...Object.values(view.series)].flat().map((p) => p[0]);
  const xRange = xs.length ? [Math.min(...xs), Math.max(...xs)] : null;
  section.append(timeline(view, xRange),
    el("div", { class: "pair" }, thresholdChart(view, xRange), lambdaMinChart(view, xRange)));
  section.append(el("div", { class: "verdicts" }, view.verdicts.map(verdictCard)));
  if (view.findings.length) {
    section.append(el("h3", {}, "triage findings (training against validation loss)"),
      el("div", { class: "verdicts" }, view.findings.map(findingCard)));
  }
  return section;
}

function verdictMarkers(view, labelled) {
  return view.verdicts.map((v, i) => ({
    step: v.step, cls: `verdict kind-${v.kind}`, row: i % 3,
    label: labelled ? `${v.kind} @${v.step}` : null,
    title: `${v.kind} at step ${v.step} (confidence ${fmt(v.confidence)}): ${v.summary}`,
    data: { kind: v.kind, step: v.step },
  }));
}

function timeline(view, xRange) {
  const markers = verdictMarkers(view, true);
  for (const f of view.findings) {
    markers.push({ step: f.step, cls: "finding", label: `${f.kind} @${f.step}`, row: markers.length % 3,
      title: `${f.kind} at step ${f.step}: ${f.summary}`, data: { kind: f.kind, step: f.step } });
  }
  const verdictSteps = new Set(view.verdicts.map((v) => v.step));
  for (const reason of ["spike", "divergence"]) {
    for (const step of view.snapshots[reason] || []) {
      if (verdictSteps.has(step)) continue;
      markers.push({ step, cls: `event ${reason}`, label: reason, data: { event: reason, step } });
    }
  }
  const points = view.loss ? view.loss.points : [];
  return lineChart({
    title: view.loss ? `training loss (${view.loss.tag}) with the verdicts` : "no training loss logged: verdicts only",
    cls: "timeline", series: [{ name: view.loss ? view.loss.tag : "loss", points, cls: "loss" }], markers,
    logY: positiveSpan(points.map((p) => p[1])) > 30, xRange, width: 1280, height: 260,
  });
}

function thresholdChart(view, xRange) {
  const s = view.series;
  const adaptive = Boolean(s.preconditioned_lambda_max && s.preconditioned_lambda_max.length);
  const name = adaptive ? "preconditioned_lambda_max" : "lambda_max";
  const series = [{ name, points: s[name] || [], cls: "sharpness", dots: true }];
  if (adaptive && s.lambda_max) series.push({ name: "lambda_max (raw)", points: s.lambda_max, cls: "raw" });
  if (s.critical_sharpness) {  // forwards only, along the optimizer's own update: comparable with the threshold
    series.push({ name: "critical sharpness", points: s.critical_sharpness, cls: "critical", dots: true });
  }
  for (const reason of ["stall", "spike", "divergence"]) {
    if (!adaptive && s[`${reason}/lambda_max`]) {
      series.push({ name: `${reason} snapshot`, points: s[`${reason}/lambda_max`], cls: `snapshot ${reason}`,
        dots: true });
    }
  }
  // the threshold applies where a ratio was logged: none while Adam's preconditioner warms up (raw lambda_max
  // is not what 38/lr bounds)
  const ratioSteps = new Set((s.stability_ratio || []).map((p) => p[0]));
  const thresholds = (s.stability_threshold || []).filter((p) => ratioSteps.has(p[0]));
  series.push({ name: "stability threshold", points: thresholds, cls: "threshold" });
  const values = series.flatMap((x) => x.points.map((p) => p[1]));
  const figure = lineChart({
    title: `${name} vs the optimizer's stability threshold`, cls: "threshold-chart", series,
    markers: verdictMarkers(view, false), logY: positiveSpan(values) > 20, zero: true, xRange,
  });
  const top = last(s[name]), threshold = last(thresholds);
  const ratioPoint = last(s.stability_ratio);
  const reading = el("p", { class: "reading" });
  if (top) {
    reading.dataset.sharpness = name;
    reading.dataset.step = top[0];
    reading.dataset.value = String(num(top[1]));
    let text = `step ${top[0]}: ${name} = ${fmt(top[1])}`;
    if (threshold) {
      reading.dataset.threshold = String(num(threshold[1]));
      text += `, threshold = ${fmt(threshold[1])}`;
    }
    if (ratioPoint && ratioPoint[0] === top[0]) {
      const ratio = num(ratioPoint[1]);
      reading.dataset.ratio = String(ratio);
      const state = ratio > 1 ? "unstable along the sharpest direction"
        : ratio > 0.8 ? "near the edge of stability" : "stable";
      text += ` (ratio ${fmt(ratio)}: ${state})`;
    } else if (last(s.stability_threshold)) {
      text += " (no stability ratio yet: the optimizer's preconditioner is warming up)";
    } else {
      text += " (no stability threshold for this optimizer)";
    }
    reading.textContent = text;
  } else {
    reading.textContent = "no lambda_max estimate yet";
  }
  figure.append(reading);
  return figure;
}

function lambdaMinChart(view, xRange) {
  const s = view.series;
  const series = [{ name: "lambda_min", points: s.lambda_min || [], cls: "lambda-min", dots: true }];
  for (const reason of ["stall", "spike", "divergence"]) {
    if (s[`${reason}/lambda_min`]) {
      series.push({ name: `${reason} snapshot`, points: s[`${reason}/lambda_min`], cls: `snapshot ${reason}`,
        dots: true });
    }
  }
  const figure = lineChart({
    title: "lambda_min (below 0: a direction of negative curvature)", cls: "lambda-min-chart", series,
    markers: verdictMarkers(view, false), hlines: [{ value: 0, label: "0", cls: "zero" }], xRange,
  });
  const points = series.flatMap((x) => x.points).sort((a, b) => a[0] - b[0]);
  const low = last(points);
  figure.append(el("p", { class: "reading", "data-value": low ? String(num(low[1])) : "" },
    low ? `step ${low[0]}: lambda_min = ${fmt(low[1])}` : "no lambda_min estimate yet"));
  return figure;
}

function flatEvidence(evidence, prefix = "") {
  const rows = [];
  for (const [name, value] of Object.entries(evidence)) {
    const nested = value !== null && typeof value === "object" && !Array.isArray(value);
    if (nested) rows.push(...flatEvidence(value, `${prefix}${name}.`));
    else rows.push([prefix + name, value]);
  }
  return rows;
}

function shown(value) {
  if (Array.isArray(value)) {
    const tail = value.slice(-4).map(shown).join(", ");
    return value.length > 4 ? `[${value.length} values, last: ${tail}]` : `[${tail}]`;
  }
  if (typeof value === "boolean") return String(value);
  return typeof value === "string" && !["nan", "inf", "-inf"].includes(value) ? value : fmt(value);
}

function evidenceTable(rows, cls) {
  return el("table", { class: `evidence ${cls}` }, rows.map(([name, value]) =>
    el("tr", { "data-name": name, "data-value": typeof value === "number" ? String(value) : JSON.stringify(value) },
      el("th", {}, name), el("td", {}, shown(value)))));
}

function verdictCard(v) {
  const outcome = v.outcome ? v.outcome.outcome : null;
  const prediction = v.evidence.prediction || null;
  const card = el("article", { class: `verdict kind-${v.kind}`, "data-kind": v.kind, "data-step": v.step,
    "data-confidence": String(v.confidence), "data-outcome": outcome || "open" });
  card.append(el("header", {},
    el("span", { class: "kind" }, v.kind), ` at step ${v.step}`,
    el("span", { class: "confidence", title: "confidence" },
      el("meter", { min: 0, max: 1, value: v.confidence }), ` confidence ${v.confidence.toFixed(2)}`),
    el("span", { class: `outcome ${outcome ? outcome.replace(" ", "-") : "open"}` }, outcome || "open")));
  card.append(el("p", { class: "summary" }, v.summary));
  card.append(evidenceTable(v.key_evidence.map((k) => [k, v.evidence[k]]), "key"));
  if (prediction) {
    const detail = v.outcome && v.outcome.detail ? ` (${v.outcome.detail})` : "";
    const when = v.outcome ? `checked at step ${v.outcome.checked_at_step}: ${outcome}${detail}`
      : prediction.check_at_step !== undefined ? `to be checked at step ${prediction.check_at_step}`
        : "not checked yet";
    card.append(el("p", { class: "prediction" }, el("b", {}, "Predicted: "), `${prediction.claim || "—"}; ${when}.`));
  }
  if (v.suggestions.length) card.append(suggestionsTable(v.suggestions));
  card.append(allEvidence(v.evidence));
  return card;
}

function suggestionsTable(suggestions) {
  return el("table", { class: "suggestions" },
    el("tr", {}, ["change", "", "now", "proposed", "why"].map((h) => el("th", {}, h))),
    suggestions.map((s) => el("tr", { "data-target": s.target },
      el("td", { class: "target" }, s.target), el("td", {}, s.action),
      el("td", { class: "num" }, fmt(s.current)), el("td", { class: "num" }, fmt(s.proposed)),
      el("td", { class: "reason" }, s.reason, s.code ? el("code", {}, s.code) : null))));
}

function allEvidence(evidence) {
  const rows = flatEvidence(evidence).filter(([name]) => !name.startsWith("prediction."));
  return el("details", {}, el("summary", {}, `all evidence (${rows.length} numbers)`), evidenceTable(rows, "all"));
}

// A triage finding (docs/triage.md): where the run sits between training and validation loss, what to do.
function findingCard(f) {
  const card = el("article", { class: "finding", "data-kind": f.kind, "data-step": f.step,
    "data-confidence": String(f.confidence) });
  card.append(el("header", {}, el("span", { class: "kind" }, f.kind), ` at step ${f.step}`,
    el("span", { class: "confidence" }, ` confidence ${f.confidence.toFixed(2)}`)));
  card.append(el("p", { class: "summary" }, f.summary));
  if (f.recommendations.length) {
    card.append(el("table", { class: "suggestions" },
      el("tr", {}, ["to do", "why", "numbers"].map((h) => el("th", {}, h))),
      f.recommendations.map((r) => el("tr", {}, el("td", {}, r.action), el("td", { class: "reason" }, r.reason),
        el("td", { class: "num" }, Object.entries(r.numbers).map(([k, x]) => `${k} = ${shown(x)}`).join(", "))))));
  }
  if (f.suggestions.length) card.append(suggestionsTable(f.suggestions));
  card.append(allEvidence(f.evidence));
  return card;
}
