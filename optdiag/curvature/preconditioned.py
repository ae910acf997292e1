"""The Hessian seen through a diagonal preconditioner: ``P^-1/2 H P^-1/2`` (Adam's and RMSprop's curvature).

An adaptive optimizer steps ``x <- x - lr P^-1 m``, so the curvature that decides whether it is stable is that of
``P^-1 H``, not ``H`` (docs/theory.md section 1: Adam is stable while ``lambda_max(P^-1 H) < (2 + 2 beta1) /
((1 - beta1) lr)``, 38/lr for beta1 = 0.9). ``P^-1 H`` is not symmetric, but it is similar to the symmetric
``P^-1/2 H P^-1/2`` (same eigenvalues), which Lanczos can work on.

That threshold holds for a preconditioner that has settled; during the first steps ``P`` is an average of a few
squared gradients and its smallest entries are noise. :func:`preconditioner_warmup` says when the estimate is
usable (docs/theory.md section 1, "When Adam's preconditioner is ready").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from optdiag.curvature.base import CurvatureOperator
from optdiag.curvature.params import flatten, local_part, trainable_parameters
from optdiag.errors import UsageError


class PreconditionedOperator(CurvatureOperator):
    """``P^-1/2 H P^-1/2`` for a curvature operator ``H`` and a positive diagonal preconditioner ``P``.

    Each product costs one product of the inner operator, and :attr:`n_hvp` reports the inner operator's count, so
    budgets keep counting Hessian-vector products however the operator is wrapped.

    **Sharded vectors** (FSDP, see :class:`~optdiag.curvature.base.CurvatureOperator`): the preconditioner is this
    rank's part of the diagonal, laid out like the inner operator's local vectors, and the inner operator's sums over
    ranks (:meth:`shard_sum`, :attr:`total_params`, :attr:`shard_index`) are this operator's, so ``top_eigenvalues``
    gives the same number on every rank. The entries are checked on every rank together: all raise or none.

    Args:
        op: the curvature operator ``H`` (a ``HessianOperator``, or any :class:`CurvatureOperator`).
        preconditioner: the diagonal of ``P`` as a flat vector of length ``op.num_params``, every entry finite and
            strictly positive.

    Raises:
        TypeError: if ``op`` is not a :class:`CurvatureOperator` or ``preconditioner`` not a tensor.
        UsageError (a ``ValueError``): if ``preconditioner`` has the wrong shape, or an entry that is not finite
            and positive.

    Example:
        >>> from optdiag.curvature.base import MatrixOperator
        >>> H = MatrixOperator(torch.diag(torch.tensor([4.0, 9.0])))
        >>> pre = PreconditionedOperator(H, torch.tensor([4.0, 1.0]))
        >>> pre.to_dense().diagonal().tolist()
        [1.0, 9.0]
    """

    def __init__(self, op: CurvatureOperator, preconditioner: torch.Tensor) -> None:
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
        if not isinstance(preconditioner, torch.Tensor):
            raise TypeError(f"preconditioner must be a torch.Tensor, got {type(preconditioner).__name__}")
        if preconditioner.dim() != 1 or preconditioner.numel() != op.num_params:
            raise UsageError(
                f"preconditioner must be a flat vector of length {op.num_params} (the operator's num_params), "
                f"got shape {tuple(preconditioner.shape)}"
            )
        bad = ~(torch.isfinite(preconditioner) & (preconditioner > 0))
        n_bad = int(op.shard_sum(bad.sum().reshape(1).double()))  # sharded: every rank raises together, or none
        if n_bad:
            raise UsageError(
                f"preconditioner must be finite and strictly positive; {n_bad} of {op.total_params} entries "
                "are not (an optimizer with eps=0 and a parameter whose gradient was always zero gives this)"
            )
        super().__init__(op.num_params, op.device, op.dtype)
        self.op = op
        self.sharded = op.sharded
        self.preconditioner = preconditioner.detach().to(device=op.device, dtype=op.dtype)
        self._inv_sqrt = self.preconditioner.rsqrt()

    @property
    def n_hvp(self) -> int:
        """Products of the inner operator computed so far (one per product of this operator)."""
        return self.op.n_hvp

    @property
    def total_params(self) -> int:
        return self.op.total_params

    @property
    def shard_index(self) -> int:
        return self.op.shard_index

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.op.shard_sum(tensor)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._inv_sqrt * self.op.matvec(self._inv_sqrt * v)

    @classmethod
    def from_optimizer(
        cls,
        op: CurvatureOperator,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor] | None = None,
    ) -> "PreconditionedOperator":
        """The operator preconditioned the way ``optimizer`` preconditions its steps now (its state frozen).

        Supported, with PyTorch's own formulas and each parameter group's ``eps`` and ``betas``/``alpha``:

        - ``Adam``/``AdamW``: ``P = sqrt(v_hat) + eps`` with ``v_hat = exp_avg_sq / (1 - beta2^step)``
          (``max_exp_avg_sq`` in place of ``exp_avg_sq`` with ``amsgrad=True``).
        - ``RMSprop``: ``P = sqrt(square_avg) + eps``; ``centered=True``: ``P = sqrt(square_avg - grad_avg^2) + eps``.

        Args:
            op: the curvature operator ``H``.
            optimizer: an optimizer that has taken at least one step on every parameter in ``params``.
            params: the parameters in the order of ``op``'s flat vectors. Defaults to
                ``trainable_parameters(op.model)``, the order of a ``HessianOperator``; pass them for any other
                operator. Sharded parameters (FSDP) give this rank's part of the diagonal, read from the state's
                local shards (``DTensor``s under FSDP2, the slices under FSDP1), as :func:`local_part` lays out the
                operator's vectors; a parameter with no elements on this rank needs no state here.

        Returns:
            A :class:`PreconditionedOperator` whose largest eigenvalue is the optimizer's preconditioned sharpness
            ``lambda_max(P^-1 H)``.

        Raises:
            UsageError (a ``ValueError``): for an unsupported optimizer (named), parameters the optimizer does not
                hold or has no state for yet (no step taken), or parameters that do not add up to ``op.num_params``.
                On sharded vectors every rank raises if one does (the others are not left in a collective).

        Example:
            >>> from optdiag.curvature.base import MatrixOperator
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = torch.optim.Adam(model.parameters())
            >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
            >>> H = MatrixOperator(torch.eye(4))
            >>> PreconditionedOperator.from_optimizer(H, opt, params=list(model.parameters())).num_params
            4
        """
        if params is None:
            model = getattr(op, "model", None)
            if not isinstance(model, torch.nn.Module):
                raise UsageError(
                    f"{type(op).__name__} does not say which parameters it acts on; pass params=[...] in the order "
                    "of its flat vectors"
                )
            # A HessianOperator's flat vectors follow trainable_parameters(op.model).
            params = [p for _, p in trainable_parameters(model)]
        params = list(params)
        error = None
        try:
            total = sum(local_part(p).numel() for p in params)
            if total != op.num_params:
                raise UsageError(f"params hold {total} numbers but the operator acts on {op.num_params}")
            diagonal = flatten(_preconditioner_of(optimizer, p) for p in params)
        except UsageError as caught:
            error = caught
        if op.sharded and float(op.shard_sum(torch.tensor([float(error is not None)], dtype=torch.float64))) > 0:
            raise error or UsageError("another rank could not read its part of the preconditioner")
        if error is not None:
            raise error
        return cls(op, diagonal)


def _preconditioner_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """The diagonal of ``P`` for one parameter (this rank's part when sharded), read from the optimizer's state."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
        raise UsageError(
            f"cannot read a preconditioner from {type(optimizer).__name__}: supported are Adam, AdamW and RMSprop"
        )
    group = _group_of(optimizer, param)
    if local_part(param).numel() == 0:  # an FSDP1 slice on another rank: no gradient here, so no state either
        return local_part(param).detach().reshape(-1)
    state = {key: local_part(value) if isinstance(value, torch.Tensor) else value
             for key, value in optimizer.state.get(param, {}).items()}  # FSDP2: the state's DTensors' local shards
    if not state:
        raise UsageError(
            f"{type(optimizer).__name__} has no state for a parameter of shape {tuple(param.shape)}: it has not "
            "taken a step on it yet, so there is no preconditioner to read"
        )
    eps = float(group["eps"])
    if isinstance(optimizer, torch.optim.RMSprop):
        second_moment = state["square_avg"]
        if group["centered"]:
            # PyTorch's centered RMSprop divides by the square root of the variance estimate.
            second_moment = second_moment - state["grad_avg"] ** 2
        return second_moment.detach().sqrt() + eps
    beta2 = float(group["betas"][1])
    step = float(state["step"])
    second_moment = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return (second_moment.detach() / (1.0 - beta2**step)).sqrt() + eps


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """The parameter group holding ``param`` (matched by identity, as the optimizer's state is)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise UsageError(
        f"a parameter of shape {tuple(param.shape)} is not among the parameters {type(optimizer).__name__} "
        "optimizes; pass the parameters the optimizer was built with"
    )


# Squared gradients a second-moment estimate must average before its preconditioned sharpness is reported: with 50,
# a coordinate's estimate falls below a quarter of its value (its P below half, the sharpness along it doubled) with
# probability 1.3e-8 for Gaussian gradients (chi-squared, 50 degrees of freedom). docs/theory.md section 1.
PRECONDITIONER_SAMPLES = 50
# An average over fewer squared gradients never gets to 50 (beta2 < 0.96): ready at this share of its limit.
_SHARE_OF_LIMIT = 0.9
# RMSprop's average is not bias-corrected: it starts at 0 and reaches (1 - alpha^t) of its value after t steps.
_RMSPROP_BIAS = 0.9


@dataclass(frozen=True)
class PreconditionerWarmup:
    """How far an adaptive optimizer's second-moment estimate is from usable.

    Attributes:
        steps: optimizer steps taken (the fewest over the parameters; 0 for a parameter with no state yet).
        ready_at: steps after which the preconditioner counts as estimated (see :func:`preconditioner_warmup`).

    Example:
        >>> w = PreconditionerWarmup(steps=12, ready_at=51)
        >>> w.ready, w.describe()
        (False, 'warming up (12 of the 51 steps its second-moment estimate needs)')
    """

    steps: int
    ready_at: int

    @property
    def ready(self) -> bool:
        """Whether the preconditioned sharpness (and the stability ratio) can be reported."""
        return self.steps >= self.ready_at

    def describe(self) -> str:
        """The state in words, for texts that would otherwise show a number."""
        if self.ready:
            return f"ready ({self.steps} steps)"
        return f"warming up ({self.steps} of the {self.ready_at} steps its second-moment estimate needs)"


def effective_samples(beta: float, steps: int) -> float:
    """How many squared gradients an exponential average with factor ``beta`` holds after ``steps`` steps.

    The average weighs step ``i`` by ``beta^(steps - i)``; its effective sample size ``(sum w)^2 / sum w^2`` is
    ``(1 - beta^t)(1 + beta) / ((1 - beta)(1 + beta^t))``: ``t`` early on, ``(1 + beta) / (1 - beta)`` in the limit.

    Example:
        >>> round(effective_samples(0.999, 10), 3), round(effective_samples(0.9, 10**6), 3)
        (10.0, 19.0)
    """
    if steps <= 0:
        return 0.0
    if beta <= 0.0:
        return 1.0
    x = beta**steps
    return (1.0 - x) * (1.0 + beta) / ((1.0 - beta) * (1.0 + x))


def ready_after(beta: float, *, bias_corrected: bool = True) -> int:
    """Steps after which a second-moment average with factor ``beta`` counts as estimated.

    The rule: it holds :data:`PRECONDITIONER_SAMPLES` (50) squared gradients, or 90% of what it can hold when its
    limit ``(1 + beta) / (1 - beta)`` is smaller; without bias correction (RMSprop) also ``1 - beta^t >= 0.9``.

    Example:
        >>> ready_after(0.999), ready_after(0.9), ready_after(0.99, bias_corrected=False)
        (51, 28, 230)
    """
    if beta <= 0.0:
        return 1
    target = min(PRECONDITIONER_SAMPLES, _SHARE_OF_LIMIT * (1.0 + beta) / (1.0 - beta))
    # effective_samples(beta, t) >= target  <=>  beta^t <= bound
    bound = ((1.0 + beta) - target * (1.0 - beta)) / ((1.0 + beta) + target * (1.0 - beta))
    steps = math.ceil(math.log(bound) / math.log(beta))
    if not bias_corrected:
        steps = max(steps, math.ceil(math.log(1.0 - _RMSPROP_BIAS) / math.log(beta)))
    return max(1, steps)


def preconditioner_warmup(optimizer: torch.optim.Optimizer,
                          params: Sequence[torch.Tensor] | None = None) -> PreconditionerWarmup:
    """Whether ``optimizer``'s preconditioner is estimated well enough for its preconditioned sharpness to mean
    what the stability threshold assumes.

    Adam's threshold treats ``P`` as fixed and known; after ``t`` steps ``P`` is an average of about ``t`` squared
    gradients per coordinate, and ``lambda_max(P^-1 H)`` is ruled by the coordinates whose average came out
    smallest, which early on are noise: the ratio then says more about a few small averages than about stability.
    The rule is :func:`ready_after` on ``beta2`` (Adam/AdamW) or ``alpha`` (RMSprop, not bias-corrected).

    Args:
        optimizer: an ``Adam``, ``AdamW`` or ``RMSprop`` (Lightning's wrapper unwrapped by the caller).
        params: the parameters to look at; default: all the optimizer holds. A sharded parameter (FSDP) with no
            elements on this rank is not counted (it has no gradient, so no steps, here); the caller makes the
            ranks agree.

    Returns:
        A :class:`PreconditionerWarmup` with the fewest steps any of them has taken.

    Raises:
        UsageError (a ``ValueError``): for an optimizer that has no preconditioner (named).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.Adam(model.parameters())
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> preconditioner_warmup(opt)
        PreconditionerWarmup(steps=1, ready_at=51)
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
        raise UsageError(
            f"{type(optimizer).__name__} has no diagonal preconditioner: supported are Adam, AdamW and RMSprop"
        )
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    steps, ready_at = None, 1
    for param in params:
        group = _group_of(optimizer, param)
        if isinstance(optimizer, torch.optim.RMSprop):
            need = ready_after(float(group["alpha"]), bias_corrected=False)
        else:
            need = ready_after(float(group["betas"][1]))
        ready_at = max(ready_at, need)
        if local_part(param).numel() == 0:  # nothing of it on this rank (an FSDP1 slice elsewhere): no steps here
            continue
        taken = int(float(optimizer.state.get(param, {}).get("step", 0)))
        steps = taken if steps is None else min(steps, taken)
    return PreconditionerWarmup(steps=steps or 0, ready_at=ready_at)
