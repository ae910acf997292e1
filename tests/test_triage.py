"""The triage: its rules on exact numbers, the batch-size advice, and real Lightning runs with a validation loop."""

from __future__ import annotations

import html
import math
import warnings

import pytest
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optdiag
from optdiag.callbacks.triage import TEXT_TAG, TriageMonitor
from optdiag.demo.runner import quiet_lightning
from optdiag.demo.scenarios import ValidatedModule, digits_data, scenario
from optdiag.diagnosis import Diagnosis, Suggestion
from optdiag.diagnosis.advice import batch_size_advice
from optdiag.diagnosis.triage import (
    FINDING_KINDS,
    RULES,
    Finding,
    Recommendation,
    TriageInputs,
    needs_validation,
    noise_floor_share,
    rise_probability,
    rule_scores,
    triage,
    triage_tests,
)
from optdiag.errors import UsageError
from optdiag.sinks.events import events_path, read_events
from optdiag.sinks.report import render_html
from optdiag.analysis.loading import load_checkpoint


def _p_above(ratio: float) -> float:
    """P(stat > boundary) for stat / boundary = ratio: 0.5 at 1, 0.9 at 2 (the classifier's log-ratio logistic)."""
    return 1.0 / (1.0 + ratio ** (-math.log(9.0) / math.log(2.0)))


def _minimum(loss: float, confidence: float = 0.95, **evidence) -> Diagnosis:
    ev = {"loss": loss, "loss_initial": 0.86, "tests": {"negative_curvature": 0.0}, **evidence}
    return Diagnosis(400, "local_minimum", confidence, ev, [], "A minimum.")


# --- the types ------------------------------------------------------------------------------------------------------
def test_finding_round_trips_and_validates():
    f = Finding(12, "overfitting", 0.8, {"gap": float("inf"), "steps": (1, 2)},
                [Recommendation("Stop early", "The gap grew.", {"best": 3})], "Gap grows.",
                [Suggestion("batch_size", "Use a smaller batch", current=256, proposed=64, reason="Sharp.")])
    assert Finding.from_dict({"record": "finding", **f.to_dict()}) == f
    assert f.evidence["steps"] == [1, 2] and f.to_dict()["evidence"]["gap"] == "inf"
    assert "| Stop early | The gap grew. | best=3 |" in f.to_markdown()
    with pytest.raises(UsageError, match="Finding.kind"):
        Finding(1, "uncertain", 0.5, {}, [], "x")
    with pytest.raises(UsageError, match="Finding.confidence"):
        Finding(1, "overfitting", 1.5, {}, [], "x")
    with pytest.raises(UsageError, match="Recommendation.action"):
        Recommendation("", "why", {})


def test_every_rule_row_names_a_finding_kind():
    assert set(RULES) <= set(FINDING_KINDS)
    assert "needs_validation" not in RULES  # a fact, not a test


def test_rule_scores_take_the_weakest_test_and_the_defaults():
    tests = {"generalization_gap": 0.97, "gap_grows": 0.9, "val_rises": 0.8, "val_above_best": 0.7,
             "train_rises": 0.1}
    assert rule_scores(tests, ("overfitting",)) == {"overfitting": 0.7}
    # a veto-only test not measured does not veto; a test a kind is claimed from, not measured, scores 0
    assert rule_scores({**tests, "train_rises": None}, ("overfitting",)) == {"overfitting": 0.7}
    assert rule_scores({**tests, "gap_grows": None}, ("overfitting",)) == {"overfitting": 0.0}


# --- the tests' statistics --------------------------------------------------------------------------------------------
def test_rise_probability_on_exact_lines():
    p, fit = rise_probability([0, 1, 2, 3, 4, 5], [1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    assert p == 1.0 and fit["slope"] == pytest.approx(0.5, abs=1e-12)
    p, fit = rise_probability([0, 1, 2, 3, 4, 5], [3.5, 3.0, 2.5, 2.0, 1.5, 1.0], falling=True)
    assert p == 1.0 and fit["slope"] == pytest.approx(-0.5, abs=1e-12)
    assert rise_probability([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0]) == (None, {})  # fewer than 5 points


def test_rise_probability_is_one_half_where_the_interval_touches_zero():
    steps = [0, 1, 2, 3, 4, 5, 6, 7]
    values = [0.0, 1.0, -1.0, 0.5, 0.2, -0.3, 0.4, 0.1]
    p, fit = rise_probability(steps, values)
    # add a trend that moves the interval's lower end to exactly 0
    shifted, _ = rise_probability(steps, [v - fit["slope_low"] * s for s, v in zip(steps, values)])
    assert shifted == pytest.approx(0.5, abs=1e-9)


def test_noise_floor_share_is_sgds_stationary_excess_loss():
    ev = {"optimizer_kind": "heavy_ball", "effective_lr": 0.5, "grad_noise_trace": 6.0, "batch_size": 10,
          "loss": 0.3}
    assert noise_floor_share(ev) == pytest.approx(0.5 * 6.0 / (4 * 10 * 0.3), rel=1e-12)
    assert noise_floor_share({**ev, "dataset_size": 10}) == 0.0  # a full batch: no noise
    assert noise_floor_share({**ev, "optimizer_kind": "adam"}) is None  # preconditioned steps: not this formula
    assert noise_floor_share({**ev, "grad_noise_trace": None}) is None


# --- the map ----------------------------------------------------------------------------------------------------------
def _overfitting_inputs() -> TriageInputs:
    steps = [10 * i for i in range(12)]
    train = [(s, 1.0 / (1 + i)) for i, s in enumerate(steps)]
    val = [(s, v) for s, v in zip(steps, [2.0, 1.2, 0.9, 0.8, 0.82, 0.86, 0.9, 0.95, 1.0, 1.04, 1.1, 1.15])]
    return TriageInputs(step=110, train=train, val=val, loss_initial=2.3, batch_size=256, b_simple=40.0,
                        sharpness=[(s, 10.0 + s) for s in steps])


def test_overfitting_from_a_growing_gap_with_its_evidence_and_advice():
    (f,) = triage(_overfitting_inputs())
    assert f.kind == "overfitting" and f.step == 110
    ev = f.evidence
    assert (ev["best_val_step"], ev["best_val_loss"]) == (30, 0.8)
    assert ev["val_above_best"] == pytest.approx(1.15 / 0.8 - 1, rel=1e-12)
    assert ev["trend_steps"] == [20, 110]  # the last 10 validation points
    assert ev["lambda_max_first"] == 30.0 and ev["lambda_max_last"] == 120.0 and ev["sharpness_rises"] == 1.0
    assert f.confidence == min(f.evidence["tests"][k] for k in ("generalization_gap", "gap_grows", "val_rises",
                                                                "val_above_best"))
    assert "rose from its best 0.8 at step 30 to 1.15" in f.summary and "lambda_max rose" in f.summary
    assert f.recommendations[0].numbers["best_val_step"] == 30
    # overfitting and a train/validation mismatch look alike here: the finding names the check that tells them apart
    assert f.recommendations[-1].action == "Hold out a split of the training data"
    (s,) = f.suggestions  # gap and sharpness grow with batch 256: a quarter of it
    assert (s.target, s.current, s.proposed) == ("batch_size", 256, 64)


def test_a_falling_validation_loss_is_no_finding_however_large_the_gap():
    inputs = _overfitting_inputs()
    inputs.val = [(s, 1.5 - 0.01 * i) for i, (s, _) in enumerate(inputs.val)]  # 65% of the way to go, falling
    assert triage(inputs) == []  # not overfitting, and no mismatch check while validation still improves
    inputs.val = [(s, 1.5) for s, _ in inputs.val]
    assert [f.kind for f in triage(inputs)] == ["train_test_mismatch_check"]


def test_a_tiny_rise_of_a_noise_free_validation_loss_is_not_overfitting():
    inputs = _overfitting_inputs()
    inputs.val = [(s, 0.8 + 0.001 * i) for i, (s, _) in enumerate(inputs.val)]  # significant, but 1.4% above best
    tests = triage_tests(inputs)[0]
    assert tests["gap_grows"] > 0.99 and tests["val_rises"] > 0.99 and tests["val_above_best"] < 0.5
    assert triage(inputs) == []


def test_model_bias_at_a_high_minimum_with_positive_curvature():
    verdict = _minimum(0.69, optimizer_kind="sgd", effective_lr=0.5, grad_noise_trace=0.4, batch_size=64)
    (f,) = triage(TriageInputs(step=500, verdict=verdict))
    share = 0.5 * 0.4 / (4 * 64 * 0.69)
    assert f.kind == "model_bias" and f.evidence["noise_floor_share"] == pytest.approx(share, rel=1e-9)
    assert f.evidence["train_fraction"] == pytest.approx(0.69 / 0.86, rel=1e-12)
    expected = min(0.95, _p_above(0.69 / 0.86 / 0.1), 1.0 - _p_above(share / 0.1))
    assert f.confidence == pytest.approx(expected, abs=1e-9)
    assert f.recommendations[0].action == "Use a larger or more flexible model"


def test_a_low_minimum_is_no_finding():
    assert triage(TriageInputs(step=500, verdict=_minimum(0.02))) == []  # 2% of the way from the floor is left


def test_a_minimum_at_sgds_noise_floor_is_an_optimization_problem():
    verdict = _minimum(0.69, optimizer_kind="sgd", effective_lr=0.5, grad_noise_trace=400.0, batch_size=8)
    (f,) = triage(TriageInputs(step=500, verdict=verdict, batch_size=8, b_simple=1000.0))
    assert f.kind == "optimization" and f.evidence["noise_floor_share"] > 1
    assert [(s.target, s.proposed) for s in f.suggestions] == [("batch_size", 128.0)]  # 2^floor(log2(250))


def test_negative_curvature_or_a_gap_vetoes_model_bias():
    verdict = _minimum(0.69)
    verdict.evidence["tests"]["negative_curvature"] = 0.99
    assert triage(TriageInputs(step=500, verdict=verdict)) == []
    gap = TriageInputs(step=500, verdict=_minimum(0.69), train=[(500, 0.69)], val=[(500, 1.5)])
    assert [f.kind for f in triage(gap)] == []  # validation far above training: not the model's limit alone


def test_a_plateau_at_a_high_loss_is_an_optimization_problem_and_keeps_its_advice():
    advice = Suggestion("lr", "Raise the learning rate", current=1e-5, proposed=1e-4, reason="Tiny steps.")
    verdict = Diagnosis(300, "plateau", 0.9, {"loss": 2.0, "loss_initial": 2.3}, [advice], "Crawling.")
    (f,) = triage(TriageInputs(step=300, verdict=verdict))
    assert f.kind == "optimization" and f.confidence == pytest.approx(min(0.9, _p_above(2.0 / 2.3 / 0.1)))
    assert f.suggestions == [advice]


def test_a_plateau_the_loss_choice_explains_puts_the_loss_first():
    # MSE on saturated softmax outputs: the plateau verdict's "raise the lr" treats the symptom, the loss is the cause
    advice = Suggestion("lr", "Raise the learning rate", current=1e-2, proposed=1e-1, reason="Tiny steps.")
    verdict = Diagnosis(300, "plateau", 0.9, {"loss": 2.0, "loss_initial": 2.3}, [advice], "Crawling.")
    cause = "62% of the outputs are saturated; use cross-entropy on the logits."
    (f,) = triage(TriageInputs(step=300, verdict=verdict, input_findings={"loss_choice": cause,
                                                                          "model_bias": "not a setup finding"}))
    assert f.kind == "optimization" and f.suggestions == [advice]  # the step's advice stays, second
    assert [r.action for r in f.recommendations] == ["Change the loss before tuning the step",
                                                     "Follow the stall verdict's advice"]
    assert cause in f.recommendations[0].reason and f.summary.endswith("loss choice (see its finding).")
    (plain,) = triage(TriageInputs(step=300, verdict=verdict))
    assert [r.action for r in plain.recommendations] == ["Follow the stall verdict's advice"]


def test_mismatch_is_a_check_to_run_when_validation_stays_high_without_rising():
    steps = [10 * i for i in range(10)]
    flat = [1.9, 1.91, 1.89, 1.9, 1.92, 1.88, 1.9, 1.91, 1.89, 1.9]  # 83% of the way from 2.3 to 0 left, no trend
    inputs = TriageInputs(step=90, train=[(s, 0.05) for s in steps], val=list(zip(steps, flat)), loss_initial=2.3)
    (f,) = triage(inputs)
    assert f.kind == "train_test_mismatch_check"
    assert f.recommendations[0].action == "Hold out a split of the training data"
    assert "cannot tell apart" in f.summary
    assert f.confidence == pytest.approx(min(f.evidence["tests"]["train_loss_low"], _p_above(1.9 / 2.3 / 0.5),
                                             1 - f.evidence["tests"]["val_rises"],
                                             1 - f.evidence["tests"]["val_falls"]), abs=1e-12)
    inputs.train, inputs.val = inputs.train[:4], inputs.val[:4]
    assert triage(inputs) == []  # "neither rising nor falling" needs the trends, which need 5 points


def test_needs_validation_names_what_it_looked_for():
    f = needs_validation(40, ("val_loss", "validation_loss"), ["train_loss", "val_acc"])
    assert f.kind == "needs_validation" and f.confidence == 1.0
    assert f.evidence == {"looked_for": ["val_loss", "validation_loss"], "logged": ["train_loss", "val_acc"]}


# --- batch-size advice ------------------------------------------------------------------------------------------------
def test_raising_the_batch_is_free_far_below_the_noise_scale():
    (s,) = batch_size_advice(8, b_simple=512.0)
    assert (s.current, s.proposed) == (8, 128)
    assert "23% more examples and 16x fewer steps" in s.reason  # (1 + 128/512) / (1 + 8/512) - 1 = 0.2308
    assert batch_size_advice(8, b_simple=40.0) == []  # B_simple / 4 = 10 < 2 x 8: not worth it
    (capped,) = batch_size_advice(8, b_simple=4096.0, dataset_size=100)
    assert capped.proposed == 64
    assert batch_size_advice(8, b_simple=512.0, gap_grows=True) == []  # small batches generalize better


def test_lowering_the_batch_needs_the_gap_and_the_sharpness_and_a_batch_far_above_32():
    (s,) = batch_size_advice(512, gap_grows=True, sharpness_rises=True)
    assert (s.current, s.proposed) == (512, 128)
    assert batch_size_advice(48, gap_grows=True, sharpness_rises=True) == []
    assert batch_size_advice(512, gap_grows=True, sharpness_rises=False) == []


# --- real Lightning runs ----------------------------------------------------------------------------------------------
class _Digits(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.1, val_name: str = "val_loss") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lr, self.val_name = lr, val_name

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        value = nn.functional.cross_entropy(logits, y) if self.val_name.endswith("loss") else \
            (logits.argmax(1) == y).float().mean()
        self.log(self.val_name, value)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _digits_loaders(n_train: int, batch: int):
    x, y = digits_data()
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[1000:1500], y[1000:1500]), batch_size=500)
    return train, val


def _fit(tmp_path, callbacks, module, train, val=None, **kwargs):
    options = dict(accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(str(tmp_path)), enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, deterministic=True,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0, log_every_n_steps=10)
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return trainer


def test_overfitting_is_found_on_a_real_run_and_written_everywhere(tmp_path, capsys):
    (run,) = scenario("overfitting").build()
    cb = TriageMonitor()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = _fit(tmp_path, [cb, checkpoint], run.module, run.loader, run.val_loader, max_steps=run.max_steps,
                   val_check_interval=run.val_every, enable_checkpointing=True)
    kinds = [f.kind for f in cb.findings]
    assert kinds == ["overfitting"]
    (f,) = cb.findings
    # the finding rests on what the module itself recorded: the best validation loss and its step
    best_step, best = min(run.module.val_losses, key=lambda p: p[1])
    assert (f.evidence["best_val_step"], f.evidence["best_val_loss"]) == (best_step, pytest.approx(best, rel=1e-6))
    assert f.evidence["val_loss"] > 1.1 * best and f.evidence["train_loss"] < 0.05
    records = [r for r in read_events(events_path(trainer.logger.log_dir)) if r.get("record") == "finding"]
    assert [Finding.from_dict(r) for r in records] == cb.findings
    assert "overfitting" in capsys.readouterr().out  # the end-of-fit summary
    # saved with the checkpoint, read back by the post-hoc analysis and shown in its HTML report
    loaded = load_checkpoint(tmp_path / "ckpt" / "last.ckpt", lambda: scenario("overfitting").build()[0].module)
    assert [Finding.from_dict(d) for d in loaded.findings] == cb.findings
    page = render_html({"checkpoints": [], "findings": loaded.findings})
    assert "<h2>Triage</h2>" in page and "Stop at the best validation loss" in page
    assert html.escape(f.summary, quote=True) in page


def test_a_healthy_run_with_a_validation_loop_gets_no_finding(tmp_path):
    train, val = _digits_loaders(1000, 32)
    cb = optdiag.OptDiag(verbose=False)
    module = _Digits()
    _fit(tmp_path, [cb], module, train, val, max_epochs=6)
    assert cb.findings == [] and len(cb.triage_monitor.val) == 6
    assert cb.triage_monitor.val[-1][1] < cb.triage_monitor.val[0][1]  # validation did improve: healthy


def test_no_validation_metric_is_said_once(tmp_path):
    train, val = _digits_loaders(200, 50)
    cb = TriageMonitor(verbose=False)
    _fit(tmp_path, [cb], _Digits(val_name="val_acc"), train, val, max_epochs=3)
    (f,) = cb.findings  # three validations, one message
    assert f.kind == "needs_validation" and f.step == 4 and "val_acc" in f.evidence["logged"]


def test_no_validation_loop_is_said_once_at_the_end_and_shown_in_tensorboard(tmp_path):
    train, _ = _digits_loaders(200, 50)
    cb = TriageMonitor(verbose=False)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    _fit(tmp_path, [cb], _Digits(), train, None, max_epochs=2, logger=logger)
    assert [(f.kind, f.step) for f in cb.findings] == [("needs_validation", 8)]
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    (event,) = accumulator.Tensors(f"{TEXT_TAG}/text_summary")
    assert event.step == 8 and event.tensor_proto.string_val[0].decode() == cb.findings[0].to_markdown()


def test_state_round_trips_and_arguments_are_checked():
    cb = TriageMonitor(val_metrics="val/loss", loss_floor=0.1)
    assert cb.val_metrics == ("val/loss",)
    cb.train, cb.val, cb.loss_initial = [(5, 1.0)], [(5, 1.2)], 2.3
    cb.findings = [needs_validation(5, ("val_loss",), [])]
    fresh = TriageMonitor()
    fresh.load_state_dict(cb.state_dict())
    assert (fresh.train, fresh.val, fresh.loss_initial, fresh.findings) == (cb.train, cb.val, 2.3, cb.findings)
    with pytest.raises(UsageError, match="val_metrics"):
        TriageMonitor(val_metrics=[])
    with pytest.raises(UsageError, match="loss_floor"):
        TriageMonitor(loss_floor=float("nan"))
    with pytest.raises(UsageError, match="stall_diagnoser"):
        TriageMonitor(stall_diagnoser=object())
