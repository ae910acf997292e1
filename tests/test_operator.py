"""HessianOperator: exact Hessians of small nets for every engine, known spectra, state guarantees, errors."""

from __future__ import annotations

import collections
import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from optdiag.curvature.batches import (
    as_batch_list,
    batch_weights,
    first_tensor,
    iter_tensors,
    map_tensors,
    move_batch,
    sample_count,
)
from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.operator import METHODS, HessianOperator, supervised_loss
from optdiag.errors import NonFiniteError, NotTwiceDifferentiableError, UsageError
from tests.models import (
    DropoutMLP,
    ProductModel,
    TinyAttention,
    TinyCNN,
    TinyMLP,
    attention_batch,
    cnn_batch,
    half_squared_error,
    linear_net_problem,
    mlp_batch,
    product_batch,
    reference_gradient,
    reference_hessian,
    reference_loss,
)

ATOL = 1e-10
# torch.func.linearize traces the model (seconds per batch): its cases are marked slow.
_SLOW = {"linearize"}
ALL_METHODS = [pytest.param(m, marks=pytest.mark.slow) if m in _SLOW else m for m in METHODS]
ENGINES = [m for m in METHODS if m != "auto"]
ENGINE_PARAMS = [pytest.param(m, marks=pytest.mark.slow) if m in _SLOW else m for m in ENGINES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: thread start-up costs more than the arithmetic, and the test machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp_class_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = mlp_batch(n, seed)
    return x, torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 100))


def _case(name: str):
    """(model, criterion, two batches of different sizes) for each test network, float64."""
    torch.manual_seed(0)
    if name == "mlp":
        return TinyMLP().double(), nn.CrossEntropyLoss(), [_mlp_class_batch(6, 1), _mlp_class_batch(3, 2)]
    if name == "cnn_bn_train":
        return TinyCNN().double().train(), nn.CrossEntropyLoss(), [cnn_batch(6, 1), cnn_batch(3, 2)]
    if name == "cnn_bn_eval":
        model = TinyCNN().double()
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        return model.eval(), nn.CrossEntropyLoss(), [cnn_batch(6, 1), cnn_batch(3, 2)]
    if name == "attention":
        return TinyAttention().double(), nn.CrossEntropyLoss(), [attention_batch(5, 1), attention_batch(2, 2)]
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# Exact Hessians


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn_bn_train", "cnn_bn_eval", "attention"])
def test_dense_hessian_matches_autograd_reference(name, method):
    model, criterion, batches = _case(name)
    expected = reference_hessian(model, criterion, batches)  # sample-weighted mean over batches of sizes n1 != n2
    with HessianOperator(model, supervised_loss(criterion), batches, method=method) as op:
        dense = op.to_dense()
        assert op.n_hvp == op.num_params == expected.shape[0]
        torch.testing.assert_close(dense, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(op.gradient(), reference_gradient(model, criterion, batches), atol=ATOL, rtol=0)
        assert op.loss == pytest.approx(float(reference_loss(model, criterion, batches)), abs=1e-12)


@pytest.mark.parametrize("method", ENGINE_PARAMS)
def test_vectorised_matmat_equals_one_product_per_column(method):
    model, criterion, batches = _case("cnn_bn_train")
    op = HessianOperator(model, supervised_loss(criterion), batches, method=method)
    op.matmat_chunk = 3  # several chunks, the last one partial
    vectors = torch.randn(op.num_params, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    columns = torch.stack([op @ vectors[:, j] for j in range(7)], dim=1)
    torch.testing.assert_close(op @ vectors, columns, atol=1e-13, rtol=0)
    assert op.n_hvp == 14


def test_mse_loss_with_reverse_mode_engines():
    torch.manual_seed(0)
    model, batches = TinyMLP().double(), [mlp_batch(4, 1), mlp_batch(7, 2)]
    expected = reference_hessian(model, nn.MSELoss(), batches)
    for method in ("graph", "recompute"):
        op = HessianOperator(model, supervised_loss(nn.MSELoss()), batches, method=method)
        torch.testing.assert_close(op.to_dense(), expected, atol=ATOL, rtol=0)


def test_explicit_batch_sizes_set_the_weights():
    model, criterion, batches = _case("mlp")
    expected = reference_hessian(model, criterion, batches, weights=[0.25, 0.75])
    op = HessianOperator(model, supervised_loss(criterion), batches, batch_sizes=[1, 3])
    assert op.weights == [0.25, 0.75]
    torch.testing.assert_close(op.to_dense(), expected, atol=ATOL, rtol=0)


def test_batches_from_a_generator_and_a_dict_batch():
    model, criterion, batches = _case("mlp")
    expected = reference_hessian(model, criterion, batches)
    as_dicts = ({"x": x, "y": y} for x, y in batches)
    op = HessianOperator(model, supervised_loss(criterion), as_dicts)
    torch.testing.assert_close(op.to_dense(), expected, atol=ATOL, rtol=0)


def test_single_batch_is_not_mistaken_for_a_list_of_batches():
    model, criterion, batches = _case("mlp")
    op = HessianOperator(model, supervised_loss(criterion), batches[0])
    assert op.weights == [1.0]
    torch.testing.assert_close(op.to_dense(), reference_hessian(model, criterion, batches[:1]), atol=ATOL, rtol=0)


def test_two_layer_linear_net_at_origin_has_eigenvalues_plus_minus_singular_values():
    model, batch, target_map = linear_net_problem(d_in=3, hidden=2, d_out=2)
    op = HessianOperator(model, supervised_loss(half_squared_error), batch)
    sigma = torch.linalg.svdvals(target_map)
    hidden, zeros = 2, 2 * (3 - 2)  # each +-sigma_i once per hidden unit, hidden * |d_in - d_out| zeros
    expected = torch.cat([-sigma.repeat(hidden), torch.zeros(zeros, dtype=torch.float64), sigma.repeat(hidden)])
    eigenvalues = torch.linalg.eigvalsh(op.to_dense())
    torch.testing.assert_close(eigenvalues, expected.sort().values, atol=1e-12, rtol=0)
    assert torch.count_nonzero(op.gradient()) == 0


@pytest.mark.parametrize("a, lambda_max", [(1.0, 4.0), (10.0, 200.02)])
def test_product_model_lambda_max(a, lambda_max):
    op = HessianOperator(ProductModel(a, 1.0 / a).double(), supervised_loss(nn.MSELoss()), product_batch())
    eigenvalues = torch.linalg.eigvalsh(op.to_dense())
    assert float(eigenvalues[-1]) == pytest.approx(lambda_max, rel=1e-12)
    assert float(eigenvalues[0]) == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(op.gradient(), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_unused_parameters_get_zero_rows():
    torch.manual_seed(0)
    model = TinyMLP().double()
    model.unused = nn.Linear(2, 2).double()
    op = HessianOperator(model, supervised_loss(nn.MSELoss()), mlp_batch(5, 1))
    dense = op.to_dense()
    tail = model.unused.weight.numel() + model.unused.bias.numel()
    assert op.num_params == 43 + tail
    assert torch.count_nonzero(dense[-tail:]) == 0 and torch.count_nonzero(dense[:, -tail:]) == 0
    assert torch.count_nonzero(op.gradient()[-tail:]) == 0


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = TinyMLP().double()
    model.fc1.requires_grad_(False)
    criterion, batch = nn.MSELoss(), mlp_batch(5, 1)
    op = HessianOperator(model, supervised_loss(criterion), batch)
    assert op.num_params == model.fc2.weight.numel() + model.fc2.bias.numel()
    torch.testing.assert_close(op.to_dense(), reference_hessian(model, criterion, [batch]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["graph", "func"])
def test_dtype_computes_in_float64_for_a_float32_model(method):
    torch.manual_seed(0)
    model = TinyMLP()
    x, _ = mlp_batch(6, 1, dtype=torch.float32)
    y = torch.randint(0, 3, (6,))
    weights_before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, supervised_loss(nn.CrossEntropyLoss()), (x, y), dtype=torch.float64, method=method)
    assert op.dtype == torch.float64
    expected = reference_hessian(_as_double(model), nn.CrossEntropyLoss(), [(x.double(), y)])
    torch.testing.assert_close(op.to_dense(), expected, atol=ATOL, rtol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights_before))


def _as_double(model: nn.Module) -> nn.Module:
    double = TinyMLP().double()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return double


def test_auto_uses_the_graph_when_it_fits_and_recomputes_when_not():
    model, criterion, batches = _case("cnn_bn_train")
    roomy = HessianOperator(model, supervised_loss(criterion), batches)
    tight = HessianOperator(model, supervised_loss(criterion), batches, memory_budget=0)
    assert roomy.method == "graph" and tight.method == "recompute"
    assert roomy.graph_bytes > 0
    v = torch.randn(roomy.num_params, dtype=torch.float64)
    torch.testing.assert_close(roomy @ v, tight @ v, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Do no harm


def _stateful_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3), nn.BatchNorm1d(3)
    ).double()
    model.train()
    model[5].eval()  # a mixed configuration: the last BatchNorm uses running statistics
    model[5].running_mean.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("method", ENGINE_PARAMS)
def test_model_state_is_unchanged_by_construction_products_and_close(method):
    model = _stateful_model()
    existing = torch.randn_like(model[0].weight)
    model[0].weight.grad = existing
    existing_copy = existing.clone()
    buffers = {name: (buf, buf.clone()) for name, buf in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    expected_draws = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(11), np.random.seed(11), random.seed(11)

    op = HessianOperator(model, supervised_loss(nn.CrossEntropyLoss()), _mlp_class_batch(8, 3), method=method)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first, second = op @ v, op @ v
    op.close()

    assert torch.equal(first, second)  # one dropout mask for the operator's life
    for name, buf in model.named_buffers():
        assert buf is buffers[name][0] and torch.equal(buf, buffers[name][1]), name
    assert [m.training for m in model.modules()] == modes
    assert model[0].weight.grad is existing and torch.equal(existing, existing_copy)
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    draws = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_dropout_mask_is_the_same_for_every_engine():
    torch.manual_seed(0)
    model = DropoutMLP().double().train()
    batch = (mlp_batch(8, 1)[0], torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(0)))
    loss_fn = supervised_loss(nn.CrossEntropyLoss())
    dense = {}
    for method in ENGINES:
        torch.manual_seed(42)  # the operator snapshots the RNG at construction
        dense[method] = HessianOperator(model, loss_fn, batch, method=method).to_dense()
    for method in ENGINES[1:]:
        torch.testing.assert_close(dense[method], dense["graph"], atol=ATOL, rtol=0)
    torch.manual_seed(43)
    other_mask = HessianOperator(model, loss_fn, batch).to_dense()
    assert not torch.allclose(other_mask, dense["graph"])  # dropout really is active in train mode


@pytest.mark.parametrize("method", ["recompute", "func"])
def test_loss_drawing_from_numpy_and_python_rngs_is_replayed(method):
    model, criterion, batches = _case("mlp")

    def noisy_loss(m, batch):
        x, y = batch
        noise = torch.from_numpy(np.random.standard_normal(x.shape)) * random.random()
        return criterion(m(x + noise), y)

    np.random.seed(5), random.seed(5)
    expected = (np.random.rand(), random.random())
    np.random.seed(5), random.seed(5)
    op = HessianOperator(model, noisy_loss, batches, method=method)
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)  # the same noise every product
    assert (np.random.rand(), random.random()) == expected  # and the global streams never moved


def test_graph_survives_the_model_training_on_between_products():
    # The kept graph must not have saved the model's own BatchNorm buffers: a training forward updates them in
    # place, which would break autograd's version counters at the next product.
    model, criterion, batches = _case("cnn_bn_train")
    op = HessianOperator(model, supervised_loss(criterion), batches, method="graph")
    v = torch.randn(op.num_params, dtype=torch.float64)
    before = op @ v
    model(cnn_batch(4, 9)[0])  # updates running_mean / running_var / num_batches_tracked in place
    torch.testing.assert_close(op @ v, before, atol=0, rtol=0)


def test_works_under_no_grad_and_refuses_inference_mode():
    model, criterion, batches = _case("mlp")
    with torch.no_grad():
        op = HessianOperator(model, supervised_loss(criterion), batches)
        dense = op.to_dense()
    torch.testing.assert_close(dense, reference_hessian(model, criterion, batches), atol=ATOL, rtol=0)
    with torch.inference_mode(), pytest.raises(UsageError, match="inference_mode"):
        HessianOperator(model, supervised_loss(criterion), batches)


def test_autocast_is_disabled_inside():
    model, criterion, batches = _case("mlp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = HessianOperator(model, supervised_loss(criterion), batches).to_dense()
    torch.testing.assert_close(dense, reference_hessian(model, criterion, batches), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Errors


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _OnceMLP(TinyMLP):
    def forward(self, x):
        return self.fc2(_OnceSquare.apply(self.fc1(x)))


class _OnceOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return _OnceSquare.apply(self.w) * x


@pytest.mark.parametrize(
    "model, in_features", [(_OnceMLP().double(), 4), (_OnceOutput(), 3)], ids=["error-node", "no-grad-fn"]
)
def test_once_differentiable_backward_is_refused_at_construction(model, in_features):
    batch = (torch.ones(4, in_features, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(NotTwiceDifferentiableError, match="once_differentiable"):
        HessianOperator(model, supervised_loss(nn.MSELoss()), batch)


def test_non_scalar_loss_is_a_usage_error():
    model, _, batches = _case("mlp")
    with pytest.raises(UsageError, match="scalar"):
        HessianOperator(model, lambda m, b: m(b[0]), batches)


def test_non_finite_loss_is_reported():
    model, criterion, batches = _case("mlp")
    x, y = batches[0]
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="loss of batch 0"):
        HessianOperator(model, supervised_loss(criterion), (x, y))


def test_loss_that_ignores_the_parameters_is_a_usage_error():
    model, criterion, batches = _case("mlp")
    with pytest.raises(UsageError, match="does not depend"):
        HessianOperator(model, lambda m, b: criterion(m(b[0]).detach(), b[1]), batches)


def test_model_without_trainable_parameters_is_a_value_error():
    model = TinyMLP().double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, supervised_loss(nn.MSELoss()), mlp_batch(3, 0))


@pytest.mark.parametrize(
    "kwargs, batches, match",
    [
        ({}, [], "empty"),
        ({"method": "lanczos"}, None, "method"),
        ({"batch_sizes": [1]}, None, "2 batches"),
        ({"batch_sizes": [1, 0]}, None, "positive"),
        ({"dtype": torch.int64}, None, "dtype"),
        ({"memory_budget": -1}, None, "memory_budget"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, batches, match):
    model, criterion, default_batches = _case("mlp")
    with pytest.raises(UsageError, match=match):
        HessianOperator(model, supervised_loss(criterion), default_batches if batches is None else batches, **kwargs)


def test_closed_operator_refuses_products():
    model, criterion, batches = _case("mlp")
    op = HessianOperator(model, supervised_loss(criterion), batches)
    op.close()
    with pytest.raises(UsageError, match="closed"):
        op @ torch.zeros(op.num_params, dtype=torch.float64)


def test_supervised_loss_validates_criterion_and_batch():
    with pytest.raises(UsageError, match="reduction"):
        supervised_loss(nn.MSELoss(reduction="sum"))
    with pytest.raises(UsageError, match="callable"):
        supervised_loss(3)
    loss_fn = supervised_loss(F.mse_loss)
    with pytest.raises(UsageError, match="'x' and 'y'"):
        loss_fn(nn.Identity(), {"inputs": torch.ones(2)})
    with pytest.raises(UsageError, match="length 3"):
        loss_fn(nn.Identity(), (torch.ones(2), torch.ones(2), torch.ones(2)))
    assert float(loss_fn(nn.Identity(), {"x": torch.ones(2), "y": torch.zeros(2)})) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The objective behind the operator, and the batch conventions


def _at(model: nn.Module, theta: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with its (all trainable) parameters set to the flat ``theta``."""
    moved = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, moved.parameters())
    return moved


def test_objective_equals_the_dense_reference_away_from_the_point_and_leaves_batchnorm_alone():
    model, criterion, batches = _case("cnn_bn_train")  # train-mode BatchNorm: a forward would update its buffers
    buffers = {name: (buf, buf.clone()) for name, buf in model.named_buffers()}
    f = BatchObjective(model, supervised_loss(criterion), batches)
    d = torch.randn(f.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta = f.point() + 0.1 * d
    value, gradient = f.value_and_grad(theta)
    shifted = _at(model, theta)
    assert value == pytest.approx(float(reference_loss(shifted, criterion, batches)), rel=1e-13)
    torch.testing.assert_close(gradient, reference_gradient(shifted, criterion, batches), atol=ATOL, rtol=0)
    assert f.value(theta) == value and f.n_evals == 2
    assert f.weights == [6 / 9, 3 / 9]
    torch.testing.assert_close(f.point(), torch.nn.utils.parameters_to_vector(model.parameters()), atol=0, rtol=0)
    for name, buf in model.named_buffers():
        assert buf is buffers[name][0] and torch.equal(buf, buffers[name][1]), name


def test_operator_objective_is_its_loss_with_its_dropout_mask():
    torch.manual_seed(0)
    model = DropoutMLP().double().train()
    batches = [_mlp_class_batch(8, 1), _mlp_class_batch(5, 2)]
    batches = [(x, y % 2) for x, y in batches]
    loss_fn = supervised_loss(nn.CrossEntropyLoss())
    torch.manual_seed(42)
    op = HessianOperator(model, loss_fn, batches)
    before = torch.get_rng_state()
    f = op.objective
    value, gradient = f.value_and_grad(f.point())
    assert value == pytest.approx(op.loss, rel=1e-14)
    torch.testing.assert_close(gradient, op.gradient(), atol=1e-14, rtol=0)
    assert f.value(f.point()) == value  # the same draws at every evaluation
    torch.manual_seed(42)
    assert BatchObjective(model, loss_fn, batches).value(f.point()) == value  # built at the same RNG state
    torch.manual_seed(43)
    assert BatchObjective(model, loss_fn, batches).value(f.point()) != pytest.approx(value)  # dropout is active
    torch.set_rng_state(before)
    f.value(f.point() + 0.01)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream never moves


def test_objective_batches_draw_from_one_stream_whatever_order_they_are_first_evaluated_in():
    torch.manual_seed(0)
    model = DropoutMLP().double().train()
    batches = [(mlp_batch(6, seed)[0], torch.zeros(6, dtype=torch.long)) for seed in (1, 2)]
    loss_fn = supervised_loss(nn.CrossEntropyLoss())
    torch.manual_seed(7)
    in_order = BatchObjective(model, loss_fn, batches)
    expected = [float(in_order.loss(0).detach()), float(in_order.loss(1).detach())]
    torch.manual_seed(7)
    backwards = BatchObjective(model, loss_fn, batches)
    with pytest.raises(UsageError, match="not been evaluated"):
        backwards.replaying(1)
    assert [float(backwards.loss(1).detach()), float(backwards.loss(0).detach())] == expected[::-1]
    assert expected[0] != expected[1]


def test_objective_value_can_return_a_non_finite_loss_and_checks_the_point():
    model = nn.Linear(1, 1, bias=False).double()
    f = BatchObjective(model, lambda m, b: (1.0 / m(b) ** 2).mean(), torch.ones(4, 1, dtype=torch.float64))
    assert f.value(torch.tensor([0.5], dtype=torch.float64)) == 4.0
    assert f.value(torch.zeros(1, dtype=torch.float64), finite=False) == math.inf
    with pytest.raises(NonFiniteError, match="loss of batch 0"):
        f.value(torch.zeros(1, dtype=torch.float64))
    with pytest.raises(UsageError, match="length 1"):
        f.value(torch.zeros(2, dtype=torch.float64))


Pair = collections.namedtuple("Pair", "x y")


def test_batch_conventions():
    x, y = torch.zeros(6, 3), torch.zeros(6, dtype=torch.long)
    assert len(as_batch_list((x, y))) == 1 and len(as_batch_list([(x, y), (x, y)])) == 2
    assert len(as_batch_list(iter([x, x, x]))) == 3 and as_batch_list([]) == []
    with pytest.raises(UsageError, match="iterable of batches"):
        as_batch_list(3)
    nested = {"meta": ("id", torch.ones(2)), "x": x}
    assert [t.shape for t in iter_tensors(nested)] == [torch.Size([2]), torch.Size([6, 3])]
    assert first_tensor(["no", "tensors"]) is None and sample_count(nested) == 2
    with pytest.raises(UsageError, match="batch 4.*batch_sizes"):
        sample_count(("text", torch.tensor(1.0)), 4)
    assert batch_weights([(x, y), (x[:2], y[:2])]) == [0.75, 0.25]
    assert batch_weights([None, None], [1, 3]) == [0.25, 0.75]
    with pytest.raises(UsageError, match="batch size 1 must be a positive number"):
        batch_weights([x, x], [1, 0])
    pair = map_tensors(Pair(x, [y, "label"]), lambda t: t[:2])
    assert isinstance(pair, Pair) and pair.x.shape == (2, 3) and pair.y[0].shape == (2,) and pair.y[1] == "label"
    moved = move_batch({"x": x, "y": y}, torch.device("cpu"), torch.float64)
    assert moved["x"].dtype == torch.float64 and moved["y"].dtype == torch.long
