"""From evidence to a verdict: which situation the run is in, how sure we are, and what it predicts.

Each rule is a *test*: a statistic compared with a boundary justified in ``docs/diagnosis-rules.md``. A test's
probability is a logistic function of the statistic's distance from the boundary, ``1 / (1 + exp(-z / W))``:
exactly 0.5 on the boundary, 0.9 a factor of 2 past it (``W = ln 2 / ln 9`` on log-ratio statistics), near 1 far from
it. Every kind is one row of :data:`RULES`: the tests it needs, whether each must hold or fail, and the probability
assumed when the test's inputs were not measured. A kind's score is the ``min`` over its row (all must hold), so it
is monotone in every statistic; the verdict is the highest score among the kinds the detector's event allows.

**No verdict without evidence.** When the best score is 0.5 or less (at least one of its tests is as likely false
as true), or tied with another kind's, nothing is diagnosed: :func:`diagnose_stall` returns ``None`` and the caller
measures more or stays silent. Every verdict states what it predicts (``evidence["prediction"]``) so that the
monitor can check it later (:func:`check_prediction`).

The thresholds that come from the stall detector (the window, the 1% per window) are those of the detector
actually configured: pass :meth:`Thresholds.from_detector`.

Example:
    >>> from optdiag.diagnosis.evidence import Evidence
    >>> from optdiag.diagnosis.stability import OptimizerSpec
    >>> ev = Evidence(step=10, lambda_max=150.0, optimizer=OptimizerSpec("sgd", lr=0.02),
    ...               grad_sq_norm_unbiased=4.0, grad_noise_trace=32.0, batch_size=32)
    >>> diagnose_stall(ev).kind
    'oscillation'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optdiag.diagnosis.advice import REPEATED_SPIKES, spike_advice_note, suggest
from optdiag.diagnosis.evidence import Evidence, stability_text
from optdiag.diagnosis.stall import DEFAULT_REL_IMPROVEMENT, DEFAULT_WINDOW, StallEvent
from optdiag.diagnosis.types import Diagnosis
from optdiag.errors import UsageError
from optdiag.policy import check_number

#: Logistic width on log-ratio statistics: a factor of 2 past a boundary gives probability 0.9.
LOG_WIDTH = math.log(2.0) / math.log(9.0)
#: Norm test (Byrd et al. 2012): |G|^2 below one minibatch's noise tr(Sigma)/B means "statistically zero".
GRAD_SNR_BOUNDARY = 1.0
#: A gradient below 10% of its early-training scale counts as tiny (one decade down).
GRAD_TINY_RATIO = 0.1
#: Fewest consecutive-gradient pairs whose mean inner product may judge the gradient against its noise.
MIN_GRADIENT_PAIRS = 8
#: A gradient is deterministic (full batch) when its pairs' noise is below this share of its squared norm.
DETERMINISTIC_NOISE_SHARE = 1e-3
#: Negative curvature is significant when lambda_min < -TAU * lambda_max: at lr = 1/lambda_max it then grows a
#: perturbation e-fold within 1/TAU = 50 steps, one stall window; weaker negative curvature is not escaped in
#: the window, like the small negative eigenvalues of trained nets.
NEGATIVE_CURVATURE_TAU = 0.02
#: Oscillation when sharpness / threshold >= 0.5: SGD's sign-flip boundary lr * lambda = 1, and the margin
#: observed for small-batch momentum (divergence already at lr * lambda = 2.0 of 3.8).
OSCILLATION_RATIO = 0.5
#: Consecutive minibatch gradients anti-aligned: stationary SGD gives E cos = -lr * lambda / 2 per direction, -0.5
#: at the sign-flip boundary, diluted to about 2/3 of that by flatter directions.
ANTI_ALIGNED_COSINE = -0.3
#: Logistic width for the cosine (linear scale): 0.1 past the boundary gives probability 0.9.
COSINE_WIDTH = 0.1 / math.log(9.0)
#: A verdict needs a score above this (every test of its row more likely true than false).
DECIDES_ABOVE = 0.5
#: A spike whose three-loss median stays up this many steps is one of the model: hard batches change every step.
MODEL_SPIKE_STEPS = 10
#: A saddle's prediction is checked after this many e-folds of the escape direction (from a 1e-4 offset, ~ln 1e4).
SADDLE_EFOLDS = 10
#: At a minimum, a loss still above 10% of its initial gap to ``loss_floor`` is "still high".
LOSS_HIGH_GAP = 0.1
#: When scores tie above DECIDES_ABOVE (they cannot on real numbers unless one test limits both), this order
#: names the more actionable kind first; an exact tie is still undecided (see :func:`_decide`).
PRIORITY = ("divergence", "loss_spike", "oscillation", "saddle_point", "local_minimum", "plateau")

#: The one rule table: kind -> ((test, must_hold, probability when not measured), ...).
#: ``must_hold=False`` uses ``1 - p``. "Not measured" is 0.5 (undecided) for the critical-point tests, which then
#: cannot carry a verdict on their own, 0 for the signals a kind is claimed from, 1 for a test that may only veto.
RULES: dict[str, tuple[tuple[str, bool, float], ...]] = {
    "divergence": (("divergence_event", True, 0.0),),
    "loss_spike": (("spike_event", True, 0.0), ("model_spike", True, 1.0)),
    "oscillation": (("oscillation_signal", True, 0.0),),
    "saddle_point": (("flat", False, 0.0), ("grad_zero", True, 0.5), ("negative_curvature", True, 0.5)),
    "local_minimum": (("flat", False, 0.0), ("grad_zero", True, 0.5), ("negative_curvature", False, 0.5),
                      ("oscillation_signal", False, 0.0)),
    "plateau": (("flat", True, 0.0), ("oscillation_signal", False, 0.0), ("no_progress", True, 1.0)),
}
#: The kinds each detector event may lead to (a stall can still reveal a non-finite loss).
EVENT_KINDS = {
    "stall": ("divergence", "oscillation", "saddle_point", "local_minimum", "plateau"),
    "divergence": ("divergence",),
    "spike": ("loss_spike",),  # and oscillation once spikes repeat (see diagnose_stall)
    None: ("divergence", "oscillation", "saddle_point", "local_minimum", "plateau"),
}
#: What each verdict predicts, checked ``Thresholds.check_after`` windows later by :func:`check_prediction`.
PREDICTIONS = {
    "local_minimum": "the loss stays at its level (it falls by less than the stall limit per window)",
    "saddle_point": "the loss drops by at least the escape drop once the escape direction grows",
    "oscillation": "lowering the learning rate removes the bounce (the loss falls after the lr is lowered)",
    "plateau": "the loss keeps crawling: it does not rise, and falls by less than the stall limit per window",
    "divergence": "the loss does not come back below its starting level",
    "loss_spike": "the loss stays below the spike's peak (the spike was transient)",
}


@dataclass(frozen=True)
class Thresholds:
    """The boundaries that depend on how the stall detector is configured.

    Attributes:
        window: the detector's window (losses per window).
        rel_improvement: the detector's stall limit (relative improvement per window).
        check_after: windows after a verdict at which its prediction is checked.
        spike_ratio: the detector's least spike, as a multiple of the level; a spike of the model must also raise
            the fixed probe batches' loss by this much over its value after the recovery.

    Example:
        >>> t = Thresholds(window=100, rel_improvement=0.02)
        >>> t.flat_step_curvature, round(t.no_progress_per_step, 8)
        (0.01, 0.00020202)
    """

    window: int = DEFAULT_WINDOW
    rel_improvement: float = DEFAULT_REL_IMPROVEMENT
    check_after: int = 4
    spike_ratio: float = 1.5

    def __post_init__(self) -> None:
        check_number("Thresholds.window", self.window, low=3, integer=True)
        check_number("Thresholds.rel_improvement", self.rel_improvement, low=0.0)
        check_number("Thresholds.check_after", self.check_after, low=1, integer=True)
        check_number("Thresholds.spike_ratio", self.spike_ratio, low=1.0)

    @classmethod
    def from_detector(cls, detector: Any, **kwargs: Any) -> Thresholds:
        """The thresholds of a configured :class:`~optdiag.diagnosis.stall.StallDetector`."""
        return cls(window=detector.window, rel_improvement=detector.rel_improvement,
                   spike_ratio=detector.spike_ratio, **kwargs)

    @property
    def flat_step_curvature(self) -> float:
        """Flat when ``effective_lr * |lambda| < 1 / window``: the stiffest direction needs over a window to move."""
        return 1.0 / self.window

    @property
    def no_progress_per_step(self) -> float:
        """No progress when the first-order predicted decrease per step, ``effective_lr |G|^2 / loss``, is below the
        detector's own limit spread over a window's steps: the step size alone explains the stall."""
        return self.rel_improvement / (self.window - 1)


DEFAULT_THRESHOLDS = Thresholds()


def _logistic(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def log_ratio_probability(stat: float, boundary: float) -> float:
    """Probability that ``stat`` exceeds ``boundary`` (both >= 0): 0.5 at equality, 0.9 at twice the boundary.

    Example:
        >>> log_ratio_probability(2.0, 1.0), log_ratio_probability(1.0, 1.0)
        (0.9, 0.5)
    """
    if not stat > 0:  # 0, negative or NaN
        return 0.0
    if math.isinf(stat) or boundary <= 0:
        return 1.0
    ratio = stat / boundary  # extreme evidence can underflow or overflow it
    if ratio == 0.0 or math.isinf(ratio):
        return 0.0 if ratio == 0.0 else 1.0
    return round(_logistic(math.log(ratio) / LOG_WIDTH), 12)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _grad_zero(ev: Evidence, th: Thresholds | None = None, loss: float | None = None) -> float | None:
    """P(the true gradient is ~0), judged against the gradient's own noise with enough samples.

    1. Consecutive-gradient pairs over the stalled horizon (at least :data:`MIN_GRADIENT_PAIRS`): the mean inner
       product ``g_t . g_(t-1)`` estimates ``|G|^2``, the mean ``|g_t| |g_(t-1)|`` less it the noise ``tr(Sigma)/B``; the
       norm test compares the upper confidence bound of ``|G|^2`` with that noise. A deterministic gradient (noise
       below a thousandth of ``|g|^2``: full batch) is judged by its size against its early-training scale and
       by the progress it predicts (:func:`_deterministic_grad_zero`).
    2. Otherwise the probe set's norm test when its noise estimate rests on at least :data:`MIN_GRADIENT_PAIRS`
       batches (two probe batches prove nothing).
    3. Otherwise, for a noise-free gradient only, the same deterministic test; else not measured.
    """
    pairs = ev.grad_pair_count or 0
    if pairs >= MIN_GRADIENT_PAIRS and _finite(ev.grad_pair_dot) and _finite(ev.grad_pair_sq) and ev.grad_pair_sq > 0:
        noise = ev.grad_pair_sq - ev.grad_pair_dot
        if noise > DETERMINISTIC_NOISE_SHARE * ev.grad_pair_sq:
            upper = ev.grad_pair_dot + 2.0 * (ev.grad_pair_dot_stderr or 0.0)
            return 1.0 - log_ratio_probability(max(upper, 0.0) / noise, GRAD_SNR_BOUNDARY)
        return _deterministic_grad_zero(ev, th, loss)
    if ev.grad_snr is not None and ev.grad_noise_trace and (ev.grad_noise_batches or 0) >= MIN_GRADIENT_PAIRS:
        return 1.0 - log_ratio_probability(ev.grad_snr, GRAD_SNR_BOUNDARY)
    return _deterministic_grad_zero(ev, th, loss) if ev.noise_free else None


def _deterministic_grad_zero(ev: Evidence, th: Thresholds | None, loss: float | None) -> float | None:
    """A noise-free gradient is ~0 when it is a decade below its early-training scale, or small against the scale
    the loss and the curvature set: ``gradient_reach = |g|^2 / (2 lambda_max |loss|)`` is exactly 1 anywhere on a
    quadratic bowl ``lambda_max x^2 / 2`` (and ``lambda / lambda_max`` on a flatter one), so below the stall limit
    (1%) the point is far nearer a critical point than a bowl of that curvature and loss would allow, whatever the
    lr. A heuristic scale, not a bound (a loss resting in much flatter directions also reads small; the flat test
    tells that case, a plateau, apart). The second test matters when training starts on the plateau itself (a
    saddle at initialisation: the early scale is then as tiny as the gradient); the larger of the two decides."""
    tests = []
    if ev.grad_norm_ratio is not None:
        tests.append(1.0 - log_ratio_probability(ev.grad_norm_ratio, GRAD_TINY_RATIO))
    reach = gradient_reach(ev, loss)
    if reach is not None:
        tests.append(1.0 - log_ratio_probability(reach, (th or DEFAULT_THRESHOLDS).rel_improvement))
    return max(tests) if tests else None


def gradient_reach(ev: Evidence, loss: float | None) -> float | None:
    """``|g|^2 / (2 lambda_max |loss|)``: the gradient against the scale of a quadratic bowl with the top curvature
    and this loss, where it equals 1 (None without a positive lambda_max, a gradient or a loss).

    Example:
        >>> gradient_reach(Evidence(step=0, grad_norm=0.2, lambda_max=2.0), 1.0)
        0.01
    """
    g = ev.grad_norm
    if not (_finite(g) and _finite(ev.lambda_max) and ev.lambda_max > 0 and _finite(loss) and loss != 0):
        return None
    scale = 2.0 * ev.lambda_max * abs(loss)  # may underflow to 0 for extreme evidence
    return math.inf if scale == 0 else round(g * g / scale, 15)


def _negative_curvature(ev: Evidence) -> float | None:
    """P(lambda_min is significantly negative): relative to lambda_max and beyond its Lanczos residual."""
    if not _finite(ev.lambda_min):
        return None
    if ev.lambda_min >= 0:
        return 0.0
    magnitude = -ev.lambda_min
    lam_max = ev.lambda_max if _finite(ev.lambda_max) else None
    scale = 0.0 if lam_max is None else NEGATIVE_CURVATURE_TAU * lam_max  # may underflow to 0
    relative = math.inf if scale <= 0 else magnitude / scale
    p = log_ratio_probability(relative, 1.0)
    if ev.lambda_min_residual is not None:
        p = min(p, log_ratio_probability(magnitude / ev.lambda_min_residual if ev.lambda_min_residual else math.inf,
                                         1.0))
    return p


def _step_curvature(ev: Evidence) -> float | None:
    """``effective_lr * |lambda|``, the stiffest direction's progress per step (None without lr or curvature)."""
    opt = ev.optimizer
    if opt is None or opt.effective_lr is None:
        return None
    curvatures = [ev.preconditioned_lambda_max] if opt.preconditioned else [ev.lambda_max, ev.lambda_min]
    curvatures = [abs(c) for c in curvatures if _finite(c)]
    return opt.effective_lr * max(curvatures) if curvatures else None


def _predicted_progress(ev: Evidence, loss: float | None) -> float | None:
    """``effective_lr * |G|^2 / |loss|``: the first-order predicted relative decrease of the loss per step.

    ``|G|^2`` is the pairs' estimate when there are enough pairs, else the unbiased estimate, else ``grad_norm^2``
    (a minibatch norm, which overstates ``|G|^2``: it errs against calling a plateau). None for preconditioned
    optimizers (their step is ``P^-1 g``, not ``g``) or without lr, gradient or loss.
    """
    opt = ev.optimizer
    if opt is None or opt.effective_lr is None or opt.preconditioned or not _finite(loss):
        return None
    if (ev.grad_pair_count or 0) >= MIN_GRADIENT_PAIRS and _finite(ev.grad_pair_dot):
        g2 = ev.grad_pair_dot
    elif ev.grad_sq_norm_unbiased is not None:
        g2 = ev.grad_sq_norm_unbiased
    else:
        g2 = None if ev.grad_norm is None else ev.grad_norm * ev.grad_norm  # ** raises on overflow
    if not _finite(g2):
        return None
    g2 = max(g2, 0.0)  # the estimates of |G|^2 can dip below 0 when G is ~0
    if g2 == 0:
        return 0.0
    return math.inf if loss == 0 else opt.effective_lr * g2 / abs(loss)


def _oscillation_signal(ev: Evidence) -> float | None:
    """P(the step bounces): at/past the stability boundary (the ratio now, else the one measured in the two windows
    before a spike, else SGD's critical sharpness), or consecutive gradients anti-aligned over at least
    :data:`MIN_GRADIENT_PAIRS` pairs of the horizon (fewer prove nothing; evidence without pair statistics uses its
    ``grad_cosine``); the larger."""
    tests = []
    # at a spike the ratio measured just before it stands in (the regime the spike came from)
    ratio = ev.stability_ratio if ev.stability_ratio is not None else ev.stability_ratio_before
    if ratio is not None:
        tests.append(log_ratio_probability(ratio, OSCILLATION_RATIO))
    else:
        directional = _directional_stability_ratio(ev)
        if directional is not None:
            tests.append(log_ratio_probability(directional, OSCILLATION_RATIO))
    cosine = _pair_cosine_upper(ev)
    if cosine is None and ev.grad_pair_count is None and _finite(ev.grad_cosine):
        cosine = ev.grad_cosine  # no pair statistics at all (evidence built by hand): the mean cosine as given
    if cosine is not None:
        tests.append(round(_logistic((ANTI_ALIGNED_COSINE - cosine) / COSINE_WIDTH), 12))
    return max(tests) if tests else None


def _directional_stability_ratio(ev: Evidence) -> float | None:
    """The stability ratio along the update, where no eigen-solve measured lambda_max: for plain SGD the critical
    sharpness is the curvature along the gradient, ``g^T H g / |g|^2 <= lambda_max``, so past the boundary it puts
    lambda_max past it too (a lower bound: below, it proves nothing). With momentum or a preconditioner the update
    is not the gradient and the critical sharpness mixes in their alignment: not used (docs/critical-sharpness.md)."""
    spec, sharp, threshold = ev.optimizer, ev.directional_sharpness, ev.stability_threshold
    if spec is None or spec.preconditioned or spec.momentum or not _finite(sharp) or not threshold or sharp <= 0:
        return None
    return sharp / threshold


def _pair_cosine_upper(ev: Evidence) -> float | None:
    """The upper confidence bound of the horizon's mean consecutive-gradient cosine over at least
    :data:`MIN_GRADIENT_PAIRS` pairs, ``mean + 2 se`` of the pairs' cosines (each pair counting once): anti-alignment
    must be significant, not the luck of a few sampled pairs (at a minimum SGD's gradients anti-align a little,
    ``-lr lambda / 2`` per direction). Evidence without the pairs' cosines uses ``(dot + 2 se) / |g_t||g_(t-1)|``,
    the norm-weighted mean, whose few largest pairs can decide it (a spike's steps: a cadence of 11 steps against
    10 turned a clear bounce, every cosine near -0.99, into an undecided one)."""
    if (ev.grad_pair_count or 0) < MIN_GRADIENT_PAIRS:
        return None
    if _finite(ev.grad_pair_cosine):
        return ev.grad_pair_cosine + 2.0 * (ev.grad_pair_cosine_stderr or 0.0)
    if not (_finite(ev.grad_pair_dot) and _finite(ev.grad_pair_sq) and ev.grad_pair_sq > 0):
        return None
    return (ev.grad_pair_dot + 2.0 * (ev.grad_pair_dot_stderr or 0.0)) / ev.grad_pair_sq


def _model_spike(ev: Evidence, event: StallEvent | None, th: Thresholds) -> float | None:
    """P(the spike was one of the model, not of a few hard batches): the larger of two tests, each enough.

    * the fixed probe batches' loss at the spike's worst over after it (``spike_probe_ratio``) past the spike
      ratio: the same batches, so only the parameters differ;
    * the spike lasted: its three-loss median stayed up for at least :data:`MODEL_SPIKE_STEPS` steps. Each step
      brings new batches, so hard batches cannot hold the loss up that long; a model that got worse does (and the
      probe, read a step or two after a short spike's peak, may have missed it).
    None when neither was measured.
    """
    tests = []
    if ev.spike_probe_ratio is not None:
        tests.append(log_ratio_probability(ev.spike_probe_ratio, th.spike_ratio))
    spike = event.spike if event is not None else {}
    if "end_step" in spike and "start_step" in spike:
        tests.append(log_ratio_probability(spike["end_step"] - spike["start_step"], MODEL_SPIKE_STEPS))
    return max(tests) if tests else None


def _event_probability(event: StallEvent | None, reason: str) -> float | None:
    if event is None or event.reason != reason:
        return None
    return _logistic(event.margin / LOG_WIDTH) if math.isfinite(event.margin) else 1.0


def _tests(ev: Evidence, event: StallEvent | None, loss: float | None, th: Thresholds) -> dict[str, float | None]:
    step_curvature = _step_curvature(ev)
    progress = _predicted_progress(ev, loss)
    divergence = 1.0 if ev.nonfinite else _event_probability(event, "divergence")
    return {
        "divergence_event": divergence,
        "spike_event": _event_probability(event, "spike"),
        "model_spike": _model_spike(ev, event, th),
        "grad_zero": _grad_zero(ev, th, loss),
        "negative_curvature": _negative_curvature(ev),
        "flat": None if step_curvature is None else 1.0 - log_ratio_probability(step_curvature,
                                                                                th.flat_step_curvature),
        "no_progress": None if progress is None else 1.0 - log_ratio_probability(progress, th.no_progress_per_step),
        "oscillation_signal": _oscillation_signal(ev),
    }


def _scores(tests: dict[str, float | None], kinds: tuple[str, ...]) -> dict[str, float]:
    scores = {}
    for kind in kinds:
        support = []
        for name, must_hold, missing in RULES[kind]:
            p = tests[name]
            p = missing if p is None else p
            support.append(p if must_hold else 1.0 - p)
        scores[kind] = min(support)
    return scores


def _decide(scores: dict[str, float]) -> str | None:
    """The kind with the best score above :data:`DECIDES_ABOVE`; None if none, or if another kind ties it."""
    best = max(scores.values())
    if not best > DECIDES_ABOVE:
        return None
    winners = [k for k in PRIORITY if k in scores and abs(scores[k] - best) <= 1e-12]
    if len(winners) > 1 and "divergence" not in winners:
        return None
    return winners[0]


def _current_loss(ev: Evidence, event: StallEvent | None) -> float | None:
    if ev.loss is not None:
        return ev.loss
    window = ev.loss_window or (event.window if event is not None else None)
    if window:
        finite = sorted(x for x in window if math.isfinite(x))
        return finite[len(finite) // 2] if finite else None
    return None


def _record(ev: Evidence, event: StallEvent | None, tests: dict[str, Any], scores: dict[str, float],
            loss: float | None) -> dict:
    record = ev.record()
    if event is not None:
        record.setdefault("loss_window", list(event.window))
        record.setdefault("rel_slope", event.rel_slope)
        record.update({"window_steps": list(event.window_steps), "slope": event.slope,
                       "slope_ci": list(event.slope_ci), "rel_improvement": event.rel_improvement,
                       "rel_improvement_upper": event.improvement_hi, "stall_horizon": event.horizon,
                       "loss_noise": event.noise, "stall_reason": event.reason, "stall_trigger": event.trigger})
        if event.spike:
            record["spike"] = dict(event.spike)
    step_curvature = _step_curvature(ev)
    if step_curvature is not None:
        record["step_curvature"] = step_curvature
    progress = _predicted_progress(ev, loss)
    if progress is not None:
        record["predicted_progress"] = progress
    record["tests"] = tests
    record["scores"] = scores
    return record


def _add_kind_evidence(kind: str, ev: Evidence, record: dict, loss: float | None) -> None:
    if kind == "saddle_point" and _finite(ev.lambda_min) and ev.lambda_min < 0:
        record["escape_drop_coefficient"] = 0.5 * ev.lambda_min  # L(theta + t u) - L(theta) ~ this * t^2
        if _finite(ev.lambda_max) and ev.lambda_max:
            record["negative_curvature_ratio"] = -ev.lambda_min / ev.lambda_max
        if loss:
            record["escape_distance"] = math.sqrt(2.0 * 0.01 * abs(loss) / -ev.lambda_min)
            record["escape_drop"] = 0.01 * abs(loss)
    if kind == "local_minimum" and None not in (loss, ev.loss_floor, ev.loss_initial):
        gap0 = ev.loss_initial - ev.loss_floor
        if gap0 > 0:
            record["loss_gap_fraction"] = (loss - ev.loss_floor) / gap0
            record["loss_still_high"] = record["loss_gap_fraction"] > LOSS_HIGH_GAP
    if kind == "loss_spike":
        record["catapult"] = _catapult(ev)


def _catapult(ev: Evidence) -> bool | None:
    """A catapult: the sharpness was past the stability threshold before the spike and below it after.

    None when either side was not measured (the spike is then reported without that claim).
    """
    before, after = ev.stability_ratio_before, ev.stability_ratio
    if not (_finite(before) and _finite(after)):
        return None
    return before > 1.0 and after < 1.0


def _fmt(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def _summary(kind: str, record: dict, th: Thresholds) -> str:
    if kind == "divergence":
        if record.get("nonfinite"):
            return "The loss is diverging: it became non-finite (NaN or inf): the step is past the stable range."
        return (f"The loss is diverging: it is above where it started and has kept rising for over "
                f"{th.window // 4} steps (relative change per window {_fmt(-record.get('rel_improvement', math.nan))}).")
    if kind == "loss_spike":
        spike = record.get("spike", {})
        text = (f"A loss spike that recovered: the loss rose to {_fmt(spike.get('peak'))} "
                f"({_fmt(spike.get('ratio'))}x its running median {_fmt(spike.get('reference'))}, "
                f"{_fmt(spike.get('sigmas'))} robust sd) at step {_fmt(spike.get('peak_step'))} and was back by step "
                f"{_fmt(spike.get('end_step'))}")
        if record.get("catapult"):
            text += "; a catapult: the sharpness fell from above the stability threshold to below it"
        return text + "."
    if kind == "oscillation":
        return (f"The loss is flat while the step bounces across a valley "
                f"(lr*lambda_max = {_fmt(record.get('lr_lambda_max'))}, {stability_text(record)}, gradient cosine "
                f"{_fmt(record.get('grad_cosine'))}).")
    if kind == "saddle_point":
        text = (f"Stuck near a saddle point: the gradient is ~0 against its noise and lambda_min = "
                f"{_fmt(record.get('lambda_min'))} is significantly negative; moving t along its eigenvector lowers "
                f"the loss by about {_fmt(-record.get('escape_drop_coefficient', math.nan))} * t^2")
        if "escape_distance" in record:
            text += f" (1% of the loss at t = {_fmt(record['escape_distance'])})"
        return text + "."
    if kind == "local_minimum":
        text = (f"At a local minimum: the gradient is ~0 against its noise and there is no significant negative "
                f"curvature (lambda_max = {_fmt(record.get('lambda_max'))}, lambda_min = "
                f"{_fmt(record.get('lambda_min'))}, {stability_text(record)})")
        if record.get("loss_still_high"):
            text += ("; the loss is still high, so this is the model's bias rather than the optimizer: "
                     "consider capacity or features")
        return text + "."
    text = (f"On a plateau: the step barely feels the curvature (effective lr * |lambda| = "
            f"{_fmt(record.get('step_curvature'))})")
    if "predicted_progress" in record:
        per_window = 100 * record["predicted_progress"] * (th.window - 1)
        text += (f" and lowers the loss by a predicted {_fmt(per_window)}% per {th.window} steps "
                 f"(lr * |G|^2 / loss per step)")
    return text + ", so steps barely move the loss."


def _prediction(kind: str, ev: Evidence, record: dict, loss: float | None, th: Thresholds) -> dict[str, Any]:
    """What the verdict predicts, with the numbers :func:`check_prediction` needs."""
    out: dict[str, Any] = {"claim": PREDICTIONS[kind], "check_at_step": ev.step + th.check_after * th.window,
                           "loss": loss, "lr": ev.lr}
    if kind == "saddle_point":
        out["drop"] = record.get("escape_drop")
        # the escape grows e-fold every 1 / (lr |lambda_min|) steps; from a tiny offset it needs about ten e-folds
        rate = ev.optimizer.effective_lr * -ev.lambda_min if _finite(ev.lambda_min) and ev.lambda_min < 0 and \
            ev.optimizer is not None and ev.optimizer.effective_lr else 0.0
        if rate > 0 and math.isfinite(SADDLE_EFOLDS / rate):
            out["check_at_step"] = max(out["check_at_step"], ev.step + math.ceil(SADDLE_EFOLDS / rate))
    if kind == "loss_spike":
        out["peak"] = record.get("spike", {}).get("peak")
    if kind == "divergence":
        out["loss_initial"] = ev.loss_initial
    return out


def _build(ev: Evidence, event: StallEvent | None, kinds: tuple[str, ...], th: Thresholds,
           record_undecided: list | None) -> Diagnosis | None:
    if not isinstance(ev, Evidence):
        raise UsageError(f"expected an Evidence, got {type(ev).__name__}")
    if event is not None and not isinstance(event, StallEvent):
        raise UsageError(f"event must be a StallEvent or None, got {type(event).__name__}")
    if not isinstance(th, Thresholds):
        raise UsageError(f"thresholds must be a Thresholds, got {type(th).__name__}")
    loss = _current_loss(ev, event)
    tests = _tests(ev, event, loss, th)
    scores = _scores(tests, kinds)
    kind = _decide(scores)
    record = _record(ev, event, tests, scores, loss)
    if kind is None:
        if record_undecided is not None:
            record_undecided.append(record)
        return None
    _add_kind_evidence(kind, ev, record, loss)
    record["prediction"] = _prediction(kind, ev, record, loss, th)
    summary = _summary(kind, record, th) + (spike_advice_note(ev) if kind == "loss_spike" else "")
    return Diagnosis(step=ev.step, kind=kind, confidence=scores[kind], evidence=record,
                     suggestions=suggest(kind, ev), summary=summary)


def diagnose_stall(evidence: Evidence, event: StallEvent | None = None, thresholds: Thresholds | None = None, *,
                   undecided: list | None = None) -> Diagnosis | None:
    """Classify a detector event (a stall, a recovered spike, a divergence) with confidence, evidence and advice.

    Args:
        evidence: the measurements at the event (what was not measured is None).
        event: the detector's event, if any: its reason decides which kinds are possible (a spike can only be a
            ``loss_spike``, a divergence only ``divergence``), and its window, slope and margin are recorded.
        thresholds: the configured detector's thresholds (:meth:`Thresholds.from_detector`); defaults otherwise.
        undecided: a list to which the evidence record of an undecided check is appended (a debug trail).

    Returns:
        A :class:`Diagnosis` (its ``evidence`` holds every number used, the per-test probabilities under
        ``"tests"``, the per-kind scores under ``"scores"`` and what it predicts under ``"prediction"``), or
        ``None`` when the evidence does not decide.

    Example:
        >>> diagnose_stall(Evidence(step=3, loss=float("nan"))).kind
        'divergence'
        >>> diagnose_stall(Evidence(step=3, loss=1.0)) is None
        True
    """
    kinds = EVENT_KINDS.get(getattr(event, "reason", None), EVENT_KINDS[None])  # _build refuses a non-event
    thresholds = thresholds or DEFAULT_THRESHOLDS
    if getattr(event, "reason", None) == "spike" and isinstance(evidence, Evidence) and \
            (evidence.spike_count or 0) >= REPEATED_SPIKES:
        # Spikes that recur while the step is too large for the curvature are the bounce itself: the oscillation,
        # where its signal decides, explains them (however clear each spike is), and its advice is theirs.
        bounce = _build(evidence, event, ("oscillation",), thresholds, None)
        if bounce is not None:
            return bounce
    return _build(evidence, event, kinds, thresholds, undecided)


def classify_point(evidence: Evidence, thresholds: Thresholds | None = None) -> Diagnosis | None:
    """Classify a point with no loss history (post-hoc, a checkpoint): minimum, saddle or plateau.

    Returns None when the gradient is not statistically zero (the point is not critical) or when the evidence does
    not decide.

    Example:
        >>> classify_point(Evidence(step=0, lambda_max=2.0, lambda_min=-2.0, grad_norm=0.0,
        ...                         grad_norm_initial=1.0, grad_noise_trace=0.0)).kind
        'saddle_point'
    """
    if not isinstance(evidence, Evidence):
        raise UsageError(f"expected an Evidence, got {type(evidence).__name__}")
    th = thresholds or DEFAULT_THRESHOLDS
    grad_zero = _grad_zero(evidence, th, _current_loss(evidence, None))
    if grad_zero is not None and grad_zero < 0.5:
        return None
    return _build(evidence, None, ("saddle_point", "local_minimum", "plateau"), th, None)


def check_prediction(diagnosis: Diagnosis, losses: list[float], lr: float | None,
                     thresholds: Thresholds | None = None) -> dict[str, Any]:
    """Whether what a verdict predicted happened, judged on the losses seen since it.

    Args:
        diagnosis: a verdict of :func:`diagnose_stall` (its ``evidence["prediction"]``).
        losses: the training losses of the steps after the verdict (non-finite ones included).
        lr: the learning rate now.
        thresholds: the thresholds the verdict was made with.

    Returns:
        ``{"outcome": "confirmed" | "refuted" | "not tested", "detail": one sentence, "loss_after": ...}``.

    Example:
        >>> from optdiag.diagnosis.types import Diagnosis
        >>> d = Diagnosis(10, "local_minimum", 0.9, {"prediction": {"loss": 1.0, "lr": 0.1}}, [], "Minimum.")
        >>> check_prediction(d, [1.0] * 200, lr=0.1)["outcome"]
        'confirmed'
    """
    th = thresholds or DEFAULT_THRESHOLDS
    prediction = diagnosis.evidence.get("prediction") or {}
    before = prediction.get("loss")
    finite = [x for x in losses if math.isfinite(x)]
    tail = finite[-max(3, th.window // 5):]
    after = sorted(tail)[len(tail) // 2] if tail else None
    out: dict[str, Any] = {"outcome": "not tested", "loss_after": after, "loss_before": before}
    kind = diagnosis.kind
    if kind == "divergence":
        start = prediction.get("loss_initial")
        if not losses:
            out["detail"] = "no losses since the verdict"
        elif len(finite) < len(losses):
            out.update(outcome="confirmed", detail="the loss is still non-finite")
        elif _finite(start):
            back = after < start
            out.update(outcome="refuted" if back else "confirmed",
                       detail=f"the loss is {_fmt(after)} against its start {_fmt(start)}")
        return out
    if after is None or not _finite(before) or before == 0:
        out["detail"] = "no finite losses to compare"
        return out
    windows = max(len(losses) / th.window, 1.0)
    change = (before - after) / abs(before)  # relative fall since the verdict
    per_window = change / windows
    out["relative_fall"] = change
    if kind in ("local_minimum", "plateau"):
        held = per_window < 2.0 * th.rel_improvement and (kind == "local_minimum" or change > -0.5)
        out.update(outcome="confirmed" if held else "refuted",
                   detail=f"the loss went {_fmt(before)} -> {_fmt(after)} ({_fmt(100 * per_window)}% per window)")
    elif kind == "saddle_point":
        drop = prediction.get("drop")
        if _finite(drop):
            escaped = before - after >= drop
            out.update(outcome="confirmed" if escaped else "refuted",
                       detail=f"the loss went {_fmt(before)} -> {_fmt(after)} (escape drop {_fmt(drop)})")
    elif kind == "oscillation":
        lr_then = prediction.get("lr")
        if _finite(lr_then) and _finite(lr) and lr <= 0.7 * lr_then:
            out.update(outcome="confirmed" if after < before else "refuted",
                       detail=f"after the lr went {_fmt(lr_then)} -> {_fmt(lr)} the loss went "
                              f"{_fmt(before)} -> {_fmt(after)}")
        else:
            out["detail"] = "the learning rate was not lowered, so the prediction was not put to the test"
    elif kind == "loss_spike":
        peak = prediction.get("peak")
        if _finite(peak):
            out.update(outcome="confirmed" if after < peak else "refuted",
                       detail=f"the loss is {_fmt(after)} against the spike's peak {_fmt(peak)}")
    return out
