"""Gradient noise scale (McCandlish et al. 2018) and the statistically-zero gradient test (docs/theory.md s3, s6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from optdiag.curvature.noise import (
    NoiseScaleResult,
    estimate_gradient_noise_scale,
    gradient_is_zero,
    gradient_noise_scale,
)

# --- the two-batch-size formulas ------------------------------------------------------------------------------


def test_theory_numbers_are_recovered():
    # |G|^2 = 1, tr(Sigma) = 100: E|g_32|^2 = 1 + 100/32 = 4.125 and E|g_256|^2 = 1 + 100/256 = 1.390625.
    result = gradient_noise_scale(4.125, 1.390625, b_small=32, b_big=256)
    assert result.grad_sq_norm == pytest.approx(1.0, rel=1e-12)
    assert result.trace_sigma == pytest.approx(100.0, rel=1e-12)
    assert result.b_simple == pytest.approx(100.0, rel=1e-12)
    assert (result.b_small, result.b_big, result.n_small, result.n_big) == (32, 256, 1, 1)
    assert math.isnan(result.grad_sq_norm_stderr) and math.isnan(result.trace_sigma_stderr)


@pytest.mark.parametrize("grad_sq, trace, b_small, b_big", [(0.3, 7.0, 1, 2), (2.5, 0.0, 4, 64), (1e-4, 50.0, 8, 9)])
def test_expected_sq_norms_give_back_their_inputs(grad_sq, trace, b_small, b_big):
    result = gradient_noise_scale(grad_sq + trace / b_small, grad_sq + trace / b_big, b_small, b_big)
    assert result.grad_sq_norm == pytest.approx(grad_sq, rel=1e-9, abs=1e-12)
    assert result.trace_sigma == pytest.approx(trace, rel=1e-9, abs=1e-9)
    assert result.b_simple == pytest.approx(trace / grad_sq, rel=1e-9, abs=1e-9)


def test_repeated_measurements_average_numerator_and_denominator_separately():
    small, big = [3.125, 5.125], [1.0, 1.78125]  # means 4.125 and 1.390625, as in docs/theory.md section 6
    result = gradient_noise_scale(np.array(small), torch.tensor(big), 32, 256)
    assert (result.sq_norm_small, result.sq_norm_big) == (4.125, 1.390625)
    assert result.b_simple == pytest.approx(100.0, rel=1e-12)
    per_pair = [gradient_noise_scale(s, b, 32, 256).b_simple for s, b in zip(small, big)]
    assert np.mean(per_pair) != pytest.approx(100.0, rel=1e-3)  # the mean of ratios would be biased


def test_standard_errors_of_independent_measurements():
    # small: mean 4, sample variance 2 -> variance of the mean 1; big: mean 1, sample variance 0.5 -> 0.25.
    result = gradient_noise_scale([3.0, 5.0], [0.5, 1.5], b_small=1, b_big=3)
    assert (result.grad_sq_norm, result.trace_sigma) == pytest.approx(((3 * 1 - 4) / 2, (4 - 1) / (1 - 1 / 3)))
    assert result.grad_sq_norm_stderr == pytest.approx(math.sqrt(9 * 0.25 + 1 * 1) / 2)
    assert result.trace_sigma_stderr == pytest.approx(math.sqrt(1 + 0.25) / (2 / 3))


def test_standard_errors_of_paired_measurements_come_from_per_pair_estimates():
    small, big = np.array([3.0, 5.0, 4.0]), np.array([0.5, 1.5, 1.0])
    result = gradient_noise_scale(small, big, b_small=1, b_big=3, paired=True)
    per_pair_grad = (3 * big - small) / 2
    per_pair_trace = (small - big) / (2 / 3)
    assert result.grad_sq_norm == pytest.approx(per_pair_grad.mean())
    assert result.grad_sq_norm_stderr == pytest.approx(per_pair_grad.std(ddof=1) / math.sqrt(3))
    assert result.trace_sigma_stderr == pytest.approx(per_pair_trace.std(ddof=1) / math.sqrt(3))
    unpaired = gradient_noise_scale(small, big, b_small=1, b_big=3)
    assert unpaired.grad_sq_norm == result.grad_sq_norm
    assert unpaired.grad_sq_norm_stderr != pytest.approx(result.grad_sq_norm_stderr)


@pytest.mark.parametrize(
    "small, big, b_simple",
    [
        (10.0, 1.0, math.inf),  # |G|^2 estimate 0 < tr(Sigma) = 10: all noise, no signal
        (10.0, 0.5, math.inf),  # |G|^2 estimate negative
        (2.0, 2.5, math.nan),  # tr(Sigma) estimate negative: too noisy to say
        (0.0, 0.0, math.nan),  # nothing at all
        (1.0, 1.0, 0.0),  # no noise: every batch size sees the true gradient
    ],
)
def test_b_simple_without_a_positive_signal_is_explicit(small, big, b_simple):
    result = gradient_noise_scale(small, big, b_small=1, b_big=10)
    if math.isnan(b_simple):
        assert math.isnan(result.b_simple)
    else:
        assert result.b_simple == b_simple


def test_to_dict_has_every_field():
    d = gradient_noise_scale(4.125, 1.390625, 32, 256).to_dict()
    assert set(d) == {f for f in NoiseScaleResult.__dataclass_fields__}
    assert d["b_simple"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(b_small=256, b_big=32), "b_small < b_big"),
        (dict(b_small=32, b_big=32), "b_small < b_big"),
        (dict(b_small=0, b_big=32), "b_small must be a positive"),
        (dict(b_small=True, b_big=32), "b_small must be a positive"),
        (dict(b_small=1, b_big=float("inf")), "b_big must be a positive"),
        (dict(sq_norm_small=[], b_small=1, b_big=2), "sq_norm_small is empty"),
        (dict(sq_norm_small="a", b_small=1, b_big=2), "must hold numbers"),
        (dict(sq_norm_big=[1.0, 2.0], b_small=1, b_big=2, paired=True), "as many small as big"),
    ],
)
def test_bad_input_is_rejected(kwargs, match):
    args = dict(sq_norm_small=2.0, sq_norm_big=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        gradient_noise_scale(**args)


def test_measured_values_are_cleaned_not_refused():
    # a squared norm that rounding took below 0 counts as 0, and the raw value is recorded (docs/errors.md)
    result = gradient_noise_scale(-1e-12, 1.0, b_small=1, b_big=2)
    assert result.sq_norm_small == 0.0 and result.clamped["sq_norm_small"] == -1e-12
    # |g_small|^2 = |g_big|^2: tr(Sigma) = 0 exactly; a rounding-negative trace is clamped to 0 and said so
    exact = gradient_noise_scale(1.0, 1.0, b_small=1, b_big=2)
    assert exact.trace_sigma == 0.0 and exact.clamped == {}
    below = gradient_noise_scale(1.0, 1.0 + 1e-15, b_small=1, b_big=2)
    assert below.trace_sigma == 0.0 and below.clamped["trace_sigma"] == pytest.approx(-2.2e-15, rel=0.01)
    assert math.isnan(below.b_simple)  # the raw estimate was negative: too noisy to say
    # a NaN measurement makes what depends on it NaN ("not available"), no exception
    missing = gradient_noise_scale([1.0, float("nan")], 0.5, b_small=1, b_big=2)
    assert math.isnan(missing.trace_sigma) and math.isnan(missing.grad_sq_norm) and math.isnan(missing.b_simple)


# --- statistically zero gradient -------------------------------------------------------------------------------


def test_gradient_is_zero_compares_signal_with_noise_of_a_batch():
    # B_simple = 100: a batch of 32 sees more noise (100/32) than signal (1); a batch of 256 sees less (100/256).
    small = gradient_is_zero(sq_norm=1.0, trace_sigma=100.0, batch_size=32)
    assert small.statistic == pytest.approx(0.32) and small.threshold == 1.0
    assert small.is_zero and bool(small)
    assert small.noise_sq_norm == pytest.approx(3.125)
    big = gradient_is_zero(sq_norm=1.0, trace_sigma=100.0, batch_size=256)
    assert big.statistic == pytest.approx(2.56) and not big.is_zero and not big
    # A stricter theta (Byrd et al.'s descent condition) calls the batch-256 gradient zero too: 2.56 < 1/0.5^2.
    strict = gradient_is_zero(sq_norm=1.0, trace_sigma=100.0, batch_size=256, theta=0.5)
    assert strict.threshold == pytest.approx(4.0) and strict.is_zero


def test_gradient_is_zero_statistic_is_batch_over_b_simple():
    noise = gradient_noise_scale(4.125, 1.390625, 32, 256)
    test = gradient_is_zero(noise.grad_sq_norm, noise.trace_sigma, batch_size=64)
    assert test.statistic == pytest.approx(64 / noise.b_simple)
    assert test.to_dict()["statistic"] == test.statistic


@pytest.mark.parametrize(
    "sq_norm, trace, statistic, is_zero",
    [
        (-0.5, 10.0, -0.5 * 8 / 10.0, True),  # a negative unbiased estimate: no signal
        (1.0, 0.0, math.inf, False),  # no noise, real signal
        (0.0, 0.0, 0.0, True),  # no noise, no signal: exactly zero
        (1.0, -3.0, math.inf, False),  # a negative noise estimate counts as no measurable noise
    ],
)
def test_gradient_is_zero_edge_cases(sq_norm, trace, statistic, is_zero):
    test = gradient_is_zero(sq_norm, trace, batch_size=8)
    assert test.statistic == pytest.approx(statistic) and test.is_zero is is_zero
    assert test.noise_sq_norm >= 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sq_norm=float("nan")), "sq_norm must be a finite number"),
        (dict(trace_sigma=float("inf")), "trace_sigma must be a finite number"),
        (dict(sq_norm="1"), "sq_norm must be a finite number"),
        (dict(batch_size=0), "batch_size must be a positive"),
        (dict(theta=-1.0), "theta must be a positive"),
    ],
)
def test_gradient_is_zero_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradient_is_zero(**(dict(sq_norm=1.0, trace_sigma=1.0, batch_size=4) | kwargs))


# --- measured on a model ---------------------------------------------------------------------------------------


def half_mse(model, batch):
    x, y = batch
    return 0.5 * ((model(x).squeeze(-1) - y) ** 2).mean()


def regression(num_batches: int, batch_size: int, d: int = 5, noise: float = 1.0, seed: int = 0):
    """y = x.w* + noise e, x ~ N(0, I_d); the model sits at w = w* + delta with |delta| = 1."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d, generator=gen, dtype=torch.float64)
    delta /= delta.norm()
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta).unsqueeze(0))
    batches = []
    for _ in range(num_batches):
        x = torch.randn(batch_size, d, generator=gen, dtype=torch.float64)
        batches.append((x, x @ w_star + noise * torch.randn(batch_size, generator=gen, dtype=torch.float64)))
    return model, batches, delta


def test_linear_regression_noise_scale_matches_the_analytic_covariance():
    # Per-sample gradient g_i = x_i (x_i.delta - noise e_i): G = delta and, for Gaussian x,
    # Sigma = delta delta^T + (|delta|^2 + noise^2) I, so tr(Sigma) = (d + 1) |delta|^2 + d noise^2 = 11.
    d, noise = 5, 1.0
    model, batches, delta = regression(num_batches=150, batch_size=64, d=d, noise=noise)
    result = estimate_gradient_noise_scale(model, half_mse, batches, small_batch_size=8)
    grad_sq, trace = 1.0, (d + 1) * 1.0 + d * noise**2
    assert (result.b_small, result.b_big, result.n_small, result.n_big) == (8, 64, 150, 150)
    assert 0 < result.grad_sq_norm_stderr < 0.15 * grad_sq and 0 < result.trace_sigma_stderr < 0.1 * trace
    assert abs(result.grad_sq_norm - grad_sq) < 4 * result.grad_sq_norm_stderr
    assert abs(result.trace_sigma - trace) < 4 * result.trace_sigma_stderr
    assert result.b_simple == pytest.approx(trace / grad_sq, rel=0.3)


def test_estimate_uses_whole_batches_and_their_chunks():
    # Squared gradient norms computed in closed form: the mean-loss gradient of (X, y) is X^T (X w - y) / n.
    model, batches, _ = regression(num_batches=3, batch_size=20, d=3)
    w = model.weight.detach()[0]

    def sq_norm(x, y):
        return float((x.T @ (x @ w - y) / len(y)).pow(2).sum())

    small = [np.mean([sq_norm(x[i : i + 6], y[i : i + 6]) for i in (0, 6, 12)]) for x, y in batches]  # 2 left out
    big = [sq_norm(x, y) for x, y in batches]
    result = estimate_gradient_noise_scale(model, half_mse, batches, small_batch_size=6)
    expected = gradient_noise_scale(small, big, 6, 20, paired=True)
    for field in ("sq_norm_small", "sq_norm_big", "grad_sq_norm", "trace_sigma", "grad_sq_norm_stderr"):
        assert getattr(result, field) == pytest.approx(getattr(expected, field), rel=1e-10), field


def test_estimate_splits_dict_batches_and_leaves_the_model_alone():
    model, batches, _ = regression(num_batches=2, batch_size=12, d=3)
    dict_batches = [{"x": x, "y": y} for x, y in batches]
    model.weight.grad = torch.ones_like(model.weight)
    grad, rng = model.weight.grad, torch.get_rng_state()
    before = model.weight.detach().clone()

    def dict_loss(m, b):
        return half_mse(m, (b["x"], b["y"]))

    result = estimate_gradient_noise_scale(model, dict_loss, dict_batches, small_batch_size=4)
    assert result.grad_sq_norm == pytest.approx(
        estimate_gradient_noise_scale(model, half_mse, batches, small_batch_size=4).grad_sq_norm, rel=1e-12
    )
    assert model.weight.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert torch.equal(model.weight, before) and torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "batches, small, match",
    [
        ([(torch.zeros(8, 2), torch.zeros(8)), (torch.zeros(6, 2), torch.zeros(6))], 2, "batch 1 has 6 samples"),
        ([(torch.zeros(8, 2), torch.zeros(8))], 8, "smaller than the batch size 8"),
        ([(torch.zeros(8, 2), torch.zeros(8))], 0, "small_batch_size must be >= 1"),
        ([(torch.zeros(8, 2), torch.zeros(7))], 2, "common leading"),
        ([], 2, "empty"),
    ],
)
def test_estimate_rejects_bad_input(batches, small, match):
    from optdiag.errors import UsageError

    with pytest.raises(UsageError, match=match):
        estimate_gradient_noise_scale(nn.Linear(2, 1), half_mse, batches, small_batch_size=small)


def test_log_stderr_of_b_simple_matches_the_jackknife_on_paired_measurements():
    rng = np.random.default_rng(0)
    big = 1.0 + 0.01 * rng.standard_normal(40)  # |G|^2 + tr(Sigma)/256, small perturbations: delta method ~ exact
    small = big + 3.0 + 0.02 * rng.standard_normal(40)

    def log_b(s, b):
        return math.log(gradient_noise_scale(s, b, 32, 256).b_simple)

    leave_one_out = np.array([log_b(np.delete(small, i), np.delete(big, i)) for i in range(40)])
    jackknife = math.sqrt(39 / 40 * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    paired = gradient_noise_scale(small, big, 32, 256, paired=True)
    assert paired.b_simple_log_stderr == pytest.approx(jackknife, rel=0.02)
    assert math.isnan(gradient_noise_scale(4.0, 1.0, 32, 256, paired=True).b_simple_log_stderr)  # one pair
    assert math.isnan(gradient_noise_scale([1.0, 1.1], [0.1, 0.1], 32, 256).b_simple_log_stderr)  # |G|^2 < 0
