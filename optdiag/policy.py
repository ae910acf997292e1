"""The one exception policy of optdiag: what raises, what is cleaned, and how problems are reported.

Three rules (the reasoning is in ``docs/errors.md``):

1. **Arguments** (constructor settings, a function's parameters, what ``setup`` finds wrong with the Trainer) are
   checked by :func:`check_number` (or a check built on it) and a bad one raises
   :class:`~optdiag.errors.UsageError` at once, naming the argument.
2. **Measured numbers** (a loss, a gradient norm, an eigenvalue, a noise trace) are never refused with an
   exception. :class:`Measurements` cleans them by one rule: a value that rounding took just outside its possible
   range (a negative variance, a cosine of 1.0000001) is clamped to the range and recorded in ``clamped``; a value
   that is not a number (NaN, or an infinity where none can be meant) becomes ``None`` ("not available") and is
   recorded in ``unavailable``. Infinities are kept only where they are evidence (a diverging loss or gradient).
3. **Nothing raises into training.** After ``setup`` every callback hook is guarded: any exception becomes one
   warning per kind, counted, and training goes on. Warnings go through :func:`warn`, which cannot raise even when
   warnings are turned into errors (``python -W error``): it falls back to the ``optdiag`` logger.

This module imports nothing of optdiag but :mod:`optdiag.errors`, so every layer may use it.

Example:
    >>> check_number("lr", 0.1, low=0.0)
    0.1
    >>> m = Measurements()
    >>> m.number("grad_noise_trace", -1e-10, low=0.0), m.number("lambda_min", float("nan"))
    (0.0, None)
    >>> m.clamped, m.unavailable
    ({'grad_noise_trace': -1e-10}, ['lambda_min'])
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Any

from optdiag.errors import UsageError

__all__ = ["check_number", "Measurements", "warn", "LOGGER"]

#: Where warnings go when the ``warnings`` module may not emit them (filtered to errors).
LOGGER = logging.getLogger("optdiag")


def _plain(value: Any) -> Any:
    """A 0-d tensor or numpy scalar as its Python number (duck typing: torch and numpy are never imported)."""
    if hasattr(value, "item") and not isinstance(value, numbers.Number):
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):  # not a one-element array: left for the type check to refuse
            return value
    return value


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    integer: bool = False,
    what: str | None = None,
) -> Any:
    """An argument as a plain ``float`` (``int`` with ``integer=True``), or a :class:`UsageError` naming it.

    The value must be a real number (``bool`` is refused; 0-d tensors and numpy scalars are read), finite, and
    within ``[low, high]`` (ends excluded with ``low_open``/``high_open``). This is the check for *arguments*;
    measured numbers go through :class:`Measurements` instead.

    Args:
        name: the argument's name, as the message shows it (e.g. ``"OptimizerSpec.lr"``).
        value: what was passed.
        low, high, low_open, high_open: the allowed range.
        allow_none: accept ``None`` (returned as is).
        integer: require an integer (``int`` or numpy integer; ``2.0`` is refused) and return an ``int``.
        what: the message's description of a good value, instead of the one built from the range.

    Raises:
        UsageError: naming ``name``, what it must be and what it got.

    Example:
        >>> check_number("momentum", 0.9, low=0.0, high=1.0, high_open=True)
        0.9
        >>> check_number("momentum", 1.0, low=0.0, high=1.0, high_open=True)
        Traceback (most recent call last):
        ...
        optdiag.errors.UsageError: momentum must be in [0, 1), got 1.0
    """
    if value is None and allow_none:
        return None
    value = _plain(value)
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{name} must be {what or kind + (' or None' if allow_none else '')}, got {value!r}")
    if integer and not isinstance(value, numbers.Integral):  # 2.0 is not a count: a float where an int belongs
        raise UsageError(f"{name} must be {what or kind}, got {value!r}")
    number = int(value) if integer else float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise UsageError(f"{name} must be {what or _describe(low, high, low_open, high_open)}, got {number!r}")
    return number


class Measurements:
    """Cleans measured numbers by the one rule above and remembers what it changed.

    Attributes:
        clamped: ``{name: raw value}`` of every value moved into its possible range.
        unavailable: the names of values that were not numbers (NaN, or an infinity not kept), now ``None``.

    Example:
        >>> m = Measurements()
        >>> m.number("grad_cosine", 1.0000001, low=-1.0, high=1.0), m.number("grad_norm", float("inf"), keep_inf=True)
        (1.0, inf)
        >>> m.clamped
        {'grad_cosine': 1.0000001}
    """

    def __init__(self) -> None:
        self.clamped: dict[str, float] = {}
        self.unavailable: list[str] = []

    def number(
        self,
        name: str,
        value: Any,
        *,
        low: float | None = None,
        high: float | None = None,
        keep_nonfinite: bool = False,
        keep_inf: bool = False,
    ) -> float | None:
        """One measured number, cleaned: ``None`` stays ``None`` (not measured).

        Args:
            name: the quantity's name (recorded in ``clamped``/``unavailable``).
            value: the measured value (a Python, numpy or 0-d torch number).
            low, high: the range the true quantity lies in (e.g. ``low=0`` for a norm or a variance).
            keep_nonfinite: keep NaN and both infinities (a diverging loss: the value is the evidence).
            keep_inf: keep ``+inf`` (an overflowing gradient norm); NaN and ``-inf`` still become unavailable.

        Raises:
            UsageError: only when ``value`` is not a number at all (a string, a bool): a caller's mistake, not a
                measurement.
        """
        if value is None:
            return None
        value = _plain(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UsageError(f"{name} must be a number or None, got {value!r}")
        x = float(value)
        if not math.isfinite(x):
            if keep_nonfinite or (keep_inf and x > 0):
                return x
            if name not in self.unavailable:
                self.unavailable.append(name)
            return None
        if low is not None and x < low:
            self.clamped[name], x = x, float(low)
        elif high is not None and x > high:
            self.clamped[name], x = x, float(high)
        return x


def warn(message: str, *, stacklevel: int = 2) -> None:
    """Emit ``message`` as a ``UserWarning``; if a warnings filter turns it into an exception, log it instead.

    Under ``python -W error`` (or ``warnings.simplefilter("error")``) ``warnings.warn`` raises: that must never
    stop training, so the message then goes to the ``optdiag`` logger (``logging``'s last-resort handler prints
    it to stderr when nothing is configured).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error")
        ...     warn("optdiag: example")  # logged, not raised
    """
    try:
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
    except Exception:  # noqa: BLE001 - a filter made it an error: report it another way, never raise
        LOGGER.warning(message)
