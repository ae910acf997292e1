"""``ConditioningMonitor``: unscaled inputs and mean squared error on probabilities, measured at almost no cost.

Glue between Lightning and :mod:`optdiag.curvature.conditioning` (the measurements) and
:mod:`optdiag.diagnosis.conditioning` (the rules); ``docs/conditioning.md`` has the reasoning. Its findings go to
the :class:`~optdiag.callbacks.TriageMonitor` when one runs (its ``findings``, ``events.jsonl``, the TensorBoard
text panel and its summary), otherwise through the same sinks from here.
"""

from __future__ import annotations

from typing import Any

import torch

from optdiag.callbacks._base import OptDiagCallback, global_step
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.callbacks.stall import StallDiagnoser
from optdiag.callbacks.triage import TriageMonitor, write_finding
from optdiag.curvature.conditioning import (
    LOSS_DECLARATIONS,
    InputScaleProbe,
    LossGraph,
    inspect_loss_graph,
    saturation_statistics,
)
from optdiag.diagnosis.conditioning import (
    curvature_evidence,
    ill_conditioning_finding,
    input_scale_evidence,
    loss_choice_finding,
)
from optdiag.diagnosis.triage import Finding
from optdiag.errors import UsageError
from optdiag.policy import check_number

__all__ = ["ConditioningMonitor"]


class ConditioningMonitor(OptDiagCallback):
    """Unscaled inputs (``ill_conditioning``) and MSE on softmax/sigmoid outputs (``loss_choice``), each said once
    per fit with its numbers.

    **Inputs.** On the first training batches (until ``input_samples`` samples or ``input_batches`` batches) a
    forward pre-hook reads what the first layer with parameters receives: the per-feature mean, standard deviation
    and share of zeros; then the hooks are removed. The rule (:func:`~optdiag.diagnosis.conditioning.
    ill_conditioning_finding`) is applied at the first stall the :class:`StallDiagnoser` detects, at a validation
    end or when training ends, whichever comes first, with the per-layer curvature the :class:`HessianMonitor`'s
    latest snapshots hold (trace shares, where the sharpest direction lies).

    **Loss.** ``loss="auto"`` reads the autograd graph of the loss handed to ``backward`` (Lightning's
    ``on_before_backward``: the graph is complete and nothing is computed) for a squared error of softmax or sigmoid
    outputs. Found at the first step, it is read again every ``graph_every`` steps for the saturation of the saved
    probabilities; not found, it is never read again. ``loss="mse_on_probabilities"`` declares it (a hand-written
    squared error is then accepted too); ``loss="other"`` switches the check off. The finding needs the stall
    detector to find the loss stalled (a high plateau), so it needs a :class:`StallDiagnoser` (the ``OptDiag``
    bundle has one).

    **Cost and harm.** The hooks read tensors already computed; no Hessian product, no random number, no parameter
    or gradient touched (``tests/test_do_no_harm.py``).

    Args:
        loss: what the loss is: ``"auto"``, ``"mse_on_probabilities"`` or ``"other"``.
        input_batches: the most training batches whose inputs are measured.
        input_samples: stop measuring inputs after this many samples (rows; positions for a convolution).
        graph_every: steps between two readings of the loss graph (once it showed a squared error of probabilities).
        verbose: print the findings when training ends, when no ``TriageMonitor`` does (rank 0).
        stall_diagnoser, hessian_monitor, triage_monitor: the callbacks to read and report through (default: found
            among the trainer's callbacks and the bundles' children; each may be absent).

    Attributes:
        findings: every finding so far, oldest first.
        inputs: the last input measurement (:meth:`InputScaleProbe.result`), or None.
        loss_graph: ``{"kind", "squared_error", "step", **saturation statistics}`` of the last reading, or None.

    Example:
        >>> import optdiag, pytorch_lightning as pl
        >>> cb = ConditioningMonitor()
        >>> trainer = pl.Trainer(callbacks=[optdiag.StallDiagnoser(), cb])  # doctest: +SKIP
        >>> trainer.fit(model, data); [f.kind for f in cb.findings]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        loss: str = "auto",
        input_batches: int = 8,
        input_samples: int = 256,
        graph_every: int = 10,
        verbose: bool = True,
        stall_diagnoser: StallDiagnoser | None = None,
        hessian_monitor: HessianMonitor | None = None,
        triage_monitor: TriageMonitor | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSS_DECLARATIONS:
            raise UsageError(f"loss must be one of {', '.join(map(repr, LOSS_DECLARATIONS))}, got {loss!r}")
        for name, value in (("input_batches", input_batches), ("input_samples", input_samples),
                            ("graph_every", graph_every)):
            check_number(name, value, low=1, integer=True, what="an int >= 1")
        for name, value, kind in (("stall_diagnoser", stall_diagnoser, StallDiagnoser),
                                  ("hessian_monitor", hessian_monitor, HessianMonitor),
                                  ("triage_monitor", triage_monitor, TriageMonitor)):
            if value is not None and not isinstance(value, kind):
                raise UsageError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        self.loss, self.input_batches, self.input_samples = loss, input_batches, input_samples
        self.graph_every, self.verbose = graph_every, bool(verbose)
        self._given = (stall_diagnoser, hessian_monitor, triage_monitor)
        self.stall_diagnoser, self.hessian_monitor, self.triage_monitor = stall_diagnoser, hessian_monitor, triage_monitor
        self.findings: list[Finding] = []
        self._reset_fit()

    def _reset_fit(self) -> None:
        self.inputs: dict[str, Any] | None = None
        self.loss_graph: dict[str, Any] | None = None
        self._probe: InputScaleProbe | None = None
        self._graph_off = self.loss == "other"
        self._next_graph_step = 0
        self._said: set[str] = set()
        self._findings_at_fit_start = len(self.findings)

    # --- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.check_strategy(trainer)
        given_stall, given_hessian, given_triage = self._given
        found = [c for cb in getattr(trainer, "callbacks", []) for c in (cb, *getattr(cb, "children", ()))]
        first = lambda kind: next((c for c in found if isinstance(c, kind)), None)  # noqa: E731
        self.stall_diagnoser = given_stall or first(StallDiagnoser)
        self.hessian_monitor = given_hessian or getattr(self.stall_diagnoser, "hessian_monitor", None) \
            or first(HessianMonitor)
        self.triage_monitor = given_triage or first(TriageMonitor)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._close_probe()
        self._reset_fit()
        self._probe = InputScaleProbe(pl_module, max_batches=self.input_batches, min_samples=self.input_samples)
        self.set_hook_idle("on_train_batch_start", False)  # arms the input probe until it has its batches
        self.set_hook_idle("on_before_backward", self._graph_off)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._probe is not None and not self._probe.done:
            self._probe.arm()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        step = global_step(trainer)
        if self._graph_off or step < self._next_graph_step or not isinstance(loss, torch.Tensor):
            return
        graph = inspect_loss_graph(loss, self.loss)
        self._next_graph_step = step + self.graph_every
        if graph.kind is None and self.loss == "auto":
            self._graph_off = True  # the loss function does not change within a fit: no need to look again
            self.set_hook_idle("on_before_backward")
        self.loss_graph = self._graph_record(graph, step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._probe is not None and not self._probe.done:
            self._probe.disarm()
            if self._probe.done:
                self._take_inputs()
                self.set_hook_idle("on_train_batch_start")  # nothing left to arm in this fit
        detector = getattr(self.stall_diagnoser, "detector", None)
        if detector is not None and detector.stalled:
            self._check(trainer, global_step(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not getattr(trainer, "sanity_checking", False):
            self._check(trainer, global_step(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close_probe()
        self._check(trainer, global_step(trainer))
        if self.verbose and self.triage_monitor is None and trainer.is_global_zero:
            print(self.summary(), flush=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close_probe()

    # --- measurements ---------------------------------------------------------------------------------------------
    def _close_probe(self) -> None:
        probe = self._probe
        if probe is not None and not probe.done:
            probe.close()
        if probe is not None and self.inputs is None:
            self._take_inputs()

    def _take_inputs(self) -> None:
        self.inputs = self._probe.result()

    @staticmethod
    def _graph_record(graph: LossGraph, step: int) -> dict[str, Any]:
        return {"kind": graph.kind, "squared_error": graph.squared_error, "step": step,
                **saturation_statistics(graph)}

    def _curvature(self) -> dict[str, Any]:
        """Per-layer curvature from the Hessian monitor's newest snapshot that has it."""
        first = (self.inputs or {}).get("layer")
        traces = tops = None
        for snap in reversed(getattr(self.hessian_monitor, "history", None) or []):
            traces = traces or snap.get("hessian_trace_blocks")
            tops = tops or snap.get("lambda_max_blocks")
            if traces and tops:
                break
        sizes = getattr(self.hessian_monitor, "parameter_blocks", None)
        return curvature_evidence(traces, first, sizes, tops)

    def _stalled(self) -> float | None:
        detector = getattr(self.stall_diagnoser, "detector", None)
        return None if detector is None else float(bool(detector.stalled))

    # --- findings -------------------------------------------------------------------------------------------------
    def _check(self, trainer: Any, step: int) -> None:
        if "ill_conditioning" not in self._said and self.inputs is not None and self.inputs.get("stds"):
            self._said.add("ill_conditioning")  # judged once per fit, on the first chance, with what is known then
            evidence = input_scale_evidence(self.inputs["means"], self.inputs["stds"], self.inputs["zero_share"],
                                            layer=self.inputs["layer"], samples=self.inputs["samples"])
            finding = ill_conditioning_finding(step, evidence, self._curvature())
            if finding is not None:
                self._emit(trainer, finding)
        graph = self.loss_graph
        if "loss_choice" not in self._said and graph is not None and (graph["kind"] or self.loss != "auto"):
            finding = loss_choice_finding(step, graph["kind"], graph, self._stalled(), declared=self.loss,
                                          squared_error=graph["squared_error"])
            if finding is not None:
                self._said.add("loss_choice")
                self._emit(trainer, finding)

    def _emit(self, trainer: Any, finding: Finding) -> None:
        self.findings.append(finding)
        if self.triage_monitor is not None:
            self.triage_monitor.emit(trainer, finding)  # its findings, events.jsonl, TensorBoard and summary
        else:
            write_finding(self, trainer, finding)

    def summary(self) -> str:
        """One line per finding of the last fit, with its first recommendation.

        Example:
            >>> print(ConditioningMonitor().summary())
            optdiag conditioning: nothing to report.
        """
        new = self.findings[self._findings_at_fit_start:]
        if not new:
            return "optdiag conditioning: nothing to report."
        lines = [f"optdiag conditioning: {len(new)} finding{'s' if len(new) != 1 else ''}:"]
        lines += [f"  step {f.step:>6}  {f.kind:<16}  confidence {f.confidence:.2f}  {f.summary}  -> "
                  f"{f.recommendations[0].action}" for f in new]
        return "\n".join(lines)

    # --- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings], "warning_counts": dict(self.warning_counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.findings = [Finding.from_dict(f) for f in state_dict.get("findings", [])]
        self.warning_counts = dict(state_dict.get("warning_counts", {}))
        self._findings_at_fit_start = len(self.findings)
