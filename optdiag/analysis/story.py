"""One consistent account of a checkpoint series: no critical-point verdict for a point that still descends, and
consecutive checkpoints whose evidence agrees told as one phase.

Numbers in, records out (nothing here touches a model). Two parts, reasoned in ``docs/analyzing-checkpoints.md``:

* **The critical-point gate.** :func:`optdiag.diagnosis.classify_point` judges a point by its gradient statistics
  and curvature. Its minimum and saddle verdicts stand only when the measured loss agrees that the point is
  stationary. A point is *still descending* when the full-data loss falls by more than :data:`DESCENT_FRACTION` of
  itself (the stall detector's 1% boundary) either along its own full-data gradient, at the step the quadratic
  model calls best (:func:`gradient_step`), or on the straight path to the next checkpoint when that fall is
  first-order (the gradient's slope along the path accounts for at least half of it: a saddle that training
  escaped falls along the path through negative curvature, at zero slope, and keeps its verdict).
* **The story.** Each checkpoint's state is its gated point type (``"descending"`` for a point that is not
  critical); a phase is a maximal run of consecutive checkpoints in the same state, split where a barrier between
  two critical points shows they lie in different basins.

Example:
    >>> t, predicted = gradient_step(grad_norm=2.0, curvature=4.0, radius=10.0)
    >>> t, predicted  # the quadratic model 1 - 2 t + 2 t^2 is lowest at t = 0.5, 0.5 lower
    (0.5, 0.5)
    >>> gradient_line_record(loss=1.0, grad_norm=2.0, curvature=4.0, step=t, predicted_drop=predicted,
    ...                      measured_loss=0.5)["descends"]
    True
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from optdiag.diagnosis.classify import MIN_GRADIENT_PAIRS
from optdiag.diagnosis.stall import DEFAULT_REL_IMPROVEMENT

__all__ = [
    "DESCENT_FRACTION",
    "STATES",
    "gradient_step",
    "gradient_line_record",
    "towards_next_record",
    "norm_test_record",
    "gate",
    "tell_story",
]

#: A fall of the loss larger than this fraction of it is "clear" descent: the stall detector's boundary (a window
#: that improves the loss by less than 1% is stalled), so "still descending" here and "not stalled" there agree.
DESCENT_FRACTION = DEFAULT_REL_IMPROVEMENT

#: Story states: the gated point types, with ``not_critical`` told as ``descending``; ``undecided`` is a point
#: classify_point gave no verdict for and whose loss does not measurably descend.
STATES = {"not_critical": "descending", "local_minimum": "minimum", "saddle_point": "near a saddle",
          "plateau": "plateau", "undecided": "undecided"}


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _g(x: Any) -> str:
    return f"{x:.4g}" if _finite(x) else "n/a"


def gradient_step(grad_norm: float, curvature: float, radius: float) -> Optional[tuple[float, float]]:
    """The step along the negative gradient that the model ``L - |G| t + |c| t^2 / 2`` calls best, and its drop.

    ``c = g^T H g / |g|^2`` is the curvature along the gradient. Its absolute value is used so that negative
    curvature, the business of the saddle verdict, never counts as first-order descent; ``t`` is capped at
    ``radius`` (the landscape's scale) when ``|c|`` is tiny.

    Returns:
        ``(t, predicted_drop)``, or None when the gradient is zero or a number is not finite.

    Example:
        >>> gradient_step(1.0, 0.0, 3.0)  # no curvature: up to the radius
        (3.0, 3.0)
    """
    if not (_finite(grad_norm) and _finite(curvature) and _finite(radius)) or grad_norm <= 0 or radius <= 0:
        return None
    c = abs(curvature)
    t = min(grad_norm / c, radius) if c > 0 else radius
    return t, grad_norm * t - 0.5 * c * t * t


def _descends(drop: Optional[float], loss: Optional[float]) -> Optional[bool]:
    if not (_finite(drop) and _finite(loss)):
        return None
    return drop > 0 and drop > DESCENT_FRACTION * abs(loss)


def gradient_line_record(loss: float, grad_norm: float, curvature: float, step: float, predicted_drop: float,
                         measured_loss: Optional[float]) -> dict[str, Any]:
    """The evidence of the gradient line: the full-data loss measured at ``theta - step * g / |g|``.

    ``descends`` is True when both the predicted and the measured drop exceed :data:`DESCENT_FRACTION` of the
    loss (None when the measured loss is not available).
    """
    drop = None if not (_finite(measured_loss) and _finite(loss)) else loss - measured_loss
    measured = _descends(drop, loss)
    return {
        "grad_norm": grad_norm, "curvature": curvature, "step": step, "predicted_drop": predicted_drop,
        "measured_loss": measured_loss if _finite(measured_loss) else None, "measured_drop": drop,
        "relative_drop": drop / abs(loss) if _finite(drop) and loss else None,
        "descends": None if measured is None else bool(measured and _descends(predicted_drop, loss)),
    }


def towards_next_record(label: str, loss: float, next_loss: float, first_order_drop: float,
                        barrier: Optional[float]) -> dict[str, Any]:
    """The evidence of the path to the next checkpoint (full-data losses at both ends, the slope ``-G . delta``).

    ``descends`` is True when the next checkpoint's loss is lower by more than :data:`DESCENT_FRACTION` and the
    first-order drop ``-G . (theta_next - theta)`` accounts for at least half of that fall.

    Example:
        >>> towards_next_record("b.ckpt", 1.0, 0.5, first_order_drop=0.0, barrier=0.0)["descends"]  # curvature only
        False
    """
    drop = loss - next_loss if _finite(loss) and _finite(next_loss) else None
    falls = _descends(drop, loss)
    first_order = _finite(first_order_drop) and falls is not None and first_order_drop >= 0.5 * drop
    return {
        "to": label, "loss": loss, "next_loss": next_loss, "drop": drop,
        "relative_drop": drop / abs(loss) if _finite(drop) and loss else None,
        "first_order_drop": first_order_drop if _finite(first_order_drop) else None,
        "barrier": barrier if _finite(barrier) else None,
        "descends": None if falls is None else bool(falls and first_order),
    }


def norm_test_record(evidence: Any) -> dict[str, Any]:
    """The zero-gradient evidence classify_point used: ``|G|^2`` against one batch's noise ``tr(Sigma) / B``."""
    g2, noise, b = evidence.grad_sq_norm_unbiased, evidence.grad_noise_trace, evidence.batch_size
    return {
        "grad_norm": evidence.grad_norm, "grad_sq_norm": g2, "trace_sigma": noise, "batch_size": b,
        "noise_per_batch": noise / b if _finite(noise) and b else None, "grad_snr": evidence.grad_snr,
        "noise_batches": evidence.grad_noise_batches,
    }


def _descent(line: Optional[Mapping[str, Any]], towards_next: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Why the point still descends (None when neither test shows it)."""
    if line is not None and line.get("descends"):
        return (f"not a critical point: still descending: along the full-data gradient the loss falls from "
                f"{_g(line['measured_loss'] + line['measured_drop'])} to {_g(line['measured_loss'])} "
                f"({_g(100 * line['relative_drop'])}%) at t = {_g(line['step'])} (|G| = {_g(line['grad_norm'])}, "
                f"curvature along it {_g(line['curvature'])}, predicted drop {_g(line['predicted_drop'])})")
    if towards_next is not None and towards_next.get("descends"):
        return (f"not a critical point: still descending: on the way to {towards_next['to']} the full-data loss "
                f"falls from {_g(towards_next['loss'])} to {_g(towards_next['next_loss'])} "
                f"({_g(100 * towards_next['relative_drop'])}%), first-order drop -G.delta = "
                f"{_g(towards_next['first_order_drop'])}")
    return None


def gate(classified: Any, norm: Mapping[str, Any], line: Optional[Mapping[str, Any]],
         towards_next: Optional[Mapping[str, Any]]) -> tuple[str, str]:
    """The state of a point given classify_point's verdict ``classified`` (a Diagnosis or None) and the descent
    tests, and why.

    Returns:
        ``(state, reason)``. ``state`` is ``classified.kind`` when the verdict stands; ``"descending"`` when the
        loss still falls (a minimum or saddle verdict is then withdrawn; a plateau verdict is kept, slow descent
        being what a plateau is) or, without a verdict, when the gradient is not statistically zero by a norm test
        on at least :data:`~optdiag.diagnosis.classify.MIN_GRADIENT_PAIRS` batches; else ``"undecided"``.

    Example:
        >>> gate(None, {"grad_norm": 0.0}, None, None)[0]
        'undecided'
    """
    descent = _descent(line, towards_next)
    if classified is None:
        if descent is not None:
            return "descending", descent
        snr, batches = norm.get("grad_snr"), norm.get("noise_batches") or 0
        if snr is not None and snr > 1 and batches >= MIN_GRADIENT_PAIRS:
            return "descending", (f"not a critical point: the full-data gradient is not statistically zero (|G| = "
                                  f"{_g(norm.get('grad_norm'))}, |G|^2 / (tr(Sigma)/B) = {_g(snr)} > 1 on "
                                  f"{batches} batches)")
        why = ("the gradient noise was not measured" if snr is None else
               f"|G|^2 / (tr(Sigma)/B) = {_g(snr)} on {batches} batch{'es' if batches != 1 else ''}")
        fall = ("" if line is None or line.get("relative_drop") is None else
                f" ({_g(100 * line['relative_drop'])}% at t = {_g(line['step'])})")
        return "undecided", (f"undecided: no verdict from the gradient evidence (|G| = {_g(norm.get('grad_norm'))}, "
                             f"{why}), and the loss falls by less than {100 * DESCENT_FRACTION:g}% along the "
                             f"gradient{fall}")
    if classified.kind not in ("local_minimum", "saddle_point"):
        return classified.kind, f"{classified.kind.replace('_', ' ')}: kept (slow descent is what a plateau is)"
    if descent is not None:
        return "descending", descent
    return classified.kind, (f"{classified.kind.replace('_', ' ')}: the loss does not fall by more than "
                             f"{100 * DESCENT_FRACTION:g}% along the gradient"
                             + (" or towards the next checkpoint" if towards_next is not None else ""))


def _span(first: Mapping[str, Any], last: Mapping[str, Any]) -> str:
    if first.get("step") is not None and last.get("step") is not None:
        return f"steps {first['step']}-{last['step']}" if first is not last else f"step {first['step']}"
    return f"{first['label']}-{last['label']}" if first is not last else str(first["label"])


def tell_story(rows: Sequence[Mapping[str, Any]], barriers: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Group consecutive checkpoints into phases.

    Args:
        rows: one mapping per checkpoint in order, with ``label``, ``step``, ``loss``, ``point_type``,
            ``lambda_min`` and ``lambda_max``.
        barriers: mappings with ``from``, ``to`` (labels) and ``barrier``, for the consecutive pairs measured.

    Returns:
        ``{"text", "final", "phases": [{"state", "point_type", "checkpoints", "first_step", "last_step",
        "loss_start", "loss_end", "lambda_min", "max_barrier", "text"}]}``. A phase runs from its first checkpoint to
        the first checkpoint of the next phase (its own last one for the final phase).

    Example:
        >>> rows = [dict(label=f"{s}.ckpt", step=s, loss=l, point_type=p, lambda_min=1.0, lambda_max=2.0)
        ...         for s, l, p in [(0, 2.3, "not_critical"), (500, 0.4, "not_critical"), (900, 0.39, "local_minimum")]]
        >>> tell_story(rows)["text"]
        'steps 0-900: descending (loss 2.3 -> 0.39); step 900: minimum (loss 0.39, lambda_min 1); final: minimum'
    """
    if not rows:
        return {"text": "", "final": None, "phases": []}
    barrier_of = {(b.get("from"), b.get("to")): b.get("barrier") for b in barriers}
    groups: list[list[int]] = [[0]]
    splits: dict[int, float] = {}
    for i in range(1, len(rows)):
        prev, row = rows[i - 1], rows[i]
        same = row["point_type"] == prev["point_type"]
        barrier = barrier_of.get((prev["label"], row["label"]))
        level = max(abs(prev["loss"]) if _finite(prev["loss"]) else 0.0,
                    abs(row["loss"]) if _finite(row["loss"]) else 0.0)
        basin_change = (row["point_type"] != "not_critical" and _finite(barrier)
                        and barrier > DESCENT_FRACTION * level and barrier > 0)
        if same and not basin_change:
            groups[-1].append(i)
        else:
            if same:
                splits[i] = barrier
            groups.append([i])
    phases = []
    for n, group in enumerate(groups):
        first, last = rows[group[0]], rows[group[-1]]
        end = rows[groups[n + 1][0]] if n + 1 < len(groups) else last
        kind = first["point_type"]
        state = STATES.get(kind, kind)
        loss_a, loss_b = first["loss"], end["loss"]
        losses = f"loss {_g(loss_a)}" + ("" if end is first else f" -> {_g(loss_b)}")
        lam = [rows[i]["lambda_min"] for i in group if _finite(rows[i].get("lambda_min"))]
        detail = losses
        if kind in ("local_minimum", "saddle_point") and lam:
            detail += f", lambda_min {_g(min(lam))}"
        inside = [barrier_of.get((rows[a]["label"], rows[b]["label"])) for a, b in zip(group, group[1:])]
        inside = [b for b in inside if _finite(b)]
        if group[0] in splits:
            detail += f"; a barrier of {_g(splits[group[0]])} separates it from the previous one"
        text = f"{_span(first, end)}: {state}"
        text += f" ({detail})"
        phases.append({
            "state": state, "point_type": kind, "checkpoints": [rows[i]["label"] for i in group],
            "first_step": first.get("step"), "last_step": end.get("step"),
            "loss_start": loss_a, "loss_end": loss_b, "lambda_min": min(lam) if lam else None,
            "max_barrier": max(inside) if inside else None, "text": text,
        })
    final = STATES.get(rows[-1]["point_type"], rows[-1]["point_type"])
    return {"text": "; ".join(p["text"] for p in phases) + f"; final: {final}", "final": final, "phases": phases}
