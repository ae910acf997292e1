"""One figure per demo scenario: the loss with its verdicts, and the curvature against the stability threshold.

Built on a plain Agg :class:`~matplotlib.figure.Figure` (no pyplot), like :mod:`optdiag.sinks.figures`.

Example::

    fig = scenario_figure(result)
    fig.savefig("saddle.png", dpi=90)
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

from optdiag.sinks.figures import figure_to_png

__all__ = ["scenario_figure", "figure_to_png"]

_KIND_COLORS = {
    "saddle_point": "tab:orange",
    "local_minimum": "tab:green",
    "oscillation": "tab:purple",
    "plateau": "tab:brown",
    "divergence": "tab:red",
}


def _finite(xs: list[float], ys: list[Any]) -> tuple[list[float], list[float]]:
    pairs = [(x, float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def scenario_figure(result: Any) -> Figure:
    """Two panels for a :class:`~optdiag.demo.runner.ScenarioResult`.

    Top: the training loss of every run (log scale) with a vertical line at each verdict, and where the run has a
    validation loop, its validation loss and a dotted line at each triage finding. Bottom: ``lambda_max``
    (solid) and ``lambda_min`` (dotted) from the Hessian monitor's snapshots, with the optimizer's stability
    threshold (``2/lr`` for plain SGD) dashed.
    """
    fig = Figure(figsize=(7.0, 5.2), layout="constrained")
    loss_ax, curv_ax = fig.subplots(2, 1, sharex=True)
    title = f"{result.scenario.name}: {result.scenario.title}"
    loss_ax.set_title(title, fontsize=10)
    seen_kinds: set[str] = set()
    for index, run in enumerate(result.runs):
        color = f"C{index}"
        steps, losses = _finite(list(range(1, len(run.losses) + 1)), run.losses)
        label = "loss" if len(result.runs) == 1 else f"loss ({run.label})"
        if losses and min(losses) > 0:
            loss_ax.semilogy(steps, losses, color=color, lw=0.9, label=label)
        else:
            loss_ax.plot(steps, losses, color=color, lw=0.9, label=label)
        if getattr(run, "val_losses", None):  # runs with a validation loop: the triage reads this curve
            vsteps, vlosses = _finite([s for s, _ in run.val_losses], [v for _, v in run.val_losses])
            vlabel = "validation loss" if len(result.runs) == 1 else f"validation loss ({run.label})"
            loss_ax.plot(vsteps, vlosses, "o-", ms=2, color=color, alpha=0.6, lw=0.9, label=vlabel)
        for f in getattr(run, "findings", []):
            if f.kind != "needs_validation":
                loss_ax.axvline(f.step, color=color, ls=":", lw=1.4, label=f"triage: {f.kind.replace('_', ' ')}")
        for d in run.diagnoses:
            kind_color = _KIND_COLORS.get(d.kind, "black")
            loss_ax.axvline(d.step, color=kind_color, ls="--", lw=1.2,
                            label=None if d.kind in seen_kinds else d.kind.replace("_", " "))
            seen_kinds.add(d.kind)
        snaps = [s for s in run.curvature if s.get("lambda_max") is not None]
        if snaps:
            xs = [s["step"] for s in snaps]
            suffix = "" if len(result.runs) == 1 else f" ({run.label})"
            curv_ax.plot(*_finite(xs, [s["lambda_max"] for s in snaps]), "o-", ms=3, color=color,
                         label=f"lambda_max{suffix}")
            curv_ax.plot(*_finite(xs, [s.get("lambda_min") for s in snaps]), "o:", ms=2, color=color, alpha=0.7,
                         label=f"lambda_min{suffix}")
            threshold = _finite(xs, [s.get("stability_threshold") for s in snaps])
            top = max((abs(v) for s in snaps for v in (s["lambda_max"], s.get("lambda_min") or 0.0)
                       if math.isfinite(v)), default=0.0)
            if threshold[0] and index == 0:
                if max(threshold[1]) <= 3 * top:
                    curv_ax.plot(*threshold, "--", color="gray", label="stability threshold (2/lr for SGD)")
                else:  # far above the curvature: drawing it would flatten the eigenvalues to a line
                    curv_ax.plot([], [], "--", color="gray",
                                 label=f"stability threshold {max(threshold[1]):.3g} (off the scale)")
    loss_ax.set_ylabel("training loss")
    loss_ax.legend(fontsize=7, loc="best")
    curv_ax.axhline(0.0, color="black", lw=0.5)
    curv_ax.set_xlabel("optimizer step")
    curv_ax.set_ylabel("Hessian eigenvalue")
    if curv_ax.get_legend_handles_labels()[0]:  # the zero line has no label: no snapshot, no legend
        curv_ax.legend(fontsize=7, loc="best")
    return fig
