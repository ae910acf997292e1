"""From evidence to a verdict: which of the five situations the run is in, and how sure we are.

Each rule is a *test*: a statistic compared with a boundary justified in ``docs/diagnosis-rules.md`` from
THEORY.md. A test's probability is a logistic function of the statistic's distance from the boundary,
``1 / (1 + exp(-z / W))``: exactly 0.5 on the boundary, 0.9 a factor of 2 past it (``W = ln 2 / ln 9`` on log-ratio
statistics), near 1 far from it. A kind's score combines its tests with ``min`` (all must hold) and ``1 - p`` for
tests that must fail, so it is monotone in every statistic; the verdict is the highest score and its confidence is
that score. A test whose inputs were not measured is ``None`` and treated as documented at each score. When even
the best score is below :data:`UNCERTAIN_BELOW`, or tied with another kind's, no kind fits: the diagnosis still
names the closest kind (the contract needs one) but says so in its summary and ``evidence["uncertain"]``, and
proposes no change.

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
from typing import Any

from optdiag.diagnosis.advice import suggest
from optdiag.diagnosis.evidence import Evidence
from optdiag.diagnosis.stall import DEFAULT_REL_IMPROVEMENT, DEFAULT_WINDOW, StallEvent, explosion_threshold
from optdiag.diagnosis.types import KINDS, Diagnosis
from optdiag.errors import UsageError

#: Logistic width on log-ratio statistics: a factor of 2 past a boundary gives probability 0.9.
LOG_WIDTH = math.log(2.0) / math.log(9.0)
#: Norm test (Byrd et al. 2012): |G|^2 below one minibatch's noise tr(Sigma)/B means "statistically zero".
GRAD_SNR_BOUNDARY = 1.0
#: A gradient below 10% of its early-training scale counts as tiny (one decade down).
GRAD_TINY_RATIO = 0.1
#: Negative curvature is significant when lambda_min < -TAU * lambda_max: at lr = 1/lambda_max it then grows a
#: perturbation e-fold within 1/TAU = 50 steps, one stall window; weaker negative curvature is not escaped in
#: the window, like the small negative eigenvalues of trained nets.
NEGATIVE_CURVATURE_TAU = 0.02
#: Curvature is flat when effective_lr * |lambda| < 1/50: even the stiffest direction needs over a window to move.
FLAT_STEP_CURVATURE = 1.0 / DEFAULT_WINDOW
#: No progress when the first-order predicted decrease per step, effective_lr * |G|^2, is below the stall
#: detector's own boundary (1% of the loss per window of 50 losses, 49 steps): the step size explains the stall.
NO_PROGRESS_PER_STEP = DEFAULT_REL_IMPROVEMENT / (DEFAULT_WINDOW - 1)
#: Below this best score no kind fits (at least one of its tests is more likely false than true): "uncertain".
UNCERTAIN_BELOW = 0.5
#: Oscillation when sharpness / threshold >= 0.5: SGD's sign-flip boundary lr * lambda = 1, and the margin
#: THEORY section 1 observed for small-batch momentum (divergence already at lr * lambda = 2.0 of 3.8).
OSCILLATION_RATIO = 0.5
#: Consecutive minibatch gradients anti-aligned: stationary SGD gives E cos = -lr * lambda / 2 per direction, -0.5
#: at the sign-flip boundary, diluted to about 2/3 of that by flatter directions (THEORY: -0.6 at 1.8 vs -0.9).
ANTI_ALIGNED_COSINE = -0.3
#: Logistic width for the cosine (linear scale): 0.1 past the boundary gives probability 0.9.
COSINE_WIDTH = 0.1 / math.log(9.0)
#: The explosion factor shared with :class:`~optdiag.diagnosis.stall.StallDetector`'s default.
EXPLOSION_FACTOR = 2.0
#: At a minimum, a loss still above 10% of its initial gap to ``loss_floor`` is "still high".
LOSS_HIGH_GAP = 0.1

_PRIORITY = ("divergence", "oscillation", "saddle_point", "local_minimum", "plateau")


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
    if stat <= 0:
        return 0.0
    if math.isinf(stat):
        return 1.0
    return round(_logistic(math.log(stat / boundary) / LOG_WIDTH), 12)


def _grad_zero(ev: Evidence) -> float | None:
    """P(the true gradient is ~0).

    With the gradient noise measured (``tr Sigma > 0``) the norm test decides: it compares the gradient with the
    noise it is measured against, while a gradient that merely shrank since early training can still be far above
    that noise (a bounce across a valley). Without it (not measured, or a full batch: ``tr Sigma = 0``, where the
    norm test only says "not exactly zero") the gradient against its early-training scale; None without either.
    """
    if ev.grad_snr is not None and ev.grad_noise_trace:
        return 1.0 - log_ratio_probability(ev.grad_snr, GRAD_SNR_BOUNDARY)
    if ev.grad_norm_ratio is not None:
        return 1.0 - log_ratio_probability(ev.grad_norm_ratio, GRAD_TINY_RATIO)
    return None


def _negative_curvature(ev: Evidence) -> float | None:
    """P(lambda_min is significantly negative): relative to lambda_max and beyond its Lanczos residual."""
    if ev.lambda_min is None or not math.isfinite(ev.lambda_min):
        return None
    if ev.lambda_min >= 0:
        return 0.0
    magnitude = -ev.lambda_min
    lam_max = ev.lambda_max if ev.lambda_max is not None and math.isfinite(ev.lambda_max) else None
    relative = math.inf if lam_max is None or lam_max <= 0 else magnitude / (NEGATIVE_CURVATURE_TAU * lam_max)
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
    if opt.preconditioned:
        curvatures = [ev.preconditioned_lambda_max]
    else:
        curvatures = [ev.lambda_max, ev.lambda_min]
    curvatures = [abs(c) for c in curvatures if c is not None and math.isfinite(c)]
    return opt.effective_lr * max(curvatures) if curvatures else None


def _flat(ev: Evidence) -> float | None:
    stat = _step_curvature(ev)
    return None if stat is None else 1.0 - log_ratio_probability(stat, FLAT_STEP_CURVATURE)


def _predicted_progress(ev: Evidence, loss: float | None) -> float | None:
    """``effective_lr * |G|^2 / |loss|``: the first-order predicted relative decrease of the loss per step.

    ``|G|^2`` is the unbiased full-gradient estimate when measured, else ``grad_norm^2`` (a minibatch norm, which
    overstates ``|G|^2`` by ``tr Sigma / B``: it errs against calling a plateau). None for preconditioned
    optimizers (their step is ``P^-1 g``, not ``g``) or without lr, gradient or loss.
    """
    opt = ev.optimizer
    if opt is None or opt.effective_lr is None or opt.preconditioned or loss is None or not math.isfinite(loss):
        return None
    g2 = ev.grad_sq_norm_unbiased if ev.grad_sq_norm_unbiased is not None else (
        None if ev.grad_norm is None else ev.grad_norm**2)
    if g2 is None or not math.isfinite(g2):
        return None
    g2 = max(g2, 0.0)  # the unbiased estimate can dip below 0 when G is ~0
    if g2 == 0:
        return 0.0
    return math.inf if loss == 0 else opt.effective_lr * g2 / abs(loss)


def _no_progress(ev: Evidence, loss: float | None) -> float | None:
    stat = _predicted_progress(ev, loss)
    return None if stat is None else 1.0 - log_ratio_probability(stat, NO_PROGRESS_PER_STEP)


def _oscillation_signal(ev: Evidence) -> float | None:
    """P(the step bounces): at/past the stability boundary, or consecutive gradients anti-aligned; the larger."""
    tests = []
    if ev.stability_ratio is not None:
        tests.append(log_ratio_probability(ev.stability_ratio, OSCILLATION_RATIO))
    if ev.grad_cosine is not None and math.isfinite(ev.grad_cosine):
        tests.append(round(_logistic((ANTI_ALIGNED_COSINE - ev.grad_cosine) / COSINE_WIDTH), 12))
    return max(tests) if tests else None


def _divergence(ev: Evidence, event: StallEvent | None) -> float:
    if ev.nonfinite or (ev.loss is not None and not math.isfinite(ev.loss)):
        return 1.0
    tests = [0.0]
    if event is not None and event.reason == "divergence":
        tests.append(_logistic(event.margin / LOG_WIDTH) if math.isfinite(event.margin) else 1.0)
    if None not in (ev.loss, ev.loss_min, ev.loss_initial):
        limit = explosion_threshold(ev.loss_initial, ev.loss_min, EXPLOSION_FACTOR)
        if limit is not None and ev.loss > ev.loss_min:
            tests.append(log_ratio_probability(ev.loss - ev.loss_min, limit - ev.loss_min))
    return max(tests)


def _tests(ev: Evidence, event: StallEvent | None) -> dict[str, float | None]:
    return {
        "grad_zero": _grad_zero(ev),
        "negative_curvature": _negative_curvature(ev),
        "flat": _flat(ev),
        "no_progress": _no_progress(ev, _current_loss(ev, event)),
        "oscillation_signal": _oscillation_signal(ev),
        "divergence": _divergence(ev, event),
    }


def _scores(t: dict[str, float | None]) -> dict[str, float]:
    """Kind scores. Unmeasured: grad_zero and negative_curvature count 0.5 (undecided) for the critical-point
    kinds, but do not veto oscillation; no_progress does not veto plateau; flat and oscillation_signal count 0
    (no claim without them)."""
    gz, neg = t["grad_zero"], t["negative_curvature"]
    flat = t["flat"] if t["flat"] is not None else 0.0
    osc = t["oscillation_signal"] if t["oscillation_signal"] is not None else 0.0
    gz_half = 0.5 if gz is None else gz
    neg_half = 0.5 if neg is None else neg
    return {
        "divergence": t["divergence"],
        "oscillation": min(osc, 1.0 if gz is None else 1.0 - gz),
        "saddle_point": min(1.0 - flat, gz_half, neg_half),
        "local_minimum": min(1.0 - flat, gz_half, 1.0 - neg_half),
        "plateau": min(flat, 1.0 - osc, 1.0 if t["no_progress"] is None else t["no_progress"]),
    }


def _pick(scores: dict[str, float], allowed: tuple[str, ...]) -> str:
    if scores["divergence"] >= 0.5 and "divergence" in allowed:
        return "divergence"  # a non-finite or exploding loss overrides everything else
    best = max(scores[k] for k in allowed)
    return next(k for k in _PRIORITY if k in allowed and scores[k] == best)


def _record(ev: Evidence, event: StallEvent | None, tests: dict[str, Any], scores: dict[str, float]) -> dict:
    record = ev.record()
    if event is not None:
        record.setdefault("loss_window", list(event.window))
        record.setdefault("rel_slope", event.rel_slope)
        record.update({"window_steps": list(event.window_steps), "slope": event.slope,
                       "slope_ci": list(event.slope_ci), "rel_improvement": event.rel_improvement,
                       "stall_reason": event.reason, "stall_trigger": event.trigger})
    step_curv = _step_curvature(ev)
    if step_curv is not None:
        record["step_curvature"] = step_curv
    progress = _predicted_progress(ev, _current_loss(ev, event))
    if progress is not None:
        record["predicted_progress"] = progress
    record["tests"] = tests
    record["scores"] = scores
    return record


def _current_loss(ev: Evidence, event: StallEvent | None) -> float | None:
    if ev.loss is not None:
        return ev.loss
    window = ev.loss_window or (event.window if event is not None else None)
    if window:
        finite = sorted(x for x in window if math.isfinite(x))
        return finite[len(finite) // 2] if finite else None
    return None


def _add_kind_evidence(kind: str, ev: Evidence, record: dict, loss: float | None) -> None:
    if kind == "saddle_point" and ev.lambda_min is not None and ev.lambda_min < 0:
        record["escape_drop_coefficient"] = 0.5 * ev.lambda_min  # L(theta + t u) - L(theta) ~ this * t^2
        if ev.lambda_max:
            record["negative_curvature_ratio"] = -ev.lambda_min / ev.lambda_max
        if loss:
            record["escape_distance"] = math.sqrt(2.0 * 0.01 * abs(loss) / -ev.lambda_min)
            record["escape_drop"] = 0.01 * abs(loss)
    if kind == "local_minimum" and None not in (loss, ev.loss_floor, ev.loss_initial):
        gap0 = ev.loss_initial - ev.loss_floor
        if gap0 > 0:
            record["loss_gap_fraction"] = (loss - ev.loss_floor) / gap0
            record["loss_still_high"] = record["loss_gap_fraction"] > LOSS_HIGH_GAP


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def _summary(kind: str, record: dict) -> str:
    if kind == "divergence":
        return "The loss is diverging (non-finite or exploding): the step is past the stable range."
    if kind == "oscillation":
        return (f"The loss is flat while the gradient stays large: the step bounces across a valley "
                f"(lr*lambda_max = {_fmt(record.get('lr_lambda_max'))}, stability ratio "
                f"{_fmt(record.get('stability_ratio'))}, gradient cosine {_fmt(record.get('grad_cosine'))}).")
    if kind == "saddle_point":
        text = (f"Stuck near a saddle point: the gradient is ~0 and lambda_min = {_fmt(record.get('lambda_min'))} "
                f"is significantly negative; moving t along its eigenvector lowers the loss by about "
                f"{_fmt(-record.get('escape_drop_coefficient', math.nan))} * t^2")
        if "escape_distance" in record:
            text += f" (1% of the loss at t = {_fmt(record['escape_distance'])})"
        return text + "."
    if kind == "local_minimum":
        text = (f"At a local minimum: the gradient is ~0 and no significant negative curvature (lambda_max = "
                f"{_fmt(record.get('lambda_max'))}, trace {_fmt(record.get('hessian_trace'))}, "
                f"{_fmt(record.get('stability_ratio'))} of the stability threshold)")
        if record.get("loss_still_high"):
            text += ("; the loss is still high, so this is the model's bias rather than the optimizer: "
                     "consider capacity or features")
        return text + "."
    text = (f"On a plateau: the step barely feels the curvature (effective lr * |lambda| = "
            f"{_fmt(record.get('step_curvature'))})")
    if "predicted_progress" in record:
        per_window = 100 * record["predicted_progress"] * (DEFAULT_WINDOW - 1)
        text += (f" and lowers the loss by a predicted {_fmt(per_window)}% per {DEFAULT_WINDOW} losses "
                 f"(lr * |G|^2 / loss per step)")
    return text + ", so steps barely move the loss."


#: The tests each kind needs, with the value that supports it ("1 - p" written as a leading "not ").
_KIND_TESTS = {
    "oscillation": ("oscillation_signal", "not grad_zero"),
    "saddle_point": ("not flat", "grad_zero", "negative_curvature"),
    "local_minimum": ("not flat", "grad_zero", "not negative_curvature"),
    "plateau": ("flat", "not oscillation_signal", "no_progress"),
}


def _is_uncertain(kind: str, scores: dict[str, float], allowed: tuple[str, ...]) -> bool:
    """Below :data:`UNCERTAIN_BELOW`, or tied with another kind (possible only on a boundary, at 0.5)."""
    if scores[kind] < UNCERTAIN_BELOW:
        return True
    if kind == "divergence":
        return False  # chosen by its own override, not by comparison
    return any(k != kind and abs(scores[k] - scores[kind]) <= 1e-12 for k in allowed)


def _uncertain_summary(kind: str, record: dict, allowed: tuple[str, ...]) -> str:
    """Why no kind fits: the closest kind, its score, and which of its tests fail (support below 0.5)."""
    tests, scores = record["tests"], record["scores"]
    failing = []
    for name in _KIND_TESTS.get(kind, ()):
        negated = name.startswith("not ")
        value = tests[name[4:] if negated else name]
        if value is not None and (1.0 - value if negated else value) < UNCERTAIN_BELOW:
            failing.append(f"{name} = {1.0 - value if negated else value:.2f}")
    runner_up = max((k for k in allowed if k != kind), key=lambda k: scores[k])
    text = (f"Uncertain: no situation fits the evidence; the closest is {kind} at {scores[kind]:.2f} "
            f"(next {runner_up} at {scores[runner_up]:.2f})")
    if failing:
        text += f"; it fails {', '.join(failing)}"
    return text + ". No change is proposed: measure again (curvature, gradient noise) or watch the loss."


def _build(ev: Evidence, event: StallEvent | None, allowed: tuple[str, ...]) -> Diagnosis:
    if not isinstance(ev, Evidence):
        raise UsageError(f"expected an Evidence, got {type(ev).__name__}")
    if event is not None and not isinstance(event, StallEvent):
        raise UsageError(f"event must be a StallEvent or None, got {type(event).__name__}")
    tests = _tests(ev, event)
    scores = _scores(tests)
    kind = _pick(scores, allowed)
    record = _record(ev, event, tests, scores)
    _add_kind_evidence(kind, ev, record, _current_loss(ev, event))
    # A verdict that fails one of its own tests, or that only tie order picked, is not acted on: it is reported
    # as uncertain, without advice.
    record["uncertain"] = _is_uncertain(kind, scores, allowed)
    if record["uncertain"]:
        return Diagnosis(step=ev.step, kind=kind, confidence=scores[kind], evidence=record, suggestions=[],
                         summary=_uncertain_summary(kind, record, allowed))
    return Diagnosis(step=ev.step, kind=kind, confidence=scores[kind], evidence=record,
                     suggestions=suggest(kind, ev), summary=_summary(kind, record))


def diagnose_stall(evidence: Evidence, event: StallEvent | None = None) -> Diagnosis:
    """Classify a stalled (or diverging) run into one of :data:`KINDS`, with confidence, evidence and advice.

    Args:
        evidence: the measurements at the stall (what was not measured is None).
        event: the detector's event, if any: its window, slope and a divergence trigger are used and recorded.

    Returns:
        A :class:`Diagnosis`; ``evidence`` holds every number used, the per-test probabilities under ``"tests"``
        and the per-kind scores under ``"scores"``.

    Example:
        >>> diagnose_stall(Evidence(step=3, loss=float("nan"))).kind
        'divergence'
    """
    return _build(evidence, event, KINDS)


def classify_point(evidence: Evidence) -> Diagnosis | None:
    """Classify a point with no loss history (post-hoc, a checkpoint): minimum, saddle or plateau.

    Returns None when the gradient is not statistically zero (grad_zero test below 0.5): not a critical point.
    Without gradient statistics the point is classified on curvature alone, at confidence at most 0.5.

    Example:
        >>> classify_point(Evidence(step=0, lambda_max=2.0, lambda_min=-2.0, grad_norm=0.0,
        ...                         grad_norm_initial=1.0)).kind
        'saddle_point'
    """
    if not isinstance(evidence, Evidence):
        raise UsageError(f"expected an Evidence, got {type(evidence).__name__}")
    grad_zero = _grad_zero(evidence)
    if grad_zero is not None and grad_zero < 0.5:
        return None
    return _build(evidence, None, ("saddle_point", "local_minimum", "plateau"))
