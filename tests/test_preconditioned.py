"""PreconditionedOperator: P^-1/2 H P^-1/2 with P read from Adam/AdamW/RMSprop state, checked against dense algebra."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from optdiag.curvature.base import MatrixOperator
from optdiag.curvature.params import flatten, unflatten
from optdiag.curvature.preconditioned import PreconditionedOperator


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()


def tiny_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(16, 1, generator=gen, dtype=torch.float64)


def mse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return ((model(x) - y) ** 2).mean()


def dense_hessian(model: nn.Module, data) -> torch.Tensor:
    """The float64 Hessian of the loss in the flat parameter vector, by autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p for _, p in model.named_parameters()]

    def loss_at(flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, unflatten(flat, shapes)))
        x, y = data
        return ((torch.func.functional_call(model, params, (x,)) - y) ** 2).mean()

    point = flatten(p.detach() for p in model.parameters())
    return torch.autograd.functional.hessian(loss_at, point)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int) -> torch.Tensor:
    """Take ``steps`` optimizer steps; return the flat update of the last one."""
    for _ in range(steps):
        before = flatten(p.detach().clone() for p in model.parameters())
        optimizer.zero_grad()
        mse(model, data).backward()
        optimizer.step()
    return flatten(p.detach() for p in model.parameters()) - before


def flat_state(optimizer: torch.optim.Optimizer, model: nn.Module, key: str) -> torch.Tensor:
    return flatten(optimizer.state[p][key] for p in model.parameters())


def flat_grad(model: nn.Module) -> torch.Tensor:
    return flatten(p.grad for p in model.parameters())


def preconditioner_of(model, optimizer) -> torch.Tensor:
    op = MatrixOperator(torch.eye(sum(p.numel() for p in model.parameters()), dtype=torch.float64))
    return PreconditionedOperator.from_optimizer(op, optimizer, params=list(model.parameters())).preconditioner


# --- P as the optimizer actually uses it: recovered from the step it just took -----------------------------------


def test_adam_preconditioner_is_the_one_adam_divides_by():
    # Adam's update is -(lr / (1 - beta1^t)) m / P with the state after the step: solve the last update for P.
    model, data = tiny_net(), tiny_data()
    lr, beta1 = 0.01, 0.8
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, 0.95), eps=1e-3)
    update = train_steps(model, optimizer, data, steps=4)
    step = 4
    expected = -(lr / (1 - beta1**step)) * flat_state(optimizer, model, "exp_avg") / update
    torch.testing.assert_close(preconditioner_of(model, optimizer), expected, rtol=1e-9, atol=0)


def test_adam_reads_eps_and_betas_per_parameter_group():
    model, data = tiny_net(), tiny_data()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = torch.optim.Adam(
        [{"params": first, "eps": 1e-2, "betas": (0.5, 0.9)}, {"params": second, "eps": 1e-5, "betas": (0.9, 0.99)}],
        lr=0.01,
    )
    train_steps(model, optimizer, data, steps=3)
    expected = []
    for params, eps, beta2 in ((first, 1e-2, 0.9), (second, 1e-5, 0.99)):
        for p in params:
            v_hat = optimizer.state[p]["exp_avg_sq"] / (1 - beta2**3)
            expected.append(v_hat.sqrt() + eps)
    torch.testing.assert_close(preconditioner_of(model, optimizer), flatten(expected), rtol=1e-12, atol=0)


def test_adamw_with_weight_decay_uses_the_same_preconditioner():
    model, data = tiny_net(), tiny_data()
    lr, wd, beta1 = 0.01, 0.1, 0.9
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=1e-4)
    train_steps(model, optimizer, data, steps=2)
    before = flatten(p.detach().clone() for p in model.parameters())
    train_steps(model, optimizer, data, steps=1)
    # AdamW first shrinks the weights by (1 - lr wd), then takes the Adam step.
    adam_step = flatten(p.detach() for p in model.parameters()) - before * (1 - lr * wd)
    expected = -(lr / (1 - beta1**3)) * flat_state(optimizer, model, "exp_avg") / adam_step
    torch.testing.assert_close(preconditioner_of(model, optimizer), expected, rtol=1e-9, atol=0)


def test_amsgrad_uses_the_running_maximum():
    model, data = tiny_net(), tiny_data()
    lr, beta1 = 0.05, 0.9
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    update = train_steps(model, optimizer, data, steps=5)
    expected = -(lr / (1 - beta1**5)) * flat_state(optimizer, model, "exp_avg") / update
    torch.testing.assert_close(preconditioner_of(model, optimizer), expected, rtol=1e-9, atol=0)
    exp_avg_sq_only = flat_state(optimizer, model, "exp_avg_sq").div(1 - 0.999**5).sqrt() + 1e-8
    assert not torch.allclose(preconditioner_of(model, optimizer), exp_avg_sq_only)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_preconditioner_is_the_one_rmsprop_divides_by(centered):
    # RMSprop (no momentum) updates by -lr g / P: solve for P.
    model, data = tiny_net(), tiny_data()
    lr = 0.01
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, eps=1e-4, centered=centered)
    update = train_steps(model, optimizer, data, steps=3)
    expected = -lr * flat_grad(model) / update
    torch.testing.assert_close(preconditioner_of(model, optimizer), expected, rtol=1e-9, atol=0)


# --- the operator -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adam_problem():
    """A tiny tanh net after a few Adam steps: its dense Hessian, the optimizer and the preconditioner."""
    model, data = tiny_net(), tiny_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    train_steps(model, optimizer, data, steps=5)
    hessian = dense_hessian(model, data)
    return model, optimizer, hessian


def test_preconditioned_operator_equals_dense_product(adam_problem):
    model, optimizer, hessian = adam_problem
    pre = PreconditionedOperator.from_optimizer(MatrixOperator(hessian), optimizer, params=list(model.parameters()))
    p = pre.preconditioner
    expected = torch.diag(p.rsqrt()) @ hessian @ torch.diag(p.rsqrt())
    torch.testing.assert_close(pre.to_dense(), expected, rtol=1e-12, atol=1e-12)
    v = torch.randn(pre.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pre @ v, expected @ v, rtol=1e-12, atol=1e-12)


def test_top_eigenvalue_is_that_of_the_unsymmetric_p_inverse_h(adam_problem):
    model, optimizer, hessian = adam_problem
    pre = PreconditionedOperator.from_optimizer(MatrixOperator(hessian), optimizer, params=list(model.parameters()))
    p = pre.preconditioner.numpy()
    eigenvalues = scipy.linalg.eig(np.diag(1 / p) @ hessian.numpy(), right=False)
    assert np.abs(eigenvalues.imag).max() < 1e-8 * np.abs(eigenvalues).max()  # similar to a symmetric matrix
    symmetric = torch.linalg.eigvalsh(pre.to_dense())
    assert float(symmetric[-1]) == pytest.approx(eigenvalues.real.max(), rel=1e-10)
    assert float(symmetric[0]) == pytest.approx(eigenvalues.real.min(), rel=1e-8, abs=1e-10)
    # The preconditioner changes the answer: the plain Hessian's top eigenvalue is a different number.
    assert float(torch.linalg.eigvalsh(hessian)[-1]) != pytest.approx(eigenvalues.real.max(), rel=1e-2)


def test_top_eigenvalue_by_lanczos(adam_problem):
    from optdiag.curvature.lanczos import top_eigenvalues

    model, optimizer, hessian = adam_problem
    pre = PreconditionedOperator.from_optimizer(MatrixOperator(hessian), optimizer, params=list(model.parameters()))
    p = pre.preconditioner.numpy()
    expected = scipy.linalg.eig(np.diag(1 / p) @ hessian.numpy(), right=False).real.max()
    result = top_eigenvalues(pre, k=1, which="LA", tol=1e-8)
    assert float(result.eigenvalues[0]) == pytest.approx(expected, rel=1e-6)
    assert result.n_hvp == pre.n_hvp


def test_from_optimizer_with_hessian_operator_defaults_to_its_parameters():
    from optdiag.curvature.operator import HessianOperator

    model, data = tiny_net(), tiny_data()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01)
    train_steps(model, optimizer, data, steps=2)
    op = HessianOperator(model, mse, data)
    pre = PreconditionedOperator.from_optimizer(op, optimizer)
    expected = preconditioner_of(model, optimizer)
    torch.testing.assert_close(pre.preconditioner, expected.to(op.dtype))
    hessian = dense_hessian(model, data).to(op.dtype)
    dense = torch.diag(expected.rsqrt()).to(op.dtype) @ hessian @ torch.diag(expected.rsqrt()).to(op.dtype)
    torch.testing.assert_close(pre.to_dense(), dense, rtol=1e-6, atol=1e-8)


def test_n_hvp_counts_the_inner_operator():
    inner = MatrixOperator(torch.diag(torch.tensor([4.0, 9.0, 1.0])))
    pre = PreconditionedOperator(inner, torch.tensor([4.0, 1.0, 0.25]))
    torch.testing.assert_close(pre @ torch.ones(3), torch.tensor([1.0, 9.0, 4.0]))
    pre.to_dense()
    assert pre.n_hvp == inner.n_hvp == 4
    inner @ torch.ones(3)
    assert pre.n_hvp == 5


# --- bad input ---------------------------------------------------------------------------------------------------


def test_unsupported_optimizer_is_named():
    model, data = tiny_net(), tiny_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, data, steps=1)
    with pytest.raises(ValueError, match="SGD"):
        preconditioner_of(model, optimizer)


def test_parameter_without_state_is_a_clear_error():
    model = tiny_net()
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="not taken a step"):
        preconditioner_of(model, optimizer)


def test_parameter_the_optimizer_does_not_hold_is_a_clear_error():
    model, data = tiny_net(), tiny_data()
    optimizer = torch.optim.Adam(model[0].parameters())
    train_steps(model, optimizer, data, steps=1)
    with pytest.raises(ValueError, match="not among the parameters"):
        preconditioner_of(model, optimizer)


def test_params_must_match_the_operator_size():
    model, data = tiny_net(), tiny_data()
    optimizer = torch.optim.Adam(model.parameters())
    train_steps(model, optimizer, data, steps=1)
    with pytest.raises(ValueError, match="acts on 3"):
        PreconditionedOperator.from_optimizer(MatrixOperator(torch.eye(3)), optimizer, list(model.parameters()))
    with pytest.raises(ValueError, match="pass params"):
        PreconditionedOperator.from_optimizer(MatrixOperator(torch.eye(3)), optimizer)


@pytest.mark.parametrize(
    "preconditioner, match",
    [
        (torch.ones(2), "length 3"),
        (torch.ones(3, 1), "length 3"),
        (torch.tensor([1.0, 0.0, 1.0]), "strictly positive; 1 of 3"),
        (torch.tensor([1.0, -1.0, float("nan")]), "strictly positive; 2 of 3"),
        (torch.tensor([1.0, float("inf"), 1.0]), "finite"),
    ],
)
def test_bad_preconditioner_is_rejected(preconditioner, match):
    with pytest.raises(ValueError, match=match):
        PreconditionedOperator(MatrixOperator(torch.eye(3)), preconditioner)


def test_bad_types_are_rejected():
    with pytest.raises(TypeError, match="CurvatureOperator"):
        PreconditionedOperator(torch.eye(3), torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        PreconditionedOperator(MatrixOperator(torch.eye(3)), [1.0, 1.0, 1.0])
