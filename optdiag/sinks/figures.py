"""Matplotlib figures shared by the HTML report and TensorBoard.

Every function builds a :class:`matplotlib.figure.Figure` directly (Agg canvas, no ``pyplot``), so nothing is
registered in pyplot's global figure manager, no GUI backend is touched and the caller owns the figure: pass it to
``SummaryWriter.add_figure`` or :func:`figure_to_png` and let it go out of scope.

Example:
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> den = SimpleNamespace(grid=np.linspace(-1, 5, 50), density=np.exp(-np.linspace(-1, 5, 50) ** 2),
    ...                       nodes=np.array([0.0]), weights=np.array([1.0]), sigma=0.1)
    >>> fig = plot_spectral_density(den, title="step 100")
    >>> figure_to_png(fig)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "new_figure",
    "figure_to_png",
    "figure_to_data_uri",
    "plot_spectral_density",
    "plot_loss_slices",
    "plot_loss_contour",
    "plot_series",
    "plot_barriers",
]

_DEFAULT_SIZE = (6.0, 3.6)


def new_figure(figsize: tuple[float, float] = _DEFAULT_SIZE) -> tuple[Figure, Axes]:
    """A fresh figure with one axes on an Agg canvas, outside pyplot's global state."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _target(ax: Axes | None, figsize: tuple[float, float] = _DEFAULT_SIZE) -> tuple[Figure, Axes]:
    if ax is None:
        return new_figure(figsize)
    if not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax.get_figure(), ax


def _as_array(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor; figures must not import torch
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The figure as a ``data:image/png;base64,...`` URI, for embedding in a self-contained HTML page."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")


def plot_spectral_density(result: Any, ax: Axes | None = None, title: str | None = None) -> Figure:
    """The Hessian eigenvalue density from stochastic Lanczos quadrature, with its Ritz values as a rug.

    Args:
        result: a ``DensityResult`` (anything with ``grid`` and ``density`` of equal length; ``nodes``,
            ``weights`` and ``sigma`` are drawn when present).
        ax: draw into this axes; a new figure is made when None.
        title: the axes title (default: "Hessian spectral density").

    Returns:
        The figure holding the plot.

    Example:
        >>> from types import SimpleNamespace
        >>> den = SimpleNamespace(grid=[0.0, 1.0, 2.0], density=[0.1, 0.8, 0.1])
        >>> plot_spectral_density(den).axes[0].get_xlabel()
        'eigenvalue'
    """
    for attribute in ("grid", "density"):
        if not hasattr(result, attribute):
            raise TypeError(f"plot_spectral_density needs a DensityResult; {type(result).__name__} has no {attribute!r}")
    grid = _as_array(result.grid, "grid")
    density = _as_array(result.density, "density")
    if grid.shape != density.shape:
        raise ValueError(f"grid and density differ in length: {grid.size} vs {density.size}")
    fig, ax = _target(ax)
    # A log axis shows the small bulk next to the outliers (the usual view since Ghorbani et al. 2019).
    positive = density[density > 0]
    floor = max(float(positive.max()) * 1e-6, np.finfo(float).tiny) if positive.size else 1.0
    ax.semilogy(grid, np.clip(density, floor, None), color="C0", lw=1.5, label="density")
    nodes = getattr(result, "nodes", None)
    if nodes is not None:
        node_values = _as_array(nodes, "nodes").reshape(-1)
        inside = node_values[(node_values >= grid.min()) & (node_values <= grid.max())]
        ax.plot(inside, np.full(inside.shape, floor), "|", color="C3", ms=10, label="Ritz values")
    ax.axvline(0.0, color="0.6", lw=0.8, ls="--")
    sigma = getattr(result, "sigma", None)
    label = "eigenvalue"
    ax.set_xlabel(label)
    ax.set_ylabel("density" + (f" (Gaussian width {float(sigma):.3g})" if sigma is not None else ""))
    ax.set_title(title if title is not None else "Hessian spectral density")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_loss_slices(
    slices: Mapping[str, Mapping[str, Sequence[float]]],
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """1-D loss slices ``L(theta + t d)`` for several directions on one axes.

    Args:
        slices: ``{direction name: {"t": [...], "loss": [...]}}``.
        ax: draw into this axes; a new figure is made when None.
        title: the axes title.

    Example:
        >>> fig = plot_loss_slices({"top": {"t": [-1, 0, 1], "loss": [1.0, 0.0, 1.0]}})
        >>> fig.axes[0].get_xlabel()
        't (step along the unit direction)'
    """
    if not slices:
        raise ValueError("plot_loss_slices needs at least one slice")
    fig, ax = _target(ax)
    for name, data in slices.items():
        t = _as_array(data["t"], f"{name}.t")
        loss = _as_array(data["loss"], f"{name}.loss")
        if t.shape != loss.shape:
            raise ValueError(f"slice {name!r}: t and loss differ in length ({t.size} vs {loss.size})")
        ax.plot(t, loss, marker=".", ms=3, lw=1.3, label=name)
    ax.axvline(0.0, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("t (step along the unit direction)")
    ax.set_ylabel("loss")
    ax.set_title(title if title is not None else "Loss along directions")
    ax.legend(fontsize="small")
    return fig


def plot_loss_contour(
    alphas: Sequence[float],
    betas: Sequence[float],
    loss: Any,
    ax: Axes | None = None,
    title: str | None = None,
    labels: tuple[str, str] = ("top eigenvector 1", "top eigenvector 2"),
) -> Figure:
    """A 2-D contour of ``L(theta + a d1 + b d2)``; ``loss[i][j]`` is at ``(alphas[i], betas[j])``.

    Example:
        >>> a = [-1.0, 0.0, 1.0]
        >>> fig = plot_loss_contour(a, a, [[2, 1, 2], [1, 0, 1], [2, 1, 2]])
        >>> len(fig.axes)  # the plot and its colour bar
        2
    """
    a = _as_array(alphas, "alphas")
    b = _as_array(betas, "betas")
    values = np.asarray(loss, dtype=float)
    if values.shape != (a.size, b.size):
        raise ValueError(f"loss must have shape ({a.size}, {b.size}), got {values.shape}")
    fig, ax = _target(ax, (5.0, 4.2))
    grid_b, grid_a = np.meshgrid(b, a)
    finite = values[np.isfinite(values)]
    if finite.size and float(finite.max()) > float(finite.min()):
        filled = ax.contourf(grid_a, grid_b, values, levels=20, cmap="viridis")
        ax.contour(grid_a, grid_b, values, levels=20, colors="k", linewidths=0.3)
        fig.colorbar(filled, ax=ax, label="loss")
    else:  # a constant surface has no contours; show it as an image so the figure still says so
        image = ax.imshow(values.T, origin="lower", extent=(a.min(), a.max(), b.min(), b.max()), aspect="auto")
        fig.colorbar(image, ax=ax, label="loss")
    ax.plot([0.0], [0.0], "r*", ms=10, label="checkpoint")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title if title is not None else "Loss around the checkpoint")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_series(
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    ax: Axes | None = None,
    title: str | None = None,
    xlabel: str = "step",
) -> Figure:
    """Several quantities against checkpoints, one panel each (missing values as None are skipped).

    When ``ax`` is given every series shares it; otherwise each quantity gets its own panel, since
    ``lambda_max``, trace and loss live on different scales.

    Example:
        >>> fig = plot_series([0, 10], {"loss": [1.0, 0.5], "lambda_max": [2.0, None]})
        >>> len(fig.axes)
        2
    """
    if not series:
        raise ValueError("plot_series needs at least one series")
    steps = _as_array(x, "x")
    if ax is None:
        fig = Figure(figsize=(6.0, 1.9 * len(series) + 0.6), layout="constrained")
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(len(series), 1, i + 1) for i in range(len(series))]
    else:
        fig, ax = _target(ax)
        axes = [ax] * len(series)
    for i, ((name, values), target) in enumerate(zip(series.items(), axes)):
        raw = [np.nan if v is None else float(v) for v in values]
        y = _as_array(raw, name)
        if y.shape != steps.shape:
            raise ValueError(f"series {name!r} has {y.size} values for {steps.size} checkpoints")
        target.plot(steps, y, marker="o", color=f"C{i}", label=name)
        target.set_ylabel(name)
        if ax is not None:
            target.legend(fontsize="small")
    axes[-1].set_xlabel(xlabel)
    axes[0].set_title(title if title is not None else "Across checkpoints")
    return fig


def plot_barriers(
    paths: Sequence[Mapping[str, Any]],
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """The loss along the straight lines between consecutive checkpoints.

    Args:
        paths: one mapping per pair with ``"t"`` (0 at the first, 1 at the second checkpoint), ``"loss"`` and an
            optional ``"label"``.

    Example:
        >>> fig = plot_barriers([{"t": [0, 0.5, 1], "loss": [1.0, 1.5, 0.8], "label": "a -> b"}])
        >>> fig.axes[0].get_xlabel()
        'interpolation t'
    """
    if not paths:
        raise ValueError("plot_barriers needs at least one path")
    fig, ax = _target(ax)
    for i, path in enumerate(paths):
        t = _as_array(path["t"], "t")
        loss = _as_array(path["loss"], "loss")
        if t.shape != loss.shape:
            raise ValueError(f"path {i}: t and loss differ in length ({t.size} vs {loss.size})")
        ax.plot(t, loss, marker=".", label=str(path.get("label", f"path {i}")))
    ax.set_xlabel("interpolation t")
    ax.set_ylabel("loss")
    ax.set_title(title if title is not None else "Loss between consecutive checkpoints")
    ax.legend(fontsize="small")
    return fig
