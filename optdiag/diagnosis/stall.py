"""Stall (plateau) and divergence detection on the training-loss history.

The test is a Theil-Sen fit (:func:`theil_sen`, the same numbers as ``scipy.stats.theilslopes``) of the loss
against the step over the most recent ``window`` losses: the median of all pairwise slopes, with a
distribution-free confidence interval. Dividing by the
loss level (``|median|`` of the window) and multiplying by the window's step span turns the slope into the
*relative improvement across the window* ``I = -slope * span / level``, which is scale-free: multiplying the loss by
1000 changes nothing. Theil-Sen ignores up to ~29% of wild points, so minibatch spikes do not move it.

Rules (defaults in brackets, see ``docs/diagnosis-rules.md``):

* **stall**: once the window is full, the fitted relative improvement per window ``I`` is below
  ``rel_improvement`` [1% per window]; before that (from ``min_window`` losses on) only when the whole confidence
  interval of ``I`` lies below it, because a short window's fit is too noisy to call a slow fall a stall. Rates are
  per full window (``window - 1`` mean step spacings), so short and full windows are compared alike. A noisy loss
  whose fitted fall per window is clearly above 1% is not a stall; a flat noisy loss is. Noise spreads ``I`` by
  about ``sigma * sqrt(12 / window)`` for relative noise ``sigma``: raise ``window`` for very noisy losses.
* **divergence**, immediately: a non-finite loss; an explosion, ``loss > running_min + explosion_factor * scale``
  with ``scale = |first - running_min| + |running_min|`` [factor 2: for a positive loss, above twice where it
  started plus the best seen; all three levels are medians of three consecutive losses, so a single minibatch
  spike never counts]; or a significant, large rise: slope CI entirely positive, and the rise across a window
  (``-I * level``) above ``rise_tolerance`` of the level [50%], ``rise_noise_factor`` robust standard deviations of
  the window's residuals about the fit [3] and ``rise_span_fraction`` of the explosion ``scale`` [1%]. The level
  alone is not enough near zero: a classifier's cross-entropy there fluctuates by about its own level, so noise
  tilts a window by 50% of it, and wiggles negligible against the range the loss has spanned are no divergence.
* One verdict per situation: after an event the detector returns ``None`` until it sees a **recovery** (the loss
  confirmed falling again, the lower confidence bound of ``I`` at least ``rel_improvement``, and the window's
  median below the lowest loss of the window that fired, so a noise excursion does not re-arm); then, after
  ``cooldown`` more updates [window // 2], it may fire again (a saddle escaped, then a new plateau). Divergence may
  interrupt a stall.

Example:
    >>> import numpy as np
    >>> det = StallDetector(window=30, min_window=10)
    >>> events = [det.update(t, 1.0 + 0.01 * np.sin(t)) for t in range(40)]
    >>> [e.step for e in events if e is not None]
    [29]
"""

from __future__ import annotations

import functools
import math
import numbers
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from optdiag.diagnosis.types import from_jsonable, to_jsonable
from optdiag.errors import UsageError

_ARMED, _STALLED, _DIVERGED = "armed", "stalled", "diverged"

#: Default losses per fit: "stalled" is judged over this many steps (the classifier's one-window arguments too).
DEFAULT_WINDOW = 50
#: Default relative improvement across a window below which the loss counts as stalled (1% per window).
DEFAULT_REL_IMPROVEMENT = 0.01
#: Default rise across a window, in robust noise standard deviations, below which a rise is noise, not divergence.
DEFAULT_RISE_NOISE_FACTOR = 3.0
#: Default rise across a window, as a fraction of the explosion scale, below which a rise is negligible.
DEFAULT_RISE_SPAN_FRACTION = 0.01
#: Median absolute deviation -> standard deviation for normal noise (1.4826; scipy's ``scale="normal"``).
_MAD_TO_SIGMA = float(1.0 / special.ndtri(0.75))


def _loss_scale(first_loss: float, running_min: float) -> float:
    """``|first_loss - running_min| + |running_min|``: the range the loss has spanned plus its best level."""
    return abs(first_loss - running_min) + abs(running_min)


def explosion_threshold(first_loss: float, running_min: float, factor: float = 1.0) -> float | None:
    """The loss above which training counts as exploding: ``running_min + factor * scale``.

    ``scale = |first_loss - running_min| + |running_min|`` is the range the loss has spanned plus its best level,
    so the rule is scale-free and works for losses that are negative (log-likelihoods). None when the scale is 0.

    Example:
        >>> explosion_threshold(2.0, 0.5)
        2.5
    """
    scale = _loss_scale(first_loss, running_min)
    if not math.isfinite(scale) or scale == 0:
        return None
    return running_min + factor * scale


def _tie_term(values: np.ndarray) -> float:
    """``sum k (k - 1) (2k + 5)`` over groups of ``k`` equal values: Sen's (1968) tie correction."""
    ordered = np.sort(values)
    if (ordered[1:] != ordered[:-1]).all():
        return 0.0  # the usual case for real-valued losses, without np.unique's cost
    _, counts = np.unique(ordered, return_counts=True)
    counts = counts[counts > 1].astype(float)
    return float(np.sum(counts * (counts - 1) * (2 * counts + 5)))


@functools.lru_cache(maxsize=8)
def _pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of ``range(n)`` (cached: the window length rarely changes)."""
    return np.triu_indices(n, 1)


def theil_sen(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Theil-Sen slope of ``y`` against strictly increasing ``x`` with Sen's confidence interval.

    The same numbers as ``scipy.stats.theilslopes(y, x, alpha=confidence)`` (slope, low and high slope), computed
    with one vectorised pass over the ``n (n - 1) / 2`` pairwise slopes: scipy's per-call overhead made the fit
    most of the detector's cost per training step. The interval is the pair of order statistics of the sorted
    slopes that Sen (1968, eq. 2.6) gives, with his correction for tied ``y`` values.

    Args:
        x: the abscissae, strictly increasing (training steps), at least 2.
        y: the values (losses), same length.
        confidence: the interval's confidence level in (0, 1).

    Returns:
        ``(slope, low, high)``; the bounds are ``nan`` when the interval is undefined.

    Example:
        >>> theil_sen(np.arange(5.0), np.array([0.0, 2.0, 4.0, 6.0, 100.0]))[0]
        2.0
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(y)
    if n < 2 or x.shape != y.shape or x.ndim != 1 or not (x[1:] > x[:-1]).all():
        raise UsageError(f"theil_sen: needs >= 2 points with strictly increasing x, got {n}")
    if not 0 < confidence < 1:
        raise UsageError(f"theil_sen: confidence must be in (0, 1), got {confidence!r}")
    i, j = _pair_indices(n)
    slopes = np.sort((y[j] - y[i]) / (x[j] - x[i]))
    middle = len(slopes) // 2  # the median of the sorted slopes, as np.median computes it
    slope = float(slopes[middle] if len(slopes) % 2 else (slopes[middle - 1] + slopes[middle]) / 2.0)
    z = special.ndtri(min(confidence, 1.0 - confidence) / 2.0)  # the lower quantile, as scipy uses it
    # Sen's variance of Kendall's S: n (n-1) (2n+5) / 18, less the ties (x has none: it strictly increases).
    variance = (n * (n - 1) * (2 * n + 5) - _tie_term(y)) / 18.0
    if not variance >= 0:
        return slope, math.nan, math.nan
    sigma, count = math.sqrt(variance), len(slopes)
    upper = min(int(np.round((count - z * sigma) / 2.0)), count - 1)
    lower = max(int(np.round((count + z * sigma) / 2.0)) - 1, 0)
    return slope, float(slopes[lower]), float(slopes[upper])


@dataclass
class StallEvent:
    """A stall or divergence found by :class:`StallDetector`.

    Attributes:
        step: the step of the update that fired.
        reason: ``"stall"`` or ``"divergence"``.
        slope: Theil-Sen slope of the loss per step over the window (``nan`` if there was no fit).
        slope_ci: its confidence interval ``(lo, hi)``.
        rel_slope: ``slope / level`` (per step; level = ``|median|`` of the window).
        window: the losses fitted. window_steps: their steps.
        trigger: ``"flat"``, ``"nonfinite"``, ``"explosion"`` or ``"rising"``.
        rel_improvement: ``-slope * span / level``, the relative improvement across the window.
        margin: how far the deciding statistic lies past its boundary, as a natural log ratio (``inf`` for a
            non-finite loss; for a rise, past the nearest of its three boundaries): the classifier's confidence
            for a divergence grows with it.
    """

    step: int
    reason: str
    slope: float
    slope_ci: tuple[float, float]
    rel_slope: float
    window: list[float]
    window_steps: list[int]
    trigger: str = "flat"
    rel_improvement: float = math.nan
    margin: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats as ``"nan"``/``"inf"`` strings)."""
        return to_jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StallEvent:
        """Rebuild from :meth:`to_dict` output."""
        data = from_jsonable(dict(data))
        data["slope_ci"] = tuple(data["slope_ci"])
        return cls(**data)


def _check_number(name: str, value: Any, low: float, high: float = math.inf, *, integer: bool = False) -> Any:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value) == int(value)
    if not ok or not low <= value <= high:
        kind = "an int" if integer else "a number"
        raise UsageError(f"StallDetector: {name} must be {kind} in [{low}, {high}], got {value!r}")
    return int(value) if integer else float(value)


class StallDetector:
    """Watches the loss and reports, once per situation, when it stops falling or diverges.

    Args:
        window: the most recent losses fitted (also the span the relative improvement is measured over).
        min_window: the fewest losses before a stall can be declared.
        rel_improvement: the relative improvement across a window below which the loss counts as stalled.
        confidence: confidence level of the Theil-Sen interval.
        cooldown: updates after a recovery before a new stall may fire (default ``window // 2``).
        explosion_factor: see :func:`explosion_threshold`.
        rise_tolerance: relative rise across a window (against the loss level) that, when significant, counts as
            divergence.
        rise_noise_factor: the least rise across a window, in robust standard deviations of the window's residuals
            about the fit, that counts as divergence (near zero the noise is as large as the level).
        rise_span_fraction: the least rise across a window, as a fraction of the explosion scale
            ``|first - running_min| + |running_min|``, that counts as divergence.
        check_every: fit the window (stall, recovery and rise decisions) only on steps divisible by this; every
            loss still enters the window, and non-finite losses and explosions are caught at once. The fit is
            most of the detector's cost; ``StallDiagnoser`` uses 5, delaying a stall verdict by at most 4 steps.

    Example:
        >>> det = StallDetector()
        >>> det.update(0, float("nan")).reason
        'divergence'
    """

    def __init__(self, window: int = DEFAULT_WINDOW, min_window: int = 20,
                 rel_improvement: float = DEFAULT_REL_IMPROVEMENT,
                 confidence: float = 0.95, cooldown: int | None = None, explosion_factor: float = 2.0,
                 rise_tolerance: float = 0.5, rise_noise_factor: float = DEFAULT_RISE_NOISE_FACTOR,
                 rise_span_fraction: float = DEFAULT_RISE_SPAN_FRACTION, check_every: int = 1) -> None:
        self.check_every = _check_number("check_every", check_every, 1, integer=True)
        self.window = _check_number("window", window, 3, integer=True)
        self.min_window = _check_number("min_window", min_window, 3, self.window, integer=True)
        self.rel_improvement = _check_number("rel_improvement", rel_improvement, 0.0)
        if not 0 < confidence < 1:
            raise UsageError(f"StallDetector: confidence must be in (0, 1), got {confidence!r}")
        self.confidence = float(confidence)
        self.cooldown = self.window // 2 if cooldown is None else _check_number("cooldown", cooldown, 0, integer=True)
        self.explosion_factor = _check_number("explosion_factor", explosion_factor, 0.0)
        if self.explosion_factor == 0:
            raise UsageError("StallDetector: explosion_factor must be > 0")
        self.rise_tolerance = _check_number("rise_tolerance", rise_tolerance, 0.0)
        self.rise_noise_factor = _check_number("rise_noise_factor", rise_noise_factor, 0.0)
        self.rise_span_fraction = _check_number("rise_span_fraction", rise_span_fraction, 0.0)
        self.reset()

    def reset(self) -> None:
        """Forget the history (a new run)."""
        self._steps: deque[int] = deque(maxlen=self.window)
        self._losses: deque[float] = deque(maxlen=self.window)
        self._first: float | None = None
        self._n_seen = 0
        self._running_min = math.inf
        self._state = _ARMED
        self._stall_floor = math.inf  # the lowest loss of the window that fired: recovery must get below it
        self._since_rearm = self.cooldown  # a fresh detector may fire as soon as it has min_window losses
        self._last_step: int | None = None

    @property
    def stalled(self) -> bool:
        """True between a stall event and the recovery that follows it."""
        return self._state == _STALLED

    @property
    def diverged(self) -> bool:
        """True after a divergence event until the loss is seen falling again."""
        return self._state == _DIVERGED

    def update(self, step: int, loss: float) -> StallEvent | None:
        """Add one loss; return an event when a stall starts or divergence is seen, else None.

        Args:
            step: the optimizer step (strictly increasing).
            loss: the training loss at that step (a Python float, not a tensor with a graph).
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise UsageError(f"StallDetector.update: step must be an int, got {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise UsageError(f"StallDetector.update: steps must increase, got {step} after {self._last_step}")
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            raise UsageError(f"StallDetector.update: loss must be a number, got {loss!r}") from None
        self._last_step = int(step)
        self._since_rearm += 1
        if not math.isfinite(loss):
            return self._diverge(step, "nonfinite", math.inf, fit=None)
        self._steps.append(int(step))
        self._losses.append(loss)
        # Explosion is judged on medians of three losses (the start level, the best level, the current level),
        # so neither one minibatch spike nor one lucky batch moves its reference points.
        recent = float(statistics.median(list(self._losses)[-3:]))  # python: cheaper than numpy for 3
        if self._n_seen < 3:
            self._first = recent
        self._n_seen += 1
        self._running_min = min(self._running_min, recent)
        limit = explosion_threshold(self._first, self._running_min, self.explosion_factor)
        if limit is not None and recent > limit:
            scale = _loss_scale(self._first, self._running_min)
            margin = math.log((recent - self._running_min) / (self.explosion_factor * scale))
            return self._diverge(step, "explosion", margin, fit=self._fit() if len(self._losses) >= 3 else None)
        if len(self._losses) < self.min_window or step % self.check_every:
            return None  # the fit (stall, recovery, rise) only every check_every steps: it is most of the cost
        fit = self._fit()
        improvement_lo = fit["improvement_lo"]
        rise_margin = self._rise_margin(fit)
        if rise_margin is not None:
            return self._diverge(step, "rising", rise_margin, fit=fit)
        if self._state != _ARMED:
            # Recovery: the loss surely falls again *and* has left the level it stalled at (its typical value now
            # lies below the lowest loss of the stalled window), so a noise excursion does not re-arm.
            if improvement_lo >= self.rel_improvement and statistics.median(self._losses) < self._stall_floor:
                self._state, self._since_rearm = _ARMED, 0
            return None
        # A full window decides on the fitted improvement; a shorter one only when its whole interval is below.
        full = len(self._losses) == self.window
        deciding = fit["rel_improvement"] if full else fit["improvement_hi"]
        if deciding < self.rel_improvement and self._since_rearm >= self.cooldown:
            self._state = _STALLED
            self._stall_floor = min(self._losses)
            margin = math.log1p(self.rel_improvement - deciding)
            return self._event(step, "stall", "flat", margin, fit)
        return None

    def _fit(self) -> dict[str, Any]:
        x = np.asarray(self._steps, dtype=float)
        y = np.asarray(self._losses, dtype=float)
        # Fit on step offsets so large step numbers do not cost precision.
        slope, lo, hi = theil_sen(x - x[0], y, self.confidence)
        level = abs(statistics.median(self._losses)) or float(np.max(np.abs(y))) or 1.0
        # Rates are per full window (mean step spacing x (window - 1)), so a short early window needs the same
        # rate of improvement as a full one, not the same total improvement.
        span = (float(x[-1] - x[0]) or 1.0) * (self.window - 1) / (len(x) - 1)
        return {
            "slope": float(slope),
            "slope_ci": (float(lo), float(hi)),
            "rel_slope": float(slope) / level,
            "rel_improvement": -float(slope) * span / level,
            "improvement_lo": -float(hi) * span / level,
            "improvement_hi": -float(lo) * span / level,
            "level": level,
        }

    def _rise_margin(self, fit: dict[str, Any]) -> float | None:
        """The log margin of a divergent rise past its nearest boundary, or None when the rise is not one.

        A rise must be significant (slope CI above 0) and large against three yardsticks: the loss level, the
        window's own noise (robust standard deviation of the residuals about the Theil-Sen line) and the range the
        loss has spanned. Near zero the level is as small as the noise, so the first alone would call noise a rise.
        """
        rise = -fit["rel_improvement"] * fit["level"]  # loss units per full window
        if not (fit["slope_ci"][0] > 0 and rise > self.rise_tolerance * fit["level"]):
            return None  # the common case: decided without the residuals' cost
        x = np.asarray(self._steps, dtype=float)
        residuals = np.asarray(self._losses, dtype=float) - fit["slope"] * (x - x[0])
        noise = _MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
        scale = _loss_scale(self._first, self._running_min)
        boundaries = (self.rise_tolerance * fit["level"], self.rise_noise_factor * noise,
                      self.rise_span_fraction * scale)
        # A zero boundary (a noise-free window, a zero setting) is passed by any rise: it never decides.
        margin = math.log(min(rise / b if b > 0 else math.inf for b in boundaries))
        return margin if margin > 0 else None

    def _diverge(self, step: int, trigger: str, margin: float, fit: dict[str, Any] | None) -> StallEvent | None:
        if self._state == _DIVERGED:
            return None
        self._state = _DIVERGED
        self._stall_floor = min(self._losses, default=math.inf)
        return self._event(step, "divergence", trigger, margin, fit)

    def _event(self, step: int, reason: str, trigger: str, margin: float, fit: dict[str, Any] | None) -> StallEvent:
        fit = fit or {"slope": math.nan, "slope_ci": (math.nan, math.nan), "rel_slope": math.nan,
                      "rel_improvement": math.nan}
        return StallEvent(step=int(step), reason=reason, slope=fit["slope"], slope_ci=fit["slope_ci"],
                          rel_slope=fit["rel_slope"], window=list(self._losses), window_steps=list(self._steps),
                          trigger=trigger, rel_improvement=fit["rel_improvement"], margin=margin)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state, so a resumed run continues where it stopped (Lightning callback state)."""
        return to_jsonable({
            "steps": list(self._steps), "losses": list(self._losses), "first": self._first, "n_seen": self._n_seen,
            "running_min": self._running_min, "state": self._state, "since_rearm": self._since_rearm,
            "last_step": self._last_step, "stall_floor": self._stall_floor,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the detector keeps its own constructor settings)."""
        required = {"steps", "losses", "first", "n_seen", "running_min", "state", "since_rearm", "last_step",
                    "stall_floor"}
        if not isinstance(state, dict) or not required <= set(state):
            raise UsageError(f"StallDetector.load_state_dict: expected keys {sorted(required)}")
        state = from_jsonable(state)
        if state["state"] not in (_ARMED, _STALLED, _DIVERGED) or len(state["steps"]) != len(state["losses"]):
            raise UsageError("StallDetector.load_state_dict: corrupt state (unknown phase or ragged history)")
        self.reset()
        self._steps.extend(int(s) for s in state["steps"])
        self._losses.extend(float(v) for v in state["losses"])
        self._first = None if state["first"] is None else float(state["first"])
        self._running_min = float(state["running_min"])
        self._n_seen = int(state["n_seen"])
        self._state = state["state"]
        self._since_rearm = int(state["since_rearm"])
        self._stall_floor = float(state["stall_floor"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
