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


def _demo_oscillation(**kw):
    """The numbers the demo's oscillation run measured: SGD batch 64 at lr * lambda_max = 1.87, the gradient a
    decade below its early scale yet 4.3 times one batch's noise, consecutive gradients anti-aligned."""
    base = dict(step=292, loss=0.011574, loss_initial=13.46, grad_norm=0.8098, grad_norm_initial=14.837,
                grad_sq_norm_unbiased=0.13509, grad_noise_trace=2.0271, batch_size=64, grad_cosine=-0.7349,
                lambda_max=185.63, lambda_min=1.2915, lambda_min_residual=0.0756,
                optimizer=OptimizerSpec("sgd", lr=0.01006))
    return Evidence(**{**base, **kw})


def test_measured_norm_test_decides_over_the_early_gradient_ratio():
    d = diagnose_stall(_demo_oscillation())
    assert d.evidence["grad_snr"] == pytest.approx(4.265, rel=1e-3) and d.evidence["grad_norm_ratio"] < 0.1
    assert d.evidence["tests"]["grad_zero"] == pytest.approx(1 - C.log_ratio_probability(d.evidence["grad_snr"], 1))
    assert d.kind == "oscillation" and d.confidence > 0.95
    assert [s.target for s in d.suggestions][0] == "lr" and d.suggestions[0].proposed < d.suggestions[0].current


def test_early_gradient_ratio_decides_without_measured_noise():
    """Full batch: tr Sigma = 0 makes the norm test say "not exactly zero" (snr inf); the ratio decides."""
    at = _critical(-30.0, grad_sq_norm_unbiased=1e-2, grad_noise_trace=0.0, grad_norm=C.GRAD_TINY_RATIO,
                   grad_norm_initial=1.0)
    d = diagnose_stall(at)
    assert d.evidence["grad_snr"] == math.inf and d.evidence["tests"]["grad_zero"] == pytest.approx(0.5, abs=1e-9)
    below = Evidence(**{**at.__dict__, "grad_norm": C.GRAD_TINY_RATIO / 2})
    assert diagnose_stall(below).kind == "saddle_point" and diagnose_stall(below).confidence == pytest.approx(0.9)
    not_measured = Evidence(**{**at.__dict__, "grad_sq_norm_unbiased": None, "grad_noise_trace": None,
                               "batch_size": None, "grad_norm": C.GRAD_TINY_RATIO / 2})
    assert diagnose_stall(not_measured).evidence["tests"]["grad_zero"] == pytest.approx(0.9)
    no_scale = Evidence(**{**at.__dict__, "grad_norm_initial": None})
    assert diagnose_stall(no_scale).evidence["tests"]["grad_zero"] is None  # a full batch and no early scale


def test_anti_aligned_large_gradient_is_oscillation_below_the_deterministic_threshold():
    """THEORY 1: with minibatch noise the safe step is well below 2/lr; the cosine carries the verdict."""
    for ratio in (0.25, 0.35):  # lr * lambda_max = 0.5 and 0.7: the stability test alone says no
        quiet = diagnose_stall(_bouncing(snr=4.0, ratio=ratio, cosine=0.0))
        assert quiet.confidence < 0.5 and quiet.evidence["uncertain"]
        d = diagnose_stall(_bouncing(snr=4.0, ratio=ratio, cosine=-0.6))
        assert d.kind == "oscillation" and d.confidence > 0.95 and not d.evidence["uncertain"]
    scores = [diagnose_stall(_bouncing(snr=4.0, ratio=0.3, cosine=c)).evidence["scores"]["oscillation"]
              for c in np.linspace(0.5, -0.9, 15)]
    assert np.all(np.diff(scores) >= -1e-12)
    # the same cosine with a statistically zero gradient is a noisy minimum, not a bounce
    assert diagnose_stall(_bouncing(snr=0.1, ratio=0.3, cosine=-0.6)).kind == "local_minimum"


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


def test_plateau_needs_tiny_predicted_progress_not_a_tiny_gradient():
    """The step makes no progress: lr |g|^2 / loss below the detector's 1% per window (49 steps)."""
    boundary = C.FLAT_STEP_CURVATURE / 0.01  # flat curvature (lr * lambda = 0.002), loss 2, lr 0.01
    at_grad = math.sqrt(C.NO_PROGRESS_PER_STEP * 2.0 / 0.01)  # lr g^2 / loss exactly on the boundary
    at = diagnose_stall(_flat(boundary / 10, grad_ratio=at_grad))
    assert at.evidence["predicted_progress"] == pytest.approx(C.NO_PROGRESS_PER_STEP, rel=1e-12)
    assert at.evidence["scores"]["plateau"] == pytest.approx(0.5, abs=1e-6)
    assert diagnose_stall(_flat(boundary / 10, grad_ratio=at_grad / math.sqrt(2))).evidence["scores"]["plateau"] \
        == pytest.approx(0.9)  # half the predicted progress: 0.9
    assert diagnose_stall(_flat(boundary / 10, grad_ratio=1.0)).evidence["scores"]["plateau"] < 0.01
    # a gradient as large as at the start does not veto a plateau when the step is too small to use it
    ev = _flat(boundary / 10, grad_ratio=1.0)
    tiny_lr = Evidence(**{**ev.__dict__, "optimizer": OptimizerSpec("sgd", lr=1e-5)})
    d = diagnose_stall(tiny_lr)
    assert d.evidence["tests"]["grad_zero"] < 1e-3 and d.kind == "plateau" and d.confidence > 0.9
    scores = [diagnose_stall(_flat(boundary / 10, grad_ratio=g)).evidence["scores"]["plateau"]
              for g in np.geomspace(1e-4, 1.0, 25)]
    assert np.all(np.diff(scores) <= 1e-12) and scores[0] > 0.99 and scores[-1] < 0.01


def test_predicted_progress_on_a_quadratic_is_twice_lr_lambda():
    """L = lambda x^2 / 2 (floor 0): |G|^2 / L = 2 lambda, so lr |G|^2 / L = 2 lr lambda exactly."""
    lam, x, lr = 0.04, 3.0, 0.01
    ev = Evidence(step=1, loss=0.5 * lam * x * x, lambda_max=lam, lambda_min=lam,
                  grad_sq_norm_unbiased=(lam * x) ** 2, grad_noise_trace=0.0, batch_size=8,
                  grad_norm=lam * abs(x) * 100,  # ignored: the unbiased |G|^2 is preferred when measured
                  optimizer=OptimizerSpec("sgd", lr=lr))
    assert diagnose_stall(ev).evidence["predicted_progress"] == pytest.approx(2 * lr * lam, rel=1e-12)
    momentum = Evidence(**{**ev.__dict__, "optimizer": OptimizerSpec("heavy_ball", lr=lr, momentum=0.9)})
    assert diagnose_stall(momentum).evidence["predicted_progress"] == pytest.approx(2 * lr * lam / 0.1, rel=1e-12)


def test_predicted_progress_edge_cases():
    base = dict(step=1, lambda_max=1e-3, lambda_min=1e-4, optimizer=OptimizerSpec("sgd", lr=0.01))
    zero_grad = diagnose_stall(Evidence(**base, loss=0.0, grad_norm=0.0, grad_norm_initial=1.0))
    assert zero_grad.evidence["predicted_progress"] == 0.0 and zero_grad.evidence["tests"]["no_progress"] == 1.0
    zero_loss = diagnose_stall(Evidence(**base, loss=0.0, grad_norm=1.0, grad_norm_initial=1.0))
    assert zero_loss.evidence["predicted_progress"] == math.inf and zero_loss.evidence["tests"]["no_progress"] == 0
    negative = diagnose_stall(Evidence(**base, loss=-2.0, grad_norm=1e-3))  # log-likelihoods: relative to |loss|
    assert negative.evidence["predicted_progress"] == pytest.approx(0.01 * 1e-6 / 2.0)
    adam = diagnose_stall(Evidence(step=1, loss=1.0, grad_norm=1.0, preconditioned_lambda_max=0.1,
                                   optimizer=OptimizerSpec("adam", lr=1e-3, beta1=0.9)))
    # Adam's step is P^-1 g: lr |g|^2 predicts nothing, so the test is unmeasured and does not veto
    assert "predicted_progress" not in adam.evidence and adam.evidence["tests"]["no_progress"] is None
    assert adam.kind == "plateau" and adam.confidence > 0.99


def test_demo_plateau_evidence_is_a_confident_plateau():
    """The numbers the demo's tiny-lr run measured (full batch: lr 2e-5, the gradient as large as at the start)."""
    ev = Evidence(step=20, loss=13.045, loss_initial=13.065, grad_norm=7.4496, grad_norm_initial=7.4539,
                  grad_sq_norm_unbiased=55.484, grad_noise_trace=0.0, batch_size=512, grad_cosine=1.0,
                  lambda_max=2.4123, lambda_min=1.5295, optimizer=OptimizerSpec("sgd", lr=2e-5))
    d = diagnose_stall(ev)
    assert d.kind == "plateau" and d.confidence > 0.9 and not d.evidence["uncertain"]
    assert d.evidence["tests"]["grad_zero"] < 0.01  # not a zero gradient: the step is what is too small
    assert "Raise the learning rate" in [s.action for s in d.suggestions]


def test_plateau_score_is_low_at_the_demo_minimum_saddle_and_oscillation():
    minimum = Evidence(step=61, loss=0.2539, grad_norm=0.5213, grad_norm_initial=3.1448,
                       grad_sq_norm_unbiased=-0.0012, grad_noise_trace=12.255, batch_size=32, grad_cosine=-0.144,
                       lambda_max=2.8685, lambda_min=1.2550, optimizer=OptimizerSpec("sgd", lr=0.12436))
    saddle = Evidence(step=53, loss=5.1139, grad_norm=0.005838, grad_norm_initial=6.4691,
                      grad_sq_norm_unbiased=5.85e-5, grad_noise_trace=0.0, batch_size=64, grad_cosine=0.9987,
                      lambda_max=9.0, lambda_min=-3.0, lambda_min_residual=3e-6,
                      optimizer=OptimizerSpec("sgd", lr=0.02))
    for ev, kind in ((minimum, "local_minimum"), (saddle, "saddle_point"), (_demo_oscillation(), "oscillation")):
        d = diagnose_stall(ev)
        assert d.kind == kind and d.confidence > 0.9 and d.evidence["scores"]["plateau"] < 0.01


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


def test_no_fitting_kind_is_reported_as_uncertain_without_advice():
    # flat curvature, yet lr |g|^2 / loss predicts 25% per window and the gradient is large: nothing fits
    ev = _flat(C.FLAT_STEP_CURVATURE / 0.01 / 10, grad_ratio=1.0)
    d = diagnose_stall(ev)
    assert d.confidence < 0.01 and d.evidence["uncertain"] and d.suggestions == []
    assert d.summary.startswith(f"Uncertain: no situation fits the evidence; the closest is {d.kind}")
    assert d.evidence["scores"]["plateau"] < 0.01 and d.evidence["tests"]["no_progress"] < 0.01
    assert "it fails" in d.summary  # the closest kind's own failing tests are named
    nothing = diagnose_stall(Evidence(step=7))
    assert nothing.evidence["uncertain"] and nothing.summary.startswith("Uncertain") and nothing.suggestions == []


def test_uncertainty_floor_is_the_half_boundary():
    at = diagnose_stall(_critical(-C.NEGATIVE_CURVATURE_TAU * 100.0))  # saddle vs minimum exactly on tau
    assert at.confidence == pytest.approx(0.5, abs=1e-6) and at.evidence["uncertain"]  # a tie: a coin flip
    assert "(next local_minimum at 0.50)" in at.summary and at.suggestions == []
    just_below = diagnose_stall(_bouncing(snr=1e4, ratio=0.49))
    assert just_below.confidence < 0.5 and just_below.evidence["uncertain"] and just_below.suggestions == []
    assert "fails oscillation_signal" in just_below.summary
    just_above = diagnose_stall(_bouncing(snr=1e4, ratio=0.51))
    assert just_above.confidence > 0.5 and not just_above.evidence["uncertain"] and just_above.suggestions
    no_grad = classify_point(Evidence(step=0, lambda_max=10.0, lambda_min=1.0))  # confidence exactly 0.5
    assert no_grad.evidence["uncertain"] is False and not no_grad.summary.startswith("Uncertain")


def test_bad_input():
    with pytest.raises(UsageError):
        diagnose_stall({"step": 1})
    with pytest.raises(UsageError):
        diagnose_stall(Evidence(step=1), event="stall")
    with pytest.raises(UsageError):
        classify_point(None)
