"""The analysis report as files: ``report.json`` (the numbers) and ``report.html`` (one self-contained page).

The HTML is rendered from the JSON form alone (:func:`render_html` takes the dict that ``report.json`` holds), so
a saved ``report.json`` can be turned into a page again. Plots are PNGs embedded as ``data:`` URIs, styles are
inline: the page opens from disk with no server and no network.

Existing files are never overwritten: when ``report.html`` or ``report.json`` is already there the pair is written as
``report-2.html``/``report-2.json`` (then ``-3``, ...), each opened in exclusive-create mode.

Example:
    >>> import tempfile, json
    >>> html_path, json_path = write_report({"optdiag_version": "0", "created": "now", "checkpoints": [],
    ...                                      "series": {}, "barriers": []}, tempfile.mkdtemp())
    >>> json.loads(json_path.read_text())["checkpoints"], html_path.name
    ([], 'report.html')
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional

from optdiag.diagnosis.types import from_jsonable, to_jsonable
from optdiag.errors import UsageError
from optdiag.sinks import figures

__all__ = ["write_report", "render_html", "report_figures", "free_report_paths"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; overflow-wrap: break-word; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; overflow-wrap: break-word; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
table.prose { table-layout: fixed; width: 100%; }
table.prose td, table.prose th { overflow-wrap: anywhere; vertical-align: top; }
table.prose td.code { font-family: ui-monospace, monospace; font-size: 0.9em; text-align: left; }
.verdict { border-left: 5px solid #888; padding: 0.5em 1em; background: #fafafa; margin: 1em 0; }
.local_minimum { border-color: #2a9d3a; } .saddle_point { border-color: #d98c00; }
.plateau { border-color: #3a6fd9; } .not_critical { border-color: #888; } .undecided { border-color: #bbb; }
.oscillation, .divergence { border-color: #c0392b; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures img { max-width: calc(50% - 0.5em); height: auto; border: 1px solid #eee; }
.muted { color: #777; font-size: 0.9em; } code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, int):
            return str(value)
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[Any]], text_columns: int = 1,
           widths: Optional[list[tuple[int, str]]] = None) -> str:
    """A table inside a wrapper that scrolls sideways rather than widen the page. ``widths``: a column per
    ``(percent, class)``; the table then takes the page's width and its cells wrap (for long text: reasons, code)."""
    cols = ""
    if widths:
        cols = "<colgroup>" + "".join(f'<col style="width:{w}%">' for w, _ in widths) + "</colgroup>"

    def cell_class(i: int) -> str:
        if widths and widths[i][1]:
            return widths[i][1]
        return "text" if i < text_columns else ""

    head = "".join(f'<th class="{cell_class(i)}">{_e(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = "".join(f'<td class="{cell_class(i)}">{_e(_fmt(v))}</td>' for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    table_class = ' class="prose"' if widths else ""
    return (f'<div class="table-wrap"><table{table_class}>{cols}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _img(fig: Any, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="{figures.figure_to_data_uri(fig)}">'


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite_pairs(t: list, values: list) -> tuple[list, list]:
    pairs = [(a, b) for a, b in zip(t, values) if _is_finite(a) and _is_finite(b)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def report_figures(data: Mapping[str, Any]) -> dict[str, Any]:
    """The report's figures from its JSON form: ``{"<i>/density": Figure, "<i>/slices": ..., "<i>/contour": ...,
    "series": ..., "barriers": ...}`` (only those the data allow)."""
    data = from_jsonable(to_jsonable(dict(data)))  # "nan"/"inf" strings back to floats, whichever form came in
    out: dict[str, Any] = {}
    for i, ckpt in enumerate(data.get("checkpoints", [])):
        name = Path(str(ckpt.get("path", f"checkpoint {i}"))).name
        den = ckpt.get("density")
        if den and den.get("grid"):
            grid, dens = _finite_pairs(den["grid"], den["density"])
            nodes = [v for row in den.get("nodes", []) for v in row if _is_finite(v)]
            out[f"{i}/density"] = figures.plot_spectral_density(
                SimpleNamespace(grid=grid, density=dens, nodes=nodes, sigma=den.get("sigma")),
                title=f"Hessian spectral density: {name}",
            )
        slices = ckpt.get("slices") or {}
        if slices:
            drawable = {}
            for s in slices.values():
                t, loss = _finite_pairs(s["t"], s["loss"])
                if len(t) >= 2:
                    drawable[s.get("name", "direction")] = {"t": t, "loss": loss}
            if drawable:
                out[f"{i}/slices"] = figures.plot_loss_slices(drawable, title=f"Loss along directions: {name}")
        surface = ckpt.get("surface")
        if surface:
            rows = [[v if _is_finite(v) else math.nan for v in row] for row in surface["loss"]]
            out[f"{i}/contour"] = figures.plot_loss_contour(
                surface["alphas"], surface["betas"], rows, title=f"Loss around {name}",
                labels=tuple(surface.get("names", ("direction 1", "direction 2"))),
            )
    series = data.get("series") or {}
    if len(data.get("checkpoints", [])) > 1 and series:
        steps = series.get("step") or []
        x = steps if steps and all(s is not None for s in steps) else list(range(len(series.get("loss", []))))
        wanted = {k: series[k] for k in ("loss", "lambda_max", "hessian_trace", "sam_sharpness") if k in series}
        if wanted:
            out["series"] = figures.plot_series(
                x, wanted, xlabel="step" if x is steps else "checkpoint", title="Across checkpoints"
            )
    barriers = data.get("barriers") or []
    if barriers:
        paths = []
        for b in barriers:
            t, loss = _finite_pairs(b["t"], b["loss"])
            paths.append({"t": t, "loss": loss, "label": f"{b.get('from')} → {b.get('to')}"})
        out["barriers"] = figures.plot_barriers(paths)
    return out


def _verdict_block(ckpt: Mapping[str, Any]) -> str:
    kind = ckpt.get("point_type", "not_critical")
    diagnosis = ckpt.get("diagnosis")
    parts = [f'<div class="verdict {_e(kind)}"><b>{_e(kind.replace("_", " "))}</b>']
    if diagnosis:
        parts.append(f" (confidence {_fmt(diagnosis.get('confidence'), 2)}): {_e(diagnosis.get('summary', ''))}")
        suggestions = diagnosis.get("suggestions") or []
        if suggestions:
            parts.append("<p>What to change:</p>")
            parts.append(_table(
                ["target", "action", "current", "proposed", "reason", "code"],
                [[s.get("target"), s.get("action"), s.get("current"), s.get("proposed"), s.get("reason"),
                  s.get("code") or ""] for s in suggestions],
                widths=[(9, "text"), (17, "text"), (9, ""), (9, ""), (34, "text"), (22, "code")],
            ))
        evidence = diagnosis.get("evidence") or {}
        if evidence:
            parts.append("<details><summary>Evidence</summary>")
            parts.append(_table(["quantity", "value"], [[k, v] for k, v in evidence.items()]))
            parts.append("</details>")
    else:
        gate = ckpt.get("critical_point") or {}
        reason = str(gate.get("reason") or "")
        for prefix in ("not a critical point: ", "undecided: "):  # the bold kind already says it
            reason = reason.removeprefix(prefix)
        parts.append(f": {_e(reason)}." if reason else
                     ": the gradient is not small enough for this to be a critical point; the loss still has a "
                     "descent direction here.")
        classified = gate.get("classified_as")
        if classified:
            parts.append(f'<p class="muted">The gradient statistics and the curvature alone said '
                         f'{_e(str(classified.get("kind")).replace("_", " "))} (confidence '
                         f'{_e(_fmt(classified.get("confidence"), 2))}); the loss itself says otherwise.</p>')
    parts.append(_gate_table(ckpt.get("critical_point") or {}))
    parts.append("</div>")
    return "".join(parts)


def _gate_table(gate: Mapping[str, Any]) -> str:
    """The evidence the critical-point gate weighed, one row per test."""
    tests = gate.get("tests") or {}
    rows = []
    zero = tests.get("gradient_zero")
    if zero:
        rows.append(["full-data gradient against one batch's noise", f"|G| = {_fmt(zero.get('grad_norm'))}, "
                     f"tr(Σ)/B = {_fmt(zero.get('noise_per_batch'))}, |G|²/(tr(Σ)/B) = {_fmt(zero.get('grad_snr'))}",
                     None if zero.get("grad_snr") is None else zero["grad_snr"] > 1])
    line = tests.get("gradient_line")
    if line:
        rows.append(["loss along the full-data gradient", f"t = {_fmt(line.get('step'))}: "
                     f"{_fmt(line.get('measured_drop'))} lower ({_fmt(_pct(line.get('relative_drop')))}%; "
                     f"predicted {_fmt(line.get('predicted_drop'))})", line.get("descends")])
    nxt = tests.get("towards_next")
    if nxt:
        rows.append([f"path to {nxt.get('to')}", f"loss {_fmt(nxt.get('loss'))} → {_fmt(nxt.get('next_loss'))} "
                     f"({_fmt(_pct(nxt.get('relative_drop')))}%), first-order drop −G·Δ = "
                     f"{_fmt(nxt.get('first_order_drop'))}, barrier {_fmt(nxt.get('barrier'))}", nxt.get("descends")])
    if not rows:
        return ""
    return ("<details><summary>Is it a critical point?</summary>"
            + _table(["test", "measured", "still descending"], rows, text_columns=2) + "</details>")


def _ratio(ckpt: Mapping[str, Any]) -> Any:
    """The stability ratio, or in words why there is none ("warming up", no optimizer state, ...)."""
    ratio = ckpt.get("stability_ratio")
    return ratio if ratio is not None else ckpt.get("stability")


def _pct(fraction: Any) -> Any:
    return None if fraction is None else 100.0 * fraction


def _mode_line(ckpt: Mapping[str, Any]) -> str:
    mode = ckpt.get("mode") or {}
    if not mode:
        return ""
    return (f'<p><b>Function analysed:</b> the {_e(mode.get("function"))}. '
            f'<span class="muted">{_e(mode.get("reason"))}</span></p>')


def _lambda_min_label(ckpt: Mapping[str, Any]) -> str:
    on = ckpt.get("lambda_min_measured_on") or {}
    if not on:
        return ""
    return (f'<p class="muted">lambda_min = {_e(_fmt(ckpt.get("lambda_min")))}: Lanczos on {_e(on.get("batches"))} '
            f'batches ({_e(on.get("samples"))} samples), {_e(on.get("mode"))} mode, {_e(on.get("n_hvp"))} '
            f'Hessian-vector products, residual {_e(_fmt(on.get("residual"), 2))}.</p>')


def _story_section(data: Mapping[str, Any]) -> str:
    story = data.get("story") or {}
    phases = story.get("phases") or []
    if not phases:
        return ""
    out = ["<h2>The story</h2>", f'<p class="verdict">{_e(story.get("text"))}</p>']
    out.append(_table(
        ["first step", "last step", "state", "checkpoints", "loss from", "loss to", "lambda_min", "largest barrier"],
        [[p.get("first_step"), p.get("last_step"), p.get("state"), ", ".join(p.get("checkpoints") or []),
          p.get("loss_start"), p.get("loss_end"), p.get("lambda_min"), p.get("max_barrier")] for p in phases],
        text_columns=0,
    ))
    return "\n".join(out)


def _findings_section(data: Mapping[str, Any]) -> str:
    """The triage findings saved with the run (``Finding.to_dict()`` dicts): headline, recommendations, batch advice."""
    findings = [f for f in data.get("findings") or [] if isinstance(f, Mapping)]
    if not findings:
        return ""
    out = ["<h2>Triage</h2>", '<p class="muted">Saved by the run\'s TriageMonitor; see docs/triage.md.</p>']
    for f in findings:
        out.append(f'<div class="verdict finding {_e(f.get("kind"))}"><b>{_e(f.get("kind"))}</b> at step '
                   f'{_e(_fmt(f.get("step")))} (confidence {_fmt(f.get("confidence"), 2)}): {_e(f.get("summary"))}')
        recommendations = [r for r in f.get("recommendations") or [] if isinstance(r, Mapping)]
        if recommendations:
            out.append(_table(["action", "reason"], [[r.get("action"), r.get("reason")] for r in recommendations],
                              widths=[(30, "text"), (70, "text")]))
        suggestions = [s for s in f.get("suggestions") or [] if isinstance(s, Mapping)]
        if suggestions:
            out.append(_table(["target", "action", "current", "proposed", "reason"],
                              [[s.get("target"), s.get("action"), s.get("current"), s.get("proposed"), s.get("reason")]
                               for s in suggestions], widths=[(10, "text"), (22, "text"), (11, ""), (11, ""),
                                                               (46, "text")]))
        out.append("</div>")
    return "\n".join(out)


def _checkpoint_section(i: int, ckpt: Mapping[str, Any], figs: Mapping[str, Any]) -> str:
    name = Path(str(ckpt.get("path"))).name
    out = [f'<h2 id="ckpt-{i}">{_e(name)} <span class="muted">step {_e(_fmt(ckpt.get("step")))}</span></h2>']
    out.append(f'<p class="muted">{_e(ckpt.get("path"))} · {_e(ckpt.get("format"))} · '
               f'{_e(_fmt(ckpt.get("num_params")))} trainable parameters · loss over {_e(ckpt.get("n_samples"))} '
               f'samples in {_e(ckpt.get("n_batches"))} batches; curvature over the first '
               f'{_e(ckpt.get("hessian_batches"))} batches · {_e(ckpt.get("n_hvp"))} Hessian-vector products · '
               f'{_e(_fmt(ckpt.get("seconds"), 3))} s</p>')
    out.append(_mode_line(ckpt))
    out.append(_verdict_block(ckpt))
    residuals = ckpt.get("residuals") or {}
    top, bottom = ckpt.get("top_eigenvalues") or [], ckpt.get("bottom_eigenvalues") or []
    rows = [[f"largest {j + 1}", v, r] for j, (v, r) in enumerate(zip(top, residuals.get("top", [])))]
    rows += [[f"smallest {j + 1}", v, r] for j, (v, r) in enumerate(zip(bottom, residuals.get("bottom", [])))]
    out.append("<h3>Curvature</h3>")
    out.append(_table(["eigenvalue", "value", "residual |Hu − λu|"], rows))
    out.append(_lambda_min_label(ckpt))
    out.append(_table(
        ["quantity", "value"],
        [
            ["loss", ckpt.get("loss")],
            ["loss on the analysis batches", ckpt.get("analysis_loss")],
            ["grad_norm", ckpt.get("grad_norm")],
            ["hessian_trace", ckpt.get("hessian_trace")],
            ["hessian_trace_stderr", ckpt.get("hessian_trace_stderr")],
            ["stability_threshold", ckpt.get("stability_threshold")],
            *([["preconditioned_lambda_max", ckpt["preconditioned_lambda_max"]]]
              if ckpt.get("preconditioned_lambda_max") is not None else []),
            ["stability_ratio", _ratio(ckpt)],
            ["epsilon_sharpness (%)", ckpt.get("epsilon_sharpness")],
            ["sam_sharpness", ckpt.get("sam_sharpness")],
            ["adaptive_sharpness", ckpt.get("adaptive_sharpness")],
        ],
    ))
    images = [_img(figs[f"{i}/{kind}"], f"{kind} of {name}") for kind in ("density", "slices", "contour")
              if f"{i}/{kind}" in figs]
    if images:
        out.append('<div class="figures">' + "".join(images) + "</div>")
    slices = ckpt.get("slices") or {}
    if slices:
        out.append(_table(
            ["direction", "slope g·d", "curvature dᵀHd", "|d|"],
            [[s.get("name"), s.get("slope"), s.get("curvature"), s.get("direction_norm")] for s in slices.values()],
        ))
    notes = ckpt.get("notes") or []
    if notes:
        out.append("<p><b>Notes</b></p><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(out)


def render_html(data: Mapping[str, Any], figs: Optional[Mapping[str, Any]] = None) -> str:
    """The self-contained page for a report's JSON form (figures are made from it unless given)."""
    data = from_jsonable(to_jsonable(dict(data)))  # "nan"/"inf" strings back to floats, whichever form came in
    figs = report_figures(data) if figs is None else figs
    checkpoints = data.get("checkpoints", [])
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>optdiag report ({len(checkpoints)} checkpoint{'s' if len(checkpoints) != 1 else ''})</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>optdiag checkpoint analysis</h1>",
        f'<p class="muted">optdiag {_e(data.get("optdiag_version"))} · created {_e(data.get("created"))}</p>',
    ]
    if checkpoints:
        out.append(_table(
            ["checkpoint", "step", "loss", "grad_norm", "lambda_max", "lambda_min", "hessian_trace",
             "stability_ratio", "sam_sharpness", "point"],
            [[Path(str(c.get("path"))).name, c.get("step"), c.get("loss"), c.get("grad_norm"), c.get("lambda_max"),
              c.get("lambda_min"), c.get("hessian_trace"), _ratio(c), c.get("sam_sharpness"),
              str(c.get("point_type", "")).replace("_", " ")] for c in checkpoints],
        ))
    else:
        out.append("<p>No checkpoints were analysed.</p>")
    out.append(_story_section(data))
    out.append(_findings_section(data))
    if "series" in figs or "barriers" in figs:
        out.append("<h2>Across checkpoints</h2>")
        out.append('<div class="figures">' + "".join(
            _img(figs[key], key) for key in ("series", "barriers") if key in figs) + "</div>")
        barriers = data.get("barriers") or []
        if barriers:
            out.append(_table(["from", "to", "barrier", "distance"],
                              [[b.get("from"), b.get("to"), b.get("barrier"), b.get("distance")] for b in barriers],
                              text_columns=2))
    for note in data.get("barrier_notes") or []:
        out.append(f'<p class="muted">{_e(note)}</p>')
    for i, ckpt in enumerate(checkpoints):
        out.append(_checkpoint_section(i, ckpt, figs))
    settings = data.get("settings")
    if settings:
        out.append("<h2>Settings</h2>")
        out.append(_table(["setting", "value"], [[k, v] for k, v in settings.items()]))
    out.append('<p class="muted">The numbers are in <code>report.json</code> next to this page; '
               "see docs/analyzing-checkpoints.md for what each one means.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def free_report_paths(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``report.html``/``report.json`` in ``out_dir``, or the first ``report-N`` pair of which neither exists."""
    folder = Path(out_dir)
    n = 1
    while True:
        stem = "report" if n == 1 else f"report-{n}"
        pair = (folder / f"{stem}.html", folder / f"{stem}.json")
        if not pair[0].exists() and not pair[1].exists():
            return pair
        n += 1


def write_report(report: Any, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` without touching existing files.

    Args:
        report: an :class:`~optdiag.analysis.AnalysisReport` (anything with ``to_dict()``) or its dict form.
        out_dir: the folder; created (with parents) when missing.

    Returns:
        The HTML and JSON paths written.

    Raises:
        UsageError: ``out_dir`` exists but is not a folder, or cannot be written.
    """
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output directory {folder}: {err.strerror or err}") from err
    text_json = json.dumps(to_jsonable(data), indent=1, allow_nan=False)  # the one encoder (docs/errors.md)
    page = render_html(data)
    for _ in range(100):  # another process may take the same name between the check and the open
        html_path, json_path = free_report_paths(folder)
        try:
            with open(json_path, "x", encoding="utf-8") as handle:
                handle.write(text_json + "\n")
        except FileExistsError:
            continue
        except OSError as err:
            raise UsageError(f"cannot write {json_path}: {err.strerror or err}") from err
        try:
            with open(html_path, "x", encoding="utf-8") as handle:
                handle.write(page)
        except FileExistsError:
            continue  # keep the JSON we wrote (it is ours) and take the next free pair
        except OSError as err:
            raise UsageError(f"cannot write {html_path}: {err.strerror or err}") from err
        return html_path, json_path
    raise UsageError(f"could not find a free report file name in {folder}")
