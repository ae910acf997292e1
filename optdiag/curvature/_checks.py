"""Argument checks shared by the estimators and measures: one message per kind of mistake, in one place.

Each check returns the value in its plain Python type, or raises :class:`~optdiag.errors.UsageError` (a
``ValueError``) naming the argument.

Example:
    >>> check_count("k", 3), check_positive("eps", 1e-3), check_seed(7)
    (3, 0.001, 7)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from optdiag.curvature.base import CurvatureOperator
from optdiag.errors import UsageError

__all__ = ["check_operator", "check_count", "check_seed", "check_positive"]


def check_operator(op: Any) -> CurvatureOperator:
    """``op`` itself, or a :class:`UsageError` unless it is a :class:`CurvatureOperator`."""
    if not isinstance(op, CurvatureOperator):
        raise UsageError(
            f"expected a CurvatureOperator (e.g. HessianOperator or MatrixOperator), got {type(op).__name__}"
        )
    return op


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, or a :class:`UsageError` naming ``name`` unless it is an integer ``>= minimum``
    (``bool`` is refused; numpy integers are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or a :class:`UsageError` unless it is an integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float, or a :class:`UsageError` naming ``name`` unless it is a positive finite real."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
