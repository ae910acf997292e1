"""What the optdiag tab shows for one run, from the run's scalars and its ``events.jsonl`` (no TensorBoard here).

Two sources, each the source of truth for what it holds (docs/tensorboard-tab.md says why):

* **Time series** (the loss, ``optdiag/lambda_max``, ``optdiag/stability_threshold``, ...) come from the run's
  TensorBoard event files, through TensorBoard's data provider: that is where they are logged, and the only place
  that has them step by step.
* **Verdicts** come from ``<run>/optdiag/events.jsonl``: one :meth:`Diagnosis.to_dict` per line, exact numbers
  (the evidence, the confidence, the suggestions with their current and proposed values), the
  ``{"record": "outcome", ...}`` lines with what happened after each prediction, and the triage's
  ``{"record": "finding", ...}`` lines (:class:`~optdiag.diagnosis.triage.Finding`). The text panels
  (``optdiag/diagnosis``, ``optdiag/triage``) hold the same rendered as Markdown, for reading, not for parsing.

Example:
    >>> view = run_view("demo", {"train_loss": [(0, 2.0), (10, 1.0)], "optdiag/lambda_max": [(10, 9.0)]}, [])
    >>> view["loss"]["tag"], view["series"]["lambda_max"], view["verdicts"], view["findings"]
    ('train_loss', [[10, 9.0]], [], [])
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from optdiag.diagnosis.triage import Finding
from optdiag.diagnosis.types import Diagnosis, to_jsonable
from optdiag.errors import OptDiagError

__all__ = ["PREFIX", "SERIES", "SNAPSHOT_REASONS", "TEXT_TAG", "loss_tag", "events_view", "run_view"]

PREFIX = "optdiag/"
#: The curvature series the tab draws, as logged by HessianMonitor (``optdiag/<name>``).
SERIES = ("lambda_max", "lambda_min", "stability_threshold", "preconditioned_lambda_max", "stability_ratio",
          "critical_sharpness")
#: Snapshots a verdict asked for log under ``optdiag/<reason>/...`` (callbacks/hessian.py): their steps are marked.
SNAPSHOT_REASONS = ("stall", "spike", "divergence")
TEXT_TAG = "optdiag/diagnosis"
# The training loss is whatever the LightningModule logs; these names are tried first, in this order.
_LOSS_NAMES = ("train_loss", "loss", "train/loss", "train_loss_step", "training_loss", "loss/train", "train_loss_epoch")
_NOT_TRAINING = re.compile(r"val|test|valid|eval", re.IGNORECASE)

Points = Sequence[tuple[int, float]]


def loss_tag(tags: Iterable[str]) -> str | None:
    """The scalar tag that holds the training loss: a usual name, else the first tag with "loss" in it that is not
    optdiag's nor a validation or test loss.

    Example:
        >>> loss_tag(["val_loss", "optdiag/probe_loss", "my_loss", "epoch"])
        'my_loss'
        >>> loss_tag(["loss", "train_loss"]), loss_tag(["epoch"])
        ('train_loss', None)
    """
    tags = sorted(tags)
    for name in _LOSS_NAMES:
        if name in tags:
            return name
    return next((t for t in tags if "loss" in t.lower() and not t.startswith(PREFIX) and not _NOT_TRAINING.search(t)),
                None)


def events_view(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The verdicts and findings of an ``events.jsonl``, oldest first, each verdict with its retrospective outcome.

    Returns:
        ``verdicts``: each :meth:`Diagnosis.to_dict` plus ``key_evidence`` (the names
        :meth:`Diagnosis.key_evidence` shows first) and ``outcome`` (the outcome line's fields, or None while the
        prediction is open); ``findings``: each :meth:`Finding.to_dict`; ``unreadable``: how many records are none
        of these (a line from another version of optdiag, say), left out.

    Example:
        >>> d = Diagnosis(5, "plateau", 0.9, {"grad_norm": 2.0}, [], "Flat.").to_dict()
        >>> out = {"record": "outcome", "verdict_step": 5, "kind": "plateau", "outcome": "confirmed"}
        >>> view = events_view([d, out, {"what": 1}])
        >>> view["verdicts"][0]["key_evidence"], view["verdicts"][0]["outcome"]["outcome"], view["unreadable"]
        (['grad_norm'], 'confirmed', 1)
    """
    verdicts: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    outcomes: dict[tuple[Any, Any], dict[str, Any]] = {}
    unreadable = 0
    for record in records:
        kind = record.get("record")
        if kind == "outcome":
            outcomes[(record.get("verdict_step"), record.get("kind"))] = dict(record)
            continue
        fields = {k: v for k, v in record.items() if k != "record"}
        try:
            if kind == "finding":
                findings.append(Finding.from_dict(fields).to_dict())
            elif kind is None:
                diagnosis = Diagnosis.from_dict(fields)
                verdicts.append({**diagnosis.to_dict(), "key_evidence": list(diagnosis.key_evidence())})
            else:
                unreadable += 1
        except (OptDiagError, KeyError, TypeError, ValueError):
            unreadable += 1
    for verdict in verdicts:
        verdict["outcome"] = outcomes.get((verdict["step"], verdict["kind"]))
    return {"verdicts": verdicts, "findings": findings, "unreadable": unreadable}


def _points(values: Points) -> list[list[float]]:
    return [[int(step), float(value)] for step, value in values]


def run_view(run: str, scalars: Mapping[str, Points], records: Sequence[Mapping[str, Any]] | None, *,
             text_verdicts: bool = False) -> dict[str, Any]:
    """Everything the tab draws for one run, JSON-safe (non-finite numbers as ``"nan"``, ``"inf"``, ``"-inf"``).

    Args:
        run: the run's name in TensorBoard.
        scalars: ``{tag: [(step, value), ...]}`` of the run's scalars, each sorted by step.
        records: the run's ``events.jsonl`` records, or None when the run folder has no such file.
        text_verdicts: whether the run has optdiag's text panel (verdicts logged, but their file is elsewhere).

    Returns:
        ``run``, ``has_optdiag``, ``message`` (what is missing and why, or None), ``loss`` (``tag`` and
        ``points``, or None), ``series`` (the :data:`SERIES` present, as ``[[step, value], ...]``), ``snapshots``
        (``{reason: [step, ...]}``: the curvature snapshots a stall, spike or divergence asked for, with
        ``lambda_max``/``lambda_min`` points under ``<reason>/lambda_max``... in ``series``), and ``verdicts``,
        ``findings`` and ``unreadable`` (see :func:`events_view`).
    """
    optdiag_tags = [t for t in scalars if t.startswith(PREFIX)]
    has_optdiag = bool(optdiag_tags) or records is not None or text_verdicts
    tag = loss_tag(scalars)
    series = {name: _points(scalars[PREFIX + name]) for name in SERIES if scalars.get(PREFIX + name)}
    snapshots: dict[str, list[int]] = {}
    for reason in SNAPSHOT_REASONS:
        for name in ("lambda_max", "lambda_min"):
            if scalars.get(f"{PREFIX}{reason}/{name}"):
                series[f"{reason}/{name}"] = _points(scalars[f"{PREFIX}{reason}/{name}"])
        steps = scalars.get(f"{PREFIX}{reason}/step") or scalars.get(f"{PREFIX}{reason}/lambda_max") or []
        if steps:
            snapshots[reason] = [int(step) for step, _ in steps]
    events = events_view(records or [])
    message = None
    if not has_optdiag:
        message = ("No optdiag data in this run: no optdiag/ scalars and no optdiag/events.jsonl in its folder. "
                   "Add optdiag.OptDiag() to the Trainer's callbacks, with a TensorBoardLogger.")
    elif records is None and text_verdicts:
        message = ("This run's verdicts are in the Text tab (optdiag/diagnosis), but its optdiag/events.jsonl is not "
                   "in the run's folder: optdiag writes it into the first logger's folder.")
    elif not events["verdicts"]:
        message = "No verdict so far: optdiag has not seen the loss stall, spike or diverge in this run."
    return to_jsonable({
        "run": run,
        "has_optdiag": has_optdiag,
        "message": message,
        "loss": {"tag": tag, "points": _points(scalars[tag])} if tag else None,
        "series": series,
        "snapshots": snapshots,
        **events,
    })
