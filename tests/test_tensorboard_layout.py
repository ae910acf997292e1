"""The custom-scalars layout against a real run with ``OptDiag()`` defaults, read back from the event files: every
chart has data, and the margin charts' bands are the Lanczos residual bound and the pooled noise scale's error."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import optdiag
from lightning_models import RegressionDataModule, RegressionModule, make_trainer, stop_after
from optdiag.callbacks.hessian import NOISE_POOL
from optdiag.sinks.tensorboard import LAYOUT, MARGIN_CHARTS
from test_budget import ClockSteps, FakeClock, price_hessian_work

STEPS, STEP_SECONDS = 100, 0.5


class SlowSteps(ClockSteps):
    """Half a second of training per batch on the injected clock."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.advance(STEP_SECONDS)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """100 steps with ``OptDiag()`` as it comes, of a fit planned long enough for its 5% to pay for a first
    estimate (a 100-step plan would take none, and say why: tests/test_budget.py), ended early. The budget is a share
    of the training time, and how many snapshots it admits depends on the machine (two in 300 steps on a loaded CI
    core, where building a probe batch's operator costs more than a training step). The injected clock prices the work as for a model whose step takes half a
    second (test_budget's prices for the Hessian work), so the default schedule runs its course in a short test:
    refreshes, lambda_min and the trace every fourth snapshot."""
    tmp_path = tmp_path_factory.mktemp("defaults")
    priced = FakeClock()
    pl.seed_everything(0)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    callback = optdiag.OptDiag()
    callback.hessian_monitor.clock = priced
    trainer = make_trainer(tmp_path, [SlowSteps(priced), callback, stop_after(STEPS)], max_steps=100 * STEPS,
                           logger=logger)
    with pytest.MonkeyPatch.context() as patch:
        price_hessian_work(priced, patch)
        trainer.fit(RegressionModule(), RegressionDataModule())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator, callback


def _layout(accumulator) -> layout_pb2.Layout:
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return layout


def test_every_chart_in_the_layout_has_data_on_a_run_with_the_defaults(default_run):
    accumulator, callback = default_run
    scalars = {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
    layout = _layout(accumulator)
    margins, lines = {}, {}
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                (series,) = chart.margin.series
                margins[chart.title] = (series.value, series.lower, series.upper)
                for tag in margins[chart.title]:  # a band needs all three
                    assert scalars.get(tag), f"margin chart {chart.title!r}: no values for {tag}"
            else:
                lines[chart.title] = list(chart.multiline.tag)
                drawn = [t for t in scalars if any(re.search(p, t) for p in chart.multiline.tag)]
                assert drawn, f"chart {chart.title!r} matches no logged tag"
    assert margins == {title: tags for charts in MARGIN_CHARTS.values() for title, tags in charts.items()}
    assert lines == {title: tags for charts in LAYOUT.values() for title, tags in charts.items()}
    full = [h for h in callback.hessian_monitor.history if h["lambda_min"] is not None]
    assert full and any(h["hessian_trace"] is not None for h in full)  # the run got its full snapshots


def test_lambda_max_band_is_the_residual_bound(default_run):
    accumulator, callback = default_run
    history = [h for h in callback.hessian_monitor.history if h["reason"] == "scheduled"]
    assert len(history) >= 4
    value, lower, upper = (accumulator.Scalars(f"optdiag/lambda_max{s}") for s in ("", "_lower", "_upper"))
    assert [e.step for e in value] == [e.step for e in lower] == [e.step for e in upper] == [h["step"] for h in history]
    for h, v, lo, hi in zip(history, value, lower, upper):
        assert lo.value == pytest.approx(h["lambda_max"] - h["lambda_max_residual"], rel=1e-6)  # float32 on disk
        assert hi.value == pytest.approx(h["lambda_max"] + h["lambda_max_residual"], rel=1e-6)
        assert lo.value <= v.value <= hi.value


def test_noise_scale_is_pooled_over_the_last_snapshots_with_its_standard_error(default_run):
    _, callback = default_run
    history = callback.hessian_monitor.history
    assert len(history) >= 3
    for i, h in enumerate(history):
        pool = history[max(0, i + 1 - NOISE_POOL): i + 1]  # one probe measurement per snapshot, same batch sizes
        trace = np.array([p["grad_noise_trace"] for p in pool])
        grad_sq = np.array([p["probe_grad_sq_unbiased"] for p in pool])
        assert (trace > 0).all()  # never clamped here, so the history holds the raw estimates
        if grad_sq.mean() <= 0:  # |G|^2 is unbiased and may come out negative: no finite positive scale then
            assert h["probe_noise_scale"] is None
            continue
        expected = trace.mean() / grad_sq.mean()  # the ratio of the means, never the mean of the ratios
        assert h["probe_noise_scale"] == pytest.approx(expected, rel=1e-9)
        if len(pool) == 1:  # one measurement has no spread: no band
            assert h["probe_noise_scale_lower"] is None and h["probe_noise_scale_upper"] is None
            continue
        z = trace / trace.mean() - grad_sq / grad_sq.mean()  # the delta method for log(T / G), per snapshot
        log_se = z.std(ddof=1) / math.sqrt(len(z))
        assert h["probe_noise_scale_lower"] == pytest.approx(expected * math.exp(-log_se), rel=1e-9)
        assert h["probe_noise_scale_upper"] == pytest.approx(expected * math.exp(log_se), rel=1e-9)
