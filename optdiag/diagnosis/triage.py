"""Triage before any Hessian: where the run sits on the map of training and validation loss.

The map (``docs/triage.md``): a *training* loss that stays high is either **model bias** (the model cannot do
better: a true minimum at a high loss) or an **optimization** problem (a plateau, a saddle, a bouncing step, a
noise floor); a training loss that is low with a validation loss far above it is **overfitting** (the gap grows
while training goes on) or a **mismatch** between training and validation data, which training signals cannot
tell apart from overfitting: the finding then says what to check.

This module holds the conclusion types (:class:`Finding`, :class:`Recommendation`), the kinds, the one rule table
(:data:`RULES`, read like :data:`optdiag.diagnosis.classify.RULES`) and the scoring that reads it. Like the rest of
:mod:`optdiag.diagnosis` it knows nothing of models: numbers in, conclusions out.

Example:
    >>> r = Recommendation("Use a larger model", "The loss stalled at 0.69 with positive curvature.",
    ...                    {"loss": 0.69})
    >>> f = Finding(step=300, kind="model_bias", confidence=0.9, evidence={"loss": 0.69}, recommendations=[r],
    ...             summary="The model is too small for the task.")
    >>> Finding.from_dict(f.to_dict()) == f
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from optdiag.diagnosis.advice import batch_size_advice
from optdiag.diagnosis.classify import LOSS_HIGH_GAP, log_ratio_probability
from optdiag.diagnosis.stall import difference_noise, trend_test
from optdiag.diagnosis.types import (
    Suggestion,
    _cell,
    _format_value,
    _nonempty_text,
    check_record,
    from_jsonable,
    markdown_head,
    to_jsonable,
)
from optdiag.errors import UsageError
from optdiag.policy import check_number

#: What a triage finding can say. ``train_test_mismatch_check`` is a check to run, not a claim (training signals
#: cannot tell a mismatch from overfitting); ``needs_validation`` says once that no validation loss was found.
#: ``ill_conditioning`` (unscaled inputs, uneven curvature over layers) and ``loss_choice`` (MSE on probabilities)
#: are the input-side findings.
FINDING_KINDS = ("model_bias", "optimization", "overfitting", "train_test_mismatch_check", "needs_validation",
                 "ill_conditioning", "loss_choice")

#: The one triage rule table, read like :data:`optdiag.diagnosis.classify.RULES`: kind -> ((test, must_hold,
#: probability when not measured), ...); a kind's score is the ``min`` over its row (``1 - p`` where the test must
#: fail; so a test that may only veto has default 0 when it must fail, 1 when it must hold) and a finding needs a
#: score above :data:`DECIDES_ABOVE`. Each test's statistic and boundary are in the
#: functions below and in ``docs/triage.md``. ``needs_validation`` is a fact, not a test: it has no row.
#: ``ill_conditioning`` and ``loss_choice`` add their rows here, next to their tests.
RULES: dict[str, tuple[tuple[str, bool, float], ...]] = {
    # A true minimum at a high loss: the stall verdict is a local minimum (positive curvature, gradient ~0), the
    # loss is far above the floor, the stall is not SGD's noise floor, and validation is not far above training.
    "model_bias": (("local_minimum_verdict", True, 0.0), ("train_loss_high", True, 0.0),
                   ("negative_curvature", False, 0.5), ("noise_limited", False, 0.0), ("generalization_gap", False, 0.0)),
    # The training loss is high and the stall verdict names an optimization failure (plateau, saddle, bounce), or a
    # minimum whose level is SGD's noise floor.
    "optimization": (("optimization_verdict", True, 0.0), ("train_loss_high", True, 0.0)),
    # Validation far above training, the gap growing and the validation loss rising while the training loss does
    # not rise.
    "overfitting": (("generalization_gap", True, 0.0), ("gap_grows", True, 0.0), ("val_rises", True, 0.0),
                    ("val_above_best", True, 0.0), ("train_rises", False, 0.0)),
    # Training came down, validation barely did and no longer falls, and it is not the overfitting pattern: run the
    # check. "Neither rising nor falling" needs the trends: without them it is undecided.
    "train_test_mismatch_check": (("train_loss_low", True, 0.0), ("val_stuck", True, 0.0), ("val_rises", False, 0.5),
                                  ("val_falls", False, 0.5)),
    # Unscaled inputs: the features' standard deviations spread widely or one sits far off centre (either test;
    # optdiag.diagnosis.conditioning, docs/conditioning.md).
    "ill_conditioning": (("inputs_unscaled", True, 0.0),),
    # A squared error of softmax/sigmoid outputs whose gradient the saturation attenuates, at a high, stalled loss.
    "loss_choice": (("mse_on_probabilities", True, 0.0), ("gradient_attenuated", True, 0.0), ("loss_high", True, 0.0),
                    ("loss_stalled", True, 0.0)),
}
#: A finding needs a score above this: every test of its row more likely true than false.
DECIDES_ABOVE = 0.5


def rule_scores(tests: dict[str, float | None], kinds: tuple[str, ...] | None = None) -> dict[str, float]:
    """Each kind's score from :data:`RULES`: the ``min`` over its row, a missing test taking its row's default.

    Args:
        tests: test name -> probability in [0, 1], or None when not measured (absent names count as None).
        kinds: the kinds to score (default: every kind with a row).

    Example:
        >>> rule_scores({"generalization_gap": 1.0, "gap_grows": 0.9, "val_rises": 0.8, "val_above_best": 0.95},
        ...             ("overfitting",))
        {'overfitting': 0.8}
    """
    scores = {}
    for kind in RULES if kinds is None else kinds:
        support = []
        for name, must_hold, missing in RULES[kind]:
            p = tests.get(name)
            p = missing if p is None else p
            support.append(p if must_hold else 1.0 - p)
        scores[kind] = round(min(support), 12)
    return scores


@dataclass
class Recommendation:
    """One thing to do that is not an optimizer knob (a bigger model, more data, a check to run), with its numbers.

    Knob changes (lr, momentum, schedule, batch size) are :class:`~optdiag.diagnosis.types.Suggestion` objects;
    a :class:`Finding` carries both kinds.

    Attributes:
        action: a short imperative ("Use a larger model").
        reason: one or more sentences naming the evidence.
        numbers: the measured numbers the reason quotes, under their evidence names.

    Example:
        >>> Recommendation("Collect more data", "The gap grew.", {"gap": 0.4}).to_dict()["numbers"]
        {'gap': 0.4}
    """

    action: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _nonempty_text("Recommendation.action", self.action, one_line=True)
        _nonempty_text("Recommendation.reason", self.reason)
        if not isinstance(self.numbers, dict):
            raise UsageError(f"Recommendation.numbers must be a dict, got {type(self.numbers).__name__}")
        self.numbers = from_jsonable(to_jsonable(self.numbers))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with the dataclass field names."""
        return {"action": self.action, "reason": self.reason, "numbers": to_jsonable(self.numbers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recommendation:
        """Rebuild from :meth:`to_dict` output."""
        if not isinstance(data, dict):
            raise UsageError(f"Recommendation.from_dict needs a dict, got {type(data).__name__}")
        return cls(action=data.get("action"), reason=data.get("reason"),
                   numbers=from_jsonable(data.get("numbers") or {}))


@dataclass
class Finding:
    """A triage conclusion: where the run sits on the map, how sure we are, what it rests on and what to do.

    Attributes:
        step: the optimizer step the finding refers to.
        kind: one of :data:`FINDING_KINDS`.
        confidence: in [0, 1], the rule score (0.5 on a boundary, near 1 far past it), as for a Diagnosis.
        evidence: every number used (JSON-safe, like ``Diagnosis.evidence``), with ``tests`` and ``scores``.
        recommendations: what to do beyond the optimizer's knobs, most direct first.
        suggestions: knob changes (e.g. ``Suggestion(target="batch_size")``) the finding supports.
        summary: one human sentence.

    Example:
        >>> f = Finding(40, "needs_validation", 1.0, {}, [], "No validation loss was logged.")
        >>> f.to_markdown().splitlines()[0]
        '**needs_validation** at step 40 (confidence 1.00): No validation loss was logged.'
    """

    step: int
    kind: str
    confidence: float
    evidence: dict[str, Any] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)
    summary: str = ""
    suggestions: list[Suggestion] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.step = check_number("Finding.step", self.step, low=0, integer=True, what="a non-negative int")
        if self.kind not in FINDING_KINDS:
            raise UsageError(f"Finding.kind must be one of {FINDING_KINDS}, got {self.kind!r}")
        self.confidence = check_number("Finding.confidence", self.confidence, low=0.0, high=1.0)
        if not isinstance(self.evidence, dict):
            raise UsageError(f"Finding.evidence must be a dict, got {type(self.evidence).__name__}")
        self.evidence = from_jsonable(to_jsonable(self.evidence))
        if not isinstance(self.recommendations, list) or not isinstance(self.suggestions, list):
            raise UsageError("Finding.recommendations and Finding.suggestions must be lists")
        self.recommendations = [r if isinstance(r, Recommendation) else Recommendation.from_dict(r)
                                for r in self.recommendations]
        self.suggestions = [s if isinstance(s, Suggestion) else Suggestion.from_dict(s) for s in self.suggestions]
        _nonempty_text("Finding.summary", self.summary)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (an ``events.jsonl`` line adds ``"record": "finding"`` to it)."""
        return {
            "step": self.step,
            "kind": self.kind,
            "confidence": self.confidence,
            "evidence": to_jsonable(self.evidence),
            "recommendations": [r.to_dict() for r in self.recommendations],
            "suggestions": [s.to_dict() for s in self.suggestions],
            "summary": self.summary,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """Rebuild from :meth:`to_dict` output (extra keys such as ``record`` are ignored)."""
        check_record("Finding", data)
        return cls(
            step=data["step"],
            kind=data["kind"],
            confidence=data["confidence"],
            evidence=from_jsonable(data.get("evidence", {})),
            recommendations=[Recommendation.from_dict(r) for r in data.get("recommendations", [])],
            summary=data["summary"],
            suggestions=[Suggestion.from_dict(s) for s in data.get("suggestions", [])],
        )

    def to_markdown(self) -> str:
        """Headline, evidence table, recommendations and suggestions (TensorBoard text, reports).

        Example:
            >>> print(Finding(7, "overfitting", 0.75, {"gap": 0.3}, [], "Gap grows.").to_markdown().splitlines()[0])
            **overfitting** at step 7 (confidence 0.75): Gap grows.
        """
        lines = markdown_head(self)
        if self.recommendations:
            lines += ["| action | reason | numbers |", "|---|---|---|"]
            lines += [f"| {_cell(r.action)} | {_cell(r.reason)} | {_cell(_format_value(r.numbers))} |"
                      for r in self.recommendations]
            lines.append("")
        if self.suggestions:
            lines += ["| target | action | current | proposed | reason |", "|---|---|---|---|---|"]
            lines += [f"| {s.target} | {_cell(s.action)} | {_format_value(s.current)} | "
                      f"{_format_value(s.proposed)} | {_cell(s.reason)} |" for s in self.suggestions]
        return "\n".join(lines).rstrip() + "\n"


# --- the tests ------------------------------------------------------------------------------------------------------
#: The training loss is "high" while over this share of its initial distance to the floor remains (the stall
#: verdicts' own boundary for "still high", :data:`optdiag.diagnosis.classify.LOSS_HIGH_GAP`); "low" below it.
TRAIN_HIGH_FRACTION = LOSS_HIGH_GAP
#: The validation loss is "stuck" while it keeps over half of its initial distance to the floor (at initialisation
#: training and validation losses agree: the model has seen neither).
VAL_STUCK_FRACTION = 0.5
#: SGD's noise floor ``effective_lr tr(Sigma) / (4 B)`` explains the stalled loss when it is over this share of it.
NOISE_FLOOR_SHARE = 0.1
#: Validation "far above" training: ``(val - train) / train`` past this (half the training loss again).
GAP_RELATIVE = 0.5
#: The validation loss has risen materially when it is this share above its best (a significant trend alone can be
#: a rise of a fraction of a percent on a noise-free validation loss).
VAL_RISE_FRACTION = 0.1
#: Validation points the trend tests look at (the most recent), and the fewest they need.
TREND_POINTS = 10
MIN_TREND_POINTS = 5
#: Width of the trend tests' logistic in standard errors: one standard error past the 95% boundary gives 0.9.
T_WIDTH = 1.0 / math.log(9.0)
#: Stall verdicts that name an optimization failure (a minimum is one only when its level is SGD's noise floor).
OPTIMIZATION_VERDICTS = ("plateau", "saddle_point", "oscillation")
#: The optimizers whose stationary noise floor ``effective_lr tr(Sigma) / (4 B)`` is known (plain gradient steps).
_GRADIENT_STEP_KINDS = ("sgd", "heavy_ball", "nesterov")


def rise_probability(steps: Sequence[float], values: Sequence[float], noise_sd: float | None = None,
                     falling: bool = False) -> tuple[float | None, dict[str, float]]:
    """P(``values`` rise significantly with ``steps``), from :func:`~optdiag.diagnosis.stall.trend_test`.

    The statistic is ``t = slope / standard_error``, the boundary the 95% interval's quantile: 0.5 where the
    interval's lower end touches 0, 0.9 one standard error past it. ``falling=True`` asks for a significant fall.

    Returns:
        ``(probability or None with fewer than MIN_TREND_POINTS finite points, {"slope", "slope_low",
        "slope_high"})``.

    Example:
        >>> p, fit = rise_probability(range(10), [0.1 * i for i in range(10)])
        >>> p, round(fit["slope"], 12)
        (1.0, 0.1)
    """
    pairs = [(float(s), float(v)) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
    if len(pairs) < MIN_TREND_POINTS:
        return None, {}
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if falling:
        y = -y
    slope, se, low, high = trend_test(x, y, noise_sd=noise_sd)
    if not math.isfinite(slope):
        return None, {}
    fit = {"slope": -slope if falling else slope, "slope_low": -high if falling else low,
           "slope_high": -low if falling else high}
    if se == 0 or not math.isfinite(se):
        return (1.0 if slope > 0 else 0.0), fit
    quantile = (high - slope) / se  # the interval's half-width in standard errors
    return round(_logistic((slope / se - quantile) / T_WIDTH), 12), fit


def _logistic(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _fraction(loss: float | None, initial: float | None, floor: float) -> float | None:
    """``(loss - floor) / (initial - floor)``: the share of the initial distance to the floor that remains."""
    if loss is None or initial is None or not (math.isfinite(loss) and math.isfinite(initial)) or initial <= floor:
        return None
    return max(loss - floor, 0.0) / (initial - floor)


def noise_floor_share(evidence: dict[str, Any]) -> float | None:
    """SGD's stationary excess loss over the loss, ``effective_lr tr(Sigma) / (4 B loss)`` (docs/triage.md).

    At a minimum, SGD with step ``eta`` and per-sample gradient covariance ``Sigma`` settles where the excess loss
    is about ``eta tr(Sigma) / (4 B)`` whatever the curvature: a loss made of that is a noise floor (lower the lr
    or raise the batch), not the model's best. None for adaptive optimizers (their step is preconditioned) or when
    a number is missing.

    Example:
        >>> noise_floor_share({"optimizer_kind": "sgd", "effective_lr": 0.1, "grad_noise_trace": 8.0,
        ...                    "batch_size": 4, "loss": 1.0})
        0.05
    """
    kind, lr = evidence.get("optimizer_kind"), evidence.get("effective_lr")
    noise, b, loss = evidence.get("grad_noise_trace"), evidence.get("batch_size"), evidence.get("loss")
    if kind not in _GRADIENT_STEP_KINDS or None in (lr, noise, b, loss) or not b or not loss > 0:
        return None
    if evidence.get("dataset_size") is not None and b >= evidence["dataset_size"]:
        return 0.0  # a full batch has no gradient noise
    return round(lr * noise / (4.0 * b * loss), 12)


# --- the triage -----------------------------------------------------------------------------------------------------
@dataclass
class TriageInputs:
    """The numbers the triage reads (filled by :class:`~optdiag.callbacks.TriageMonitor`, or by hand).

    Attributes:
        step: the optimizer step of this triage.
        train: ``(step, training loss)`` at each validation end, oldest first.
        val: ``(step, validation loss)`` at the same points; empty when no validation loss exists.
        loss_initial: the training loss at the first step (at initialisation it is also the validation loss).
        loss_floor: the loss a perfect model reaches (0 for cross-entropy and squared errors).
        verdict: the latest stall verdict still standing (not refuted), as ``Diagnosis`` fields: ``kind``,
            ``confidence``, ``evidence`` (its ``loss``, ``tests``, noise numbers); None when there is none.
        sharpness: ``(step, lambda_max)`` snapshots, oldest first.
        batch_size: the training batch size. b_simple: the gradient noise scale ``tr(Sigma) / |G|^2``.
        dataset_size: samples per epoch.
        input_findings: ``{kind: summary}`` of the findings about the setup already made this fit
            (``ill_conditioning``, ``loss_choice``): an optimization problem they explain is theirs to fix first.

    Example:
        >>> TriageInputs(step=10, train=[(10, 1.0)]).val
        []
    """

    step: int
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    loss_initial: float | None = None
    loss_floor: float = 0.0
    verdict: Any = None
    sharpness: list[tuple[int, float]] = field(default_factory=list)
    batch_size: int | None = None
    b_simple: float | None = None
    dataset_size: int | None = None
    input_findings: dict[str, str] = field(default_factory=dict)


def _aligned(inputs: TriageInputs) -> tuple[list[int], list[float], list[float]]:
    """The validation points that have both losses (finite), the most recent :data:`TREND_POINTS`."""
    train = dict(inputs.train)
    rows = [(s, train[s], v) for s, v in inputs.val if s in train and math.isfinite(v) and math.isfinite(train[s])]
    rows = rows[-TREND_POINTS:]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def triage_tests(inputs: TriageInputs) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Every triage test's probability (None when not measured) and the numbers behind them.

    Example:
        >>> tests, ev = triage_tests(TriageInputs(step=9, train=[(i, 1.0 - 0.05 * i) for i in range(10)],
        ...                                       val=[(i, 1.0 + 0.1 * i) for i in range(10)], loss_initial=2.0))
        >>> tests["gap_grows"], tests["val_rises"], tests["train_rises"]
        (1.0, 1.0, 0.0)
    """
    tests: dict[str, float | None] = {}
    ev: dict[str, Any] = {"loss_floor": inputs.loss_floor, "loss_initial": inputs.loss_initial}
    steps, train, val = _aligned(inputs)
    train_now = train[-1] if train else (inputs.train[-1][1] if inputs.train else None)
    if train:
        gap = [v - t for t, v in zip(train, val)]
        noise = difference_noise(np.array(gap)) if len(gap) >= 3 else None
        tests["gap_grows"], fit = rise_probability(steps, gap, noise_sd=noise)
        ev.update({"train_loss": train[-1], "val_loss": val[-1], "gap": gap[-1], "trend_steps": [steps[0], steps[-1]],
                   "gap_slope": fit.get("slope"), "gap_slope_ci": [fit.get("slope_low"), fit.get("slope_high")]})
        tests["val_rises"], fit = rise_probability(steps, val, noise_sd=difference_noise(np.array(val))
                                                   if len(val) >= 3 else None)
        ev["val_slope"] = fit.get("slope")
        tests["val_falls"], _ = rise_probability(steps, val, noise_sd=difference_noise(np.array(val))
                                                 if len(val) >= 3 else None, falling=True)
        tests["train_rises"], fit = rise_probability(steps, train, noise_sd=difference_noise(np.array(train))
                                                     if len(train) >= 3 else None)
        ev["train_slope"] = fit.get("slope")
        best = min(range(len(inputs.val)), key=lambda i: inputs.val[i][1])
        ev["best_val_step"], ev["best_val_loss"] = inputs.val[best]
        best_loss = inputs.val[best][1]
        above = (val[-1] - best_loss) / best_loss if best_loss > 0 else (math.inf if val[-1] > best_loss else 0.0)
        ev["val_above_best"] = above
        tests["val_above_best"] = log_ratio_probability(above, VAL_RISE_FRACTION)
        relative_gap = (val[-1] - train[-1]) / train[-1] if train[-1] > 0 else math.inf
        ev["relative_gap"] = relative_gap
        tests["generalization_gap"] = log_ratio_probability(relative_gap, GAP_RELATIVE)
        val_fraction = _fraction(val[-1], inputs.loss_initial, inputs.loss_floor)
        ev["val_fraction"] = val_fraction
        tests["val_stuck"] = None if val_fraction is None else log_ratio_probability(val_fraction, VAL_STUCK_FRACTION)
        if inputs.sharpness:
            window = [(s, v) for s, v in inputs.sharpness if s >= steps[0] and v is not None and math.isfinite(v)]
            p, fit = rise_probability([s for s, _ in window], [v for _, v in window])
            if p is not None:
                ev.update({"sharpness_rises": p, "lambda_max_slope": fit["slope"], "lambda_max_first": window[0][1],
                           "lambda_max_last": window[-1][1]})
    verdict = inputs.verdict
    if verdict is not None:
        vev = verdict.evidence
        train_now = vev.get("loss") if train_now is None else train_now
        ev.update({"verdict_step": verdict.step, "verdict_kind": verdict.kind,
                   "verdict_confidence": verdict.confidence})
        tests["negative_curvature"] = (vev.get("tests") or {}).get("negative_curvature")
        share = noise_floor_share(vev)
        ev["noise_floor_share"] = share
        tests["noise_limited"] = None if share is None else log_ratio_probability(share, NOISE_FLOOR_SHARE)
        tests["local_minimum_verdict"] = verdict.confidence if verdict.kind == "local_minimum" else None
        if verdict.kind in OPTIMIZATION_VERDICTS:
            tests["optimization_verdict"] = verdict.confidence
        elif verdict.kind == "local_minimum" and tests["noise_limited"] is not None:
            tests["optimization_verdict"] = min(verdict.confidence, tests["noise_limited"])
    initial = inputs.loss_initial
    if initial is None and verdict is not None:
        initial = verdict.evidence.get("loss_initial")
        ev["loss_initial"] = initial
    train_fraction = _fraction(train_now, initial, inputs.loss_floor)
    ev.setdefault("train_loss", train_now)
    ev["train_fraction"] = train_fraction
    if train_fraction is not None:
        tests["train_loss_high"] = log_ratio_probability(train_fraction, TRAIN_HIGH_FRACTION)
        tests["train_loss_low"] = 1.0 - tests["train_loss_high"]
    if inputs.batch_size is not None:
        ev["batch_size"] = inputs.batch_size
    if inputs.b_simple is not None:
        ev["b_simple"] = inputs.b_simple
    return tests, {k: v for k, v in ev.items() if v is not None}


def _g(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def _pct(x: Any) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) else "?"


def _model_bias(ev: dict[str, Any], inputs: TriageInputs) -> tuple[str, list[Recommendation], list[Suggestion]]:
    share = ev.get("noise_floor_share")
    noise = "" if share is None else ", with no gradient noise (full batch)" if share == 0 else \
        f", and SGD's noise floor explains only {_pct(share)} of it"
    summary = (f"Model bias: the training loss stalled at {_g(ev.get('train_loss'))}, "
               f"{_pct(ev.get('train_fraction'))} of its initial distance to {_g(inputs.loss_floor)} still to go, at a "
               f"true minimum (stall verdict local_minimum at step {ev.get('verdict_step')}: gradient ~0, no "
               f"significant negative curvature{noise}): this model cannot fit the training data better.")
    numbers = {k: ev[k] for k in ("train_fraction", "loss_initial", "noise_floor_share", "relative_gap") if k in ev}
    return summary, [
        Recommendation("Use a larger or more flexible model", "A minimum at a high training loss is the model's "
                       "limit, not the optimizer's: add units or layers, or better input features. Check: a "
                       "larger model reaches a lower training loss.", numbers),
    ], []


#: Findings about the setup that cause an optimization stall, and what to do first.
_SETUP_FIRST = {"loss_choice": "Change the loss before tuning the step",
                "ill_conditioning": "Normalize the inputs before tuning the step"}


def _optimization(ev: dict[str, Any], inputs: TriageInputs) -> tuple[str, list[Recommendation], list[Suggestion]]:
    verdict = inputs.verdict
    noise = ev.get("noise_floor_share")
    why = (f"a minimum whose level is SGD's noise floor ({_pct(noise)} of the loss)"
           if verdict.kind == "local_minimum" else f"a {verdict.kind.replace('_', ' ')}")
    summary = (f"An optimization problem: the training loss is still high ({_pct(ev.get('train_fraction'))} of its "
               f"initial distance to {_g(inputs.loss_floor)} to go) and the stall verdict at step {verdict.step} "
               f"is {why} (confidence {verdict.confidence:.2f}): fix the optimization before enlarging the model.")
    suggestions = list(verdict.suggestions)
    if not any(s.target == "batch_size" for s in suggestions):
        suggestions += batch_size_advice(inputs.batch_size, inputs.b_simple, dataset_size=inputs.dataset_size)
    # A loss on saturated probabilities, or unscaled inputs, make the surface flat or elongated: the step's advice
    # treats the symptom; the setup's finding is the cause and comes first.
    first = [Recommendation(_SETUP_FIRST[kind], f"The {kind.replace('_', ' ')} finding explains this stall: "
                            f"{text} Fix that first; the step's advice below treats the symptom.", {})
             for kind, text in inputs.input_findings.items() if kind in _SETUP_FIRST]
    if first:
        summary += " The setup comes first: " + ", ".join(kind.replace("_", " ") for kind in inputs.input_findings
                                                          if kind in _SETUP_FIRST) + " (see its finding)."
    return summary, first + [
        Recommendation("Follow the stall verdict's advice", f"The stall verdict {verdict.kind} at step "
                       f"{verdict.step} says why the loss stopped falling; its suggestions change the step, not "
                       "the model. A larger model would not fix it.",
                       {"verdict_step": verdict.step, "verdict_confidence": verdict.confidence}),
    ], suggestions


def _overfitting(ev: dict[str, Any], inputs: TriageInputs) -> tuple[str, list[Recommendation], list[Suggestion]]:
    sharp = ev.get("sharpness_rises", 0.0) > DECIDES_ABOVE
    sharpness = (f"; the sharpness lambda_max rose with it, from {_g(ev['lambda_max_first'])} to "
                 f"{_g(ev['lambda_max_last'])}" if sharp else "")
    summary = (f"Overfitting: the validation loss rose from its best {_g(ev.get('best_val_loss'))} at step "
               f"{ev.get('best_val_step')} to {_g(ev.get('val_loss'))} while the training loss went to "
               f"{_g(ev.get('train_loss'))}; the gap grows by {_g(ev.get('gap_slope'))} per step{sharpness}.")
    numbers = {k: ev[k] for k in ("best_val_step", "best_val_loss", "val_loss", "train_loss", "gap_slope") if k in ev}
    recs = [
        Recommendation("Stop at the best validation loss", f"The validation loss was lowest at step "
                       f"{ev.get('best_val_step')}: keep that checkpoint "
                       "(ModelCheckpoint(monitor=..., mode='min')) or stop there (EarlyStopping).", numbers),
        Recommendation("Get more data or augment it", "More examples of the same kind close an overfitting gap.",
                       {"gap": ev.get("gap")}),
        Recommendation("Constrain the model", "Fewer parameters, weight decay or dropout limit how closely it can "
                       "fit the training set.", {"relative_gap": ev.get("relative_gap")}),
        _holdout_check(ev),
    ]
    suggestions = batch_size_advice(inputs.batch_size, inputs.b_simple, gap_grows=True, sharpness_rises=sharp,
                                    dataset_size=inputs.dataset_size)
    return summary, recs, suggestions


def _mismatch(ev: dict[str, Any], inputs: TriageInputs) -> tuple[str, list[Recommendation], list[Suggestion]]:
    summary = (f"Training reached {_g(ev.get('train_loss'))} ({_pct(ev.get('train_fraction'))} of the initial "
               f"distance to go) but the validation loss stays at {_g(ev.get('val_loss'))} "
               f"({_pct(ev.get('val_fraction'))} to go) without rising: overfitting or a mismatch between training "
               "and validation data, which training signals cannot tell apart.")
    return summary, [_holdout_check(ev)], []


def _holdout_check(ev: dict[str, Any]) -> Recommendation:
    """The check that tells a train/validation mismatch from overfitting, which training signals cannot."""
    return Recommendation(
        "Hold out a split of the training data", "Train on 90% of the training set and evaluate on the other 10%: a "
        "held-out loss near the training loss means the validation data differ from the training data (a mismatch: "
        "more data of the training kind will not help; get training data like the validation data); near the "
        "validation loss means overfitting (more data, augmentation, constraints, early stopping).",
        {k: ev[k] for k in ("train_loss", "val_loss", "val_fraction") if k in ev})


_BUILDERS = {"model_bias": _model_bias, "optimization": _optimization, "overfitting": _overfitting,
             "train_test_mismatch_check": _mismatch}
#: Kinds that exclude each other (both explain a high training loss): the higher score wins, a tie says nothing.
_EXCLUSIVE = ("model_bias", "optimization")


def triage(inputs: TriageInputs) -> list[Finding]:
    """Place the run on the map: the findings whose rule score is above :data:`DECIDES_ABOVE`.

    ``model_bias`` and ``optimization`` exclude each other (the higher score wins; a tie says neither).
    Every finding's evidence holds the numbers, ``tests`` and ``scores``.

    Example:
        >>> train = [(10 * i, 1.0 / (i + 1)) for i in range(10)]
        >>> val = [(10 * i, 1.0 + 0.1 * i) for i in range(10)]
        >>> [f.kind for f in triage(TriageInputs(step=90, train=train, val=val, loss_initial=2.3))]
        ['overfitting']
    """
    tests, ev = triage_tests(inputs)
    scores = rule_scores(tests, tuple(_BUILDERS))
    decided = [k for k in _BUILDERS if scores[k] > DECIDES_ABOVE]
    exclusive = [k for k in decided if k in _EXCLUSIVE]
    if len(exclusive) == 2:
        a, b = (scores[k] for k in _EXCLUSIVE)
        decided = [k for k in decided if k not in _EXCLUSIVE or (a != b and scores[k] == max(a, b))]
    findings = []
    for kind in decided:
        summary, recs, suggestions = _BUILDERS[kind](ev, inputs)
        evidence = {**ev, "tests": tests, "scores": scores}
        findings.append(Finding(inputs.step, kind, scores[kind], evidence, recs, summary, suggestions))
    return findings


def needs_validation(step: int, looked_for: Sequence[str], logged: Sequence[str]) -> Finding:
    """The one finding said when no validation loss was found: what the triage needs and what it saw.

    Example:
        >>> needs_validation(5, ["val_loss"], ["train_loss"]).kind
        'needs_validation'
    """
    logged = sorted(logged)
    return Finding(step, "needs_validation", 1.0, {"looked_for": list(looked_for), "logged": logged}, [
        Recommendation("Log a validation loss", "Add a validation_step that calls self.log('val_loss', loss) and a "
                       "val_dataloader, or name your metric with TriageMonitor(val_metrics=...): overfitting and "
                       "train/test mismatch can only be told with a validation loss.",
                       {"looked_for": list(looked_for)}),
    ], f"No validation loss among the logged metrics ({', '.join(logged) or 'none'}); looked for "
       f"{', '.join(looked_for)}: overfitting cannot be checked.")
