"""``TriageMonitor``: where the run sits on the map of training and validation loss (docs/triage.md).

At each validation end (and once more when training ends) it reads the training and validation losses the
LightningModule logs (``trainer.callback_metrics``), the stall verdicts of a :class:`StallDiagnoser` and the
sharpness and gradient noise of a :class:`HessianMonitor`, and asks :func:`optdiag.diagnosis.triage.triage` where
the run stands: model bias, an optimization problem, overfitting, or a train/validation mismatch to check. Each
finding is said once per fit: it is appended to :attr:`TriageMonitor.findings`, to ``events.jsonl`` (a line with
``"record": "finding"``), to a TensorBoard text panel (``optdiag/triage``) and to the end-of-fit summary.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from optdiag.callbacks._base import OptDiagCallback, batch_size_of, global_step, step_loss_of
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.callbacks.stall import StallDiagnoser, _dataset_size
from optdiag.diagnosis.triage import (
    OPTIMIZATION_VERDICTS,
    Finding,
    TriageInputs,
    needs_validation,
    triage,
)
from optdiag.errors import UsageError
from optdiag.policy import Measurements, check_number
from optdiag.sinks import tensorboard as tensorboard_sink

__all__ = ["TriageMonitor", "write_finding", "TRAIN_METRICS", "VAL_METRICS", "TEXT_TAG"]

#: The training-loss names looked for, in order (``*_epoch``: Lightning's epoch mean of a metric logged with
#: ``on_epoch=True``, steadier than the last step's value).
TRAIN_METRICS = ("train_loss_epoch", "train_loss", "training_loss", "loss_epoch", "loss")
#: The validation-loss names looked for, in order.
VAL_METRICS = ("val_loss", "validation_loss", "valid_loss", "val_loss_epoch", "val/loss")
TEXT_TAG = "optdiag/triage"
#: Stall verdicts the triage reads (a divergence or a spike says nothing about bias or overfitting).
_TRIAGED_VERDICTS = OPTIMIZATION_VERDICTS + ("local_minimum",)


def write_finding(callback: OptDiagCallback, trainer: Any, finding: Finding) -> None:
    """Write one finding where findings go: an ``events.jsonl`` line with ``"record": "finding"`` and a TensorBoard
    text panel under :data:`TEXT_TAG` (global rank 0 only). The one writer for every callback that finds something.
    """
    if not trainer.is_global_zero:
        return
    callback._append_event(trainer, {"record": "finding", **finding.to_dict()})
    tb = callback.tensorboard_logger(trainer)
    if tb is not None:
        tensorboard_sink.log_text(tb, TEXT_TAG, finding.to_markdown(), finding.step)


def _names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(v, str) and v.strip() for v in value):
        raise UsageError(f"{name} must be a metric name or a non-empty sequence of names, got {value!r}")
    return tuple(value)


class TriageMonitor(OptDiagCallback):
    """Model bias or optimization, overfitting or mismatch: the lecture's triage from the losses already logged.

    At each validation end it reads the first of ``val_metrics`` found in ``trainer.callback_metrics``, and as the
    training loss the mean of the losses ``training_step`` returned since the previous validation end: Lightning
    aggregates a metric logged with ``on_epoch=True`` only after the epoch-end validation, so the logged epoch
    value lags a whole epoch there. Where ``training_step`` returns no loss (manual optimization), the first of
    ``train_metrics`` logged is read instead. With no validation loss, it says once what it needs (a ``needs_validation`` finding)
    and otherwise stays silent on overfitting; the training-loss branch (model bias or optimization) needs only the
    stall verdicts and runs at the end of training either way. The rules, thresholds and their reasons are in
    ``docs/triage.md``; nothing is claimed where a test's numbers do not support it.

    Args:
        train_metrics: training-loss names to look for, in order, when ``training_step`` returns no loss
            (default :data:`TRAIN_METRICS`).
        val_metrics: validation-loss names to look for, in order (default :data:`VAL_METRICS`).
        loss_floor: the loss a perfect model reaches (0 for cross-entropy and squared errors); "high" and "low"
            are shares of the distance from the initial loss to it.
        verbose: print the findings when training ends (rank 0).
        stall_diagnoser: the diagnoser whose verdicts to read (default: the one in ``trainer.callbacks``, or
            none: then the training-loss branch is silent).
        hessian_monitor: where the sharpness and gradient noise come from (default: the stall diagnoser's, or the
            one in ``trainer.callbacks``).

    Attributes:
        findings: every finding so far, oldest first.

    Example:
        >>> import optdiag, pytorch_lightning as pl
        >>> triage_cb = optdiag.TriageMonitor(val_metrics="val_loss")
        >>> trainer = pl.Trainer(callbacks=[optdiag.StallDiagnoser(), triage_cb])  # doctest: +SKIP
        >>> trainer.fit(model, data)  # doctest: +SKIP
        >>> [(f.step, f.kind) for f in triage_cb.findings]  # doctest: +SKIP
    """

    def __init__(
        self,
        train_metrics: Sequence[str] | str = TRAIN_METRICS,
        val_metrics: Sequence[str] | str = VAL_METRICS,
        *,
        loss_floor: float = 0.0,
        verbose: bool = True,
        stall_diagnoser: StallDiagnoser | None = None,
        hessian_monitor: HessianMonitor | None = None,
    ) -> None:
        super().__init__()
        self.train_metrics = _names("train_metrics", train_metrics)
        self.val_metrics = _names("val_metrics", val_metrics)
        self.loss_floor = check_number("loss_floor", loss_floor)
        if stall_diagnoser is not None and not isinstance(stall_diagnoser, StallDiagnoser):
            raise UsageError(f"stall_diagnoser must be a StallDiagnoser, got {type(stall_diagnoser).__name__}")
        if hessian_monitor is not None and not isinstance(hessian_monitor, HessianMonitor):
            raise UsageError(f"hessian_monitor must be a HessianMonitor, got {type(hessian_monitor).__name__}")
        self.verbose = bool(verbose)
        self._given = (stall_diagnoser, hessian_monitor)
        self.stall_diagnoser, self.hessian_monitor = stall_diagnoser, hessian_monitor
        self.findings: list[Finding] = []
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.loss_initial: float | None = None
        self.said_needs_validation = False
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._findings_at_fit_start = len(self.findings)
        self._kinds_this_fit: set[str] = set()
        self._batch_size: int | None = None
        self._dataset_size: int | None = None
        self._loss_sum, self._loss_count = 0.0, 0  # the training losses since the last validation end

    def _state_key_arguments(self) -> dict[str, Any]:
        return {"val_metrics": list(self.val_metrics)}

    # --- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.check_strategy(trainer)
        given_stall, given_hessian = self._given
        callbacks = list(getattr(trainer, "callbacks", []))
        found = [c for cb in callbacks for c in (cb, *getattr(cb, "children", ()))]
        self.stall_diagnoser = given_stall or next((c for c in found if isinstance(c, StallDiagnoser)), None)
        self.hessian_monitor = given_hessian or getattr(self.stall_diagnoser, "hessian_monitor", None) or next(
            (c for c in found if isinstance(c, HessianMonitor)), None)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_transient()
        if self.train and global_step(trainer) < self.train[-1][0]:  # a new run from step 0, not a resume
            self.train, self.val, self.loss_initial = [], [], None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_size is None:
            self._batch_size = batch_size_of(batch)
            self._dataset_size = _dataset_size(trainer, self._batch_size)
        self.set_hook_idle("on_train_batch_start", self._batch_size is not None)  # known: nothing more to do

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = step_loss_of(trainer, pl_module, outputs)
        if loss is None or not math.isfinite(loss):
            return  # no scalar loss, or a diverging step (the stall diagnoser reports it): not averaged
        if self.loss_initial is None:
            self.loss_initial = loss  # at initialisation the training loss is also the validation loss
        self._loss_sum += loss
        self._loss_count += 1

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        step = global_step(trainer)
        metrics = dict(getattr(trainer, "callback_metrics", {}) or {})
        val = self._metric(metrics, self.val_metrics)
        train = self._loss_sum / self._loss_count if self._loss_count else self._metric(metrics, self.train_metrics)
        self._loss_sum, self._loss_count = 0.0, 0
        if val is None:
            if not self.said_needs_validation:
                self.said_needs_validation = True
                self.emit(trainer, needs_validation(step, self.val_metrics, list(metrics)))
            return
        if train is not None and (not self.val or self.val[-1][0] != step):
            self.train.append((step, train))
            self.val.append((step, val))
        self._triage(trainer, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.val and not self.said_needs_validation:
            self.said_needs_validation = True
            metrics = list(getattr(trainer, "callback_metrics", {}) or {})
            self.emit(trainer, needs_validation(global_step(trainer), self.val_metrics, metrics))
        self._triage(trainer, global_step(trainer))
        if self.verbose and trainer.is_global_zero:
            print(self.summary(), flush=True)

    # --- the triage -------------------------------------------------------------------------------------------------
    @staticmethod
    def _metric(metrics: dict[str, Any], names: tuple[str, ...]) -> float | None:
        """The first of ``names`` logged, as a finite float (a non-finite one is not a usable loss: None)."""
        for name in names:
            if name in metrics:
                return Measurements().number(name, metrics[name])
        return None

    def _verdict(self) -> Any:
        """The latest stall verdict of a triaged kind whose prediction was not refuted (None if none)."""
        diagnoses = getattr(self.stall_diagnoser, "diagnoses", None) or []
        for diagnosis in reversed(diagnoses):
            if diagnosis.kind in _TRIAGED_VERDICTS:
                outcome = (diagnosis.evidence.get("outcome") or {}).get("outcome")
                return None if outcome == "refuted" else diagnosis
        return None

    def _curvature(self) -> tuple[list[tuple[int, float]], float | None]:
        """The ``lambda_max`` snapshots and the latest gradient noise scale ``tr(Sigma) / |G|^2``."""
        history = getattr(self.hessian_monitor, "history", None) or []
        sharpness, b_simple = [], None
        for snap in history:
            lam = snap.get("lambda_max")
            if lam is not None and math.isfinite(lam):
                sharpness.append((int(snap["step"]), float(lam)))
            g2, noise = snap.get("probe_grad_sq_unbiased"), snap.get("grad_noise_trace")
            if g2 is not None and noise is not None and g2 > 0 and math.isfinite(noise):
                b_simple = noise / g2
        return sharpness, b_simple

    def inputs(self, step: int) -> TriageInputs:
        """The numbers the triage reads now (see :class:`~optdiag.diagnosis.triage.TriageInputs`)."""
        sharpness, b_simple = self._curvature()
        return TriageInputs(step=step, train=list(self.train), val=list(self.val), loss_initial=self.loss_initial,
                            loss_floor=self.loss_floor, verdict=self._verdict(), sharpness=sharpness,
                            batch_size=self._batch_size, b_simple=b_simple, dataset_size=self._dataset_size,
                            input_findings={f.kind: f.summary for f in self.findings
                                            if f.kind in ("ill_conditioning", "loss_choice")})

    def _triage(self, trainer: Any, step: int) -> None:
        for finding in triage(self.inputs(step)):
            if finding.kind not in self._kinds_this_fit:
                self.emit(trainer, finding)

    def emit(self, trainer: Any, finding: Finding) -> None:
        """Record a finding (this monitor's or another callback's): :attr:`findings`, the end-of-fit summary,
        ``events.jsonl`` and TensorBoard (:func:`write_finding`)."""
        self._kinds_this_fit.add(finding.kind)
        self.findings.append(finding)
        write_finding(self, trainer, finding)

    def summary(self) -> str:
        """One line per finding of the last fit, with its first recommendation.

        Example:
            >>> print(TriageMonitor().summary())
            optdiag triage: nothing to report.
        """
        new = self.findings[self._findings_at_fit_start:]
        if not new:
            return "optdiag triage: nothing to report."
        lines = [f"optdiag triage: {len(new)} finding{'s' if len(new) != 1 else ''}:"]
        for f in new:
            first = f.recommendations[0].action if f.recommendations else "no action"
            lines.append(f"  step {f.step:>6}  {f.kind:<13}  confidence {f.confidence:.2f}  {f.summary}  -> {first}")
            lines += [f"  {'':>11}  {s.target}: {s.action} ({s.current:g} -> {s.proposed:g})"
                      for s in f.suggestions if s.target == "batch_size" and None not in (s.current, s.proposed)]
        return "\n".join(lines)

    # --- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "train": [list(p) for p in self.train],
            "val": [list(p) for p in self.val],
            "loss_initial": self.loss_initial,
            "said_needs_validation": self.said_needs_validation,
            "warning_counts": dict(self.warning_counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.findings = [Finding.from_dict(f) for f in state_dict.get("findings", [])]
        self.train = [(int(s), float(v)) for s, v in state_dict.get("train", [])]
        self.val = [(int(s), float(v)) for s, v in state_dict.get("val", [])]
        self.loss_initial = state_dict.get("loss_initial")
        self.said_needs_validation = bool(state_dict.get("said_needs_validation", False))
        self.warning_counts = dict(state_dict.get("warning_counts", {}))
        self._reset_transient()
