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

from dataclasses import dataclass, field
from typing import Any

from optdiag.diagnosis.types import Suggestion, _cell, _format_value, _nonempty_text, from_jsonable, to_jsonable
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
    # loss is far above the floor, the stall is not SGD's noise floor, and validation is not far below training.
    "model_bias": (("local_minimum_verdict", True, 0.0), ("train_loss_high", True, 0.0),
                   ("negative_curvature", False, 0.5), ("noise_limited", False, 0.0), ("generalization_gap", False, 0.0)),
    # The training loss is high and the stall verdict names an optimization failure (plateau, saddle, bounce), or a
    # minimum whose level is SGD's noise floor.
    "optimization": (("optimization_verdict", True, 0.0), ("train_loss_high", True, 0.0)),
    # The gap grows and the validation loss rises while the training loss does not rise.
    "overfitting": (("gap_grows", True, 0.0), ("val_rises", True, 0.0), ("train_rises", False, 0.0)),
    # Training came down, validation barely did, and it is not the overfitting pattern: run the check.
    "train_test_mismatch_check": (("train_loss_low", True, 0.0), ("val_stuck", True, 0.0), ("val_rises", False, 0.0)),
}
#: A finding needs a score above this: every test of its row more likely true than false.
DECIDES_ABOVE = 0.5


def rule_scores(tests: dict[str, float | None], kinds: tuple[str, ...] | None = None) -> dict[str, float]:
    """Each kind's score from :data:`RULES`: the ``min`` over its row, a missing test taking its row's default.

    Args:
        tests: test name -> probability in [0, 1], or None when not measured (absent names count as None).
        kinds: the kinds to score (default: every kind with a row).

    Example:
        >>> rule_scores({"gap_grows": 0.9, "val_rises": 0.8}, ("overfitting",))
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
        if not isinstance(data, dict):
            raise UsageError(f"Finding.from_dict needs a dict, got {type(data).__name__}")
        missing = [k for k in ("step", "kind", "confidence", "summary") if k not in data]
        if missing:
            raise UsageError(f"Finding.from_dict: missing keys {missing}")
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
        lines = [f"**{self.kind}** at step {self.step} (confidence {self.confidence:.2f}): {_cell(self.summary)}", ""]
        if self.evidence:
            lines += ["| evidence | value |", "|---|---|"]
            lines += [f"| {_cell(k)} | {_cell(_format_value(v))} |" for k, v in self.evidence.items()]
            lines.append("")
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
