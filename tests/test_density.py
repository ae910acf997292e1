"""Specification of spectral_density (stochastic Lanczos quadrature) against dense spectra."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from optdiag.curvature.base import MatrixOperator
from optdiag.curvature.density import DensityResult, spectral_density
from optdiag.curvature.operator import HessianOperator, supervised_loss
from optdiag.curvature.trace import probe_generator, random_probe
from optdiag.errors import NonFiniteError, UsageError
from tests.models import half_squared_error, linear_net_problem, reference_hessian

F64 = torch.float64
OUTLIERS = [20.0, 25.0, 30.0, 35.0, 40.0]


def bulk_and_outliers(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Hessian-like spectrum: n - 5 eigenvalues in [-0.5, 1] and 5 outliers; returns (matrix, eigenvalues, U)."""
    gen = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - len(OUTLIERS), generator=gen, dtype=F64) * 1.5 - 0.5
    eigenvalues = torch.cat([bulk, torch.tensor(OUTLIERS, dtype=F64)])
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    return 0.5 * (matrix + matrix.T), eigenvalues, basis


def rademacher_quadratic_form_std(matrix: torch.Tensor, n: int) -> float:
    """Standard deviation of v^T M v for v = z / sqrt(n), z Rademacher: sqrt(2(|M|_F^2 - sum M_ii^2)) / n."""
    return math.sqrt(float(2 * (matrix.pow(2).sum() - matrix.diagonal().pow(2).sum()))) / n


def mass(den: DensityResult, low: float, high: float) -> float:
    inside = (den.grid >= low) & (den.grid <= high)
    return float(np.trapezoid(den.density[inside], den.grid[inside]))


def nan_operator() -> MatrixOperator:
    op = MatrixOperator(torch.eye(4, dtype=F64))
    op.matrix = torch.full((4, 4), math.nan, dtype=F64)  # set after the constructor's symmetry check
    return op


# ---------------------------------------------------------------- exact answers


def test_diagonal_matrix_gives_exact_nodes_and_masses_and_stops_at_the_invariant_subspace():
    # With a diagonal H and a Rademacher start v = z/sqrt(n), the mass on eigenvalue lambda is sum of v_i^2 over its
    # coordinates = multiplicity / n, in every run; four distinct eigenvalues make the Krylov space invariant after
    # four steps.
    eigenvalues = torch.tensor([0.0] * 90 + [1.0] * 5 + [10.0] * 3 + [50.0] * 2, dtype=F64)
    op = MatrixOperator(torch.diag(eigenvalues))
    den = spectral_density(op, n_runs=3, n_steps=20)
    assert den.nodes.shape == den.weights.shape == (3, 20)
    assert den.nodes[:, :4] == pytest.approx(np.tile([0.0, 1.0, 10.0, 50.0], (3, 1)), abs=1e-10)
    assert den.weights[:, :4] == pytest.approx(np.tile([0.90, 0.05, 0.03, 0.02], (3, 1)), abs=1e-12)
    assert np.all(den.weights[:, 4:] == 0.0) and np.all(den.nodes[:, 4:] == den.nodes[:, 3:4])
    assert den.n_hvp == op.n_hvp == 3 * 4
    assert mass(den, 40.0, 60.0) == pytest.approx(0.02, abs=1e-8)
    assert mass(den, -5.0, 5.0) == pytest.approx(0.95, abs=1e-8)
    assert float(np.trapezoid(den.grid * den.density, den.grid)) == pytest.approx(135.0 / 100, abs=1e-8)


def test_linear_net_at_the_origin_has_nodes_at_plus_minus_the_singular_values():
    # docs/theory.md section 3: y = W2 W1 x at W = 0 with whitened inputs has Hessian eigenvalues +-sigma_i(A), each
    # `hidden` times, and zeros; five distinct values, so every run ends after five steps with exactly them.
    model, batch, target_map = linear_net_problem(d_in=3, hidden=2, d_out=2, n=12, seed=0)
    hessian = reference_hessian(model, half_squared_error, [batch])
    singular = torch.linalg.svdvals(target_map)
    expected = torch.sort(torch.cat([singular, singular, -singular, -singular, torch.zeros(2, dtype=F64)])).values
    assert torch.linalg.eigvalsh(hessian) == pytest.approx(expected, abs=1e-10)

    den = spectral_density(MatrixOperator(hessian), n_runs=40, n_steps=10)
    distinct = [-singular[0], -singular[1], 0.0, singular[1], singular[0]]
    assert den.nodes[:, :5] == pytest.approx(np.tile(np.array(distinct, dtype=float), (40, 1)), abs=1e-9)
    assert np.all(den.weights[:, 5:] == 0.0) and den.n_hvp == 40 * 5
    # Each value has mass 2/10 in expectation; a run's mass z^T P z / n has variance 2(|P|_F^2 - sum P_ii^2) / n^2.
    eigenvalues, vectors = torch.linalg.eigh(hessian)
    for value, mean_weight in zip(distinct, den.weights[:, :5].mean(axis=0)):
        columns = vectors[:, (eigenvalues - value).abs() < 1e-8]
        tolerance = 4 * rademacher_quadratic_form_std(columns @ columns.T, 10) / math.sqrt(40)
        assert abs(mean_weight - 0.2) <= tolerance


def test_a_single_eigenvalue_gives_exactly_a_gaussian_of_width_sigma():
    op = MatrixOperator(3.0 * torch.eye(6, dtype=F64))
    grid = np.linspace(2.0, 4.0, 41)
    den = spectral_density(op, n_runs=2, n_steps=6, grid=grid, sigma=0.25)
    expected = np.exp(-0.5 * ((grid - 3.0) / 0.25) ** 2) / (0.25 * math.sqrt(2 * math.pi))
    assert den.grid == pytest.approx(grid) and den.sigma == 0.25
    assert den.density == pytest.approx(expected, rel=1e-12)
    assert den.n_hvp == 2  # c I: the start vector is an eigenvector, one product per run


def test_default_sigma_is_a_fraction_of_the_spread_of_the_nodes():
    den = spectral_density(MatrixOperator(torch.diag(torch.tensor([-1.0, 0.0, 3.0], dtype=F64))), n_runs=1)
    assert den.sigma == pytest.approx(0.01 * 4.0)
    assert spectral_density(MatrixOperator(torch.zeros(3, 3, dtype=F64))).sigma == pytest.approx(0.01)
    assert spectral_density(MatrixOperator(5.0 * torch.eye(3, dtype=F64))).sigma == pytest.approx(0.05)


# ---------------------------------------------------------------- a bulk and outliers, like a trained net's Hessian


@pytest.fixture(scope="module")
def outlier_spectrum():
    matrix, eigenvalues, basis = bulk_and_outliers()
    return matrix, eigenvalues, basis, spectral_density(MatrixOperator(matrix), n_runs=50, n_steps=25, seed=1)


def test_density_integrates_to_one_and_weights_sum_to_one_per_run(outlier_spectrum):
    *_, den = outlier_spectrum
    assert den.nodes.shape == den.weights.shape == (50, 25) and den.n_hvp == 1250
    assert den.weights.sum(axis=1) == pytest.approx(np.ones(50), abs=1e-12)
    assert np.all(den.weights >= 0)
    assert float(np.trapezoid(den.density, den.grid)) == pytest.approx(1.0, abs=1e-7)
    assert np.all(np.diff(den.grid) > 0) and den.grid.size == 1000


def test_nodes_lie_in_the_spectrum_and_each_outlier_is_found_once_per_run(outlier_spectrum):
    _, eigenvalues, _, den = outlier_spectrum
    assert den.nodes.min() >= float(eigenvalues.min()) - 1e-9
    assert den.nodes.max() <= float(eigenvalues.max()) + 1e-9
    for outlier in OUTLIERS:
        near = np.abs(den.nodes - outlier) < 1e-6
        # One converged copy per run: without reorthogonalisation Lanczos would grow ghost copies.
        assert near.sum(axis=1).tolist() == [1] * 50


def test_outlier_mass_is_their_count_over_n(outlier_spectrum):
    matrix, _, basis, den = outlier_spectrum
    n, runs = matrix.shape[0], den.nodes.shape[0]
    outlier_projector = basis[:, -5:] @ basis[:, -5:].T
    tolerance = 4 * rademacher_quadratic_form_std(outlier_projector, n) / math.sqrt(runs)
    assert mass(den, 10.0, 50.0) == pytest.approx(5 / n, abs=tolerance)
    # The bulk lies in [-0.5, 1]; sigma is 1% of the range (0.4), so its smoothed mass sits within [-3, 4].
    assert mass(den, -3.0, 4.0) == pytest.approx(1 - 5 / n, abs=tolerance)
    assert mass(den, 4.0, 10.0) < 1e-3  # nothing in the gap
    assert tolerance < 0.4 * 5 / n  # the check has teeth: the error bar is well below the mass itself


def test_first_and_second_moments_match_the_dense_spectrum(outlier_spectrum):
    matrix, eigenvalues, _, den = outlier_spectrum
    n, runs = matrix.shape[0], den.nodes.shape[0]
    first = float(np.trapezoid(den.grid * den.density, den.grid))
    second = float(np.trapezoid(den.grid**2 * den.density, den.grid))
    # Smoothing keeps each node's mean and adds sigma^2 to its second moment.
    assert first == pytest.approx(float((den.weights * den.nodes).sum(axis=1).mean()), abs=1e-6)
    assert second == pytest.approx(float((den.weights * den.nodes**2).sum(axis=1).mean()) + den.sigma**2, rel=1e-6)
    # Gauss quadrature is exact for degree <= 2m - 1: per run, sum tau theta^k = v^T H^k v, whose mean is tr(H^k)/n.
    first_tolerance = 4 * rademacher_quadratic_form_std(matrix, n) / math.sqrt(runs)
    assert first == pytest.approx(float(eigenvalues.mean()), abs=first_tolerance)
    second_tolerance = 4 * rademacher_quadratic_form_std(matrix @ matrix, n) / math.sqrt(runs)
    assert second - den.sigma**2 == pytest.approx(float(eigenvalues.pow(2).mean()), abs=second_tolerance)


def test_a_bounded_basis_keeps_each_run_an_exact_quadrature_of_its_probe(outlier_spectrum):
    # Reorthogonalised against its last 3 vectors only, Lanczos loses orthogonality once the outliers converge and
    # T gains spurious copies of them; yet its quadrature stays exact for the probe's moments v^T H^p v, for
    # every degree a full basis makes exact here (Greenbaum 1989): the density moves, the moments do not.
    matrix = outlier_spectrum[0]
    op, n_steps = MatrixOperator(matrix), 25
    full = spectral_density(op, n_runs=4, n_steps=n_steps, seed=3)
    bounded = spectral_density(op, n_runs=4, n_steps=n_steps, seed=3, max_basis=3)
    assert bounded.n_hvp == full.n_hvp == 4 * n_steps
    assert np.abs(full.nodes - 40.0).min(axis=1).max() < 1e-9  # the top outlier converged in every run
    ghosts = (np.abs(bounded.nodes - 40.0) < 1e-6).sum(axis=1)
    assert (np.abs(full.nodes - 40.0) < 1e-6).sum(axis=1).tolist() == [1] * 4 and ghosts.max() >= 2
    powers = [torch.linalg.matrix_power(matrix, p) for p in range(1, 2 * n_steps)]
    generator = probe_generator(op, 3)  # the density's own start vectors, normalised
    for run in range(4):
        probe = random_probe(op, generator)
        probe /= probe.norm()
        for p, power in enumerate(powers, start=1):
            exact = float(probe @ power @ probe)
            for den in (full, bounded):
                quadrature = float((den.weights[run] * den.nodes[run] ** p).sum())
                assert quadrature == pytest.approx(exact, rel=1e-8, abs=1e-12 * 40.0**p)


def test_the_default_basis_is_bounded_by_memory_on_a_large_operator():
    class Diagonal(MatrixOperator):
        def __init__(self, n: int) -> None:
            super(MatrixOperator, self).__init__(n, torch.device("cpu"), torch.float32)
            self.diagonal = torch.linspace(-1.0, 1.0, n)
            self.diagonal[:3] = torch.tensor([10.0, 20.0, 30.0])

        def _matvec(self, v: torch.Tensor) -> torch.Tensor:
            return self.diagonal * v

    # 2^24 float32 entries (64 MiB a vector): 4 fit in 256 MiB, so the 12 steps hold 4 vectors, not 13. A
    # spurious copy of the top outlier shows the window: with all 13 vectors (max_basis=13) exactly one node lies
    # within 0.05 of 30 (checked when this test was written).
    op = Diagonal(1 << 24)
    den = spectral_density(op, n_runs=1, n_steps=12, n_grid=10)
    assert den.n_hvp == 12 and den.weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert (np.abs(den.nodes[0] - 30.0) < 0.05).sum() >= 2


# ---------------------------------------------------------------- options, randomness, results, bad input


def test_n_steps_is_capped_at_the_dimension():
    den = spectral_density(MatrixOperator(torch.diag(torch.arange(1.0, 8.0, dtype=F64))), n_runs=2, n_steps=50)
    assert den.nodes.shape == (2, 7)
    assert den.nodes[0] == pytest.approx(np.arange(1.0, 8.0), abs=1e-9)
    assert den.weights[0] == pytest.approx(np.full(7, 1 / 7), abs=1e-12)


def test_grid_may_be_given_as_a_tensor_or_list_and_n_grid_sets_the_default_size():
    op = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=F64)))
    from_tensor = spectral_density(op, grid=torch.linspace(0.0, 3.0, 7), sigma=0.5)
    from_list = spectral_density(op, grid=torch.linspace(0.0, 3.0, 7).tolist(), sigma=0.5)
    assert np.array_equal(from_tensor.density, from_list.density) and from_tensor.grid.size == 7
    assert spectral_density(op, n_grid=50).grid.size == 50


def test_same_seed_same_density_and_the_global_rng_untouched():
    matrix, *_ = bulk_and_outliers(n=60)
    op = MatrixOperator(matrix)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = spectral_density(op, n_runs=2, n_steps=10, seed=4)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()
    again = spectral_density(op, n_runs=2, n_steps=10, seed=4)
    other = spectral_density(op, n_runs=2, n_steps=10, seed=5)
    assert np.array_equal(first.density, again.density) and np.array_equal(first.nodes, again.nodes)
    assert not np.allclose(first.weights, other.weights)


def test_float32_operator():
    matrix, eigenvalues, *_ = bulk_and_outliers(n=80)
    den = spectral_density(MatrixOperator(matrix.float()), n_runs=2, n_steps=20)
    assert den.weights.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert den.nodes.max() == pytest.approx(40.0, rel=1e-4)
    assert den.nodes.min() >= float(eigenvalues.min()) - 1e-4


def test_to_dict_is_plain_and_json_ready():
    den = spectral_density(MatrixOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=F64))), n_runs=2, n_grid=5)
    data = json.loads(json.dumps(den.to_dict()))
    assert set(data) == {"grid", "density", "nodes", "weights", "sigma", "n_hvp"}
    assert data["nodes"] == den.nodes.tolist() and len(data["weights"]) == 2 and data["n_hvp"] == den.n_hvp


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_runs": 0}, "n_runs must be >= 1"),
        ({"n_steps": 0}, "n_steps must be >= 1"),
        ({"n_steps": 2.0}, "n_steps must be an integer"),
        ({"n_grid": 1}, "n_grid must be >= 2"),
        ({"grid": [0.0, 1.0], "n_grid": 10}, "not both"),
        ({"grid": [[0.0, 1.0]]}, "grid must be a 1-D array"),
        ({"grid": [1.0, 0.0]}, "strictly ascending"),
        ({"grid": [0.0, float("inf")]}, "finite"),
        ({"sigma": 0.0}, "sigma must be a positive number"),
        ({"sigma": -1.0}, "sigma must be a positive number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"max_basis": 1}, "max_basis must be >= 2"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_cause(kwargs, message):
    op = MatrixOperator(torch.eye(4, dtype=F64))
    with pytest.raises(UsageError, match=message) as info:
        spectral_density(op, **kwargs)
    assert isinstance(info.value, ValueError) and op.n_hvp == 0


def test_not_an_operator_is_rejected_by_name():
    with pytest.raises(UsageError, match="expected a CurvatureOperator"):
        spectral_density(np.eye(3))


def test_non_finite_products_raise():
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        spectral_density(nan_operator(), n_runs=1, n_steps=3)


def test_end_to_end_on_a_hessian_operator_of_the_linear_net():
    model, batch, target_map = linear_net_problem(d_in=3, hidden=2, d_out=2, n=12, seed=0)
    op = HessianOperator(model, supervised_loss(half_squared_error), batch)
    den = spectral_density(op, n_runs=3, n_steps=10)
    singular = torch.linalg.svdvals(target_map).tolist()
    expected = [-singular[0], -singular[1], 0.0, singular[1], singular[0]]
    assert den.nodes[:, :5] == pytest.approx(np.tile(expected, (3, 1)), abs=1e-9)
    assert den.n_hvp == op.n_hvp == 15
