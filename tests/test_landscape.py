"""Loss slices, surfaces and interpolation paths against exact answers; the model is never touched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from optdiag.analysis import landscape
from optdiag.curvature import HessianOperator, supervised_loss
from optdiag.errors import UsageError

from tests.fixtures_analysis import LinearNet, half_squared_error, make_dataset


class Product(nn.Module):
    """``L(w1, w2) = (1 - w1 w2)^2`` (docs/theory.md section 3): a saddle at the origin with eigenvalues +-2."""

    def __init__(self, w1: float = 0.0, w2: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor(w2, dtype=torch.float64))


def product_loss(model: Product, batch) -> torch.Tensor:
    return (1 - model.w1 * model.w2) ** 2 + 0 * batch.sum()


def _product_op(w1: float = 0.0, w2: float = 0.0) -> HessianOperator:
    return HessianOperator(Product(w1, w2), product_loss, torch.zeros(1, dtype=torch.float64))


def test_slices_along_the_saddle_eigenvectors_are_exact():
    op = _product_op()
    t = np.linspace(-2.0, 2.0, 9)
    down = landscape.loss_slice(op, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2), t, "escape")
    up = landscape.loss_slice(op, torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2), t, "ascent")
    np.testing.assert_allclose(down.loss, 1 - t**2 + t**4 / 4, atol=1e-12)
    np.testing.assert_allclose(up.loss, 1 + t**2 + t**4 / 4, atol=1e-12)
    assert down.curvature == pytest.approx(-2.0, abs=1e-12) and up.curvature == pytest.approx(2.0, abs=1e-12)
    assert down.slope == 0.0
    np.testing.assert_allclose(down.quadratic, 1 - t**2, atol=1e-12)
    assert down.to_dict()["loss"][4] == pytest.approx(1.0) and down.direction_norm == pytest.approx(1.0)


def test_slices_leave_the_model_and_rngs_alone():
    op = _product_op(0.3, -0.7)
    model = op.model
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    landscape.loss_slice(op, torch.tensor([0.6, 0.8]), [-1.0, 0.0, 1.0])
    landscape.loss_surface(op, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), [-1, 0, 1], [-1, 0, 1])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_surface_of_a_quadratic_loss_matches_its_dense_hessian():
    torch.manual_seed(0)
    model = LinearNet(hidden=0).double()
    x, y = make_dataset((1.0, 2.0, 3.0)).tensors
    batch = (x.double(), y.double())
    op = HessianOperator(model, half_squared_error, [batch])
    theta = landscape.point_of(op)
    dense = torch.autograd.functional.hessian(
        lambda w: 0.5 * ((x.double() @ w.view(2, 3).T - y.double()) ** 2).sum(1).mean(), theta
    )
    u = torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=torch.float64)
    v = torch.tensor([0, 1.0, 0, 0, 0, -1], dtype=torch.float64)
    a = np.array([-0.5, 0.0, 1.0])
    b = np.array([-1.0, 0.25])
    surface = landscape.loss_surface(op, u, v, a, b)
    g = op.gradient()
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            step = ai * u + bj * v
            expected = op.loss + float(g @ step) + 0.5 * float(step @ dense @ step)
            assert surface.loss[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert np.asarray(surface.to_dict()["loss"]).shape == (3, 2)


def test_interpolation_barrier_between_the_two_minima_of_the_product_loss():
    op = _product_op()
    path = landscape.linear_interpolation(op, torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0]),
                                          t=np.linspace(0, 1, 5), labels=("a", "b"))
    t = np.linspace(0, 1, 5)
    np.testing.assert_allclose(path.loss, (1 - (1 - 2 * t) ** 2) ** 2, atol=1e-12)
    assert path.barrier == pytest.approx(1.0)
    assert path.distance == pytest.approx(math.sqrt(8))
    assert path.to_dict()["from"] == "a"


def test_filter_normalised_direction_matches_filter_norms_and_zeroes_biases():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    batch = (torch.randn(2, 2, 4, 4), torch.randn(2, 2))
    op = HessianOperator(model, supervised_loss(nn.MSELoss()), batch)
    d = landscape.filter_normalized_direction(op, seed=3)
    parts = dict(zip([n for n, _ in model.named_parameters()],
                     torch.split(d, [p.numel() for p in model.parameters()])))
    conv_w, lin_w = model[0].weight.detach(), model[2].weight.detach()
    torch.testing.assert_close(parts["0.weight"].view(3, -1).norm(dim=1), conv_w.view(3, -1).norm(dim=1))
    torch.testing.assert_close(parts["2.weight"].view(2, -1).norm(dim=1), lin_w.norm(dim=1))
    assert torch.count_nonzero(parts["0.bias"]) == 0 and torch.count_nonzero(parts["2.bias"]) == 0
    assert torch.equal(d, landscape.filter_normalized_direction(op, seed=3))
    assert not torch.equal(d, landscape.filter_normalized_direction(op, seed=4))
    with_bias = landscape.filter_normalized_direction(op, seed=3, ignore_1d=False)
    assert float(with_bias[-2:].norm()) == pytest.approx(float(model[2].bias.detach().norm()), rel=1e-5)


def test_filter_normalised_direction_at_zero_weights_falls_back_to_a_unit_direction():
    d = landscape.filter_normalized_direction(_product_op(), seed=0, ignore_1d=False)
    assert float(d.norm()) == pytest.approx(1.0)


def test_bad_input_is_named():
    op = _product_op()
    with pytest.raises(UsageError, match="3 entries"):
        landscape.loss_slice(op, torch.ones(3), [0, 1])
    with pytest.raises(UsageError, match="non-zero"):
        landscape.loss_slice(op, torch.zeros(2), [0, 1])
    with pytest.raises(UsageError, match="at least two"):
        landscape.loss_slice(op, torch.ones(2), [0.0])
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        landscape.linear_interpolation(op, torch.zeros(2), torch.ones(2), t=[0, 2])
    with pytest.raises(UsageError, match="different architectures"):
        landscape.linear_interpolation(op, torch.zeros(3), torch.ones(2))
    with pytest.raises(UsageError, match="HessianOperator"):
        landscape.loss_at(object(), torch.zeros(2))
