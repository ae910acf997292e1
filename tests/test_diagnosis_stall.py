"""StallDetector on synthetic noisy loss curves: healthy runs stay silent, each stall, spike or divergence speaks once.

The curves carry multiplicative noise of 5% to 25% of their level, as real minibatch losses do (17-30% on ordinary
runs): the detector must tell a noisy descent from a stall, and a spike that recovers from divergence.
"""

import json
import math

import warnings

import numpy as np
import pytest
from scipy import stats

from optdiag.diagnosis import stall as stall_module
from optdiag.diagnosis.stall import (StallDetector, StallEvent, difference_noise, robust_sd, theil_sen,
                                     trend_test)
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
    """Multiplicative log-normal noise with log-sd ``sigma``."""
    return np.exp(sigma * np.random.default_rng(seed).standard_normal(n))


def _per_window(fraction, n, window=50):
    """A loss falling by ``fraction`` per window of ``window`` steps, for ``n`` steps."""
    return (1.0 - fraction) ** (np.arange(n) / window)


# --- healthy runs stay silent ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_healthy_noisy_exponential_decay_gives_no_event(seed):
    t = np.arange(1200)
    assert _events(np.exp(-t / 200) * _noise(len(t), 0.05, seed)) == []


@pytest.mark.parametrize("seed", range(6))
def test_minibatch_noise_of_25_percent_hides_no_stall_in_a_healthy_descent(seed):
    # The reported false alarm: a full-data loss falling 13% per window under minibatch noise of 25% of its level.
    # A window of 50 such losses cannot tell that from flat; the detector must wait until it can (and then see the
    # descent), never call it a stall.
    assert _events(_per_window(0.13, 1500) * _noise(1500, 0.25, seed), StallDetector(check_every=5)) == []


@pytest.mark.parametrize("seed", range(3))
def test_slow_but_sure_descent_of_3_percent_per_window_is_not_a_stall(seed):
    assert _events(_per_window(0.03, 1500) * _noise(1500, 0.25, seed), StallDetector(check_every=5)) == []


def test_decay_towards_zero_is_not_a_stall_while_it_falls_relative_to_its_level():
    # Improvement is relative to the loss's own level: 2.3 -> 1e-7, falling 22% per window throughout, is no stall.
    t = np.arange(1700)
    assert _events(2.3 * np.exp(-t / 200) * _noise(len(t), 0.02, 4)) == []


# --- stalls ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_flat_loss_with_5_percent_noise_gives_exactly_one_stall(seed):
    events = _events(_noise(800, 0.05, seed))
    assert [e.reason for e in events] == ["stall"]
    e = events[0]
    assert e.trigger == "flat" and e.improvement_hi < 0.01 and e.slope_ci[0] <= e.slope <= e.slope_ci[1]
    # 5% noise cannot be resolved to 3% per window by one window: the first horizon that can is two windows
    assert e.horizon >= 100 and 99 <= e.step <= 400
    assert len(e.window) == len(e.window_steps) == 50 and e.window_steps[-1] == e.step


@pytest.mark.parametrize("seed", range(3))
def test_flat_loss_with_25_percent_noise_needs_a_long_horizon(seed):
    events = _events(_noise(1500, 0.25, seed), StallDetector(check_every=5))
    assert [e.reason for e in events] == ["stall"]
    # the 95% interval of the improvement per window over h losses with noise 0.25 is about
    # 1.96 * 0.25 * 49 * sqrt(12 / h^3) wide on each side: below 3% only from h ~ 200 on
    assert events[0].horizon >= 200 and events[0].improvement_hi < 0.01


def test_noise_free_flat_loss_fires_at_min_window():
    events = _events(np.full(100, 3.0), StallDetector(window=50, min_window=20))
    assert [(e.step, e.horizon) for e in events] == [(19, 20)]


@pytest.mark.parametrize("seed", range(3))
def test_check_every_fits_on_its_steps_only(seed):
    losses = _noise(800, 0.05, seed)
    every_step = _events(losses)
    sparse = _events(losses, StallDetector(check_every=5))
    assert [e.reason for e in sparse] == [e.reason for e in every_step] == ["stall"]
    assert sparse[0].step % 5 == 0 and sparse[0].step >= every_step[0].step


def test_check_every_still_catches_a_non_finite_loss_at_once():
    det = StallDetector(check_every=5)
    for step in range(1, 23):
        assert det.update(step, 1.0 - 0.01 * step) is None
    event = det.update(23, float("inf"))  # 23 is not a fitting step
    assert event is not None and event.reason == "divergence" and event.step == 23


def test_saddle_escape_then_new_plateau_gives_two_events():
    # flat at 1, escape (falls to 0.3), flat again: two situations, two verdicts.
    curve = np.concatenate([np.ones(300), 0.3 + 0.7 * np.exp(-np.arange(150) / 20), np.full(300, 0.3)])
    events = _events(curve * _noise(len(curve), 0.03, 1))
    assert [e.reason for e in events] == ["stall", "stall"]
    assert events[0].step < 300 and events[1].step > 400
    assert np.median(events[1].window) < 0.4 < np.median(events[0].window)


def test_scale_invariance():
    curve = np.concatenate([np.ones(300), 0.2 + 0.8 * np.exp(-np.arange(200) / 30), np.full(300, 0.2)])
    curve = curve * _noise(len(curve), 0.04, 3)
    base = _events(curve)
    scaled = _events(curve * 1000.0)
    assert [(e.step, e.reason) for e in base] == [(e.step, e.reason) for e in scaled] != []
    for a, b in zip(base, scaled):
        assert b.rel_slope == pytest.approx(a.rel_slope) and b.slope == pytest.approx(1000 * a.slope)


# --- spikes ---------------------------------------------------------------------------------------------------------
def test_a_recovering_spike_is_a_spike_not_divergence():
    curve = _per_window(0.2, 600) * _noise(600, 0.05, 2)
    curve[300:306] *= 10.0  # six steps at ten times the level, then back
    events = _events(curve)
    assert [e.reason for e in events] == ["spike"]
    spike = events[0].spike
    assert spike["start_step"] == 301 and spike["end_step"] == 307  # three-loss medians: 2 of 3 spiked
    reference = np.exp(np.median(np.log(curve[302 - 5 - 20:302 - 5])))  # of the 20 before the last five, in logs
    assert spike["reference"] == pytest.approx(reference)
    assert spike["ratio"] == pytest.approx(spike["peak"] / reference) and spike["ratio"] > 7  # x10 at 20%/window
    assert spike["sigmas"] > 6 and events[0].margin == pytest.approx(math.log(spike["sigmas"] / 6))


def test_a_single_outlier_batch_is_no_spike():
    curve = _per_window(0.2, 400) * _noise(400, 0.05, 3)
    curve[150] = 50.0
    assert _events(curve) == []


def test_blips_negligible_against_the_range_spanned_are_no_spike():
    # A classifier near zero loss: one wrong example multiplies the loss by 10, which is nothing against 2.3 -> 1e-4.
    curve = 2.3 * np.exp(-np.arange(900) / 60) + 1e-4
    curve[700:705] *= 10
    assert [e.reason for e in _events(curve) if e.reason == "spike"] == []


def test_catapult_loss_jumps_then_settles_below_its_start():
    # lr between 2 and 4 / lambda_0: the loss grows for a few steps, then falls below where it started.
    curve = np.concatenate([[1.0, 0.99, 0.98, 0.97, 0.96, 0.95], [2.0, 6.0, 20.0, 40.0, 15.0, 3.0],
                            0.9 * np.exp(-np.arange(300) / 80)])
    events = _events(curve)
    assert [e.reason for e in events] == ["spike"]
    assert events[0].spike["ratio"] > 10 and events[0].spike["start_step"] <= 8


def _brief_candidate(spike_factor, seed=0, n=200, sigma=0.2):
    """A detector fed ``n`` noisy flat losses, then asked whether one loss ``spike_factor`` times their level
    starts a brief spike."""
    det = StallDetector()
    _events(np.exp(sigma * np.random.default_rng(seed).standard_normal(n)), det)
    return det, det.brief_spike_start(n, spike_factor)


def test_a_brief_spike_is_a_spike_when_the_model_loss_rose_and_came_back():
    # One loss of 5x under 20% noise: too brief for any median of losses; the caller reads the model's loss on a
    # fixed batch at that point (2.0) and BRIEF_AFTER steps later (0.8): 2.5x, it rose and came back.
    det, started = _brief_candidate(5.0)
    assert started and det.brief_spike_due(200) and det.brief_spike_read(200, 2.0) is None
    assert not det.brief_spike_due(201) and det.brief_spike_due(200 + stall_module.BRIEF_AFTER)
    assert _events([1.0] * stall_module.BRIEF_AFTER, det, start=201) == []  # the losses alone never tell it
    event = det.brief_spike_read(203, 0.8)
    assert event.reason == "spike" and event.step == 203
    spike = event.spike
    assert spike["start_step"] == spike["peak_step"] == 200 and spike["end_step"] == 203 and spike["peak"] == 5.0
    assert spike["probe_loss_during"] == 2.0 and spike["probe_loss_after"] == 0.8 and spike["duration"] == 1.0
    assert spike["probe_peak_step"] == 200 and spike["probe_loss_first"] == 2.0
    assert spike["ratio"] == pytest.approx(5.0 / spike["reference"])
    # the sigmas are those of one loss's noise, from successive differences (0.2 on the log scale)
    assert spike["sigmas"] == pytest.approx(math.log(5.0 / spike["reference"]) / spike["reference_sd"])
    assert spike["reference_sd"] == pytest.approx(0.2, rel=0.35) and spike["sigmas"] >= stall_module.BRIEF_SPIKE_SIGMAS
    assert event.margin == pytest.approx(math.log(2.0 / (1.5 * 0.8)))  # the model's rise past the spike ratio
    assert det.brief_spike is None and not det.brief_spike_due(210)  # closed


def test_a_brief_spike_is_followed_while_the_model_loss_still_rises():
    # The nominating batch was hard, but the model's loss on the fixed batch rises after it (0.1 -> 0.25 -> 0.3):
    # followed to its top, then 0.3 -> 0.1 three steps later is a spike that peaked at step 206.
    det, started = _brief_candidate(5.0)
    assert det.brief_spike_read(200, 0.1) is None and det.brief_spike_read(203, 0.25) is None  # 2.5x: still rising
    assert det.brief_spike_read(206, 0.3) is None and det.brief_spike_due(209)
    event = det.brief_spike_read(209, 0.1)
    assert event.spike["probe_peak_step"] == 206 and event.spike["probe_loss_during"] == 0.3
    assert event.spike["probe_loss_first"] == 0.1 and event.spike["end_step"] == 209


def test_a_brief_spike_is_followed_when_one_batch_rose_by_the_ratio_and_the_fall_on_every_batch_decides():
    # A burst of several steps (Adam, lr x30 for five steps; the corpus's CNN run): one probe batch rose 2.1x, the
    # other 1.06x on the way up, a mean of 1.38x, below the spike ratio; followed all the same, and its fall from
    # that top on both batches makes it a spike
    det, _ = _brief_candidate(5.0)
    assert det.brief_spike_read(200, [0.077, 0.190]) is None and det.brief_spike_read(203, [0.165, 0.201]) is None
    assert det.brief_spike_due(206)  # still followed
    event = det.brief_spike_read(206, [0.05, 0.12])
    assert event.reason == "spike" and event.spike["probe_peak_step"] == 203
    assert event.spike["probe_fall_min"] == pytest.approx(0.201 / 0.12)
    # the same rise with one batch coming back and the other not is still no spike of the model
    det, _ = _brief_candidate(5.0)
    det.brief_spike_read(200, [0.077, 0.190])
    det.brief_spike_read(203, [0.165, 0.201])
    assert det.brief_spike_read(206, [0.05, 0.19]) is None and det.brief_spike is None
    # a model loss that only wobbles up (a hard nominating batch, the fixed ones 1.05x) is not followed
    det, _ = _brief_candidate(5.0)
    det.brief_spike_read(200, [0.2, 0.3])
    assert det.brief_spike_read(203, [0.21, 0.31]) is None and det.brief_spike is None


def test_a_brief_spike_that_keeps_rising_is_dropped_after_its_follows():
    det, _ = _brief_candidate(5.0)
    values = [0.1 * 2 ** i for i in range(stall_module.BRIEF_FOLLOWS + 1)]  # doubling at every read
    events = [det.brief_spike_read(200 + 3 * i, v) for i, v in enumerate(values)]
    assert events == [None] * len(values) and det.brief_spike is None  # a rise that lasts: the medians' to judge


def test_a_brief_spike_must_come_back_on_every_fixed_batch():
    # one batch's own swing (2x on the first, none on the second) is no spike of the model; both 2x is
    det, _ = _brief_candidate(5.0)
    assert det.brief_spike_read(200, [0.4, 0.3]) is None and det.brief_spike_read(203, [0.2, 0.3]) is None
    assert det.brief_spike is None
    det, _ = _brief_candidate(5.0)
    det.brief_spike_read(200, [0.4, 0.3])
    event = det.brief_spike_read(203, [0.2, 0.12])
    assert event.spike["probe_fall_min"] == pytest.approx(2.0) and event.spike["probe_loss_during"] == 0.35
    assert event.margin == pytest.approx(math.log(2.0 / 1.5))
    det, _ = _brief_candidate(5.0)
    det.brief_spike_read(200, [0.4, 0.3])
    assert det.brief_spike_read(203, [0.2]) is None and det.brief_spike is None  # a different set: not comparable


@pytest.mark.parametrize("reads", [(1.1, 1.0), (1.0, 1.0), (1.0, None), (1.0, math.nan), (1.0, 0.0), (1.0, -1.0),
                                   (None,), (math.inf,), ("x",)])
def test_a_brief_spike_the_model_loss_does_not_show_is_no_event(reads):
    det, started = _brief_candidate(5.0)
    assert started and [det.brief_spike_read(200 + 3 * i, v) for i, v in enumerate(reads)] == [None] * len(reads)
    assert det.brief_spike is None and not det.brief_spike_due(210)


@pytest.mark.parametrize("factor", [1.3, 1.45])
def test_a_loss_under_the_spike_ratio_is_no_brief_spike(factor):
    assert _brief_candidate(factor, sigma=0.01)[1] is False  # dozens of sigmas, but not 1.5x its level


def test_a_loss_within_three_sigmas_of_its_noise_is_no_brief_spike():
    # 1.8x is 2.9 sds of 20% noise on the log scale (log 1.8 = 0.59): a hard batch, not worth a read
    assert _brief_candidate(1.8, sigma=0.2, seed=1)[1] is False
    assert _brief_candidate(3.0, sigma=0.2, seed=1)[1] is True  # 5.5 sds


def test_no_brief_spike_too_early_during_a_spike_or_on_bad_input():
    det = StallDetector()
    _events([1.0] * (stall_module.BRIEF_MIN_LOSSES - 1), det)
    assert det.brief_spike_start(9, 100.0) is False  # too few losses for a noise estimate
    det, started = _brief_candidate(5.0)
    assert started and det.brief_spike_start(201, 50.0) is False  # one at a time
    for bad in (math.nan, math.inf, -1.0, 0.0, "x", None):
        assert _brief_candidate(bad)[1] is False


def test_a_brief_spike_absorbs_the_median_spike_of_the_same_excursion():
    # A three-step excursion: the three-loss median starts its own spike a step later; the brief spike confirmed on
    # the model is the one event, so the excursion is not reported twice.
    det, started = _brief_candidate(8.0, sigma=0.05)
    assert started and det.brief_spike_read(200, 8.0) is None
    _events([8.0, 8.0, 1.0], det, start=200)
    assert det.in_spike
    assert det.brief_spike_read(203, 1.0).reason == "spike" and not det.in_spike
    assert _events([1.0] * 20, det, start=203) == []


def test_the_tail_of_a_brief_spike_nominates_no_new_one():
    # The step a brief spike is read as come back (203), the minibatch loss may still stand high (the model's loss
    # comes down over a few steps): nominated there, its next read would see the rest of the same fall and report
    # the excursion twice (a digits MLP at batch 8 did, its full-data loss flat over the second). None starts for
    # 2 BRIEF_AFTER steps after it; then a new jump is nominated as before.
    det, started = _brief_candidate(5.0)
    assert started and det.brief_spike_read(200, 2.0) is None
    _events([1.0] * stall_module.BRIEF_AFTER, det, start=200)
    assert det.brief_spike_read(203, 0.8).reason == "spike"
    quiet = 203 + 2 * stall_module.BRIEF_AFTER
    assert not any(det.brief_spike_start(step, 5.0) for step in range(203, quiet + 1))
    _events([1.0] * (quiet - 203), det, start=203)
    assert det.brief_spike_start(quiet + 1, 5.0)



def test_the_brief_spike_gate_never_skips_a_nomination():
    """brief_spike_may_start lets the caller skip the brief-spike test on the usual step: it must be False only where
    brief_spike_start would refuse, on heavy-tailed losses with jumps, resets and a restored state, and it must
    skip most steps (else it saves nothing)."""
    rng = np.random.default_rng(3)
    det, skipped, nominated, fed = StallDetector(window=20, min_window=20, check_every=10), 0, 0, []
    for step in range(3000):
        loss = float(np.exp(0.4 * rng.standard_t(3)) * (5.0 if rng.random() < 0.02 else 1.0) / (1 + step / 500))
        if len(fed) >= 10 and det.brief_spike is None:  # the gate is the test's first bound, to the last bit
            bound = det.spike_ratio * float(np.median(fed[-5:]))
            assert not det.brief_spike_may_start(bound) and det.brief_spike_may_start(np.nextafter(bound, np.inf))
        may = det.brief_spike_may_start(loss)
        started = det.brief_spike_start(step, loss)
        assert may or not started, step
        skipped += not may
        nominated += started
        if started:
            det.brief_spike_read(step, [loss])
            det.brief_spike_read(step + 3, [loss / 4])  # decided: a fall on the probe batch, or dropped
        det.update(step, loss)
        fed.append(loss)
        if step == 1500:
            det.load_state_dict(json.loads(json.dumps(det.state_dict())))
            fed = fed[-len(det.state_dict()["losses"]):]  # the gate starts again from the restored losses
        if step == 2200:
            det.reset()
            fed = []
    assert skipped > 2000 and nominated >= 5  # about three steps in four skipped on these jumpy losses


def test_a_brief_spike_in_progress_survives_a_state_round_trip():
    det, started = _brief_candidate(5.0)
    det.brief_spike_read(200, 2.0)
    restored = StallDetector()
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert restored.brief_spike == det.brief_spike
    assert restored.brief_spike_due(203) and restored.brief_spike_read(203, 0.8).spike["start_step"] == 200


def test_a_spike_that_keeps_rising_is_divergence():
    curve = np.concatenate([_per_window(0.2, 200), 0.4 * 1.1 ** np.arange(100)])
    events = _events(curve)
    assert [e.reason for e in events] == ["divergence"] and events[0].trigger == "rising"


# --- divergence -----------------------------------------------------------------------------------------------------
def test_nan_is_divergence_immediately_and_only_once():
    det = StallDetector()
    assert det.update(0, 1.0) is None
    event = det.update(1, float("nan"))
    assert event.reason == "divergence" and event.trigger == "nonfinite" and event.margin == math.inf
    assert det.update(2, float("inf")) is None and det.diverged


def test_sustained_rise_above_the_start_is_divergence_after_a_quarter_window():
    t = np.arange(200)
    curve = np.concatenate([np.exp(-t / 40), np.exp(-199 / 40) * np.exp(np.arange(400) / 20)])
    events = _events(curve)
    assert [e.reason for e in events][-1:] == ["divergence"] and events[-1].trigger == "rising"
    above = int(np.argmax(curve[200:] > curve[0])) + 200  # the first step above the start
    assert events[-1].step >= above + 50 // 4 - 1


def test_a_rise_below_the_starting_level_is_no_divergence():
    # After converging to ~1e-9, the loss creeps up noise-free, doubling per window: large against its level, still
    # far below where it started: not divergence (a stall, at most).
    t = np.arange(600)
    curve = np.concatenate([np.exp(-t / 30), np.exp(-599 / 30) * 2.0 ** (np.arange(300) / 49)])
    assert [e.reason for e in _events(curve) if e.reason == "divergence"] == []


def _cross_entropy_to_zero(seed, n=1500):
    """A classifier's minibatch cross-entropy: 2.3 decaying to a 1e-4 floor, its relative noise growing to ~100%
    as it nears zero (log-sd 0.05 -> 0.8; the digits CNN shows ~1), and eight upticks of x10 for five steps.
    Returns the losses and the upticks' first steps."""
    rng = np.random.default_rng(seed)
    clean = 2.3 * np.exp(-np.arange(n) / 80) + 1e-4
    noisy = clean * np.exp((0.05 + 0.75 * (1 - clean / clean[0])) * rng.standard_normal(n))
    starts = rng.choice(np.arange(300, n - 20), 8, replace=False)
    for start in starts:
        noisy[start:start + 5] *= 10
    return noisy, sorted(int(s) for s in starts)


@pytest.mark.parametrize("seed", range(3))
def test_cross_entropy_reaching_zero_never_diverges_and_spikes_only_at_its_upticks(seed):
    # Ten times the loss for five steps is a spike by Megatron's 10x rule, however noisy; the rest of the noise,
    # as large as the level near zero, is none, and nothing is divergence.
    losses, upticks = _cross_entropy_to_zero(seed)
    events = _events(losses)
    assert [e.reason for e in events if e.reason not in ("stall", "spike")] == []
    for e in (e for e in events if e.reason == "spike"):
        assert any(start <= e.spike["start_step"] <= start + 5 for start in upticks), e.spike


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
    losses, full = [], []
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(batch_size):
            with torch.no_grad():  # the loss on a fixed third of the data at the same point (the truth, cheaply)
                full.append(nn.functional.cross_entropy(net(images[::3]), labels[::3]).item())
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return np.array(losses), np.array(full)


@pytest.mark.slow
def test_digits_cnn_trained_to_zero_gets_no_divergence_and_spikes_only_where_the_full_data_loss_spiked():
    # The reported false alarm: a healthy run whose cross-entropy falls from 2.3 to ~3e-4, fluctuating by about its
    # own level near zero. A spike it reports must be one of the model, not of the batches: the loss on a fixed third
    # of the data (every step, independently of optdiag) rose at least 1.5x above its value before the spike.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is several times faster on a shared 2-core machine
    try:
        losses, full = _digits_cnn_losses()
    finally:
        torch.set_num_threads(threads)
    assert losses[:3].min() > 2.0 and np.median(losses[-50:]) < 1e-2
    events = _events(losses)
    assert [e.reason for e in events if e.reason not in ("stall", "spike")] == []
    for e in (e for e in events if e.reason == "spike"):
        start, end = int(e.spike["start_step"]), int(e.spike["end_step"])
        assert full[start - 3:end + 1].max() >= 1.5 * full[start - 10:start - 3].min(), e.spike


# --- the statistics -------------------------------------------------------------------------------------------------
def test_trend_test_is_least_squares_on_block_means():
    rng = np.random.default_rng(1)
    x = np.arange(100.0)
    y = 2.0 - 0.01 * x + 0.1 * rng.standard_normal(100)
    slope, se, lo, hi = trend_test(x, y)
    xm, ym = x.reshape(10, 10).mean(axis=1), y.reshape(10, 10).mean(axis=1)
    reference = stats.linregress(xm, ym)
    assert slope == pytest.approx(reference.slope, rel=1e-12) and se == pytest.approx(reference.stderr, rel=1e-9)
    half = stats.t.ppf(0.975, 8) * reference.stderr
    assert (lo, hi) == (pytest.approx(slope - half, rel=1e-9), pytest.approx(slope + half, rel=1e-9))
    # a per-loss noise floor widens a lucky narrow interval to that of independent losses
    _, _, lo2, hi2 = trend_test(x, y, noise_sd=1.0)
    floor = stats.norm.ppf(0.975) * 1.0 / math.sqrt(((x - x.mean()) ** 2).sum())
    assert hi2 - slope == pytest.approx(floor, rel=1e-6) and slope - lo2 == pytest.approx(floor, rel=1e-6)


def test_trend_test_exact_line_and_too_few_points():
    slope, se, lo, hi = trend_test(np.arange(40.0), 3.0 - 0.5 * np.arange(40.0))
    assert slope == pytest.approx(-0.5, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(v) for v in trend_test(np.arange(2.0), np.ones(2)))


def test_robust_noise_estimates():
    assert robust_sd(np.array([1.0, 2.0, 3.0, 100.0])) == pytest.approx(stats.median_abs_deviation(
        [1.0, 2.0, 3.0, 100.0], scale="normal"), rel=1e-9)
    rng = np.random.default_rng(2)
    trend_plus_noise = 0.01 * np.arange(20000) + 0.3 * rng.standard_normal(20000)
    assert difference_noise(trend_plus_noise) == pytest.approx(0.3, rel=0.03)  # blind to the trend


def test_resumed_detector_continues_exactly():
    curve = np.concatenate([np.ones(150), 0.3 + 0.7 * np.exp(-np.arange(150) / 20), np.full(300, 0.3)])
    curve = curve * _noise(len(curve), 0.03, 5)
    curve[480:485] *= 8  # a spike in progress across the cut
    reference = [(e.step, e.reason) for e in _events(curve)]
    first = StallDetector()
    part1 = _events(curve[:482], first)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = StallDetector()
    resumed.load_state_dict(state)
    part2 = _events(curve[482:], resumed, start=482)
    assert [(e.step, e.reason) for e in part1 + part2] == reference
    assert [r for _, r in reference] == ["stall", "stall", "spike"]


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
        ({"spike_sigmas": -1.0}, "spike_sigmas"),
        ({"spike_ratio": 0.5}, "spike_ratio"),
        ({"rise_noise_factor": -1.0}, "rise_noise_factor"),
        ({"rise_span_fraction": math.nan}, "rise_span_fraction"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(UsageError, match=match):
        StallDetector(**kwargs)


def test_update_never_raises_on_what_training_feeds_it():
    det = StallDetector()
    assert det.update(5, 1.0) is None
    assert det.update(5, 1.0) is None and det.update(4, 1.0) is None  # a step that did not increase
    assert det.update(6, "high") is None and det.update(True, 1.0) is None  # not a loss, not a step
    assert det.n_ignored == 4
    with pytest.raises(UsageError, match="keys"):
        det.load_state_dict({"steps": []})  # restoring a checkpoint is configuration: it may refuse


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


def test_looks_flat_flags_a_flat_fit_the_noise_cannot_prove_and_mark_stalled_shares_a_stall():
    det = StallDetector(check_every=5)
    # creeping up 10% per window under 25% noise: not falling (fitted -10% +- 4% per window on 100 losses), yet the
    # interval is too wide (+-8%) to prove it
    not_falling = _per_window(-0.1, 120) * _noise(120, 0.25, 0)
    assert _events(not_falling, det) == [] and det.looks_flat
    falling = StallDetector(check_every=5)
    _events(_per_window(0.5, 120), falling)
    assert not falling.looks_flat
    det.mark_stalled()
    assert det.stalled and _events(_noise(200, 0.25, 1), det, start=120) == []  # one verdict per situation


def test_a_catapult_in_the_first_steps_after_a_swinging_start_is_a_spike():
    # A catapult run's first losses (wide 2-layer net, full batch, lr = 3 / lambda_0): they swing by half before the
    # jump, so their spread means nothing; the doubling decides.
    start = [0.972, 0.404, 0.801, 2.891, 10.477, 24.545, 15.276, 0.826, 0.511, 0.363, 0.27, 0.206]
    curve = np.concatenate([start, 0.2 * np.exp(-np.arange(200) / 60)])
    events = _events(curve)
    assert [e.reason for e in events] == ["spike"]
    assert events[0].spike["start_step"] == 5 and events[0].spike["sigmas"] == math.inf


def test_surely_improving_against_the_trend_interval_computed_by_hand():
    """``surely_improving``: the lower end of the improvement's interval (a straight line through the block means,
    each loss its own block below 2 n_blocks losses, at least the noise floor of the successive differences),
    per window of steps, against ``rel_improvement``. Exact lines: the interval is the line itself."""
    det = StallDetector(window=10, min_window=10, rel_improvement=0.01)
    for step in range(0, 25, 5):  # five losses five steps apart, falling 0.004 a step from 1.0
        det.update(step, 1.0 - 0.004 * step)
    # level: the median 0.96; a window of ten losses five steps apart spans 45 steps: 0.18 / 0.96 = 0.1875 > 0.01
    assert det.surely_improving(5) and not det.surely_improving(6)
    steady = StallDetector(window=10, min_window=10, rel_improvement=0.19)
    for step in range(0, 25, 5):
        steady.update(step, 1.0 - 0.004 * step)
    assert not steady.surely_improving(5)  # 0.1875 a window is below 19%
    rising = StallDetector(window=10, min_window=10)
    for step in range(5):
        rising.update(step, 1.0 + 0.01 * step)
    assert not rising.surely_improving(3)


def test_surely_improving_needs_the_noise_to_allow_it():
    """The same mean descent under noise that the interval cannot exclude from a stall is not sure: with losses
    alternating +-20% about a line falling 1% a window, the interval spans zero."""
    det = StallDetector(window=10, min_window=10, rel_improvement=0.001)
    for step in range(10):
        det.update(step, (1.0 - 0.001 * step) * (1.2 if step % 2 else 0.8))
    slope, _, low, high = trend_test(np.arange(10.0), np.array([(1.0 - 0.001 * s) * (1.2 if s % 2 else 0.8)
                                                                for s in range(10)]))
    assert low < 0 < high and not det.surely_improving(5)


def test_relative_noise_is_the_difference_noise_over_the_median():
    det = StallDetector(window=6, min_window=6)
    losses = [2.0, 2.5, 2.0, 2.5, 2.0, 2.5, 2.0, 3.0, 2.0, 3.0]
    for step, loss in enumerate(losses):
        det.update(step, loss)
    tail = np.array(losses[-6:])
    assert det.relative_noise() == pytest.approx(difference_noise(tail) / np.median(tail))
    assert det.relative_noise(4) == pytest.approx(difference_noise(np.array(losses[-4:])) / 2.5)
    assert math.isnan(StallDetector().relative_noise())


def test_could_prove_flat_takes_the_noise_of_the_losses_it_is_given():
    """``could_prove_flat(horizon, n)``: the narrowest half-width a fit over ``horizon`` losses could have, at the
    relative noise of the last ``n`` (default a window), against ``resolution * rel_improvement``. Ten losses that
    swing +-30% and then five nearly equal ones: the last window alone looks quiet enough, all fifteen do not."""
    det = StallDetector(window=5, min_window=5, rel_improvement=0.02)
    losses = [1.0 + (0.3 if i % 2 else -0.3) for i in range(10)] + [1.0, 1.001, 1.0, 1.001, 1.0]
    for step, loss in enumerate(losses):
        det.update(step, loss)

    def floor(values, horizon):  # the resolution floor by hand: z sd (window - 1) sqrt(12 / (h (h^2 - 1)))
        values = np.asarray(values)
        noise = difference_noise(values) / abs(np.median(values))
        return det._z * noise * (det.window - 1) * math.sqrt(12.0 / (horizon * (horizon**2 - 1)))

    limit = det.resolution * det.rel_improvement
    assert floor(losses[-5:], 25) <= limit < floor(losses, 25)
    assert det.could_prove_flat(25) and not det.could_prove_flat(25, len(losses))
    assert det.could_prove_flat(25, 5)  # n = a window: the default
