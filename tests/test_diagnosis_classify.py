"""The classifier at and around every boundary: the verdict flips there, a score is 0.5 there (no verdict: the
evidence does not decide) and grows monotonically away from it; the rule table, the detector's thresholds, the
event kinds and the predictions checked later."""

import math

import numpy as np
import pytest

from optdiag.diagnosis import classify as C
from optdiag.diagnosis.classify import Thresholds, check_prediction, classify_point, diagnose_stall
from optdiag.diagnosis.evidence import Evidence
from optdiag.diagnosis.stability import OptimizerSpec
from optdiag.diagnosis.stall import StallDetector, StallEvent
from optdiag.diagnosis.types import KINDS
from optdiag.errors import UsageError

SGD = OptimizerSpec("sgd", lr=0.001)
DEFAULT = C.DEFAULT_THRESHOLDS


def _p(ratio):
    """The calibration, written independently of the code: P(stat > boundary) = 1 / (1 + ratio^-log2(9))."""
    return 1.0 / (1.0 + ratio ** -math.log2(9.0))


def _pairs(dot, noise=1.0 / 32, stderr=0.0, count=8):
    """Consecutive-gradient pair statistics: mean g_t.g_(t-1) = dot, mean |g_t||g_(t-1)| = dot + noise."""
    return dict(grad_pair_count=count, grad_pair_dot=dot, grad_pair_dot_stderr=stderr, grad_pair_sq=dot + noise)


def _probe(snr, batches=8):
    """The probe set's norm test: |G|^2 B / tr(Sigma) = snr, its noise estimated on ``batches`` batches."""
    return dict(grad_sq_norm_unbiased=snr / 32.0, grad_noise_trace=1.0, batch_size=32, grad_noise_batches=batches)


GRAD_ZERO = _pairs(1e-4)  # dot / noise = 0.0032
GRAD_LARGE = _pairs(100.0)  # 3200


def _critical(lambda_min, grad=GRAD_ZERO, **kw):
    """gradient ~0, lambda_max=100 at lr 0.001 (stability ratio 0.05, step curvature 0.1: neither flat nor
    oscillating); only lambda_min varies."""
    base = {**dict(step=10, loss=1.0, lambda_max=100.0, lambda_min=lambda_min, optimizer=SGD), **grad}
    return Evidence(**{**base, **kw})


def _judge(ev, event=None, thresholds=None):
    """(verdict or None, the evidence record either way): an undecided check appends exactly its record."""
    undecided = []
    d = diagnose_stall(ev, event, thresholds, undecided=undecided)
    if d is None:
        assert len(undecided) == 1
        return None, undecided[0]
    assert undecided == []
    return d, d.evidence


def _undecided(ev, event=None, thresholds=None):
    d, record = _judge(ev, event, thresholds)
    assert d is None, f"expected no verdict, got {d.kind} at {d.confidence}"
    return record


def test_logistic_calibration():
    assert C.log_ratio_probability(1.0, 1.0) == 0.5
    assert C.log_ratio_probability(2.0, 1.0) == pytest.approx(0.9)
    assert C.log_ratio_probability(0.5, 1.0) == pytest.approx(0.1)
    assert C.log_ratio_probability(0.0, 1.0) == 0.0 and C.log_ratio_probability(math.inf, 1.0) == 1.0
    for r in (0.3, 1.1, 4.0):
        assert C.log_ratio_probability(r, 1.0) == pytest.approx(_p(r), rel=1e-9)


# ---- saddle vs minimum: tau --------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.25, 0.5, 0.9, 1.1, 2.0, 4.0])
def test_saddle_vs_minimum_around_tau(factor):
    boundary = -C.NEGATIVE_CURVATURE_TAU * 100.0
    d = diagnose_stall(_critical(factor * boundary))
    assert d.kind == ("saddle_point" if factor > 1 else "local_minimum")
    # the negative-curvature test limits both kinds here: the other tests are above p(4)
    assert d.confidence == pytest.approx(_p(max(factor, 1 / factor)), rel=1e-9)
    assert d.confidence == d.evidence["scores"][d.kind]


def test_twice_the_tau_boundary_is_exactly_0_9():
    boundary = -C.NEGATIVE_CURVATURE_TAU * 100.0
    assert diagnose_stall(_critical(2 * boundary)).confidence == pytest.approx(0.9, abs=1e-12)
    assert diagnose_stall(_critical(boundary / 2)).confidence == pytest.approx(0.9, abs=1e-12)


def test_saddle_minimum_boundary_is_undecided_and_monotone():
    boundary = -C.NEGATIVE_CURVATURE_TAU * 100.0
    at = _undecided(_critical(boundary))
    assert at["scores"]["saddle_point"] == pytest.approx(0.5, abs=1e-12)
    assert at["scores"]["local_minimum"] == pytest.approx(0.5, abs=1e-12)
    assert "prediction" not in at
    scores = [_judge(_critical(lm))[1]["scores"]["saddle_point"] for lm in np.linspace(1, -50, 40)]
    assert np.all(np.diff(scores) >= -1e-12) and scores[0] < 0.01 and scores[-1] > 0.99


def test_negative_eigenvalue_within_its_residual_is_not_significant():
    # relative to tau * lambda_max = 2: ratio 5; against the residual: 0.5, 2 and 1
    minimum = diagnose_stall(_critical(-10.0, lambda_min_residual=20.0))
    assert minimum.kind == "local_minimum" and minimum.confidence == pytest.approx(0.9, abs=1e-12)
    saddle = diagnose_stall(_critical(-10.0, lambda_min_residual=5.0))
    assert saddle.kind == "saddle_point" and saddle.confidence == pytest.approx(0.9, abs=1e-12)
    at = _undecided(_critical(-10.0, lambda_min_residual=10.0))
    assert at["tests"]["negative_curvature"] == 0.5


# ---- is the gradient ~0? -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("snr, grad_zero", [(0.25, _p(4)), (0.5, 0.9), (1.0, 0.5), (2.0, 0.1), (4.0, 1 - _p(4))])
def test_pair_statistics_decide_the_gradient_against_its_noise(snr, grad_zero):
    """8 pairs: mean g_t.g_(t-1) over the noise (mean |g_t||g_(t-1)| less it) is the norm test's statistic."""
    d, record = _judge(_critical(5.0, grad=_pairs(dot=snr, noise=1.0)))
    assert record["tests"]["grad_zero"] == pytest.approx(grad_zero, abs=1e-12)
    if grad_zero > 0.5:  # lambda_min > 0, no bounce, not flat: a minimum as sure as the gradient test
        assert d.kind == "local_minimum" and d.confidence == pytest.approx(grad_zero, abs=1e-12)
    else:
        assert d is None  # a curved point with a real gradient and no bounce: nothing fits


def test_pair_statistics_use_the_upper_bound_of_the_mean_inner_product():
    # upper = dot + 2 stderr = 0.5 of the noise: the same 0.9 as a dot of 0.5 with no error
    ev = _critical(5.0, grad=_pairs(dot=0.25, noise=1.0, stderr=0.125))
    assert _judge(ev)[1]["tests"]["grad_zero"] == pytest.approx(0.9, abs=1e-12)
    ev = _critical(5.0, grad=_pairs(dot=0.0, noise=1.0, stderr=0.5))  # upper bound 1: on the boundary
    assert _judge(ev)[1]["tests"]["grad_zero"] == 0.5
    # a negative mean inner product (G ~ 0, noise): the bound clipped at 0, certainly zero
    ev = _critical(5.0, grad=dict(grad_pair_count=8, grad_pair_dot=-0.5, grad_pair_dot_stderr=0.1, grad_pair_sq=0.5))
    assert _judge(ev)[1]["tests"]["grad_zero"] == 1.0


def test_fewer_than_eight_pairs_do_not_measure_the_gradient():
    assert C.MIN_GRADIENT_PAIRS == 8
    record = _undecided(_critical(5.0, grad=_pairs(dot=0.25, noise=1.0, count=7)))
    assert record["tests"]["grad_zero"] is None
    assert record["scores"]["local_minimum"] == 0.5  # unmeasured: 0.5, which cannot carry a verdict


def test_pairs_decide_over_the_probe_norm_test():
    both = {**_pairs(dot=2.0, noise=1.0), **_probe(0.25)}
    assert _judge(_critical(5.0, grad=both))[1]["tests"]["grad_zero"] == pytest.approx(0.1, abs=1e-12)
    few = {**_pairs(dot=2.0, noise=1.0, count=7), **_probe(0.25)}  # too few pairs: the probe decides
    assert _judge(_critical(5.0, grad=few))[1]["tests"]["grad_zero"] == pytest.approx(_p(4), abs=1e-12)


def test_deterministic_pairs_fall_back_to_the_early_gradient_ratio():
    """Noise below 1e-3 of |g|^2 (full batch): the current |g| against its early scale, 0.05 / 1 = half of 0.1."""
    deterministic = _pairs(dot=1.0, noise=1e-4)
    # loss 1e-4: |g|^2 / (2 lambda_max loss) = 0.125, far above 1%, so the gradient's reach does not call it zero
    ev = _critical(5.0, grad=deterministic, grad_norm=0.05, grad_norm_initial=1.0, loss=1e-4)
    assert ev.grad_norm_ratio == 0.05
    assert _judge(ev)[1]["tests"]["grad_zero"] == pytest.approx(0.9, abs=1e-12)
    # no early scale and nothing else measured: not measured
    assert _judge(_critical(5.0, grad=deterministic))[1]["tests"]["grad_zero"] is None
    # ten times the noise share: a noisy gradient, judged by the norm test (SNR 1 / 0.01 = 100)
    noisy = _critical(5.0, grad=_pairs(dot=1.0, noise=1e-2), grad_norm=0.05, grad_norm_initial=1.0)
    assert _judge(noisy)[1]["tests"]["grad_zero"] == pytest.approx(1 - _p(100), rel=1e-6)


@pytest.mark.parametrize("snr, grad_zero", [(0.25, _p(4)), (0.5, 0.9), (1.0, 0.5), (2.0, 0.1)])
def test_probe_norm_test_with_enough_batches(snr, grad_zero):
    d, record = _judge(_critical(5.0, grad=_probe(snr)))
    assert record["grad_snr"] == pytest.approx(snr) and record["tests"]["grad_zero"] == pytest.approx(grad_zero)
    assert (d is not None and d.kind == "local_minimum") == (grad_zero > 0.5)


def test_probe_norm_test_needs_eight_batches():
    record = _undecided(_critical(5.0, grad=_probe(0.25, batches=7)))
    assert record["grad_snr"] == pytest.approx(0.25) and record["tests"]["grad_zero"] is None


def test_early_gradient_ratio_only_for_a_noise_free_gradient():
    """Full batch: tr Sigma = 0 makes the norm test say "not exactly zero" (snr inf); the ratio decides."""
    # loss 1e-4: the gradient's reach |g|^2 / (2 lambda_max loss) >= 0.125 stays far above 1% (not zero by it)
    full = dict(grad_sq_norm_unbiased=1e-2, grad_noise_trace=0.0, batch_size=32, grad_norm=C.GRAD_TINY_RATIO,
                grad_norm_initial=1.0, loss=1e-4)
    at = _undecided(_critical(-30.0, grad=full))
    assert at["grad_snr"] == math.inf and at["tests"]["grad_zero"] == pytest.approx(0.5, abs=1e-12)
    below = diagnose_stall(_critical(-30.0, grad={**full, "grad_norm": C.GRAD_TINY_RATIO / 2}))
    assert below.kind == "saddle_point" and below.confidence == pytest.approx(0.9, abs=1e-12)
    # a batch as large as the data set is noise-free without a measured noise trace
    whole = dict(batch_size=512, dataset_size=512, grad_norm=C.GRAD_TINY_RATIO / 2, grad_norm_initial=1.0, loss=1e-4)
    assert _judge(_critical(-30.0, grad=whole))[1]["tests"]["grad_zero"] == pytest.approx(0.9, abs=1e-12)
    # a minibatch (or unknown noise): a small |g| may be small noise, not a zero gradient; not measured
    for grad in ({**whole, "dataset_size": 60000}, {**whole, "batch_size": None, "dataset_size": None},
                 {**whole, **_probe(0.25, batches=2)}):
        assert _undecided(_critical(-30.0, grad=grad))["tests"]["grad_zero"] is None
    # a full batch and no early scale: only the gradient's reach decides, |g|^2 / (2 lambda_max loss) =
    # 0.01 / (2 * 100 * 1e-4) = 0.5, fifty times the 1% limit: not zero
    no_scale = {**full, "grad_norm_initial": None}
    assert _undecided(_critical(-30.0, grad=no_scale))["tests"]["grad_zero"] == pytest.approx(1 - _p(50), abs=1e-12)


# ---- oscillation -------------------------------------------------------------------------------------------------

def _bouncing(snr=None, ratio=None, cosine=None, **kw):
    """lambda_min = 1 > 0; lr 0.01 SGD (threshold 200)."""
    grads = {} if snr is None else _probe(snr)
    lam = None if ratio is None else 200.0 * ratio
    base = dict(step=5, loss=0.5, lambda_max=lam, lambda_min=1.0 if lam else None, grad_cosine=cosine,
                optimizer=OptimizerSpec("sgd", lr=0.01), **grads)
    return Evidence(**{**base, **kw})


@pytest.mark.parametrize("snr", [0.25, 0.7, 1.0, 1.4, 10.0])
def test_oscillation_needs_only_its_signal_whatever_the_gradient(snr):
    d = diagnose_stall(_bouncing(snr=snr, ratio=3.0))
    assert d.kind == "oscillation" and d.confidence == pytest.approx(_p(6), rel=1e-9)
    assert d.evidence["grad_snr"] == pytest.approx(snr)
    # the minimum needs "not oscillation_signal": 1 - p(6) at most
    assert d.evidence["scores"]["local_minimum"] == pytest.approx(
        min(1 - _p(6), d.evidence["tests"]["grad_zero"]), abs=1e-12)


def test_stability_ratio_boundary():
    scores = {}
    for ratio in (0.2, 0.4, 0.5, 0.6, 1.0, 2.0):
        d, record = _judge(_bouncing(snr=1e4, ratio=ratio))
        assert (d is not None) == (ratio > C.OSCILLATION_RATIO)
        if d is not None:
            assert d.kind == "oscillation" and d.confidence == record["scores"]["oscillation"]
        scores[ratio] = record["scores"]["oscillation"]
        assert scores[ratio] == pytest.approx(_p(ratio / 0.5), abs=1e-12)
    assert scores[0.5] == 0.5 and scores[1.0] == pytest.approx(0.9, abs=1e-12)  # lr*lambda_max = 2: twice
    assert scores[0.2] < scores[0.4] < 0.5 < scores[0.6] < scores[1.0] < scores[2.0]
    assert diagnose_stall(_bouncing(snr=1e4, ratio=1.0)).evidence["lr_lambda_max"] == pytest.approx(2.0)


def test_cosine_boundary_signals_oscillation_without_curvature():
    at = _undecided(_bouncing(snr=1e4, cosine=C.ANTI_ALIGNED_COSINE))
    assert at["scores"]["oscillation"] == 0.5
    past = diagnose_stall(_bouncing(snr=1e4, cosine=-0.4))  # 0.1 past the boundary: 0.9
    assert past.kind == "oscillation" and past.confidence == pytest.approx(0.9, abs=1e-9)
    far = diagnose_stall(_bouncing(snr=1e4, cosine=-0.6))  # 0.3 past: 1 / (1 + 9^-3)
    assert far.kind == "oscillation" and far.confidence == pytest.approx(729 / 730, abs=1e-9)
    before = _undecided(_bouncing(snr=1e4, cosine=-0.2))  # 0.1 short of it: 0.1
    assert before["scores"]["oscillation"] == pytest.approx(0.1, abs=1e-9)
    assert _undecided(_bouncing(snr=1e4, cosine=0.0))["scores"]["oscillation"] < 0.01


def test_oscillation_signal_is_the_larger_of_stability_and_cosine():
    # stability ratio 0.25 (p(0.5) = 0.1) with a cosine 0.1 past its boundary (0.9), and the other way round
    assert diagnose_stall(_bouncing(snr=1e4, ratio=0.25, cosine=-0.4)).confidence == pytest.approx(0.9, abs=1e-9)
    assert diagnose_stall(_bouncing(snr=1e4, ratio=1.0, cosine=0.0)).confidence == pytest.approx(0.9, abs=1e-9)


def _demo_oscillation(**kw):
    """The numbers the demo's oscillation run measured: SGD batch 64 at lr * lambda_max = 1.87, the gradient a
    decade below its early scale yet 4.3 times one batch's noise, consecutive gradients anti-aligned."""
    base = dict(step=292, loss=0.011574, loss_initial=13.46, grad_norm=0.8098, grad_norm_initial=14.837,
                grad_sq_norm_unbiased=0.13509, grad_noise_trace=2.0271, batch_size=64, grad_cosine=-0.7349,
                lambda_max=185.63, lambda_min=1.2915, lambda_min_residual=0.0756,
                optimizer=OptimizerSpec("sgd", lr=0.01006), grad_noise_batches=8)
    return Evidence(**{**base, **kw})


def test_norm_test_decides_and_the_early_ratio_is_not_used_for_a_noisy_gradient():
    d = diagnose_stall(_demo_oscillation())
    assert d.evidence["grad_snr"] == pytest.approx(4.265, rel=1e-3) and d.evidence["grad_norm_ratio"] < 0.1
    assert d.evidence["tests"]["grad_zero"] == pytest.approx(1 - _p(d.evidence["grad_snr"]), abs=1e-12)
    assert d.kind == "oscillation" and d.confidence > 0.95
    assert [s.target for s in d.suggestions][0] == "lr" and d.suggestions[0].proposed < d.suggestions[0].current
    # the probe noise on two batches proves nothing, and the ratio (0.055) may not stand in for it
    few = diagnose_stall(_demo_oscillation(grad_noise_batches=2))
    assert few.evidence["tests"]["grad_zero"] is None and few.kind == "oscillation"
    assert few.confidence == d.confidence  # the cosine carries the oscillation either way


def test_anti_aligned_large_gradient_is_oscillation_below_the_deterministic_threshold():
    """With minibatch noise the safe step is well below 2/lr; the cosine carries the verdict."""
    for ratio in (0.25, 0.35):  # lr * lambda_max = 0.5 and 0.7: the stability test alone says no
        quiet = _undecided(_bouncing(snr=4.0, ratio=ratio, cosine=0.0))
        assert quiet["scores"]["oscillation"] < 0.5
        d = diagnose_stall(_bouncing(snr=4.0, ratio=ratio, cosine=-0.6))
        assert d.kind == "oscillation" and d.confidence == pytest.approx(729 / 730, abs=1e-9)
    scores = [_judge(_bouncing(snr=4.0, ratio=0.3, cosine=c))[1]["scores"]["oscillation"]
              for c in np.linspace(0.5, -0.9, 15)]
    assert np.all(np.diff(scores) >= -1e-12) and scores[0] < 0.5 < scores[-1]
    # the same bounce with a statistically zero gradient is still a bounce: the minimum needs its absence
    d = diagnose_stall(_bouncing(snr=0.1, ratio=0.3, cosine=-0.6))
    assert d.kind == "oscillation" and d.evidence["scores"]["local_minimum"] == pytest.approx(1 / 730, abs=1e-9)


# ---- plateau -----------------------------------------------------------------------------------------------------

def _flat(lam, grad_ratio=1e-3, lr=0.01):
    """A full-batch (noise-free) gradient grad_ratio of its early scale; loss 2, lambda_min = lambda_max / 10."""
    return Evidence(step=3, loss=2.0, lambda_max=lam, lambda_min=lam / 10, grad_norm=grad_ratio,
                    grad_norm_initial=1.0, grad_noise_trace=0.0, optimizer=OptimizerSpec("sgd", lr=lr))


def test_plateau_boundary_on_step_curvature():
    assert DEFAULT.flat_step_curvature == 1 / 50
    boundary = DEFAULT.flat_step_curvature / 0.01  # lr * lambda = 0.02
    plateau = diagnose_stall(_flat(boundary / 2))
    assert plateau.kind == "plateau" and plateau.confidence == pytest.approx(0.9, abs=1e-9)
    minimum = diagnose_stall(_flat(boundary * 2))
    assert minimum.kind == "local_minimum" and minimum.confidence == pytest.approx(0.9, abs=1e-9)
    at = _undecided(_flat(boundary))
    assert at["step_curvature"] == pytest.approx(DEFAULT.flat_step_curvature, rel=1e-12)
    assert at["scores"]["plateau"] == pytest.approx(0.5, abs=1e-9)
    assert at["scores"]["local_minimum"] == pytest.approx(0.5, abs=1e-9)
    plateau_scores = [_judge(_flat(x))[1]["scores"]["plateau"] for x in np.geomspace(1e-3, 10, 20)]
    assert np.all(np.diff(plateau_scores) <= 1e-12)


def test_plateau_needs_tiny_predicted_progress_not_a_tiny_gradient():
    """The step makes no progress: lr |g|^2 / loss below the detector's 1% per window (49 steps)."""
    assert DEFAULT.no_progress_per_step == pytest.approx(0.01 / 49, rel=1e-12)
    lam = DEFAULT.flat_step_curvature / 0.01 / 10  # flat curvature (lr * lambda = 0.002), loss 2, lr 0.01
    at_grad = math.sqrt(DEFAULT.no_progress_per_step * 2.0 / 0.01)  # lr g^2 / loss exactly on the boundary
    at = _undecided(_flat(lam, grad_ratio=at_grad))
    assert at["predicted_progress"] == pytest.approx(DEFAULT.no_progress_per_step, rel=1e-12)
    assert at["scores"]["plateau"] == pytest.approx(0.5, abs=1e-6)
    half = diagnose_stall(_flat(lam, grad_ratio=at_grad / math.sqrt(2)))  # half the predicted progress: 0.9
    assert half.kind == "plateau" and half.confidence == pytest.approx(0.9, abs=1e-9)
    assert _undecided(_flat(lam, grad_ratio=1.0))["scores"]["plateau"] < 0.01
    # a gradient as large as at the start does not veto a plateau when the step is too small to use it
    d = diagnose_stall(_flat(lam, grad_ratio=1.0, lr=1e-5))
    assert d.evidence["tests"]["grad_zero"] == pytest.approx(1 - _p(10), abs=1e-12)
    assert d.kind == "plateau" and d.confidence > 0.99
    scores = [_judge(_flat(lam, grad_ratio=g))[1]["scores"]["plateau"] for g in np.geomspace(1e-4, 1.0, 25)]
    assert np.all(np.diff(scores) <= 1e-12) and scores[0] > 0.99 and scores[-1] < 0.01


def test_predicted_progress_on_a_quadratic_is_twice_lr_lambda():
    """L = lambda x^2 / 2 (floor 0): |G|^2 / L = 2 lambda, so lr |G|^2 / L = 2 lr lambda exactly."""
    lam, x, lr = 0.04, 3.0, 0.01
    ev = Evidence(step=1, loss=0.5 * lam * x * x, lambda_max=lam, lambda_min=lam,
                  grad_sq_norm_unbiased=(lam * x) ** 2, grad_noise_trace=0.0, batch_size=8,
                  grad_norm=lam * abs(x) * 100,  # ignored: the unbiased |G|^2 is preferred when measured
                  optimizer=OptimizerSpec("sgd", lr=lr))
    assert _judge(ev)[1]["predicted_progress"] == pytest.approx(2 * lr * lam, rel=1e-12)
    momentum = Evidence(**{**ev.__dict__, "optimizer": OptimizerSpec("heavy_ball", lr=lr, momentum=0.9)})
    assert _judge(momentum)[1]["predicted_progress"] == pytest.approx(2 * lr * lam / 0.1, rel=1e-12)
    # with 8 pairs the pairs' |G|^2 is preferred (minibatch noise does not inflate it); with 7 it is not
    pairs = Evidence(**{**ev.__dict__, "grad_sq_norm_unbiased": 100 * (lam * x) ** 2,
                        **_pairs(dot=(lam * x) ** 2, noise=1.0)})
    assert _judge(pairs)[1]["predicted_progress"] == pytest.approx(2 * lr * lam, rel=1e-12)
    few = Evidence(**{**pairs.__dict__, "grad_pair_count": 7})
    assert _judge(few)[1]["predicted_progress"] == pytest.approx(200 * lr * lam, rel=1e-12)


def test_predicted_progress_edge_cases():
    base = dict(step=1, lambda_max=1e-3, lambda_min=1e-4, optimizer=OptimizerSpec("sgd", lr=0.01))
    zero_grad = _judge(Evidence(**base, loss=0.0, grad_norm=0.0, grad_norm_initial=1.0))[1]
    assert zero_grad["predicted_progress"] == 0.0 and zero_grad["tests"]["no_progress"] == 1.0
    zero_loss = _judge(Evidence(**base, loss=0.0, grad_norm=1.0, grad_norm_initial=1.0))[1]
    assert zero_loss["predicted_progress"] == math.inf and zero_loss["tests"]["no_progress"] == 0
    negative = _judge(Evidence(**base, loss=-2.0, grad_norm=1e-3))[1]  # log-likelihoods: relative to |loss|
    assert negative["predicted_progress"] == pytest.approx(0.01 * 1e-6 / 2.0)
    # the pairs' |G|^2 estimate can dip below 0 when G ~ 0: no progress, not a negative one
    dipped = _judge(Evidence(**base, loss=1.0, **_pairs(dot=-1e-3, noise=1.0)))[1]
    assert dipped["predicted_progress"] == 0.0
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
    assert d.kind == "plateau" and d.confidence > 0.9
    assert d.evidence["tests"]["grad_zero"] < 0.01  # not a zero gradient: the step is what is too small
    assert "Raise the learning rate" in [s.action for s in d.suggestions]


def test_plateau_score_is_low_at_the_demo_minimum_saddle_and_oscillation():
    # the demo minimum's probe noise taken as resting on 8 batches (the norm test needs them)
    minimum = Evidence(step=61, loss=0.2539, grad_norm=0.5213, grad_norm_initial=3.1448,
                       grad_sq_norm_unbiased=-0.0012, grad_noise_trace=12.255, batch_size=32, grad_cosine=-0.144,
                       lambda_max=2.8685, lambda_min=1.2550, optimizer=OptimizerSpec("sgd", lr=0.12436),
                       grad_noise_batches=8)
    saddle = Evidence(step=53, loss=5.1139, grad_norm=0.005838, grad_norm_initial=6.4691,
                      grad_sq_norm_unbiased=5.85e-5, grad_noise_trace=0.0, batch_size=64, grad_cosine=0.9987,
                      lambda_max=9.0, lambda_min=-3.0, lambda_min_residual=3e-6,
                      optimizer=OptimizerSpec("sgd", lr=0.02))
    for ev, kind in ((minimum, "local_minimum"), (saddle, "saddle_point"), (_demo_oscillation(), "oscillation")):
        d = diagnose_stall(ev)
        assert d.kind == kind and d.confidence > 0.9 and d.evidence["scores"]["plateau"] < 0.01


def test_momentum_widens_the_effective_step_for_the_flatness_test():
    base = dict(step=3, lambda_max=0.5, lambda_min=0.01, grad_norm=1e-3, grad_norm_initial=1.0, grad_noise_trace=0.0)
    d = diagnose_stall(Evidence(**base, optimizer=OptimizerSpec("heavy_ball", lr=0.01, momentum=0.9)))
    assert d.evidence["step_curvature"] == pytest.approx(0.05) and d.kind == "local_minimum"
    assert d.confidence == pytest.approx(_p(2.5), rel=1e-9)  # 0.05 / 0.02
    plain = diagnose_stall(Evidence(**base, optimizer=OptimizerSpec("sgd", lr=0.01)))  # 0.005: a plateau
    assert plain.kind == "plateau" and plain.confidence == pytest.approx(_p(4), rel=1e-9)


# ---- thresholds from the configured detector -------------------------------------------------------------------

def test_thresholds_follow_the_configured_detector():
    th = Thresholds.from_detector(StallDetector(window=100, rel_improvement=0.02))
    assert (th.window, th.rel_improvement, th.check_after) == (100, 0.02, 4)
    assert th.flat_step_curvature == 1 / 100 and th.no_progress_per_step == pytest.approx(0.02 / 99, rel=1e-15)
    assert Thresholds.from_detector(StallDetector(), check_after=2) == Thresholds(50, 0.01, 2)
    # step curvature sqrt(2) / 100: flat against the default 1/50 (p 0.75), not against 1/100 (a minimum, 0.75)
    ev = _flat(math.sqrt(2) / 100 / 0.01)
    default = diagnose_stall(ev)
    assert default.kind == "plateau" and default.confidence == pytest.approx(0.75, abs=1e-9)
    configured = diagnose_stall(ev, thresholds=th)
    assert configured.kind == "local_minimum" and configured.confidence == pytest.approx(0.75, abs=1e-9)


def test_a_plateau_is_decided_against_the_detectors_progress_limit():
    th = Thresholds.from_detector(StallDetector(window=100, rel_improvement=0.02))
    lam = th.flat_step_curvature / 0.01 / 100  # far below the flatness boundary
    half = math.sqrt(th.no_progress_per_step / 2 * 2.0 / 0.01)  # half the detector's limit per step
    d = diagnose_stall(_flat(lam, grad_ratio=half), thresholds=th)
    assert d.kind == "plateau" and d.evidence["tests"]["no_progress"] == pytest.approx(0.9, abs=1e-9)
    assert d.confidence == pytest.approx(0.9, abs=1e-9)
    assert "per 100 steps" in d.summary
    assert d.evidence["prediction"]["check_at_step"] == d.step + 4 * 100
    # on the detector's limit exactly: undecided with its thresholds, a (weak) plateau with the defaults (0.01/49)
    at = math.sqrt(th.no_progress_per_step * 2.0 / 0.01)
    assert _undecided(_flat(lam, grad_ratio=at), thresholds=th)["scores"]["plateau"] == pytest.approx(0.5, abs=1e-9)
    default = diagnose_stall(_flat(lam, grad_ratio=at))
    expected = 1 - _p(th.no_progress_per_step / DEFAULT.no_progress_per_step)
    assert default.kind == "plateau" and default.confidence == pytest.approx(expected, rel=1e-9)


# ---- events: divergence, spike ---------------------------------------------------------------------------------

def test_divergence_rules():
    nan = diagnose_stall(Evidence(step=1, loss=float("nan")))
    assert nan.kind == "divergence" and nan.confidence == 1.0 and nan.evidence["tests"]["divergence_event"] == 1.0
    overflow = diagnose_stall(Evidence(step=1, loss=1.0, grad_norm=float("inf")))
    assert overflow.kind == "divergence" and overflow.confidence == 1.0
    # an infinite eigenvalue is a failed measurement, not evidence of divergence
    inf_lambda = _undecided(Evidence(step=1, loss=1.0, lambda_max=float("inf")))
    assert inf_lambda["unavailable"] == ["lambda_max"] and inf_lambda["scores"]["divergence"] == 0.0
    # a loss far above its start without a detector event is not divergence (only non-finite or a sustained rise)
    high = _undecided(Evidence(step=1, loss=4.1, loss_min=0.1, loss_initial=1.0))
    assert high["scores"]["divergence"] == 0.0 and high["tests"]["divergence_event"] is None


def test_a_tie_with_divergence_goes_to_divergence():
    # a non-finite loss in the window, yet a perfectly flat, gradient-free point: divergence and plateau both 1
    ev = Evidence(step=1, loss=1.0, loss_window=[1.0, float("nan")], lambda_max=0.0, lambda_min=0.0, grad_norm=0.0,
                  optimizer=OptimizerSpec("sgd", lr=0.01))
    d = diagnose_stall(ev)
    assert d.evidence["scores"]["plateau"] == 1.0 and d.kind == "divergence" and d.confidence == 1.0


def _divergence_event():
    det = StallDetector()
    curve = np.concatenate([np.exp(-np.arange(100) / 30), 0.04 * 1.3 ** np.arange(40)])
    return next(e for e in (det.update(i, x) for i, x in enumerate(curve)) if e is not None)


def test_divergence_from_a_detector_event_and_event_evidence_recorded():
    event = _divergence_event()
    assert event.reason == "divergence"
    d = diagnose_stall(Evidence(step=event.step, loss_initial=1.0), event)
    assert d.kind == "divergence" and d.confidence == pytest.approx(_p(math.exp(event.margin)), rel=1e-9)
    assert d.evidence["stall_trigger"] == "rising" and d.evidence["loss_window"] == event.window
    assert d.evidence["stall_reason"] == "divergence" and d.evidence["window_steps"] == event.window_steps
    assert d.suggestions == []  # no lr known: nothing with numbers to propose
    assert d.evidence["prediction"]["loss_initial"] == 1.0


def test_a_divergence_event_allows_only_divergence():
    event = _divergence_event()
    # evidence that alone is a confident oscillation (stability ratio 3) or saddle: the event decides the kind
    for ev in (_bouncing(snr=1e4, ratio=3.0, step=event.step), _critical(-30.0, step=event.step)):
        assert diagnose_stall(ev).kind != "divergence"
        d = diagnose_stall(ev, event)
        assert d.kind == "divergence" and set(d.evidence["scores"]) == {"divergence"}


def _spike_event(margin=math.log(2.0), duration=30):
    """A recovered spike ending at step 154; lasting 30 steps, the model_spike test passes on duration alone
    (p(3) > the spike's own 0.9), so it does not move these tests' confidences."""
    start = 154 - duration
    return StallEvent(step=154, reason="spike", slope=math.nan, slope_ci=(math.nan, math.nan), rel_slope=math.nan,
                      window=[1.0] * 50, window_steps=list(range(105, 155)), trigger="spike", margin=margin,
                      spike={"start_step": start, "peak_step": start, "end_step": 154, "peak": 5.0,
                             "reference": 1.0, "reference_sd": 0.01, "sigmas": 400.0, "ratio": 5.0})


def _spiked(before=None, after=None, **kw):
    """Stability ratios before and after the spike (SGD lr 0.01: threshold 200)."""
    lam = None if after is None else 200.0 * after
    base = dict(step=154, loss=1.0, lambda_max=lam, stability_ratio_before=before,
                optimizer=OptimizerSpec("sgd", lr=0.01))
    return Evidence(**{**base, **kw})


@pytest.mark.parametrize("before, after, catapult", [(1.5, 0.8, True), (0.9, 0.8, False), (1.5, 1.2, False),
                                                     (None, 0.8, None), (1.5, None, None)])
def test_a_spike_event_gives_exactly_a_loss_spike(before, after, catapult):
    d = diagnose_stall(_spiked(before, after), _spike_event())
    assert d.kind == "loss_spike" and set(d.evidence["scores"]) == {"loss_spike"}
    assert d.confidence == pytest.approx(0.9, abs=1e-9)  # margin ln 2: the peak twice its boundary
    assert d.evidence["catapult"] is catapult
    assert ("catapult" in d.summary) == bool(catapult)
    assert d.evidence["spike"]["peak"] == 5.0 and d.evidence["prediction"]["peak"] == 5.0


def test_a_spike_event_is_never_another_kind():
    # a bounce past the stability edge and a saddle-like point: still only the spike is reported
    for ev in (_spiked(None, 3.0), _critical(-30.0, step=154)):
        assert diagnose_stall(ev).kind in ("oscillation", "saddle_point")
        assert diagnose_stall(ev, _spike_event()).kind == "loss_spike"


def test_a_recovered_spike_from_the_detector_end_to_end():
    det = StallDetector()
    losses = list(1.0 + 0.01 * np.random.default_rng(1).standard_normal(200))
    losses[150:153] = [5.0, 5.0, 5.0]
    event = next(e for e in (det.update(i, x) for i, x in enumerate(losses)) if e is not None and e.reason != "stall")
    assert event.reason == "spike"
    # three steps are too short to tell the model from the batches: the probe batches' loss shows it (x1e6)
    assert diagnose_stall(_spiked(1.5, 0.8, step=event.step), event) is None
    d = diagnose_stall(_spiked(1.5, 0.8, step=event.step, spike_probe_ratio=1e6), event)
    assert d.kind == "loss_spike" and d.evidence["catapult"] is True
    assert d.confidence == pytest.approx(_p(math.exp(event.margin)), rel=1e-9) and d.confidence > 0.99
    assert d.evidence["prediction"]["peak"] == event.spike["peak"]


def test_flat_noisy_run_end_to_end_with_event():
    det = StallDetector()
    losses = 1.0 + 0.05 * np.random.default_rng(0).standard_normal(200)
    event = next(e for e in (det.update(i, x) for i, x in enumerate(losses)) if e is not None)
    assert event.reason == "stall"
    d = diagnose_stall(_critical(-30.0, step=event.step), event)
    assert d.kind == "saddle_point" and d.step == event.step
    assert d.evidence["rel_slope"] == event.rel_slope and len(d.evidence["window_steps"]) == len(event.window)
    # a stall event can still reveal a non-finite loss
    assert diagnose_stall(Evidence(step=event.step, loss=float("nan")), event).kind == "divergence"


# ---- saddle numbers, points, minimum's loss level ----------------------------------------------------------------

def test_saddle_escape_numbers_on_the_theory_example():
    """L(w1, w2) = (1 - w1 w2)^2 at 0: H eigenvalues +-2, u = (1,1)/sqrt2, L(t u) - L(0) = -t^2 + t^4/4."""
    ev = Evidence(step=0, loss=1.0, lambda_max=2.0, lambda_min=-2.0, lambda_min_residual=0.0, grad_norm=0.0,
                  grad_norm_initial=1.0, grad_noise_trace=0.0)  # an exact (deterministic) gradient
    d = classify_point(ev)
    assert d.kind == "saddle_point" and d.confidence > 0.99
    assert d.evidence["escape_drop_coefficient"] == -1.0
    t = d.evidence["escape_distance"]
    exact_drop = 1.0 - (1.0 - t * t / 2) ** 2  # L(0) - L(t u)
    assert d.evidence["escape_drop"] == pytest.approx(0.01)  # the second-order prediction 1/2 |lambda_min| t^2
    assert exact_drop == pytest.approx(0.01 - t**4 / 4, rel=1e-12)  # differs from the truth only by O(t^4)
    assert d.evidence["negative_curvature_ratio"] == 1.0


def test_classify_point_not_a_critical_point():
    assert classify_point(_critical(-30.0, grad=GRAD_LARGE)) is None
    d = classify_point(_critical(5.0))
    assert d.kind == "local_minimum"
    # nothing known of the gradient: the critical-point test is 0.5, which cannot carry a verdict
    assert classify_point(Evidence(step=0, lambda_max=10.0, lambda_min=1.0)) is None
    flat = classify_point(Evidence(step=0, lambda_max=1e-4, lambda_min=-1e-6, grad_norm=1e-6,
                                   grad_norm_initial=1.0, optimizer=OptimizerSpec("sgd", lr=0.1)))
    assert flat.kind == "plateau"
    # classify_point never says oscillation or divergence, even when the point bounces
    assert classify_point(_bouncing(snr=0.25, ratio=3.0)) is None


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


# ---- no verdict without evidence ---------------------------------------------------------------------------------

def test_unmeasured_evidence_gives_no_verdict():
    undecided = []
    assert diagnose_stall(Evidence(step=7), undecided=undecided) is None
    (record,) = undecided
    assert record["scores"] == {"divergence": 0.0, "oscillation": 0.0, "saddle_point": 0.5, "local_minimum": 0.5,
                                "plateau": 0.0}
    assert all(p is None for p in record["tests"].values())
    assert diagnose_stall(Evidence(step=7)) is None  # without a list: silent


def test_no_fitting_kind_gives_no_verdict_and_records_why():
    # flat curvature, yet lr |g|^2 / loss predicts 25% per window and the gradient is large: nothing fits
    ev = _flat(DEFAULT.flat_step_curvature / 0.01 / 10, grad_ratio=1.0)
    record = _undecided(ev)
    assert max(record["scores"].values()) < 0.01
    assert record["scores"]["plateau"] < 0.01 and record["tests"]["no_progress"] < 0.01
    assert record["predicted_progress"] == pytest.approx(0.01 * 1.0 / 2.0)
    assert "prediction" not in record and "uncertain" not in record
    assert record["step"] == 3 and record["lambda_max"] == ev.lambda_max  # the evidence itself is kept


def test_the_half_boundary_decides_nothing():
    tie = _undecided(_critical(-C.NEGATIVE_CURVATURE_TAU * 100.0))  # saddle vs minimum exactly on tau
    assert tie["scores"]["saddle_point"] == tie["scores"]["local_minimum"] == pytest.approx(0.5, abs=1e-12)
    just_below = _undecided(_bouncing(snr=1e4, ratio=0.49))
    assert just_below["scores"]["oscillation"] == pytest.approx(_p(0.98), abs=1e-12)
    just_above = diagnose_stall(_bouncing(snr=1e4, ratio=0.51))
    assert just_above.kind == "oscillation" and just_above.confidence == pytest.approx(_p(1.02), abs=1e-12)
    assert just_above.suggestions


# ---- the rule table ----------------------------------------------------------------------------------------------

def test_rule_table_covers_every_kind():
    assert set(C.RULES) == set(KINDS) and set(C.PREDICTIONS) == set(KINDS) and set(C.PRIORITY) == set(KINDS)
    assert "uncertain" not in C.RULES
    test_names = set(_judge(Evidence(step=1))[1]["tests"])
    for kind, row in C.RULES.items():
        assert row, kind
        for name, must_hold, missing in row:
            assert name in test_names and isinstance(must_hold, bool) and 0.0 <= missing <= 1.0
    for reason, kinds in C.EVENT_KINDS.items():
        assert set(kinds) <= set(KINDS), reason
    assert C.EVENT_KINDS["spike"] == ("loss_spike",) and C.EVENT_KINDS["divergence"] == ("divergence",)
    # the critical-point tests are 0.5 when unmeasured: they cannot carry a verdict on their own
    rows = {k: {name: (hold, missing) for name, hold, missing in row} for k, row in C.RULES.items()}
    assert rows["saddle_point"]["grad_zero"] == (True, 0.5) and rows["local_minimum"]["grad_zero"] == (True, 0.5)
    assert rows["oscillation"] == {"oscillation_signal": (True, 0.0)}
    assert rows["local_minimum"]["oscillation_signal"] == (False, 0.0)


@pytest.mark.parametrize("ev", [_critical(-30.0), _critical(5.0), _bouncing(snr=4.0, ratio=0.3, cosine=-0.6),
                                _flat(0.2), _flat(2.0), Evidence(step=7), _demo_oscillation()])
def test_scores_are_the_minimum_over_each_rule_row(ev):
    d, record = _judge(ev)
    for kind, score in record["scores"].items():
        support = []
        for name, must_hold, missing in C.RULES[kind]:
            p = record["tests"][name]
            p = missing if p is None else p
            support.append(p if must_hold else 1 - p)
        assert score == min(support)
    if d is not None:
        assert d.confidence == max(record["scores"].values()) > 0.5
        assert d.evidence["prediction"]["claim"] == C.PREDICTIONS[d.kind]


def test_the_rule_table_is_the_only_place_rules_live(monkeypatch):
    ev = _flat(DEFAULT.flat_step_curvature / 0.01 / 10, grad_ratio=1.0)  # fails only plateau's no_progress
    assert diagnose_stall(ev) is None
    monkeypatch.setitem(C.RULES, "plateau", (("flat", True, 0.0), ("oscillation_signal", False, 0.0)))
    d = diagnose_stall(ev)
    assert d.kind == "plateau" and d.confidence == pytest.approx(_p(10), abs=1e-9)


# ---- predictions and their check ---------------------------------------------------------------------------------

def test_every_verdict_states_its_prediction():
    cases = [(_critical(5.0), None), (_critical(-30.0), None), (_bouncing(snr=1e4, ratio=1.0), None),
             (_flat(0.2), None), (Evidence(step=4, loss=float("nan"), loss_initial=2.0), None),
             (_spiked(1.5, 0.8), _spike_event())]
    kinds = set()
    for ev, event in cases:
        d = diagnose_stall(ev, event)
        kinds.add(d.kind)
        prediction = d.evidence["prediction"]
        assert prediction["claim"] == C.PREDICTIONS[d.kind] and prediction["lr"] == ev.lr
        if d.kind != "saddle_point":
            assert prediction["check_at_step"] == ev.step + 4 * 50
    assert kinds == set(KINDS)
    th = Thresholds(window=100, rel_improvement=0.02, check_after=2)
    assert diagnose_stall(_critical(5.0), thresholds=th).evidence["prediction"]["check_at_step"] == 10 + 200


def test_minimum_prediction_confirmed_on_a_flat_loss_refuted_on_a_falling_one():
    d = diagnose_stall(_critical(5.0))
    assert d.kind == "local_minimum" and d.evidence["prediction"]["loss"] == 1.0
    flat = check_prediction(d, [1.0] * 200, lr=0.001)
    assert flat["outcome"] == "confirmed" and flat["relative_fall"] == 0.0 and flat["loss_after"] == 1.0
    falling = [0.9 ** (k / 50) for k in range(1, 201)]  # 10% per window for 4 windows
    out = check_prediction(d, falling, lr=0.001)
    assert out["outcome"] == "refuted"
    assert out["loss_after"] == pytest.approx(0.9 ** (195 / 50), rel=1e-12)  # median of the last 10 losses
    assert out["relative_fall"] == pytest.approx(1 - 0.9 ** (195 / 50), rel=1e-12)
    # the loss "stays" while it falls by less than twice the stall limit (1% per window) per window
    slow = [0.985 ** (k / 50) for k in range(1, 201)]  # 1.5% per window
    assert check_prediction(d, slow, lr=0.001)["outcome"] == "confirmed"
    faster = [0.97 ** (k / 50) for k in range(1, 201)]  # 3% per window
    assert check_prediction(d, faster, lr=0.001)["outcome"] == "refuted"


def test_saddle_prediction_confirmed_when_the_loss_drops_by_the_escape_drop():
    d = diagnose_stall(_critical(-30.0))
    prediction = d.evidence["prediction"]
    assert prediction["drop"] == pytest.approx(0.01) and prediction["loss"] == 1.0
    # ten e-folds of 1 / (lr |lambda_min|) = 33.3 steps, later than the default 4 windows (200 steps)
    assert prediction["check_at_step"] == 10 + 334
    assert check_prediction(d, [1.0] * 300 + [0.985] * 44, lr=0.001)["outcome"] == "confirmed"
    assert check_prediction(d, [0.995] * 344, lr=0.001)["outcome"] == "refuted"


def test_oscillation_prediction_needs_a_lower_learning_rate():
    d = diagnose_stall(_bouncing(snr=1e4, ratio=1.0))
    assert d.kind == "oscillation" and d.evidence["prediction"]["lr"] == 0.01 and d.evidence["loss"] == 0.5
    falling = [0.4] * 200
    assert check_prediction(d, falling, lr=0.01)["outcome"] == "not tested"
    assert check_prediction(d, falling, lr=0.008)["outcome"] == "not tested"  # above 0.7 x the lr: not a cut
    assert check_prediction(d, falling, lr=None)["outcome"] == "not tested"
    assert check_prediction(d, falling, lr=0.005)["outcome"] == "confirmed"
    assert check_prediction(d, [0.6] * 200, lr=0.005)["outcome"] == "refuted"


def test_divergence_prediction_refuted_when_the_loss_comes_back_below_its_start():
    d = diagnose_stall(Evidence(step=4, loss=float("nan"), loss_initial=2.0))
    assert d.evidence["prediction"]["loss_initial"] == 2.0
    back = check_prediction(d, [1.0] * 60, lr=0.1)
    assert back["outcome"] == "refuted" and back["loss_after"] == 1.0
    assert check_prediction(d, [1.9] * 60, lr=0.1)["outcome"] == "refuted"  # any way below the start
    assert check_prediction(d, [2.0] * 60, lr=0.1)["outcome"] == "confirmed"  # at its start: not back below
    assert check_prediction(d, [3.0] * 60, lr=0.1)["outcome"] == "confirmed"
    assert check_prediction(d, [1.0, float("nan")], lr=0.1)["outcome"] == "confirmed"  # still non-finite
    assert check_prediction(d, [], lr=0.1)["outcome"] == "not tested"  # nothing seen since the verdict


def test_plateau_and_spike_predictions():
    plateau = diagnose_stall(_flat(0.2))
    assert plateau.kind == "plateau" and plateau.evidence["prediction"]["loss"] == 2.0
    assert check_prediction(plateau, [2.0] * 100, lr=0.01)["outcome"] == "confirmed"
    assert check_prediction(plateau, [3.2] * 100, lr=0.01)["outcome"] == "refuted"  # it rose by 60%
    spike = diagnose_stall(_spiked(1.5, 0.8), _spike_event())
    assert check_prediction(spike, [1.0] * 100, lr=0.01)["outcome"] == "confirmed"
    assert check_prediction(spike, [6.0] * 100, lr=0.01)["outcome"] == "refuted"


def test_check_prediction_without_a_finite_loss_is_not_tested():
    d = diagnose_stall(_critical(5.0))
    out = check_prediction(d, [float("nan")] * 10, lr=0.001)
    assert out["outcome"] == "not tested" and out["loss_after"] is None


def test_bad_input():
    with pytest.raises(UsageError):
        diagnose_stall({"step": 1})
    with pytest.raises(UsageError):
        diagnose_stall(Evidence(step=1), event="stall")
    with pytest.raises(UsageError):
        diagnose_stall(Evidence(step=1), thresholds=0.5)
    with pytest.raises(UsageError):
        classify_point(None)
    with pytest.raises(UsageError):
        Thresholds(window=2)
    with pytest.raises(UsageError):
        Thresholds(rel_improvement=-0.01)


def test_a_noise_free_gradient_small_against_the_bowl_scale_is_zero():
    """A saddle at initialisation: the early-gradient scale is as tiny as the gradient (ratio 1), yet against a
    quadratic bowl with the top curvature and this loss (where |g|^2 / (2 lambda_max loss) = 1) it is tiny: below the
    stall limit that is ~0."""
    base = dict(grad_noise_trace=0.0, batch_size=64, grad_norm_initial=7e-5, loss=5.0)
    boundary = math.sqrt(0.01 * 2 * 100.0 * 5.0)  # |g| at which the reach is exactly 1% (lambda_max 100)
    at = _judge(_critical(-30.0, grad={**base, "grad_norm": boundary}))[1]
    assert at["tests"]["grad_zero"] == pytest.approx(0.5, abs=1e-9)
    tiny = diagnose_stall(_critical(-30.0, grad={**base, "grad_norm": 7e-5}))
    assert tiny.kind == "saddle_point" and tiny.evidence["tests"]["grad_zero"] > 0.999
    # half the boundary norm is a quarter of the reach: 1 - p(4)
    half = _judge(_critical(-30.0, grad={**base, "grad_norm": boundary / 2}))[1]
    assert half["tests"]["grad_zero"] == pytest.approx(1 - _p(0.25), abs=1e-9)
    assert C.gradient_reach(_critical(-30.0, grad={**base, "grad_norm": boundary}), 5.0) == pytest.approx(0.01)
    # a configured detector's stall limit moves the boundary: 2% halves the reach needed
    looser = C.Thresholds(rel_improvement=0.02)
    assert _judge(_critical(-30.0, grad={**base, "grad_norm": boundary}), thresholds=looser)[1]["tests"][
        "grad_zero"] == pytest.approx(1 - _p(0.5), abs=1e-9)


# ---- a spike of the model, not of the batches; spikes that recur while the step bounces --------------------------
@pytest.mark.parametrize("ratio, verdict", [(1.0, None), (1.5, None), (3.0, _p(2.0)), (None, None)])
def test_a_spike_must_show_on_the_fixed_probe_batches(ratio, verdict):
    """The probe batches' loss at the spike's worst over after it: ~1 for a few hard minibatches (nothing about the
    model changed), past the detector's spike ratio (1.5) for a model that got worse; a three-step spike without it
    cannot be told from hard batches (its duration, 3 of the 10 steps that would decide: p(0.3))."""
    d, record = _judge(_spiked(spike_probe_ratio=ratio), _spike_event(duration=3))  # too short to decide alone
    if ratio is None:
        assert d is None and record["tests"]["model_spike"] == pytest.approx(_p(0.3), abs=1e-12)
        return
    if verdict is None:
        assert d is None and record["tests"]["model_spike"] == pytest.approx(_p(ratio / 1.5), abs=1e-12)
    else:
        assert d.kind == "loss_spike" and d.confidence == pytest.approx(min(0.9, verdict), abs=1e-12)


def test_the_probe_boundary_follows_the_configured_spike_ratio():
    det = StallDetector(spike_ratio=3.0)
    th = C.Thresholds.from_detector(det)
    assert th.spike_ratio == 3.0
    short = _spike_event(duration=3)  # too short for its duration to decide: the probe does
    assert diagnose_stall(_spiked(spike_probe_ratio=2.0), short).kind == "loss_spike"
    assert diagnose_stall(_spiked(spike_probe_ratio=2.0), short, th) is None


def test_repeated_spikes_while_the_step_bounces_are_an_oscillation():
    # a stability ratio of 2 (p(4) against the 0.5 boundary, above the spike's own 0.9) makes the recurring spikes
    # the bounce itself; the first spike stays a spike, and recurring spikes of a calm step stay spikes
    bouncing = dict(spike_probe_ratio=3.0)
    assert diagnose_stall(_spiked(after=2.0, spike_count=1, **bouncing), _spike_event()).kind == "loss_spike"
    d = diagnose_stall(_spiked(after=2.0, spike_count=2, **bouncing), _spike_event())
    assert d.kind == "oscillation" and d.confidence == pytest.approx(_p(4.0), abs=1e-12)
    calm = diagnose_stall(_spiked(after=0.1, spike_count=2, **bouncing), _spike_event())
    assert calm.kind == "loss_spike"
    # the bounce explains the spikes even where each spike is clearer than the bounce (a brief spike read on the
    # model 30x): an oscillation signal that decides (p(1.2) > 0.5) is enough
    clear = dict(spike_probe_ratio=30.0)
    d = diagnose_stall(_spiked(after=0.6, spike_count=2, **clear), _spike_event())
    assert d.kind == "oscillation" and d.confidence == pytest.approx(_p(1.2), abs=1e-12) and _p(1.2) > 0.5
    assert diagnose_stall(_spiked(after=0.6, spike_count=1, **clear), _spike_event()).kind == "loss_spike"


@pytest.mark.parametrize("duration, decided", [(5, False), (10, False), (20, True), (40, True)])
def test_a_spike_that_lasts_is_one_of_the_model(duration, decided):
    """Hard batches change every step; a three-loss median held up for 10 steps or more (p 0.5 at 10, 0.9 at 20)
    is the model. Without the probe, the duration decides."""
    d, record = _judge(_spiked(), _spike_event(duration=duration))
    assert record["tests"]["model_spike"] == pytest.approx(_p(duration / C.MODEL_SPIKE_STEPS), abs=1e-12)
    assert (d is not None and d.kind == "loss_spike") == decided
    # either test is enough: a short spike the probe saw, a long one it missed
    assert diagnose_stall(_spiked(spike_probe_ratio=1.0), _spike_event(duration=40)).kind == "loss_spike"


def test_extreme_evidence_cannot_underflow_a_ratio_into_an_exception():
    # 2 lambda_max |loss| underflows to 0 (found by the property test), a ratio of tiny over huge underflows to 0
    assert C.gradient_reach(Evidence(step=0, grad_norm=1.0, lambda_max=5e-324), 5e-324) == math.inf
    assert C.log_ratio_probability(1e-300, 1e300) == 0.0 and C.log_ratio_probability(1e300, 1e-300) == 1.0
    ev = Evidence(step=0, grad_norm=1.0, lambda_max=5e-324, lambda_min=-1.0, loss=5e-324, grad_noise_trace=0.0,
                  optimizer=OptimizerSpec("sgd", lr=0.1))
    record = _judge(ev)[1]
    assert record["tests"]["grad_zero"] == 0.0  # an infinite reach: not a zero gradient


@pytest.mark.parametrize("spec, sharpness, expected", [
    (OptimizerSpec("sgd", lr=0.1), 15.0, _p(0.75 / 0.5)),  # lr * c = 1.5: the step overshoots along the gradient
    (OptimizerSpec("sgd", lr=0.1), 2.5, _p(0.125 / 0.5)),  # well inside: no bounce
    (OptimizerSpec("sgd", lr=0.1, momentum=0.9), 15.0, None),  # the update is not the gradient: not used
    (OptimizerSpec("adam", lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8), 15.0, None),
    (OptimizerSpec("sgd", lr=0.1), -3.0, None),  # nothing limits the step along it
    (None, 15.0, None),
])
def test_the_critical_sharpness_stands_in_for_lambda_max_in_the_oscillation_signal(spec, sharpness, expected):
    # SGD's critical sharpness is g^T H g / |g|^2 <= lambda_max: the stability ratio along the step (threshold 2/lr)
    ev = Evidence(step=100, loss=1.0, optimizer=spec, directional_sharpness=sharpness)
    signal = C._oscillation_signal(ev)
    assert signal == (None if expected is None else pytest.approx(expected, abs=1e-12))
    # a measured lambda_max is the better evidence and replaces it
    measured = Evidence(step=100, loss=1.0, optimizer=spec, directional_sharpness=sharpness, lambda_max=1.0)
    if spec is not None and not spec.preconditioned:
        assert C._oscillation_signal(measured) == pytest.approx(_p(measured.stability_ratio / 0.5), abs=1e-12)


def test_at_a_spike_the_ratio_measured_just_before_it_stands_in_for_the_oscillation_signal():
    # repeated spikes with no snapshot of their own: the stability ratio of the two windows before the spike
    spiked = Evidence(step=300, loss=1.0, optimizer=OptimizerSpec("sgd", lr=0.1), stability_ratio_before=0.9,
                      spike_count=2, spike_probe_ratio=5.0)
    assert C._oscillation_signal(spiked) == pytest.approx(_p(0.9 / 0.5), abs=1e-12)
    assert diagnose_stall(spiked, _spike_event()).kind == "oscillation"
    now = Evidence(step=300, loss=1.0, optimizer=OptimizerSpec("sgd", lr=0.1), stability_ratio_before=0.9,
                   lambda_max=2.0)  # measured now: 2 / 20 = 0.1, the one that counts
    assert C._oscillation_signal(now) == pytest.approx(_p(0.1 / 0.5), abs=1e-12)


def test_the_cosine_test_counts_each_pair_once():
    """The anti-alignment test reads the mean of the pairs' cosines (upper 2-se bound), not the norm-weighted mean
    ``dot / sq``: measured on the verdict corpus's bouncing SGD run, nine pairs whose every cosine was about -0.99
    gave a weighted bound of -0.16 (two large-gradient pairs carried the error) and an unweighted one of -0.98."""
    weighted = dict(grad_pair_count=9, grad_pair_dot=-31.2, grad_pair_dot_stderr=13.1, grad_pair_sq=31.55)
    upper = -0.986 + 2 * 0.001
    ev = Evidence(step=10, loss=1.0, grad_pair_cosine=-0.986, grad_pair_cosine_stderr=0.001, **weighted)
    assert C._pair_cosine_upper(ev) == pytest.approx(upper, abs=1e-12)
    assert C._oscillation_signal(ev) == pytest.approx(1 / (1 + math.exp((C.ANTI_ALIGNED_COSINE - upper) / -C.COSINE_WIDTH)),
                                                      abs=1e-9)
    # without the pairs' cosines (evidence built by hand): the weighted bound, -0.16, which proves nothing
    hand = Evidence(step=10, loss=1.0, **weighted)
    assert C._pair_cosine_upper(hand) == pytest.approx((-31.2 + 26.2) / 31.55, abs=1e-12)
    assert C._oscillation_signal(hand) < 0.05
    # fewer than eight pairs: no test, whatever the cosines
    assert C._pair_cosine_upper(Evidence(step=10, loss=1.0, **{**weighted, "grad_pair_count": 7},
                                         grad_pair_cosine=-0.99, grad_pair_cosine_stderr=0.0)) is None
