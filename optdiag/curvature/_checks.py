"""Argument checks shared by the estimators and measures: one message per kind of mistake, in one place.

Each check returns the value in its plain Python type, or raises :class:`~optdiag.errors.UsageError` (a
``ValueError``) naming the argument. The number checks are :func:`optdiag.policy.check_number` with fixed ranges.

Example:
    >>> check_count("k", 3), check_positive("eps", 1e-3), check_seed(7)
    (3, 0.001, 7)
"""

from __future__ import annotations

from typing import Any

from optdiag.curvature.base import CurvatureOperator
from optdiag.errors import UsageError
from optdiag.policy import check_number

__all__ = ["check_operator", "check_count", "check_seed", "check_positive"]


def check_operator(op: Any, sharded: bool = True) -> CurvatureOperator:
    """``op`` itself, or a :class:`UsageError` unless it is a :class:`CurvatureOperator` (and, with
    ``sharded=False``, for an operator on sharded vectors: a solver whose dot products are not summed over ranks)."""
    if not isinstance(op, CurvatureOperator):
        raise UsageError(
            f"expected a CurvatureOperator (e.g. HessianOperator or MatrixOperator), got {type(op).__name__}"
        )
    if not sharded and op.sharded:
        raise UsageError(
            f"this solver does not sum dot products over ranks, so it cannot run on the sharded vectors of "
            f"{type(op).__name__}; top_eigenvalues and hessian_trace can (docs/finite-difference-and-fsdp.md)"
        )
    return op


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, or a :class:`UsageError` naming ``name`` unless it is an integer ``>= minimum``
    (``bool`` and floats are refused; numpy integers are accepted)."""
    return check_number(name, value, low=minimum, integer=True)


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or a :class:`UsageError` unless it is an integer."""
    return check_number("seed", seed, integer=True)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float, or a :class:`UsageError` naming ``name`` unless it is a positive finite real."""
    return check_number(name, value, low=0.0, low_open=True, what="a positive finite number")
