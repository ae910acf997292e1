"""HessianMonitor on real Trainers: exact answers on a linear least-squares problem, where H = 2 X^T X / n."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_models import RegressionDataModule, RegressionModule, make_trainer, models_for, regression_data
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor, lightning_loss
from optdiag.curvature.noise import gradient_noise_scale
from optdiag.errors import UsageError

N_FEATURES, BATCH = 4, 16


class LinearRegression(pl.LightningModule):
    """MSE of a linear model: its Hessian 2 [X 1]^T [X 1] / n does not depend on the weights."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False):
        super().__init__()
        self.lin = nn.Linear(N_FEATURES, 1)
        self.kind, self.lr, self.momentum, self.nesterov = optimizer, lr, momentum, nesterov

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.lin(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        p = self.parameters()
        return {
            "sgd": lambda: torch.optim.SGD(p, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov),
            "adam": lambda: torch.optim.Adam(p, lr=self.lr),
            "rmsprop": lambda: torch.optim.RMSprop(p, lr=self.lr),
            "adagrad": lambda: torch.optim.Adagrad(p, lr=self.lr),
        }[self.kind]()


def _data():
    return regression_data(n=128, in_features=N_FEATURES, seed=1)


def _loader():
    return DataLoader(_data(), batch_size=BATCH, shuffle=False)


def _hessian(rows: slice) -> np.ndarray:
    x = _data().tensors[0][rows].double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return (2 * design.T @ design / len(x)).numpy()


def _fit(tmp_path, monitor, module=None, steps=4, extra=(), **kwargs):
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor, *extra], max_steps=steps, **kwargs)
    trainer.fit(module or LinearRegression(), _loader())
    return trainer


def test_eigenvalues_and_trace_are_those_of_the_probe_union(tmp_path):
    monitor = HessianMonitor(every_n_steps=2, probe_batches=2, trace_hvp=15, tol=1e-6, max_hvp=5 * 3)
    _fit(tmp_path, monitor, steps=4)
    eig = np.linalg.eigvalsh(_hessian(slice(0, 2 * BATCH)))  # the first two batches are the probe set
    assert [h["step"] for h in monitor.history] == [2, 4]
    for h in monitor.history:
        assert h["lambda_max"] == pytest.approx(eig[-1], rel=1e-4)
        assert h["lambda_min"] == pytest.approx(eig[0], rel=1e-3)
        assert h["hessian_trace"] == pytest.approx(eig.sum(), rel=1e-4)  # Hutch++ with a full-rank sketch
        assert h["lambda_max_residual"] <= 1e-6 * abs(eig[-1]) * 10
        assert h["probe_batch_size"] == 2 * BATCH
    # the second snapshot starts from the first one's eigenvectors, and H did not change: far fewer products
    assert monitor.history[1]["n_hvp"] < monitor.history[0]["n_hvp"]
    assert set(monitor.last_eigenvectors) == {"LA", "SA"}


def _per_batch_gradients(module, rows_list):
    grads = []
    for rows in rows_list:
        x, y = (t[rows] for t in _data().tensors)
        module.zero_grad()
        nn.functional.mse_loss(module.lin(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1).double() for p in module.parameters()]))
    return grads


def test_batch_sharpness_probe_gradient_and_noise_match_dense_computation(tmp_path):
    monitor = HessianMonitor(every_n_steps=2, probe_batches=2)
    module = LinearRegression()
    _fit(tmp_path, monitor, module=module, steps=2)
    h = monitor.history[0]
    rows = [slice(0, BATCH), slice(BATCH, 2 * BATCH)]
    grads = _per_batch_gradients(module, rows)  # the module is at the parameters the snapshot saw
    sharp = np.mean([float(g @ torch.as_tensor(_hessian(r)) @ g / (g @ g)) for g, r in zip(grads, rows)])
    assert h["batch_sharpness"] == pytest.approx(sharp, rel=1e-4)
    mean = (grads[0] + grads[1]) / 2
    assert h["probe_grad_norm"] == pytest.approx(float(mean.norm()), rel=1e-5)
    noise = gradient_noise_scale(np.mean([float(g @ g) for g in grads]), float(mean @ mean), BATCH, 2 * BATCH)
    assert h["probe_grad_sq_unbiased"] == pytest.approx(noise.grad_sq_norm, rel=1e-4)
    assert h["grad_noise_trace"] == pytest.approx(noise.trace_sigma, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, threshold",
    [
        (dict(optimizer="sgd", lr=0.01), 200.0),
        (dict(optimizer="sgd", lr=0.01, momentum=0.9), 380.0),
        (dict(optimizer="sgd", lr=0.01, momentum=0.9, nesterov=True), 3.8 / 2.8 / 0.01),
        (dict(optimizer="adam", lr=0.01), 3800.0),
        (dict(optimizer="rmsprop", lr=0.01), 200.0),
        (dict(optimizer="adagrad", lr=0.01), None),
    ],
)
def test_stability_threshold_for_the_optimizer_in_use(tmp_path, kwargs, threshold):
    # Adam's and RMSprop's preconditioner is measured once it is estimated (51 and 230 steps at their defaults)
    steps = {"adam": 51, "rmsprop": 230}.get(kwargs["optimizer"], 1)
    monitor = HessianMonitor(every_n_steps=steps, probe_batches=1, trace_hvp=0, density_every=0, tol=1e-6)
    module = LinearRegression(**kwargs)
    _fit(tmp_path, monitor, module=module, steps=steps)
    h = monitor.history[0]
    if threshold is None:  # unknown optimizer: no number rather than a wrong one
        assert h["stability_threshold"] is None and h["stability_ratio"] is None
        return
    assert h["stability_threshold"] == pytest.approx(threshold, rel=1e-9)
    assert h["lr"] == 0.01
    if kwargs["optimizer"] in ("adam", "rmsprop"):
        opt = module.trainer.optimizers[0]
        if kwargs["optimizer"] == "adam":
            diag = [opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"])) for p in module.parameters()]
        else:
            diag = [opt.state[p]["square_avg"] for p in module.parameters()]
        p_inv_sqrt = 1 / (torch.cat([d.reshape(-1) for d in diag]).double().sqrt() + 1e-8).sqrt()
        dense = p_inv_sqrt[:, None] * torch.as_tensor(_hessian(slice(0, BATCH))) * p_inv_sqrt[None, :]
        expected = float(torch.linalg.eigvalsh(dense)[-1])
        assert h["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-4)
        assert h["stability_ratio"] == pytest.approx(expected / threshold, rel=1e-4)
    else:
        assert h["preconditioned_lambda_max"] is None
        assert h["stability_ratio"] == pytest.approx(h["lambda_max"] / threshold, rel=1e-12)


def test_measure_returns_the_contract_keys_and_logs_them(tmp_path):
    monitor = HessianMonitor(every_n_steps=1000)  # never scheduled in this run
    trainer = _fit(tmp_path, monitor, steps=2)
    result = monitor.measure(trainer, trainer.lightning_module, reason="stall")
    expected = {"step", "lambda_max", "lambda_max_residual", "lambda_min", "lambda_min_residual", "hessian_trace",
                "hessian_trace_stderr", "stability_threshold", "stability_ratio", "preconditioned_lambda_max",
                "batch_sharpness", "probe_loss", "probe_grad_norm", "probe_grad_sq_unbiased", "grad_noise_trace",
                "probe_batch_size", "lr", "momentum", "optimizer", "n_hvp", "seconds"}
    assert expected <= set(result)
    assert result["reason"] == "stall" and result["optimizer"].kind == "sgd"
    assert "optimizer" not in monitor.history[-1] and monitor.history[-1]["lambda_max"] == result["lambda_max"]


def test_probe_loss_is_the_training_step_loss_on_the_probe_set(tmp_path):
    monitor = HessianMonitor(every_n_steps=2, probe_batches=2, trace_hvp=0)
    module = LinearRegression()
    _fit(tmp_path, monitor, module=module, steps=2)
    x, y = (t[: 2 * BATCH] for t in _data().tensors)
    with torch.no_grad():
        assert monitor.history[0]["probe_loss"] == pytest.approx(float(nn.functional.mse_loss(module.lin(x), y)), rel=1e-5)


def test_probe_set_is_the_fixed_copies_or_the_current_batch(tmp_path):
    monitor = HessianMonitor(every_n_steps=100, probe_batches=2)
    assert monitor.probe_set() == []
    _fit(tmp_path, monitor, steps=3)
    x, y = _data().tensors
    batches = monitor.probe_set()
    assert len(batches) == 2 and batches is not monitor.probe_set()  # a new list each call
    for k, (bx, by) in enumerate(batches):
        assert torch.equal(bx, x[k * BATCH:(k + 1) * BATCH]) and torch.equal(by, y[k * BATCH:(k + 1) * BATCH])
    current = HessianMonitor(every_n_steps=100, probe="current")
    _fit(tmp_path, current, steps=3)
    ((cx, _),) = current.probe_set()
    assert torch.equal(cx, x[2 * BATCH:3 * BATCH])  # the third batch, the last one trained on


def test_model_without_double_backward_warns_once_and_keeps_gradient_monitoring(tmp_path):
    hessian, gradient = HessianMonitor(every_n_steps=1, hvp="exact"), GradientNormMonitor()
    trainer = make_trainer(tmp_path, [hessian, gradient], max_steps=4)
    with pytest.warns(UserWarning, match="switched off") as caught:
        trainer.fit(RegressionModule(activation="no_double_backward"), RegressionDataModule())
    assert sum("switched off" in str(w.message) for w in caught) == 1
    assert hessian.enabled is False and hessian.history == []
    assert len(gradient.history) == 4 and trainer.global_step == 4


def test_auto_takes_finite_differences_where_double_backward_fails_and_says_so_once(tmp_path, caplog):
    # the same network and training twice: a tanh without double backward (auto: finite differences) and torch's
    fd, exact = HessianMonitor(every_n_steps=2, tol=1e-6), HessianMonitor(every_n_steps=2, tol=1e-6)
    with caplog.at_level("INFO", logger="optdiag"):
        torch.manual_seed(0)
        make_trainer(tmp_path / "fd", [fd], max_steps=4).fit(RegressionModule(activation="no_double_backward"),
                                                             RegressionDataModule())
    torch.manual_seed(0)
    make_trainer(tmp_path / "exact", [exact], max_steps=4).fit(RegressionModule(), RegressionDataModule())
    assert (fd.hvp_method, exact.hvp_method) == ("finite_difference", "exact") and fd.enabled
    said = [r.getMessage() for r in caplog.records if "finite differences" in r.getMessage()]
    assert len(said) == 1 and "cannot be differentiated" in said[0] and "relative error about 1e-4" in said[0]
    assert [h["step"] for h in fd.history] == [h["step"] for h in exact.history] and fd.history
    for a, b in zip(fd.history, exact.history):
        assert a["hvp_method"] == "finite_difference" and b["hvp_method"] == "exact"
        assert 0 < a["hvp_relative_error"] < 1e-2 and b["hvp_relative_error"] is None
        assert a["lambda_max"] == pytest.approx(b["lambda_max"], rel=1e-3)
        assert a["lambda_min"] == pytest.approx(b["lambda_min"], rel=1e-2, abs=1e-3 * b["lambda_max"])
    with pytest.raises(UsageError, match="hvp must be one of"):
        HessianMonitor(hvp="double_backward")


class NaNAfter(LinearRegression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


def test_non_finite_loss_skips_the_snapshot_warns_once_and_counts(tmp_path):
    monitor = HessianMonitor(every_n_steps=1, probe_batches=1)
    with pytest.warns(UserWarning, match="skipped") as caught:
        _fit(tmp_path, monitor, module=NaNAfter(), steps=5)
    assert sum("skipped" in str(w.message) for w in caught) == 1
    assert [h["step"] for h in monitor.history] == [1]  # measured before the loss turned NaN at step 2
    assert monitor.warning_counts["non-finite"] == 4  # steps 2, 3, 4, 5 skipped


def test_loss_from_optdiag_loss_or_training_step_dict():
    class WithOwnLoss(nn.Module):
        def optdiag_loss(self, batch):
            return torch.tensor(3.0)

    assert float(lightning_loss(WithOwnLoss(), None)) == 3.0
    module = RegressionModule(return_dict=True)
    x, y = regression_data(8).tensors
    assert float(lightning_loss(module, (x, y))) == pytest.approx(float(nn.functional.mse_loss(module(x), y)))
    assert "log" not in module.__dict__  # logging patched only for the call


def test_manual_optimization_needs_a_loss_function(tmp_path):
    m = models_for()
    monitor = HessianMonitor(every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.warns(UserWarning, match="manual optimization"):
        trainer.fit(m.ManualRegressionModule(), m.RegressionDataModule())
    assert monitor.history == []

    def loss_fn(module, batch):
        return nn.functional.mse_loss(module(batch[0]), batch[1])

    monitor = HessianMonitor(every_n_steps=1, loss_fn=loss_fn, probe_batches=1)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(m.ManualRegressionModule(), m.RegressionDataModule())
    assert [h["step"] for h in monitor.history] == [1, 2]


def test_current_batch_probe(tmp_path):
    monitor = HessianMonitor(every_n_steps=3, probe="current", tol=1e-6)
    _fit(tmp_path, monitor, steps=3)
    eig = np.linalg.eigvalsh(_hessian(slice(2 * BATCH, 3 * BATCH)))  # the third batch
    assert monitor.history[0]["lambda_max"] == pytest.approx(eig[-1], rel=1e-4)


def test_resumed_run_continues_its_history(tmp_path):
    first = HessianMonitor(every_n_steps=2, probe_batches=1, trace_hvp=0)
    _fit(tmp_path, first, steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")
    resumed = HessianMonitor(every_n_steps=2, probe_batches=1, trace_hvp=0)
    pl.seed_everything(0)
    make_trainer(tmp_path, [resumed], max_steps=4).fit(LinearRegression(), _loader(), ckpt_path=str(ckpt))
    assert [h["step"] for h in resumed.history] == [2, 4]
    assert resumed.history[0]["lambda_max"] == first.history[0]["lambda_max"]


@pytest.mark.parametrize(
    "kwargs",
    [{"every_n_steps": 0}, {"budget": 0}, {"budget": 1.5}, {"probe": "random"}, {"mode": "test"},
     {"probe_batches": 0}, {"trace_hvp": 2}, {"loss_fn": 3}, {"tol": 0}],
)
def test_bad_arguments_are_refused_with_the_name(kwargs):
    with pytest.raises(UsageError, match=next(iter(kwargs))):
        HessianMonitor(**kwargs)


def test_state_key_tells_configurations_apart():
    assert HessianMonitor(every_n_steps=5).state_key != HessianMonitor(every_n_steps=10).state_key
    assert HessianMonitor().state_key.startswith("HessianMonitor")


def _fake_trainer(strategy_name, **attributes):
    return type("T", (), {"strategy": type(strategy_name, (), attributes)()})()


def test_unsupported_strategy_is_refused_at_setup():
    for refused in ("DeepSpeedStrategy", "XLAFSDPStrategy"):  # ZeRO's flat buffers; XLA's FSDP
        with pytest.raises(UsageError, match=f"{refused}.*ModelParallelStrategy"):
            HessianMonitor().setup(_fake_trainer(refused), None, "fit")
    # FSDP1 only with the original parameters and disjoint shards (tests/test_fsdp1.py runs the supported case)
    for orig, sharding in ((False, "FULL_SHARD"), (True, "NO_SHARD"), (True, "HYBRID_SHARD")):
        trainer = _fake_trainer("FSDPStrategy", kwargs={"use_orig_params": orig},
                                sharding_strategy=type("S", (), {"name": sharding})())
        with pytest.raises(UsageError, match=f"use_orig_params={orig} and {sharding}"):
            HessianMonitor().setup(trainer, None, "fit")
    for sharding in ("FULL_SHARD", "SHARD_GRAD_OP"):
        HessianMonitor().setup(_fake_trainer("FSDPStrategy", kwargs={"use_orig_params": True},
                                             sharding_strategy=type("S", (), {"name": sharding})()), None, "fit")
    # FSDP2 through ModelParallelStrategy is supported (tests/test_fsdp.py)
    HessianMonitor().setup(_fake_trainer("ModelParallelStrategy"), None, "fit")


N_SADDLE = 40
SADDLE_EIGENVALUES = torch.cat([torch.tensor([-1.0]), torch.linspace(0.5, 10.0, N_SADDLE - 1)])


class Saddle(pl.LightningModule):
    """``1/2 sum_i lambda_i p_i^2``: its Hessian is diag(-1, 0.5 ... 10) everywhere."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(N_SADDLE))

    def training_step(self, batch, batch_idx):
        return 0.5 * (SADDLE_EIGENVALUES * self.p**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


@pytest.mark.parametrize("reason, start", [("scheduled", "warm"), ("stall", "mixed")])
def test_a_stall_snapshot_finds_negative_curvature_a_stale_warm_start_misses(tmp_path, reason, start):
    from optdiag.curvature.lanczos import EigenResult

    monitor = HessianMonitor(every_n_steps=1000, probe_batches=1, max_hvp=10)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=1)
    module = Saddle()
    trainer.fit(module, DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=8))
    # the last lambda_min eigenvector, from before the stall: nothing along the new negative direction e_0
    stale = torch.randn(N_SADDLE, generator=torch.Generator().manual_seed(5))
    stale[0] = 0.0
    stale = stale / stale.norm()
    monitor.last_eigenvectors["SA"] = EigenResult(torch.tensor([1.0]), stale[None], torch.tensor([0.0]), True, 1,
                                                  "SA", 1.0)
    snapshot = monitor.measure(trainer, module, reason=reason)
    assert snapshot["lambda_min_start"] == start and snapshot["n_hvp_parts"]["lambda_min"] == 10
    if start == "warm":  # its random share is 1% of the start: 10 products do not reach e_0, lambda_min looks > 0
        assert snapshot["lambda_min"] > 0
    else:  # half the start is random: the saddle's -1 is found within the same 10 products
        assert snapshot["lambda_min"] == pytest.approx(-1.0, abs=1e-3)
