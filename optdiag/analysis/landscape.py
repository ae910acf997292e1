"""Loss landscapes around a point: 1-D slices, 2-D surfaces and straight paths between checkpoints.

Every function evaluates the weighted mean loss of a :class:`~optdiag.curvature.HessianOperator` at
``theta + t d`` without touching the model, through the operator's own
:class:`~optdiag.curvature.objective.BatchObjective` (``op.objective``): parameters are substituted through
``torch.func.functional_call``, each batch replays the random draws of the operator (so dropout masks match its
Hessian), and the model's buffers, modes, ``.grad`` and RNGs are kept by :func:`~optdiag.curvature.preserved_state`.

Random directions are filter-normalised as in Li, Xu, Taylor, Studer & Goldstein (NeurIPS 2018, "Visualizing the
Loss Landscape of Neural Nets"): a Gaussian direction whose every filter (slice along a weight's first dimension:
an output neuron or a convolution filter) is rescaled to the norm of the same filter of the weights, with zero
entries for biases and other 1-D parameters, so that a step ``t = 1`` changes each filter by its own size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.params import flatten
from optdiag.curvature.state import preserved_state
from optdiag.diagnosis.types import to_jsonable
from optdiag.errors import UsageError

__all__ = [
    "LossSlice",
    "LossSurface",
    "InterpolationPath",
    "point_of",
    "loss_at",
    "filter_normalized_direction",
    "loss_slice",
    "loss_surface",
    "linear_interpolation",
]


def _plain(values: Any) -> list:
    """Numbers in their JSON form, by the package's one encoder (non-finite ones as ``"nan"``/``"inf"``)."""
    return to_jsonable(np.asarray(values, dtype=float).reshape(-1).tolist())


@dataclass
class LossSlice:
    """The loss along one direction: ``loss[i] = L(theta + t[i] d)``.

    Attributes:
        name: what the direction is (``"top eigenvector"``, ``"random (filter-normalised)"``, ...).
        t: the step sizes (0 is the point itself).
        loss: the loss at each step.
        slope: the directional derivative ``g . d`` at the point.
        curvature: ``d^T H d`` (the eigenvalue for a unit eigenvector).
        quadratic: the second-order model ``L(theta) + slope t + curvature t^2 / 2`` on the same steps.
        direction_norm: ``|d|`` (1 for eigenvectors; the size of the weights for a filter-normalised one).
    """

    name: str
    t: np.ndarray
    loss: np.ndarray
    slope: float
    curvature: float
    quadratic: np.ndarray
    direction_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "t": _plain(self.t),
            "loss": _plain(self.loss),
            "slope": to_jsonable(float(self.slope)),
            "curvature": to_jsonable(float(self.curvature)),
            "quadratic": _plain(self.quadratic),
            "direction_norm": to_jsonable(float(self.direction_norm)),
        }


@dataclass
class LossSurface:
    """The loss on a grid: ``loss[i, j] = L(theta + alphas[i] d1 + betas[j] d2)``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    names: tuple[str, str] = ("top eigenvector 1", "top eigenvector 2")

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": _plain(self.alphas),
            "betas": _plain(self.betas),
            "loss": [_plain(row) for row in self.loss],
            "names": list(self.names),
        }


@dataclass
class InterpolationPath:
    """The loss on the straight line ``(1 - t) theta_a + t theta_b``.

    Attributes:
        t: the interpolation steps, from 0 (``theta_a``) to 1 (``theta_b``).
        loss: the loss at each step.
        barrier: ``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` (Entezari et al. 2022, "The Role of Permutation
            Invariance in Linear Mode Connectivity"): how far the path rises above the chord between the
            endpoints; about 0 when the two points are linearly connected.
        distance: ``|theta_b - theta_a|``.
    """

    t: np.ndarray
    loss: np.ndarray
    barrier: float
    distance: float
    labels: tuple[str, str] = field(default=("start", "end"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.labels[0],
            "to": self.labels[1],
            "t": _plain(self.t),
            "loss": _plain(self.loss),
            "barrier": to_jsonable(float(self.barrier)),
            "distance": to_jsonable(float(self.distance)),
        }


def _objective(op: Any) -> BatchObjective:
    """The operator's objective, or a clear error for anything that is not a HessianOperator."""
    objective = getattr(op, "objective", None)
    if not isinstance(objective, BatchObjective):
        raise UsageError(f"expected a HessianOperator (the loss landscape reuses its batches), got {type(op).__name__}")
    return objective


def point_of(op: Any) -> torch.Tensor:
    """The flat trainable parameters the operator sits at (a copy)."""
    return _objective(op).point()


def loss_at(op: Any, params: torch.Tensor) -> float:
    """The operator's weighted mean loss at flat parameters ``params`` (the model keeps its own).

    Example:
        >>> from torch import nn
        >>> from optdiag.curvature import HessianOperator, supervised_loss
        >>> net = nn.Linear(2, 1, bias=False); _ = net.weight.data.zero_()
        >>> op = HessianOperator(net, supervised_loss(nn.MSELoss()), (torch.ones(4, 2), torch.ones(4, 1)))
        >>> loss_at(op, torch.tensor([0.5, 0.5]))
        0.0
    """
    objective = _objective(op)
    with preserved_state(op.model), torch.no_grad():
        return objective.value(params, finite=False)


def filter_normalized_direction(op: Any, seed: int = 0, ignore_1d: bool = True) -> torch.Tensor:
    """A random direction normalised filter by filter to the weights (Li et al. 2018).

    For a weight of shape ``(out, ...)`` each slice ``d[i]`` is drawn Gaussian and rescaled to ``|theta[i]|``;
    1-D parameters (biases, normalisation scales) get zeros when ``ignore_1d`` (the paper's choice), else are
    treated as one filter each. When that leaves nothing (all filters zero, e.g. at ``theta = 0``) the result is a
    Gaussian direction of unit norm.

    Args:
        op: the operator whose point and parameter layout to use.
        seed: seeds a private CPU generator (the global RNG is untouched).
        ignore_1d: zero the direction on 1-D parameters.

    Returns:
        A flat direction on the operator's device and dtype.

    Example:
        >>> from torch import nn
        >>> from optdiag.curvature import HessianOperator, supervised_loss
        >>> net = nn.Linear(3, 2)
        >>> op = HessianOperator(net, supervised_loss(nn.MSELoss()), (torch.ones(4, 3), torch.ones(4, 2)))
        >>> d = filter_normalized_direction(op, seed=1)
        >>> w, b = d[:6].view(2, 3), d[6:]
        >>> torch.allclose(w.norm(dim=1), net.weight.detach().norm(dim=1)), bool((b == 0).all())
        (True, True)
    """
    objective = _objective(op)
    generator = torch.Generator().manual_seed(int(seed))
    pieces = []
    for leaf in objective.parameters:
        theta = leaf.detach().to("cpu", torch.float64)
        noise = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
        if theta.dim() <= 1:
            if ignore_1d:
                pieces.append(torch.zeros_like(theta))
                continue
            theta, noise = theta.reshape(1, -1), noise.reshape(1, -1)
        filters_theta = theta.reshape(theta.shape[0], -1)
        filters_noise = noise.reshape(theta.shape[0], -1)
        scale = filters_theta.norm(dim=1, keepdim=True) / filters_noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
        pieces.append((filters_noise * scale).reshape(leaf.shape))
    direction = flatten(pieces)
    if float(direction.norm()) == 0.0:
        direction = torch.randn(direction.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
    return direction.to(device=op.device, dtype=op.dtype)


def _steps(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    steps = np.asarray(values, dtype=float)
    if steps.ndim != 1 or steps.size < 2 or not np.all(np.isfinite(steps)):
        raise UsageError(f"{name} must be at least two finite numbers, got {values!r}")
    return steps


def _direction(op: Any, direction: torch.Tensor, name: str) -> torch.Tensor:
    direction = torch.as_tensor(direction).reshape(-1)
    if direction.numel() != op.num_params:
        raise UsageError(f"the {name} direction has {direction.numel()} entries, the model {op.num_params} parameters")
    if not torch.isfinite(direction).all() or float(direction.norm()) == 0.0:
        raise UsageError(f"the {name} direction must be finite and non-zero")
    return direction.to(device=op.device, dtype=op.dtype)


def loss_slice(op: Any, direction: torch.Tensor, t: Sequence[float], name: str = "direction") -> LossSlice:
    """``L(theta + t d)`` along one direction, with the second-order model from the gradient and one product.

    Example:
        >>> from torch import nn
        >>> from optdiag.curvature import HessianOperator, supervised_loss
        >>> net = nn.Linear(1, 1, bias=False); _ = net.weight.data.fill_(1.0)
        >>> op = HessianOperator(net, supervised_loss(nn.MSELoss()), (torch.ones(2, 1), torch.ones(2, 1)))
        >>> s = loss_slice(op, torch.ones(1), [-1.0, 0.0, 1.0])
        >>> s.loss.tolist(), s.curvature
        ([1.0, 0.0, 1.0], 2.0)
    """
    _objective(op)
    steps = _steps(t, "t")
    d = _direction(op, direction, name)
    theta = point_of(op)
    losses = np.array([loss_at(op, theta + float(step) * d) for step in steps])
    slope = float(op.gradient() @ d)
    with preserved_state(op.model):
        curvature = float(op.matvec(d) @ d)
    base = loss_at(op, theta)
    quadratic = base + slope * steps + 0.5 * curvature * steps**2
    return LossSlice(name, steps, losses, slope, curvature, quadratic, float(d.norm()))


def loss_surface(
    op: Any,
    d1: torch.Tensor,
    d2: torch.Tensor,
    alphas: Sequence[float],
    betas: Sequence[float],
    names: tuple[str, str] = ("top eigenvector 1", "top eigenvector 2"),
) -> LossSurface:
    """``L(theta + a d1 + b d2)`` on the grid ``alphas x betas`` (``len(alphas) * len(betas)`` loss passes)."""
    _objective(op)
    a, b = _steps(alphas, "alphas"), _steps(betas, "betas")
    u, v = _direction(op, d1, names[0]), _direction(op, d2, names[1])
    theta = point_of(op)
    grid = np.empty((a.size, b.size))
    for i, alpha in enumerate(a):
        for j, beta in enumerate(b):
            grid[i, j] = loss_at(op, theta + float(alpha) * u + float(beta) * v)
    return LossSurface(a, b, grid, names)


def linear_interpolation(
    op: Any,
    start: torch.Tensor,
    end: torch.Tensor,
    t: Optional[Sequence[float]] = None,
    labels: tuple[str, str] = ("start", "end"),
) -> InterpolationPath:
    """The loss on the segment from ``start`` to ``end`` (flat parameters), on the operator's batches.

    Args:
        op: supplies the batches, the loss and the non-trainable tensors (buffers) of the evaluation.
        start, end: flat parameter vectors of the same layout as the operator's point.
        t: the steps in [0, 1] (default 11 evenly spaced, ends included).
        labels: names of the endpoints for the report.

    Example:
        >>> from torch import nn
        >>> from optdiag.curvature import HessianOperator, supervised_loss
        >>> net = nn.Linear(1, 1, bias=False)
        >>> op = HessianOperator(net, supervised_loss(nn.MSELoss()), (torch.ones(2, 1), torch.zeros(2, 1)))
        >>> path = linear_interpolation(op, torch.tensor([-1.0]), torch.tensor([1.0]), t=[0, 0.5, 1])
        >>> path.loss.tolist(), path.barrier  # the chord is at 1, the middle at 0: no barrier
        ([1.0, 0.0, 1.0], 0.0)
    """
    _objective(op)
    steps = _steps(np.linspace(0.0, 1.0, 11) if t is None else t, "t")
    if steps.min() < 0.0 or steps.max() > 1.0:
        raise UsageError(f"interpolation steps must lie in [0, 1], got {steps.min()}..{steps.max()}")
    a = _flat(op, start, "start")
    b = _flat(op, end, "end")
    losses = np.array([loss_at(op, (1.0 - float(s)) * a + float(s) * b) for s in steps])
    first, last = loss_at(op, a), loss_at(op, b)
    chord = (1.0 - steps) * first + steps * last
    rise = losses - chord
    barrier = float(np.max(rise)) if np.all(np.isfinite(rise)) else math.inf
    return InterpolationPath(steps, losses, max(barrier, 0.0), float((b - a).norm()), labels)


def _flat(op: Any, params: torch.Tensor, name: str) -> torch.Tensor:
    params = torch.as_tensor(params).reshape(-1)
    if params.numel() != op.num_params:
        raise UsageError(
            f"the {name} point has {params.numel()} parameters, the model {op.num_params}: "
            "checkpoints of different architectures cannot be interpolated"
        )
    return params.to(device=op.device, dtype=op.dtype)
