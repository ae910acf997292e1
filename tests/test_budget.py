"""HessianMonitor's budget: a token bucket charged with every curvature product, on an injected clock.

The clock moves only when told: 0.1 s per training batch, and fixed prices for the Hessian work (building a
probe batch's operator, one product), so the accounting can be checked against exact numbers.
"""

from __future__ import annotations

import csv
from pathlib import Path

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_models import make_trainer, stop_after
from optdiag.callbacks.hessian import CURVATURE_NOTE_TAG, HessianMonitor
from optdiag.curvature.operator import HessianOperator
from test_hessian_monitor import BATCH, LinearRegression, _hessian, _loader

STEP_SECONDS, SETUP_SECONDS, PRODUCT_SECONDS = 0.1, 0.02, 0.004


class FakeClock:
    """A ``time.perf_counter`` that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class ClockSteps(pl.Callback):
    """0.1 s of training per batch: the time the budget is a fraction of."""

    def __init__(self, clock):
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.advance(STEP_SECONDS)


def price_hessian_work(clock, patch):
    """Through ``patch`` (a ``pytest.MonkeyPatch``): building a probe batch's operator advances ``clock`` by
    0.02 s and each product by 0.004 s."""
    build, product = HessianOperator.__init__, HessianOperator._matvec

    def timed_build(self, *args, **kwargs):
        build(self, *args, **kwargs)
        clock.advance(SETUP_SECONDS)

    def timed_product(self, v):
        clock.advance(PRODUCT_SECONDS)
        return product(self, v)

    patch.setattr(HessianOperator, "__init__", timed_build)
    patch.setattr(HessianOperator, "_matvec", timed_product)


@pytest.fixture
def priced(monkeypatch):
    """The fake clock, with building a probe batch's operator at 0.02 s and each product at 0.004 s."""
    clock = FakeClock()
    price_hessian_work(clock, monkeypatch)
    return clock


class StallStorm(pl.Callback):
    """Asks for a stall snapshot every 5 steps from step 30, as StallDiagnoser does (affordability first, a
    reserve for the escape check, then the check itself charged at one setup's price)."""

    def __init__(self, monitor, clock):
        self.monitor, self.clock = monitor, clock
        self.asked = self.taken = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step < 30 or step % 5:
            return
        self.asked += 1
        if not self.monitor.can_afford_snapshot(trainer):
            return
        snapshot = self.monitor.measure(trainer, pl_module, reason="stall",
                                        reserve_seconds=self.monitor.estimate_seconds())
        if "skipped" in snapshot:
            return
        self.taken += 1
        assert snapshot["hessian_trace"] is None and "hessian_trace" not in snapshot["n_hvp_parts"]  # not asked
        if self.monitor.can_afford(trainer, self.monitor.estimate_seconds()):
            with self.monitor.charged(step, "escape"):
                self.clock.advance(SETUP_SECONDS)


def charge_windows(charges, steps, width):
    """The seconds charged in each window of ``width`` steps (a merged entry counts at its last step)."""
    spent = np.zeros(steps + 1)
    for charge in charges:
        spent[charge["step"]] += charge["seconds"]
    return [spent[a:a + width].sum() for a in range(0, steps + 1 - width + 1)]


def test_any_window_of_100_steps_stays_within_the_budget_plus_one_bucket(tmp_path, priced):
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced)
    storm = StallStorm(monitor, priced)
    pl.seed_everything(0)
    # planned for 1000 steps (its 5% covers a first estimate: it is lent), ended at 400 as early stopping would
    trainer = make_trainer(tmp_path, [ClockSteps(priced), monitor, storm, stop_after(400)], max_steps=1000)
    trainer.fit(LinearRegression(), _loader())
    # the cost model is exact here: one setup, then 0.004 s a product (Lanczos bookkeeping takes no fake time)
    assert monitor.estimate_seconds(10) == pytest.approx(SETUP_SECONDS + 10 * PRODUCT_SECONDS)
    capacity = 5 * SETUP_SECONDS + 40 * PRODUCT_SECONDS  # five setups and burst_hvp = 40 products
    assert monitor.capacity() == pytest.approx(capacity)
    # every charge is in the ledger (snapshots, stall snapshots and escape checks), and the ledger is the spend
    assert sum(c["seconds"] for c in monitor.charges) == pytest.approx(monitor.monitor_seconds)
    assert {c["what"] for c in monitor.charges} == {"scheduled", "stall", "escape"}
    # 100 steps are 10 s of training: 0.5 s of budget, plus at most one bucket's burst (estimates never overran)
    windows = charge_windows(monitor.charges, 400, 100)
    assert max(windows) <= 0.05 * 100 * STEP_SECONDS + capacity + 1e-9
    assert min(c["balance"] for c in monitor.charges) >= -1e-9
    # the full bucket at the start is lent: the earnings repay it before they refill the bucket, so up to any step
    # the fit has spent at most max(5% of its training time, the first snapshot (taken before the bucket's size
    # is known) and one bucket), and over the whole fit only its 5%
    spent = np.cumsum([c["seconds"] for c in monitor.charges])
    first = monitor.charges[0]["seconds"]
    for charge, total in zip(monitor.charges, spent):
        trained = (charge["step"] + 1) * STEP_SECONDS  # the step's batch has started: its 0.1 s are on the clock
        assert total <= max(0.05 * trained, first + capacity) + 1e-9
    assert monitor.monitor_seconds <= 0.05 * 400 * STEP_SECONDS + 1e-9
    # the storm asked for far more than that: a stall snapshot runs only when the bucket holds the stall reserve
    # (0.12 s), and the bucket earns 0.005 s a step, so most requests were refused
    assert storm.asked == 75 and 10 <= storm.taken < storm.asked // 2
    # lambda_max was measured throughout (the storm's snapshots starve the schedule, and measure it themselves);
    # refreshes are paid from earned credit only, so the second scheduled one waits for the loan to be repaid
    reasons = [h["reason"] for h in monitor.history]
    assert reasons[0] == "scheduled" and "stall" in reasons
    assert max(h["step"] for h in monitor.history) > 370
    exact = np.linalg.eigvalsh(_hessian(slice(0, BATCH)))
    for h in monitor.history:
        assert h["lambda_max"] == pytest.approx(exact[-1], rel=1e-3)


def test_stall_snapshot_takes_what_the_bucket_holds_lambda_max_first_then_a_short_lambda_min(tmp_path, priced):
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced, max_hvp=40)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [ClockSteps(priced), monitor, stop_after(3)], max_steps=1000)
    trainer.fit(LinearRegression(), _loader())
    module = trainer.lightning_module
    monitor.measure(trainer, module, budgeted=False)  # a second timing: the first carries one-time costs
    monitor._tokens = SETUP_SECONDS + 12 * PRODUCT_SECONDS  # credit for one setup and 12 products
    before = priced.now
    snapshot = monitor.measure(trainer, module, reason="stall")
    # batch sharpness (1), then lambda_max within half of the other 11, lambda_min with the rest, no trace
    parts = snapshot["n_hvp_parts"]
    assert parts["batch_sharpness"] == 1 and parts["lambda_max"] <= 5
    assert parts["lambda_max"] + parts["lambda_min"] <= 11 and "hessian_trace" not in parts
    assert snapshot["n_hvp"] == sum(parts.values())
    assert snapshot["seconds"] == pytest.approx(priced.now - before)
    assert snapshot["seconds"] == pytest.approx(SETUP_SECONDS + snapshot["n_hvp"] * PRODUCT_SECONDS)
    assert monitor.charges[-1] == {"step": 3, "what": "stall", "seconds": snapshot["seconds"],
                                   "n_hvp": snapshot["n_hvp"], "balance": pytest.approx(0.0, abs=1e-9)
                                   if snapshot["n_hvp"] == 12 else monitor.charges[-1]["balance"]}
    assert monitor.budget_balance() >= -1e-9
    # a 5-parameter model: a Krylov space of 5 dimensions holds the exact extreme eigenvalues
    exact = np.linalg.eigvalsh(_hessian(slice(0, BATCH)))
    assert snapshot["lambda_min"] == pytest.approx(exact[0], rel=1e-3)
    # now the bucket is empty: the next stall snapshot is refused, and says why
    assert not monitor.can_afford_snapshot(trainer)
    assert monitor.measure(trainer, module, reason="stall")["skipped"] == "over budget"


class OneProcessTrainer:
    """What the monitor's scheduling asks of a Trainer, for one process: broadcast returns its object."""

    class strategy:
        @staticmethod
        def broadcast(obj, src=0):
            return obj

    optimizers, loggers = [], []


def test_the_next_refresh_waits_for_its_estimated_cost_above_the_stall_reserve(priced):
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced)
    monitor._train_started, monitor._steps_at_start = priced.now - 10.0, 0  # 10 s over 100 steps, all training
    monitor._setup_seconds, monitor._product_seconds = 0.01, 0.001
    monitor._part_hvp = {"lambda_max": 5}
    monitor._tokens, monitor._credit_train = 0.03, 10.0
    monitor._fit_scheduled = 1  # the next one is a refresh (lambda_min and the trace come every 4th)
    monitor._plan_next(OneProcessTrainer(), step=100)
    # reserve: 2 setups + 20 products = 0.04 s; the refresh: 1 setup + (5 + 1 batch) products = 0.016 s;
    # the bucket holds 0.03 s and earns 0.05 * 0.1 = 0.005 s a step -> (0.056 - 0.03) / 0.005 = 5.2 -> 6 steps
    assert monitor._next_step == 106
    assert monitor.estimated_seconds == pytest.approx(0.016)
    assert monitor.capacity() == pytest.approx(0.04 + 3 * 0.01 + 20 * 0.001)


def test_a_200_step_run_at_the_defaults_takes_no_estimate_and_says_why_with_the_numbers(tmp_path):
    monitor = HessianMonitor()  # adaptive, 5% budget, real clock
    pl.seed_everything(0)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    with pytest.warns(UserWarning, match="took no curvature estimate in 200 steps") as caught:
        make_trainer(tmp_path, [monitor], max_steps=200, logger=logger).fit(LinearRegression(), _loader())
    assert sum("curvature estimate" in str(w.message) for w in caught) == 1
    # and where its empty curvature charts are looked at: a TensorBoard text panel, read back from the event file
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    accumulator.Reload()
    (note,) = accumulator.Tensors(f"{CURVATURE_NOTE_TAG}/text_summary")
    assert note.step == 200 and note.tensor_proto.string_val[0].decode() == monitor.summary().removeprefix("optdiag: ")
    # a cold lambda_max over two probe batches is priced at 2 * (1 + 1.5 * 20) = 62 training steps; this run's 5%
    # is 10 steps' time, so the first estimate waits for its earnings (step 2 + 62 / 0.05 = 1242): never here
    assert monitor.first_estimate_price() == 62.0
    assert monitor.history == [] and monitor.monitor_seconds == 0.0
    summary = monitor.summary()
    assert "62 training steps" in summary and "200-step run's budget (0.05 of its steps: 10)" in summary
    assert "due at step 1242" in summary and "budget=0.31" in summary


def test_a_200_step_run_with_the_budget_its_summary_names_logs_lambda_max_from_step_2_within_its_bound(tmp_path):
    monitor = HessianMonitor(budget=0.31)  # what the default run's summary asks for (above)
    pl.seed_everything(0)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [monitor], max_steps=200, logger=logger, log_every_n_steps=1)
    trainer.fit(LinearRegression(), _loader())
    with open(Path(logger.log_dir) / "metrics.csv", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("optdiag/lambda_max")]
    exact = np.linalg.eigvalsh(_hessian(slice(0, 2 * BATCH)))
    # the first estimate as soon as the two probe batches are in (lent: 0.31 * 200 steps cover its 62); what
    # follows is what the budget pays for once the earnings have repaid the starting credit
    assert len(rows) >= 1
    assert int(rows[0]["step"]) == 2
    for row in rows:
        assert float(row["optdiag/lambda_max"]) == pytest.approx(exact[-1], rel=1e-3)
    first = monitor.charges[0]["seconds"]
    assert monitor.monitor_seconds <= max(0.31 * monitor._train_seconds(), first + monitor.capacity()) + 0.05


def test_the_first_estimate_is_lent_exactly_when_the_planned_run_pays_for_it(tmp_path, priced):
    # one probe batch: priced at 1 + 1.5 * 20 = 31 steps, so at 5% a fit planned for 620 steps or more is lent it
    for planned, lent in ((619, False), (620, True)):
        monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced)
        pl.seed_everything(0)
        trainer = make_trainer(tmp_path / str(planned), [ClockSteps(priced), monitor, stop_after(5)], max_steps=planned)
        trainer.fit(LinearRegression(), _loader())
        assert [h["step"] for h in monitor.history] == ([1] if lent else [])
        if not lent:  # due once its 31 steps are earned at 5%: 620 steps after the probe set is complete
            assert monitor._next_step == 1 + 620 and "due at step 621" in monitor.summary()


def test_a_fit_without_any_estimate_says_so_once(tmp_path):
    monitor = HessianMonitor(probe_batches=3)
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match="took no curvature estimate in 2 steps") as caught:
        make_trainer(tmp_path, [monitor], max_steps=2).fit(LinearRegression(), _loader())
    assert sum("curvature estimate" in str(w.message) for w in caught) == 1
    assert "probe set was never complete" in monitor.summary()


def test_scheduled_and_stall_lambda_min_at_one_step_are_logged_apart_and_labelled(tmp_path):
    class StallAtFour(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                monitor.measure(trainer, pl_module, reason="stall")

    monitor = HessianMonitor(every_n_steps=4, probe_batches=2, tol=1e-6)
    pl.seed_everything(0)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [monitor, StallAtFour()], max_steps=4, logger=logger, log_every_n_steps=1)
    trainer.fit(LinearRegression(), _loader())
    scheduled, stall = monitor.history
    assert (scheduled["step"], scheduled["reason"], stall["step"], stall["reason"]) == (4, "scheduled", 4, "stall")
    # the scheduled solve warm-starts from nothing (first); the stall's mixes the last eigenvector with a random one
    assert (scheduled["lambda_min_start"], stall["lambda_min_start"]) == ("cold", "mixed")
    for h in (scheduled, stall):
        assert h["probe_batches"] == 2 and h["n_hvp"] == sum(h["n_hvp_parts"].values())
    assert scheduled["hessian_trace"] is not None and stall["hessian_trace"] is None  # the trace only when asked
    with open(Path(logger.log_dir) / "metrics.csv", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step") == "4"]
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("optdiag/") and v}
    exact = np.linalg.eigvalsh(_hessian(slice(0, 2 * BATCH)))
    assert logged["optdiag/lambda_min"] == scheduled["lambda_min"] == pytest.approx(exact[0], rel=1e-4)
    assert logged["optdiag/stall/lambda_min"] == stall["lambda_min"] == pytest.approx(exact[0], rel=1e-4)
    assert logged["optdiag/stall/n_hvp"] == stall["n_hvp"]


def test_a_first_estimate_that_was_not_lent_waits_for_earnings_the_probe_losses_left(priced):
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced)  # priced at 31 training steps
    monitor._train_started, monitor._steps_at_start = priced.now - 100.0, 0  # 100 s over 1000 steps, all training
    # 0.1 s a step: the price is 3.1 s; the fit earned 5 s, of which the probe losses spent 2.5 s
    monitor._spent = 2.5
    priced.advance(2.5)  # the probe losses' seconds are on the clock too (the training clock excludes them)
    assert monitor._first_estimate_earned(OneProcessTrainer(), step=1000) is False
    # 0.6 s short at 0.005 s earned a step: 120 steps more
    assert monitor._next_step == 1000 + 120
    monitor._spent, priced.now = 1.0, priced.now - 1.5  # had they spent 1 s, the 4 s left would pay for it
    assert monitor._first_estimate_earned(OneProcessTrainer(), step=1000) is True


def test_before_any_snapshot_reads_borrow_the_planned_fits_budget_up_to_a_first_estimates_price(priced):
    # A short fit whose first estimate is not lent (its 5% is less than the estimate's price) has no bucket yet;
    # a spike in its first steps is still read on the model: work outside a snapshot borrows the planned fit's
    # budget, at most a first estimate's price, and the earnings repay it.
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced)  # a first estimate: 31 training steps
    monitor._train_started, monitor._steps_at_start = priced.now - 1.0, 0  # 1 s over 10 steps, all training
    trainer = OneProcessTrainer()
    trainer.global_step = 10
    monitor._run_steps = 300  # planned: its 5% is 15 steps' time (1.5 s), less than the estimate's 3.1 s
    assert monitor._extra_loan(trainer) == pytest.approx(1.5)  # earned so far: 0.05 s
    assert monitor.can_afford_extra(trainer, 1.499) and not monitor.can_afford_extra(trainer, 1.501)
    monitor._spent = 1.4
    priced.advance(1.4)  # reads took 1.4 s of the loan (on the clock too: the training clock excludes them)
    assert monitor.can_afford_extra(trainer, 0.099) and not monitor.can_afford_extra(trainer, 0.101)
    monitor._run_steps = None  # a fit of unknown length: lent at most the estimate's price, 3.1 s
    assert monitor._extra_loan(trainer) == pytest.approx(3.1)
    assert monitor.can_afford_extra(trainer, 1.699) and not monitor.can_afford_extra(trainer, 1.701)
    trainer.global_step = 0  # before a step has been timed: nothing to lend by
    assert monitor._extra_loan(trainer) == 0.0 and not monitor.can_afford_extra(trainer, 0.01)
    monitor._spent, priced.now = 0.0, priced.now - 1.4
    trainer.global_step = 400  # 40 s over 400 steps: earned 2 s, more than the loan of a 300-step plan
    priced.advance(39.0)
    monitor._run_steps = 300
    assert monitor._extra_loan(trainer) == pytest.approx(1.5)
    assert monitor.can_afford_extra(trainer, 1.999) and not monitor.can_afford_extra(trainer, 2.001)


def test_steps_to_earn_spaces_work_at_the_fits_earning_rate(priced):
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=priced)
    monitor._train_started, monitor._steps_at_start = priced.now - 10.0, 0  # 10 s over 100 steps: 0.005 s a step
    trainer = OneProcessTrainer()
    assert monitor.steps_to_earn(trainer, 100, 0.012) == 3  # 2.4 steps of earnings, rounded up
    assert monitor.steps_to_earn(trainer, 100, 0.015) == 3  # exactly three, not four
    assert monitor.steps_to_earn(trainer, 100, None) == 0  # not priced yet
    fixed = HessianMonitor(every_n_steps=10, clock=priced)  # the user chose the cost: no clock decides
    fixed._train_started = priced.now - 10.0
    assert fixed.steps_to_earn(trainer, 100, 0.012) == 0


def test_work_the_clock_cannot_see_is_priced_above_zero_and_never_fails(tmp_path):
    """A clock too coarse to see the curvature work (here a fake one that moves with the training steps only) times
    every snapshot at 0 s: the products a bucket holds are its credit over their price, so that price is floored
    above zero, and training goes on with its estimates, without a warning (it once divided by zero)."""
    clock = FakeClock()
    monitor = HessianMonitor(budget=0.05, probe_batches=1, clock=clock)
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a hook that failed would warn
        make_trainer(tmp_path, [ClockSteps(clock), monitor, stop_after(12)], max_steps=10**6).fit(
            LinearRegression(), _loader())
    assert not [w for w in caught if "optdiag" in str(w.message)] and monitor.warning_counts == {}
    assert len(monitor.history) >= 5 and all(h.get("lambda_max") is not None for h in monitor.history)
    assert 0 < monitor._product_seconds < 1e-6


def test_a_noise_band_wider_than_floats_reach_is_left_unmeasured(monkeypatch):
    """Two nearly equal probe gradients put the noise scale's log standard error past what exp() can take: the band
    is then not measured (it once raised OverflowError and lost the whole snapshot)."""
    import optdiag.callbacks.hessian as hessian_module

    wide = type("Noise", (), {"b_simple": 2.0, "b_simple_log_stderr": 1e4})()
    monkeypatch.setattr(hessian_module, "gradient_noise_scale", lambda *args, **kwargs: wide)
    out = HessianMonitor()._pooled_noise_scale((16, 2, 1.0, 1.0))
    assert out == {"probe_noise_scale": 2.0}
