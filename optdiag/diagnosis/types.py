"""The verdict objects: :class:`Diagnosis` and the :class:`Suggestion` objects it carries.

Both are plain dataclasses that validate themselves and serialise to JSON-safe dicts. In those dicts a non-finite
float becomes one of the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has no NaN) and ``None`` always means
"not measured"; :meth:`Diagnosis.from_dict` turns the three strings back into floats, so a round trip is lossless.

Example:
    >>> s = Suggestion("lr", "Lower the learning rate", current=0.01, proposed=0.00667,
    ...                reason="lr * lambda_max = 1.5 is past the sign-flip boundary 1.")
    >>> d = Diagnosis(step=120, kind="oscillation", confidence=0.9, evidence={"lambda_max": 150.0},
    ...               suggestions=[s], summary="The step bounces across a valley.")
    >>> Diagnosis.from_dict(d.to_dict()) == d
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from optdiag.errors import UsageError
from optdiag.policy import check_number

#: What a verdict can say. ``loss_spike`` is a spike that recovered (not divergence); there is no "uncertain" kind:
#: an undecided check is not a diagnosis.
KINDS = ("local_minimum", "saddle_point", "oscillation", "plateau", "divergence", "loss_spike")
TARGETS = ("lr", "momentum", "schedule", "batch_size")
#: The evidence each kind of verdict mainly rests on, shown first wherever a verdict is shown in brief (the demo's
#: table, the TensorBoard tab); docs/diagnosis-rules.md has the rules that use them.
KEY_EVIDENCE: dict[str, tuple[str, ...]] = {
    "saddle_point": ("lambda_min", "lambda_max", "escape_expected_drop", "escape_measured_drop"),
    "oscillation": ("lr_lambda_max", "grad_cosine", "grad_norm"),
    "local_minimum": ("lambda_min", "lambda_max", "grad_snr"),
    "plateau": ("lr_lambda_max", "grad_norm", "rel_slope"),
    "divergence": ("loss", "lr_lambda_max"),
    "loss_spike": ("lambda_max", "lambda_min"),
}
_NONFINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_jsonable(value: Any) -> Any:
    """Convert ``value`` to plain JSON types: numpy scalars/arrays, tuples and non-finite floats included.

    Objects with a ``to_dict`` method (e.g. :class:`~optdiag.diagnosis.stability.OptimizerSpec`) become their dict.

    Example:
        >>> to_jsonable({"a": (1.0, float("inf")), "b": None})
        {'a': [1.0, 'inf'], 'b': None}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return to_jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    raise UsageError(f"cannot store a {type(value).__name__} in a JSON record: {value!r}")


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable` for numbers: ``"nan"``, ``"inf"``, ``"-inf"`` become floats again."""
    if isinstance(value, str):
        return _NONFINITE_NAMES.get(value, value)
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def _nonempty_text(name: str, value: Any, *, one_line: bool = False) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{name} must be a non-empty string, got {value!r}")
    if one_line and "\n" in value:
        raise UsageError(f"{name} must be a single line, got {value!r}")
    return value


@dataclass
class Suggestion:
    """One change to try, with the PyTorch knob, the numbers and the evidence behind it.

    Attributes:
        target: which knob: ``"lr"``, ``"momentum"``, ``"schedule"`` or ``"batch_size"``.
        action: a short imperative ("Lower the learning rate").
        current: the knob's current value, when it has one.
        proposed: the proposed value, when it is a number.
        reason: one sentence naming the evidence.
        code: a one-line PyTorch snippet, e.g. ``"torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5)"``.

    Example:
        >>> Suggestion("batch_size", "Halve the batch", current=256, proposed=128, reason="Sharp minimum.").target
        'batch_size'
    """

    target: str
    action: str
    current: float | None = None
    proposed: float | None = None
    reason: str = ""
    code: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"Suggestion.target must be one of {TARGETS}, got {self.target!r}")
        _nonempty_text("Suggestion.action", self.action, one_line=True)
        _nonempty_text("Suggestion.reason", self.reason)
        self.current = check_number("Suggestion.current", self.current, allow_none=True)
        self.proposed = check_number("Suggestion.proposed", self.proposed, allow_none=True)
        if self.code is not None:
            _nonempty_text("Suggestion.code", self.code, one_line=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with the dataclass field names."""
        return {
            "target": self.target,
            "action": self.action,
            "current": self.current,
            "proposed": self.proposed,
            "reason": self.reason,
            "code": self.code,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Suggestion:
        """Rebuild from :meth:`to_dict` output."""
        if not isinstance(data, dict):
            raise UsageError(f"Suggestion.from_dict needs a dict, got {type(data).__name__}")
        return cls(**{k: data.get(k) for k in ("target", "action", "current", "proposed", "reason", "code")})


@dataclass
class Diagnosis:
    """Why the loss stopped going down, how sure we are, what it rests on and what to change.

    Attributes:
        step: the optimizer step the verdict refers to.
        kind: one of :data:`KINDS`.
        confidence: in [0, 1]; about 0.5 when the deciding statistic sits on its boundary, near 1 far from it.
        evidence: every number used, under the names the logged scalars use (``lambda_max``,
            ``stability_ratio``, ...). Stored JSON-safe (tuples become lists, non-finite floats strings).
        suggestions: what to change, most direct first.
        summary: one human sentence.

    Example:
        >>> d = Diagnosis(3, "plateau", 0.8, {"grad_norm": 1e-5}, [], "Flat region.")
        >>> d.to_dict()["kind"]
        'plateau'
    """

    step: int
    kind: str
    confidence: float
    evidence: dict[str, Any] = field(default_factory=dict)
    suggestions: list[Suggestion] = field(default_factory=list)
    summary: str = ""

    def __post_init__(self) -> None:
        self.step = check_number("Diagnosis.step", self.step, low=0, integer=True, what="a non-negative int")
        if self.kind not in KINDS:
            raise UsageError(f"Diagnosis.kind must be one of {KINDS}, got {self.kind!r}")
        self.confidence = check_number("Diagnosis.confidence", self.confidence, low=0.0, high=1.0)
        if not isinstance(self.evidence, dict):
            raise UsageError(f"Diagnosis.evidence must be a dict, got {type(self.evidence).__name__}")
        # Normalise once so equality, JSON and Markdown all see the same plain values.
        self.evidence = from_jsonable(to_jsonable(self.evidence))
        if not isinstance(self.suggestions, list):
            raise UsageError("Diagnosis.suggestions must be a list of Suggestion")
        self.suggestions = [s if isinstance(s, Suggestion) else Suggestion.from_dict(s) for s in self.suggestions]
        _nonempty_text("Diagnosis.summary", self.summary)

    def key_evidence(self) -> dict[str, Any]:
        """The measured numbers this kind of verdict mainly rests on (:data:`KEY_EVIDENCE`), those present.

        Example:
            >>> Diagnosis(3, "plateau", 0.8, {"grad_norm": 2.0, "lr": 0.1}, [], "Flat.").key_evidence()
            {'grad_norm': 2.0}
        """
        return {name: self.evidence[name] for name in KEY_EVIDENCE[self.kind] if self.evidence.get(name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``json.dumps(d.to_dict(), allow_nan=False)`` works)."""
        return {
            "step": self.step,
            "kind": self.kind,
            "confidence": self.confidence,
            "evidence": to_jsonable(self.evidence),
            "suggestions": [s.to_dict() for s in self.suggestions],
            "summary": self.summary,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        """Rebuild from :meth:`to_dict` output (e.g. a line of ``events.jsonl``)."""
        check_record("Diagnosis", data)
        return cls(
            step=data["step"],
            kind=data["kind"],
            confidence=data["confidence"],
            evidence=from_jsonable(data.get("evidence", {})),
            suggestions=[Suggestion.from_dict(s) for s in data.get("suggestions", [])],
            summary=data["summary"],
        )

    def to_markdown(self) -> str:
        """A readable block: headline, evidence table and suggestions table (TensorBoard text panels, reports).

        Example:
            >>> print(Diagnosis(7, "plateau", 0.75, {"lr": 0.1}, [], "Flat.").to_markdown().splitlines()[0])
            **plateau** at step 7 (confidence 0.75): Flat.
        """
        lines = markdown_head(self)
        if self.suggestions:
            lines += ["| target | action | current | proposed | reason | code |", "|---|---|---|---|---|---|"]
            for s in self.suggestions:
                code = f"`{s.code}`" if s.code else ""
                lines.append(
                    f"| {s.target} | {_cell(s.action)} | {_format_value(s.current)} | "
                    f"{_format_value(s.proposed)} | {_cell(s.reason)} | {_cell(code)} |"
                )
        return "\n".join(lines).rstrip() + "\n"


def check_record(name: str, data: Any) -> None:
    """Refuse what cannot be a serialised verdict or finding: not a dict, or without step, kind, confidence, summary.

    Raises:
        UsageError: naming ``name`` (``"Diagnosis"``, ``"Finding"``) and what is wrong.
    """
    if not isinstance(data, dict):
        raise UsageError(f"{name}.from_dict needs a dict, got {type(data).__name__}")
    missing = [k for k in ("step", "kind", "confidence", "summary") if k not in data]
    if missing:
        raise UsageError(f"{name}.from_dict: missing keys {missing}")


def markdown_head(record: Any) -> list[str]:
    """The Markdown headline and evidence table of a verdict or finding (``kind``, ``step``, ``confidence``,
    ``summary``, ``evidence``), as lines: what :meth:`Diagnosis.to_markdown` and the triage's findings share."""
    lines = [f"**{record.kind}** at step {record.step} (confidence {record.confidence:.2f}): {_cell(record.summary)}",
             ""]
    if record.evidence:
        lines += ["| evidence | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_format_value(v))} |" for k, v in record.evidence.items()]
        lines.append("")
    return lines


def _format_value(value: Any, max_items: int = 6) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_format_value(v) for v in value[-max_items:])
        return f"[{len(value)} values, last: {shown}]" if len(value) > max_items else f"[{shown}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    return str(value)


def _cell(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
