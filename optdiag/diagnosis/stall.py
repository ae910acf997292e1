"""Stall, loss-spike and divergence detection on the training-loss history, judged against the losses' own noise.

Minibatch losses are noisy (often 15-30% of their level): a window of raw losses that looks flat can hide a
full-data loss that still falls 10% per window. So a stall is declared only when the data *prove* the loss is flat.

* **trend test** (:func:`trend_test`): the losses of a horizon are cut into ``n_blocks`` consecutive blocks; an
  ordinary least-squares line through the block means gives the slope and, from the block means' scatter about it,
  its standard error with ``n_blocks - 2`` degrees of freedom (batch means: successive losses are correlated, block
  means much less). The slope becomes the *relative improvement per window* ``I = -slope * span / level`` with
  ``span`` one window of steps and ``level`` the current loss (``|median|`` of the last window), so the test is
  scale-free.
* **stall**: some horizon of ``window``, 2, 4, 8 or 16 windows, or the whole history when it is shorter than the
  longest (from ``min_window`` losses on) has the *upper* confidence bound of ``I`` below ``rel_improvement``
  [1% per window]: the data exclude a meaningful decrease (an equivalence test, not "no significant decrease"),
  and its interval is narrow enough to tell [half-width at most ``resolution`` x ``rel_improvement``, 3%]. The
  interval's width comes from the block means and is never narrower than the per-loss noise (estimated from
  successive differences over the longest horizon) allows, so a lucky small scatter proves nothing.
  Noisy losses need a longer horizon before they can be called flat: the bound tightens as ``horizon^-3/2``; a
  longer horizon that still holds an earlier descent only widens the bound, so it can delay a stall, never invent
  one.
* **loss spike**: on log losses (minibatch noise is multiplicative; the loss itself where it can be negative), the
  median of the last three (or five) losses exceeds the recent level (the median of the 20 losses before them) by
  ``spike_sigmas`` standard deviations of a three- (five-) loss median, from the per-loss noise of the 40 losses
  before them, measured on successive differences [6, as OLMo-core's guard; a rise
  that lasts longer is judged against the narrower spread of longer medians; differences so that a falling loss
  does not inflate the noise], by half the reference [``spike_ratio`` 1.5: minibatch losses are heavy-tailed] and by 1% of the range
  the loss has spanned [``spike_span_fraction``, the divergence rule's yardstick: near a classifier's zero loss one
  wrong example multiplies the loss, which is no instability]. It is *reported* when it has recovered (the
  three-loss median back within 3 standard deviations of the reference) as a ``"spike"`` event with its size; one
  that never recovers is dropped after ``spike_patience`` steps (it is then a stall or a divergence, judged on its
  own).
* **brief spike** (a step or two, which the medians filter out): one loss 3 robust sds of one loss and 1.5x above
  the median of the last five only *nominates* it (:meth:`StallDetector.brief_spike_start`); the caller reads the
  model's loss on fixed batches then and every three steps (:meth:`StallDetector.brief_spike_read`), and it is a
  spike when that loss, followed to its top, fell by the spike ratio on every batch (docs/diagnosis-rules.md).
* **divergence**: a non-finite loss, at once; or a sustained rise: the loss is above its starting level (median of
  the first three losses) and a Theil-Sen fit (robust to spikes) of the last window rises significantly and by
  more than ``rise_tolerance`` of the level, ``rise_noise_factor`` robust standard deviations of the residuals and
  ``rise_span_fraction`` of the range the loss has spanned, on every check for ``window // 4`` steps. A spike that
  comes back, or a catapult (the loss jumps for a few steps, then falls below its start), is no divergence.
* One verdict per situation: after a stall or divergence the detector stays quiet until a **recovery** (the loss
  falls again: lower bound of ``I`` at least ``rel_improvement`` over the last window, and its median below the
  lowest loss of the window that fired) and ``cooldown`` more updates [window // 2].

The rules and their numbers are explained in ``docs/diagnosis-rules.md``.

Example:
    >>> import numpy as np
    >>> det = StallDetector(window=30, min_window=10)
    >>> events = [det.update(t, 1.0 + 0.01 * np.sin(t)) for t in range(60)]
    >>> [(e.step, e.reason) for e in events if e is not None]
    [(32, 'stall')]
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special, stats

from optdiag.diagnosis.types import from_jsonable, to_jsonable
from optdiag.errors import UsageError
from optdiag.policy import check_number

_ARMED, _STALLED, _DIVERGED = "armed", "stalled", "diverged"

#: Default losses per window: improvement rates are per window, and the shortest stall horizon is one window.
DEFAULT_WINDOW = 50
#: Default relative improvement across a window below which the loss counts as stalled (1% per window).
DEFAULT_REL_IMPROVEMENT = 0.01
#: Default rise across a window, in robust noise standard deviations, below which a rise is noise, not divergence.
DEFAULT_RISE_NOISE_FACTOR = 3.0
#: Default rise across a window, as a fraction of the range the loss has spanned, below which a rise is negligible.
DEFAULT_RISE_SPAN_FRACTION = 0.01
#: Horizons of the stall test, in windows: the bound on a noisy slope tightens as horizon^-3/2.
HORIZONS = (1, 2, 4, 8, 16)
#: Block means per horizon: enough degrees of freedom (8) for a t interval, blocks long enough to decorrelate.
N_BLOCKS = 10
#: Windows of losses whose fitted trend decides whether the losses "look flat" (worth measuring more).
LOOKS_FLAT_WINDOWS = 2
#: Durations (in losses) a spike's rise is judged over, each against the spread of medians of as many losses.
SPIKE_DURATIONS = (3, 5)
#: Losses whose median is the level a spike rises from (the most recent before it).
SPIKE_LEVEL_LOSSES = 20
#: Losses the spike's noise is measured on: recent, since minibatch noise grows and shrinks with the level.
SPIKE_NOISE_LOSSES = 40
#: Standard deviation of the median of d independent normal values, in units of one value's (0.670 for 3, 0.536
#: for 5: the variances 0.449 and 0.287 of the order statistics).
MEDIAN_SD = {3: 0.6698, 5: 0.5356}
#: Fewest losses whose spread a spike is measured against; before that a spike must double the loss.
MIN_REFERENCE = 20
#: A single loss this many of one loss's robust sds above the median of the last :data:`BRIEF_LEVEL_LOSSES` losses
#: (and ``spike_ratio`` times it) makes the model's loss at that point worth reading: a spike of a step or two, which
#: the three-loss median filters out. Normal noise passes it about once in 700 steps, so the reads cost nothing.
BRIEF_SPIKE_SIGMAS = 3.0
#: Losses whose median is the level a brief spike is measured from (the most recent: the loss may fall fast).
BRIEF_LEVEL_LOSSES = 5
#: Fewest losses before a brief spike is looked for (the noise needs a few differences).
BRIEF_MIN_LOSSES = 10
#: Steps after a brief spike at which the model's loss is read again: recovered by then, and too few steps for a
#: healthy descent to fall by ``spike_ratio``.
BRIEF_AFTER = 3
#: Further reads of a brief spike while the model's loss still rises on the fixed batches (up to 3 x BRIEF_AFTER
#: steps after the nomination: a spike that lasts longer moves the three-loss median).
BRIEF_FOLLOWS = 3
#: Median absolute deviation -> standard deviation for normal noise (1.4826; scipy's ``scale="normal"``).
_MAD_TO_SIGMA = float(1.0 / special.ndtri(0.75))


def _tail(values: deque, k: int) -> list:
    """The last ``k`` items of a deque (all if fewer), by index from its end: ``itertools.islice`` or ``list()``
    walks the whole history, which is most of a step's cost at a history of hundreds of losses."""
    return [values[i] for i in range(-min(k, len(values)), 0)]


def _horizons(window: int, max_horizon: int) -> tuple[int, ...]:
    """The stall horizons in losses: ``window`` times each of :data:`HORIZONS` up to ``max_horizon`` windows."""
    return tuple(h * window for h in HORIZONS if h <= max_horizon)


def _loss_scale(first_loss: float, running_min: float) -> float:
    """``|first_loss - running_min| + |running_min|``: the range the loss has spanned plus its best level."""
    return abs(first_loss - running_min) + abs(running_min)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-d float array without its generic machinery (a partition; called several times a step)."""
    n = len(values)
    k = n // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    part = np.partition(values, (k - 1, k))
    return 0.5 * float(part[k - 1] + part[k])


def robust_sd(values: np.ndarray) -> float:
    """The standard deviation of normal noise with the same median absolute deviation (robust to spikes).

    Example:
        >>> robust_sd(np.array([1.0, 2.0, 3.0, 100.0]))
        1.482602218506
    """
    values = np.asarray(values, dtype=float)
    return round(_MAD_TO_SIGMA * _median(np.abs(values - _median(values))), 12)


@functools.lru_cache(maxsize=64)
def _t_quantile(probability: float, dof: int) -> float:
    return float(stats.t.ppf(probability, dof))


def trend_test(steps: np.ndarray, losses: np.ndarray, n_blocks: int = N_BLOCKS, confidence: float = 0.95,
               noise_sd: float | None = None) -> tuple[float, float, float, float]:
    """Least-squares slope of the block means of ``losses`` against their mean steps, with a confidence interval.

    The ``n`` points are cut into ``n_blocks`` consecutive blocks of (nearly) equal size; the blocks' mean losses
    are regressed on their mean steps. Block means are nearly independent even when successive losses are not, so
    the scatter of the block means about the line gives an honest standard error (the batch-means method), with
    ``n_blocks - 2`` degrees of freedom. With fewer than ``2 n_blocks`` points, each point is its own block.
    Eight degrees of freedom make that standard error itself noisy, and a lucky small one would "prove" a noisy
    loss flat; ``noise_sd``, the per-loss noise estimated from a longer history, sets a floor: the interval is
    never narrower than that of independent losses with this noise (``z * noise_sd / sqrt(sum (x - mean x)^2)``).

    Args:
        steps: strictly increasing steps. losses: the losses at those steps (finite).
        n_blocks: blocks (at least 3). confidence: two-sided level of the interval.
        noise_sd: the per-loss noise standard deviation, if known (see above).

    Returns:
        ``(slope, standard_error, low, high)``: the standard error is the interval's half-width over its quantile;
        all ``nan`` with fewer than 3 points.

    Example:
        >>> slope, se, lo, hi = trend_test(np.arange(40.0), 3.0 - 0.5 * np.arange(40.0))
        >>> round(slope, 12), se
        (-0.5, 0.0)
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    n = len(y)
    blocks = n_blocks if n >= 2 * n_blocks else n
    if blocks < 3:
        return math.nan, math.nan, math.nan, math.nan
    x = x - x[0]
    # sum / count, not .mean(): the same numbers (numpy's mean is that sum divided by the count) without its
    # generic machinery, which was most of this function's cost at the few points a block holds
    if n % blocks == 0:  # equal blocks: a reshape (the common case, and the cheap one)
        xm, ym = x.reshape(blocks, -1).sum(axis=1) / (n // blocks), y.reshape(blocks, -1).sum(axis=1) / (n // blocks)
    else:
        bounds = np.linspace(0, n, blocks + 1).round().astype(int)
        counts = np.diff(bounds).astype(float)
        xm = np.add.reduceat(x, bounds[:-1]) / counts
        ym = np.add.reduceat(y, bounds[:-1]) / counts
    xc = xm - xm.sum() / blocks
    sxx = float(xc @ xc)
    if sxx <= 0:
        return math.nan, math.nan, math.nan, math.nan
    yc = ym - ym.sum() / blocks
    slope = float(xc @ yc) / sxx
    residuals = yc - slope * xc
    t = _t_quantile(0.5 + confidence / 2.0, blocks - 2)
    half = t * math.sqrt(max(float(residuals @ residuals), 0.0) / (blocks - 2) / sxx)
    if noise_sd is not None and noise_sd > 0:
        xr = x - x.sum() / n
        z = float(special.ndtri(0.5 + confidence / 2.0))
        half = max(half, z * noise_sd / math.sqrt(float(xr @ xr)))
    return slope, half / t, slope - half, slope + half


def difference_noise(losses: np.ndarray) -> float:
    """Per-loss noise sd from successive differences (robust, and blind to a slow trend): ``robust_sd(diff) / sqrt 2``.

    Example:
        >>> difference_noise(np.array([1.0, 3.0, 1.0, 3.0, 1.0]))
        2.096716165015
    """
    diffs = np.diff(np.asarray(losses, dtype=float))
    return round(robust_sd(diffs) / math.sqrt(2.0), 12) if len(diffs) >= 2 else math.nan


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
    """A stall, a recovered loss spike or a divergence found by :class:`StallDetector`.

    Attributes:
        step: the step of the update that fired.
        reason: ``"stall"``, ``"spike"`` or ``"divergence"``.
        slope: the fitted slope of the loss per step (``nan`` if there was no fit).
        slope_ci: its confidence interval ``(lo, hi)``.
        rel_slope: ``slope / level`` (per step; level = ``|median|`` of the last window).
        window: the losses of the last window. window_steps: their steps.
        trigger: ``"flat"``, ``"spike"``, ``"nonfinite"`` or ``"rising"``.
        rel_improvement: ``-slope * span / level``, the relative improvement per window.
        margin: how far the deciding statistic lies past its boundary, as a natural log ratio (``inf`` for a
            non-finite loss).
        improvement_hi: the upper confidence bound of ``rel_improvement`` (a stall needs it below the limit).
        horizon: the number of losses the deciding fit used (a stall may need several windows of noisy losses).
        noise: the robust standard deviation of the window's losses about the fit, relative to the level.
        spike: for a spike, ``start_step``, ``peak_step``, ``end_step``, ``peak`` (three-loss median),
            ``reference`` (median before it), ``reference_sd`` (robust sd), ``sigmas`` (peak above the reference in
            sds) and ``ratio`` (peak / reference level); else empty.
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
    improvement_hi: float = math.nan
    horizon: int = 0
    noise: float = math.nan
    spike: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats as ``"nan"``/``"inf"`` strings)."""
        return to_jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StallEvent:
        """Rebuild from :meth:`to_dict` output."""
        data = from_jsonable(dict(data))
        data["slope_ci"] = tuple(data["slope_ci"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _check_number(name: str, value: Any, low: float, high: float | None = None, *, integer: bool = False) -> Any:
    return check_number(f"StallDetector: {name}", value, low=low, high=high, integer=integer)


class StallDetector:
    """Watches the loss and reports, once per situation, a stall, a recovered spike or a divergence.

    Args:
        window: losses per window: rates are per window, and the shortest stall horizon is one window.
        min_window: the fewest losses before a stall can be declared (a shorter first horizon).
        rel_improvement: the relative improvement per window below which the loss counts as stalled.
        confidence: two-sided confidence level of the trend intervals (the stall test uses its upper bound).
        cooldown: updates after a recovery before a new stall may fire (default ``window // 2``).
        resolution: a horizon may call the loss flat only if its interval is this many ``rel_improvement`` wide
            or narrower on either side (3: it tells 1% per window from 4%); a shorter, blurrier fit cannot tell a
            stall from a noisy descent, whatever its bound says.
        max_horizon: the longest stall horizon, in windows (1, 2, 4, 8 or 16 windows are tried, up to this).
        spike_sigmas: robust standard deviations above the reference median that make a spike.
        spike_ratio: the least spike peak as a multiple of the reference level (for positive losses).
        spike_span_fraction: the least spike height as a fraction of the range the loss has spanned
            ``|first - running_min| + |running_min|``: a blip negligible against how far the loss has come is no
            instability (hard batches near a classifier's zero loss).
        spike_reference: losses before a spike its reference median and spread are taken from.
        spike_patience: steps a spike may last before it is no longer reported as one.
        rise_tolerance: relative rise across a window (against the loss level) that, when significant and
            sustained, counts as divergence.
        rise_noise_factor: the least rise across a window, in robust standard deviations of the window's residuals
            about the fit, that counts as divergence.
        rise_span_fraction: the least rise across a window, as a fraction of the range the loss has spanned
            ``|first - running_min| + |running_min|``, that counts as divergence.
        check_every: fit only on steps divisible by this; every loss still enters the history, and non-finite losses
            and spikes are seen at once. ``StallDiagnoser`` uses 10.

    Example:
        >>> det = StallDetector()
        >>> det.update(0, float("nan")).reason
        'divergence'
    """

    def __init__(self, window: int = DEFAULT_WINDOW, min_window: int = 20,
                 rel_improvement: float = DEFAULT_REL_IMPROVEMENT, confidence: float = 0.95,
                 cooldown: int | None = None, resolution: float = 3.0, max_horizon: int = HORIZONS[-1], spike_sigmas: float = 6.0,
                 spike_ratio: float = 1.5, spike_span_fraction: float = DEFAULT_RISE_SPAN_FRACTION,
                 spike_reference: int = 128,
                 spike_patience: int | None = None,
                 rise_tolerance: float = 0.5, rise_noise_factor: float = DEFAULT_RISE_NOISE_FACTOR,
                 rise_span_fraction: float = DEFAULT_RISE_SPAN_FRACTION, check_every: int = 1) -> None:
        self.check_every = _check_number("check_every", check_every, 1, integer=True)
        self.window = _check_number("window", window, 3, integer=True)
        self.min_window = _check_number("min_window", min_window, 3, self.window, integer=True)
        self.rel_improvement = _check_number("rel_improvement", rel_improvement, 0.0)
        self.confidence = check_number("StallDetector: confidence", confidence, low=0.0, high=1.0, low_open=True,
                                       high_open=True)
        self._z = float(special.ndtri(0.5 + self.confidence / 2.0))  # the interval's normal quantile
        self.cooldown = self.window // 2 if cooldown is None else _check_number("cooldown", cooldown, 0, integer=True)
        self.resolution = _check_number("resolution", resolution, 0.0)
        self.max_horizon = _check_number("max_horizon", max_horizon, 1, integer=True)
        self.spike_sigmas = _check_number("spike_sigmas", spike_sigmas, 0.0)
        self.spike_ratio = _check_number("spike_ratio", spike_ratio, 1.0)
        self.spike_span_fraction = _check_number("spike_span_fraction", spike_span_fraction, 0.0)
        self.spike_reference = _check_number("spike_reference", spike_reference, 3, integer=True)
        self.spike_patience = 2 * self.window if spike_patience is None else _check_number(
            "spike_patience", spike_patience, 1, integer=True)
        self.rise_tolerance = _check_number("rise_tolerance", rise_tolerance, 0.0)
        self.rise_noise_factor = _check_number("rise_noise_factor", rise_noise_factor, 0.0)
        self.rise_span_fraction = _check_number("rise_span_fraction", rise_span_fraction, 0.0)
        self.horizons = _horizons(self.window, self.max_horizon)
        self.reset()

    def set_window(self, window: int, rel_improvement: float) -> None:
        """Judge losses that arrive at a new spacing: ``window`` losses per window (also the fewest before a stall
        can be declared, and twice the cooldown) at ``rel_improvement`` per window. Forgets the history: losses
        of the old spacing would not fit the new one.

        Example:
            >>> det = StallDetector(window=10, min_window=10)
            >>> det.set_window(5, 0.005); (det.window, det.min_window, det.horizons[:2])
            (5, 5, (5, 10))
        """
        self.window = _check_number("window", window, 3, integer=True)
        self.min_window = self.window
        self.rel_improvement = _check_number("rel_improvement", rel_improvement, 0.0)
        self.cooldown = self.window // 2
        self.horizons = _horizons(self.window, self.max_horizon)
        self.reset()

    def reset(self) -> None:
        """Forget the history (a new run)."""
        capacity = max(self.horizons[-1], self.spike_reference + 3)
        self._steps: deque[int] = deque(maxlen=capacity)
        self._losses: deque[float] = deque(maxlen=capacity)
        self._first: float | None = None
        self._n_seen = 0
        self._running_min = math.inf
        self._state = _ARMED
        self._stall_floor = math.inf  # the lowest loss of the window that fired: recovery must get below it
        self._since_rearm = self.cooldown  # a fresh detector may fire as soon as it has min_window losses
        self._last_step: int | None = None
        self._rising_since: int | None = None  # first check step of the current run of divergent rises
        self._spike: dict[str, float] | None = None  # the spike in progress
        self._brief: dict[str, Any] | None = None  # a brief spike waiting for the model's loss after it
        self._quiet_until = -math.inf  # no spike starts up to this step: the tail of a brief one
        # (level, spreads, count) scaled, and the level unscaled: refreshed on check steps (_spike_reference)
        self._reference: tuple[float, tuple[float, ...], int, float] | None = None
        self._spike_log = True  # spikes are judged on log losses (all positive so far)
        self.spike_peaked = False
        self._noise_sd = math.nan  # per-loss noise over the whole history, refreshed at each check
        self.n_ignored = 0  # updates ignored: a step that did not increase, a loss that is not a number
        # True after a check whose last two windows fit a flat trend it could not prove (noise): the
        # caller may measure more (StallDiagnoser then reads the fixed probe batches' loss)
        self.looks_flat = False

    @property
    def stalled(self) -> bool:
        """True between a stall event and the recovery that follows it."""
        return self._state == _STALLED

    @property
    def diverged(self) -> bool:
        """True after a divergence event until the loss is seen falling again."""
        return self._state == _DIVERGED

    @property
    def n_losses(self) -> int:
        """Losses held since the last reset (at most the longest horizon's)."""
        return len(self._losses)

    @property
    def in_spike(self) -> bool:
        """True while a loss spike is in progress (not yet recovered)."""
        return self._spike is not None

    def update(self, step: int, loss: float) -> StallEvent | None:
        """Add one loss; return an event when a stall starts, a spike has recovered or divergence is seen.

        Never raises on what it is given while training runs: a step that does not increase (a resumed or
        restarted loop) or a loss that is not a number is ignored and counted in :attr:`n_ignored`.

        Args:
            step: the optimizer step (strictly increasing).
            loss: the training loss at that step (a Python float, not a tensor with a graph).
        """
        try:
            loss = float(loss)
            # type() first: an ABC's isinstance costs microseconds, and this runs every step
            valid_step = type(step) is int or (not isinstance(step, bool) and isinstance(step, numbers.Integral))
        except (TypeError, ValueError):
            valid_step = False
        if not valid_step or (self._last_step is not None and step <= self._last_step):
            self.n_ignored += 1
            return None
        self._last_step = int(step)
        self._since_rearm += 1
        if not math.isfinite(loss):
            self._spike = None
            return self._diverge(step, "nonfinite", math.inf, fit=None)
        self._steps.append(int(step))
        self._losses.append(loss)
        losses = self._losses
        if len(losses) >= 3:
            a, b, c = losses[-3], losses[-2], losses[-1]
            recent = float(max(min(a, b), min(max(a, b), c)))  # the median of three, without a list and a sort
        else:
            recent = float(statistics.median(losses))
        if self._n_seen < 3:
            self._first = recent
        self._n_seen += 1
        self._running_min = min(self._running_min, recent)
        spike = self._track_spike(step, recent)
        if spike is not None:
            return spike
        if len(self._losses) < self.min_window or step % self.check_every:
            return None
        return self._check(step)

    # --- spikes -----------------------------------------------------------------------------------------------
    def _track_spike(self, step: int, recent: float) -> StallEvent | None:
        """Start, follow and close a spike; an event when it has recovered.

        A spike starts when the median of the last ``d`` losses, for ``d`` in :data:`SPIKE_DURATIONS`, stands
        ``spike_sigmas`` robust sds of such ``d``-medians above the reference (and passes the ratio and range
        tests): a longer excursion is judged against the narrower spread of longer medians, so a rise that lasts
        five steps need not be as tall as one that lasts three (a scan over durations). Its peak and recovery are
        followed on the three-loss median ``recent``.
        """
        self.spike_peaked = False  # True on the step a spike starts or reaches a new peak
        if self._spike is None:
            if self._state == _DIVERGED or step <= self._quiet_until:
                return None
            if self._reference is None or step % self.check_every == 0:
                self._reference = self._spike_reference()
            if self._reference is None:
                return None
            level, spreads, count, reference = self._reference
            # A spread from a handful of early losses means nothing (they may swing by half as training starts): until
            # MIN_REFERENCE losses, a doubling of the loss counts instead (a catapult's first steps), which noise of
            # 25% or so never produces, and the probe batches then tell the model's spike from the batches'.
            ratio = self.spike_ratio if count >= MIN_REFERENCE else max(self.spike_ratio, 2.0)
            if count < MIN_REFERENCE:
                spreads = tuple(0.0 for _ in spreads)
            floor = max((ratio - 1.0) * abs(reference),
                        self.spike_span_fraction * _loss_scale(self._first, self._running_min))
            last = _tail(self._losses, SPIKE_DURATIONS[-1])
            if max(last) - reference <= floor:
                return None  # no median of these losses can pass the first test: most steps stop here
            for duration, sd in zip(SPIKE_DURATIONS, spreads):
                if len(last) < duration:
                    break
                median = recent if duration == 3 else sorted(last[-duration:])[duration // 2]  # python: fast for 5
                if median - reference > floor and self._scale(median) - level > self.spike_sigmas * sd:
                    self.spike_peaked = True
                    self._spike = {"start_step": float(step), "peak_step": float(step), "peak": recent,
                                   "reference": reference, "level": level, "reference_sd": sd,
                                   "duration": float(duration)}
                    break
            return None
        spike = self._spike
        self.spike_peaked = recent > spike["peak"]
        if self.spike_peaked:
            spike.update(peak=recent, peak_step=float(step))
        sd, level = spike["reference_sd"], spike["level"]
        if recent <= spike["reference"] or self._scale(recent) <= level + 3.0 * sd:
            self._spike = None
            reference = spike["reference"]
            peak = self._scale(spike["peak"])
            spike.update(end_step=float(step), sigmas=(peak - level) / sd if sd > 0 else math.inf,
                         ratio=spike["peak"] / reference if reference > 0 else math.inf)
            margin = math.log(spike["sigmas"] / self.spike_sigmas) if self.spike_sigmas > 0 else math.inf
            event = self._event(step, "spike", "spike", margin, None)
            event.spike = dict(spike)
            return event
        if step - spike["start_step"] > self.spike_patience:
            self._spike = None  # it did not come back: no longer a spike; a stall or divergence is judged on its own
        return None

    # --- brief spikes (read on the model, not the losses) ------------------------------------------------------
    def _brief_reference(self) -> float:
        """The level a brief spike is measured from: the median of the last :data:`BRIEF_LEVEL_LOSSES` losses (taken
        from the deque's end; their order does not change their median)."""
        return sorted(itertools.islice(reversed(self._losses), BRIEF_LEVEL_LOSSES))[BRIEF_LEVEL_LOSSES // 2]

    def brief_spike_may_start(self, loss: float) -> bool:
        """False when :meth:`brief_spike_start` would surely refuse ``loss`` and no nominated brief spike waits for a
        read: its first bound alone (``spike_ratio`` times :meth:`_brief_reference`, as the test computes it), so
        that the caller skips the test and its bookkeeping on the usual step. Never raises.

        Example:
            >>> det = StallDetector()
            >>> for step in range(20): _ = det.update(step, 1.0)
            >>> det.brief_spike_may_start(1.2), det.brief_spike_may_start(3.0)
            (False, True)
        """
        losses = self._losses
        if self._brief is not None or len(losses) < BRIEF_MIN_LOSSES:
            return True
        try:
            return not loss <= self.spike_ratio * self._brief_reference()
        except TypeError:
            return True  # not a number: the test itself decides

    def brief_spike_start(self, step: int, loss: float) -> bool:
        """Whether ``loss``, the minibatch loss of ``step`` before it enters the history, starts a brief spike.

        A spike of one or two steps never moves a three-loss median; only the model's loss at that point can tell
        it from a hard batch. True (and the candidate kept) when the loss stands :data:`BRIEF_SPIKE_SIGMAS` of one
        loss's robust sds and ``spike_ratio`` times above the median of the last :data:`BRIEF_LEVEL_LOSSES` losses
        (and by ``spike_span_fraction`` of the range): the caller then reads the model's loss on fixed batches
        now and whenever :meth:`brief_spike_due`, and :meth:`brief_spike_read` decides. Never raises.
        """
        try:
            n = len(self._losses)
            # nor in the tail of a brief spike just read (the model's loss still coming down reads as a new
            # spike's fall: one excursion, one verdict)
            if self._brief is not None or self._spike is not None or self._state == _DIVERGED \
                    or step <= self._quiet_until or n < BRIEF_MIN_LOSSES or not self._spike_log \
                    or not (loss > 0 and math.isfinite(loss)):
                return False
            reference = self._brief_reference()
            if not loss > self.spike_ratio * reference or \
                    loss - reference <= self.spike_span_fraction * _loss_scale(self._first, self._running_min):
                return False  # the cheap tests first: most steps stop here
            scaled = np.log(np.asarray(_tail(self._losses, SPIKE_NOISE_LOSSES), dtype=float))
            sd = difference_noise(scaled)
            sigmas = (math.log(loss) - math.log(reference)) / sd if sd > 0 else math.inf
            if not sigmas >= BRIEF_SPIKE_SIGMAS:
                return False
            self._brief = {"start_step": float(step), "peak_step": float(step), "peak": loss,
                           "reference": reference, "level": math.log(reference), "reference_sd": sd,
                           "sigmas": sigmas, "ratio": loss / reference, "duration": 1.0, "due": float(step)}
            return True
        except (TypeError, ValueError, ArithmeticError):
            return False

    @property
    def brief_spike(self) -> dict[str, Any] | None:
        """The nominated brief spike waiting for its next read (a copy, with its reads so far), or None."""
        return None if self._brief is None else dict(self._brief, reads=list(self._brief.get("reads", [])))

    def brief_spike_due(self, step: int) -> bool:
        """True at a step the nominated brief spike's model loss is to be read (at once, then every
        :data:`BRIEF_AFTER` steps)."""
        return self._brief is not None and step >= self._brief["due"]

    def brief_spike_read(self, step: int, losses: Any) -> StallEvent | None:
        """Take a read of the model's loss on the same fixed batches for the nominated brief spike.

        ``losses`` holds one loss per fixed batch (a number is one batch). The first read is at the nomination, the
        next :data:`BRIEF_AFTER` steps later. While the latest read's mean is the highest and it, or one batch's
        loss, is ``spike_ratio`` times the first read's (the model's loss rose after the nomination, as in a burst of
        several steps), it is followed :data:`BRIEF_AFTER` steps more, up to
        :data:`BRIEF_FOLLOWS` times. Then it is a ``"spike"`` event when **every** batch's loss at the highest read is
        ``spike_ratio`` times its last (it came back, on each batch: one batch's own swing is no spike of the model;
        the margin is ``log(min ratio / spike_ratio)``), and dropped otherwise (a hard batch) or when a read is not
        positive numbers. Never raises.
        """
        brief = self._brief
        if brief is None:
            return None
        try:
            read = tuple(float(x) for x in (losses if isinstance(losses, (list, tuple)) else (losses,)))
        except (TypeError, ValueError):
            read = ()
        reads = brief.setdefault("reads", [])
        if not read or not all(x > 0 and math.isfinite(x) for x in read) or (reads and len(read) != len(reads[0][1])):
            self._brief = None  # not measurable: dropped
            return None
        reads.append((float(step), read))
        brief["due"] = float(step) + BRIEF_AFTER
        if len(reads) == 1:
            return None
        means = [sum(r) / len(r) for _, r in reads]
        top = max(range(len(reads)), key=means.__getitem__)
        rose = means[-1] >= self.spike_ratio * means[0] or max(p / q for p, q in zip(read, reads[0][1])) >= \
            self.spike_ratio  # the mean, or one batch: a burst of several steps may show on one batch first
        if top == len(reads) - 1 and rose and len(reads) <= BRIEF_FOLLOWS:
            return None  # still rising on the same batches: follow it to its top (the fall from there decides)
        self._brief = None
        fall = min(p / q for p, q in zip(reads[top][1], read))
        if not fall >= self.spike_ratio:
            return None
        if self._spike is not None and self._spike["start_step"] >= brief["start_step"]:
            self._spike = None  # the losses' median caught the same excursion later: one spike, one event
        # and its tail (the minibatch losses come down a few steps after the model's) starts none
        self._quiet_until = step + 2 * BRIEF_AFTER
        spike = {k: v for k, v in brief.items() if k not in ("reads", "due")}
        spike.update(end_step=float(step), probe_peak_step=reads[top][0], probe_loss_during=means[top],
                     probe_loss_after=means[-1], probe_loss_first=means[0], probe_fall_min=fall)
        # The losses only nominated it (a hard batch passes the sigma gate often enough); the model's fall on the
        # same batches is the evidence, so the margin is that fall's past the spike ratio, on the batch it is least.
        event = self._event(step, "spike", "spike", math.log(fall / self.spike_ratio), None)
        event.spike = spike
        return event

    def _scale(self, loss: float) -> float:
        """The scale spikes are judged on: log for a positive loss (minibatch noise is multiplicative, and
        heavy-tailed on a linear scale), the loss itself otherwise."""
        return math.log(loss) if self._spike_log and loss > 0 else (-math.inf if self._spike_log else loss)

    def _unscale(self, value: float) -> float:
        return math.exp(value) if self._spike_log else value

    def _spike_reference(self) -> tuple[float, tuple[float, ...], int, float] | None:
        """The level a spike is measured from and the spread of each duration's medians (and the level unscaled).

        The level is the median of the :data:`SPIKE_LEVEL_LOSSES` losses before the last five (recent: on a falling
        loss the median of a long history lies above the current level); the spread is the per-loss noise of the
        :data:`SPIKE_NOISE_LOSSES` losses before them from successive differences (blind to the trend; recent,
        because minibatch noise scales with the loss) times the standard deviation of a median of ``d`` normal
        values (:data:`MEDIAN_SD`). Refreshed on check steps only (most of a step's cost
        otherwise): the reference lags by at most ``check_every - 1`` losses.
        """
        n = len(self._losses)
        # the first steps (a catapult comes at once): three losses before the last three will do, three-loss medians
        longest = SPIKE_DURATIONS[-1] if n >= SPIKE_DURATIONS[-1] + 3 else SPIKE_DURATIONS[0]
        if n < longest + 3:
            return None
        history = np.fromiter(itertools.islice(self._losses, max(0, n - longest - self.spike_reference),
                                               n - longest), float)
        self._spike_log = bool(history.min() > 0)
        scaled = np.log(history) if self._spike_log else history
        recent = scaled[-SPIKE_NOISE_LOSSES:]  # the noise where the loss is now (it changes with the level)
        noise = difference_noise(recent) if len(recent) >= 3 else robust_sd(recent)
        level = _median(scaled[-SPIKE_LEVEL_LOSSES:])
        spreads = tuple(MEDIAN_SD[d] * noise for d in SPIKE_DURATIONS if d <= longest)
        return level, spreads, len(history), self._unscale(level)

    # --- fits -------------------------------------------------------------------------------------------------
    def _level(self) -> float:
        last = _tail(self._losses, self.window)
        return abs(statistics.median(last)) or float(np.max(np.abs(last))) or 1.0

    def _trend(self, n: int, level: float) -> dict[str, Any]:
        """The trend test over the last ``n`` losses of this check (see _check), as relative improvements per
        window (see the module doc)."""
        return self._trend_of(self._x[-n:], self._y[-n:], level, self._noise_sd)

    def _trend_of(self, x: np.ndarray, y: np.ndarray, level: float, noise_sd: float) -> dict[str, Any]:
        """The trend test of losses ``y`` at steps ``x`` with per-loss noise ``noise_sd``, as relative improvements
        per window of ``level``."""
        slope, _, lo, hi = trend_test(x, y, confidence=self.confidence, noise_sd=noise_sd)
        span = (float(x[-1] - x[0]) or 1.0) * (self.window - 1) / (len(x) - 1)  # one window of steps
        return {"horizon": len(x), "slope": slope, "slope_ci": (lo, hi), "rel_slope": slope / level,
                "rel_improvement": -slope * span / level, "improvement_lo": -hi * span / level,
                "improvement_hi": -lo * span / level, "level": level}

    def relative_noise(self, n: int | None = None) -> float:
        """The per-loss noise of the last ``n`` losses (default: a window) from successive differences (robust, and
        blind to a slow trend), over their median's magnitude; NaN with fewer than 3 losses or a zero level.

        Example:
            >>> det = StallDetector(window=10, min_window=10)
            >>> for step, loss in enumerate([1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8, 1.0, 1.1, 0.9]):
            ...     _ = det.update(step, loss)
            >>> round(det.relative_noise(), 3)  # median level 1.0
            0.21
        """
        values = _tail(self._losses, self.window if n is None else n)
        if len(values) < 3:
            return math.nan
        level = abs(statistics.median(values))
        return difference_noise(np.asarray(values, dtype=float)) / level if level > 0 else math.nan

    def _resolution_floor(self, horizon: int, relative_noise: float) -> float:
        """The narrowest half-width (relative improvement per window) of a fit over ``horizon`` evenly spaced
        losses whose per-loss noise is ``relative_noise`` of their level: what the noise alone leaves."""
        return self._z * relative_noise * (self.window - 1) * math.sqrt(12.0 / (horizon * (horizon**2 - 1)))

    def could_prove_flat(self, horizon: int, n: int | None = None) -> bool:
        """Whether a fit over ``horizon`` losses with the noise of the last ``n`` losses (default: a window;
        :meth:`relative_noise`) could be narrow enough to call the loss flat (half-width at most ``resolution`` x
        ``rel_improvement``); True while the noise is unknown.

        Example:
            >>> det = StallDetector(window=10, min_window=10)
            >>> for step, loss in enumerate([1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.8, 1.0, 1.1, 0.9]):
            ...     _ = det.update(step, loss)
            >>> det.could_prove_flat(20), det.could_prove_flat(100)  # 21% noise: 14% and 1.3% against 3%
            (False, True)
        """
        noise = self.relative_noise(n)
        return not self._resolution_floor(max(int(horizon), 2), noise) > self.resolution * self.rel_improvement

    def surely_improving(self, fewest: int = 3) -> bool:
        """Whether the last window's losses (at least ``fewest`` of them) surely fall faster than
        ``rel_improvement`` per window: the lower end of the trend's interval lies above it, so the loss is not
        stalled there (the test that re-arms a stalled detector, on however few losses it has). Never raises.

        Example:
            >>> det = StallDetector(window=10, min_window=10)
            >>> for step in range(5): _ = det.update(step, 1.0 - 0.05 * step)
            >>> det.surely_improving(5), det.surely_improving(6)
            (True, False)
        """
        n = min(len(self._losses), self.window)
        if n < max(fewest, 3):
            return False
        x = np.asarray(_tail(self._steps, n), dtype=float)
        y = np.asarray(_tail(self._losses, n), dtype=float)
        if not np.isfinite(y).all():
            return False
        fit = self._trend_of(x, y, self._level(), difference_noise(y))
        return bool(fit["improvement_lo"] >= self.rel_improvement)  # NaN (no interval) never passes

    def _check(self, step: int) -> StallEvent | None:
        self._x = np.fromiter(self._steps, float, len(self._steps))  # once per check, for every horizon's fit
        self._y = np.fromiter(self._losses, float, len(self._losses))
        level = self._level()
        self._noise_sd = difference_noise(self._y)
        n = len(self._losses)
        window_fit = self._trend(min(n, self.window), level)
        rise_margin = self._rise_margin(level)
        if rise_margin is None:
            self._rising_since = None
        else:
            if self._rising_since is None:
                self._rising_since = step
            if step - self._rising_since >= self.window // 4:
                return self._diverge(step, "rising", rise_margin, fit=window_fit)
        if self._state != _ARMED:
            # Recovery: the loss surely falls again *and* has left the level it stalled at (its typical value now
            # lies below the lowest loss of the stalled window), so a noise excursion does not re-arm.
            last = _tail(self._losses, self.window)
            if window_fit["improvement_lo"] >= self.rel_improvement and statistics.median(last) < self._stall_floor:
                self._state, self._since_rearm = _ARMED, 0
            return None
        if self._since_rearm < self.cooldown:
            return None
        horizons = [h for h in self.horizons if h <= n]
        if n < self.horizons[-1] and n not in horizons:
            horizons.append(n)  # all the history there is: a flat stretch between two multiples is not wasted
        # "Looks flat": the last two windows fit a flat trend (a single window's fit dips below the limit by noise
        # alone on healthy runs; a longer horizon still holds the first descent of a run that stalled after it)
        multiples = [h for h in horizons if h in self.horizons and h <= LOOKS_FLAT_WINDOWS * self.window] or horizons
        recent = window_fit if multiples[-1] == window_fit["horizon"] else self._trend(multiples[-1], level)
        self.looks_flat = bool(recent["rel_improvement"] < self.rel_improvement)
        for horizon in horizons:
            # The per-loss noise alone makes this horizon's interval at least this wide (relative, per window):
            # skip a fit that could not resolve a stall anyway (most of the cost on noisy losses).
            if self._resolution_floor(horizon, self._noise_sd / level) > self.resolution * self.rel_improvement:
                continue
            fit = window_fit if horizon == window_fit["horizon"] else (
                recent if horizon == recent["horizon"] else self._trend(horizon, level))
            resolved = fit["improvement_hi"] - fit["improvement_lo"] <= 2.0 * self.resolution * self.rel_improvement
            if resolved and fit["improvement_hi"] < self.rel_improvement:  # NaN (no interval) never passes
                self._state = _STALLED
                self._stall_floor = min(_tail(self._losses, self.window))
                margin = math.log1p(self.rel_improvement - fit["improvement_hi"])
                return self._event(step, "stall", "flat", margin, fit)
        return None

    def _rise_margin(self, level: float) -> float | None:
        """The log margin of a divergent rise past its nearest boundary, or None when the rise is not one.

        The loss must be above where it started, and the last window's Theil-Sen slope (robust to a spike) must be
        significant and large against three yardsticks: the loss level, the window's own noise (robust sd of the
        residuals about the line) and the range the loss has spanned.
        """
        last = _tail(self._losses, self.window)
        if len(last) < self.min_window or statistics.median(last[-3:]) <= self._first:
            return None
        x = np.asarray(_tail(self._steps, len(last)), dtype=float)
        x = x - x[0]
        y = np.asarray(last, dtype=float)
        slope, lo, _ = theil_sen(x, y, self.confidence)
        span = (float(x[-1]) or 1.0) * (self.window - 1) / (len(x) - 1)
        rise = slope * span
        if not (lo > 0 and rise > self.rise_tolerance * level):
            return None
        noise = robust_sd(y - slope * x)
        scale = _loss_scale(self._first, self._running_min)
        boundaries = (self.rise_tolerance * level, self.rise_noise_factor * noise, self.rise_span_fraction * scale)
        # A zero boundary (a noise-free window, a zero setting) is passed by any rise: it never decides.
        margin = math.log(min(rise / b if b > 0 else math.inf for b in boundaries))
        return margin if margin > 0 else None

    def _diverge(self, step: int, trigger: str, margin: float, fit: dict[str, Any] | None) -> StallEvent | None:
        if self._state == _DIVERGED:
            return None
        self._state = _DIVERGED
        self._rising_since = None
        self._stall_floor = min(self._losses, default=math.inf)
        return self._event(step, "divergence", trigger, margin, fit)

    def _event(self, step: int, reason: str, trigger: str, margin: float, fit: dict[str, Any] | None) -> StallEvent:
        fit = fit or {"slope": math.nan, "slope_ci": (math.nan, math.nan), "rel_slope": math.nan,
                      "rel_improvement": math.nan, "improvement_hi": math.nan, "horizon": 0}
        window = _tail(self._losses, self.window)
        steps = _tail(self._steps, self.window)
        noise = math.nan
        if len(window) >= 3 and math.isfinite(fit["slope"]):
            x = np.asarray(steps, dtype=float)
            residuals = np.asarray(window) - fit["slope"] * (x - x[0])
            noise = robust_sd(residuals) / self._level()
        return StallEvent(step=int(step), reason=reason, slope=fit["slope"], slope_ci=tuple(fit["slope_ci"]),
                          rel_slope=fit["rel_slope"], window=window, window_steps=steps, trigger=trigger,
                          rel_improvement=fit["rel_improvement"], margin=margin,
                          improvement_hi=fit["improvement_hi"], horizon=int(fit["horizon"]), noise=noise)

    def mark_stalled(self) -> None:
        """Enter the stalled state as if this detector had fired (another detector proved the same stall), so the
        situation gets one verdict; recovery re-arms it as usual."""
        if self._state == _ARMED:
            self._state = _STALLED
            self._stall_floor = min(_tail(self._losses, self.window), default=math.inf)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state, so a resumed run continues where it stopped (Lightning callback state)."""
        return to_jsonable({
            "steps": list(self._steps), "losses": list(self._losses), "first": self._first, "n_seen": self._n_seen,
            "running_min": self._running_min, "state": self._state, "since_rearm": self._since_rearm,
            "last_step": self._last_step, "stall_floor": self._stall_floor, "rising_since": self._rising_since,
            "spike": self._spike, "spike_log": self._spike_log, "brief": self._brief,
            "quiet_until": self._quiet_until,
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
        rising = state.get("rising_since")
        self._rising_since = None if rising is None else int(rising)
        spike = state.get("spike")
        self._spike = None if spike is None else {k: float(v) for k, v in spike.items()}
        self._quiet_until = float(state.get("quiet_until", -math.inf))
        brief = state.get("brief")
        self._brief = None if brief is None else {
            k: [(float(a), tuple(float(x) for x in b)) for a, b in v] if k == "reads" else float(v)
            for k, v in brief.items()}
        self._spike_log = bool(state.get("spike_log", True))
