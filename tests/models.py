"""Tiny models with known curvature, shared by the test suite (import as ``from tests.models import ...``).

Every model is small enough that its dense Hessian takes milliseconds. ``reference_hessian`` and
``reference_gradient`` compute the exact answers independently of optdiag (``torch.autograd.functional.hessian`` of
the loss as a function of one flat parameter vector, through ``torch.func.functional_call`` on a deep copy).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "TinyMLP",
    "DropoutMLP",
    "TinyCNN",
    "TinyAttention",
    "TwoLayerLinear",
    "ProductModel",
    "half_squared_error",
    "whitened_inputs",
    "linear_net_problem",
    "product_batch",
    "mlp_batch",
    "cnn_batch",
    "attention_batch",
    "reference_loss",
    "reference_gradient",
    "reference_hessian",
]


class TinyMLP(nn.Module):
    """``Linear(4, 5) -> tanh -> Linear(5, 3)``: 43 parameters, smooth everywhere."""

    def __init__(self, in_features: int = 4, hidden: int = 5, out_features: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class DropoutMLP(nn.Module):
    """``Linear(4, 6) -> tanh -> Dropout(0.5) -> Linear(6, 2)``: random in train mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class TinyCNN(nn.Module):
    """``Conv2d(1, 2, 3) -> BatchNorm2d(2) -> tanh -> Linear(18, 3)`` on ``1 x 5 x 5`` images: 81 parameters.

    In train mode BatchNorm normalises with the batch's own statistics, which couples the samples of a batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class TinyAttention(nn.Module):
    """Pre-norm self-attention block (LayerNorm, 2 heads via ``F.scaled_dot_product_attention``, residual), mean
    pooled over tokens, then a linear head. Input ``(batch, tokens, dim)``."""

    def __init__(self, dim: int = 4, heads: int = 2, out_features: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return self.head(x.mean(dim=1))


class TwoLayerLinear(nn.Module):
    """``y = W2 W1 x`` without biases. At ``W = 0`` with whitened inputs and targets ``A x``, the loss
    ``half_squared_error`` has zero gradient and Hessian eigenvalues ``+-sigma_i(A)``, each ``hidden`` times, plus
    ``hidden * |d_in - d_out|`` zeros (docs/theory.md section 3)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, zero: bool = True) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_out, bias=False)
        if zero:
            nn.init.zeros_(self.w1.weight)
            nn.init.zeros_(self.w2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.w1(x))


class ProductModel(nn.Module):
    """Two scalars ``t1, t2``; ``forward(x) = t1 * t2 * x``. With ``x = 1`` and target 1 under the mean squared
    error the loss is ``(t1 t2 - 1)^2``; at ``(a, 1/a)`` its Hessian ``[[2/a^2, 2], [2, 2a^2]]`` has
    ``lambda_max = 2(a^2 + a^-2)`` and ``lambda_min = 0`` (docs/theory.md section 5)."""

    def __init__(self, t1: float = 1.0, t2: float = 1.0) -> None:
        super().__init__()
        # float64 from the start: 1/a rounded to float32 would move lambda_max by ~1e-9 relative.
        self.t1 = nn.Parameter(torch.tensor(float(t1), dtype=torch.float64))
        self.t2 = nn.Parameter(torch.tensor(float(t2), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t1 * self.t2 * x


def half_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``0.5 * |prediction - target|^2`` summed over features, averaged over the batch."""
    return 0.5 * (prediction - target).pow(2).sum(dim=-1).mean()


def whitened_inputs(n: int, d: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n x d`` inputs with ``X^T X / n = I`` exactly (scaled orthonormal columns)."""
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=generator, dtype=dtype))
    return q * math.sqrt(n)


def linear_net_problem(
    d_in: int = 3, hidden: int = 2, d_out: int = 2, n: int = 12, seed: int = 0
) -> tuple[TwoLayerLinear, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The 2-layer linear net at ``W = 0`` (float64), a whitened batch ``(x, A x)`` and the target map ``A``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = whitened_inputs(n, d_in, g)
    return TwoLayerLinear(d_in, hidden, d_out).double(), (x, x @ a.T), a


def product_batch(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ones, so that ``ProductModel`` under MSE has loss ``(t1 t2 - 1)^2``."""
    return torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)


def mlp_batch(n: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression batch for ``TinyMLP``: inputs ``(n, 4)``, targets ``(n, 3)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def cnn_batch(n: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification batch for ``TinyCNN``: images ``(n, 1, 5, 5)``, labels in ``{0, 1, 2}``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def attention_batch(n: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification batch for ``TinyAttention``: ``(n, 3, 4)`` token sequences, labels in ``{0, 1}``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, generator=g, dtype=dtype), torch.randint(0, 2, (n,), generator=g)


# ---------------------------------------------------------------------------------------------------------------
# Independent references


def _flat_loss(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Optional[Sequence[float]],
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    shadow = copy.deepcopy(model)  # its buffers may be written by train-mode forwards; the original's are not
    named = [(name, p) for name, p in shadow.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    if weights is None:
        counts = [b[0].shape[0] for b in batches]
        weights = [c / sum(counts) for c in counts]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = {name: piece.view(shape) for (name, _), piece, shape in zip(named, flat.split(sizes), shapes)}
        return sum(w * criterion(torch.func.functional_call(shadow, params, (x,)), y)
                   for w, (x, y) in zip(weights, batches))

    point = torch.cat([p.detach().reshape(-1) for _, p in named])
    return loss, point


def reference_loss(model, criterion, batches, weights=None) -> torch.Tensor:
    """The sample-weighted mean loss over ``(x, y)`` batches, computed on a copy of the model."""
    loss, point = _flat_loss(model, criterion, batches, weights)
    return loss(point)


def reference_gradient(model, criterion, batches, weights=None) -> torch.Tensor:
    """Flat gradient of the weighted mean loss by plain autograd on a copy of the model."""
    loss, point = _flat_loss(model, criterion, batches, weights)
    point = point.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(point), point)
    return grad


def reference_hessian(model, criterion, batches, weights=None) -> torch.Tensor:
    """Dense Hessian of the weighted mean loss via ``torch.autograd.functional.hessian`` on a copy of the model."""
    loss, point = _flat_loss(model, criterion, batches, weights)
    # Fused attention kernels have no double backward; the math kernel computes the same function.
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss, point)
