"""The Hessian seen through a diagonal preconditioner: ``P^-1/2 H P^-1/2`` (Adam's and RMSprop's curvature).

An adaptive optimizer steps ``x <- x - lr P^-1 m``, so the curvature that decides whether it is stable is that of
``P^-1 H``, not ``H`` (docs/theory.md section 1: Adam is stable while ``lambda_max(P^-1 H) < (2 + 2 beta1) /
((1 - beta1) lr)``, 38/lr for beta1 = 0.9). ``P^-1 H`` is not symmetric, but it is similar to the symmetric
``P^-1/2 H P^-1/2`` (same eigenvalues), which Lanczos can work on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from optdiag.curvature.base import CurvatureOperator
from optdiag.curvature.params import flatten, trainable_parameters
from optdiag.errors import UsageError


class PreconditionedOperator(CurvatureOperator):
    """``P^-1/2 H P^-1/2`` for a curvature operator ``H`` and a positive diagonal preconditioner ``P``.

    Each product costs one product of the inner operator, and :attr:`n_hvp` reports the inner operator's count, so
    budgets keep counting Hessian-vector products however the operator is wrapped.

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
        if bool(bad.any()):
            raise UsageError(
                f"preconditioner must be finite and strictly positive; {int(bad.sum())} of {op.num_params} entries "
                "are not (an optimizer with eps=0 and a parameter whose gradient was always zero gives this)"
            )
        super().__init__(op.num_params, op.device, op.dtype)
        self.op = op
        self.preconditioner = preconditioner.detach().to(device=op.device, dtype=op.dtype)
        self._inv_sqrt = self.preconditioner.rsqrt()

    @property
    def n_hvp(self) -> int:
        """Products of the inner operator computed so far (one per product of this operator)."""
        return self.op.n_hvp

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
                operator.

        Returns:
            A :class:`PreconditionedOperator` whose largest eigenvalue is the optimizer's preconditioned sharpness
            ``lambda_max(P^-1 H)``.

        Raises:
            UsageError (a ``ValueError``): for an unsupported optimizer (named), parameters the optimizer does not
                hold or has no state for yet (no step taken), or parameters that do not add up to ``op.num_params``.

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
        total = sum(p.numel() for p in params)
        if total != op.num_params:
            raise UsageError(f"params hold {total} numbers but the operator acts on {op.num_params}")
        diagonal = flatten(_preconditioner_of(optimizer, p) for p in params)
        return cls(op, diagonal)


def _preconditioner_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """The diagonal of ``P`` for one parameter, read from the optimizer's state."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
        raise UsageError(
            f"cannot read a preconditioner from {type(optimizer).__name__}: supported are Adam, AdamW and RMSprop"
        )
    group = _group_of(optimizer, param)
    state = optimizer.state.get(param, {})
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
