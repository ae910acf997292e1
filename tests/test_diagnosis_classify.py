"""The classifier at and around every boundary: the verdict flips there, the confidence is 0.5 there and grows
monotonically away from it."""

import math

import numpy as np
import pytest

from optdiag.diagnosis import classify as C
from optdiag.diagnosis.classify import classify_point, diagnose_stall
from optdiag.diagnosis.evidence import Evidence
from optdiag.diagnosis.stability import OptimizerSpec
from optdiag.diagnosis.stall import StallDetector
from optdiag.diagnosis.types import KINDS
from optdiag.errors import UsageError

SGD = OptimizerSpec("sgd", lr=0.001)
GRAD_ZERO = dict(grad_sq_norm_unbiased=1e-4, grad_noise_trace=1.0, batch_size=32)  # snr = 0.0032
GRAD_LARGE = dict(grad_sq_norm_unbiased=100.0, grad_noise_trace=1.0, batch_size=32)  # snr = 3200


def _critical(lambda_min, **kw):
    """gradient ~0, lambda_max=100 at lr 0.001 (stability ratio 0.05, step curvature 0.1: neither flat nor
    oscillating); only lambda_min varies."""
    base = dict(step=10, loss=1.0, lambda_max=100.0, lambda_min=lambda_min, optimizer=SGD, **GRAD_ZERO)
    return Evidence(**{**base, **kw})


def test_logistic_calibration():
    assert C.log_ratio_probability(1.0, 1.0) == 0.5
    assert C.log_ratio_probability(2.0, 1.0) == pytest.approx(0.9)
    assert C.log_ratio_probability(0.5, 1.0) == pytest.approx(0.1)
    assert C.log_ratio_probability(0.0, 1.0) == 0.0 and C.log_ratio_probability(math.inf, 1.0) == 1.0


@pytest.mark.parametrize("factor", [0.5, 0.9, 1.1, 2.0, 10.0])
def test_saddle_vs_minimum_around_tau(factor):
    boundary = -C.NEGATIVE_CURVATURE_TAU * 100.0
    d = diagnose_stall(_critical(factor * boundary))
    assert d.kind == ("saddle_point" if factor > 1 else "local_minimum")
    assert d.confidence > 0.5


def test_saddle_minimum_boundary_is_half_and_monotone():
    boundary = -C.NEGATIVE_CURVATURE_TAU * 100.0
    at = diagnose_stall(_critical(boundary))
    assert at.confidence == pytest.approx(0.5, abs=1e-6)
    assert at.evidence["scores"]["saddle_point"] == pytest.approx(at.evidence["scores"]["local_minimum"], abs=1e-6)
    scores = [diagnose_stall(_critical(lm)).evidence["scores"]["saddle_point"] for lm in np.linspace(1, -50, 40)]
    assert np.all(np.diff(scores) >= -1e-12) and scores[0] < 0.01 and scores[-1] > 0.99


def test_negative_eigenvalue_within_its_residual_is_not_significant():
    assert diagnose_stall(_critical(-10.0, lambda_min_residual=20.0)).kind == "local_minimum"
    assert diagnose_stall(_critical(-10.0, lambda_min_residual=5.0)).kind == "saddle_point"
    assert diagnose_stall(_critical(-10.0, lambda_min_residual=10.0)).confidence == pytest.approx(0.5, abs=1e-6)


def _bouncing(snr=None, ratio=None, cosine=None, **kw):
    """lambda_min = 1 > 0; lr 0.01 SGD (threshold 200)."""
    grads = {} if snr is None else dict(grad_sq_norm_unbiased=snr / 32.0, grad_noise_trace=1.0, batch_size=32)
    lam = None if ratio is None else 200.0 * ratio
    return Evidence(step=5, loss=0.5, lambda_max=lam, lambda_min=1.0 if lam else None, grad_cosine=cosine,
                    optimizer=OptimizerSpec("sgd", lr=0.01), **grads, **kw)


@pytest.mark.parametrize("snr, kind", [(0.25, "local_minimum"), (0.7, "local_minimum"), (1.4, "oscillation"),
                                       (10.0, "oscillation")])
def test_norm_test_boundary_between_oscillation_and_minimum(snr, kind):
    d = diagnose_stall(_bouncing(snr=snr, ratio=3.0))
    assert d.kind == kind and d.confidence > 0.5
    assert d.evidence["grad_snr"] == pytest.approx(snr)


def test_norm_test_at_boundary_is_half():
    assert diagnose_stall(_bouncing(snr=1.0, ratio=3.0)).confidence == pytest.approx(0.5, abs=1e-6)


def test_stability_ratio_boundary():
    confidences = []
    for ratio in (0.2, 0.4, 0.5, 0.6, 1.0, 2.0):
        d = diagnose_stall(_bouncing(snr=1e4, ratio=ratio))
        assert d.kind == "oscillation"  # the gradient is large and nothing else fits; confidence says how sure
        confidences.append(d.confidence)
    assert confidences[2] == pytest.approx(0.5, abs=1e-6)
    assert confidences[0] < confidences[1] < 0.5 < confidences[3] < confidences[4] < confidences[5]
    assert confidences[4] == pytest.approx(0.9, abs=1e-6)  # lr*lambda_max = 2: twice the boundary
    assert diagnose_stall(_bouncing(snr=1e4, ratio=1.0)).evidence["lr_lambda_max"] == pytest.approx(2.0)


def test_anti_aligned_gradients_signal_oscillation_without_curvature():
    at = diagnose_stall(_bouncing(snr=1e4, cosine=C.ANTI_ALIGNED_COSINE))
    assert at.kind == "oscillation" and at.confidence == pytest.approx(0.5, abs=1e-6)
    assert diagnose_stall(_bouncing(snr=1e4, cosine=-0.6)).confidence > 0.95
    assert diagnose_stall(_bouncing(snr=1e4, cosine=0.0)).confidence < 0.1


def _flat(lam, grad_ratio=1e-3):
    return Evidence(step=3, loss=2.0, lambda_max=lam, lambda_min=lam / 10, grad_norm=grad_ratio,
                    grad_norm_initial=1.0, optimizer=OptimizerSpec("sgd", lr=0.01))


def test_plateau_boundary_on_step_curvature():
    boundary = C.FLAT_STEP_CURVATURE / 0.01  # lr * lambda = 0.02
    assert diagnose_stall(_flat(boundary / 3)).kind == "plateau"
    assert diagnose_stall(_flat(boundary * 3)).kind == "local_minimum"
    at = diagnose_stall(_flat(boundary))
    assert at.confidence == pytest.approx(0.5, abs=1e-6)
    assert at.evidence["step_curvature"] == pytest.approx(C.FLAT_STEP_CURVATURE)
    plateau_scores = [diagnose_stall(_flat(x)).evidence["scores"]["plateau"] for x in np.geomspace(1e-3, 10, 20)]
    assert np.all(np.diff(plateau_scores) <= 1e-12)


def test_plateau_needs_a_tiny_gradient():
    boundary = C.FLAT_STEP_CURVATURE / 0.01
    assert diagnose_stall(_flat(boundary / 10, grad_ratio=C.GRAD_TINY_RATIO)).evidence["scores"]["plateau"] == \
        pytest.approx(0.5, abs=1e-6)
    assert diagnose_stall(_flat(boundary / 10, grad_ratio=1.0)).evidence["scores"]["plateau"] < 0.01


def test_momentum_widens_the_effective_step_for_the_flatness_test():
    ev = Evidence(step=3, lambda_max=0.5, lambda_min=0.01, grad_norm=1e-3, grad_norm_initial=1.0,
                  optimizer=OptimizerSpec("heavy_ball", lr=0.01, momentum=0.9))
    d = diagnose_stall(ev)
    assert d.evidence["step_curvature"] == pytest.approx(0.05) and d.kind == "local_minimum"


def test_divergence_rules():
    assert diagnose_stall(Evidence(step=1, loss=float("nan"))).kind == "divergence"
    assert diagnose_stall(Evidence(step=1, loss=1.0, lambda_max=float("inf"))).confidence == 1.0
    # explosion on the evidence: limit = min + 2 (|initial - min| + |min|) = 0.1 + 2 * 1.0 = 2.1
    at = diagnose_stall(Evidence(step=1, loss=2.1, loss_min=0.1, loss_initial=1.0))
    assert at.kind == "divergence" and at.confidence == pytest.approx(0.5, abs=1e-6)
    assert diagnose_stall(Evidence(step=1, loss=4.1, loss_min=0.1, loss_initial=1.0)).confidence == \
        pytest.approx(0.9)
    assert diagnose_stall(Evidence(step=1, loss=1.5, loss_min=0.1, loss_initial=1.0)).kind != "divergence"


def test_divergence_from_a_detector_event_and_event_evidence_recorded():
    det = StallDetector()
    curve = np.concatenate([np.exp(-np.arange(100) / 30), 0.04 * 1.3 ** np.arange(40)])
    event = next(e for e in (det.update(i, x) for i, x in enumerate(curve)) if e is not None)
    d = diagnose_stall(Evidence(step=event.step), event)
    assert d.kind == "divergence" and d.confidence >= 0.5
    assert d.evidence["stall_trigger"] == "explosion" and d.evidence["loss_window"] == event.window
    assert d.suggestions == []  # no lr known: nothing with numbers to propose


def test_flat_noisy_run_end_to_end_with_event():
    det = StallDetector()
    losses = 1.0 + 0.05 * np.random.default_rng(0).standard_normal(200)
    event = next(e for e in (det.update(i, x) for i, x in enumerate(losses)) if e is not None)
    d = diagnose_stall(_critical(-30.0, step=event.step), event)
    assert d.kind == "saddle_point" and d.step == event.step
    assert d.evidence["rel_slope"] == event.rel_slope and len(d.evidence["window_steps"]) == len(event.window)


def test_saddle_escape_numbers_on_the_theory_example():
    """L(w1, w2) = (1 - w1 w2)^2 at 0: H eigenvalues +-2, u = (1,1)/sqrt2, L(t u) - L(0) = -t^2 + t^4/4."""
    ev = Evidence(step=0, loss=1.0, lambda_max=2.0, lambda_min=-2.0, lambda_min_residual=0.0, grad_norm=0.0,
                  grad_norm_initial=1.0)
    d = classify_point(ev)
    assert d.kind == "saddle_point" and d.confidence > 0.99
    assert d.evidence["escape_drop_coefficient"] == -1.0
    t = d.evidence["escape_distance"]
    exact_drop = 1.0 - (1.0 - t * t / 2) ** 2  # L(0) - L(t u)
    assert d.evidence["escape_drop"] == pytest.approx(0.01)  # the second-order prediction 1/2 |lambda_min| t^2
    assert exact_drop == pytest.approx(0.01 - t**4 / 4, rel=1e-12)  # differs from the truth only by O(t^4)


def test_classify_point_not_a_critical_point():
    assert classify_point(_critical(-30.0, **GRAD_LARGE)) is None
    d = classify_point(_critical(5.0))
    assert d.kind == "local_minimum"
    no_grad = classify_point(Evidence(step=0, lambda_max=10.0, lambda_min=1.0))
    assert no_grad.kind == "local_minimum" and no_grad.confidence == pytest.approx(0.5)
    flat = classify_point(Evidence(step=0, lambda_max=1e-4, lambda_min=-1e-6, grad_norm=1e-6,
                                   grad_norm_initial=1.0, optimizer=OptimizerSpec("sgd", lr=0.1)))
    assert flat.kind == "plateau"


def test_minimum_sharpness_and_high_loss_is_model_bias():
    d = diagnose_stall(_critical(0.5, loss=1.0, loss_initial=2.3, loss_floor=0.0, hessian_trace=400.0,
                                 epsilon_sharpness=3.0))
    assert d.kind == "local_minimum"
    for key in ("lambda_max", "hessian_trace", "epsilon_sharpness", "stability_ratio", "stability_threshold"):
        assert key in d.evidence
    assert d.evidence["loss_still_high"] and d.evidence["loss_gap_fraction"] == pytest.approx(1 / 2.3)
    assert "bias" in d.summary
    low = diagnose_stall(_critical(0.5, loss=0.01, loss_initial=2.3, loss_floor=0.0))
    assert not low.evidence["loss_still_high"] and "bias" not in low.summary


def test_unmeasured_evidence_still_gives_a_kind():
    d = diagnose_stall(Evidence(step=7))
    assert d.kind in KINDS and 0 <= d.confidence <= 0.5


def test_bad_input():
    with pytest.raises(UsageError):
        diagnose_stall({"step": 1})
    with pytest.raises(UsageError):
        diagnose_stall(Evidence(step=1), event="stall")
    with pytest.raises(UsageError):
        classify_point(None)
