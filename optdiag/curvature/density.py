"""The eigenvalue density of a curvature operator by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan & Xiao (ICML 2019, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density"): for a random unit vector ``v``, ``m`` Lanczos steps give a tridiagonal ``T`` whose eigenvalues ``theta_i``
(Ritz values) and squared first eigenvector components ``tau_i`` form an m-point Gauss quadrature of the measure
``sum_j (u_j^T v)^2 delta(t - lambda_j)``, exact for polynomials up to degree ``2m - 1``. Its expectation over ``v`` is
the spectral density ``(1/n) sum_j delta(t - lambda_j)``; smoothing each node by a Gaussian and averaging a few runs
gives a picture of the whole spectrum (a bulk near zero and a few outliers, for trained nets) from a few hundred
Hessian-vector products.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from optdiag.curvature.base import CurvatureOperator, vectors_that_fit
from optdiag.curvature.lanczos import lanczos_tridiagonal
from optdiag.curvature._checks import check_count, check_operator
from optdiag.curvature.trace import (
    plain_values,
    probe_generator,
    random_probe,
)
from optdiag.errors import UsageError
from optdiag.policy import check_number

DEFAULT_N_GRID = 1000
SIGMA_FRACTION = 0.01
"""Default Gaussian width as a fraction of the spread of the Ritz values."""
_GRID_MARGIN_SIGMAS = 6.0
"""The default grid reaches this many widths beyond the extreme nodes, so the tails' lost mass is below 1e-8."""
_GRID_CHUNK = 4096


@dataclass
class DensityResult:
    """A smoothed eigenvalue density and the quadrature it was built from.

    Attributes:
        grid: the points ``t`` (ascending) where the density is evaluated.
        density: ``phi(t) = mean over runs of sum_i tau_i N(t; theta_i, sigma^2)``; it integrates to 1 over a
            grid that covers the nodes (the default one does).
        nodes: Ritz values ``theta_i``, shape ``(n_runs, m)``, ascending within a run.
        weights: quadrature weights ``tau_i``, shape ``(n_runs, m)``; each row sums to 1. A run that found an
            invariant subspace after ``j < m`` steps has exact nodes there; its row is padded with zero-weight
            copies of its largest node.
        sigma: the Gaussian width used.
        n_hvp: the matrix-vector products spent.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    n_hvp: int

    def to_dict(self) -> dict[str, Any]:
        """The result as plain Python numbers and (nested) lists, JSON-ready."""
        return plain_values(asdict(self))


def spectral_density(
    op: CurvatureOperator,
    n_runs: int = 4,
    n_steps: int = 60,
    *,
    grid: np.ndarray | torch.Tensor | list[float] | None = None,
    n_grid: int | None = None,
    sigma: float | None = None,
    seed: int = 0,
    max_basis: int | None = None,
) -> DensityResult:
    """Estimate the eigenvalue density of ``op`` by stochastic Lanczos quadrature.

    Each run starts Lanczos (:func:`optdiag.curvature.lanczos.lanczos_tridiagonal`) from a normalised Rademacher
    vector, takes ``n_steps`` steps with full reorthogonalisation (without it, floating point produces ghost copies
    of converged eigenvalues) while the basis fits ``max_basis``, and eigendecomposes the tridiagonal matrix: nodes
    are its eigenvalues, weights the squared first components of its eigenvectors. The density is the average over
    runs of the node masses, each smoothed by a Gaussian of width ``sigma``. Weights are exact spectral masses when
    the start vector's Krylov space is invariant (e.g. a matrix with few distinct eigenvalues); the run then stops
    early. Moments are exact per run up to degree ``2 n_steps - 1``: the mean of ``sum_i tau_i theta_i`` is
    ``tr(H)/n``.

    Args:
        op: the operator (``HessianOperator``, ``MatrixOperator``, ...).
        n_runs: independent start vectors to average (the variance of the masses falls like ``1/(n_runs * n)``).
        n_steps: Lanczos steps per run (capped at ``op.num_params``); the cost is about ``n_runs * n_steps``
            products, and memory ``n_steps + 1`` vectors for the full reorthogonalisation.
        grid: where to evaluate the density (1-D, ascending). Default: ``n_grid`` evenly spaced points spanning the
            nodes with a margin of 6 ``sigma`` on each side.
        n_grid: number of points of the default grid (default 1000); not together with ``grid``.
        sigma: Gaussian width. Default: 1% of the spread of the nodes (of their magnitude if they coincide).
        seed: seeds a private ``torch.Generator`` on the operator's device; the global RNG is untouched.
        max_basis: the most basis vectors held (at least 2). Default: as many as fit in 256 MiB
            (:data:`~optdiag.curvature.base.VECTOR_MEMORY_BYTES`), at least 3: all ``n_steps + 1`` below about a
            million float32 parameters. With fewer, each step is reorthogonalised against the last ``max_basis``
            vectors only (``window`` of :func:`~optdiag.curvature.lanczos.lanczos_tridiagonal`): spurious copies
            of converged Ritz values share their weight, and the density moves by little (measured in
            docs/performance.md, section 8).

    Returns:
        A :class:`DensityResult`.

    Raises:
        UsageError: (a ``ValueError``) for an ``op`` that is not a ``CurvatureOperator``, bad counts, grid or
            sigma.
        NonFiniteError: if a product comes out NaN or infinite.

    Example:
        >>> import torch
        >>> from optdiag.curvature import MatrixOperator
        >>> eigenvalues = torch.tensor([0.0] * 8 + [10.0] * 2, dtype=torch.float64)
        >>> den = spectral_density(MatrixOperator(torch.diag(eigenvalues)), n_runs=2, n_steps=5)
        >>> den.nodes[0].round(6).tolist(), den.weights[0].round(6).tolist()
        ([0.0, 10.0, 10.0, 10.0, 10.0], [0.8, 0.2, 0.0, 0.0, 0.0])
    """
    check_operator(op, sharded=False)
    n_runs = check_count("n_runs", n_runs)
    n_steps = min(check_count("n_steps", n_steps), op.num_params)
    if grid is not None and n_grid is not None:
        raise UsageError("give either grid or n_grid, not both")
    sigma = check_number("sigma", sigma, low=0.0, low_open=True, allow_none=True, what="a positive number")
    grid = _check_grid(grid) if grid is not None else None
    n_grid = check_count("n_grid", DEFAULT_N_GRID if n_grid is None else n_grid, minimum=2)
    window = (max(3, vectors_that_fit(op.num_params, op.dtype.itemsize)) if max_basis is None
              else check_count("max_basis", max_basis, minimum=2))

    generator = probe_generator(op, seed)
    start = op.n_hvp
    nodes = np.empty((n_runs, n_steps))
    weights = np.zeros((n_runs, n_steps))
    for run in range(n_runs):
        probe = random_probe(op, generator, "rademacher")
        alphas, betas, _ = lanczos_tridiagonal(op, probe, n_steps, return_basis=False, window=window)
        ritz_values, ritz_vectors = eigh_tridiagonal(alphas, betas)
        found = len(ritz_values)
        nodes[run, :found], nodes[run, found:] = ritz_values, ritz_values[-1]
        weights[run, :found] = ritz_vectors[0] ** 2
    n_hvp = op.n_hvp - start

    sigma = float(sigma) if sigma is not None else SIGMA_FRACTION * _spread(nodes)
    if grid is None:
        margin = _GRID_MARGIN_SIGMAS * sigma
        grid = np.linspace(nodes.min() - margin, nodes.max() + margin, n_grid)
    density = _gaussian_mixture(grid, nodes, weights, sigma)
    return DensityResult(grid=grid, density=density, nodes=nodes, weights=weights, sigma=sigma, n_hvp=n_hvp)


def _spread(nodes: np.ndarray) -> float:
    """The width the default sigma is a fraction of: the nodes' range, or their magnitude (or 1) if they coincide."""
    low, high = float(nodes.min()), float(nodes.max())
    magnitude = max(abs(low), abs(high))
    if high - low > 1e-12 * magnitude:
        return high - low
    return magnitude if magnitude > 0 else 1.0


def _gaussian_mixture(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """``mean over runs of sum_i w_i N(t; x_i, sigma^2)`` at every ``t`` of ``grid``, in chunks to bound memory."""
    keep = weights > 0
    centres, masses = nodes[keep], weights[keep] / nodes.shape[0]
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    density = np.empty_like(grid)
    for lo in range(0, grid.size, _GRID_CHUNK):
        z = (grid[lo : lo + _GRID_CHUNK, None] - centres[None, :]) / sigma
        density[lo : lo + _GRID_CHUNK] = norm * (np.exp(-0.5 * z * z) @ masses)
    return density


def _check_grid(grid: Any) -> np.ndarray:
    if isinstance(grid, torch.Tensor):
        grid = grid.detach().cpu().numpy()
    values = np.asarray(grid, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise UsageError(f"grid must be a 1-D array of at least 2 points, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise UsageError("grid must contain only finite numbers")
    if not (np.diff(values) > 0).all():
        raise UsageError("grid must be strictly ascending")
    return values
