"""TensorBoard panels: one custom-scalars layout for all optdiag scalars, figures and histograms.

TensorBoard's custom-scalars plugin reads only the *first* layout written to a run, so the layout is complete and
static (chart tags are regular expressions, which also match per-layer names not known in advance) and written at
most once per logger, whichever optdiag callback gets there first. Every chart in it has data on a run with
optdiag's defaults (tests/test_tensorboard_layout.py reads a real run back to check). Two charts are margin charts,
a value with a band: lambda_max with its Lanczos residual bound, the probe set's noise scale with one standard
error (docs/callbacks/hessian-monitor.md, "TensorBoard").
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

# category -> chart title -> regexes of the scalar tags drawn together in that chart
LAYOUT: dict[str, dict[str, list[str]]] = {
    "optdiag: Curvature": {
        "lambda_max vs stability threshold": [
            r"optdiag/lambda_max$",
            r"optdiag/(stall|spike|divergence)/lambda_max$",  # snapshots a verdict asked for log under its reason
            r"optdiag/stability_threshold$",
            r"optdiag/batch_sharpness$",
            r"optdiag/preconditioned_lambda_max$",
            r"optdiag/critical_sharpness$",  # forwards only, along the update (docs/critical-sharpness.md)
        ],
        "lambda_min": [r"optdiag/lambda_min$", r"optdiag/(stall|spike|divergence)/lambda_min$"],
        "Hessian trace": [r"optdiag/hessian_trace$"],
        "Hessian-vector products per estimate": [r"optdiag/hvp_count$"],
    },
    "optdiag: Stability": {
        "stability ratio (lambda_max / threshold; > 1 is unstable)": [r"optdiag/stability_ratio$",
                                                                      r"optdiag/critical_sharpness_ratio$"],
    },
    "optdiag: Gradients": {
        "global gradient norm (before / after clipping)": [r"optdiag/grad_norm$", r"optdiag/grad_norm_clipped$"],
        "per-layer gradient norms": [r"optdiag/.+/grad_norm$"],
        "update size |dtheta| / |theta|": [r"optdiag/update_ratio$"],
        "cosine of consecutive gradients and updates": [r"optdiag/grad_cosine$", r"optdiag/update_cosine$"],
        # HessianMonitor's probe set at every snapshot; GradientNormMonitor's micro-batches under accumulation
        "gradient noise scale B_simple": [r"optdiag/probe_noise_scale$", r"optdiag/noise_scale$"],
    },
}
# category -> chart title -> (value, lower, upper): exact scalar tags of a margin chart (a value with a band)
MARGIN_CHARTS: dict[str, dict[str, tuple[str, str, str]]] = {
    "optdiag: Curvature": {
        "lambda_max with its Lanczos error band (+- residual)": (
            "optdiag/lambda_max", "optdiag/lambda_max_lower", "optdiag/lambda_max_upper"),
    },
    "optdiag: Gradients": {
        "noise scale B_simple of the probe set (+- 1 standard error)": (
            "optdiag/probe_noise_scale", "optdiag/probe_noise_scale_lower", "optdiag/probe_noise_scale_upper"),
    },
}
_REGISTERED_FLAG = "_optdiag_layout_registered"


def tensorboard_layout() -> dict[str, dict[str, list]]:
    """The layout in ``SummaryWriter.add_custom_scalars`` form: ``{category: {chart: ["Multiline", [tags]]}}``,
    and ``["Margin", [value, lower, upper]]`` for the margin charts (listed after a category's line charts).

    Example:
        >>> tensorboard_layout()["optdiag: Curvature"]["lambda_max with its Lanczos error band (+- residual)"]
        ['Margin', ['optdiag/lambda_max', 'optdiag/lambda_max_lower', 'optdiag/lambda_max_upper']]
    """
    layout: dict[str, dict[str, list]] = {}
    for cat, charts in LAYOUT.items():
        layout[cat] = {chart: ["Multiline", list(tags)] for chart, tags in charts.items()}
        layout[cat].update({chart: ["Margin", list(tags)] for chart, tags in MARGIN_CHARTS.get(cat, {}).items()})
    return layout


def register_layout(logger: Any) -> bool:
    """Write the optdiag custom-scalars layout to a ``TensorBoardLogger`` once.

    Args:
        logger: a Lightning ``TensorBoardLogger`` (either namespace); call on global rank 0 only.

    Returns:
        True if the layout was written now, False if this logger already had it.

    Example::

        register_layout(trainer.logger)
        # True
    """
    if getattr(logger, _REGISTERED_FLAG, False):
        return False
    logger.experiment.add_custom_scalars(tensorboard_layout())
    setattr(logger, _REGISTERED_FLAG, True)
    return True


def log_figure(logger: Any, tag: str, figure: Any, step: int) -> None:
    """Add a matplotlib figure to a ``TensorBoardLogger`` as an RGB image (rendered on Agg, pyplot never loaded)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    logger.experiment.add_image(tag, image, global_step=int(step), dataformats="HWC")


def log_text(logger: Any, tag: str, text: str, step: int) -> None:
    """Add a Markdown text panel (e.g. ``Diagnosis.to_markdown()``) to a ``TensorBoardLogger`` and flush it.

    Example::

        log_text(trainer.logger, "optdiag/diagnosis", diagnosis.to_markdown(), diagnosis.step)
    """
    logger.experiment.add_text(tag, str(text), global_step=int(step))
    logger.experiment.flush()


# SummaryWriter's default ("tensorflow") bins span +-1e-12 .. +-1e20 (generate_testdata.py in TensorBoard); values
# outside are dropped, and a tensor with none inside raises "The histogram is empty".
_DEFAULT_BINS_LIMIT = 1e20
_WIDE_BINS = 64


def log_histograms(logger: Any, tensors: Mapping[str, torch.Tensor], step: int) -> list[str]:
    """Add one histogram per named tensor (values flattened, on the CPU, as float32).

    A tensor holding NaN or Inf has no histogram (TensorBoard cannot draw one) and is skipped; empty tensors too.
    Finite values beyond TensorBoard's default bins (``|v| >= 1e20``, e.g. a diverging run's gradients) are binned
    in 64 equal-width bins over their range instead, so that none is dropped (and no "histogram is empty" error).

    Returns:
        The tags that were skipped because their values are not all finite (for the caller to warn about).

    Example::

        log_histograms(trainer.logger, {"optdiag/net.0/grad": grad}, step=10)
        # []
    """
    skipped = []
    for tag, values in tensors.items():
        flat = values.detach().reshape(-1).float().cpu()
        if not flat.numel():
            continue
        if not bool(torch.isfinite(flat).all()):
            skipped.append(tag)
            continue
        bins = _wide_bins(flat) if float(flat.abs().max()) >= _DEFAULT_BINS_LIMIT else "tensorflow"
        logger.experiment.add_histogram(tag, flat, global_step=int(step), bins=bins)
    return skipped


def _wide_bins(flat: torch.Tensor) -> np.ndarray:
    """64 equal-width bin edges over the values' range, widened around a single value (numpy cannot split a range
    that float64 does not resolve)."""
    low, high = float(flat.min()), float(flat.max())
    scale = max(abs(low), abs(high))
    if high - low <= 1e-6 * scale:
        low, high = low - 1e-3 * scale, high + 1e-3 * scale
    return np.linspace(low, high, _WIDE_BINS + 1)
