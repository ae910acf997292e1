"""How sharp is the point a model sits at: Keskar's epsilon-sharpness, SAM's and the adaptive (ASAM) sharpness.

Every measure here evaluates the same sample-weighted mean loss over batches as
:class:`~optdiag.curvature.operator.HessianOperator` (docs/theory.md section 5), a
:class:`~optdiag.curvature.objective.BatchObjective`, at perturbed parameters passed through
``torch.func.functional_call``: the model's parameters are never written, and its buffers, modes, ``.grad`` and
RNGs are as before afterwards. Random ops (dropout) draw the same values at every evaluation, so the perturbed and
unperturbed losses are comparable.

Sharpness is a property of the point, not a promise about generalisation (Andriushchenko et al., ICML 2023); only
the adaptive measure is unchanged by the rescalings that leave a ReLU network's function unchanged (Dinh et al.,
ICML 2017).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import scipy.optimize
import torch
from torch import nn

from optdiag.curvature._checks import check_count, check_positive, check_seed
from optdiag.curvature.base import vectors_that_fit
from optdiag.curvature.objective import BatchObjective, LossFn
from optdiag.curvature.state import preserved_state
from optdiag.errors import UsageError
from optdiag.policy import check_number

EPSILON_METHODS = ("auto", "l-bfgs-b", "corners")
# scipy's L-BFGS-B holds its history of 2 x 10 correction vectors and about 10 more (the point, gradient, bounds,
# workspace, the start and box here), all float64 whatever the model's dtype: "auto" uses it only where they fit.
_LBFGSB_FLOAT64_VECTORS = 30
# The corner ascent's backtracking: a step is halved at most this many times before the search stops.
_MAX_HALVINGS = 4

__all__ = ["SharpnessResult", "epsilon_sharpness", "sam_sharpness", "adaptive_sharpness"]


@dataclass(frozen=True)
class SharpnessResult:
    """A sharpness measure at a point, with what it was computed from.

    Attributes:
        value: the sharpness. ``"epsilon"``: ``100 (max f(x+y) - f(x)) / (1 + f(x))``, a percentage;
            ``"sam"`` and ``"adaptive"``: ``L(w+e) - L(w)`` in loss units.
        kind: ``"epsilon"``, ``"sam"`` or ``"adaptive"``.
        loss: the loss at the point, ``f(x)``.
        perturbed_loss: the loss at the (best found) perturbed point.
        perturbation_norm: the Euclidean norm of the perturbation in parameter space.
        n_evals: loss evaluations over all batches (most with their gradient).
        eps: the box size of ``"epsilon"``; ``None`` otherwise.
        rho: the radius of ``"sam"``/``"adaptive"``; ``None`` otherwise.
        eta: the offset of ``"adaptive"``'s scaling ``|w| + eta``; ``None`` otherwise.
        subspace_dim: the dimension ``p`` of ``"epsilon"``'s random subspace, ``None`` for the full space.
        n_iter: iterations of ``"epsilon"``'s search (accepted steps of ``"corners"``); ``None`` otherwise.
        method: ``"epsilon"``'s search, ``"l-bfgs-b"`` or ``"corners"``; ``None`` otherwise.
    """

    value: float
    kind: str
    loss: float
    perturbed_loss: float
    perturbation_norm: float
    n_evals: int
    eps: Optional[float] = None
    rho: Optional[float] = None
    eta: Optional[float] = None
    subspace_dim: Optional[int] = None
    n_iter: Optional[int] = None
    method: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, ready for JSON."""
        return asdict(self)


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    eps: float = 1e-3,
    *,
    subspace_dim: Optional[int] = None,
    max_iter: int = 10,
    seed: int = 0,
    method: str = "auto",
) -> SharpnessResult:
    """Keskar et al.'s epsilon-sharpness: the largest relative loss increase in a box around the parameters.

    ``100 (max_{y in C} f(x+y) - f(x)) / (1 + f(x))`` (Keskar et al., ICLR 2017, "On Large-Batch Training for Deep
    Learning"). In the full space ``C = {y : |y_i| <= eps (|x_i| + 1)}``. With ``subspace_dim = p``, ``y = A z`` for
    a seeded Gaussian ``n x p`` matrix ``A`` and the box is on ``z``: ``|z_i| <= eps (|(A^+ x)_i| + 1)``.

    The maximum is searched with ``max_iter`` iterations of L-BFGS-B (as in the paper) on ``-f`` with autograd
    gradients, float64 on the scipy side, or, on large models, by a memory-bounded corner ascent in the model's
    dtype (``method``). Either search starts from a seeded random point of the box, not from its centre: at an
    exact critical point the gradient vanishes and neither would move. The value is a lower bound of the true
    maximum (the best point found), never below 0 (the centre is in the box).

    **Corner ascent** (``"corners"``): from ``y``, the corner ``c = w * sign(grad f(x + y))`` of the box (``w`` its
    half-widths; ``y_i`` kept where the gradient is exactly 0) maximises the linearisation of ``f`` over the box;
    the step to it is halved until ``f`` increases (at most 4 times) and the search stops at a corner the step
    no longer leaves, or when no halved step increases ``f``. For a convex ``f`` every full step increases it
    (the conditional-gradient ascent of convex maximisation), so it ends at a corner, where a convex function's
    maximum over a box lies. It holds about ten vectors of the model's dtype, where L-BFGS-B holds about 30
    float64 ones (60 copies of float32 parameters); docs/performance.md, section 8, compares the two.

    Args:
        model: the network, evaluated at its current parameters in its current mode.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch (as for ``HessianOperator``).
        batches: one batch or an iterable of batches (sample-weighted mean loss over them).
        eps: the relative box size; Keskar et al. use ``1e-3`` and ``5e-4``.
        subspace_dim: ``p`` for a random ``p``-dimensional subspace (they use 100), ``None`` for the full space.
        max_iter: L-BFGS-B iterations, or accepted steps of the corner ascent.
        seed: seeds the start point and the subspace (a private generator; global RNGs are not touched).
        method: ``"l-bfgs-b"`` (scipy, the paper's), ``"corners"`` (full space only) or ``"auto"`` (default):
            L-BFGS-B in a subspace or where its float64 vectors fit in 256 MiB
            (:data:`~optdiag.curvature.base.VECTOR_MEMORY_BYTES`, about a million parameters), else corners.

    Returns:
        A :class:`SharpnessResult` with ``kind="epsilon"`` and ``value`` in percent.

    Raises:
        UsageError: a non-positive ``eps``/``max_iter``/``subspace_dim``, no batches, a bad ``loss_fn``, an unknown
            ``method`` or ``"corners"`` with a subspace.
        NonFiniteError: the loss or its gradient is NaN/Inf somewhere in the box.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> data = (torch.randn(8, 3), torch.randn(8, 1))
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> epsilon_sharpness(net, loss_fn, data, eps=1e-3).value >= 0
        True
    """
    eps = check_positive("eps", eps)
    max_iter = check_count("max_iter", max_iter)
    subspace_dim = None if subspace_dim is None else check_count("subspace_dim", subspace_dim)
    seed = check_seed(seed)
    if method not in EPSILON_METHODS:
        raise UsageError(f"method must be one of {', '.join(map(repr, EPSILON_METHODS))}, got {method!r}")
    if method == "corners" and subspace_dim is not None:
        raise UsageError("the corner ascent searches the full space: give subspace_dim=None or method='l-bfgs-b'")

    f = BatchObjective(model, loss_fn, batches)
    if method == "auto":
        fits = vectors_that_fit(f.num_params, 8) >= _LBFGSB_FLOAT64_VECTORS
        method = "l-bfgs-b" if subspace_dim is not None or fits else "corners"
    with preserved_state(model):
        x = f.point()
        loss, gradient = f.value_and_grad(x)  # also refuses a loss that does not depend on the parameters
        del gradient
        if method == "corners":
            perturbed_loss, perturbation_norm, n_iter = _corner_ascent(f, x, loss, eps, max_iter, seed)
            return SharpnessResult(
                value=100.0 * (perturbed_loss - loss) / (1.0 + loss),
                kind="epsilon",
                loss=loss,
                perturbed_loss=perturbed_loss,
                perturbation_norm=perturbation_norm,
                n_evals=f.n_evals,
                eps=eps,
                n_iter=n_iter,
                method=method,
            )
        x64 = x.detach().cpu().double().numpy()
        rng = np.random.default_rng(seed)
        if subspace_dim is None:
            basis = None
            half_width = eps * (np.abs(x64) + 1.0)
        else:
            basis = rng.standard_normal((x64.size, subspace_dim))
            coordinates = np.linalg.lstsq(basis, x64, rcond=None)[0]  # A^+ x
            half_width = eps * (np.abs(coordinates) + 1.0)

        def to_parameter_space(z: np.ndarray) -> np.ndarray:
            return z if basis is None else basis @ z

        best = {"loss": loss, "z": np.zeros_like(half_width)}

        def negative_loss(z: np.ndarray) -> tuple[float, np.ndarray]:
            y = torch.as_tensor(to_parameter_space(z), dtype=x.dtype, device=x.device)
            value, gradient = f.value_and_grad(x + y)
            if value > best["loss"]:
                best.update(loss=value, z=z.copy())
            gradient64 = gradient.detach().cpu().double().numpy()
            return -value, -(gradient64 if basis is None else basis.T @ gradient64)

        start = rng.uniform(-half_width, half_width)
        result = scipy.optimize.minimize(
            negative_loss,
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-half_width, half_width),
            options={"maxiter": max_iter},
        )
    return SharpnessResult(
        value=100.0 * (best["loss"] - loss) / (1.0 + loss),
        kind="epsilon",
        loss=loss,
        perturbed_loss=best["loss"],
        perturbation_norm=float(np.linalg.norm(to_parameter_space(best["z"]))),
        n_evals=f.n_evals,
        eps=eps,
        subspace_dim=subspace_dim,
        n_iter=int(result.nit),
        method=method,
    )


def _corner_ascent(
    f: BatchObjective, x: torch.Tensor, loss: float, eps: float, max_iter: int, seed: int
) -> tuple[float, float, int]:
    """``epsilon_sharpness``'s corner ascent: (the best loss found, its perturbation's norm, accepted steps).

    Every vector is in the model's dtype and on its device: the point, the perturbation, the step and the point
    evaluated, besides what one loss-and-gradient evaluation holds (the half-widths are recomputed where needed).
    The perturbation is kept apart from the point (``x + y - x`` would round it off the box's corners); an
    accepted step is applied to it as the trial point was formed (``y + a step``, bitwise the same).
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    y = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
    y.mul_(_half_widths(x, eps))
    value, gradient = f.value_and_grad(x + y)
    n_iter = 0
    while n_iter < max_iter:
        step = torch.sign(gradient).mul_(_half_widths(x, eps))  # the corner that maximises the linearisation
        flat = gradient == 0
        step[flat] = y[flat]
        del flat, gradient
        if torch.equal(step, y):
            break  # the corner is where the search stands: no ascent direction left in the box
        step.sub_(y)
        for halving in range(_MAX_HALVINGS + 1):
            alpha = 0.5**halving
            point = torch.add(y, step, alpha=alpha).add_(x)
            trial_value, gradient = f.value_and_grad(point)
            del point
            if trial_value > value:
                break
        else:
            break  # no halved step increases the loss: a local maximum to this precision
        y.add_(step, alpha=alpha)
        value = trial_value
        n_iter += 1
        del step
    if value <= loss:
        return loss, 0.0, n_iter  # the centre is in the box
    return value, float(torch.linalg.vector_norm(y)), n_iter


def _half_widths(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The box's half-widths ``eps (|x_i| + 1)``."""
    return x.abs().add_(1.0).mul_(eps)


def sam_sharpness(model: nn.Module, loss_fn: LossFn, batches: Any, rho: float = 0.05) -> SharpnessResult:
    """First-order SAM sharpness: ``L(w + e) - L(w)`` with ``e = rho g / |g|`` (Foret et al., ICLR 2021).

    The first-order solution of ``max_{|e|_2 <= rho} L(w+e)``; on a quadratic it equals
    ``rho |g| + rho^2 g^T H g / (2 |g|^2)`` exactly. Not invariant under function-preserving rescalings: compare
    :func:`adaptive_sharpness`.

    Args:
        model: the network, evaluated at its current parameters in its current mode.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
        batches: one batch or an iterable of batches.
        rho: the radius of the perturbation (SAM's default is 0.05).

    Returns:
        A :class:`SharpnessResult` with ``kind="sam"``.

    Raises:
        UsageError: a non-positive ``rho``, no batches, a bad ``loss_fn``.
        ValueError: the gradient is exactly zero, so first-order SAM has no direction (use
            :func:`epsilon_sharpness` or ``lambda_max``).

    Example:
        >>> net = nn.Linear(3, 1)
        >>> data = (torch.randn(8, 3), torch.randn(8, 1))
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> sam_sharpness(net, loss_fn, data, rho=0.05).kind
        'sam'
    """
    rho = check_positive("rho", rho)
    return _first_order_sharpness(model, loss_fn, batches, rho, eta=None)


def adaptive_sharpness(
    model: nn.Module, loss_fn: LossFn, batches: Any, rho: float = 0.5, *, eta: float = 0.01
) -> SharpnessResult:
    """First-order adaptive (scale-invariant) sharpness of ASAM (Kwon et al., ICML 2021).

    The perturbation is bounded in the scaled norm ``|T_w^-1 e|_2 <= rho`` with ``T_w = |w| + eta`` elementwise; its
    first-order maximiser is ``e = rho T_w^2 g / |T_w g|`` and the value is ``L(w + e) - L(w)``. With ``eta = 0`` it
    is exactly unchanged by rescalings ``(a theta_1, theta_2 / a)`` of consecutive layers of a ReLU network
    (Andriushchenko et al., ICML 2023), which change ``lambda_max`` and SAM's sharpness at will (Dinh et al.).

    Args:
        model: the network, evaluated at its current parameters in its current mode.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
        batches: one batch or an iterable of batches.
        rho: the radius in the scaled norm (ASAM's default is 0.5, ten times SAM's, since it is relative).
        eta: the offset keeping zero weights perturbable (ASAM's default 0.01); ``0`` for exact scale invariance.

    Returns:
        A :class:`SharpnessResult` with ``kind="adaptive"``.

    Raises:
        UsageError: a non-positive ``rho`` or negative ``eta``, no batches, a bad ``loss_fn``.
        ValueError: ``T_w g`` is exactly zero, so there is no direction to perturb in.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> data = (torch.randn(8, 3), torch.randn(8, 1))
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> adaptive_sharpness(net, loss_fn, data, rho=0.5, eta=0.0).kind
        'adaptive'
    """
    rho = check_positive("rho", rho)
    eta = check_number("eta", eta, low=0.0, what="a non-negative finite number")
    return _first_order_sharpness(model, loss_fn, batches, rho, eta=eta)


def _first_order_sharpness(
    model: nn.Module, loss_fn: LossFn, batches: Any, rho: float, eta: Optional[float]
) -> SharpnessResult:
    """SAM (``eta=None``: ``T_w = I``) or ASAM (``T_w = |w| + eta``): ``L(w + rho T^2 g / |T g|) - L(w)``."""
    f = BatchObjective(model, loss_fn, batches)
    with preserved_state(model):
        w = f.point()
        loss, gradient = f.value_and_grad(w)
        # In place where it can be: a large model's perturbation takes no more vectors than its gradient.
        scale = None if eta is None else w.abs().add_(eta)
        scaled_norm = float(torch.linalg.vector_norm(gradient if scale is None else scale * gradient))
        if scaled_norm == 0.0:
            what = "gradient" if eta is None else "scaled gradient (|w| + eta) * g"
            raise ValueError(
                f"the {what} is exactly zero, so first-order sharpness has no direction to perturb in; use "
                "epsilon_sharpness or lambda_max at a critical point"
            )
        perturbation = gradient if scale is None else gradient.mul_(scale.square_())
        perturbation.mul_(rho / scaled_norm)
        del scale
        perturbation_norm = float(torch.linalg.vector_norm(perturbation))
        perturbed_loss = f.value(perturbation.add_(w))
    return SharpnessResult(
        value=perturbed_loss - loss,
        kind="sam" if eta is None else "adaptive",
        loss=loss,
        perturbed_loss=perturbed_loss,
        perturbation_norm=perturbation_norm,
        n_evals=f.n_evals,
        rho=rho,
        eta=eta,
    )
