"""Specification of the eigensolvers: Lanczos ``top_eigenvalues``, ``power_iteration`` and ``lanczos_tridiagonal``.

Every check is against an exact answer: known spectra wrapped in ``MatrixOperator`` (float64), ``torch.linalg.eigh``
of the same matrix, closed forms of power iteration, and dense Hessians of a small network.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from optdiag.curvature.base import CurvatureOperator, MatrixOperator
from optdiag.curvature.lanczos import EigenResult, lanczos_tridiagonal, power_iteration, top_eigenvalues
from optdiag.curvature.operator import HessianOperator, supervised_loss
from optdiag.errors import NonFiniteError
from tests.models import TinyCNN, TinyMLP, cnn_batch, mlp_batch, reference_hessian

F64 = torch.float64


def rotated(eigenvalues: torch.Tensor, seed: int, reflections: int = 4) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with ``Q`` a product of random Householder reflections (float64, symmetric).

    A few reflections already make every eigenvector dense, at O(n^2) cost instead of a QR of a random matrix.
    """
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.diag(eigenvalues.to(F64))
    for _ in range(reflections):
        u = torch.randn(eigenvalues.numel(), generator=generator, dtype=F64)
        u /= u.norm()
        au = matrix @ u
        matrix = matrix - 2 * torch.outer(u, au) - 2 * torch.outer(au, u) + 4 * (u @ au) * torch.outer(u, u)
    return 0.5 * (matrix + matrix.T)


def random_symmetric(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=generator, dtype=F64)
    return (a + a.T) / math.sqrt(2 * n)


def true_residuals(matrix: torch.Tensor, result: EigenResult) -> torch.Tensor:
    u = result.eigenvectors.to(F64)
    return torch.linalg.vector_norm(u @ matrix - result.eigenvalues.to(F64)[:, None] * u, dim=1)


@pytest.fixture(scope="module")
def theory_spectrum() -> tuple[torch.Tensor, torch.Tensor]:
    """docs/theory.md section 7: eigenvalues {100, 95, 998 values uniform in [-5, 20]}, randomly rotated (n = 1000)."""
    bulk = -5.0 + 25.0 * torch.rand(998, generator=torch.Generator().manual_seed(7), dtype=F64)
    eigenvalues = torch.cat([torch.tensor([100.0, 95.0], dtype=F64), bulk])
    return rotated(eigenvalues, seed=11), torch.sort(eigenvalues).values


# ---------------------------------------------------------------------------------------------------------------
# docs/theory.md section 7 numbers


def test_lanczos_finds_the_top_eigenvalue_of_the_theory_spectrum_in_a_few_products(theory_spectrum):
    matrix, exact = theory_spectrum
    ten_steps = top_eigenvalues(MatrixOperator(matrix), k=1, tol=1e-14, max_hvp=10)
    assert ten_steps.n_hvp == 10
    assert abs(ten_steps.eigenvalues.item() - 100.0) < 1e-8  # docs/theory.md section 7: 9e-10 after 10 steps

    tight = top_eigenvalues(MatrixOperator(matrix), k=1, tol=1e-10)
    assert tight.converged
    assert tight.n_hvp <= 20
    assert abs(tight.eigenvalues.item() - 100.0) < 1e-10
    assert tight.residuals.item() <= 1e-10 * tight.scale
    assert tight.scale == pytest.approx(100.0, rel=1e-12)


def test_lanczos_lambda_min_of_the_theory_spectrum_after_40_products(theory_spectrum):
    matrix, exact = theory_spectrum
    previous = math.inf
    for steps in (10, 20, 40):
        value = top_eigenvalues(MatrixOperator(matrix), k=1, which="SA", tol=1e-14, max_hvp=steps).eigenvalues.item()
        # Cauchy interlacing: a Ritz value never passes the extreme eigenvalue and only improves with steps.
        assert exact[0].item() - 1e-9 <= value <= previous + 1e-9
        previous = value
    errors = [previous - exact[0].item()]
    for seed in range(1, 5):
        ritz = top_eigenvalues(MatrixOperator(matrix), k=1, which="SA", tol=1e-14, max_hvp=40, seed=seed)
        errors.append(ritz.eigenvalues.item() - exact[0].item())
    # docs/theory.md section 7 quotes 0.008 for one start vector; over start vectors the error is of that order.
    assert float(np.median(errors)) < 2 * 0.008
    assert max(errors) < 0.05


def power_iteration_error(eigenvalues: torch.Tensor, components: torch.Tensor, products: int) -> float:
    """Closed form: after t products the Rayleigh quotient weighs each eigenvalue by c_i^2 lambda_i^(2(t-1))."""
    log_weights = 2 * torch.log(components.abs()) + 2 * (products - 1) * torch.log(eigenvalues.abs())
    weights = torch.softmax(log_weights, dim=0)
    return float(eigenvalues.abs().max() - (weights * eigenvalues).sum())


def test_power_iteration_follows_its_closed_form_and_the_theory_numbers():
    bulk = -5.0 + 25.0 * torch.rand(998, generator=torch.Generator().manual_seed(3), dtype=F64)
    eigenvalues = torch.cat([torch.tensor([100.0, 95.0], dtype=F64), bulk])
    op = MatrixOperator(torch.diag(eigenvalues))  # power iteration is rotation invariant: work in the eigenbasis
    # The 4.66 after 10 products (docs/theory.md section 7) fixes the start's weight ratio rho = c_95^2 / c_100^2
    # through 5 * r = 4.66 with r = rho q / (1 + rho q), q = 0.95^18 (the bulk has decayed by (20/100)^18 ~ 3e-13).
    r = 4.66 / 5.0
    rho = r / (1 - r) / 0.95**18
    components = torch.rand(1000, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.5
    components[0], components[1] = 1.0, math.sqrt(rho)
    quoted = {10: 4.66, 40: 1.93, 60: 0.37}
    errors = []
    for products, theory in quoted.items():
        result = power_iteration(op, tol=1e-15, max_hvp=products, v0=components)
        assert result.n_hvp == products and not result.converged
        error = 100.0 - result.eigenvalues.item()
        assert error == pytest.approx(power_iteration_error(eigenvalues, components, products), rel=1e-9)
        # 40 and 60 are predictions from the 10-product calibration: they must reproduce docs/theory.md section 7.
        assert theory / 1.5 < error < theory * 1.5
        errors.append(error)
    assert errors[0] > errors[1] > errors[2]


def test_power_iteration_with_a_random_start_matches_the_closed_form(theory_spectrum):
    matrix, exact = theory_spectrum
    op = MatrixOperator(matrix)
    errors = [100.0 - power_iteration(op, tol=1e-15, max_hvp=t, seed=4).eigenvalues.item() for t in (10, 40, 60)]
    assert errors[0] > errors[1] > errors[2] > 0
    lanczos = top_eigenvalues(op, k=1, tol=1e-15, max_hvp=10, seed=4)
    assert 100.0 - lanczos.eigenvalues.item() < 1e-6 * errors[2]  # Lanczos at 10 beats power iteration at 60


def test_power_iteration_finds_the_largest_magnitude_even_if_negative():
    op = MatrixOperator(torch.diag(torch.tensor([1.0, -4.0, 2.0, 0.5], dtype=F64)))
    result = power_iteration(op, tol=1e-10)
    assert result.converged and result.which == "LM"
    assert result.eigenvalues.item() == pytest.approx(-4.0, abs=1e-9)
    assert abs(result.eigenvectors[0, 1].item()) == pytest.approx(1.0, abs=1e-9)
    assert result.residuals.item() == pytest.approx(true_residuals(op.matrix, result).item(), abs=1e-12)
    assert result.n_hvp == op.n_hvp


# ---------------------------------------------------------------------------------------------------------------
# Against torch.linalg.eigh


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_top5_matches_eigh_on_a_random_symmetric_matrix(which):
    matrix = random_symmetric(120, seed=1)
    exact = torch.linalg.eigvalsh(matrix)
    result = top_eigenvalues(MatrixOperator(matrix), k=5, which=which, tol=1e-9, max_hvp=2000)
    if which == "LA":
        expected = torch.flip(exact, [0])[:5]
    elif which == "SA":
        expected = exact[:5]
    else:
        expected = exact[torch.argsort(-exact.abs(), stable=True)][:5]
    assert result.converged and result.which == which
    torch.testing.assert_close(result.eigenvalues, expected, rtol=0, atol=1e-8)
    assert result.eigenvalues.dtype == F64 and result.eigenvalues.device.type == "cpu"
    assert result.eigenvectors.shape == (5, 120)
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(5, dtype=F64), atol=1e-8, rtol=0)
    assert torch.all(result.residuals <= 1e-9 * result.scale)
    torch.testing.assert_close(result.residuals, true_residuals(matrix, result), atol=1e-12, rtol=1e-3)
    # The scale is the largest Ritz magnitude: at least the wanted ones, at most the true spectral radius.
    assert result.eigenvalues.abs().max() <= result.scale <= exact.abs().max() + 1e-12


def test_lm_orders_by_magnitude_across_signs():
    op = MatrixOperator(rotated(torch.tensor([3.0, -10.0, 1.0, 7.0, -0.5, 0.2], dtype=F64), seed=2))
    result = top_eigenvalues(op, k=3, which="LM", tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([-10.0, 7.0, 3.0], dtype=F64), atol=1e-9, rtol=0)


def test_k_equal_to_n_returns_the_whole_spectrum_in_n_products():
    matrix = random_symmetric(12, seed=3)
    op = MatrixOperator(matrix)
    result = top_eigenvalues(op, k=12, which="SA", tol=1e-10)
    assert result.converged and result.n_hvp == 12
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(matrix), atol=1e-10, rtol=0)
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(12, dtype=F64), atol=1e-10, rtol=0)


def test_thick_restarts_keep_memory_fixed_and_still_converge():
    matrix = random_symmetric(200, seed=4)
    result = top_eigenvalues(MatrixOperator(matrix), k=6, which="LA", tol=1e-8, max_hvp=3000, max_basis=16)
    assert result.converged
    assert result.n_hvp > 16  # it had to restart to get there
    torch.testing.assert_close(result.eigenvalues, torch.flip(torch.linalg.eigvalsh(matrix), [0])[:6], atol=1e-7, rtol=0)
    torch.testing.assert_close(result.residuals, true_residuals(matrix, result), atol=1e-10, rtol=1e-3)


def test_many_eigenpairs_with_the_default_basis(theory_spectrum):
    matrix, exact = theory_spectrum
    result = top_eigenvalues(MatrixOperator(matrix), k=12, which="SA", tol=1e-6, max_hvp=3000)
    assert result.converged
    assert result.n_hvp > 60  # more products than the default basis holds: thick restarts happened
    torch.testing.assert_close(result.eigenvalues, exact[:12], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Degenerate spectra: no exception, honest answers


def test_rank_deficient_matrix_returns_zeros_and_converges():
    generator = torch.Generator().manual_seed(5)
    factor = torch.randn(50, 3, generator=generator, dtype=F64)
    matrix = factor @ factor.T  # rank 3, positive semi-definite (like a Gauss-Newton matrix)
    exact = torch.flip(torch.linalg.eigvalsh(matrix), [0])
    result = top_eigenvalues(MatrixOperator(matrix), k=5, which="LA", tol=1e-8)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues[:3], exact[:3], atol=1e-8, rtol=0)
    torch.testing.assert_close(result.eigenvalues[3:], torch.zeros(2, dtype=F64), atol=1e-8, rtol=0)
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(5, dtype=F64), atol=1e-8, rtol=0)
    assert torch.all(true_residuals(matrix, result) <= 1e-8 * result.scale)


def test_scaled_identity_gives_every_copy():
    op = MatrixOperator(2.5 * torch.eye(30, dtype=F64))
    result = top_eigenvalues(op, k=4, which="SA", tol=1e-10)
    assert result.converged and result.n_hvp == 5  # the range start's product, then one per copy
    torch.testing.assert_close(result.eigenvalues, torch.full((4,), 2.5, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)


def test_zero_operator_is_converged_with_zero_eigenvalues():
    result = top_eigenvalues(MatrixOperator(torch.zeros(8, 8, dtype=F64)), k=3, which="LM")
    assert result.converged
    assert torch.equal(result.eigenvalues, torch.zeros(3, dtype=F64))


def test_block_lanczos_resolves_a_repeated_top_eigenvalue():
    eigenvalues = torch.cat([torch.full((3,), 10.0, dtype=F64), torch.linspace(-2.0, 6.0, 197, dtype=F64)])
    matrix = rotated(eigenvalues, seed=6)
    result = top_eigenvalues(MatrixOperator(matrix), k=4, which="LA", tol=1e-9, block=3, max_hvp=600)
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([10.0, 10.0, 10.0, 6.0], dtype=F64), atol=1e-8, rtol=0
    )
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(4, dtype=F64), atol=1e-8, rtol=0)


def test_block_lanczos_resolves_two_eigenvalues_with_multiplicity():
    # Two distinct values: a single-vector Krylov space is invariant after 2 steps; a block of 3 holds every copy.
    eigenvalues = torch.tensor([4.0] * 3 + [1.0] * 9, dtype=F64)
    result = top_eigenvalues(MatrixOperator(rotated(eigenvalues, seed=8)), k=4, which="LA", tol=1e-10, block=3)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=F64), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Budget, warm starts, determinism


def test_not_converged_when_the_budget_is_too_small(theory_spectrum):
    matrix, _ = theory_spectrum
    op = MatrixOperator(matrix)
    result = top_eigenvalues(op, k=2, which="SA", tol=1e-8, max_hvp=5)
    assert not result.converged
    assert result.n_hvp == 5 == op.n_hvp
    assert torch.any(result.residuals > 1e-8 * result.scale)
    torch.testing.assert_close(result.residuals, true_residuals(matrix, result), atol=1e-10, rtol=1e-6)


def test_n_hvp_is_what_the_operator_counted(theory_spectrum):
    matrix, _ = theory_spectrum
    op = MatrixOperator(matrix)
    first = top_eigenvalues(op, k=3, which="LA", tol=1e-6)
    second = top_eigenvalues(op, k=2, which="SA", tol=1e-3, block=2)
    assert first.n_hvp + second.n_hvp == op.n_hvp
    assert second.n_hvp % 2 == 0 or second.n_hvp == 200  # block 2: products come in pairs unless capped


@pytest.mark.parametrize("which, k, tol", [("SA", 3, 1e-4), ("LA", 5, 1e-4), ("SA", 1, 1e-4)])
def test_warm_start_from_a_previous_result_needs_far_fewer_products(theory_spectrum, which, k, tol):
    matrix, _ = theory_spectrum
    cold = top_eigenvalues(MatrixOperator(matrix), k=k, which=which, tol=tol, max_hvp=1000)
    assert cold.converged
    # A nearby operator (training moved a little): warm start from the previous eigenvectors.
    moved_matrix = matrix + 1e-3 * random_symmetric(1000, seed=9)
    moved = MatrixOperator(moved_matrix)
    warm = top_eigenvalues(moved, k=k, which=which, tol=tol, max_hvp=1000, v0=cold)
    recold = top_eigenvalues(moved, k=k, which=which, tol=tol, max_hvp=1000, seed=1)
    assert warm.converged and recold.converged
    assert warm.n_hvp * 2 <= recold.n_hvp
    assert torch.all(true_residuals(moved_matrix, warm) <= 1.01 * tol * warm.scale)


def test_start_vector_that_is_the_wanted_eigenvector_converges_in_a_few_products():
    # The solver cannot tell a right eigenvector from a wrong one by its residual alone (see the interior
    # eigenvector test below), so even the exact answer as v0 is checked against the rest of the spectrum.
    eigenvalues = torch.cat([torch.tensor([5.0]), torch.linspace(-1.0, 3.0, 99)]).to(F64)
    op = MatrixOperator(torch.diag(eigenvalues))
    start = torch.zeros(100, dtype=F64)
    start[0] = 1.0
    warm = top_eigenvalues(op, k=1, tol=1e-8, v0=start)
    cold = top_eigenvalues(op, k=1, tol=1e-8)
    assert warm.converged and warm.eigenvalues.item() == pytest.approx(5.0, abs=1e-12)
    assert warm.n_hvp < cold.n_hvp


def test_same_seed_same_result_and_the_global_rng_is_untouched(theory_spectrum):
    matrix, _ = theory_spectrum
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = top_eigenvalues(MatrixOperator(matrix), k=3, which="LA", tol=1e-5, seed=3)
    power_iteration(MatrixOperator(matrix), max_hvp=5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = top_eigenvalues(MatrixOperator(matrix), k=3, which="LA", tol=1e-5, seed=3)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.n_hvp == b.n_hvp
    c = top_eigenvalues(MatrixOperator(matrix), k=3, which="LA", tol=1e-5, seed=4)
    assert not torch.equal(a.eigenvectors, c.eigenvectors)


def test_float32_operator_keeps_its_dtype():
    matrix = random_symmetric(80, seed=10)
    result = top_eigenvalues(MatrixOperator(matrix.float()), k=2, which="LA", tol=1e-4)
    assert result.converged
    assert result.eigenvalues.dtype == torch.float32 and result.eigenvectors.dtype == torch.float32
    expected = torch.flip(torch.linalg.eigvalsh(matrix), [0])[:2].float()
    torch.testing.assert_close(result.eigenvalues, expected, atol=1e-3 * result.scale, rtol=0)


def test_to_dict_is_plain_json():
    result = top_eigenvalues(MatrixOperator(torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64))), k=2)
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"eigenvalues", "residuals", "converged", "n_hvp", "which", "scale"}
    assert data["eigenvalues"] == pytest.approx([2.0, 1.0], abs=1e-12)
    assert data["n_hvp"] == result.n_hvp and data["which"] == "LA"


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be >= 1"),
        ({"k": 2.0}, "k must be an integer"),
        ({"k": 7}, "k=7 eigenpairs asked of an operator with only num_params=6"),
        ({"which": "LR"}, "which must be one of"),
        ({"tol": 0.0}, "tol must be a positive"),
        ({"tol": -1e-3}, "tol must be a positive"),
        ({"tol": float("nan")}, "tol must be a positive"),
        ({"k": 3, "max_hvp": 2}, "max_hvp=2 is too small for k=3"),
        ({"block": 0}, "block must be >= 1"),
        ({"k": 2, "max_basis": 3}, "max_basis=3 is too small"),
        ({"v0": torch.ones(5, dtype=F64)}, "num_params=6"),
        ({"v0": torch.full((6,), float("nan"), dtype=F64)}, "NaN or Inf"),
        ({"v0": [1.0] * 6}, "v0 must be a tensor, an EigenResult or None"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_cause(kwargs, message):
    op = MatrixOperator(torch.eye(6, dtype=F64))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        top_eigenvalues(op, **kwargs)


def test_not_an_operator_and_bad_power_iteration_arguments():
    with pytest.raises(ValueError, match="expected a CurvatureOperator"):
        top_eigenvalues(torch.eye(3))
    op = MatrixOperator(torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="max_hvp must be >= 1"):
        power_iteration(op, max_hvp=0)
    with pytest.raises(ValueError, match="tol must be a positive"):
        power_iteration(op, tol=0)


class NaNOperator(CurvatureOperator):
    def __init__(self) -> None:
        super().__init__(4, torch.device("cpu"), F64)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return torch.full_like(v, float("nan"))


def test_non_finite_products_raise_non_finite_error():
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        top_eigenvalues(NaNOperator())
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        power_iteration(NaNOperator())


# ---------------------------------------------------------------------------------------------------------------
# lanczos_tridiagonal (the plain recurrence, for quadrature)


def test_lanczos_tridiagonal_is_the_projection_on_an_orthonormal_krylov_basis():
    matrix = random_symmetric(40, seed=12)
    start = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=F64)
    alphas, betas, basis = lanczos_tridiagonal(MatrixOperator(matrix), start, 15)
    assert alphas.shape == (15,) and betas.shape == (14,) and basis.shape == (15, 40)
    torch.testing.assert_close(basis @ basis.T, torch.eye(15, dtype=F64), atol=1e-12, rtol=0)
    projected = (basis @ matrix @ basis.T).numpy()
    expected = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    np.testing.assert_allclose(projected, expected, atol=1e-12)
    np.testing.assert_allclose(basis[0].numpy(), (start / start.norm()).numpy(), atol=1e-14)
    # quadrature needs only T: without the basis (a copy of every vector) the same T comes back
    alphas_only, betas_only, none = lanczos_tridiagonal(MatrixOperator(matrix), start, 15, return_basis=False)
    assert none is None
    np.testing.assert_array_equal(alphas_only, alphas)
    np.testing.assert_array_equal(betas_only, betas)


def test_lanczos_tridiagonal_stops_at_an_invariant_subspace():
    op = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 2.0, 3.0, 3.0, 3.0], dtype=F64)))
    alphas, betas, basis = lanczos_tridiagonal(op, torch.ones(6, dtype=F64), 6)
    assert alphas.size == 3 and basis.shape == (3, 6)  # three distinct eigenvalues
    np.testing.assert_allclose(np.sort(scipy.linalg.eigh_tridiagonal(alphas, betas)[0]), [1.0, 2.0, 3.0], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# A real network's Hessian


def tiny_model(cls: type[nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():  # default initialisation draws from the global RNG: keep it out of the test
        torch.manual_seed(seed)
        return cls().double()


def test_tiny_mlp_dense_hessian_extremes_match_eigh():
    model = tiny_model(TinyMLP, seed=13)  # 43 parameters, indefinite away from a minimum
    hessian = reference_hessian(model, nn.MSELoss(), [mlp_batch(32, seed=13)])
    hessian = 0.5 * (hessian + hessian.T)
    exact = torch.linalg.eigvalsh(hessian)
    top = top_eigenvalues(MatrixOperator(hessian), k=3, which="LA", tol=1e-9)
    bottom = top_eigenvalues(MatrixOperator(hessian), k=2, which="SA", tol=1e-9)
    assert top.converged and bottom.converged
    assert exact[0] < 0 < exact[-1]
    torch.testing.assert_close(top.eigenvalues, torch.flip(exact, [0])[:3], atol=1e-8 * top.scale, rtol=0)
    torch.testing.assert_close(bottom.eigenvalues, exact[:2], atol=1e-8 * bottom.scale, rtol=0)
    torch.testing.assert_close(top.residuals, true_residuals(hessian, top), atol=1e-12, rtol=1e-3)


def test_hessian_operator_of_a_cnn_matches_its_dense_hessian():
    model = tiny_model(TinyCNN, seed=14).eval()  # 81 parameters; eval mode: BatchNorm uses running statistics
    batch = cnn_batch(24, seed=14)
    hessian = reference_hessian(model, nn.CrossEntropyLoss(), [batch])
    exact = torch.linalg.eigvalsh(0.5 * (hessian + hessian.T))
    op = HessianOperator(model, supervised_loss(nn.CrossEntropyLoss()), batch)
    top = top_eigenvalues(op, k=2, which="LA", tol=1e-8)
    bottom = top_eigenvalues(op, k=1, which="SA", tol=1e-8, max_hvp=81)
    assert top.converged and bottom.converged
    assert top.n_hvp + bottom.n_hvp == op.n_hvp
    torch.testing.assert_close(top.eigenvalues, torch.flip(exact, [0])[:2], atol=1e-7 * top.scale, rtol=0)
    torch.testing.assert_close(bottom.eigenvalues, exact[:1], atol=1e-7 * bottom.scale, rtol=0)
    torch.testing.assert_close(top.residuals, true_residuals(hessian, top), atol=1e-10, rtol=1e-3)


@pytest.mark.parametrize("which, expected_index", [("SA", 0), ("LA", -1)])
@pytest.mark.parametrize("perturbation", [0.0, 1e-4])
def test_warm_start_on_an_interior_eigenvector_still_finds_the_extreme(which, expected_index, perturbation):
    # A warm start from a Hessian that has since changed can be (nearly) an eigenvector of an interior eigenvalue
    # of the new one: alone it spans an invariant subspace whose Ritz residual is ~0, so a solver that trusts it
    # reports the interior eigenvalue as converged after one product. The solver must find the true extreme.
    n = 200
    generator = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    spectrum = torch.linspace(-0.05, 10.0, n, dtype=torch.float64)
    op = MatrixOperator(q @ torch.diag(spectrum) @ q.T)
    start = q[:, 150] + perturbation * torch.randn(n, generator=generator, dtype=torch.float64)
    result = top_eigenvalues(op, k=1, which=which, tol=1e-6, v0=start)
    assert result.converged
    assert float(result.eigenvalues[0]) == pytest.approx(float(spectrum[expected_index]), abs=1e-4)



# ---------------------------------------------------------------------------------------------------------------
# Bounded memory: the basis never exceeds max_basis vectors, is allocated as it grows, and stays orthonormal


class DiagonalOperator(CurvatureOperator):
    """``diag(d)`` without a dense matrix: large ``n`` at the cost of one multiply per product."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        super().__init__(diagonal.numel(), diagonal.device, diagonal.dtype)
        self.diagonal = diagonal

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.diagonal * v


@pytest.mark.parametrize("which, k, max_basis", [("LA", 5, 12), ("SA", 2, 8), ("SA", 3, 10)])
def test_bounded_basis_matches_eigh_and_never_holds_more_than_max_basis(theory_spectrum, which, k, max_basis):
    matrix, exact = theory_spectrum
    result = top_eigenvalues(MatrixOperator(matrix), k=k, which=which, tol=1e-8, max_hvp=5000, max_basis=max_basis)
    assert result.converged
    assert result.n_hvp > max_basis  # it restarted
    assert k < result.basis_rows <= max_basis
    expected = torch.flip(exact, [0])[:k] if which == "LA" else exact[:k]
    torch.testing.assert_close(result.eigenvalues, expected, atol=1e-8 * result.scale, rtol=0)
    torch.testing.assert_close(result.residuals, true_residuals(matrix, result), atol=1e-10, rtol=1e-3)
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)


def test_default_basis_is_bounded_by_memory_for_large_operators():
    # 1M float64 parameters: 8 MB a vector, so the default basis holds what fits in 256 MiB (33 vectors), not 60.
    n = 1_000_000
    diagonal = torch.linspace(-1.0, 1.0, n, dtype=F64)
    diagonal[:3] = torch.tensor([3.0, 2.5, 2.2], dtype=F64)
    result = top_eigenvalues(DiagonalOperator(diagonal), k=3, which="LA", tol=1e-6, max_hvp=400)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([3.0, 2.5, 2.2], dtype=F64), atol=1e-6, rtol=0)
    assert result.basis_rows <= 256 * 2**20 // (8 * n) == 33


def test_the_basis_is_allocated_as_it_grows():
    # A separated top eigenvalue converges in a few products: the basis holds a few vectors, not its 60 allowed.
    diagonal = torch.cat([torch.tensor([10.0]), torch.linspace(0.0, 1.0, 999)]).to(F64)
    result = top_eigenvalues(DiagonalOperator(diagonal), k=1, which="LA", tol=1e-6, max_basis=60)
    assert result.converged and result.n_hvp <= 12
    assert result.basis_rows <= 15  # one slab of a quarter of max_basis


def test_cgs2_keeps_the_basis_orthonormal_on_a_hard_spectrum():
    # Eigenvalues spread over 12 orders of magnitude with a tight cluster on top: without reorthogonalisation
    # Lanczos loses orthogonality within a few dozen steps (ghost copies of the top eigenvalue).
    n = 400
    eigenvalues = torch.cat([1.0 + 1e-10 * torch.arange(5, dtype=F64), torch.logspace(-12, -1, n - 5, dtype=F64)])
    matrix = rotated(eigenvalues, seed=21)
    start = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    alphas, betas, basis = lanczos_tridiagonal(MatrixOperator(matrix), start, 250)
    assert basis.shape[0] == 250
    assert float((basis @ basis.T - torch.eye(250, dtype=F64)).abs().max()) < 1e-13
    ritz = scipy.linalg.eigh_tridiagonal(alphas, betas)[0]
    assert int(np.sum(np.abs(ritz - 1.0) < 1e-6)) <= 5  # no ghost copies of the top cluster


def test_cgs2_orthogonality_in_float32_with_restarts():
    matrix = random_symmetric(300, seed=22).float()
    result = top_eigenvalues(MatrixOperator(matrix), k=6, which="LA", tol=1e-4, max_hvp=2000, max_basis=14)
    assert result.converged and result.eigenvectors.dtype == torch.float32
    assert float((result.eigenvectors @ result.eigenvectors.T - torch.eye(6)).abs().max()) < 1e-5
    exact = torch.flip(torch.linalg.eigvalsh(matrix.double()), [0])[:6]
    torch.testing.assert_close(result.eigenvalues.double(), exact, atol=2e-4 * result.scale, rtol=0)


def test_basis_on_the_cpu_gives_the_same_result_and_bad_devices_are_refused(theory_spectrum):
    matrix, _ = theory_spectrum
    here = top_eigenvalues(MatrixOperator(matrix), k=2, which="LA", tol=1e-8)
    on_cpu = top_eigenvalues(MatrixOperator(matrix), k=2, which="LA", tol=1e-8, basis_device="cpu")
    assert torch.equal(here.eigenvalues, on_cpu.eigenvalues) and here.n_hvp == on_cpu.n_hvp
    assert on_cpu.eigenvectors.device == matrix.device
    with pytest.raises(ValueError, match="basis_device"):
        top_eigenvalues(MatrixOperator(matrix), basis_device="no-such-device")


def test_smallest_eigenvalue_is_not_the_null_space_of_a_mostly_dead_network():
    # 900 of 1000 directions in the null space (as dead units make them), one negative eigenvalue: a random start
    # is 90% null space, whose Ritz value 0 has zero residual; the range start finds the negative one
    eigenvalues = torch.cat([torch.tensor([-0.2], dtype=F64), torch.zeros(900, dtype=F64),
                             torch.linspace(0.5, 20.0, 99, dtype=F64)])
    op = MatrixOperator(torch.diag(eigenvalues))
    cold = top_eigenvalues(op, k=1, which="SA", tol=1e-3, seed=0)
    assert cold.converged and cold.eigenvalues.item() == pytest.approx(-0.2, abs=1e-3 * 20)
    # what a start with a share of the null space reports: 0, "converged" (the reason for the range start)
    v0 = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=F64)
    naive = top_eigenvalues(op, k=1, which="SA", tol=1e-3, v0=v0)
    assert naive.converged and abs(naive.eigenvalues.item()) < 1e-3 * 20
