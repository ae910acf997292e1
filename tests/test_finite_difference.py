"""The finite-difference Hessian-vector product: accuracy against dense Hessians, exactness on quadratics, do no
harm, fused attention without double backward, and the automatic choice of method."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from optdiag.curvature import hessian_trace, top_eigenvalues
from optdiag.curvature.operator import (
    FiniteDifferenceOperator,
    HessianOperator,
    choose_hvp_method,
    make_hessian_operator,
    supervised_loss,
)
from optdiag.errors import NotTwiceDifferentiableError, UsageError
from tests.lightning_models import build_mlp
from tests.models import TinyMLP, mlp_batch, reference_hessian

MSE = supervised_loss(nn.MSELoss())
CE = supervised_loss(nn.CrossEntropyLoss())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_dense_matrix_matches_the_exact_hessian_of_a_small_net(dtype, tolerance):
    # float64: ~1e-10 measured, float32: ~1e-4 (docs/finite-difference-and-fsdp.md gives both and the tolerances)
    torch.manual_seed(0)
    model = TinyMLP().to(dtype)
    x, y = mlp_batch(32, seed=1, dtype=dtype)
    exact = reference_hessian(model.double(), nn.MSELoss(), [(x.double(), y.double())])
    op = FiniteDifferenceOperator(model.to(dtype), MSE, (x, y))
    assert op.num_params == 43 and op.method == "finite_difference"
    assert _relative(op.to_dense().double(), exact) < tolerance


def test_the_product_of_a_quadratic_loss_is_exact_in_float64():
    # least squares: the gradient is affine in the parameters, so central differences have no truncation error
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    hessian = 2 * design.T @ design / 40  # flat order: weight (5), then bias
    v = torch.randn(6, generator=g, dtype=torch.float64)
    # only rounding is left, and it shrinks as 1/eps: a step 10^5 times the default's is exact to 1e-14
    huge = FiniteDifferenceOperator(model, MSE, (x, y), step_scale=1e4)
    assert _relative(huge @ v, hessian @ v) < 1e-14
    op = FiniteDifferenceOperator(model, MSE, (x, y))
    assert _relative(op @ v, hessian @ v) < 1e-9
    top = top_eigenvalues(op, k=1, tol=1e-10)
    assert float(top.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-9)
    assert op.errors and op.errors[0] < 1e-9  # the error estimate of the first product sees as little


def test_products_are_counted_for_the_budget_and_the_error_check_counts_as_one():
    x, y = mlp_batch(16, seed=2)
    op = FiniteDifferenceOperator(TinyMLP().double(), MSE, (x, y), error_checks=1)
    assert op.n_hvp == 0 and op.n_gradients == 1  # the point's own gradient
    op @ torch.ones(op.num_params, dtype=torch.float64)
    assert op.n_hvp == 2 and op.n_gradients == 5  # the product and its check at twice the step
    op @ torch.ones(op.num_params, 3, dtype=torch.float64)
    assert op.n_hvp == 5 and op.n_gradients == 11 and len(op.errors) == 1
    result = hessian_trace(op, n_hvp=9, seed=0)
    assert result.n_hvp == 9 and op.n_hvp == 14


def test_trace_and_eigenvalues_agree_with_the_exact_operator():
    x, y = mlp_batch(24, seed=4)
    model = TinyMLP().double()
    dense = reference_hessian(model, nn.MSELoss(), [(x, y)])
    eig = torch.linalg.eigvalsh(dense)
    fd = FiniteDifferenceOperator(model, MSE, (x, y))
    top = top_eigenvalues(fd, k=2, which="LA", tol=1e-8, max_hvp=43)
    assert top.eigenvalues.tolist() == pytest.approx(eig[-2:].flip(0).tolist(), rel=1e-7)
    bottom = top_eigenvalues(fd, k=1, which="SA", tol=1e-8, max_hvp=43)
    assert float(bottom.eigenvalues[0]) == pytest.approx(float(eig[0]), rel=1e-6)
    # a Hutch++ sketch of all 43 directions: the trace up to the products' own error
    assert hessian_trace(fd, n_hvp=3 * 43, seed=0).estimate == pytest.approx(float(dense.trace()), rel=1e-7)


def test_the_step_follows_the_dtype_the_parameters_and_the_direction():
    x, y = mlp_batch(8, seed=5)
    op = FiniteDifferenceOperator(TinyMLP().double(), MSE, (x, y))
    v = torch.ones(op.num_params, dtype=torch.float64)
    expected = 0.1 * (2.0**-53) ** (1 / 3) * (1 + op.theta_norm) / float(v.norm())
    assert op.step(v) == pytest.approx(expected, rel=1e-12)
    assert op.step(3 * v) == pytest.approx(expected / 3, rel=1e-12)
    op32 = FiniteDifferenceOperator(TinyMLP().float(), MSE, (x.float(), y.float()), step_scale=1.0)
    assert op32.step(v.float()) == pytest.approx((2.0**-24) ** (1 / 3) * (1 + op32.theta_norm) / float(v.norm()),
                                                 rel=1e-6)
    assert op.step(torch.zeros_like(v)) == 0.0 and torch.equal(op @ torch.zeros_like(v), torch.zeros_like(v))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_bad_step_scale_is_refused_at_construction(bad):
    with pytest.raises(UsageError, match="step_scale"):
        FiniteDifferenceOperator(TinyMLP(), MSE, mlp_batch(4, seed=0, dtype=torch.float32), step_scale=bad)


def test_parameters_buffers_grad_and_rng_are_restored_bitwise():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    grad_objects = [p.grad for p in model.parameters()]
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    rng = torch.get_rng_state()
    op = FiniteDifferenceOperator(model, MSE, (x, y))
    first = op @ torch.ones(op.num_params)
    assert torch.equal(op @ torch.ones(op.num_params), first)  # the same dropout masks for every gradient
    top_eigenvalues(op, k=1, max_hvp=5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running statistics
    assert all(p.grad is g and torch.equal(g, c) for p, g, c in zip(model.parameters(), grad_objects, grads))
    assert torch.equal(torch.get_rng_state(), rng)


class FusedAttentionBlock(nn.Module):
    """A pre-norm transformer block (2-head self-attention and a GELU MLP, residuals) with mean pooling and a
    head; attention runs on ``backend``: the CPU flash kernel has a backward but no double backward."""

    def __init__(self, dim: int = 8, heads: int = 2, backend: SDPBackend = SDPBackend.FLASH_ATTENTION) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(self.backend):  # inside the model: overrides any kernel choice made around it
            attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def _attention_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 6, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_fused_attention_without_double_backward_gets_lambda_max_within_one_percent():
    torch.manual_seed(0)
    fused = FusedAttentionBlock()
    data = _attention_data()
    with pytest.raises(NotTwiceDifferentiableError):
        with HessianOperator(fused, CE, data) as exact:
            exact @ torch.ones(exact.num_params)
    method, reason = choose_hvp_method(fused, CE, data)
    assert method == "finite_difference" and "cannot be differentiated" in reason and "float32" in reason
    math_kernel = copy.deepcopy(fused)
    math_kernel.backend = SDPBackend.MATH
    reference = top_eigenvalues(HessianOperator(math_kernel, CE, data), k=1, tol=1e-6, max_hvp=100)
    op = make_hessian_operator(method, fused, CE, data)
    estimate = top_eigenvalues(op, k=1, tol=1e-4, max_hvp=60)
    assert float(estimate.eigenvalues[0]) == pytest.approx(float(reference.eigenvalues[0]), rel=1e-2)
    assert op.relative_error is not None and op.relative_error < 1e-2
    assert choose_hvp_method(math_kernel, CE, data)[0] == "exact"


def test_choose_hvp_method_validates_and_honours_a_forced_choice():
    model, data = build_mlp(activation="no_double_backward"), (torch.randn(8, 8), torch.randn(8, 1))
    assert choose_hvp_method(model, MSE, data)[0] == "finite_difference"
    assert choose_hvp_method(model, MSE, data, hvp="exact") == ("exact", "asked for")
    assert choose_hvp_method(build_mlp(), MSE, data, hvp="finite_difference")[0] == "finite_difference"
    with pytest.raises(UsageError, match="hvp must be one of"):
        choose_hvp_method(model, MSE, data, hvp="double_backward")


def test_a_compiled_model_has_no_double_backward_and_gets_finite_differences():
    torch.manual_seed(0)
    model = TinyMLP().double()
    compiled = torch.compile(model, backend="aot_eager")  # AOTAutograd's backward has no derivative
    data = mlp_batch(16, seed=6)
    method, reason = choose_hvp_method(compiled, MSE, data)
    assert method == "finite_difference" and "double backward" in reason
    op = make_hessian_operator(method, compiled, MSE, data)
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert _relative(op @ v, HessianOperator(model, MSE, data) @ v) < 1e-8


def test_auto_takes_finite_differences_when_the_exact_product_runs_out_of_memory(monkeypatch):
    # on an accelerator the exact product's math-kernel attention (O(L^2)) may not fit where the fused kernel did
    import optdiag.curvature.operator as operator_module

    class OutOfMemory(HessianOperator):
        def _matvec(self, v):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(operator_module, "HessianOperator", OutOfMemory)
    method, reason = choose_hvp_method(TinyMLP().double(), MSE, mlp_batch(4, seed=0))
    assert method == "finite_difference" and "does not fit in memory (CUDA out of memory" in reason


def test_solvers_without_reductions_over_ranks_refuse_sharded_operators():
    from optdiag.curvature import MatrixOperator, power_iteration, spectral_density
    from optdiag.curvature.lanczos import lanczos_tridiagonal

    class Sharded(MatrixOperator):  # stands for FSDP's shards (tests/test_fsdp.py runs the real ones)
        sharded = True

    op = Sharded(torch.eye(3))
    for solve in (lambda: power_iteration(op), lambda: spectral_density(op),
                  lambda: lanczos_tridiagonal(op, torch.ones(3), 2)):
        with pytest.raises(UsageError, match="sharded vectors"):
            solve()
    assert float(top_eigenvalues(op, k=1).eigenvalues[0]) == pytest.approx(1.0)  # sums over one "rank": itself
