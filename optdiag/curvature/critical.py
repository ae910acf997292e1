"""Forward-only sharpness along the optimizer's own update ("critical sharpness"), from fewer than ten forwards.

The loss along the line through the parameters ``theta`` in the direction of the optimizer's update ``u`` (the
step it takes, ``theta_next - theta``) is ``phi(t) = L(theta + t u)``; ``t = 1`` is the step taken. Its quadratic
model ``phi(0) + a t + c t^2 / 2`` has ``a = g.u`` (the slope) and ``c = u^T H u`` (the curvature along the line),
and from a handful of loss evaluations it gives, without a single gradient or Hessian-vector product:

* the **directional curvature** ``c / |u|^2 = u^T H u / |u|^2``, a Rayleigh quotient of the Hessian (so at most
  ``lambda_max``), with an error estimate;
* the **critical step** ``t_c = -2 a / c``: the largest multiple of the update along which the loss does not rise
  above ``phi(0)`` (it stops decreasing at ``t_c / 2``); with the optimizer's learning rate ``lr`` the **critical
  learning rate** ``eta_c = lr t_c`` (the update is proportional to lr), the largest stable step;
* the **critical sharpness** ``lambda_c = 2 / eta_c = c / (-a lr)`` (Kalra et al., 2026), comparable with the
  optimizer's stability threshold: for plain gradient descent (``u = -lr g``) it is ``g^T H g / |g|^2``, the
  directional curvature along the gradient, and ``eta_c = 2 / lambda_c`` is the classical limit ``2 / curvature``.

Step sizes are chosen from the first loss differences: the second difference at ``t = +-s`` must stand well above
the rounding of a forward (``s`` starts at the optimizer's own step and grows or shrinks by 4), then ``+-s/2`` give a
five-point estimate of ``c`` (Richardson: exact on quadratics and cubics), refined to a smaller ``s`` while the
truncation error dominates; ``a`` comes from the two smallest pairs (Richardson again); one last forward at ``t_c``
checks the critical step. docs/critical-sharpness.md
has the reasoning, the cost and the measured accuracy against ``lambda_max``.

Nothing here raises on a measured number: a non-finite loss at the point, a zero update or step sizes that all
give non-finite losses make the estimate unavailable (:attr:`CriticalSharpnessResult.available` False, with the
reason), never an exception. The model is evaluated through
:class:`~optdiag.curvature.objective.BatchObjective`: parameters, buffers, modes, ``.grad`` and RNGs are as before.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from optdiag.curvature.objective import BatchObjective, LossFn
from optdiag.curvature.params import flatten
from optdiag.curvature.state import preserved_state
from optdiag.errors import UsageError
from optdiag.policy import Measurements, check_number

__all__ = ["CriticalSharpnessResult", "line_sharpness", "critical_sharpness", "MAX_EVALS"]

#: The default and the largest number of loss evaluations (each a forward over all batches) of one estimate.
MAX_EVALS = 9
_MIN_EVALS = 5  # the point, one pair +-s, one pair +-s/2
_FACTOR = 4.0  # how much the scale grows or shrinks between tries
_SIGNAL = 1e3  # the second difference at +-s must exceed this many rounding levels of a loss
_ROUNDING = 16.0  # the rounding level of a loss, in units of eps * |loss| (a batch's mean rounds in its sum too)
_SCALE_RANGE = (_FACTOR**-10, _FACTOR**6)  # the scales tried, as multiples of the update
_TRUNCATION = 0.01  # halve the scale while the truncation error is above 1% of the curvature (and above rounding)


@dataclass(frozen=True)
class CriticalSharpnessResult:
    """The curvature of the loss along an update direction, and the largest stable step there.

    ``t`` is the step size in multiples of the update ``u`` (``t = 1``: the step the optimizer takes).

    Attributes:
        available: False when no estimate could be made (``reason`` says why; the numbers are then None).
        reason: why the estimate, or a part of it (the critical step), is not available; None when all is.
        loss: ``phi(0)``, the loss at the point.
        update_norm: ``|u|``.
        slope: ``phi'(0) = g.u`` (negative when the update descends the loss).
        second_derivative: ``phi''(0) = u^T H u``.
        directional_curvature: ``u^T H u / |u|^2``, in the units of the Hessian's eigenvalues.
        directional_curvature_stderr: its error estimate: the truncation error (the size of the Richardson
            correction between the two scales) and the rounding of the losses, combined in quadrature.
        fit_residual: the root-mean-square misfit of a least-squares quadratic through the five points of the
            estimate, relative to the largest loss change among them: 0 on an exact quadratic, small when the scale
            is in the quadratic regime.
        scale: ``s``, the largest step size of the five points (``+-s``, ``+-s/2`` and 0).
        critical_step: ``t_c = -2 phi'(0) / phi''(0)``, where the quadratic model's loss is back at ``phi(0)`` (the
            largest stable step along ``u``); None unless the update descends (slope < 0) and the curvature along it
            is positive (without curvature nothing along the line limits the step).
        loss_at_critical_step: ``phi(t_c)`` measured (``phi(0)`` on a quadratic); None when not evaluated.
        lr: the learning rate the update was taken with; None when not given.
        critical_lr: ``lr t_c``, the largest stable learning rate along the update (None without ``lr``).
        critical_sharpness: ``2 / critical_lr = phi''(0) / (-phi'(0) lr)``, defined whenever the update descends
            (0 or negative: no curvature limit); comparable with the stability threshold (``2 / lr`` for SGD).
        lr_ratio: ``lr / critical_lr = 1 / t_c = phi''(0) / (-2 phi'(0))``: above 1 the step taken raised the loss
            along the line (0 or negative: no limit).
        n_evals: loss evaluations taken (each a forward over all batches).
        points: every ``(t, phi(t))`` evaluated, sorted by ``t`` (non-finite losses included).
        clamped, unavailable: what :class:`~optdiag.policy.Measurements` clamped or marked unavailable.

    Example:
        >>> r = line_sharpness(lambda t: 1.0 - t + t * t, update_norm=2.0, lr=0.1, precision=2.0**-52)
        >>> round(r.directional_curvature, 9), round(r.critical_step, 9), round(r.critical_sharpness, 9)
        (0.5, 1.0, 20.0)
    """

    available: bool
    reason: Optional[str] = None
    loss: Optional[float] = None
    update_norm: Optional[float] = None
    slope: Optional[float] = None
    second_derivative: Optional[float] = None
    directional_curvature: Optional[float] = None
    directional_curvature_stderr: Optional[float] = None
    fit_residual: Optional[float] = None
    scale: Optional[float] = None
    critical_step: Optional[float] = None
    loss_at_critical_step: Optional[float] = None
    lr: Optional[float] = None
    critical_lr: Optional[float] = None
    critical_sharpness: Optional[float] = None
    lr_ratio: Optional[float] = None
    n_evals: int = 0
    points: tuple[tuple[float, float], ...] = ()
    clamped: dict[str, float] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (``points`` as lists)."""
        out = asdict(self)
        out["points"] = [list(p) for p in self.points]
        return out


class _Line:
    """``phi`` with its evaluations remembered (a step size is never evaluated twice)."""

    def __init__(self, phi: Callable[[float], float]) -> None:
        self._phi = phi
        self.values: dict[float, float] = {}

    def __call__(self, t: float) -> float:
        t = float(t)
        if t not in self.values:
            value = self._phi(t)
            self.values[t] = float(value)
        return self.values[t]

    def finite(self, *ts: float) -> bool:
        return all(math.isfinite(self(t)) for t in ts)

    def points(self) -> tuple[tuple[float, float], ...]:
        return tuple(sorted(self.values.items()))


def _five_point(line: _Line, h: float) -> tuple[float, float, float]:
    """The curvature by the five-point stencil on 0, +-h, +-2h, and the second differences of the wide and the narrow
    pair alone (they differ by the truncation error)."""
    f0, fh, fmh, f2h, fm2h = line(0.0), line(h), line(-h), line(2 * h), line(-2 * h)
    narrow = (fh + fmh - 2 * f0) / h**2
    wide = (f2h + fm2h - 2 * f0) / (2 * h) ** 2
    return (4 * narrow - wide) / 3, wide, narrow  # Richardson: the h^2 term of both differences cancels


def _slope(line: _Line) -> float:
    """The slope by Richardson extrapolation from the two smallest symmetric pairs measured: the finest scale
    resolves it best (the first-order change stands far above rounding long before the second-order one does, so
    where the scale grew for the curvature the optimizer's own step still gives the slope; the five-point stencil
    at the grown scale would carry its truncation)."""
    pairs = sorted(t for t in line.values if t > 0 and -t in line.values and line.finite(t, -t))
    (t1, t2), ratio = pairs[:2], (pairs[1] / pairs[0]) ** 2
    d1, d2 = ((line(t) - line(-t)) / (2 * t) for t in (t1, t2))
    return (ratio * d1 - d2) / (ratio - 1)


def _quadratic_residual(line: _Line, h: float) -> float:
    """RMS misfit of the least-squares quadratic through 0, +-h, +-2h, relative to the largest change of the loss."""
    ts = np.array([-2 * h, -h, 0.0, h, 2 * h])
    ys = np.array([line(t) for t in ts])
    design = np.stack([np.ones_like(ts), ts, ts**2], axis=1) / np.array([1.0, h, h * h])  # scaled columns
    coefficients = np.linalg.lstsq(design, ys - ys[2], rcond=None)[0]
    misfit = float(np.sqrt(np.mean((design @ coefficients - (ys - ys[2])) ** 2)))
    spread = float(np.max(np.abs(ys - ys[2])))
    return 0.0 if spread == 0 else misfit / spread


def line_sharpness(
    phi: Callable[[float], float],
    *,
    update_norm: float,
    lr: Optional[float] = None,
    precision: float = float(torch.finfo(torch.float32).eps),
    max_evals: int = MAX_EVALS,
    scale: float = 1.0,
) -> CriticalSharpnessResult:
    """The curvature along a line and its critical step, from the loss at a few step sizes (no gradients).

    Args:
        phi: ``phi(t)``, the loss at ``theta + t u`` (a float; NaN or infinite is allowed and handled).
        update_norm: ``|u|``, to turn ``phi''`` into the directional curvature ``u^T H u / |u|^2``.
        lr: the learning rate ``u`` was taken with (for the critical learning rate and sharpness); None if unknown.
        precision: the relative rounding unit of the losses (``torch.finfo(dtype).eps`` of the forward's dtype); it
            sets how far the losses must move before a second difference is trusted.
        max_evals: loss evaluations allowed, at least 5 (at most :data:`MAX_EVALS` is the intended use).
        scale: the first step size tried, in multiples of ``u`` (1: the optimizer's own step).

    Returns:
        A :class:`CriticalSharpnessResult`; ``available`` False (with ``reason``) when the loss at the point is not
        finite, the update is zero, or no step size gave finite losses.

    Raises:
        UsageError: an argument out of range (never for a measured loss).

    Example:
        >>> r = line_sharpness(lambda t: 2.0 - 4.0 * t + 3.0 * t * t, update_norm=1.0, precision=2.0**-52)
        >>> round(r.second_derivative, 9), round(r.critical_step, 9), r.n_evals
        (6.0, 1.333333333, 6)
    """
    if not callable(phi):
        raise UsageError(f"phi must be callable as phi(t) -> loss, got {type(phi).__name__}")
    update_norm = check_number("update_norm", update_norm, low=0.0)
    lr = check_number("lr", lr, low=0.0, low_open=True, allow_none=True, what="a positive number or None")
    precision = check_number("precision", precision, low=0.0, high=1.0, low_open=True, high_open=True)
    max_evals = check_number("max_evals", max_evals, low=_MIN_EVALS, integer=True, what=f"an int >= {_MIN_EVALS}")
    scale = check_number("scale", scale, low=0.0, low_open=True, what="a positive number")

    line = _Line(phi)

    def unavailable(reason: str, **numbers: Any) -> CriticalSharpnessResult:
        return CriticalSharpnessResult(available=False, reason=reason, lr=lr, update_norm=update_norm,
                                       n_evals=len(line.values), points=line.points(), **numbers)

    loss = line(0.0)
    if not math.isfinite(loss):
        return unavailable(f"the loss at the point is {loss}")
    if update_norm == 0.0:
        return unavailable("the update is zero: there is no line to look along", loss=loss)
    rounding = _ROUNDING * precision * max(abs(loss), torch.finfo(torch.float64).tiny)

    # 1. The scale: finite losses at +-s, and a second difference well above the rounding of a loss. Grow from the
    #    optimizer's step while the curvature is lost in rounding; shrink (and never grow again) past non-finite ones.
    s, shrunk = scale, False
    low, high = _SCALE_RANGE[0] * scale, _SCALE_RANGE[1] * scale
    while True:
        finite = line.finite(s, -s)
        weak = finite and abs(line(s) + line(-s) - 2 * loss) < _SIGNAL * rounding
        if finite and (not weak or shrunk or s * _FACTOR > high):
            break
        following = s * _FACTOR if finite else s / _FACTOR
        shrunk = shrunk or not finite
        if following < low:
            return unavailable("the loss is not finite at any step size tried along the update", loss=loss)
        if following in line.values:  # back at a scale measured before (grew into non-finite losses): use it
            s = following
            break
        if len(line.values) + 4 > max_evals:  # a new pair and the half pair would not fit
            if finite:
                break  # the curvature stands little above rounding at s: its error estimate says so
            return unavailable(f"no step size with finite losses within {max_evals} evaluations", loss=loss)
        s = following

    # 2. The half scale: five points, then halve while truncation dominates rounding and evaluations are left.
    if not line.finite(s / 2, -s / 2):
        return unavailable("the loss is not finite at half the usable step size", loss=loss)
    h = s / 2
    curvature, wide, narrow = _five_point(line, h)
    truncation, noise = abs(narrow - wide) / 3, 2.5 * rounding / h**2
    while truncation > _TRUNCATION * abs(curvature) and truncation > noise and len(line.values) + 3 <= max_evals:
        if not line.finite(h / 2, -h / 2):
            break
        h /= 2
        curvature, wide, narrow = _five_point(line, h)
        truncation, noise = abs(narrow - wide) / 3, 2.5 * rounding / h**2
    slope = _slope(line)
    # Rounding of the Richardson combination (4 narrow - wide) / 3, each second difference off by ~2.5 roundings.
    noise = 2.5 * rounding / h**2 * math.hypot(4 / 3, 1 / 12)

    # 3. The critical step from the quadratic model, checked with one more forward.
    reason = None
    critical_step = critical_lr = critical_sharpness = lr_ratio = at_critical = None
    if slope < 0:
        lr_ratio = curvature / (-2 * slope)
        if lr is not None:
            critical_sharpness = curvature / (-slope * lr)
        if curvature > 0:
            critical_step = -2 * slope / curvature
            critical_lr = None if lr is None else lr * critical_step
            if len(line.values) < max_evals and math.isfinite(critical_step):
                at_critical = line(critical_step)
        else:
            reason = "no critical step: the loss curves down (or not at all) along the update"
    else:
        reason = "no critical step: the update does not descend the loss here (slope >= 0)"

    m = Measurements()
    return CriticalSharpnessResult(
        available=True,
        reason=reason,
        loss=loss,
        update_norm=update_norm,
        slope=m.number("slope", slope),
        second_derivative=m.number("second_derivative", curvature),
        directional_curvature=m.number("directional_curvature", curvature / update_norm**2),
        directional_curvature_stderr=m.number("directional_curvature_stderr",
                                              math.hypot(truncation, noise) / update_norm**2, low=0.0),
        fit_residual=m.number("fit_residual", _quadratic_residual(line, h), low=0.0),
        scale=2 * h,
        critical_step=m.number("critical_step", critical_step, low=0.0),
        loss_at_critical_step=m.number("loss_at_critical_step", at_critical, keep_nonfinite=True),
        lr=lr,
        critical_lr=m.number("critical_lr", critical_lr, low=0.0),
        critical_sharpness=m.number("critical_sharpness", critical_sharpness),
        lr_ratio=m.number("lr_ratio", lr_ratio),
        n_evals=len(line.values),
        points=line.points(),
        clamped=m.clamped,
        unavailable=m.unavailable,
    )


def critical_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    update: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    lr: Optional[float] = None,
    max_evals: int = MAX_EVALS,
    scale: float = 1.0,
    dtype: Optional[torch.dtype] = None,
    batch_list: bool = False,
) -> CriticalSharpnessResult:
    """Critical sharpness of a model's loss along an update, from forwards only (see the module docstring).

    The loss is the sample-weighted mean over ``batches`` (as for ``HessianOperator``), evaluated at
    ``theta + t update`` for a few step sizes ``t`` around the model's current parameters ``theta``. Nothing of the
    model is changed: parameters are passed through ``functional_call``, and buffers, modes, ``.grad`` and RNGs are
    bitwise as before; dropout draws the same masks at every step size.

    Args:
        model: the network, at the point ``theta`` (e.g. its parameters before the optimizer's step).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
        batches: one batch or an iterable of batches.
        update: the optimizer's step ``theta_next - theta`` (or ``-lr`` times its preconditioned gradient): a flat
            vector over the trainable parameters (``named_parameters`` order) or one tensor per trainable parameter.
        lr: the learning rate the update was taken with, for the critical learning rate and sharpness.
        max_evals: forwards allowed (each over all batches), at least 5; the default 9.
        scale: the first step size tried, in multiples of ``update``.
        dtype: compute in this dtype (``None``: the parameters'); its rounding unit sets the step sizes.
        batch_list: ``batches`` is already a list of batches.

    Returns:
        A :class:`CriticalSharpnessResult` (``available`` False rather than an exception for non-finite losses).

    Raises:
        UsageError: a bad argument, an update of the wrong length, a ``loss_fn`` that returns no scalar.

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
        >>> net = net.double(); _ = net.weight.data.copy_(torch.tensor([[0.0, 1.0]]))
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # H = diag(1, 4), gradient (0, 4) here
        >>> sgd_step = torch.tensor([0.0, -0.4], dtype=torch.float64)  # -lr * gradient at lr = 0.1
        >>> r = critical_sharpness(net, loss_fn, (x, y), sgd_step, lr=0.1)
        >>> round(r.directional_curvature, 6), round(r.critical_lr, 6)
        (4.0, 0.5)
    """
    # forwards only: attention may stay on the model's own (fused) kernel, which has no double backward
    f = BatchObjective(model, loss_fn, batches, dtype=dtype, batch_list=batch_list, math_attention=False)
    if isinstance(update, torch.Tensor) and update.dim() == 1:
        u = update.detach()
    elif isinstance(update, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in update):
        if [tuple(t.shape) for t in update] != [tuple(p.shape) for p in f.parameters]:
            raise UsageError("update must hold one tensor per trainable parameter, shaped like it")
        u = flatten(t.detach() for t in update)
    else:
        raise UsageError(f"update must be a flat tensor or a sequence of tensors, got {type(update).__name__}")
    if u.numel() != f.num_params:
        raise UsageError(f"update has {u.numel()} entries, the trainable parameters {f.num_params}")
    u = u.to(device=f.device, dtype=f.dtype)
    with preserved_state(model):
        theta = f.point()
        return line_sharpness(
            lambda t: f.value(theta + t * u, finite=False),
            update_norm=float(torch.linalg.vector_norm(u.double())),
            lr=lr,
            precision=float(torch.finfo(f.dtype).eps),
            max_evals=max_evals,
            scale=scale,
        )
