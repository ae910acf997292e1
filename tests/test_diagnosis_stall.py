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


@pytest.mark.parametrize("seed", range(3))
def test_check_every_fits_on_its_steps_only_and_decides_like_every_step(seed):
    losses = _noise(800, 0.05, seed)
    every_step = _events(losses)
    sparse = _events(losses, StallDetector(check_every=5))
    assert [e.reason for e in sparse] == [e.reason for e in every_step] == ["stall"]
    assert sparse[0].step % 5 == 0
    assert every_step[0].step <= sparse[0].step <= every_step[0].step + 4


def test_check_every_still_catches_a_non_finite_loss_at_once():
    det = StallDetector(check_every=5)
    for step in range(1, 23):
        assert det.update(step, 1.0 - 0.01 * step) is None
    event = det.update(23, float("inf"))  # 23 is not a fitting step
    assert event is not None and event.reason == "divergence" and event.step == 23


def test_check_every_must_be_a_positive_integer():
    with pytest.raises(UsageError, match="check_every"):
        StallDetector(check_every=0)


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


# --- near zero: a rise must be large against the noise and the range spanned, not only against the level ---------
def _cross_entropy_to_zero(seed, n=1500):
    """A classifier's minibatch cross-entropy: 2.3 decaying to a 1e-4 floor, its relative noise growing to ~100%
    as it nears zero (log-sd 0.05 -> 0.8; the digits CNN shows ~1), and eight brief upticks (hard batches, x10)."""
    rng = np.random.default_rng(seed)
    clean = 2.3 * np.exp(-np.arange(n) / 80) + 1e-4
    noisy = clean * np.exp((0.05 + 0.75 * (1 - clean / clean[0])) * rng.standard_normal(n))
    for start in rng.choice(np.arange(300, n - 20), 8, replace=False):
        noisy[start:start + 5] *= 10
    return noisy


@pytest.mark.parametrize("seed", range(3))
def test_cross_entropy_reaching_zero_stalls_at_its_floor_and_never_diverges(seed):
    curve = _cross_entropy_to_zero(seed)
    events = _events(curve)
    assert [e.reason for e in events if e.reason == "divergence"] == []
    # Converged (1e-4 of a 2.3 start): the last verdict is a stall at the floor, a minimum for the classifier.
    assert events and events[-1].reason == "stall" and np.median(events[-1].window) < 1e-3
    # The level as the only yardstick (the former rule) calls the same noise a divergence.
    level_only = _events(curve, StallDetector(rise_noise_factor=0.0, rise_span_fraction=0.0))
    assert any(e.trigger == "rising" for e in level_only)


def _rise_rule(window, first, running_min, tolerance=0.5, noise_factor=3.0, span_fraction=0.01):
    """The rising rule computed independently with scipy: (fires, margin)."""
    x = np.arange(len(window), dtype=float)
    slope, _, low, _ = stats.theilslopes(window, x, alpha=0.95)
    level, rise = abs(np.median(window)), slope * (len(window) - 1)
    noise = stats.median_abs_deviation(window - slope * x, scale="normal")
    scale = abs(first - running_min) + abs(running_min)
    ratios = [rise / b if b > 0 else math.inf for b in (tolerance * level, noise_factor * noise, span_fraction * scale)]
    return low > 0 and min(ratios) > 1, math.log(min(ratios))


@pytest.mark.parametrize("factor", [1.0, 1000.0])
def test_rise_against_noise_boundary(factor):
    # One window of 50 losses rising by 1 over it from a level of ~1.5, with fixed noise of growing size: the rise
    # is significant and large against the level and the range spanned; the noise decides, at 3 robust sd.
    t = np.arange(50)
    z = np.random.default_rng(11).standard_normal(50)
    decisions = []
    for amplitude in np.linspace(0.2, 0.45, 26):
        curve = factor * (1.0 + t / 49 + amplitude * z)
        det = StallDetector(window=50, min_window=50)
        events = [det.update(int(i), float(v)) for i, v in enumerate(curve)]
        assert events[:-1] == [None] * 49  # one decision, on the full window
        fired = events[-1].trigger == "rising"
        assert fired or events[-1].reason == "stall"  # a rise within the noise: the loss does not go down
        first, running_min = np.median(curve[:3]), min(np.median(curve[max(0, k - 2):k + 1]) for k in range(50))
        expected, margin = _rise_rule(curve, first, running_min)
        assert fired == expected, amplitude
        if fired:
            assert events[-1].margin == pytest.approx(margin, rel=1e-9, abs=1e-12)
        decisions.append(fired)
    assert decisions[0] and not decisions[-1]  # both sides of the boundary are in the sweep


@pytest.mark.parametrize("factor", [1.0, 1000.0])
@pytest.mark.parametrize("rise, fires", [(0.0095, False), (0.0105, True)])
def test_rise_against_range_spanned_boundary(rise, fires, factor):
    # From 1 down to 1e-3, then a noise-free linear climb of `rise` per window: far above the level (5x) and any
    # noise (none), so only the range spanned (|1 - 1e-3| + 1e-3 = 1) decides, at 1% per window.
    curve = np.concatenate([np.full(60, 1.0), np.full(60, 1e-3), 1e-3 + rise * np.arange(1, 41) / 49]) * factor
    events = _events(curve)
    rising = [e for e in events if e.reason == "divergence"]
    assert [e.trigger for e in rising] == (["rising"] if fires else [])
    if fires:
        assert rising[0].margin == pytest.approx(math.log(rise / 0.01), abs=0.02)


def test_smooth_rise_near_zero_after_convergence_is_not_divergence():
    # A regulariser's equilibrium: the data loss, converged to ~1e-9 of a 1.0 start, creeps up noise-free, doubling
    # per window. Against its level that is large and certain; against the range spanned it is nothing.
    t = np.arange(600)
    curve = np.concatenate([np.exp(-t / 30), np.exp(-599 / 30) * 2.0 ** (np.arange(300) / 49)])
    assert [e.reason for e in _events(curve)] == ["stall"]
    assert [e.trigger for e in _events(curve, StallDetector(rise_span_fraction=0.0))] == ["flat", "rising"]


def test_decay_towards_zero_is_not_a_stall_while_it_falls_relative_to_its_level():
    # Improvement is relative to the loss's own level: 2.3 -> 1e-7, falling 22% per window throughout, is no stall.
    t = np.arange(1700)
    assert _events(2.3 * np.exp(-t / 200) * _noise(len(t), 0.02, 4)) == []


def _digits_cnn_losses(epochs=20, batch_size=32):
    """Minibatch losses of benchmarks/bench_overhead.py's digits CNN (SGD lr 0.05, momentum 0.9), plain torch."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: nothing is downloaded
    images, labels = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(batch_size):
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return np.array(losses)


@pytest.mark.slow
def test_digits_cnn_trained_to_zero_loss_gets_no_divergence():
    # The reported false alarm: a healthy run whose cross-entropy falls from 2.3 to ~3e-4, fluctuating by about its
    # own level near zero, where the level-only rule took a noise tilt for "divergence" (how often depends on the
    # batch order: the synthetic test above pins that down; this one checks the real curve stays clean).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is several times faster on a shared 2-core machine
    try:
        losses = _digits_cnn_losses()
    finally:
        torch.set_num_threads(threads)
    assert losses[:3].min() > 2.0 and np.median(losses[-50:]) < 1e-2
    events = _events(losses)
    assert [e.reason for e in events if e.reason == "divergence"] == []
    assert events[-1].reason == "stall" and np.median(events[-1].window) < 1e-2


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
        ({"rise_noise_factor": -1.0}, "rise_noise_factor"),
        ({"rise_span_fraction": math.nan}, "rise_span_fraction"),
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
