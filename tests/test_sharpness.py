"""Sharpness measures (docs/theory.md s5) against closed forms on quadratics, and the ReLU rescaling of Dinh et al."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from optdiag.curvature.params import flatten, unflatten
from optdiag.curvature.sharpness import SharpnessResult, adaptive_sharpness, epsilon_sharpness, sam_sharpness
from optdiag.errors import UsageError

ONE_SAMPLE = torch.zeros(1)  # the quadratic "models" ignore their batch; one sample gives it weight 1


class Quadratic(nn.Module):
    """f(x) = c + b.x + 1/2 (x - x0)^T H (x - x0) as a model with one parameter vector x (float64)."""

    def __init__(self, hessian, x0, point, b=None, c=0.0):
        super().__init__()
        self.register_buffer("hessian", torch.as_tensor(hessian, dtype=torch.float64))
        self.register_buffer("x0", torch.as_tensor(x0, dtype=torch.float64))
        self.register_buffer("b", torch.zeros_like(self.x0) if b is None else torch.as_tensor(b, dtype=torch.float64))
        self.c = float(c)
        self.x = nn.Parameter(torch.as_tensor(point, dtype=torch.float64).clone())

    def forward(self):
        d = self.x - self.x0
        return self.c + self.b @ self.x + 0.5 * d @ self.hessian @ d

    def gradient(self) -> torch.Tensor:
        return (self.b + self.hessian @ (self.x - self.x0)).detach()


def quadratic_loss(model, batch):
    return model()


# --- Keskar's epsilon-sharpness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "corners"])
def test_epsilon_sharpness_of_convex_quadratic_at_its_minimum_is_the_corner_value(method):
    # At the minimum of a diagonal convex quadratic the box maximum sits at a corner: 1/2 sum h_i w_i^2 with the
    # half-widths w_i = eps (|x_i| + 1). Both searches reach it ("auto" is L-BFGS-B on 4 parameters).
    h = np.array([50.0, 3.0, 0.2, 7.0])
    x0 = np.array([1.5, -4.0, 0.0, 0.25])
    c, eps = 0.7, 0.05
    model = Quadratic(np.diag(h), x0, point=x0, c=c)
    widths = eps * (np.abs(x0) + 1)
    expected_increase = 0.5 * np.sum(h * widths**2)
    result = epsilon_sharpness(model, quadratic_loss, ONE_SAMPLE, eps=eps, method=method)
    assert result.kind == "epsilon" and result.eps == eps and result.subspace_dim is None
    assert result.method == ("l-bfgs-b" if method == "auto" else "corners")
    assert result.loss == pytest.approx(c, rel=1e-12)
    assert result.perturbed_loss - result.loss == pytest.approx(expected_increase, rel=1e-9)
    assert result.value == pytest.approx(100 * expected_increase / (1 + c), rel=1e-9)
    assert result.perturbation_norm == pytest.approx(np.linalg.norm(widths), rel=1e-9)
    assert 1 <= result.n_iter <= 10 and result.n_evals >= 2


@pytest.mark.parametrize("method", ["auto", "corners"])
def test_epsilon_sharpness_away_from_the_minimum_climbs_the_slope(method):
    # A linear loss c + b.x: the maximum over the box is sum |b_i| w_i, at the corner sign(b).
    b = np.array([2.0, -1.0, 0.5])
    point = np.array([0.3, -2.0, 10.0])
    model = Quadratic(np.zeros((3, 3)), np.zeros(3), point=point, b=b, c=1.0)
    eps = 1e-3
    loss = 1.0 + b @ point
    increase = np.sum(np.abs(b) * eps * (np.abs(point) + 1))
    result = epsilon_sharpness(model, quadratic_loss, ONE_SAMPLE, eps=eps, method=method)
    assert result.value == pytest.approx(100 * increase / (1 + loss), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_epsilon_sharpness_corner_ascent_finds_the_box_maximum_of_a_convex_network_loss(seed):
    # Softmax regression's cross-entropy is convex in its 8 parameters, so its maximum over the box is at one of
    # the 256 corners, all evaluated here (float64). The memory-bounded corner ascent finds that maximum, as
    # L-BFGS-B does.
    gen = torch.Generator().manual_seed(seed)
    net = nn.Linear(3, 2).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    batch = (torch.randn(20, 3, generator=gen, dtype=torch.float64), torch.randint(2, (20,), generator=gen))
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    eps = 1e-2
    x = flatten(p.detach() for p in net.parameters())
    widths = eps * (x.abs() + 1)
    best = -math.inf
    for signs in itertools.product([-1.0, 1.0], repeat=x.numel()):
        unflat = unflatten(x + widths * torch.tensor(signs, dtype=torch.float64), list(net.parameters()))
        with torch.no_grad():
            best = max(best, float(loss_fn(lambda inputs: inputs @ unflat[0].T + unflat[1], batch)))
    corners = epsilon_sharpness(net, loss_fn, batch, eps=eps, method="corners", seed=seed)
    reference = epsilon_sharpness(net, loss_fn, batch, eps=eps, method="l-bfgs-b", seed=seed)
    assert corners.method == "corners" and corners.n_iter >= 1
    assert corners.perturbed_loss == pytest.approx(best, rel=1e-12)
    assert reference.perturbed_loss == pytest.approx(best, rel=1e-12)
    assert corners.perturbation_norm == pytest.approx(float(widths.norm()), rel=1e-12)


def test_epsilon_sharpness_auto_uses_l_bfgs_b_only_where_its_float64_vectors_fit():
    # 30 float64 vectors fit in 256 MiB up to 1,118,481 parameters: one more output of this linear model passes it.
    batch = (torch.ones(2, 1024), torch.zeros(2, 1))
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    small = epsilon_sharpness(nn.Linear(1024, 1000), loss_fn, batch, max_iter=1)  # 1,025,000 parameters
    large = epsilon_sharpness(nn.Linear(1024, 1100), loss_fn, batch, max_iter=1)  # 1,127,500 parameters
    assert (small.method, large.method) == ("l-bfgs-b", "corners")
    assert large.value > 0 and large.perturbation_norm > 0


def test_epsilon_sharpness_in_a_subspace_reaches_a_corner_of_the_documented_box():
    # y = A z with A = default_rng(seed).standard_normal((n, p)); the box on z is |z_i| <= eps (|(A^+ x)_i| + 1).
    n, p, eps, seed = 6, 3, 0.01, 4
    gen = np.random.default_rng(0)
    m = gen.standard_normal((n, n))
    hessian = m @ m.T + np.eye(n)
    x0 = gen.standard_normal(n)
    model = Quadratic(hessian, x0, point=x0)
    result = epsilon_sharpness(model, quadratic_loss, ONE_SAMPLE, eps=eps, subspace_dim=p, seed=seed)
    basis = np.random.default_rng(seed).standard_normal((n, p))
    widths = eps * (np.abs(np.linalg.pinv(basis) @ x0) + 1)
    corners = [0.5 * (basis @ (s * widths)) @ hessian @ (basis @ (s * widths)) for s in
               itertools.product([-1, 1], repeat=p)]
    # A convex function on a box is largest at a corner; L-BFGS-B ends at one (not necessarily the global one).
    assert min(abs(result.perturbed_loss - corner) for corner in corners) < 1e-9 * max(corners)
    assert result.perturbed_loss <= max(corners) * (1 + 1e-9)
    assert result.subspace_dim == p
    again = epsilon_sharpness(model, quadratic_loss, ONE_SAMPLE, eps=eps, subspace_dim=p, seed=seed)
    assert again.value == result.value


def test_epsilon_sharpness_leaves_the_parameters_alone():
    model = Quadratic(np.diag([1.0, 2.0]), [0.0, 0.0], point=[0.1, 0.2])
    before = model.x.detach().clone()
    version = model.x._version
    epsilon_sharpness(model, quadratic_loss, ONE_SAMPLE, eps=0.1)
    assert torch.equal(model.x.detach(), before) and model.x._version == version


# --- SAM and adaptive sharpness ------------------------------------------------------------------------------------


@pytest.fixture
def linear_plus_quadratic():
    gen = np.random.default_rng(1)
    m = gen.standard_normal((5, 5))
    hessian = m + m.T  # indefinite, not diagonal
    return Quadratic(hessian, gen.standard_normal(5), point=gen.standard_normal(5), b=gen.standard_normal(5), c=2.0)


def exact_increase(model: Quadratic, e: torch.Tensor) -> float:
    g = model.gradient()
    return float(g @ e + 0.5 * e @ model.hessian @ e)


def test_sam_sharpness_on_a_quadratic_is_exact(linear_plus_quadratic):
    model, rho = linear_plus_quadratic, 0.3
    g = model.gradient()
    expected = rho * g.norm() + 0.5 * rho**2 * (g @ model.hessian @ g) / (g @ g)
    result = sam_sharpness(model, quadratic_loss, ONE_SAMPLE, rho=rho)
    assert result.value == pytest.approx(float(expected), rel=1e-12)
    assert result.perturbation_norm == pytest.approx(rho, rel=1e-12)
    assert (result.kind, result.rho, result.eta, result.n_evals) == ("sam", rho, None, 2)
    assert result.loss == pytest.approx(float(model().detach()), rel=1e-14)


@pytest.mark.parametrize("eta", [0.0, 0.01, 1.0])
def test_adaptive_sharpness_on_a_quadratic_is_exact(linear_plus_quadratic, eta):
    model, rho = linear_plus_quadratic, 0.2
    g, t = model.gradient(), model.x.detach().abs() + eta
    e = rho * t**2 * g / (t * g).norm()
    result = adaptive_sharpness(model, quadratic_loss, ONE_SAMPLE, rho=rho, eta=eta)
    assert result.value == pytest.approx(exact_increase(model, e), rel=1e-12)
    assert (result.kind, result.rho, result.eta) == ("adaptive", rho, eta)
    # The perturbation has scaled norm rho: |e / T| = rho.
    assert result.perturbation_norm == pytest.approx(float(e.norm()), rel=1e-12)


def test_first_order_sharpness_at_a_critical_point_is_refused():
    model = Quadratic(np.diag([1.0, 2.0]), [0.5, 0.5], point=[0.5, 0.5])
    with pytest.raises(ValueError, match="gradient is exactly zero"):
        sam_sharpness(model, quadratic_loss, ONE_SAMPLE)
    with pytest.raises(ValueError, match="scaled gradient"):
        adaptive_sharpness(model, quadratic_loss, ONE_SAMPLE)


# --- Dinh et al.: rescaling a ReLU net changes lambda_max and SAM, not the adaptive sharpness ----------------------


def relu_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()


def relu_data():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    return x, torch.randn(32, 2, generator=gen, dtype=torch.float64)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def rescaled(model: nn.Module, a: float) -> nn.Module:
    """(a theta_1, theta_2 / a): the first layer (weight and bias) times a, the second weight over a."""
    out = relu_net()
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight * a)
        out[0].bias.copy_(model[0].bias * a)
        out[2].weight.copy_(model[2].weight / a)
        out[2].bias.copy_(model[2].bias)
    return out


def lambda_max(model, data) -> float:
    names = [n for n, _ in model.named_parameters()]
    like = list(model.parameters())

    def loss_at(flat):
        return mse(lambda x: torch.func.functional_call(model, dict(zip(names, unflatten(flat, like))), (x,)), data)

    hessian = torch.autograd.functional.hessian(loss_at, flatten(p.detach() for p in like))
    return float(torch.linalg.eigvalsh(hessian)[-1])


def test_rescaling_a_relu_net_keeps_the_function_and_the_adaptive_sharpness_only():
    model, data = relu_net(), relu_data()
    big = rescaled(model, 10.0)
    torch.testing.assert_close(big(data[0]), model(data[0]), rtol=1e-12, atol=1e-12)  # the same function

    adaptive = adaptive_sharpness(model, mse, data, rho=0.5, eta=0.0)
    adaptive_big = adaptive_sharpness(big, mse, data, rho=0.5, eta=0.0)
    assert adaptive.value > 0
    assert adaptive_big.value == pytest.approx(adaptive.value, rel=1e-9)

    sam, sam_big = sam_sharpness(model, mse, data, rho=0.05), sam_sharpness(big, mse, data, rho=0.05)
    assert abs(math.log(sam_big.value / sam.value)) > math.log(2)
    top, top_big = lambda_max(model, data), lambda_max(big, data)
    assert top_big > 10 * top

    # eta > 0 keeps zero weights perturbable at the price of exact invariance.
    soft = adaptive_sharpness(model, mse, data, rho=0.5, eta=0.01).value
    soft_big = adaptive_sharpness(big, mse, data, rho=0.5, eta=0.01).value
    assert soft_big != pytest.approx(soft, rel=1e-9)


# --- same loss as HessianOperator, and no harm to the model --------------------------------------------------------


class NoisyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
        self.double()

    def forward(self, x):
        return self.body(x)


def noisy_batches():
    gen = torch.Generator().manual_seed(9)
    def sample(n):
        x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        return x, torch.randn(n, 1, generator=gen, dtype=torch.float64)

    return [sample(n) for n in (16, 8, 24)]


def test_loss_is_the_hessian_operators_weighted_mean_with_the_same_dropout_masks():
    from optdiag.curvature.operator import HessianOperator

    model, batches = NoisyNet().train(), noisy_batches()
    op = HessianOperator(model, mse, batches)
    result = sam_sharpness(model, mse, batches, rho=1e-6)
    assert result.loss == pytest.approx(op.loss, rel=1e-12)
    # With the same masks at w and w + e, a tiny step gives the first-order increase rho |g|.
    assert result.value == pytest.approx(1e-6 * float(op.gradient().norm()), rel=1e-4)


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, b: epsilon_sharpness(m, mse, b, eps=1e-2, max_iter=3),
        lambda m, b: epsilon_sharpness(m, mse, b, eps=1e-2, max_iter=3, subspace_dim=4),
        lambda m, b: epsilon_sharpness(m, mse, b, eps=1e-2, max_iter=3, method="corners"),
        lambda m, b: sam_sharpness(m, mse, b),
        lambda m, b: adaptive_sharpness(m, mse, b),
    ],
    ids=["epsilon", "epsilon-subspace", "epsilon-corners", "sam", "adaptive"],
)
def test_parameters_buffers_grads_modes_and_rngs_are_untouched(measure):
    model, batches = NoisyNet().train(), noisy_batches()
    model.body[4].eval()  # a mixed-mode model keeps each module's flag
    mse(model, batches[0]).backward()
    params = [p.detach().clone() for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()

    result = measure(model, batches)
    assert isinstance(result, SharpnessResult) and math.isfinite(result.value)

    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert [p._version for p in model.parameters()] == versions
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(model.parameters(), grads, grad_values))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.random.get_state()[1].tolist() == numpy_rng[1].tolist() and random.getstate() == python_rng


def test_to_dict():
    model = Quadratic(np.diag([1.0, 2.0]), [0.0, 0.0], point=[0.1, 0.2])
    d = sam_sharpness(model, quadratic_loss, ONE_SAMPLE, rho=0.1).to_dict()
    assert set(d) == set(SharpnessResult.__dataclass_fields__) and d["kind"] == "sam" and d["rho"] == 0.1


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: epsilon_sharpness(m, quadratic_loss, ONE_SAMPLE, eps=0.0), "eps must be a positive"),
        (lambda m: epsilon_sharpness(m, quadratic_loss, ONE_SAMPLE, max_iter=0), "max_iter"),
        (lambda m: epsilon_sharpness(m, quadratic_loss, ONE_SAMPLE, subspace_dim=0), "subspace_dim"),
        (lambda m: epsilon_sharpness(m, quadratic_loss, ONE_SAMPLE, seed=1.5), "seed"),
        (lambda m: epsilon_sharpness(m, quadratic_loss, ONE_SAMPLE, method="newton"), "method must be one of"),
        (lambda m: epsilon_sharpness(m, quadratic_loss, ONE_SAMPLE, subspace_dim=1, method="corners"), "full space"),
        (lambda m: sam_sharpness(m, quadratic_loss, ONE_SAMPLE, rho=-1.0), "rho must be a positive"),
        (lambda m: adaptive_sharpness(m, quadratic_loss, ONE_SAMPLE, eta=-0.1), "eta must be a non-negative"),
        (lambda m: sam_sharpness(m, quadratic_loss, []), "batches is empty"),
        (lambda m: sam_sharpness(m, "loss", ONE_SAMPLE), "loss_fn must be callable"),
        (lambda m: sam_sharpness("model", quadratic_loss, ONE_SAMPLE), "torch.nn.Module"),
        (lambda m: sam_sharpness(m, lambda mod, b: mod.x * 1.0, ONE_SAMPLE), "scalar"),
        (lambda m: sam_sharpness(m, lambda mod, b: torch.ones((), dtype=torch.float64), ONE_SAMPLE), "depend on"),
    ],
)
def test_bad_input_is_rejected_with_its_cause(call, match):
    model = Quadratic(np.diag([1.0, 2.0]), [0.0, 0.0], point=[0.1, 0.2])
    with pytest.raises(UsageError, match=match):
        call(model)
