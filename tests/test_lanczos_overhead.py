"""Specification of what the Lanczos eigensolver does per product besides the product: one finiteness check (the
operator's, through the product's norm) and Gram-Schmidt passes only where one cancels (the DGKS criterion), with
the basis orthonormal and the projection ``S = V A V^T`` exact at rounding level.

Exact answers: known spectra wrapped in ``MatrixOperator``, ``V A V^T`` computed densely from the returned basis.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import optdiag.curvature.lanczos as lanczos
from optdiag.curvature.base import MatrixOperator
from optdiag.curvature.distributed import ReducedMeanOperator
from optdiag.curvature.lanczos import lanczos_tridiagonal, power_iteration, top_eigenvalues
from optdiag.curvature.operator import HessianOperator, supervised_loss
from optdiag.errors import NonFiniteError
from tests.test_lanczos import rotated

F64 = torch.float64


@pytest.fixture
def passes(monkeypatch):
    """Counts the Gram-Schmidt passes over the whole basis (each projects the vector onto every row once)."""
    count = {"passes": 0}
    project = lanczos._Rows.project

    def counted(self, w):
        count["passes"] += 1
        return project(self, w)

    monkeypatch.setattr(lanczos._Rows, "project", counted)
    return count


def hard_spectrum(n: int = 400) -> torch.Tensor:
    """A converging top pair 1e-9 apart, a cluster of 20 eigenvalues within 1e-8 of 0.5, and a bulk over 11
    orders of magnitude: without full reorthogonalisation Lanczos fills with ghost copies of the top pair."""
    cluster = 0.5 + 1e-8 * torch.rand(20, generator=torch.Generator().manual_seed(3), dtype=F64)
    return torch.cat([torch.tensor([1.0, 1.0 - 1e-9], dtype=F64), cluster, torch.logspace(-12, -1, n - 22, dtype=F64)])


@pytest.mark.parametrize("dtype, steps, pair_tolerance", [(F64, 250, 1e-13), (torch.float32, 150, 1e-6)])
def test_one_pass_per_product_keeps_the_basis_orthonormal_and_the_projection_exact(passes, dtype, steps,
                                                                                   pair_tolerance):
    eigenvalues = hard_spectrum()
    matrix = rotated(eigenvalues, seed=21).to(dtype)
    start = torch.randn(400, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)
    alphas, betas, basis = lanczos_tridiagonal(MatrixOperator(matrix), start, steps)
    eps = torch.finfo(dtype).eps
    v = basis.double()
    assert v.shape[0] == steps
    # |V V^T - I| at rounding level: a few eps (always two passes measured 9 eps in float64 and 2 in float32)
    assert float((v @ v.T - torch.eye(steps, dtype=F64)).abs().max()) < 20 * eps
    # the recorded coefficients are those of the vectors actually subtracted: T = V A V^T
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    assert float(np.abs((v @ matrix.double() @ v.T).numpy() - t).max()) < 20 * eps
    # the local step took the large components, so no pass over the whole basis cancelled: one per product
    assert passes["passes"] == steps
    ritz = np.sort(scipy.linalg.eigh_tridiagonal(alphas, betas)[0])[::-1]
    assert abs(ritz[0] - 1.0) < pair_tolerance and abs(ritz[1] - (1.0 - 1e-9)) < pair_tolerance
    assert int(np.sum(np.abs(ritz - 1.0) < 1e-6)) == 2  # the pair, and no ghost copy of it


def test_a_pass_that_cancels_is_repeated_until_the_remainder_is_orthogonal(passes):
    op = MatrixOperator(rotated(torch.linspace(1.0, 2.0, 50, dtype=F64), seed=4))
    basis = lanczos._KrylovBasis(op, 10, torch.Generator().manual_seed(0), refill=False)
    first = torch.randn(50, generator=torch.Generator().manual_seed(5), dtype=F64)
    basis.add_start_vectors([first])
    # a vector with a 1e-10 share outside the basis: the first pass removes all but 1e-10 of it
    noise = torch.randn(50, generator=torch.Generator().manual_seed(6), dtype=F64)
    w = first + 1e-10 * noise
    passes["passes"] = 0
    remainder, coefficients, norm = basis._orthogonalise(w.clone(), float(w.norm()), float(w.norm()))
    assert passes["passes"] == 2
    assert norm == pytest.approx(float(remainder.norm()))
    direction = basis.V[0]
    assert abs(float(direction @ remainder)) / norm < 4 * torch.finfo(F64).eps
    # the coefficients are exactly what was subtracted: w = c v_0 + remainder
    torch.testing.assert_close(coefficients[0] * direction + remainder, w, atol=1e-15, rtol=0)
    # a vector mostly outside the basis: one pass
    passes["passes"] = 0
    other = noise.clone()
    basis._orthogonalise(other, float(other.norm()), float(other.norm()))
    assert passes["passes"] == 1


def test_top_eigenvalues_spends_one_pass_per_product_on_a_restarted_hard_spectrum(passes):
    matrix = rotated(hard_spectrum(), seed=21)
    result = top_eigenvalues(MatrixOperator(matrix), k=2, which="LA", tol=1e-10, max_hvp=600, max_basis=12)
    assert result.converged and result.n_hvp <= 17  # what two passes per product took: no more products
    assert result.n_hvp > 12  # the basis of 12 restarted
    exact = torch.sort(hard_spectrum(), descending=True).values[:2]
    torch.testing.assert_close(result.eigenvalues, exact, atol=1e-14, rtol=0)
    u = result.eigenvectors
    assert float((u @ u.T - torch.eye(2, dtype=F64)).abs().max()) < 20 * torch.finfo(F64).eps
    # the start vector is orthogonalised against nothing; each product after it against the basis, once
    assert result.n_hvp <= passes["passes"] <= result.n_hvp + 2


# ---------------------------------------------------------------------------------------------------------------
# One finiteness check per product, in the operator


class NaNAfter(MatrixOperator):
    """A diagonal matrix whose product number ``bad`` (1-based) comes out NaN."""

    def __init__(self, diagonal: torch.Tensor, bad: int) -> None:
        super().__init__(torch.diag(diagonal))
        self.bad, self.calls = bad, 0

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super()._matvec(v)
        return out.fill_(float("nan")) if self.calls == self.bad else out


def small_hessian_operator() -> HessianOperator:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        data = (torch.randn(16, 3), torch.randn(16, 1))
    return HessianOperator(net, supervised_loss(nn.MSELoss()), data)


def test_a_nan_product_raises_through_op_matmul_and_is_not_counted():
    op = small_hessian_operator()
    v = torch.ones(op.num_params)
    v[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"product 1 of HessianOperator has NaN or Inf entries"):
        op @ v
    assert op.n_hvp == 0
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        op @ torch.stack([torch.ones(op.num_params), v], dim=1)  # the vectorised products
    inf = torch.ones(op.num_params)
    inf[0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        op.matvec_and_norm(inf)
    # the reduced mean of operators (data parallelism) raises too, after its collective
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        ReducedMeanOperator([NaNAfter(torch.ones(4, dtype=F64), bad=1)], [1.0]) @ torch.ones(4, dtype=F64)


def test_a_nan_product_in_the_middle_of_a_solve_raises():
    diagonal = torch.linspace(1.0, 2.0, 30, dtype=F64)
    with pytest.raises(NonFiniteError, match="product 3 of NaNAfter has NaN or Inf entries"):
        top_eigenvalues(NaNAfter(diagonal, bad=3), k=1, tol=1e-12)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        power_iteration(NaNAfter(diagonal, bad=2), tol=1e-12)


def test_finite_entries_whose_squares_overflow_are_not_mistaken_for_nan():
    big = torch.tensor([3e20, 4e20] + [float(i) for i in range(1, 19)], dtype=torch.float32)
    op = MatrixOperator(torch.diag(big))
    assert float(torch.linalg.vector_norm(big)) == float("inf")  # float32 squares overflow
    product, norm = op.matvec_and_norm(torch.ones(20))
    torch.testing.assert_close(product, big)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(big.double())), rel=1e-12)
    assert op.n_hvp == 1
    result = top_eigenvalues(op, k=2, tol=1e-4)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, big[[1, 0]], rtol=1e-5, atol=0)


class CountingNorms(MatrixOperator):
    """Counts the norms taken of the operator's vectors."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix)
        self.norms = 0

    def vector_norm(self, x: torch.Tensor) -> torch.Tensor:
        self.norms += 1
        return super().vector_norm(x)


def test_lanczos_reuses_the_operator_check_instead_of_checking_again():
    op = CountingNorms(rotated(torch.linspace(1.0, 2.0, 40, dtype=F64), seed=8))
    result = top_eigenvalues(op, k=1, tol=1e-8, max_hvp=30)
    # one norm per product (the check, reused by Lanczos), one per Gram-Schmidt pass, one for the start vector
    # and one for the returned eigenvector: no norm of a product is taken twice
    passes = result.n_hvp  # each product is orthogonalised by one pass on this well separated spectrum
    assert op.norms == result.n_hvp + passes + 1 + 1


def test_a_product_reaches_the_host_twice_its_check_and_its_pass(passes, monkeypatch):
    """On a GPU every transfer to the host waits for the device. Per product the solver makes two: the operator's
    finiteness check (the product's norm, one transfer) and the Gram-Schmidt pass's one transfer, which also brings
    the Rayleigh quotient back; the solver reads no scalar from a tensor on its own (``float(t)``, ``t.item()``)."""
    transfers = {"check": 0, "cpu": 0, "scalar": 0}
    counting = [True]
    cpu, to_float, item = torch.Tensor.cpu, torch.Tensor.__float__, torch.Tensor.item
    check = MatrixOperator.matvec_and_norm

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            transfers[name] += counting[0]
            return method(self, *args, **kwargs)
        return wrapper

    def checked(self, v):  # the operator's own check: one transfer, counted as such
        transfers["check"] += 1
        counting[0] = False
        try:
            return check(self, v)
        finally:
            counting[0] = True

    monkeypatch.setattr(torch.Tensor, "cpu", counted("cpu", cpu))
    monkeypatch.setattr(torch.Tensor, "__float__", counted("scalar", to_float))
    monkeypatch.setattr(torch.Tensor, "item", counted("scalar", item))
    monkeypatch.setattr(MatrixOperator, "matvec_and_norm", checked)
    matrix = rotated(torch.linspace(1.0, 2.0, 60, dtype=F64), seed=4)
    start = torch.randn(60, generator=torch.Generator().manual_seed(1), dtype=F64)
    steps = 30
    alphas, betas, _ = lanczos_tridiagonal(MatrixOperator(matrix), start, steps)
    assert passes["passes"] == steps  # one pass per product on this spectrum
    assert (transfers["check"], transfers["cpu"]) == (steps, passes["passes"]), transfers
    assert transfers["scalar"] <= 3, transfers  # the start vector's checks, none per product
    assert np.allclose(np.sort(scipy.linalg.eigh_tridiagonal(alphas, betas)[0])[-1], 2.0, atol=1e-10)
