"""Forward-only sharpness along the update (optdiag.curvature.critical): exact on quadratics, against dense
Hessians on small nets, bitwise harmless, never raising on non-finite losses, logged by HessianMonitor and charged
to its budget in forwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import optdiag
from lightning_models import make_trainer
from optdiag.callbacks import _critical as critical_glue
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.curvature.critical import MAX_EVALS, CriticalSharpnessResult, critical_sharpness, line_sharpness
from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.params import flatten, unflatten
from optdiag.diagnosis.evidence import Evidence
from optdiag.errors import UsageError
from test_budget import PRODUCT_SECONDS, SETUP_SECONDS, ClockSteps, priced  # noqa: F401 - priced is a fixture
from test_hessian_monitor import BATCH, LinearRegression, _data, _hessian

F64_EPS = float(torch.finfo(torch.float64).eps)


# ----------------------------------------------------------------------------------------------------------------
# Quadratics: L(theta) = 1/2 theta^T A theta - b^T theta, so phi(t) is exactly quadratic in t


class Quadratic(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.a, self.b = a, b
        self.theta = nn.Parameter(theta.clone())

    def loss(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta - self.b @ self.theta


def _quadratic(n=6, seed=0, eigenvalues=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0.5, 10.0, n, dtype=torch.float64) if eigenvalues is None else eigenvalues
    a = (q * lam) @ q.T
    b, theta = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    model = Quadratic(a.to(dtype), b.to(dtype), theta.to(dtype))
    return model, a, b, theta


def _quadratic_loss(model, batch):
    return model.loss()


BATCH_ONE = torch.zeros(1, 1)


@pytest.mark.parametrize("lr", [1e-3, 0.05, 0.15, 1.0])
def test_an_sgd_step_on_a_quadratic_gives_the_exact_curvature_and_largest_stable_lr_2_over_it(lr):
    model, a, b, theta = _quadratic()
    g = a @ theta - b
    u = -lr * g
    kappa = float(u @ a @ u / (u @ u))
    r = critical_sharpness(model, _quadratic_loss, BATCH_ONE, u, lr=lr)
    assert r.available and r.reason is None
    assert r.directional_curvature == pytest.approx(kappa, rel=1e-6)
    assert r.slope == pytest.approx(float(g @ u), rel=1e-6)
    assert r.second_derivative == pytest.approx(float(u @ a @ u), rel=1e-6)
    # along -lr g: the loss is back at phi(0) after a step of lr = 2 / kappa (the classical limit), so the critical
    # sharpness is the curvature along the gradient and the ratio lr / critical lr is lr kappa / 2
    assert r.critical_lr == pytest.approx(2 / kappa, rel=1e-6)
    assert r.critical_sharpness == pytest.approx(kappa, rel=1e-6)
    assert r.lr_ratio == pytest.approx(lr * kappa / 2, rel=1e-6)
    assert r.critical_step == pytest.approx(2 / (lr * kappa), rel=1e-6)
    assert r.loss_at_critical_step == pytest.approx(r.loss, rel=1e-9, abs=1e-12)
    assert r.fit_residual < 1e-6 and r.directional_curvature_stderr < 1e-6 * kappa
    assert 5 <= r.n_evals <= MAX_EVALS
    assert r.loss == pytest.approx(float(0.5 * theta @ a @ theta - b @ theta), rel=1e-12)


def test_any_direction_on_a_quadratic_critical_step_is_minus_two_slope_over_curvature():
    model, a, b, theta = _quadratic(seed=3)
    g = a @ theta - b
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        u = torch.randn(6, generator=gen, dtype=torch.float64) * 0.1
        if float(g @ u) > 0:
            u = -u
        r = critical_sharpness(model, _quadratic_loss, BATCH_ONE, u, lr=0.3)
        c, slope = float(u @ a @ u), float(g @ u)
        assert r.directional_curvature == pytest.approx(c / float(u @ u), rel=1e-6)
        assert r.critical_step == pytest.approx(-2 * slope / c, rel=1e-6)
        assert r.critical_lr == pytest.approx(0.3 * -2 * slope / c, rel=1e-6)
        assert r.critical_sharpness == pytest.approx(c / (-slope * 0.3), rel=1e-6)
        # the directional curvature is a Rayleigh quotient: within the spectrum
        assert 0.5 - 1e-9 <= r.directional_curvature <= 10.0 + 1e-9


def test_negative_curvature_or_an_uphill_update_has_no_critical_step_but_a_curvature():
    eigenvalues = torch.tensor([-3.0, -1.0, 2.0, 5.0], dtype=torch.float64)
    model, a, b, theta = _quadratic(n=4, seed=1, eigenvalues=eigenvalues)
    g = a @ theta - b
    evecs = torch.linalg.eigh(a).eigenvectors
    down = evecs[:, 0] * (-1.0 if float(g @ evecs[:, 0]) > 0 else 1.0)  # descends, along lambda = -3
    r = critical_sharpness(model, _quadratic_loss, BATCH_ONE, 0.2 * down, lr=0.1)
    assert r.available and r.directional_curvature == pytest.approx(-3.0, rel=1e-6)
    assert r.critical_step is None and r.critical_lr is None and "curves down" in r.reason
    slope = float(g @ (0.2 * down))
    assert r.critical_sharpness == pytest.approx(-3.0 * 0.04 / (-slope * 0.1), rel=1e-6)  # below 0: no limit
    uphill = critical_sharpness(model, _quadratic_loss, BATCH_ONE, 0.01 * g, lr=0.1)
    assert uphill.available and uphill.slope > 0
    assert uphill.critical_step is None and uphill.critical_sharpness is None and "does not descend" in uphill.reason
    assert uphill.directional_curvature == pytest.approx(float(g @ a @ g / (g @ g)), rel=1e-6)


def test_the_step_sizes_adapt_to_a_tiny_update_and_the_float32_rounding():
    model, a, b, theta = _quadratic(dtype=torch.float32)
    g = a @ theta - b
    u = -1e-4 * g  # the loss moves by ~1e-8 of itself at t = 1: the second difference there is rounding
    r = critical_sharpness(model, _quadratic_loss, BATCH_ONE, u.float(), lr=1e-4)
    kappa = float(u @ a @ u / (u @ u))
    assert r.scale > 1.0  # grew from the optimizer's step until the curvature stood above rounding
    assert r.directional_curvature == pytest.approx(kappa, rel=1e-2)  # float32 rounding at a 1e-3 signal
    assert abs(r.directional_curvature - kappa) <= 3 * r.directional_curvature_stderr
    assert r.critical_lr == pytest.approx(2 / kappa, rel=1e-2)
    assert r.n_evals <= MAX_EVALS


# ----------------------------------------------------------------------------------------------------------------
# Small nets against the exact directional curvature of a dense float64 Hessian


def _net_problem(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(48, 4, dtype=dtype), torch.randint(0, 3, (48,))
    return net, (x, y)


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _dense(net, batch):
    """The float64 loss gradient and dense Hessian at the net's parameters."""
    net64 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    f = BatchObjective(net64, _ce, (batch[0].double(), batch[1]))
    theta = f.point()

    def loss(flat):
        return f.loss(0, unflatten(flat, f.parameters))

    _, g = f.value_and_grad(theta)
    return g, torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-4), (torch.float32, 1e-2)])
@pytest.mark.parametrize("direction", ["sgd", "sgd_large", "adam_like", "random"])
def test_small_net_directional_curvature_matches_the_dense_hessian(dtype, rel, direction):
    net, batch = _net_problem(dtype)
    g, hessian = _dense(net, batch)
    if direction == "sgd":
        u = -0.5 * g
    elif direction == "sgd_large":
        u = -5.0 * g  # far past the quadratic regime: halving twice within the forwards leaves ~1e-3 truncation
        rel = max(rel, 1e-2)
    elif direction == "adam_like":
        u = -0.01 * g / (g.abs().sqrt() + 1e-3)
    else:
        u = 0.05 * torch.randn(g.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = float(u @ hessian @ u / (u @ u))
    r = critical_sharpness(net, _ce, batch, u.to(dtype), lr=0.5)
    assert r.available and r.n_evals <= MAX_EVALS
    assert r.directional_curvature == pytest.approx(exact, rel=rel)
    assert abs(r.directional_curvature - exact) <= 3 * r.directional_curvature_stderr + 1e-12
    assert r.slope == pytest.approx(float(g @ u), rel=10 * rel)
    lam = torch.linalg.eigvalsh(hessian)
    assert float(lam[0]) - 1e-6 <= exact <= float(lam[-1]) + 1e-6  # a Rayleigh quotient: never above lambda_max


# ----------------------------------------------------------------------------------------------------------------
# Do no harm, non-finite losses, arguments


def test_parameters_buffers_grads_modes_and_rngs_are_bitwise_as_before():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    nn.functional.mse_loss(net(x), y).backward()
    params = [p.detach().clone() for p in net.parameters()]
    grads = [p.grad for p in net.parameters()]
    grad_values = [gr.clone() for gr in grads]
    buffers = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    np_state, py_state = np.random.get_state()[1].copy(), __import__("random").getstate()
    update = [-0.1 * gr for gr in grad_values]
    r = critical_sharpness(net, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y), update, lr=0.1)
    assert r.available and r.n_evals >= 5
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert all(p.grad is gr and torch.equal(gr, v) for p, gr, v in zip(net.parameters(), grads, grad_values))
    assert all(torch.equal(b, c) for b, c in zip(net.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng) and net.training
    assert np.array_equal(np.random.get_state()[1], np_state) and __import__("random").getstate() == py_state


def test_dropout_draws_the_same_masks_at_every_step_size():
    # with a fresh mask per forward the second differences would be noise; with fixed masks the loss along the
    # line is exactly quadratic for a linear model with dropout on its input and a squared error
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(5, 1)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    r = critical_sharpness(net, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y),
                           torch.randn(6, dtype=torch.float64) * 0.1)
    assert r.fit_residual < 1e-8 and r.directional_curvature_stderr < 1e-8 * abs(r.directional_curvature)


def test_non_finite_losses_are_marked_unavailable_never_raised():
    def quadratic(t):
        return 1.0 - t + t * t

    nan_far = line_sharpness(lambda t: quadratic(t) if abs(t) < 0.3 else math.nan, update_norm=1.0,
                             precision=F64_EPS)
    assert nan_far.available and nan_far.scale < 0.3  # shrank past the NaNs, still exact
    assert nan_far.second_derivative == pytest.approx(2.0, rel=1e-9)
    assert nan_far.critical_step == pytest.approx(1.0, rel=1e-9) and nan_far.loss_at_critical_step is not None
    assert math.isnan(nan_far.loss_at_critical_step)  # measured, and the NaN there is reported as it is
    everywhere = line_sharpness(lambda t: 1.0 if t == 0 else math.inf, update_norm=1.0)
    assert not everywhere.available and "finite" in everywhere.reason and everywhere.n_evals <= MAX_EVALS
    at_point = line_sharpness(lambda t: math.nan, update_norm=1.0)
    assert not at_point.available and at_point.n_evals == 1 and at_point.directional_curvature is None
    zero = line_sharpness(lambda t: 1.0, update_norm=0.0)
    assert not zero.available and "zero" in zero.reason
    model, *_ = _quadratic()
    model.theta.data[0] = math.inf
    r = critical_sharpness(model, _quadratic_loss, BATCH_ONE, torch.ones(6, dtype=torch.float64))
    assert isinstance(r, CriticalSharpnessResult) and not r.available


def test_a_loss_flat_within_rounding_grows_the_scale_then_reports_what_it_has():
    r = line_sharpness(lambda t: 5.0, update_norm=1.0, precision=F64_EPS)
    assert r.available and r.second_derivative == 0.0 and r.slope == 0.0 and r.n_evals <= MAX_EVALS
    assert r.critical_step is None and "does not descend" in r.reason


@pytest.mark.parametrize("max_evals", [5, 6, 9])
def test_the_number_of_forwards_stays_within_max_evals(max_evals):
    calls = []

    def phi(t):
        calls.append(t)
        return math.exp(-t) + 0.5 * t * t  # not quadratic: the scale refines while it may

    r = line_sharpness(phi, update_norm=2.0, lr=0.1, max_evals=max_evals, precision=F64_EPS)
    assert len(calls) == r.n_evals == len(r.points) <= max_evals
    assert r.second_derivative == pytest.approx(2.0, rel=5e-2)  # phi''(0) = 1 + 1


@pytest.mark.parametrize("kwargs", [{"max_evals": 4}, {"lr": 0.0}, {"scale": -1.0}, {"update_norm": -1.0},
                                    {"precision": 2.0}])
def test_bad_arguments_raise_usage_errors(kwargs):
    arguments = {"update_norm": 1.0, **kwargs}
    with pytest.raises(UsageError):
        line_sharpness(lambda t: t * t, **arguments)


def test_an_update_of_the_wrong_length_is_a_usage_error():
    model, *_ = _quadratic()
    with pytest.raises(UsageError, match="entries"):
        critical_sharpness(model, _quadratic_loss, BATCH_ONE, torch.ones(5, dtype=torch.float64))


def test_exported_and_the_evidence_carries_it():
    assert optdiag.critical_sharpness is critical_sharpness
    assert optdiag.curvature.line_sharpness is line_sharpness
    evidence = Evidence(step=1, directional_sharpness=12.5)
    assert evidence.record()["directional_sharpness"] == 12.5
    assert Evidence(step=1, directional_sharpness=math.nan).unavailable == ["directional_sharpness"]


# ----------------------------------------------------------------------------------------------------------------
# HessianMonitor: logged beside lambda_max, exact on linear regression, charged to the budget


class KeepUpdates(pl.Callback):
    """The parameters before and after every optimizer step (for the exact reference)."""

    def __init__(self):
        self.before, self.after = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before[trainer.global_step + 1] = flatten(p.detach() for p in pl_module.parameters()).double()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = flatten(p.detach() for p in pl_module.parameters()).double()


ROWS = 2 * BATCH


def _full_batch_loader():
    """One batch of the first 2 BATCH rows: full-batch training, and the probe set is that batch."""
    x, y = _data().tensors
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:ROWS], y[:ROWS]), batch_size=ROWS)


def _loader():
    return _full_batch_loader()


def _probe_gradient(theta):
    """Gradient of the probe batch's mean squared error at flat [weight, bias]."""
    x, y = (t[:ROWS].double() for t in _data().tensors)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return 2 * design.T @ (design @ theta - y[:, 0]) / len(x)


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_hessian_monitor_logs_it_beside_lambda_max_exact_on_linear_regression(tmp_path, optimizer, momentum):
    monitor, updates = HessianMonitor(every_n_steps=3, probe_batches=1), KeepUpdates()
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor, updates], max_steps=9, logger=logger, log_every_n_steps=1)
    trainer.fit(LinearRegression(optimizer, lr=0.05, momentum=momentum), _loader())
    hessian = torch.from_numpy(_hessian(slice(0, ROWS)))
    snapshots = [h for h in monitor.history if h["reason"] == "scheduled"]
    assert [h["step"] for h in snapshots] == [3, 6, 9]
    accumulator = EventAccumulator(logger.log_dir)
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("optdiag/critical_sharpness")}
    logged_kappa = {e.step: e.value for e in accumulator.Scalars("optdiag/directional_curvature")}
    for h in snapshots:
        step = h["step"]
        before, u = updates.before[step], updates.after[step] - updates.before[step]
        kappa = float(u @ hessian @ u / (u @ u))
        slope, c = float(_probe_gradient(before) @ u), float(u @ hessian @ u)
        assert h["directional_curvature"] == pytest.approx(kappa, rel=1e-3)
        if slope < 0:
            assert h["critical_sharpness"] == pytest.approx(c / (-slope * 0.05), rel=1e-2)
            assert h["critical_lr_ratio"] == pytest.approx(c / (-2 * slope), rel=1e-2)
            assert h["critical_lr"] == pytest.approx(0.05 * -2 * slope / c, rel=1e-2)
            assert h["critical_note"] is None
        else:  # heavy ball overshoots: the step went uphill on the probe batch, so nothing is critical along it
            assert h["critical_sharpness"] is h["critical_lr"] is None and "descend" in h["critical_note"]
        threshold = h["stability_threshold"]  # None while Adam's preconditioner warms up: then no ratio either
        sharpness = h["critical_sharpness"]
        assert h["critical_sharpness_ratio"] == (None if threshold is None or sharpness is None else
                                                 pytest.approx(sharpness / threshold))
        assert 5 <= h["n_forward"] <= MAX_EVALS
        assert h["directional_curvature"] <= h["lambda_max"] * (1 + 1e-3)
        assert logged.get(step) == (None if h["critical_sharpness"] is None else
                                    pytest.approx(h["critical_sharpness"], rel=1e-6))
        assert logged_kappa[step] == pytest.approx(h["directional_curvature"], rel=1e-6)
    assert sum(h["critical_sharpness"] is not None for h in snapshots) >= 2
    if optimizer == "sgd" and not momentum:  # full-batch gradient descent: along the gradient, both are one number
        assert all(h["critical_sharpness"] == pytest.approx(h["directional_curvature"], rel=1e-3) for h in snapshots)
    if any(h["stability_threshold"] for h in snapshots):
        assert "optdiag/critical_sharpness_ratio" in accumulator.Tags()["scalars"]


def test_monitored_weights_are_bitwise_those_of_unmonitored_training(tmp_path):
    def train(callbacks):
        pl.seed_everything(0)
        module = LinearRegression("sgd", lr=0.05, momentum=0.9)
        make_trainer(tmp_path, callbacks, max_steps=8).fit(module, _loader())
        return [p.detach().clone() for p in module.parameters()]

    plain, monitored = train([]), train([HessianMonitor(every_n_steps=2, probe_batches=1)])
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(plain, monitored))


FORWARD_SECONDS = 0.001


def test_its_forwards_are_charged_to_the_budget_and_kept_out_of_the_product_cost(tmp_path, priced, monkeypatch):
    class TimedObjective(BatchObjective):
        def value(self, point, *, finite=True):
            priced.advance(FORWARD_SECONDS)  # one forward over the probe set
            return super().value(point, finite=finite)

    monkeypatch.setattr(critical_glue, "BatchObjective", TimedObjective)
    monitor = HessianMonitor(every_n_steps=2, probe_batches=1, clock=priced, trace_hvp=0)
    pl.seed_everything(0)
    make_trainer(tmp_path, [ClockSteps(priced), monitor], max_steps=6).fit(LinearRegression(), _loader())
    assert len(monitor.history) == 3
    for i, h in enumerate(monitor.history):
        assert 5 <= h["n_forward"] <= MAX_EVALS
        # the snapshot's charge is its setup, its products and its forwards, whatever priced them (the first one
        # also pays for choosing the Hessian-vector product: one more operator and product)
        first = SETUP_SECONDS + PRODUCT_SECONDS if i == 0 else 0.0
        assert h["seconds"] == pytest.approx(first + SETUP_SECONDS + h["n_hvp"] * PRODUCT_SECONDS
                                             + h["n_forward"] * FORWARD_SECONDS)
    assert [c["seconds"] for c in monitor.charges] == [h["seconds"] for h in monitor.history]
    assert sum(c["seconds"] for c in monitor.charges) == pytest.approx(monitor.monitor_seconds)
    # the product cost model stays exact (the forwards are timed apart), and the forward price is learned
    assert monitor.estimate_seconds(10) == pytest.approx(SETUP_SECONDS + 10 * PRODUCT_SECONDS)
    assert monitor._forward_seconds == pytest.approx(FORWARD_SECONDS)
    last = monitor.history[-1]["n_forward"]
    assert monitor._critical_products() == math.ceil(last * FORWARD_SECONDS / PRODUCT_SECONDS)
    # a scheduled refresh is planned with those products on top of the solves'
    without = HessianMonitor(probe_batches=1)
    without._part_hvp = dict(monitor._part_hvp)
    assert monitor._refresh_products() == without._refresh_products() + monitor._critical_products()


def test_the_monitor_looks_along_a_minibatch_step_on_the_batch_it_descended(tmp_path):
    # SGD on minibatches of 16 (8 batches, in order), probe set: the first two. On its own batch B a plain SGD step
    # u = -lr g_B has critical sharpness g_B^T H_B g_B / |g_B|^2, the directional curvature along it: what minibatch
    # SGD holds at 2 / lr. On the probe set the slope along u would be another batch's, and noisy.
    monitor, updates = HessianMonitor(every_n_steps=3, probe_batches=2), KeepUpdates()
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor, updates], max_steps=12).fit(LinearRegression("sgd", lr=0.05),
                                                               __import__("test_hessian_monitor")._loader())
    for h in monitor.history:
        rows = slice(((h["step"] - 1) % 8) * BATCH, ((h["step"] - 1) % 8 + 1) * BATCH)  # the step's batch
        hessian = torch.from_numpy(_hessian(rows))
        u = updates.after[h["step"]] - updates.before[h["step"]]
        kappa = float(u @ hessian @ u / (u @ u))
        assert h["directional_curvature"] == pytest.approx(kappa, rel=1e-3)
        assert h["critical_sharpness"] == pytest.approx(kappa, rel=1e-3)
        assert h["critical_lr"] == pytest.approx(2 / kappa, rel=1e-3)
