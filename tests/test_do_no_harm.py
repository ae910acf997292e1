"""Do no harm: training with the monitors ends bit for bit where training without them ends (CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_models import models_for, make_trainer, stop_after
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor


def _mse(module, batch):
    return nn.functional.mse_loss(module(batch[0]), batch[1])


def _run(tmp_path, with_monitors: bool, module_kwargs: dict, manual: bool = False, **trainer_kwargs):
    m = models_for("pytorch_lightning")
    pl.seed_everything(123)
    callbacks = []
    root = tmp_path / str(with_monitors)
    if with_monitors:
        loss_fn = _mse if manual else None
        callbacks = [
            GradientNormMonitor(histogram_every_n_steps=1),
            HessianMonitor(every_n_steps=2, probe_batches=2, density_every=1, loss_fn=loss_fn),
            HessianMonitor(budget=1.0, probe_batches=1, loss_fn=loss_fn),  # adaptive: budgeted refreshes
            # finite-difference products: gradients at moved parameters, never written into the model
            HessianMonitor(every_n_steps=2, probe_batches=1, trace_hvp=0, density_every=0, loss_fn=loss_fn,
                           hvp="finite_difference"),
        ]
        # TensorBoard: the histograms and the densities (drawn only there) run as well
        trainer_kwargs["logger"] = pl.loggers.TensorBoardLogger(str(root), name="tb")
    module = (m.ManualRegressionModule if manual else m.RegressionModule)(**module_kwargs)
    # planned long, ended after 4 steps: the adaptive monitor is lent its first estimate (a 4-step plan is not)
    trainer = make_trainer(root, callbacks + [stop_after(4)], max_steps=1000, deterministic=False, **trainer_kwargs)
    trainer.fit(module, m.RegressionDataModule(batch_size=16))
    optimizer_state = trainer.optimizers[0].state_dict()
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    if with_monitors:
        assert callbacks[1].history, "the Hessian monitor must actually have run"
        assert callbacks[1].last_density is not None and callbacks[0].history
        assert callbacks[2].estimated_seconds is not None  # whether its snapshots came within 4 steps is timing
        assert callbacks[3].history and callbacks[3].hvp_method == "finite_difference"
    return module.state_dict(), optimizer_state, rngs


def _assert_identical(a, b):
    weights_a, opt_a, rng_a = a
    weights_b, opt_b, rng_b = b
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), f"{key} differs"
    for pid, state in opt_a["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_b["state"][pid][name]), f"optimizer state {name} differs"
    assert torch.equal(rng_a[0], rng_b[0]) and np.array_equal(rng_a[1], rng_b[1]) and rng_a[2] == rng_b[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "module_kwargs, trainer_kwargs",
    [
        (dict(optimizer="sgd", lr=0.05, momentum=0.9, dropout=0.3), {}),
        (dict(optimizer="adam", lr=0.01, batchnorm=True), dict(accumulate_grad_batches=2, gradient_clip_val=0.5)),
        (dict(optimizer="sgd", lr=0.05, momentum=0.9, dropout=0.2), dict(precision="bf16-mixed")),
    ],
    ids=["sgd-momentum-dropout", "adam-batchnorm-accumulate-clip", "bf16-mixed"],
)
def test_weights_optimizer_state_and_rngs_are_bitwise_identical(tmp_path, module_kwargs, trainer_kwargs):
    without = _run(tmp_path, False, module_kwargs, **trainer_kwargs)
    with_monitors = _run(tmp_path, True, module_kwargs, **trainer_kwargs)
    _assert_identical(without, with_monitors)


@pytest.mark.slow
def test_manual_optimization_is_untouched(tmp_path):
    kwargs = dict(optimizer="sgd", lr=0.05, momentum=0.9, dropout=0.3)
    _assert_identical(_run(tmp_path, False, kwargs, manual=True), _run(tmp_path, True, kwargs, manual=True))
