"""Both Lightning namespaces: one callback class serves pytorch_lightning.Trainer and lightning.pytorch.Trainer."""

from __future__ import annotations

import sys

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
from lightning.pytorch.cli import LightningCLI

from lightning_models import NAMESPACES, make_trainer, models_for
import optdiag
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor


def test_the_callbacks_are_callbacks_of_both_namespaces():
    for cls in (GradientNormMonitor, HessianMonitor):
        assert issubclass(cls, pl.Callback) and issubclass(cls, L.Callback)
    assert optdiag.HessianMonitor is HessianMonitor and optdiag.GradientNormMonitor is GradientNormMonitor


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_both_trainers_run_the_monitors_and_checkpoint_their_state(tmp_path, namespace):
    m = models_for(namespace)
    gradient, hessian = GradientNormMonitor(), HessianMonitor(every_n_steps=2, probe_batches=1, trace_hvp=0)
    trainer = make_trainer(tmp_path, [gradient, hessian], namespace=namespace, max_steps=2)
    trainer.fit(m.RegressionModule(), m.RegressionDataModule())
    assert len(gradient.history) == 2 and [h["step"] for h in hessian.history] == [2]
    state = trainer._checkpoint_connector.dump_checkpoint()["callbacks"]
    assert state[gradient.state_key]["history"] == gradient.history
    assert state[hessian.state_key]["history"][0]["lambda_max"] == hessian.history[0]["lambda_max"]


class _Model(models_for("lightning.pytorch").RegressionModule):
    pass


class _Data(models_for("lightning.pytorch").RegressionDataModule):
    pass


def test_lightning_cli_adds_the_monitor_by_class_path(tmp_path, monkeypatch):
    argv = [
        "prog", "fit",
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.callbacks+=optdiag.HessianMonitor", "--trainer.callbacks.every_n_steps=1",
        "--trainer.callbacks.probe_batches=1",
        "--trainer.callbacks+=optdiag.GradientNormMonitor",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    cli = LightningCLI(_Model, _Data, save_config_kwargs={"overwrite": True})
    hessian = [cb for cb in cli.trainer.callbacks if isinstance(cb, HessianMonitor)]
    gradient = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientNormMonitor)]
    assert len(hessian) == 1 and hessian[0].every_n_steps == 1 and len(gradient) == 1
    assert [h["step"] for h in hessian[0].history] == [1, 2]
    assert len(gradient[0].history) == 2
