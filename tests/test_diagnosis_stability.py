"""Stability thresholds (docs/theory.md section 1): the table's numbers, and each threshold checked by iterating the
optimizer's own update on a 1-D quadratic just below and just above it."""

import math

import numpy as np
import pytest
import torch

from optdiag.diagnosis.stability import (
    OptimizerSpec,
    heavy_ball_rings,
    max_stable_lr,
    stability_threshold,
)
from optdiag.errors import UsageError

ETA = 0.01


@pytest.mark.parametrize(
    "spec, expected",
    [
        (OptimizerSpec("sgd", lr=ETA), 200.0),
        (OptimizerSpec("heavy_ball", lr=ETA, momentum=0.9), 380.0),
        (OptimizerSpec("nesterov", lr=ETA, momentum=0.9), 3.8 / 2.8 / ETA),
        (OptimizerSpec("adam", lr=ETA, beta1=0.9), 38.0 / ETA),
        (OptimizerSpec("adamw", lr=ETA, beta1=0.9), 3800.0),
        (OptimizerSpec("rmsprop", lr=ETA), 200.0),
    ],
)
def test_theory_table_at_eta_001(spec, expected):
    assert stability_threshold(spec) == pytest.approx(expected, rel=1e-12)


def test_nesterov_number_as_printed_in_theory():
    assert round(stability_threshold(OptimizerSpec("nesterov", lr=ETA, momentum=0.9)), 1) == 135.7


def _sgd_family(spec, lam, steps=3000):
    """PyTorch SGD semantics (buf = g at the first step, dampening, nesterov, weight decay) on f = lam/2 x^2."""
    x, buf = 1.0, None
    for _ in range(steps):
        g = lam * x + spec.weight_decay * x
        if spec.momentum:
            buf = g if buf is None else spec.momentum * buf + (1 - spec.dampening) * g
            g = g + spec.momentum * buf if spec.kind == "nesterov" else buf
        x -= spec.lr * g
        if abs(x) > 1e6:
            break
    return abs(x)


def _adam_frozen(spec, lam_p, steps=3000):
    """Adam with a frozen preconditioner P (lam_p: the preconditioned curvature), past its bias-correction transient:
    1/(1 - beta1^t) -> 1, so it does not change the asymptotic stability (it only amplifies the first steps)."""
    x, m = 1.0, 0.0
    for _ in range(steps):
        g = lam_p * x
        m = spec.beta1 * m + (1 - spec.beta1) * g
        x -= spec.lr * m
        if abs(x) > 1e6:
            break
    return abs(x)


def _rmsprop_frozen(spec, lam_p, steps=3000):
    x, buf = 1.0, 0.0
    for _ in range(steps):
        buf = spec.momentum * buf + lam_p * x
        x -= spec.lr * buf
        if abs(x) > 1e6:
            break
    return abs(x)


@pytest.mark.parametrize(
    "spec, run",
    [
        (OptimizerSpec("sgd", lr=ETA), _sgd_family),
        (OptimizerSpec("sgd", lr=ETA, weight_decay=5.0), _sgd_family),
        (OptimizerSpec("heavy_ball", lr=ETA, momentum=0.9), _sgd_family),
        (OptimizerSpec("heavy_ball", lr=ETA, momentum=0.5, dampening=0.3), _sgd_family),
        (OptimizerSpec("nesterov", lr=ETA, momentum=0.9), _sgd_family),
        (OptimizerSpec("nesterov", lr=0.1, momentum=0.5), _sgd_family),
        (OptimizerSpec("adam", lr=ETA, beta1=0.9), _adam_frozen),
        (OptimizerSpec("adam", lr=1e-3, beta1=0.5), _adam_frozen),
        (OptimizerSpec("rmsprop", lr=ETA), _rmsprop_frozen),
        (OptimizerSpec("rmsprop", lr=ETA, momentum=0.8), _rmsprop_frozen),
    ],
)
def test_threshold_separates_convergence_from_divergence(spec, run):
    threshold = stability_threshold(spec)
    assert run(spec, 0.99 * threshold) < 1e-3, "just below the threshold the iteration must converge"
    assert run(spec, 1.01 * threshold) > 1e3, "just above the threshold the iteration must diverge"


def test_threshold_matches_real_torch_sgd_with_momentum_and_dampening():
    """The recurrence above is PyTorch's: run torch.optim.SGD itself on the same quadratic."""
    spec = OptimizerSpec("heavy_ball", lr=ETA, momentum=0.5, dampening=0.3)
    for factor, converges in ((0.98, True), (1.02, False)):
        lam = factor * stability_threshold(spec)
        x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([x], lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening)
        for _ in range(2000):
            opt.zero_grad()
            (0.5 * lam * x.pow(2)).sum().backward()
            opt.step()
        assert (abs(x.item()) < 1e-3) == converges


def test_unknown_and_degenerate_give_none_never_a_wrong_number():
    assert stability_threshold(OptimizerSpec("unknown", lr=0.1, name="LBFGS")) is None
    assert stability_threshold(OptimizerSpec("sgd", lr=0.0)) is None
    assert stability_threshold(OptimizerSpec("heavy_ball", lr=0.1, momentum=0.5, dampening=1.0)) is None


def test_from_torch_reads_real_optimizers():
    p = [torch.zeros(2, requires_grad=True)]
    cases = [
        (torch.optim.SGD(p, lr=0.1), "sgd", 20.0),
        (torch.optim.SGD(p, lr=0.1, momentum=0.9), "heavy_ball", 38.0),
        (torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov", 3.8 / 2.8 / 0.1),
        (torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), "heavy_ball", 76.0),
        (torch.optim.Adam(p, lr=0.01), "adam", 3800.0),
        (torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99)), "adamw", 3.6 / 0.2 / 0.01),
        (torch.optim.RMSprop(p, lr=0.01, momentum=0.5), "rmsprop", 300.0),
        (torch.optim.LBFGS(p, lr=1.0), "unknown", None),
        (torch.optim.Adagrad(p, lr=0.1), "unknown", None),
    ]
    for opt, kind, threshold in cases:
        spec = OptimizerSpec.from_torch(opt)
        assert spec.kind == kind and spec.name == type(opt).__name__
        got = stability_threshold(spec)
        assert got == pytest.approx(threshold) if threshold is not None else got is None
    assert OptimizerSpec.from_torch(torch.optim.Adam(p, lr=0.01)).preconditioned
    assert not OptimizerSpec.from_torch(torch.optim.SGD(p, lr=0.01)).preconditioned


def test_from_torch_duck_typing_groups_and_errors():
    fake = type("SGD", (), {})()  # duck typing: only the class name and param_groups are read
    fake.param_groups = [{"lr": 0.1, "momentum": 0.0}, {"lr": 0.5, "momentum": 0.0}]
    assert OptimizerSpec.from_torch(fake, group=1).lr == 0.5
    with pytest.raises(UsageError, match="group"):
        OptimizerSpec.from_torch(fake, group=2)
    with pytest.raises(UsageError, match="param_groups"):
        OptimizerSpec.from_torch(object())
    wrapper = type("LightningOptimizer", (), {})()
    wrapper.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3, momentum=0.5)
    assert OptimizerSpec.from_torch(wrapper).kind == "heavy_ball"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "sgdx", "lr": 0.1}, "kind"),
        ({"kind": "sgd", "lr": -1.0}, "lr"),
        ({"kind": "heavy_ball", "lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"kind": "adam", "lr": 0.1}, "beta1"),
        ({"kind": "nesterov", "lr": 0.1, "momentum": 0.0}, "nesterov"),
        ({"kind": "sgd", "lr": float("inf")}, "lr"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(UsageError, match=match):
        OptimizerSpec(**kwargs)


def test_max_stable_lr_and_effective_lr():
    sgd = OptimizerSpec("sgd", lr=ETA)
    assert max_stable_lr(sgd, 150.0) == pytest.approx(2 / 150)
    hb = OptimizerSpec("heavy_ball", lr=ETA, momentum=0.9, weight_decay=0.5)
    lr = max_stable_lr(hb, 100.0)
    assert stability_threshold(OptimizerSpec("heavy_ball", lr=lr, momentum=0.9, weight_decay=0.5)) == pytest.approx(100)
    assert hb.effective_lr == pytest.approx(0.1)
    assert OptimizerSpec("adam", lr=ETA, beta1=0.9).effective_lr == ETA
    assert max_stable_lr(OptimizerSpec("unknown", lr=0.1), 5.0) is None


def test_heavy_ball_rings_matches_complex_roots():
    beta, lr = 0.81, 0.01
    for lam in np.linspace(0.1, 500, 211):
        roots = np.roots([1.0, -(1 + beta - lr * lam), beta])
        complex_roots = bool(np.any(np.abs(roots.imag) > 1e-12))
        assert heavy_ball_rings(lr, beta, lam) == complex_roots
        if complex_roots:
            assert np.allclose(np.abs(roots), math.sqrt(beta))
    with pytest.raises(UsageError):
        heavy_ball_rings(0.0, 0.5, 1.0)
