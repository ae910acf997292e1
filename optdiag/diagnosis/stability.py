"""Where a step is stable: the largest curvature each optimizer tolerates (docs/theory.md section 1).

On a quadratic with curvature ``lambda`` along an eigendirection, each optimizer's error obeys a linear recurrence;
the step is stable iff every root of its characteristic polynomial lies inside the unit circle. With PyTorch's
update semantics this gives (``eta`` = lr, ``beta`` = momentum):

=====================  ==========================================================  ===========================
optimizer              stable iff                                                  eta=0.01 (beta/beta1=0.9)
=====================  ==========================================================  ===========================
SGD                    eta * lambda < 2                                            200
SGD heavy ball         eta (1 - dampening) * lambda < 2 (1 + beta)                 380
SGD nesterov=True      eta * lambda < (2 + 2 beta) / (1 + 2 beta)                  135.7
Adam / AdamW           eta * lambda(P^-1 H) < (2 + 2 beta1) / (1 - beta1)          3800 (= 38 / eta)
RMSprop                eta * lambda(P^-1 H) < 2 (1 + momentum)                     200 (momentum 0)
=====================  ==========================================================  ===========================

For Adam and RMSprop the threshold bounds the *preconditioned* sharpness ``lambda_max(P^-1 H)`` with the frozen
preconditioner ``P = diag(sqrt(v_hat) + eps)`` (Cohen et al. 2022). Coupled weight decay (``weight_decay`` of SGD)
adds ``weight_decay`` to every eigenvalue, so it is subtracted from the SGD-family thresholds; for the adaptive
optimizers weight decay is neglected (it shifts the preconditioned threshold by about ``weight_decay``, far below
``1/eta``). Anything else gets ``None``: never a wrong number.

Example:
    >>> spec = OptimizerSpec("heavy_ball", lr=0.01, momentum=0.9)
    >>> round(stability_threshold(spec), 6)
    380.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optdiag.errors import UsageError
from optdiag.policy import check_number

OPTIMIZER_KINDS = ("sgd", "heavy_ball", "nesterov", "adam", "adamw", "rmsprop", "unknown")
_PRECONDITIONED = ("adam", "adamw", "rmsprop")


@dataclass
class OptimizerSpec:
    """What the stability analysis needs to know about an optimizer (one parameter group).

    Attributes:
        kind: one of ``"sgd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``,
            ``"unknown"``.
        lr: the learning rate (``nan`` allowed only for ``"unknown"`` optimizers without one).
        momentum: SGD/RMSprop momentum ``beta`` in [0, 1).
        dampening: SGD dampening in [0, 1].
        beta1, beta2, eps: Adam's ``betas`` and ``eps``; ``eps`` also for RMSprop.
        alpha: RMSprop's smoothing constant.
        weight_decay: coupled L2 weight decay (SGD family: shifts every eigenvalue by this amount).
        name: the optimizer class name, e.g. ``"SGD"``.
        reason: why the stability threshold is unknown, when :meth:`from_torch` read settings it cannot analyse
            (``SGD(momentum=1.0)``, ``lr=0``, an optimizer without a stability analysis); empty otherwise.

    The constructor checks its arguments (:class:`~optdiag.errors.UsageError` for a bad one);
    :meth:`from_torch` never raises on what it reads from a real optimizer.

    Example:
        >>> OptimizerSpec("adam", lr=1e-3, beta1=0.9).preconditioned
        True
    """

    kind: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    alpha: float | None = None
    weight_decay: float = 0.0
    name: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZER_KINDS:
            raise UsageError(f"OptimizerSpec.kind must be one of {OPTIMIZER_KINDS}, got {self.kind!r}")
        if self.kind == "unknown" and (self.lr is None or (isinstance(self.lr, float) and math.isnan(self.lr))):
            self.lr = math.nan  # an optimizer without a learning rate: nothing below uses it
        else:
            self.lr = check_number("OptimizerSpec.lr", self.lr, low=0.0)
        unit = dict(low=0.0, high=1.0, high_open=True)
        self.momentum = check_number("OptimizerSpec.momentum", self.momentum, **unit)
        self.dampening = check_number("OptimizerSpec.dampening", self.dampening, low=0.0, high=1.0)
        self.beta1 = check_number("OptimizerSpec.beta1", self.beta1, allow_none=True, **unit)
        self.beta2 = check_number("OptimizerSpec.beta2", self.beta2, allow_none=True, **unit)
        self.eps = check_number("OptimizerSpec.eps", self.eps, low=0.0, allow_none=True)
        self.alpha = check_number("OptimizerSpec.alpha", self.alpha, low=0.0, high=1.0, allow_none=True)
        self.weight_decay = check_number("OptimizerSpec.weight_decay", self.weight_decay, low=0.0)
        if self.kind in ("adam", "adamw") and self.beta1 is None:
            raise UsageError(f"OptimizerSpec(kind={self.kind!r}) needs beta1")
        if self.kind == "nesterov" and (self.momentum <= 0 or self.dampening != 0):
            raise UsageError("OptimizerSpec(kind='nesterov') needs momentum > 0 and dampening 0 (as torch.optim.SGD)")
        for label in ("name", "reason"):
            if not isinstance(getattr(self, label), str):
                raise UsageError(f"OptimizerSpec.{label} must be a string, got {getattr(self, label)!r}")

    @property
    def preconditioned(self) -> bool:
        """True when the threshold applies to ``lambda_max(P^-1 H)`` rather than ``lambda_max(H)``."""
        return self.kind in _PRECONDITIONED

    @property
    def effective_lr(self) -> float | None:
        """The step per unit gradient along a slowly varying gradient (curvature -> 0), or None if unknown.

        Momentum accumulates a constant gradient into ``lr (1 - dampening) / (1 - beta)``; Adam's bias-corrected
        average does not, so its effective step is ``lr`` (on the preconditioned gradient).

        Example:
            >>> round(OptimizerSpec("heavy_ball", lr=0.01, momentum=0.9).effective_lr, 6)
            0.1
        """
        if self.kind == "unknown" or math.isnan(self.lr):
            return None
        if self.kind in ("adam", "adamw"):
            return self.lr
        return self.lr * (1.0 - self.dampening) / (1.0 - self.momentum)

    @classmethod
    def from_torch(cls, optimizer: Any, group: int = 0) -> OptimizerSpec:
        """Read an optimizer's class name and ``param_groups[group]`` (duck typing; torch is never imported).

        Lightning's ``LightningOptimizer`` wrapper is unwrapped. SGD -> ``"sgd"`` (momentum 0), ``"heavy_ball"``
        (momentum, any dampening: the threshold accounts for it) or ``"nesterov"``; Adam/AdamW -> ``"adam"`` /
        ``"adamw"``; RMSprop -> ``"rmsprop"`` (with or without momentum; ``centered`` only changes ``P``);
        everything else (LBFGS, Adagrad, NAdam, ...) -> ``"unknown"``.

        Example:
            >>> import torch
            >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
            >>> OptimizerSpec.from_torch(opt).kind
            'heavy_ball'
        """
        inner = getattr(optimizer, "optimizer", None)
        if type(optimizer).__name__ == "LightningOptimizer" and inner is not None:
            optimizer = inner
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise UsageError(f"{type(optimizer).__name__} has no param_groups: not a torch optimizer")
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(groups):
            raise UsageError(f"group must be an index in [0, {len(groups)}), got {group!r}")
        g = groups[group]
        name = type(optimizer).__name__
        # What is read is a measurement of the run, not an argument: settings outside the analysis give a spec
        # with an unknown threshold and the reason, never an exception (docs/errors.md).
        try:
            spec = cls._read(name, g)
        except (UsageError, TypeError, ValueError, AttributeError, KeyError) as error:
            return cls._unknown(name, g, f"{name}'s settings are outside the stability analysis ({error})")
        if spec.kind != "unknown" and stability_threshold(spec) is None:
            spec.reason = (f"{name} takes no step (lr {spec.lr:g}, dampening {spec.dampening:g}): "
                           "no stability threshold")
        return spec

    @classmethod
    def _read(cls, name: str, g: Any) -> OptimizerSpec:
        lr = g.get("lr", math.nan)
        wd = g.get("weight_decay", 0.0) or 0.0
        if name in ("SGD", "RMSprop"):
            momentum = g.get("momentum", 0.0) or 0.0
            if check_number(f"{name} momentum", momentum) >= 1:
                return cls._unknown(name, g, (
                    f"{name} with momentum {float(momentum):g}: heavy ball with momentum >= 1 never converges (its "
                    "characteristic roots have modulus >= 1 on every curvature), so no curvature is stable"))
        if name == "SGD":
            if momentum == 0:
                return cls("sgd", lr=lr, weight_decay=wd, name=name)
            kind = "nesterov" if g.get("nesterov", False) else "heavy_ball"
            return cls(kind, lr=lr, momentum=momentum, dampening=g.get("dampening", 0.0) or 0.0,
                       weight_decay=wd, name=name)
        if name in ("Adam", "AdamW"):
            beta1, beta2 = g.get("betas", (0.9, 0.999))
            return cls(name.lower(), lr=lr, beta1=beta1, beta2=beta2, eps=g.get("eps"), weight_decay=wd, name=name)
        if name == "RMSprop":
            return cls("rmsprop", lr=lr, momentum=momentum, alpha=g.get("alpha"), eps=g.get("eps"),
                       weight_decay=wd, name=name)
        return cls._unknown(name, g, f"no stability analysis for {name} (only SGD, Adam, AdamW and RMSprop)")

    @classmethod
    def _unknown(cls, name: str, g: Any, reason: str) -> OptimizerSpec:
        """An ``"unknown"`` spec keeping the learning rate when it is a usable number (else ``nan``)."""
        try:
            lr = check_number("lr", g.get("lr"), low=0.0)
        except UsageError:
            lr = math.nan
        return cls("unknown", lr=lr, name=name, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (non-finite lr kept as a float; :func:`to_jsonable` makes it JSON-safe)."""
        return {k: getattr(self, k) for k in ("kind", "lr", "momentum", "dampening", "beta1", "beta2", "eps",
                                              "alpha", "weight_decay", "name", "reason")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerSpec:
        """Rebuild from :meth:`to_dict` output (``"nan"`` strings accepted for lr)."""
        data = dict(data)
        if data.get("lr") == "nan":
            data["lr"] = math.nan
        return cls(**data)


def stability_threshold(spec: OptimizerSpec) -> float | None:
    """The largest curvature ``lambda`` for which ``spec``'s step is stable on a quadratic (docs/theory.md section 1).

    For preconditioned optimizers (``spec.preconditioned``) it bounds ``lambda_max(P^-1 H)``. Returns ``None`` for an
    unknown optimizer or a zero effective learning rate (no step, no threshold).

    Example:
        >>> round(stability_threshold(OptimizerSpec("nesterov", lr=0.01, momentum=0.9)), 1)
        135.7
        >>> round(stability_threshold(OptimizerSpec("adam", lr=0.01, beta1=0.9)), 6)
        3800.0
    """
    if not isinstance(spec, OptimizerSpec):
        raise UsageError(f"stability_threshold needs an OptimizerSpec, got {type(spec).__name__}")
    if spec.kind == "unknown" or spec.lr == 0:
        return None
    lr, beta = spec.lr, spec.momentum
    if spec.kind == "sgd":
        return 2.0 / lr - spec.weight_decay
    if spec.kind == "heavy_ball":
        # PyTorch: buf <- beta buf + (1 - dampening) g; p <- p - lr buf: heavy ball with step lr (1 - dampening).
        step = lr * (1.0 - spec.dampening)
        return None if step == 0 else 2.0 * (1.0 + beta) / step - spec.weight_decay
    if spec.kind == "nesterov":
        return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr) - spec.weight_decay
    if spec.kind in ("adam", "adamw"):
        b1 = spec.beta1
        step = (1.0 - b1) * lr
        return None if step == 0 else (2.0 + 2.0 * b1) / step  # 0 when a tiny lr underflows: no step
    # RMSprop: buf <- beta buf + g / P; p <- p - lr buf: heavy ball on P^-1 H (plain preconditioned GD at beta 0).
    return 2.0 * (1.0 + beta) / lr


def max_stable_lr(spec: OptimizerSpec, sharpness: float) -> float | None:
    """The learning rate at which ``sharpness`` sits exactly on ``spec``'s stability threshold.

    Every threshold scales as ``1/lr`` (weight decay aside), so it is ``lr * threshold / sharpness``. ``sharpness``
    is ``lambda_max`` (or ``lambda_max(P^-1 H)`` when ``spec.preconditioned``). None when it cannot be said.

    Example:
        >>> round(max_stable_lr(OptimizerSpec("sgd", lr=0.01), 150.0), 6)
        0.013333
    """
    threshold = stability_threshold(spec)
    if threshold is None or not (sharpness > 0 and math.isfinite(sharpness)):
        return None
    return spec.lr * (threshold + spec.weight_decay * (not spec.preconditioned)) / (
        sharpness + spec.weight_decay * (not spec.preconditioned))


def heavy_ball_rings(lr: float, momentum: float, lam: float) -> bool:
    """True when heavy ball's roots are complex on curvature ``lam``: it rings with modulus ``sqrt(momentum)``.

    That happens for ``(1 - sqrt(beta))^2 < lr * lam < (1 + sqrt(beta))^2`` (docs/theory.md section 1).

    Example:
        >>> heavy_ball_rings(0.01, 0.9, 100.0), heavy_ball_rings(0.01, 0.9, 0.1)
        (True, False)
    """
    lr = check_number("heavy_ball_rings: lr", lr, low=0.0, low_open=True)
    momentum = check_number("heavy_ball_rings: momentum", momentum, low=0.0, high=1.0, high_open=True)
    lam = check_number("heavy_ball_rings: lam", lam)
    root = math.sqrt(momentum)
    return (1.0 - root) ** 2 < lr * lam < (1.0 + root) ** 2
