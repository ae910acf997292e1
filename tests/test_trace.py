"""Specification of hessian_trace: Hutchinson and Hutch++ against exact traces of known matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from optdiag.curvature.base import MatrixOperator
from optdiag.curvature.operator import HessianOperator, supervised_loss
from optdiag.curvature.trace import TraceResult, hessian_trace, probe_generator, random_probe
from optdiag.errors import NonFiniteError, UsageError
from tests.models import TinyMLP, mlp_batch, reference_hessian

F64 = torch.float64


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given eigenvalues and random (seeded) eigenvectors."""
    n = eigenvalues.numel()
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    matrix = basis @ torch.diag(eigenvalues.to(F64)) @ basis.T
    return 0.5 * (matrix + matrix.T)


def random_symmetric(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a + a.T


def rademacher_variance(matrix: torch.Tensor) -> float:
    """docs/theory.md section 7: the one-probe variance of z^T H z for Rademacher z."""
    return float(2 * (matrix.pow(2).sum() - matrix.diagonal().pow(2).sum()))


def mlp_hessian() -> torch.Tensor:
    """The dense float64 Hessian (43 x 43) of TinyMLP's mean squared error at its random initialisation."""
    torch.manual_seed(3)  # a fixed initialisation; the RNG-untouched test below saves and compares its own state
    return reference_hessian(TinyMLP().double(), nn.functional.mse_loss, [mlp_batch(32, seed=3)])


def nan_operator() -> MatrixOperator:
    op = MatrixOperator(torch.eye(4, dtype=F64))
    op.matrix = torch.full((4, 4), math.nan, dtype=F64)  # set after the constructor's symmetry check
    return op


# ---------------------------------------------------------------- Hutchinson


def test_hutchinson_is_exact_on_a_diagonal_matrix_with_rademacher_probes():
    # z^T D z = sum_i D_ii z_i^2 = tr(D) for every sign vector: the one-probe variance 2(|D|_F^2 - sum D_ii^2) is 0.
    op = MatrixOperator(torch.diag(torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0], dtype=F64)))
    res = hessian_trace(op, 20, method="hutchinson")
    assert res.samples == pytest.approx(np.full(20, 11.5), abs=1e-12)
    assert res.estimate == pytest.approx(11.5, abs=1e-12)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_on_a_network_hessian_is_within_three_standard_errors_with_the_theoretical_stderr():
    hessian = mlp_hessian()
    res = hessian_trace(MatrixOperator(hessian), 400, method="hutchinson")
    exact = float(hessian.trace())
    assert abs(res.estimate - exact) <= 3 * res.stderr
    assert res.stderr == pytest.approx(math.sqrt(rademacher_variance(hessian) / 400), rel=0.2)


@pytest.mark.parametrize(
    ("distribution", "one_probe_variance"),
    [("rademacher", rademacher_variance), ("gaussian", lambda h: float(2 * h.pow(2).sum()))],
)
def test_hutchinson_sample_variance_matches_theory_over_many_probes(distribution, one_probe_variance):
    matrix = random_symmetric(30, seed=1)
    res = hessian_trace(MatrixOperator(matrix), 4000, method="hutchinson", distribution=distribution, seed=5)
    measured = res.stderr**2 * 4000
    assert measured == pytest.approx(one_probe_variance(matrix), rel=0.1)
    assert abs(res.estimate - float(matrix.trace())) <= 4 * res.stderr


def test_samples_are_per_probe_estimates_whose_mean_and_spread_give_the_result():
    for method in ("hutchinson", "hutch++"):
        res = hessian_trace(MatrixOperator(random_symmetric(20, seed=2)), 30, method=method)
        assert res.samples.ndim == 1
        assert res.estimate == pytest.approx(res.samples.mean(), rel=1e-12)
        assert res.stderr == pytest.approx(res.samples.std(ddof=1) / math.sqrt(res.samples.size), rel=1e-12)
    assert hessian_trace(MatrixOperator(random_symmetric(20, seed=2)), 30, method="hutchinson").samples.size == 30


def test_a_single_probe_has_an_unknown_stderr():
    res = hessian_trace(MatrixOperator(random_symmetric(6, seed=0)), 1, method="hutchinson")
    assert res.n_hvp == 1 and math.isnan(res.stderr)


def test_n_probes_is_the_hutchinson_probe_count():
    op = MatrixOperator(random_symmetric(10, seed=4))
    by_probes = hessian_trace(op, method="hutchinson", n_probes=25, seed=9)
    by_budget = hessian_trace(op, 25, method="hutchinson", seed=9)
    assert by_probes.n_hvp == 25
    assert np.array_equal(by_probes.samples, by_budget.samples)


@pytest.mark.parametrize(("method", "dimension", "budget"), [("hutchinson", 60, 3000), ("hutch++", 300, 150)])
def test_tol_stops_early_once_the_relative_stderr_is_reached(method, dimension, budget):
    # Eigenvalues 1..n (positive definite, so the relative error falls steadily); trace n(n+1)/2.
    op = MatrixOperator(with_spectrum(torch.arange(1.0, dimension + 1.0), seed=2))
    res = hessian_trace(op, budget, method=method, tol=0.01)
    assert res.n_hvp < budget
    assert res.stderr <= 0.01 * abs(res.estimate)
    assert abs(res.estimate - dimension * (dimension + 1) / 2) <= 4 * res.stderr
    assert res.samples.size > 10  # so the check below, from the tenth probe on, also ran one probe earlier
    one_fewer = _mean_stderr(res.samples[:-1])
    assert one_fewer[1] > 0.01 * abs(one_fewer[0])  # it did not run past the first probe that met tol


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.size))


# ---------------------------------------------------------------- Hutch++


def test_hutchpp_is_exact_on_a_low_rank_matrix_when_the_sketch_exceeds_the_rank():
    eigenvalues = torch.cat([torch.tensor([9.0, 4.0, -3.0, 2.0, 1.0]), torch.zeros(95)])
    res = hessian_trace(MatrixOperator(with_spectrum(eigenvalues)), 18)  # sketch of 6 > rank 5
    assert res.method == "hutch++" and res.n_hvp == 18
    assert res.estimate == pytest.approx(13.0, abs=1e-10)
    assert res.stderr == pytest.approx(0.0, abs=1e-10)


def test_hutchpp_is_exact_on_a_network_hessian_when_the_sketch_spans_the_space():
    hessian = mlp_hessian()
    res = hessian_trace(MatrixOperator(hessian), 3 * 43)
    assert res.estimate == pytest.approx(float(hessian.trace()), abs=1e-10)


def test_hutchpp_beats_hutchinson_at_equal_budget_on_a_decaying_spectrum():
    # eigenvalues 1/i^2, i = 1..300: most of the trace sits in a few directions, which the sketch captures.
    eigenvalues = 1.0 / torch.arange(1.0, 301.0) ** 2
    op, exact = MatrixOperator(with_spectrum(eigenvalues, seed=1)), float(eigenvalues.sum())
    errors = {method: [] for method in ("hutchinson", "hutch++")}
    for method in errors:
        for seed in range(8):
            res = hessian_trace(op, 60, method=method, seed=seed)
            errors[method].append(res.estimate - exact)
            assert abs(res.estimate - exact) <= 4 * res.stderr
    rms = {method: math.sqrt(np.mean(np.square(errs))) for method, errs in errors.items()}
    assert rms["hutch++"] < rms["hutchinson"] / 10


@pytest.mark.parametrize(("budget", "sketch", "probes"), [(3, 1, 1), (31, 10, 11), (60, 20, 20)])
def test_hutchpp_splits_the_budget_in_thirds_and_spends_exactly_it(budget, sketch, probes):
    op = MatrixOperator(random_symmetric(40, seed=0))
    res = hessian_trace(op, budget)
    assert res.n_hvp == op.n_hvp == budget == 2 * sketch + probes
    assert res.samples.size == probes


def test_hutchpp_caps_the_sketch_at_the_dimension_and_spends_the_rest_on_probes():
    op = MatrixOperator(random_symmetric(4, seed=0))
    res = hessian_trace(op, 30)  # sketch 4 (not 10), 22 remainder probes
    assert res.n_hvp == 30 and res.samples.size == 22
    assert res.estimate == pytest.approx(float(op.matrix.trace()), abs=1e-10)


def test_hutchpp_max_sketch_bounds_the_sketch_and_gives_its_products_to_the_probes():
    op = MatrixOperator(random_symmetric(40, seed=0))
    res = hessian_trace(op, 60, max_sketch=5)  # sketch 5 (not 20), its 5 exact products, 50 remainder probes
    assert res.n_hvp == op.n_hvp == 60 and res.samples.size == 50
    assert abs(res.estimate - float(op.matrix.trace())) <= 4 * res.stderr
    # Still exact where the bounded sketch holds the whole range.
    eigenvalues = torch.cat([torch.tensor([9.0, 4.0, -3.0]), torch.zeros(97)])
    low_rank = hessian_trace(MatrixOperator(with_spectrum(eigenvalues)), 60, max_sketch=4)
    assert low_rank.samples.size == 52 and low_rank.estimate == pytest.approx(10.0, abs=1e-10)
    assert low_rank.stderr == pytest.approx(0.0, abs=1e-10)


def test_hutchpp_default_sketch_holds_what_fits_in_256_mib():
    class Diagonal(MatrixOperator):
        def __init__(self, diagonal: torch.Tensor) -> None:
            super(MatrixOperator, self).__init__(diagonal.numel(), diagonal.device, diagonal.dtype)
            self.diagonal = diagonal

        def _matvec(self, v: torch.Tensor) -> torch.Tensor:
            return self.diagonal * v

    # 2^21 float32 entries (8 MiB a vector): a sketch of 32 vectors, not 40, and the 16 products left to probes.
    diagonal = torch.zeros(1 << 21)
    diagonal[:3] = torch.tensor([5.0, 2.0, 1.0])
    res = hessian_trace(Diagonal(diagonal), 120)
    assert res.n_hvp == 120 and res.samples.size == 56
    assert res.estimate == pytest.approx(8.0, rel=1e-5)  # rank 3 < 32: exact up to float32 rounding


def test_hutchpp_n_probes_sets_sketch_and_probe_counts():
    res = hessian_trace(MatrixOperator(random_symmetric(40, seed=0)), n_probes=7)
    assert res.n_hvp == 21 and res.samples.size == 7


# ---------------------------------------------------------------- randomness, results, bad input


def test_probes_come_from_a_seeded_private_generator_in_the_operator_dtype():
    op = MatrixOperator(torch.eye(1000, dtype=torch.float32))
    probe = random_probe(op, probe_generator(op, 0))
    assert probe.dtype == torch.float32 and probe.device == op.device
    assert set(probe.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(probe.mean())) < 0.15  # 1000 fair signs: standard deviation 0.032
    assert torch.equal(probe, random_probe(op, probe_generator(op, 0)))
    gaussian = random_probe(op, probe_generator(op, 0), "gaussian")
    assert gaussian.dtype == torch.float32 and abs(float(gaussian.std()) - 1.0) < 0.1


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_same_seed_same_result_and_the_global_rng_untouched(method):
    op = MatrixOperator(random_symmetric(15, seed=0))
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = hessian_trace(op, 30, method=method, seed=11)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()
    again = hessian_trace(op, 30, method=method, seed=11)
    other = hessian_trace(op, 30, method=method, seed=12)
    assert np.array_equal(first.samples, again.samples) and first.estimate == again.estimate
    assert not np.array_equal(first.samples, other.samples)


def test_float32_operator():
    eigenvalues = torch.linspace(-1.0, 2.0, 50)
    op = MatrixOperator(with_spectrum(eigenvalues).float())
    res = hessian_trace(op, 150)
    assert abs(res.estimate - float(eigenvalues.sum())) <= 4 * res.stderr + 1e-4


def test_to_dict_is_plain_and_json_ready():
    res = hessian_trace(MatrixOperator(random_symmetric(8, seed=0)), 9)
    assert isinstance(res, TraceResult)
    data = json.loads(json.dumps(res.to_dict()))
    assert set(data) == {"estimate", "stderr", "n_hvp", "method", "samples", "block_estimates", "block_stderr"}
    assert data["samples"] == res.samples.tolist() and data["n_hvp"] == 9 and data["method"] == "hutch++"
    assert data["block_estimates"] is None and data["block_stderr"] is None  # no blocks asked for


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_block_traces_come_from_the_same_products_and_sum_to_the_trace(method):
    hessian = random_symmetric(12, seed=4)
    blocks = [3, 4, 5]
    plain = hessian_trace(MatrixOperator(hessian), 15, method=method, seed=2)
    res = hessian_trace(MatrixOperator(hessian), 15, method=method, seed=2, blocks=blocks)
    assert res.n_hvp == plain.n_hvp and res.estimate == pytest.approx(plain.estimate, rel=1e-12)
    assert res.block_estimates.sum() == pytest.approx(res.estimate, rel=1e-12)
    assert res.block_estimates.shape == res.block_stderr.shape == (3,)
    # exact cases: Hutchinson on a diagonal matrix (every Rademacher split is exact); Hutch++ on a matrix of rank
    # below its sketch (Q spans the range, H Q Q^T = H, the remainder is 0)
    if method == "hutchinson":
        matrix = torch.diag(torch.arange(1.0, 13.0, dtype=torch.float64))
    else:
        factor = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
        matrix = factor @ factor.T
    exact = hessian_trace(MatrixOperator(matrix), 15, method=method, blocks=blocks)
    truth = [float(torch.diagonal(matrix)[a:b].sum()) for a, b in ((0, 3), (3, 7), (7, 12))]
    np.testing.assert_allclose(exact.block_estimates, truth, rtol=1e-10)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_block_traces_are_unbiased(method):
    hessian = random_symmetric(20, seed=5)
    truth = [float(torch.diagonal(hessian)[a:b].sum()) for a, b in ((0, 6), (6, 20))]
    runs = np.array([hessian_trace(MatrixOperator(hessian), 12, method=method, seed=s, blocks=[6, 14]).block_estimates
                     for s in range(300)])
    spread = runs.std(axis=0, ddof=1) / math.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(axis=0) - truth) < 4 * spread)


def test_blocks_must_cover_the_parameters():
    with pytest.raises(UsageError, match="blocks must sum to the operator's 8 parameters, got 7"):
        hessian_trace(MatrixOperator(random_symmetric(8, seed=0)), 9, blocks=[3, 4])
    with pytest.raises(UsageError, match="blocks"):
        hessian_trace(MatrixOperator(random_symmetric(8, seed=0)), 9, blocks=[8, 0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_hvp": 0}, "n_hvp must be >= 1"),
        ({"n_hvp": -5, "method": "hutchinson"}, "n_hvp must be >= 1"),
        ({"n_hvp": 2.5}, "n_hvp must be an integer"),
        ({"n_hvp": True}, "n_hvp must be an integer"),
        ({"n_hvp": 2}, "Hutch\\+\\+ needs n_hvp >= 3"),
        ({"n_probes": 0, "method": "hutchinson"}, "n_probes must be >= 1"),
        ({"n_hvp": 10, "n_probes": 5}, "not both"),
        ({"method": "hutchpp"}, "method must be one of"),
        ({"distribution": "uniform"}, "distribution must be one of"),
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"tol": float("nan")}, "tol must be a positive number"),
        ({"seed": "zero"}, "seed must be an integer"),
        ({"max_sketch": 0}, "max_sketch must be >= 1"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_cause(kwargs, message):
    op = MatrixOperator(torch.eye(5, dtype=F64))
    with pytest.raises(UsageError, match=message) as info:
        hessian_trace(op, **kwargs)
    assert isinstance(info.value, ValueError)
    assert op.n_hvp == 0  # rejected before any work


def test_not_an_operator_is_rejected_by_name():
    with pytest.raises(UsageError, match="expected a CurvatureOperator.*got Tensor"):
        hessian_trace(torch.eye(3))


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_non_finite_products_raise(method):
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        hessian_trace(nan_operator(), 6, method=method)


def test_end_to_end_on_a_hessian_operator_of_a_network():
    torch.manual_seed(3)
    model, batch = TinyMLP().double(), mlp_batch(32, seed=3)
    op = HessianOperator(model, supervised_loss(nn.functional.mse_loss), batch)
    exact = float(reference_hessian(model, nn.functional.mse_loss, [batch]).trace())
    res = hessian_trace(op, 3 * op.num_params)  # the sketch spans the space: exact
    assert res.estimate == pytest.approx(exact, rel=1e-10) and res.n_hvp == op.n_hvp == 129
