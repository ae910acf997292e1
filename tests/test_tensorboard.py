"""TensorBoard: scalars, the custom-scalars layout, density figures and gradient histograms, read back from disk."""

from __future__ import annotations

import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_models import RegressionDataModule, RegressionModule, make_trainer
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.sinks.tensorboard import LAYOUT, MARGIN_CHARTS


def _events(tmp_path):
    pl.seed_everything(0)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    gradient = GradientNormMonitor(histogram_every_n_steps=2)
    hessian = HessianMonitor(every_n_steps=2, probe_batches=1, density_every=2, trace_hvp=6)
    trainer = make_trainer(tmp_path, [gradient, hessian], max_steps=4, logger=logger)
    trainer.fit(RegressionModule(), RegressionDataModule())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator, hessian


def test_everything_lands_in_the_event_files(tmp_path):
    acc, hessian = _events(tmp_path)
    tags = acc.Tags()
    for name in ("grad_norm", "net.0/grad_norm", "update_ratio", "lambda_max", "lambda_min", "hessian_trace",
                 "stability_threshold", "stability_ratio", "batch_sharpness", "hvp_count"):
        assert f"optdiag/{name}" in tags["scalars"], name
    assert [e.step for e in acc.Scalars("optdiag/lambda_max")] == [2, 4]
    for event, snapshot in zip(acc.Scalars("optdiag/lambda_max"), hessian.history, strict=True):
        assert abs(event.value - snapshot["lambda_max"]) <= 1e-6 * abs(snapshot["lambda_max"])  # float32 on disk
    assert [e.step for e in acc.Scalars("optdiag/grad_norm")] == [0, 1, 2, 3]

    # density figure at every second snapshot (the first one included), per-layer histograms every 2 steps
    assert [e.step for e in acc.Images("optdiag/spectral_density")] == [2]
    assert {"optdiag/net.0/grad", "optdiag/net.2/grad"} <= set(tags["histograms"])
    assert [e.step for e in acc.Histograms("optdiag/net.0/grad")] == [0, 2]


def test_custom_scalars_layout_is_registered_once_and_matches_the_logged_tags(tmp_path):
    acc, _ = _events(tmp_path)
    (event,) = acc.Tensors("custom_scalars__config__")  # written exactly once
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart if not c.HasField("margin")}
              for cat in layout.category}
    assert charts == LAYOUT
    margins = {cat.title: {c.title: tuple((s.value, s.lower, s.upper) for s in c.margin.series)[0]
                           for c in cat.chart if c.HasField("margin")} for cat in layout.category}
    assert {cat: charts for cat, charts in margins.items() if charts} == MARGIN_CHARTS
    curvature = charts["optdiag: Curvature"]["lambda_max vs stability threshold"]
    scalar_tags = acc.Tags()["scalars"]
    for wanted in ("optdiag/lambda_max", "optdiag/stability_threshold"):  # drawn together in one chart
        assert any(re.fullmatch(pattern.rstrip("$"), wanted) for pattern in curvature)
    per_layer = charts["optdiag: Gradients"]["per-layer gradient norms"][0]
    assert {t for t in scalar_tags if re.search(per_layer, t)} == {"optdiag/net.0/grad_norm", "optdiag/net.2/grad_norm"}


class Exploding(pl.LightningModule):
    """loss = w^2 with SGD at lr 50: w <- -99 w, so the gradient 2 w grows 99-fold per step. It passes TensorBoard's
    default histogram range (1e20) at step 10, is still finite at step 19 (2 * 99^19 = 1.7e38 < float32 max) and
    overflows to Inf at step 20, NaN after."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0]))

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=50.0)


def test_histograms_of_huge_and_non_finite_gradients_never_fail(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    monitor = GradientNormMonitor(histogram_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=24, logger=logger)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(24, 1)), batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Exploding(), loader)
    messages = [str(w.message) for w in caught if "optdiag" in str(w.message)]
    assert not any("failed and was skipped" in m for m in messages), messages  # no "The histogram is empty"
    assert sum("histograms of optdiag/w/grad skipped at step 20" in m for m in messages) == 1  # warned once ...
    assert monitor.warning_counts["non-finite-histogram"] == 4  # ... and counted: steps 20 (Inf) to 23 (NaN)
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    accumulator.Reload()
    events = accumulator.Histograms("optdiag/w/grad")
    assert [e.step for e in events] == list(range(20))  # every finite gradient, beyond 1e20 too
    for event in events:
        expected = 2 * (-99.0) ** event.step
        assert event.histogram_value.min == pytest.approx(expected, rel=1e-5)
        assert event.histogram_value.num == 1
