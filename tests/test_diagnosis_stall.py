"""StallDetector on synthetic noisy loss curves: healthy runs stay silent, each stall speaks once."""

import json
import math

import warnings

import numpy as np
import pytest
from scipy import stats

from optdiag.diagnosis import stall as stall_module
from optdiag.diagnosis.stall import StallDetector, StallEvent, explosion_threshold, theil_sen
from optdiag.errors import UsageError


def _events(losses, detector=None, start=0):
    det = detector or StallDetector()
    out = []
    for i, loss in enumerate(losses):
        event = det.update(start + i, loss)
        if event is not None:
            out.append(event)
    return out


def _noise(n, sigma, seed):
    return 1.0 + sigma * np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize("seed", range(3))
def test_healthy_noisy_exponential_decay_gives_no_event(seed):
    t = np.arange(1200)
    assert _events(np.exp(-t / 200) * _noise(len(t), 0.05, seed)) == []


def test_slowly_but_surely_falling_noisy_loss_is_not_a_stall():
    # 10% per window of 50 steps, 2% minibatch noise: the fit sees the fall clearly.
    t = np.arange(800)
    assert _events(np.exp(-t / 500) * _noise(len(t), 0.02, 7)) == []


@pytest.mark.parametrize("seed", range(3))
def test_flat_noisy_loss_gives_exactly_one_stall(seed):
    events = _events(_noise(800, 0.05, seed))
    assert [e.reason for e in events] == ["stall"]
    e = events[0]
    assert 19 <= e.step <= 120 and e.trigger == "flat"
    assert e.rel_improvement < 0.01 and e.slope_ci[0] <= e.slope <= e.slope_ci[1]
    assert len(e.window) == len(e.window_steps) <= 50 and e.window_steps[-1] == e.step


def test_noise_free_flat_loss_fires_at_min_window():
    events = _events(np.full(100, 3.0), StallDetector(window=50, min_window=20))
    assert [e.step for e in events] == [19]


def test_saddle_escape_then_new_plateau_gives_two_events():
    # flat at 1, escape (falls to 0.3), flat again: two situations, two verdicts.
    curve = np.concatenate([np.ones(300), 0.3 + 0.7 * np.exp(-np.arange(150) / 20), np.full(300, 0.3)])
    events = _events(curve * _noise(len(curve), 0.03, 1))
    assert [e.reason for e in events] == ["stall", "stall"]
    assert events[0].step < 300 and events[1].step > 400
    assert np.median(events[1].window) < 0.4 < np.median(events[0].window)


def test_scale_invariance():
    curve = np.concatenate([np.ones(200), 0.2 + 0.8 * np.exp(-np.arange(200) / 30), np.full(200, 0.2)])
    curve = curve * _noise(len(curve), 0.04, 3)
    base = _events(curve)
    scaled = _events(curve * 1000.0)
    assert [(e.step, e.reason) for e in base] == [(e.step, e.reason) for e in scaled] != []
    for a, b in zip(base, scaled):
        assert b.rel_slope == pytest.approx(a.rel_slope) and b.slope == pytest.approx(1000 * a.slope)


def test_nan_is_divergence_immediately_and_only_once():
    det = StallDetector()
    assert det.update(0, 1.0) is None
    event = det.update(1, float("nan"))
    assert event.reason == "divergence" and event.trigger == "nonfinite" and event.margin == math.inf
    assert det.update(2, float("inf")) is None and det.diverged


def test_explosion_is_divergence():
    curve = np.concatenate([np.exp(-np.arange(100) / 30), 0.04 * 1.3 ** np.arange(40)])
    events = _events(curve)
    assert [e.reason for e in events] == ["divergence"]
    assert events[0].trigger == "explosion" and events[0].margin >= 0
    # the rule: the median of the last three losses above running_min + 2 * (|first - min| + |min|)
    assert np.median(curve[events[0].step - 2: events[0].step + 1]) > explosion_threshold(1.0, 0.04 * 1.3**0, 2.0) - 1


def test_single_spike_is_not_an_explosion():
    curve = np.exp(-np.arange(300) / 100)
    curve[150] = 50.0
    assert _events(curve) == []


def test_significant_rise_is_divergence():
    t = np.arange(200)
    curve = np.concatenate([np.exp(-t / 40), np.exp(-199 / 40) * np.exp(np.arange(100) / 40)])
    events = _events(curve, StallDetector(explosion_factor=100.0))
    assert events and events[-1].reason == "divergence" and events[-1].trigger == "rising"


def test_explosion_threshold_rule():
    assert explosion_threshold(2.0, 0.5, 1.0) == 2.5
    assert explosion_threshold(-1.0, -3.0, 1.0) == -3.0 + 2.0 + 3.0  # negative losses (log-likelihoods)
    assert explosion_threshold(0.0, 0.0) is None


def test_resumed_detector_continues_exactly():
    curve = np.concatenate([np.ones(150), 0.3 + 0.7 * np.exp(-np.arange(150) / 20), np.full(200, 0.3)])
    curve = curve * _noise(len(curve), 0.03, 5)
    reference = [(e.step, e.reason) for e in _events(curve)]
    first = StallDetector()
    part1 = _events(curve[:330], first)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = StallDetector()
    resumed.load_state_dict(state)
    part2 = _events(curve[330:], resumed, start=330)
    assert [(e.step, e.reason) for e in part1 + part2] == reference
    assert len(reference) == 2


def test_event_round_trip():
    event = _events(np.ones(30))[0]
    back = StallEvent.from_dict(json.loads(json.dumps(event.to_dict(), allow_nan=False)))
    assert back == event


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 2}, "window"),
        ({"min_window": 60}, "min_window"),
        ({"confidence": 1.0}, "confidence"),
        ({"rel_improvement": -0.1}, "rel_improvement"),
        ({"explosion_factor": 0.0}, "explosion_factor"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(UsageError, match=match):
        StallDetector(**kwargs)


def test_update_validation():
    det = StallDetector()
    det.update(5, 1.0)
    with pytest.raises(UsageError, match="increase"):
        det.update(5, 1.0)
    with pytest.raises(UsageError, match="loss"):
        det.update(6, "high")
    with pytest.raises(UsageError, match="keys"):
        det.load_state_dict({"steps": []})


# --- the Theil-Sen fit: scipy's numbers, without scipy's per-call cost -------------------------------------------
def _scipy_theil_sen(x, y, confidence=0.95):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on an undefined interval; both then give nan
        res = stats.theilslopes(y, x, alpha=confidence)
    return res.slope, res.low_slope, res.high_slope


def test_theil_sen_equals_scipy_on_random_windows():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(2, 80))
        x = np.cumsum(rng.integers(1, 4, n)).astype(float)  # uneven step spacing
        y = rng.standard_normal(n) * 10 ** rng.uniform(-6, 3) + rng.uniform(-1, 1) * x
        if trial % 3 == 0:
            y = np.round(4 * y / np.abs(y).max())  # many ties: Sen's correction matters
        confidence = float(rng.choice([0.3, 0.5, 0.8, 0.95, 0.99]))
        np.testing.assert_allclose(theil_sen(x, y, confidence), _scipy_theil_sen(x, y, confidence),
                                   rtol=1e-12, atol=0, equal_nan=True)


def test_theil_sen_exact_line_and_outliers():
    x = np.arange(10.0)
    y = 3.0 - 0.5 * x
    y[[2, 7]] = [100.0, -100.0]  # two wild points out of ten do not move the median slope
    slope, lo, hi = theil_sen(x, y)
    assert slope == -0.5 and lo <= -0.5 <= hi
    assert theil_sen(x, 3.0 - 0.5 * x) == (-0.5, -0.5, -0.5)  # a noise-free line: a zero-width interval


@pytest.mark.parametrize("x, y, confidence, match", [
    ([0.0], [1.0], 0.95, ">= 2 points"),
    ([0.0, 0.0, 1.0], [1.0, 2.0, 3.0], 0.95, "strictly increasing"),
    ([0.0, 1.0], [1.0, 2.0, 3.0], 0.95, "strictly increasing"),
    ([0.0, 1.0], [1.0, 2.0], 1.0, "confidence"),
])
def test_theil_sen_rejects_bad_input(x, y, confidence, match):
    with pytest.raises(UsageError, match=match):
        theil_sen(np.array(x), np.array(y), confidence)


def test_detector_decisions_equal_those_with_scipy(monkeypatch):
    rng = np.random.default_rng(5)
    t = np.arange(600)
    curves = [np.exp(-t / 200) * _noise(len(t), 0.05, 1), _noise(len(t), 0.03, 2),
              np.concatenate([np.full(150, 1.0), np.exp(-np.arange(150) / 20), np.full(300, 0.05)])
              * _noise(len(t), 0.01, 3),
              np.concatenate([np.exp(-t[:300] / 60), 0.01 * 1.02 ** np.arange(300)]),
              np.round(_noise(len(t), 0.05, 4), 2), rng.uniform(0.5, 1.5, len(t))]
    ours = [[e.to_dict() for e in _events(c)] for c in curves]
    monkeypatch.setattr(stall_module, "theil_sen", _scipy_theil_sen)
    with_scipy = [[e.to_dict() for e in _events(c)] for c in curves]
    assert ours == with_scipy and sum(len(e) for e in ours) >= 4  # the same events, and there are some
