"""(lr, momentum) pairs from a measured curvature range (docs/theory.md section 2).

Example:
    >>> lr, momentum, rate = polyak_heavy_ball(1.0, 100.0)
    >>> round(lr, 5), round(momentum, 4), round(rate, 3)
    (0.03306, 0.6694, 0.818)
"""

from __future__ import annotations

import math

import numpy as np

from optdiag.errors import UsageError
from optdiag.policy import check_number


def _range(low_name: str, low: float, high_name: str, high: float) -> tuple[float, float]:
    """Two positive curvature bounds as ``(smaller, larger)``: measured bounds can come in either order (a
    Lanczos estimate of the smallest curvature a little above the largest), and the range they span is the same."""
    a = check_number(low_name, low, low=0.0, low_open=True)
    b = check_number(high_name, high, low=0.0, low_open=True)
    return min(a, b), max(a, b)


def polyak_heavy_ball(mu: float, L: float) -> tuple[float, float, float]:
    """Polyak's (1964) optimal heavy-ball step for curvatures in ``[mu, L]``.

    ``lr = 4 / (sqrt(L) + sqrt(mu))^2``, ``momentum = ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2`` with
    ``kappa = L / mu``, and the contraction ``rate = sqrt(momentum)`` per step on every curvature in the range.

    Args:
        mu: smallest curvature to converge on (> 0).
        L: largest curvature (> 0). The two may come in either order: the range is the one they span.

    Returns:
        ``(lr, momentum, rate)``.

    Example:
        >>> [round(x, 4) for x in polyak_heavy_ball(1.0, 1.0)]
        [1.0, 0.0, 0.0]
    """
    mu, L = _range("mu", mu, "L", L)
    root_kappa = math.sqrt(L / mu)
    momentum = ((root_kappa - 1.0) / (root_kappa + 1.0)) ** 2
    half_step = 2.0 / (math.sqrt(L) + math.sqrt(mu))  # (2 / s)^2, not 4 / s^2: s^2 overflows for L near 1e308
    return half_step * half_step, momentum, math.sqrt(momentum)


def yellowfin(h_min: float, h_max: float, grad_variance: float, distance: float) -> tuple[float, float]:
    """YellowFin's SingleStep tuning rule (Zhang & Mitliagkas 2017/2019).

    ``x = sqrt(momentum)`` minimises ``x^2 D^2 + (1 - x)^4 C / h_min^2``; with ``y = 1 - x`` the optimality
    condition is the cubic ``y^3 + p y - p = 0``, ``p = D^2 h_min^2 / (2 C)``, which has exactly one real root
    (its left side increases in ``y``), in (0, 1). Then ``momentum = max(x^2, ((sqrt(r) - 1)/(sqrt(r) + 1))^2)``
    with ``r = h_max / h_min`` (the robust region must cover the whole curvature range) and
    ``lr = (1 - sqrt(momentum))^2 / h_min``. With ``C = 0`` it reduces to Polyak's pair.

    Args:
        h_min, h_max: curvature range (both > 0; either order, as for :func:`polyak_heavy_ball`).
        grad_variance: ``C``, the variance of the stochastic gradient (>= 0).
        distance: ``D``, the distance to the optimum (> 0 when ``C > 0``).

    Returns:
        ``(lr, momentum)``.

    Example:
        >>> [round(v, 4) for v in yellowfin(1.0, 100.0, 0.0, 1.0)]
        [0.0331, 0.6694]
    """
    h_min, h_max = _range("h_min", h_min, "h_max", h_max)
    c = check_number("grad_variance", grad_variance, low=0.0)
    d = check_number("distance", distance, low=0.0)
    if c == 0:
        x = 0.0  # no noise: nothing to average out, the range constraint alone sets the momentum
    elif d == 0:
        raise UsageError("yellowfin: distance 0 with gradient noise gives momentum 1 and lr 0 (stop); "
                         "pass a positive distance to the optimum")
    else:
        p = d * d * h_min * h_min / (2.0 * c)
        roots = np.roots([1.0, 0.0, p, -p])
        # The one real root: the others are a complex-conjugate pair.
        y = float(roots[np.argmin(np.abs(roots.imag))].real)
        x = 1.0 - min(max(y, 0.0), 1.0)
    root_range = math.sqrt(h_max / h_min)
    momentum = max(x * x, ((root_range - 1.0) / (root_range + 1.0)) ** 2)
    return (1.0 - math.sqrt(momentum)) ** 2 / h_min, momentum
