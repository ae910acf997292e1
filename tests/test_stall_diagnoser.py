"""StallDiagnoser on real Lightning Trainers: each demo scenario's verdict and key evidence, a healthy run without a
verdict, events.jsonl, the TensorBoard text panel, the end-of-fit summary, private monitors, resumable state and
"degrade, don't crash"."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import optdiag
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor, lightning_loss
from optdiag.callbacks.stall import PROBE_FUTILE_MARGIN, PROBE_NOISE_MARGIN, TEXT_TAG, StallDiagnoser, _PendingStall, _WaitingSpike
from optdiag.demo.runner import quiet_lightning, run_scenario
from optdiag.demo.scenarios import EOS_LR, SADDLE_OFFSET_SCALE, SADDLE_SIGMAS, ScenarioModule, StepBatches, scenario
from optdiag.diagnosis import Diagnosis, StallDetector, StallEvent
from optdiag.errors import UsageError
from optdiag.sinks.events import events_path, read_events

from lightning_models import stop_after
from test_budget import ClockSteps, FakeClock, charge_windows, price_hessian_work


@pytest.fixture(autouse=True)
def quiet():
    with quiet_lightning():
        yield


def trainer_for(tmp_path, callbacks, max_steps, logger=None, **kwargs):
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=logger if logger is not None
        else False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, default_root_dir=str(tmp_path), **{"deterministic": True, **kwargs})


def fit_scenario(tmp_path, name, callbacks, max_steps=None, logger=None, planned=None, **kwargs):
    """Fit scenario ``name``; with ``planned``, a fit planned for that many steps and ended after the scenario's
    (HessianMonitor lends a first estimate only to a fit whose planned length pays for it)."""
    (run,) = scenario(name).build()
    steps = max_steps or run.max_steps
    if planned is not None:
        callbacks, steps = callbacks + [stop_after(steps)], planned
    trainer = trainer_for(tmp_path, callbacks, steps, logger, **kwargs)
    trainer.fit(run.module, run.loader)
    return trainer, run


# --- each scenario: verdict and key evidence ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo"))


def _as_written(diagnosis):
    """The diagnosis as events.jsonl got it: before its prediction's outcome was added to its evidence."""
    evidence = {k: v for k, v in diagnosis.evidence.items() if k != "outcome"}
    return Diagnosis(diagnosis.step, diagnosis.kind, diagnosis.confidence, evidence, diagnosis.suggestions,
                     diagnosis.summary)


def _run(name, demo_dir):
    with quiet_lightning():
        return run_scenario(name, demo_dir)


@pytest.mark.slow
def test_saddle_saddle_then_minimum_with_escape_drops(demo_dir):
    result = _run("saddle", demo_dir)
    (run,) = result.runs
    assert [d.kind for d in run.diagnoses] == ["saddle_point", "saddle_point", "local_minimum"]
    first, second, minimum = run.diagnoses
    for d, sigma in ((first, SADDLE_SIGMAS[0]), (second, SADDLE_SIGMAS[1])):
        ev = d.evidence
        assert ev["lambda_min"] == pytest.approx(-sigma, rel=0.05)  # the saddle's Hessian: -sigma_i
        assert ev["escape_expected_drop"] == pytest.approx(0.5 * ev["lambda_min"] * ev["escape_t"] ** 2)
        assert ev["escape_measured_drop"] < 0
        assert ev["escape_t"] == ev["escape_distance"]  # measured where the diagnosis quotes the drop
        assert ev["escape_measured_drop"] == pytest.approx(ev["escape_expected_drop"], rel=0.1)
        assert ev["lr"] == 0.02 and ev["stability_threshold"] == pytest.approx(2 / 0.02)
        assert ev["lambda_min_residual"] < 0.05 * sigma
    # at the first saddle W ~ 0 (offset learnt): L(t u) - L(0) = -sigma t^2 / 2 + t^4 / 8 along the unit escape u
    t = first.evidence["escape_t"]
    assert first.evidence["escape_measured_drop"] == pytest.approx(-SADDLE_SIGMAS[0] * t**2 / 2 + t**4 / 8, rel=0.05)
    assert minimum.evidence["lambda_min"] > -0.01 * minimum.evidence["lambda_max"]
    assert minimum.evidence["lambda_max"] == pytest.approx(SADDLE_OFFSET_SCALE**2, rel=0.02)  # the offset's k^2
    # events.jsonl holds the same verdicts (round-tripping into Diagnosis) and, later, each one's checked outcome
    records = [json.loads(line) for line in open(run.events_file, encoding="utf-8").read().splitlines()]
    verdicts = [Diagnosis.from_dict(r) for r in records if r.get("record") != "outcome"]
    assert verdicts == [_as_written(d) for d in run.diagnoses]
    outcomes = [r for r in records if r.get("record") == "outcome"]
    assert [(r["verdict_step"], r["outcome"]) for r in outcomes] == [
        (d.step, d.evidence["outcome"]["outcome"]) for d in run.diagnoses if "outcome" in d.evidence]
    # the saddles predicted a drop once the escape direction grows, and the loss did drop
    assert [r["outcome"] for r in outcomes if r["kind"] == "saddle_point"] == ["confirmed", "confirmed"]


@pytest.mark.slow
def test_oscillation_verdict_evidence_and_advice(demo_dir):
    (run,) = _run("oscillation", demo_dir).runs
    # the bounce may throw the model's loss up and back once or twice (read on the probe batches): a fact, not a stall
    assert [d.kind for d in run.diagnoses if d.kind != "loss_spike"] == ["oscillation"]
    for spike in (d for d in run.diagnoses if d.kind == "loss_spike"):
        assert spike.evidence["spike_probe_ratio"] >= 1.5 and not spike.suggestions
    (oscillation,) = [d for d in run.diagnoses if d.kind == "oscillation"]
    ev = oscillation.evidence
    assert ev["lr_lambda_max"] > 1.4 or ev["grad_cosine"] < -0.3
    # the critical sharpness along a scheduled snapshot's step, SGD's g^T H g / |g|^2: at most lambda_max
    assert 0 < ev["directional_sharpness"] <= 1.01 * ev["lambda_max"]
    assert ev["grad_cosine"] < -0.3  # consecutive gradients point against each other
    lr_advice = [s for s in oscillation.suggestions if s.target == "lr"]
    assert lr_advice and lr_advice[0].proposed < lr_advice[0].current


@pytest.mark.slow
def test_minimum_verdict_with_positive_curvature_and_noise_gradient(demo_dir):
    (run,) = _run("minimum", demo_dir).runs
    assert [d.kind for d in run.diagnoses] == ["local_minimum"]
    ev = run.diagnoses[0].evidence
    assert ev["lambda_min"] > 0 and ev["lambda_max"] > ev["lambda_min"]
    assert ev["grad_snr"] < 1  # the true gradient is statistically zero (norm test)


@pytest.mark.slow
def test_plateau_verdict_says_raise_the_learning_rate(demo_dir):
    (run,) = _run("plateau", demo_dir).runs
    assert [d.kind for d in run.diagnoses] == ["plateau"]
    ev = run.diagnoses[0].evidence
    assert ev["lr_lambda_max"] < 1e-3 and ev["grad_norm"] > 0.5 * ev["grad_norm_initial"]
    lr_advice = [s for s in run.diagnoses[0].suggestions if s.target == "lr"]
    assert lr_advice and lr_advice[0].proposed >= 5 * lr_advice[0].current


def test_divergence_verdict_once(demo_dir):
    (run,) = _run("divergence", demo_dir).runs
    assert not math.isfinite(run.losses[-1])  # the loss overflowed and stayed non-finite ...
    assert [d.kind for d in run.diagnoses] == ["divergence"]  # ... yet there is exactly one verdict
    assert run.diagnoses[0].evidence["lr_lambda_max"] > 2


@pytest.mark.slow
def test_edge_of_stability_gives_no_verdict(demo_dir):
    (run,) = _run("edge_of_stability", demo_dir).runs
    assert run.diagnoses == []
    late = [s["lambda_max"] for s in run.curvature if s["step"] >= 300]
    assert len(late) >= 10
    assert sum(late) / len(late) == pytest.approx(2 / EOS_LR, rel=0.15)
    assert not os.path.exists(run.events_file)  # no verdict, no events


@pytest.mark.slow
def test_large_batch_ends_sharper_than_small_batch(demo_dir):
    small, large = _run("batch_size", demo_dir).runs
    assert small.truth["batch_size"] < large.truth["batch_size"]
    assert large.final["lambda_max"] > 1.2 * small.final["lambda_max"]
    assert large.final["hessian_trace"] > small.final["hessian_trace"]
    assert large.final["lambda_max"] == pytest.approx(2 / EOS_LR, rel=0.15)  # full batch: on the edge


# --- a healthy run ----------------------------------------------------------------------------------------------
def test_healthy_run_gives_no_verdict_and_says_so(tmp_path, capsys):
    diagnoser = StallDiagnoser()
    fit_scenario(tmp_path, "minimum", [diagnoser], max_steps=40)  # still converging fast at step 40
    assert diagnoser.diagnoses == []
    out = capsys.readouterr().out
    assert "optdiag: no stall in 40 steps" in out
    assert not os.path.exists(events_path(tmp_path))


# --- outputs ----------------------------------------------------------------------------------------------------
def test_events_file_without_logger_is_under_default_root_dir_and_appended(tmp_path):
    path = events_path(tmp_path)
    os.makedirs(os.path.dirname(path))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"note": "a line the user wrote"}\n')
    diagnoser = StallDiagnoser()
    fit_scenario(tmp_path, "divergence", [diagnoser])
    records = read_events(path)
    assert records[0] == {"note": "a line the user wrote"}  # never overwritten
    verdicts = [Diagnosis.from_dict(r) for r in records[1:] if r.get("record") != "outcome"]
    assert verdicts == [_as_written(d) for d in diagnoser.diagnoses]


def test_text_panel_and_summary(tmp_path, capsys):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    diagnoser = StallDiagnoser()
    fit_scenario(tmp_path, "divergence", [diagnoser], logger=logger)
    (diagnosis,) = diagnoser.diagnoses
    out = capsys.readouterr().out
    assert "optdiag: 1 verdict in 150 steps" in out and "divergence" in out
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    tag = f"{TEXT_TAG}/text_summary"
    assert tag in accumulator.Tags()["tensors"]
    (event,) = accumulator.Tensors(tag)
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == diagnosis.step and text == diagnosis.to_markdown()
    assert "| evidence | value |" in text
    assert read_events(events_path(logger.log_dir))[0]["kind"] == "divergence"


def test_quiet_when_not_verbose(tmp_path, capsys):
    fit_scenario(tmp_path, "divergence", [StallDiagnoser(verbose=False)])
    assert "optdiag:" not in capsys.readouterr().out


# --- monitors ---------------------------------------------------------------------------------------------------
def test_alone_it_drives_private_monitors_and_logs_gradients_once(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    diagnoser = StallDiagnoser()
    # long enough for the sustained rise that makes divergence (about 35 steps on this run)
    fit_scenario(tmp_path, "divergence", [diagnoser], max_steps=45, logger=logger)
    assert isinstance(diagnoser.gradient_monitor, GradientNormMonitor)
    assert isinstance(diagnoser.hessian_monitor, HessianMonitor)
    measured = [r["step"] for r in diagnoser.gradient_monitor.history]
    assert measured[:10] == list(range(10)) and measured == sorted(set(measured))
    # the private Hessian monitor measures only at stalls: one snapshot, for the divergence verdict
    assert [s["reason"] for s in diagnoser.hessian_monitor.history] == ["divergence"]
    with open(os.path.join(logger.log_dir, "metrics.csv"), encoding="utf-8") as handle:
        rows = [line.split(",") for line in handle.read().splitlines()]
    column = rows[0].index("optdiag/grad_norm")
    assert sum(1 for row in rows[1:] if row[column]) == len(measured)  # one value per measured step, not two


def test_uses_monitors_found_in_trainer_callbacks(tmp_path):
    gradient, hessian = GradientNormMonitor(), HessianMonitor(every_n_steps=1000)
    diagnoser = StallDiagnoser()
    fit_scenario(tmp_path, "divergence", [gradient, hessian, diagnoser], max_steps=45)
    assert diagnoser.gradient_monitor is gradient and diagnoser.hessian_monitor is hessian
    assert diagnoser.state_dict().keys().isdisjoint({"gradient_monitor", "hessian_monitor"})
    assert [s["reason"] for s in hessian.history] == ["divergence"]


def test_snapshots_are_bounded(tmp_path):
    diagnoser = StallDiagnoser(max_snapshots=0)
    with pytest.warns(UserWarning, match="stall snapshots of this run are used up"):
        fit_scenario(tmp_path, "divergence", [diagnoser])
    (diagnosis,) = diagnoser.diagnoses
    assert "lambda_max" not in diagnosis.evidence and diagnoser.hessian_monitor.history == []


def test_stall_snapshot_over_the_time_budget_is_skipped_with_one_warning(tmp_path, monkeypatch):
    asked = []

    def broke(self, trainer):
        asked.append(trainer)
        return False

    monkeypatch.setattr(HessianMonitor, "can_afford_snapshot", broke)
    diagnoser = StallDiagnoser()
    with pytest.warns(UserWarning, match="a stall snapshot was skipped: the Hessian monitor's budget holds"):
        trainer, _ = fit_scenario(tmp_path, "divergence", [diagnoser])
    (diagnosis,) = diagnoser.diagnoses
    assert asked == [trainer]  # asked once, for the one verdict, with the trainer (for rank 0's broadcast)
    assert "lambda_max" not in diagnosis.evidence and diagnoser.hessian_monitor.history == []
    assert diagnoser.warning_counts["over-budget"] == 1 and diagnoser.n_snapshots == 0  # not counted: not taken


# --- do no harm, degrade, resume --------------------------------------------------------------------------------
def _final_weights(tmp_path, callbacks, steps):
    (run,) = scenario("saddle").build()
    trainer_for(tmp_path, callbacks, steps).fit(run.module, run.loader)
    return [p.detach().clone() for p in run.module.parameters()]


def test_training_is_bitwise_identical_with_the_diagnoser(tmp_path):
    # the saddle verdict at step ~65 runs a stall snapshot and the escape check along the eigenvector (a fixed
    # cadence, so that the adaptive budget of this sub-second run does not hold the snapshot back)
    diagnoser = StallDiagnoser()
    with_diagnoser = _final_weights(tmp_path / "a", [HessianMonitor(every_n_steps=10_000), diagnoser], 70)
    assert [d.kind for d in diagnoser.diagnoses] == ["saddle_point"]
    assert "escape_measured_drop" in diagnoser.diagnoses[0].evidence
    without = _final_weights(tmp_path / "b", [], 70)
    assert all(torch.equal(a, b) for a, b in zip(with_diagnoser, without))


def test_a_failing_diagnosis_never_stops_training(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("classifier exploded")

    monkeypatch.setattr("optdiag.callbacks.stall.diagnose_stall", broken)
    diagnoser = StallDiagnoser()
    with pytest.warns(UserWarning, match="classifier exploded"):
        trainer, run = fit_scenario(tmp_path, "divergence", [diagnoser])
    assert trainer.global_step == run.max_steps and diagnoser.diagnoses == []


def test_no_loss_in_outputs_switches_detection_off_with_one_warning(tmp_path):
    class NoLossOutput(ScenarioModule):
        def __init__(self):
            super().__init__(nn.Linear(2, 1), nn.functional.mse_loss, lr=0.1)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = self.loss_fn(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None

        def on_train_batch_end(self, outputs, batch, batch_idx):
            pass

    diagnoser = StallDiagnoser()
    loader = torch.utils.data.DataLoader(StepBatches(torch.randn(8, 2), torch.randn(8, 1), 30), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [diagnoser], 30).fit(NoLossOutput(), loader)
    assert sum("found no loss" in str(w.message) for w in caught) == 1 and diagnoser.diagnoses == []


def test_state_dict_round_trip_keeps_diagnoses_and_detector(tmp_path):
    diagnoser = StallDiagnoser()
    fit_scenario(tmp_path, "divergence", [diagnoser])
    state = json.loads(json.dumps(diagnoser.state_dict()))  # checkpoint-safe plain data
    restored = StallDiagnoser()
    restored.load_state_dict(state)
    assert restored.diagnoses == diagnoser.diagnoses
    assert restored.detector.state_dict() == diagnoser.detector.state_dict()
    # the private monitors' state travels with the diagnoser (no one else checkpoints them)
    saved = state["gradient_monitor"]["history"]
    assert json.dumps(saved) == json.dumps(diagnoser.gradient_monitor.history)  # NaN-safe equality


def test_a_second_fit_starts_a_new_loss_history(tmp_path):
    # a fixed cadence, so no clock decides: a stall snapshot skipped for want of budget on a loaded machine warns
    hessian = HessianMonitor(every_n_steps=10_000)
    diagnoser = StallDiagnoser(hessian_monitor=hessian)
    fit_scenario(tmp_path, "divergence", [hessian, diagnoser])
    fit_scenario(tmp_path, "divergence", [hessian, diagnoser])  # global_step starts at 0 again
    assert [d.kind for d in diagnoser.diagnoses] == ["divergence", "divergence"]
    assert diagnoser.warning_counts == {}


# --- arguments and helpers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"window": 2}, "window must be"),
    ({"max_snapshots": -1}, "max_snapshots must be an int >= 0"),
    ({"loss_floor": float("nan")}, "loss_floor must be a finite number"),
    ({"gradient_monitor": HessianMonitor()}, "gradient_monitor must be a GradientNormMonitor"),
    ({"hessian_monitor": GradientNormMonitor()}, "hessian_monitor must be a HessianMonitor"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(UsageError, match=message):
        StallDiagnoser(**kwargs)


def test_public_name():
    assert optdiag.StallDiagnoser is StallDiagnoser


# --- a sampled gradient monitor ---------------------------------------------------------------------------------
def test_window_gradients_are_means_over_the_sampled_steps_of_the_window(tmp_path):
    gradient = GradientNormMonitor(every_n_steps=5)
    diagnoser = StallDiagnoser(verbose=False, gradient_monitor=gradient)
    fit_scenario(tmp_path, "oscillation", [gradient, diagnoser])
    (diagnosis,) = [d for d in diagnoser.diagnoses if d.kind == "oscillation"]  # a stall's window
    first, last = diagnosis.step - len(diagnosis.evidence["loss_window"]), diagnosis.step - 1  # gradient steps
    records = [r for r in gradient.history if first <= r["step"] <= last]
    assert {r["step"] % 5 for r in records if r["step"] >= 5} == {0, 4}  # pairs only
    cosines = [r["grad_cosine"] for r in records if not math.isnan(r["grad_cosine"])]
    assert len(cosines) >= 4 and diagnosis.evidence["grad_cosine"] == pytest.approx(sum(cosines) / len(cosines))
    recent = [r["grad_norm"] for r in records if r["step"] > last - (last - first + 1) // 5]
    assert diagnosis.evidence["grad_norm"] == pytest.approx(sum(recent) / len(recent))
    # the early-training scale: every measured step among the first ten
    initial = [r["grad_norm"] for r in gradient.history if r["step"] < 10]
    assert [r["step"] for r in gradient.history if r["step"] < 10] == [0, 1, 2, 3, 4, 5, 9]
    assert diagnosis.evidence["grad_norm_initial"] == pytest.approx(sum(initial) / len(initial))


def test_the_probe_loss_proves_a_noisy_minimum_sooner_and_changes_nothing(tmp_path):
    """Minibatch losses with ~27% noise need a 400-step horizon to prove the minimum flat; the fixed probe batches'
    loss, read only while the minibatch losses look flat, proves it on a 200-step one. Same verdict, training
    untouched, the probe forwards counted with their time and charged to the monitor. (The budget is lifted here:
    what the probe loss proves must not depend on how loaded the machine is; the budget has its own test below.)"""
    found = {}
    for probe_every in (5, 0):
        hessian = HessianMonitor(every_n_steps=10_000, budget=1.0)
        diagnoser = StallDiagnoser(verbose=False, probe_every=probe_every)
        _, run = fit_scenario(tmp_path / str(probe_every), "minimum", [hessian, diagnoser])
        (verdict,) = diagnoser.diagnoses
        charged = sum(c["seconds"] for c in hessian.charges if c["what"] in ("probe_loss", "brief_spike_read"))
        found[probe_every] = (verdict, (diagnoser.n_probe_losses, diagnoser.probe_seconds), charged,
                              [p.detach().clone() for p in run.module.parameters()])
    probed, probes, charged, weights = found[5]
    plain, no_probes, _, plain_weights = found[0]
    assert probed.kind == plain.kind == "local_minimum"
    assert probed.evidence["stall_trigger"] == "flat_probe" and plain.evidence["stall_trigger"] == "flat"
    assert probed.step < plain.step and probed.evidence["stall_horizon"] < plain.evidence["stall_horizon"]
    assert probes[0] > 0 and probes[1] > 0 and no_probes == (0, 0.0)
    assert charged == pytest.approx(probes[1], rel=1e-9)  # every read charged to the one budget, as timed
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))


def _count_trend_reads(diagnoser):
    """The steps of the probe detector's updates (brief-spike reads have their own allowance, in steps)."""
    steps, update = [], diagnoser.probe_detector.update
    diagnoser.probe_detector.update = lambda step, value: (steps.append(step), update(step, value))[1]
    return steps


class _PayingMonitor:
    """The Hessian monitor as ``StallDiagnoser._probe`` sees it: enabled, and every read affordable."""
    enabled = True

    def can_afford_extra(self, trainer, seconds):
        return True


def _noise(sd, seed):
    """``step -> 1 + sd * z`` with a fixed standard normal ``z`` per step (the same every call)."""
    z = np.random.default_rng(seed).standard_normal(1000)
    return lambda step: 1.0 + sd * z[step]


def _drive_probe_episodes(monkeypatch, probe_loss, flat_at, steps=800, minibatch_noise=0.25):
    """Drive ``StallDiagnoser._probe`` over ``steps`` steps with the minibatch detector looking flat where
    ``flat_at(step)`` (its losses: ``minibatch_noise`` relative normal noise), the probe loss ``probe_loss(step)``
    read at no cost and at stride 1 (a read every 5 steps). Returns the steps read, the stall events and the
    minibatch losses' relative noise the reads are weighed against."""
    diagnoser = StallDiagnoser(verbose=False, probe_every=5)
    diagnoser.hessian_monitor = _PayingMonitor()
    minibatch = _noise(minibatch_noise, 0)
    for step in range(100):  # the two windows "looks flat" judges
        diagnoser.detector.update(step - 100, minibatch(step))
    reads = []
    monkeypatch.setattr(diagnoser, "_plan_probe_stride", lambda trainer, step: 1)
    monkeypatch.setattr(diagnoser, "_probe_loss", lambda trainer, module, step, what: reads.append(step) or
                        probe_loss(step))
    events = []
    for step in range(steps):
        diagnoser.detector.looks_flat = flat_at(step)
        event = diagnoser._probe(None, None, step)
        if event is not None:
            events.append(event)
    return reads, events, diagnoser.detector.relative_noise(100)


def _episodes(reads, gap=5):
    """The read steps cut into runs of consecutive reads ``gap`` apart: (first, last, count) each."""
    runs = [[reads[0]]]
    for step in reads[1:]:
        if step - runs[-1][-1] == gap:
            runs[-1].append(step)
        else:
            runs.append([step])
    return [(r[0], r[-1], len(r)) for r in runs]


def test_probe_reads_that_refute_a_flat_look_stop_and_back_off(monkeypatch):
    """A healthy run's noisy minibatch losses look flat at every check; the probe loss falls 0.1% a step, surely
    faster than the stall limit, so each episode ends at its fifth read (MIN_PROBE_READS) and the next may start
    only 2, 4, then 8 windows (of 50 steps) later: 20 reads in 800 steps instead of 160."""
    reads, events, _ = _drive_probe_episodes(monkeypatch, lambda step: 2.0 - 0.001 * step, lambda step: True)
    assert not events
    assert _episodes(reads) == [(0, 20, 5), (120, 140, 5), (340, 360, 5), (760, 780, 5)]


def test_probe_reads_as_noisy_as_the_minibatch_losses_stop_and_back_off(monkeypatch):
    """Probe losses with 30% noise five steps apart settle a trend no sooner than minibatch losses with 25% noise
    (the interval narrows as noise x sqrt(spacing)): the episode ends by the time the probe detector holds a window
    of reads (ten), whether or not the loss still looks flat, and backs off as a refuted one does; reads far
    noisier (80%: about six times the minibatch losses' noise, past PROBE_FUTILE_MARGIN) end it at the sixth. Either
    way the next episode starts where it would after ten reads. Probe losses with 5% noise are worth reading; with
    20% noise they beat minibatch losses with 100% noise, but cannot tell a stall within the episode."""
    swinging = _noise(0.3, 1)
    reads, events, minibatch = _drive_probe_episodes(monkeypatch, swinging, lambda step: step < 30)
    probe = StallDetector(window=10, min_window=10)
    for step in reads:
        probe.update(step, swinging(step))
    assert probe.relative_noise() * math.sqrt(5) > 1.2 * PROBE_NOISE_MARGIN * minibatch  # clearly past the line
    assert not events and _episodes(reads)[0][:2] == (0, 35) and 6 <= len(reads) <= 10
    reads, _, _ = _drive_probe_episodes(monkeypatch, swinging, lambda step: True)
    # the next one would start at 835; the reads not taken do not bring the next episode forward
    assert [first for first, _, _ in _episodes(reads)] == [0, 145, 390]
    assert all(6 <= n <= 10 for _, _, n in _episodes(reads))
    futile = _noise(0.8, 2)
    reads, events, minibatch = _drive_probe_episodes(monkeypatch, futile, lambda step: True)
    assert not events and _episodes(reads) == [(0, 25, 6), (145, 170, 6), (390, 415, 6)]
    probe = StallDetector(window=10, min_window=10)
    for step in reads[:6]:
        probe.update(step, futile(step))
    assert probe.relative_noise(6) * math.sqrt(5) > 1.5 * PROBE_FUTILE_MARGIN * minibatch  # clearly past it
    reads, _, _ = _drive_probe_episodes(monkeypatch, _noise(0.05, 1), lambda step: step < 30)
    assert _episodes(reads) == [(0, 125, 26)]  # the episode's two windows after its last flat look
    # 20% beats minibatch losses with 100% noise (near a classifier's zero loss), but no fit over the reads so far
    # and two windows more (30 reads) could tell a stall: its narrowest half-width is about 7% a window against 3%
    swinging = _noise(0.2, 3)
    reads, _, minibatch = _drive_probe_episodes(monkeypatch, swinging, lambda step: step < 30, minibatch_noise=1.0)
    probe = StallDetector(window=10, min_window=10)
    for step in reads:
        probe.update(step, swinging(step))
    assert probe.relative_noise() * math.sqrt(5) < 0.75 * minibatch and not probe.could_prove_flat(30)
    assert _episodes(reads) == [(0, 45, 10)]
    # reads a little noisier than the minibatch losses over the same span (within PROBE_NOISE_MARGIN: the noise of
    # ten reads is uncertain by about a third) are read to the episode's end
    swinging = _noise(0.045, 4)
    reads, _, minibatch = _drive_probe_episodes(monkeypatch, swinging, lambda step: step < 30, minibatch_noise=0.12)
    probe = StallDetector(window=10, min_window=10)
    for step in reads[:10]:
        probe.update(step, swinging(step))
    assert minibatch < probe.relative_noise() * math.sqrt(5) < PROBE_NOISE_MARGIN * minibatch
    assert _episodes(reads) == [(0, 125, 26)]


def test_probe_reads_go_on_where_they_can_prove_a_stall_or_a_flat_look_has_passed(monkeypatch):
    """A flat probe loss (a plateau) is read until its detector proves the stall at its tenth read (the episode's
    window: 50 steps of reads 5 apart), never cut short; and an episode whose minibatch losses no longer look flat
    is left to run its two windows even where the probe loss falls fast (the end of a descent is where a plateau
    begins: the batch-16 saddle of the verdict corpus)."""
    reads, events, _ = _drive_probe_episodes(monkeypatch, _noise(1e-6, 2), lambda step: True, steps=50)
    assert reads == list(range(0, 50, 5)) and [e.step for e in events] == [45]
    assert events[0].reason == "stall" and events[0].trigger == "flat_probe"
    reads, events, _ = _drive_probe_episodes(monkeypatch, lambda step: 2.0 - 0.01 * step, lambda step: step == 0)
    assert not events and _episodes(reads) == [(0, 100, 21)]


def test_with_a_fixed_cadence_probe_losses_do_not_depend_on_the_clock(tmp_path):
    """A fixed cadence is the user's choice of cost: the probe losses are then read whenever the diagnoser asks,
    with no budget at all, so the same run reads the same losses and gets the same verdict on a loaded machine."""
    found = []
    for budget in (1e-9, 1.0):
        diagnoser = StallDiagnoser(verbose=False, probe_every=5)
        trend_reads = _count_trend_reads(diagnoser)
        monitor = HessianMonitor(every_n_steps=10_000, budget=budget)
        fit_scenario(tmp_path / str(budget), "minimum", [monitor, diagnoser])
        (verdict,) = diagnoser.diagnoses
        found.append((trend_reads, verdict.step, verdict.evidence["stall_trigger"]))
        assert [c["what"] for c in monitor.charges].count("probe_loss") >= 1  # charged all the same, merged
    assert found[0] == found[1] and found[0][2] == "flat_probe" and len(found[0][0]) > 1


def test_probe_losses_spend_the_adaptive_buckets_credit_within_its_bound(tmp_path):
    """With the adaptive schedule and (almost) no earnings, the probe losses may spend only the bucket's starting
    credit above the stall reserve: all the measurement of the fit (snapshots, probe losses, spike reads) stays
    within the first snapshot plus one bucket, plus the overrun of the last piece of work."""
    diagnoser = StallDiagnoser(verbose=False, probe_every=5)
    trend_reads = _count_trend_reads(diagnoser)
    monitor = HessianMonitor(budget=1e-9)
    fit_scenario(tmp_path, "minimum", [monitor, diagnoser], planned=10**12)  # so long that even 1e-9 lends
    assert trend_reads and monitor.charges[0]["what"] == "scheduled"
    overrun = max(c["seconds"] / c.get("count", 1) for c in monitor.charges)
    assert monitor.monitor_seconds <= monitor.charges[0]["seconds"] + monitor.capacity() + overrun
    assert min(c["balance"] for c in monitor.charges if c["balance"] is not None) >= -overrun


def test_without_a_lent_first_estimate_probe_losses_are_paid_from_the_earnings_only(tmp_path):
    """A fit too short for its budget to pay a first estimate has no priced bucket to lend from: the probe losses
    spend only what the fit has earned (here almost nothing: after the one read that prices them, none), while a
    stall still gets its snapshot (the stall reserve is lent whatever the fit's length); the bucket opens with that
    snapshot, and the reads that prove the next stall come from it."""
    diagnoser = StallDiagnoser(verbose=False, probe_every=5)
    trend_reads = _count_trend_reads(diagnoser)
    monitor = HessianMonitor(budget=1e-9)
    fit_scenario(tmp_path, "minimum", [monitor, diagnoser])
    assert all(h["reason"] != "scheduled" for h in monitor.history)
    (stall, *_) = [c["step"] for c in monitor.charges if c["what"] == "stall"]
    assert [d.kind for d in diagnoser.diagnoses] == ["local_minimum"] and diagnoser.diagnoses[0].step == stall
    assert len([s for s in trend_reads if s < stall]) == 1  # the first read, unpriced until it is taken


def test_probe_reads_the_fit_cannot_pay_every_five_steps_come_evenly_spaced(tmp_path, monkeypatch):
    """Probe-set losses priced at 0.02 s (on the monitor's clock) in a fit earning 0.005 s a step (0.1 s steps, a
    5% budget): living on PROBE_READ_SHARE of the earnings, a read every 5.3 steps, they come every 10 steps
    (stride 2, decided once per episode): evenly spaced, and a window of five spans the 40 steps ten reads span at
    stride 1, so they still prove the noisy minimum flat."""
    clock = FakeClock()
    price_hessian_work(clock, monkeypatch)  # a probe batch's operator 0.02 s, a product 0.004 s

    def priced_loss(module, batch):  # a probe read (no autograd) costs 0.01 s a batch
        if not torch.is_grad_enabled():
            clock.advance(0.01)
        return lightning_loss(module, batch)

    diagnoser = StallDiagnoser(verbose=False, probe_every=5)
    trend_reads = _count_trend_reads(diagnoser)
    monitor = HessianMonitor(budget=0.05, clock=clock, loss_fn=priced_loss)
    fit_scenario(tmp_path, "minimum", [ClockSteps(clock), monitor, diagnoser], planned=10**6)
    (verdict,) = diagnoser.diagnoses
    assert verdict.kind == "local_minimum" and verdict.evidence["stall_trigger"] == "flat_probe"
    # every read on the episode's 10-step grid (the budget guard may still skip one the scheduled refreshes took)
    episode = [s for s in trend_reads if s <= verdict.step]
    gaps = [b - a for a, b in zip(episode, episode[1:])]
    assert len(episode) >= 5 and all(g % 10 == 0 for g in gaps) and sorted(gaps)[len(gaps) // 2] == 10
    assert diagnoser.probe_detector.window == 5 and verdict.evidence["stall_horizon"] % 10 == 0
    reads = [c for c in monitor.charges if c["what"] == "probe_loss"]
    assert sum(c.get("count", 1) for c in reads) == len(trend_reads)  # each priced and charged at 0.02 s
    assert sum(c["seconds"] for c in reads) == pytest.approx(0.02 * len(trend_reads))
    assert diagnoser.probe_seconds == pytest.approx(0.02 * diagnoser.n_probe_losses)  # brief-spike reads too


def test_a_resumed_run_keeps_its_probe_reads_spacing_and_their_history():
    diagnoser = StallDiagnoser(verbose=False, probe_every=5)
    diagnoser._probe_stride, diagnoser._probe_start = 2, 80
    diagnoser._probe_quiet_until, diagnoser._early_ends = 300, 2  # after two early ends: no episode before 300
    diagnoser.probe_detector.set_window(*diagnoser._probe_window(2))
    for step in range(80, 130, 10):
        diagnoser.probe_detector.update(step, 1.0 + 0.001 * (step % 20))
    resumed = StallDiagnoser(verbose=False, probe_every=5)
    resumed.load_state_dict(json.loads(json.dumps(diagnoser.state_dict())))
    assert (resumed._probe_stride, resumed._probe_start, resumed.probe_detector.window) == (2, 80, 5)
    assert (resumed._probe_quiet_until, resumed._early_ends) == (300, 2)
    assert resumed.probe_detector.state_dict() == diagnoser.probe_detector.state_dict()
    assert resumed.probe_detector.rel_improvement == diagnoser.probe_detector.rel_improvement


def _spike_event(step):
    """A spike event at ``step`` as the detector reports one (plain data: it goes into a checkpoint)."""
    event = StallEvent(step=step, reason="spike", slope=0.0, slope_ci=(0.0, 0.0), rel_slope=0.0,
                       window=[1.0, 2.0, 1.5], window_steps=[step - 2, step - 1, step], trigger="spike")
    event.spike = {"start_step": float(step - 2), "peak": 2.0, "reference": 1.0}
    return event


def test_verdicts_in_flight_are_checkpointed():
    """An undecided stall waiting for its retry and a repeated spike waiting for gradient pairs are plain data in
    the checkpoint, and come back as they were."""
    diagnoser = StallDiagnoser(verbose=False)
    diagnoser._pending = _PendingStall(_spike_event(60), 2, 69, True, True)
    diagnoser._waiting_spike = _WaitingSpike(_spike_event(65), 75)
    resumed = StallDiagnoser(verbose=False)
    resumed.load_state_dict(json.loads(json.dumps(diagnoser.state_dict())))
    (event, *rest), (spike, judged_at) = resumed._pending, resumed._waiting_spike
    assert event.to_dict() == diagnoser._pending[0].to_dict() and rest == [2, 69, True, True]
    assert spike.to_dict() == diagnoser._waiting_spike.event.to_dict() and judged_at == 75
    cleared = StallDiagnoser(verbose=False)
    cleared.load_state_dict(json.loads(json.dumps(StallDiagnoser(verbose=False).state_dict())))
    assert cleared._pending is None and cleared._waiting_spike is None


def test_a_resumed_fit_judges_a_waiting_spike_with_every_step_measured(tmp_path, monkeypatch):
    """A checkpoint taken while a repeated spike waits for its gradient pairs: the resumed fit (a new Trainer from
    the checkpoint) has the gradient monitor measure every step up to the spike's judging step again (the monitor
    forgets that at its own train start), and judges the spike there."""
    (run,) = scenario("minimum").build()
    gradient = GradientNormMonitor(every_n_steps=10)
    diagnoser = StallDiagnoser(verbose=False, gradient_monitor=gradient)
    trainer = trainer_for(tmp_path, [gradient, diagnoser], 20)
    trainer.fit(run.module, run.loader)
    diagnoser._waiting_spike = _WaitingSpike(_spike_event(18), 28)  # judged at step 28 with the pairs up to it
    path = str(tmp_path / "waiting.ckpt")
    trainer.save_checkpoint(path)

    gradient = GradientNormMonitor(every_n_steps=10)
    resumed = StallDiagnoser(verbose=False, gradient_monitor=gradient)
    judged = []
    monkeypatch.setattr(resumed, "_handle", lambda trainer, module, event, **kwargs: judged.append(
        (trainer.global_step, event.step, kwargs.get("pairs_until"))))
    (run,) = scenario("minimum").build()
    trainer_for(tmp_path, [gradient, resumed], 35).fit(run.module, run.loader, ckpt_path=path)
    assert (28, 18, 28) in judged and resumed._waiting_spike is None
    measured = {record["step"] for record in gradient.history}
    assert set(range(20, 29)) <= measured and not {31, 32, 33} & measured  # every step until 28, then pairs


def test_probe_every_is_checked_at_construction():
    with pytest.raises(UsageError, match="probe_every"):
        StallDiagnoser(probe_every=-1)


class _Spiking(ScenarioModule):
    """The minimum scenario's regression with a spike at steps ``first``-``last`` (150-153 by default): of the model
    (the lr x8, so the error along the steepest direction grows 1.4x per step) or of the reported loss only (x10,
    its gradient unchanged, as a few hard batches would look to the loss alone)."""

    def __init__(self, run, model_spike, first=150, last=153, factor=8.0):
        super().__init__(run.module.net, run.module.loss_fn, lr=run.module.lr)
        self.model_spike, self.first, self.last, self.factor = model_spike, first, last, factor

    def optdiag_loss(self, batch):  # the loss the model has on a batch (what curvature and probe losses read)
        return super().training_step(batch, 0)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if not self.model_spike and self.first <= self.trainer.global_step <= self.last:
            return loss + (9.0 * loss).detach()  # the value x10, the gradient as it was
        return loss

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        factor = (lambda step: self.factor if self.first <= step <= self.last else 1.0) if self.model_spike \
            else (lambda step: 1.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}}


@pytest.mark.parametrize("model_spike", [True, False])
def test_a_spike_is_reported_only_when_the_model_got_worse(tmp_path, model_spike):
    (run,) = scenario("minimum").build()
    module = _Spiking(run, model_spike)
    diagnoser = StallDiagnoser(verbose=False)
    trainer_for(tmp_path, [HessianMonitor(every_n_steps=10_000), diagnoser], 260).fit(module, run.loader)
    spikes = [d for d in diagnoser.diagnoses if d.kind == "loss_spike"]
    undecided = [u for u in diagnoser.undecided if u["reason"] == "spike"]
    assert [d.kind for d in diagnoser.diagnoses if d.kind == "divergence"] == []  # a spike that recovers
    if model_spike:
        (spike,) = spikes  # the probe batches' loss rose with the minibatch losses
        assert 150 <= spike.evidence["spike"]["start_step"] <= 156 and spike.evidence["spike_probe_ratio"] > 1.5
    else:
        assert spikes == [] and len(undecided) == 1  # the same losses, a model that never changed: no verdict
        probe = undecided[0]["spike"]
        assert probe["probe_loss_during"] == pytest.approx(probe["probe_loss_after"], rel=0.2)


@pytest.mark.parametrize("model_spike", [True, False])
def test_a_one_step_spike_is_read_on_the_model_before_its_step(tmp_path, model_spike):
    # One step at 16x the lr: the loss of the next step is 6x its level, and decays back within three steps. The
    # probe batches' loss, read at that point before the optimizer moves it and three steps later, tells the model's
    # spike from a loss that only reads high (x10 for one step, gradient unchanged); neither changes the weights.
    (run,) = scenario("minimum").build()
    module = _Spiking(run, model_spike, first=150, last=150, factor=16.0)
    diagnoser = StallDiagnoser(verbose=False)
    trainer_for(tmp_path / "a", [HessianMonitor(every_n_steps=10_000), diagnoser], 200).fit(module, run.loader)
    spikes = [d for d in diagnoser.diagnoses if d.kind == "loss_spike"]
    if model_spike:
        (spike,) = spikes
        brief = spike.evidence["spike"]
        assert brief["duration"] == 1.0 and brief["start_step"] == 152  # the loss of the point after the big step
        assert brief["end_step"] == 152 + 3 and spike.evidence["spike_probe_ratio"] > 1.5
    else:
        # read on the model at the loss that jumped and three steps later, and found unchanged
        (brief,) = [u["spike"] for u in diagnoser.undecided if u["reason"] == "brief_spike" and u["step"] == 154]
        assert brief["start_step"] == 151 and brief["ratio"] > 5
        (first, during), (then, after) = brief["reads"]  # the same batches at the nomination and three steps later
        assert (first, then) == (151, 154) and len(during) == 2 and during == pytest.approx(after, rel=0.2)
    (run,) = scenario("minimum").build()
    plain = _Spiking(run, model_spike, first=150, last=150, factor=16.0)
    trainer_for(tmp_path / "b", [], 200).fit(plain, run.loader)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), plain.parameters()))


class _HardBatchStorm(_Spiking):
    """The minimum scenario's regression whose reported loss is 10x at every 10th step from step 60 (its gradient
    unchanged, as a hard batch looks): a brief-spike nomination each time, which only reads of the probe batches can
    dismiss."""

    def __init__(self, run):
        super().__init__(run, model_spike=False)

    def training_step(self, batch, batch_idx):
        loss = ScenarioModule.training_step(self, batch, batch_idx)
        step = self.trainer.global_step
        return loss + (9.0 * loss).detach() if step >= 60 and step % 10 == 0 else loss


def test_every_read_of_the_probe_batches_waits_for_the_budget_whatever_asked_for_it(tmp_path, monkeypatch):
    # Reads priced at 0.1 s a probe batch (a forward pass as dear as a training step of 0.1 s): a brief-spike
    # nomination every 10 steps wants two reads (0.4 s) per 1 s of training, eight times the 5% budget. The step
    # allowance alone (four reads, then one per 20 steps) would let up to nine reads (1.8 s) into a window of 100
    # steps; every read now waits until the bucket holds it above the stall reserve, so every window of 100 steps
    # stays within the budget plus one bucket, whatever the reads were for (brief spikes, the stall's probe loss,
    # scheduled and stall snapshots).
    clock = FakeClock()
    price_hessian_work(clock, monkeypatch)

    def priced_loss(module, batch):
        if not torch.is_grad_enabled():  # a read of the probe batches: forward passes only
            clock.advance(0.1)
        return lightning_loss(module, batch)

    (run,) = scenario("minimum").build()
    monitor = HessianMonitor(budget=0.05, clock=clock, loss_fn=priced_loss)
    diagnoser = StallDiagnoser(verbose=False)
    nominated, start = [], diagnoser.detector.brief_spike_start

    def nominate(step, loss):
        if start(step, loss):
            nominated.append(step)
            return True
        return False

    monkeypatch.setattr(diagnoser.detector, "brief_spike_start", nominate)
    steps = 400
    trainer_for(tmp_path, [ClockSteps(clock), monitor, diagnoser, stop_after(steps)], 10**6).fit(
        _HardBatchStorm(run), run.loader)
    reads = sum(c.get("count", 1) for c in monitor.charges if c["what"] == "brief_spike_read")
    # a nomination at each hard batch while the allowance lasts; the budget read a few and refused the rest
    assert len(nominated) >= 15 and 0 < reads < len(nominated)
    windows = charge_windows(monitor.charges, steps, 100)
    assert max(windows) <= 0.05 * 100 * 0.1 + monitor.capacity() + 1e-9
    assert min(c["balance"] for c in monitor.charges if c["balance"] is not None) >= -1e-9
    assert sum(c["seconds"] for c in monitor.charges) == pytest.approx(monitor.monitor_seconds)
    assert [d.kind for d in diagnoser.diagnoses if d.kind == "loss_spike"] == []  # hard batches: no spike


def test_without_logger_or_root_dir_nothing_lands_in_the_working_directory(tmp_path, monkeypatch):
    # A ./optdiag folder there would shadow the installed package for the next script started in that folder.
    monkeypatch.chdir(tmp_path)
    (run,) = scenario("divergence").build()
    diagnoser = StallDiagnoser(verbose=False)
    trainer = pl.Trainer(max_steps=run.max_steps, accelerator="cpu", devices=1, callbacks=[diagnoser], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="not written into the working directory"):
        trainer.fit(run.module, run.loader)
    assert [d.kind for d in diagnoser.diagnoses] == ["divergence"]
    assert not (tmp_path / "optdiag").exists()


class _DigitsMLP(pl.LightningModule):
    """A small MLP on scikit-learn's bundled digits, SGD with momentum at batch 16: a healthy noisy minibatch run."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


@pytest.mark.slow
def test_a_healthy_noisy_minibatch_run_gets_no_verdict(tmp_path):
    """The reported false alarms came from runs like this one: minibatch losses with a scatter of a fifth of their
    level while the full-data loss keeps falling. Its truth is checked without optdiag: the full-data loss falls in
    every quarter of the run. OptDiag at its defaults must say nothing."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    module = _DigitsMLP()
    full = []

    class FullLoss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 100 == 0:
                with torch.no_grad():
                    full.append(nn.functional.cross_entropy(pl_module.net(data.tensors[0]), data.tensors[1]).item())

    cb = optdiag.OptDiag(verbose=False)
    trainer_for(tmp_path, [FullLoss(), cb], 400).fit(module, loader)
    assert all(b < 0.9 * a for a, b in zip(full, full[1:])), full  # the truth: still falling >10% per 100 steps
    assert cb.diagnoses == [] and all(u["reason"] != "stall" for u in cb.stall_diagnoser.undecided)


def test_an_undecided_stall_short_of_gradient_pairs_measures_every_step_and_looks_again_when_it_has_them(
        monkeypatch):
    """A stall whose gradient cannot be judged against its noise (fewer consecutive-gradient pairs than the test
    needs: the monitor measures a pair every 10 steps) is not left waiting half a window: the gradient monitor
    measures every step until the next look, which comes as soon as there are enough pairs. A stall undecided for
    another reason waits the half window and measures nothing more."""
    from optdiag.callbacks import stall as stall_module
    from optdiag.diagnosis import StallEvent
    from optdiag.diagnosis.classify import MIN_GRADIENT_PAIRS

    def undecided_with(grad_zero):
        def diagnose(evidence, event, thresholds, undecided):
            undecided.append({"tests": {"grad_zero": grad_zero}, "scores": {}})
            return None
        return diagnose

    event = StallEvent(step=65, reason="stall", slope=0.0, slope_ci=(-1.0, 1.0), rel_slope=0.0, window=[1.0] * 50,
                       window_steps=list(range(16, 66)), horizon=50)
    for grad_zero, retry in ((None, 65 + MIN_GRADIENT_PAIRS + 1), (0.9, 65 + 25)):
        gradient = GradientNormMonitor(every_n_steps=10)
        diagnoser = StallDiagnoser(verbose=False, gradient_monitor=gradient)
        monkeypatch.setattr(diagnoser, "_snapshot", lambda *args: {})
        monkeypatch.setattr(diagnoser, "_evidence", lambda *args: None)
        monkeypatch.setattr(stall_module, "diagnose_stall", undecided_with(grad_zero))
        diagnoser._handle(None, None, event)
        assert diagnoser._pending[2] == retry and diagnoser.undecided[-1]["step"] == 65
        dense = grad_zero is None
        assert [s for s in range(66, 80) if gradient.is_measured(s)] == (
            list(range(66, 66 + MIN_GRADIENT_PAIRS + 1)) + [79] if dense else [69, 70, 79])


def test_a_spikes_snapshot_is_routine_unless_the_run_was_past_the_stability_threshold_before_it(monkeypatch):
    """A recovered spike's own snapshot comes from earned credit above the stall reserve (a healthy run with a few
    spikes must not pay one each), unless the last estimate before it was past the threshold: only the curvature
    after it then tells a catapult from a bounce, and it may use the reserve."""
    from optdiag.diagnosis import StallEvent

    event = StallEvent(step=40, reason="spike", slope=0.0, slope_ci=(0.0, 0.0), rel_slope=0.0, window=[1.0] * 5,
                       window_steps=list(range(36, 41)), trigger="spike")
    event.spike = {"start_step": 30.0}
    asked = []
    for before in (1.5, 0.5, None):
        monitor = HessianMonitor()
        diagnoser = StallDiagnoser(verbose=False, hessian_monitor=monitor)
        diagnoser.hessian_monitor = monitor
        monkeypatch.setattr(diagnoser, "_ratio_before", lambda event, before=before: before)
        monkeypatch.setattr(monitor, "can_afford_snapshot", lambda trainer, routine=False: asked.append(routine))
        assert diagnoser._snapshot(None, None, event) == {} and diagnoser.n_snapshots == 0
    assert asked == [False, True, True]


def test_under_mixed_precision_the_losses_judged_are_the_unscaled_ones(tmp_path):
    """With a GradScaler (``precision="16-mixed"``) the loss backward sees is the loss times 2**16: the brief-spike
    test reads it before the optimizer step, and must judge the loss itself (the same value the batch's outputs
    hold), or every step would look like a spike of 65536 times the level. The truth, read without optdiag: each
    step's loss from ``training_step``'s outputs."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    outputs_losses = []

    class Truth(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            outputs_losses.append(float(outputs["loss"]))

    diagnoser = StallDiagnoser(verbose=False)
    from pytorch_lightning.plugins.precision import MixedPrecision

    # Lightning would turn "16-mixed" into bf16 on a CPU (no scaler): the fp16 plugin with its GradScaler, explicitly
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = trainer_for(tmp_path, [diagnoser, Truth()], 40, plugins=[amp], deterministic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_DigitsMLP(), loader)
    assert trainer.precision_plugin.scaler.get_scale() > 1.0  # the scaler did scale the backward pass
    assert diagnoser._brief_enabled
    assert [float(v) for v in diagnoser.detector.state_dict()["losses"]] == outputs_losses
    assert diagnoser._brief_reads == 0 and diagnoser.undecided == []  # no step of a smooth descent looked like a spike


def test_gradient_pairs_give_the_mean_of_the_pairs_cosines_with_its_standard_error():
    from optdiag.callbacks.stall import gradient_pairs

    records = [{"step": 0, "grad_norm": 1.0}, {"step": 1, "grad_norm": 10.0, "grad_cosine": -1.0},
               {"step": 5, "grad_norm": 2.0}, {"step": 6, "grad_norm": 1.0, "grad_cosine": -0.5},
               {"step": 9, "grad_norm": 4.0, "grad_cosine": 0.9}]  # no step 8: not a pair
    out = gradient_pairs(records)
    assert out["grad_pair_count"] == 2
    assert out["grad_pair_dot"] == pytest.approx((-10.0 - 1.0) / 2) and out["grad_pair_sq"] == pytest.approx(6.0)
    assert out["grad_pair_cosine"] == pytest.approx(-0.75)
    assert out["grad_pair_cosine_stderr"] == pytest.approx(math.sqrt(((0.25**2) * 2) / 1 / 2))


def test_a_loss_read_once_per_tensor_is_read_again_after_an_in_place_write():
    """loss_of shares one read of a step's loss between callbacks; a training_step that returns the same buffer
    every step (written in place) must not get last step's value."""
    from optdiag.callbacks._base import loss_of, remember_loss

    buffer = torch.tensor(2.0)
    outputs = {"loss": buffer}
    assert loss_of(outputs) == 2.0
    remember_loss(outputs, 2.0)
    buffer.fill_(3.0)  # the next step's value, in the same tensor
    assert loss_of(outputs) == 3.0
    fresh = torch.tensor(5.0)
    remember_loss(fresh, 7.0)  # told by the diagnoser: taken without a read
    assert loss_of(fresh) == 7.0 and loss_of(torch.tensor(5.0)) == 5.0


def test_a_repeated_spike_short_of_gradient_pairs_waits_for_the_pairs_after_it(monkeypatch):
    """Repeated spikes may be the bounce of an oscillation, which the consecutive-gradient pairs of the two windows
    before the spike test; with fewer than the test needs (a cadence priced sparser than every 12 steps) the spike is
    not called a loss_spike by default: the gradient monitor measures every step after it and the spike is judged
    again with those pairs too. A first spike, or one whose test had its pairs, is judged at once; a new event or the
    end of training judges a waiting spike with the pairs it has."""
    from optdiag.callbacks import stall as stall_module
    from optdiag.diagnosis import Diagnosis, Evidence, StallEvent
    from optdiag.diagnosis.classify import MIN_GRADIENT_PAIRS

    def spike_event(step):
        event = StallEvent(step=step, reason="spike", slope=0.0, slope_ci=(0.0, 0.0), rel_slope=0.0,
                           window=[1.0] * 5, window_steps=list(range(step - 4, step + 1)), trigger="spike")
        event.spike = {"start_step": float(step - 5)}
        return event

    def run(spike_count, pairs_before):
        gradient = GradientNormMonitor(every_n_steps=10)
        diagnoser = StallDiagnoser(verbose=False, gradient_monitor=gradient)
        looks, recorded = [], []
        monkeypatch.setattr(diagnoser, "_snapshot", lambda *args: {})
        monkeypatch.setattr(diagnoser, "_record", lambda trainer, diagnosis: recorded.append(diagnosis))

        def evidence(trainer, pl_module, event, snapshot, pairs_until=None):
            looks.append((event.step, pairs_until))
            pairs = pairs_before if pairs_until is None else pairs_before + (pairs_until - event.step - 1)
            return Evidence(step=event.step, loss=1.0, spike_count=spike_count, grad_pair_count=pairs)

        def diagnose(ev, event, thresholds, undecided):  # oscillation measured once the pairs suffice
            pairs = ev.grad_pair_count or 0
            kind = "oscillation" if pairs >= MIN_GRADIENT_PAIRS and ev.spike_count >= 2 else "loss_spike"
            signal = 1.0 if kind == "oscillation" else (None if pairs < MIN_GRADIENT_PAIRS else 0.0)
            return Diagnosis(event.step, kind, 0.9, {"tests": {"oscillation_signal": signal}}, [], "a verdict")

        monkeypatch.setattr(diagnoser, "_evidence", evidence)
        monkeypatch.setattr(stall_module, "diagnose_stall", diagnose)
        return diagnoser, gradient, looks, recorded

    retry = 65 + MIN_GRADIENT_PAIRS + 2
    # a repeated spike with 5 pairs before it: no verdict yet, every step measured up to the retry, then judged
    diagnoser, gradient, looks, recorded = run(spike_count=2, pairs_before=5)
    stall_retry = _PendingStall(spike_event(60), 1, 90, False, False)  # a stall's retry is not the spike's business
    diagnoser._pending = stall_retry
    diagnoser._handle(None, None, spike_event(65))
    assert recorded == [] and diagnoser._waiting_spike.judged_at == retry and diagnoser.n_spikes == 1
    assert [s for s in range(66, 81) if gradient.is_measured(s)] == list(range(66, retry + 1)) + [79, 80]
    diagnoser._judge_waiting_spike(None, None, retry)
    assert [d.kind for d in recorded] == ["oscillation"] and looks == [(65, None), (65, retry)]
    assert diagnoser.n_spikes == 1 and diagnoser._waiting_spike is None  # the same spike, counted once
    assert diagnoser._pending == stall_retry

    # judged sooner (a new event, the end of training) with the pairs it has: here too few, a loss_spike
    diagnoser, _, looks, recorded = run(spike_count=2, pairs_before=0)
    diagnoser._handle(None, None, spike_event(65))
    diagnoser._judge_waiting_spike(None, None, 68)
    assert [d.kind for d in recorded] == ["loss_spike"] and looks == [(65, None), (65, 68)]

    # a first spike, or a repeated one whose test had its pairs: judged at once
    for spike_count, pairs_before in ((1, 0), (2, MIN_GRADIENT_PAIRS)):
        diagnoser, _, looks, recorded = run(spike_count, pairs_before)
        diagnoser._handle(None, None, spike_event(65))
        assert len(recorded) == 1 and diagnoser._waiting_spike is None and looks == [(65, None)]


def test_samples_per_epoch_are_unknown_when_the_loaders_items_are_whole_batches():
    from torch.utils.data import DataLoader, TensorDataset

    from optdiag.callbacks.stall import _dataset_size

    class Trainer:
        def __init__(self, loader, batches):
            self.train_dataloader, self.num_training_batches = loader, batches

    data = TensorDataset(torch.zeros(100, 2))
    assert _dataset_size(Trainer(DataLoader(data, batch_size=10), 10), 10) == 100
    assert _dataset_size(Trainer(DataLoader(data, batch_size=100), 1), 100) == 100  # one batch: the batch
    # one item per step, each a whole batch (the demo's StepBatches): its length counts steps, not samples
    (run,) = scenario("minimum").build()
    assert run.loader.batch_size is None and _dataset_size(Trainer(run.loader, len(run.loader)), 64) is None
    assert _dataset_size(Trainer(None, None), 10) is None
