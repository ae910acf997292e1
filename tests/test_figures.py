"""Figures shared by the report and TensorBoard: right data drawn, no pyplot global state, clear errors."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from optdiag.sinks import figures


def _density(n: int = 41) -> SimpleNamespace:
    grid = np.linspace(-2.0, 6.0, n)
    nodes = np.array([0.0, 4.0])
    weights = np.array([0.25, 0.75])
    sigma = 0.5
    dens = sum(w * np.exp(-((grid - x) ** 2) / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi)) for x, w in zip(nodes, weights))
    return SimpleNamespace(grid=grid, density=dens, nodes=nodes, weights=weights, sigma=sigma)


def _pyplot_figure_count() -> int:
    if "matplotlib.pyplot" not in sys.modules:
        return 0
    return len(sys.modules["matplotlib.pyplot"].get_fignums())


def test_spectral_density_draws_the_given_density_and_the_ritz_values():
    den = _density()
    before = _pyplot_figure_count()
    fig = figures.plot_spectral_density(den, title="step 7")
    assert isinstance(fig, Figure)
    assert _pyplot_figure_count() == before  # nothing registered with pyplot
    (ax,) = fig.axes
    assert ax.get_title() == "step 7"
    assert ax.get_yscale() == "log"
    line, rug = ax.get_lines()[:2]
    np.testing.assert_allclose(line.get_xdata(), den.grid)
    np.testing.assert_allclose(line.get_ydata(), den.density)  # all positive here, so unclipped
    np.testing.assert_allclose(rug.get_xdata(), den.nodes)
    assert "0.5" in ax.get_ylabel()
    png = figures.figure_to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_spectral_density_accepts_tensors_and_clips_zeros_for_the_log_axis():
    den = SimpleNamespace(grid=torch.tensor([0.0, 1.0, 2.0]), density=torch.tensor([0.0, 2.0, 0.0]))
    fig = figures.plot_spectral_density(den)
    y = fig.axes[0].get_lines()[0].get_ydata()
    np.testing.assert_allclose(y, [2e-6, 2.0, 2e-6])
    assert fig.axes[0].get_title() == "Hessian spectral density"


def test_spectral_density_draws_into_a_given_axes():
    fig, ax = figures.new_figure()
    assert figures.plot_spectral_density(_density(), ax=ax) is fig
    assert len(fig.axes) == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (SimpleNamespace(grid=[0.0, 1.0]), "no 'density'"),
        (SimpleNamespace(grid=[0.0, 1.0], density=[1.0]), "differ in length"),
        (SimpleNamespace(grid=[[0.0]], density=[[1.0]]), "one-dimensional"),
    ],
)
def test_spectral_density_rejects_bad_input(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        figures.plot_spectral_density(bad)


def test_spectral_density_rejects_something_that_is_not_an_axes():
    with pytest.raises(TypeError, match="Axes"):
        figures.plot_spectral_density(_density(), ax="not an axes")


def test_loss_slices_and_contour_and_series_and_barriers_hold_their_data():
    fig = figures.plot_loss_slices({"top": {"t": [-1, 0, 1], "loss": [1, 0, 1]}, "random": {"t": [0, 1], "loss": [0, 2]}})
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines[:2]] == ["top", "random"]
    np.testing.assert_allclose(lines[1].get_ydata(), [0, 2])

    grid = np.linspace(-1, 1, 5)
    surface = np.add.outer(grid**2, 2 * grid**2)
    fig = figures.plot_loss_contour(grid, grid, surface)
    assert len(fig.axes) == 2  # contour and colour bar
    flat = figures.plot_loss_contour(grid, grid, np.ones((5, 5)))  # constant: no contour levels, still a figure
    assert len(flat.axes) == 2

    fig = figures.plot_series([0, 5, 9], {"loss": [3.0, 2.0, 1.0], "lambda_max": [1.0, None, 4.0]})
    assert len(fig.axes) == 2
    y = fig.axes[1].get_lines()[0].get_ydata()
    assert y[0] == 1.0 and np.isnan(y[1]) and y[2] == 4.0

    fig = figures.plot_barriers([{"t": [0, 0.5, 1], "loss": [1.0, 1.4, 0.9], "label": "a -> b"}])
    assert fig.axes[0].get_lines()[0].get_label() == "a -> b"
    assert figures.figure_to_data_uri(fig).startswith("data:image/png;base64,iVBOR")


def test_other_figures_reject_mismatched_data():
    with pytest.raises(ValueError, match="differ in length"):
        figures.plot_loss_slices({"top": {"t": [0, 1], "loss": [0]}})
    with pytest.raises(ValueError, match="at least one"):
        figures.plot_loss_slices({})
    with pytest.raises(ValueError, match="shape"):
        figures.plot_loss_contour([0, 1], [0, 1, 2], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="3 checkpoints"):
        figures.plot_series([0, 1, 2], {"loss": [1.0]})
    with pytest.raises(ValueError, match="at least one"):
        figures.plot_barriers([])
