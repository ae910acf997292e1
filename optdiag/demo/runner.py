"""Run the demo scenarios with :class:`~optdiag.OptDiag`, check what it found against the known truth, report it.

Example:
    >>> from optdiag.demo.runner import run_scenario
    >>> result = run_scenario("minimum", "optdiag_demo/run-1")  # doctest: +SKIP
    >>> result.passed, [d.kind for d in result.runs[0].diagnoses]  # doctest: +SKIP
    (True, ['local_minimum'])
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from optdiag.demo.scenarios import Scenario, ScenarioRun, scenario

__all__ = ["Check", "RunResult", "ScenarioResult", "run_scenario", "format_result", "exact_curvature",
           "quiet_lightning"]

_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric", "lightning")


@dataclass
class Check:
    """One comparison of what optdiag found with the truth: a name, whether it holds, and the numbers."""

    name: str
    ok: bool
    detail: str


@dataclass
class RunResult:
    """What one training run of a scenario produced.

    Attributes:
        label: the run's label inside its scenario.
        diagnoses: the verdicts, oldest first.
        losses: the training loss at every step.
        curvature: the Hessian monitor's snapshots (``step``, ``lambda_max``, ``lambda_min``, ...), oldest first.
        final: exact curvature on the full data set at the end (``lambda_max``, ``lambda_min``, ``hessian_trace``).
        truth: the scenario's known numbers for this run.
        log_dir: the TensorBoard run folder; ``events_file``: its ``optdiag/events.jsonl``.
        seconds: wall time of the run.
        findings: the triage findings, oldest first.
        val_losses: ``(step, validation loss)`` recorded by the module (runs with a validation loop).
        full_loss: the training loss on the full training set at the end (no optdiag involved).
        expected_findings: the triage finding kinds the scenario expects of this run (None: not checked).
        metrics: the scenario's own end-of-run numbers (``ScenarioRun.evaluate``: accuracy, ...), no optdiag involved.
        notes: the warnings raised while the run trained (optdiag's own, and any other but the known harmless
            Lightning ones), as text: the demo prints them as lines of its report, never as raw warnings.
    """

    label: str
    diagnoses: list
    losses: list[float]
    curvature: list[dict[str, Any]]
    final: dict[str, float]
    truth: dict[str, Any]
    log_dir: str
    events_file: str
    seconds: float
    findings: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    full_loss: float | None = None
    expected_findings: tuple[str, ...] | None = None
    metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    """A scenario's runs and the checks of its findings against the truth."""

    scenario: Scenario
    runs: list[RunResult]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def found(self) -> tuple[str, ...]:
        """The verdict kinds of the first run, oldest first."""
        return tuple(d.kind for d in self.runs[0].diagnoses)


# Lightning's advice that does not apply to the demo's tiny in-memory runs (dropped inside the demo runner only)
_HARMLESS_LIGHTNING = (".*does not have many workers.*", ".*is smaller than the logging interval.*", ".*LeafSpec.*")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's banner lines and its data-loader advice while the demo trains; one CPU thread.

    The scenarios' models are tiny: one thread is fastest and immune to other processes' load. The warning filters
    and log levels are the caller's again on exit: nothing is silenced outside the demo.
    """
    import optdiag.callbacks._base  # noqa: F401 - imports both Lightning namespaces, which set their log levels

    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    threads = torch.get_num_threads()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            for message in _HARMLESS_LIGHTNING:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        torch.set_num_threads(threads)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def exact_curvature(module: torch.nn.Module, loss_fn: Callable, data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """``lambda_max``, ``lambda_min`` and the trace of the full-data Hessian at the module's parameters.

    The demo's models are small, so the eigenvalues come from Lanczos run to a tight tolerance and the trace from
    enough Hutch++ products to be exact up to its standard error.
    """
    from optdiag.curvature import HessianOperator, hessian_trace, supervised_loss, top_eigenvalues

    with HessianOperator(module, supervised_loss(loss_fn), [data]) as op:
        budget = min(op.num_params, 200)
        top = top_eigenvalues(op, k=1, which="LA", tol=1e-6, max_hvp=budget)
        bottom = top_eigenvalues(op, k=1, which="SA", tol=1e-6, max_hvp=budget)
        trace = hessian_trace(op, n_hvp=min(op.num_params, 60))
        return {
            "lambda_max": float(top.eigenvalues[0]),
            "lambda_min": float(bottom.eigenvalues[0]),
            "hessian_trace": float(trace.estimate),
            "loss": float(op.loss),
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _train(spec: Scenario, run: ScenarioRun, out_dir: str) -> RunResult:
    """One run, with the warnings it raises kept as the result's ``notes`` (the known harmless ones filtered by
    :func:`quiet_lightning` never arrive)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence reaches the list; the demo filters still drop theirs
        for message in _HARMLESS_LIGHTNING:
            warnings.filterwarnings("ignore", message=message)
        result = _train_run(spec, run, out_dir)
    notes = []
    for w in caught:
        text = str(w.message)
        text = text if text.startswith("optdiag") else f"{w.category.__name__}: {text}"
        if text not in notes:  # optdiag says a thing once; another library may repeat itself every step
            notes.append(text)
    result.notes = notes
    return result


def _train_run(spec: Scenario, run: ScenarioRun, out_dir: str) -> RunResult:
    import pytorch_lightning as pl

    from optdiag.callbacks import OptDiag

    # the stall scenarios have no validation loop by design: the triage would only say that it needs one
    settings = {"verbose": False, "probe_batches": 4, "density_every": 0, "triage": run.val_loader is not None}
    settings.update(run.optdiag)
    callback = OptDiag(**settings)
    logger = pl.loggers.TensorBoardLogger(save_dir=out_dir, name=spec.name, version=_slug(run.label))
    validation = {} if run.val_loader is None else {"val_check_interval": run.val_every, "num_sanity_val_steps": 0}
    trainer = pl.Trainer(
        max_steps=run.max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
        deterministic=True, default_root_dir=out_dir, limit_val_batches=None if run.val_loader else 0, **validation,
    )
    started = time.perf_counter()
    trainer.fit(run.module, run.loader, run.val_loader)
    seconds = time.perf_counter() - started
    final = {}
    if all(math.isfinite(p.detach().sum()) for p in run.module.parameters()):
        final = exact_curvature(run.module, run.module.loss_fn, run.data)
    from optdiag.sinks.events import events_path

    with torch.no_grad():
        full_loss = float(run.module.loss_fn(run.module(run.data[0]), run.data[1]))
    return RunResult(
        label=run.label, diagnoses=list(callback.diagnoses), losses=list(run.module.losses),
        curvature=callback.hessian_monitor.history, final=final, truth=dict(run.truth), log_dir=logger.log_dir,
        events_file=events_path(logger.log_dir), seconds=seconds, findings=list(callback.findings),
        val_losses=list(getattr(run.module, "val_losses", [])), full_loss=full_loss,
        expected_findings=run.findings, metrics=run.evaluate(run.module, run.data) if run.evaluate else {},
    )


def run_scenario(name: str, out_dir: str) -> ScenarioResult:
    """Train every run of scenario ``name`` with ``OptDiag``, logging under ``out_dir``, and check the findings.

    Raises:
        UsageError: for an unknown scenario name.
    """
    spec = scenario(name)
    os.makedirs(out_dir, exist_ok=True)
    with quiet_lightning():
        runs = [_train(spec, run, out_dir) for run in spec.build()]
    result = ScenarioResult(spec, runs)
    result.checks = _verdict_checks(result) + _finding_checks(result) + _CHECKS.get(name, lambda r: [])(result)
    return result


# --- checks against the truth ------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _verdict_checks(result: ScenarioResult) -> list[Check]:
    expected = result.scenario.expected
    if expected is None:
        return []
    checks = []
    for run in result.runs:
        # A loss spike states a fact (the model's loss rose and came back, on fixed batches): it may come on any
        # run whose loss bounces, so it is checked against the expectation only where a scenario expects one.
        found = tuple(d.kind for d in run.diagnoses if d.kind != "loss_spike" or "loss_spike" in expected)
        shown = ", ".join(found) or "no verdict"
        spikes = [d.step for d in run.diagnoses if d.kind == "loss_spike" and "loss_spike" not in expected]
        if spikes:
            shown += f" (and loss spikes at step {', '.join(map(str, spikes))})"
        checks.append(Check(f"verdicts ({run.label})", found == expected,
                            f"expected {', '.join(expected) or 'no verdict'}; found {shown}"))
    return checks


def _triage_kinds(run: RunResult) -> tuple[str, ...]:
    """The run's finding kinds, oldest first (``needs_validation``, a note about the setup, left out)."""
    return tuple(f.kind for f in run.findings if f.kind != "needs_validation")


def _finding_checks(result: ScenarioResult) -> list[Check]:
    checks = []
    for run in result.runs:
        if run.expected_findings is not None:
            found = _triage_kinds(run)
            checks.append(Check(f"triage ({run.label})", found == run.expected_findings,
                                f"expected {', '.join(run.expected_findings) or 'no finding'}; "
                                f"found {', '.join(found) or 'no finding'}"))
    return checks


def _first(run: RunResult, kind: str) -> Any:
    return next((d for d in run.diagnoses if d.kind == kind), None)


def _check_saddle(result: ScenarioResult) -> list[Check]:
    run = result.runs[0]
    sigmas = run.truth["sigmas"]
    saddles = [d for d in run.diagnoses if d.kind == "saddle_point"]
    checks = []
    for i, (d, sigma) in enumerate(zip(saddles, sigmas)):
        lam = d.evidence.get("lambda_min")
        ok = lam is not None and abs(lam + sigma) <= 0.1 * sigma
        checks.append(Check(f"saddle {i + 1}: lambda_min ~ -{sigma:g}", ok, f"lambda_min = {_fmt(lam)}"))
        expected, measured = d.evidence.get("escape_expected_drop"), d.evidence.get("escape_measured_drop")
        if expected is not None and measured is not None:
            ok = measured < 0 and abs(measured - expected) <= 0.25 * abs(expected)
            checks.append(Check(f"saddle {i + 1}: escape drop", ok,
                                f"1/2 lambda_min t^2 = {_fmt(expected)} at t = {_fmt(d.evidence.get('escape_t'))}; "
                                f"measured {_fmt(measured)}"))
    return checks


def _check_oscillation(result: ScenarioResult) -> list[Check]:
    d = _first(result.runs[0], "oscillation")
    if d is None:
        return []
    ratio, cosine = d.evidence.get("lr_lambda_max"), d.evidence.get("grad_cosine")
    ok = (ratio is not None and ratio > 1.0) or (cosine is not None and cosine < 0)
    return [Check("bouncing: lr*lambda_max > 1 or gradients anti-aligned", ok,
                  f"lr*lambda_max = {_fmt(ratio)} (truth {_fmt(result.runs[0].truth['lr_lambda_max'])}), "
                  f"gradient cosine = {_fmt(cosine)}")]


def _check_minimum(result: ScenarioResult) -> list[Check]:
    final = result.runs[0].final
    ok = bool(final) and final["lambda_min"] > 0
    return [Check("convex: every eigenvalue > 0 at the end", ok, f"exact lambda_min = {_fmt(final.get('lambda_min'))}")]


def _check_plateau(result: ScenarioResult) -> list[Check]:
    d = _first(result.runs[0], "plateau")
    raise_lr = [s for s in (d.suggestions if d else []) if s.target == "lr" and s.proposed and s.current]
    ok = bool(raise_lr) and raise_lr[0].proposed > raise_lr[0].current
    detail = (f"lr {_fmt(raise_lr[0].current)} -> {_fmt(raise_lr[0].proposed)}" if raise_lr
              else "no learning-rate suggestion")
    return [Check("advice raises the learning rate", ok, detail)]


def _check_divergence(result: ScenarioResult) -> list[Check]:
    d = _first(result.runs[0], "divergence")
    ratio = d.evidence.get("lr_lambda_max") if d else None
    return [Check("past the stability limit: lr*lambda_max > 2", ratio is not None and ratio > 2,
                  f"lr*lambda_max = {_fmt(ratio)} (truth {_fmt(result.runs[0].truth['lr_lambda_max'])})")]


def _check_edge_of_stability(result: ScenarioResult) -> list[Check]:
    run = result.runs[0]
    target = run.truth["two_over_lr"]
    late = [s["lambda_max"] for s in run.curvature if s.get("step", 0) >= 0.5 * len(run.losses)]
    mean_late = sum(late) / len(late) if late else None
    ok = mean_late is not None and abs(mean_late - target) <= 0.15 * target
    n = len(run.losses)
    tail = run.losses[-max(n // 4, 1):]
    head = run.losses[n // 2: n // 2 + max(n // 4, 1)]
    falling = bool(tail) and bool(head) and sum(tail) / len(tail) < sum(head) / len(head)
    return [Check("lambda_max hovers at 2/lr in the second half", ok,
                  f"mean lambda_max = {_fmt(mean_late)} vs 2/lr = {_fmt(target)}"),
            Check("the loss keeps falling", falling,
                  f"mean loss {_fmt(sum(head) / len(head) if head else None)} -> "
                  f"{_fmt(sum(tail) / len(tail) if tail else None)}")]


def _check_batch_size(result: ScenarioResult) -> list[Check]:
    small, large = result.runs[0], result.runs[-1]
    if not small.final or not large.final:
        return [Check("both runs finished finite", False, "a run ended with non-finite parameters")]
    return [
        Check("large batch ends sharper (lambda_max)", large.final["lambda_max"] > small.final["lambda_max"],
              f"{small.label}: {_fmt(small.final['lambda_max'])}, {large.label}: {_fmt(large.final['lambda_max'])}"),
        Check("large batch ends sharper (trace)", large.final["hessian_trace"] > small.final["hessian_trace"],
              f"{small.label}: {_fmt(small.final['hessian_trace'])}, "
              f"{large.label}: {_fmt(large.final['hessian_trace'])}"),
    ]


def _check_model_bias(result: ScenarioResult) -> list[Check]:
    small, large = result.runs[0], result.runs[-1]
    ok = None not in (small.full_loss, large.full_loss) and large.full_loss < 0.5 * small.full_loss
    return [Check("a larger model reaches a lower training loss", ok,
                  f"full-data training loss: {small.label} {_fmt(small.full_loss)}, {large.label} "
                  f"{_fmt(large.full_loss)}")]


def _check_overfitting(result: ScenarioResult) -> list[Check]:
    run = result.runs[0]
    if not run.val_losses or not run.losses:
        return [Check("validation rises while training falls", False, "no validation losses were recorded")]
    best_step, best = min(run.val_losses, key=lambda p: p[1])
    last_step, last = run.val_losses[-1]
    train_at_best = sum(run.losses[max(0, best_step - 10):best_step + 1]) / len(run.losses[max(0, best_step - 10):
                                                                                          best_step + 1])
    train_end = sum(run.losses[-10:]) / len(run.losses[-10:])
    ok = last > 1.05 * best and train_end < train_at_best
    return [Check("validation rises while training falls", ok,
                  f"validation {_fmt(best)} at step {best_step} -> {_fmt(last)} at step {last_step}; training "
                  f"{_fmt(train_at_best)} -> {_fmt(train_end)}")]


def _check_unscaled_inputs(result: ScenarioResult) -> list[Check]:
    unscaled, standardized = result.runs[0], result.runs[-1]
    ok = None not in (unscaled.full_loss, standardized.full_loss) and standardized.full_loss < 0.5 * unscaled.full_loss
    checks = [Check("standardized inputs converge faster at the same lr", ok,
                    f"full-data loss after {len(unscaled.losses)} steps: {unscaled.label} {_fmt(unscaled.full_loss)}, "
                    f"{standardized.label} {_fmt(standardized.full_loss)}")]
    found = next((f for f in unscaled.findings if f.kind == "ill_conditioning"), None)
    if found is not None:
        spread, truth = found.evidence.get("std_spread"), max(unscaled.truth["feature_stds"]) / min(
            unscaled.truth["feature_stds"])
        checks.append(Check("measured spread of the feature scales", spread is not None and
                            abs(spread - truth) <= 0.25 * truth, f"std spread {_fmt(spread)} (truth {_fmt(truth)})"))
    return checks


def _check_mse_softmax(result: ScenarioResult) -> list[Check]:
    found = _triage_kinds(result.runs[0])
    checks = [Check(f"triage ({result.runs[0].label})", "loss_choice" in found and "ill_conditioning" not in found,
                    f"expected loss_choice; found {', '.join(found) or 'no finding'}")]
    mse, ce = result.runs[0].metrics, result.runs[-1].metrics
    ok = bool(mse) and bool(ce) and ce["accuracy"] >= mse["accuracy"] + 0.5 and \
        ce["probability_squared_error"] < 0.5 * mse["probability_squared_error"]
    return checks + [Check("cross-entropy leaves the plateau", ok,
                  f"accuracy {_fmt(mse.get('accuracy'))} -> {_fmt(ce.get('accuracy'))}, squared error of the "
                  f"probabilities {_fmt(mse.get('probability_squared_error'))} -> "
                  f"{_fmt(ce.get('probability_squared_error'))}")]


_CHECKS: dict[str, Callable[[ScenarioResult], list[Check]]] = {
    "unscaled_inputs": _check_unscaled_inputs,
    "mse_softmax": _check_mse_softmax,
    "model_bias": _check_model_bias,
    "overfitting": _check_overfitting,
    "saddle": _check_saddle,
    "oscillation": _check_oscillation,
    "minimum": _check_minimum,
    "plateau": _check_plateau,
    "divergence": _check_divergence,
    "edge_of_stability": _check_edge_of_stability,
    "batch_size": _check_batch_size,
}


# --- the printed report ------------------------------------------------------------------------------------------
def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_result(result: ScenarioResult) -> str:
    """A compact, readable block: expected vs found, each verdict's confidence and top suggestion, the checks."""
    spec = result.scenario
    lines = [f"== {spec.name}: {spec.title}  [{'as expected' if result.passed else 'NOT as expected'}]"]
    for run in result.runs:
        head = f"  run '{run.label}': {len(run.losses)} steps in {run.seconds:.1f} s"
        if run.losses:
            head += f", loss {run.losses[0]:.4g} -> {run.losses[-1]:.4g}"
        lines.append(head)
        rows = [["step", "verdict", "confidence", "key evidence", "top suggestion"]]
        for d in run.diagnoses:
            top = d.suggestions[0] if d.suggestions else None
            suggestion = "—" if top is None else top.action + (
                f" ({_fmt(top.current)} -> {_fmt(top.proposed)})" if top.proposed is not None else "")
            rows.append([str(d.step), d.kind, f"{d.confidence:.2f}", _key_evidence(d), suggestion])
        if len(rows) == 1:
            rows.append(["—", "no verdict", "", "", ""])
        lines += ["    " + line for line in _table(rows)]
        for f in run.findings:
            if f.kind != "needs_validation":
                lines.append(f"    triage: {f.kind} at step {f.step} (confidence {f.confidence:.2f}): {f.summary}")
        lines += [f"    note: {note.removeprefix('optdiag: ')}" for note in run.notes]
    if spec.expected is not None:
        lines.append(f"  expected: {', '.join(spec.expected) or 'no verdict'}")
    for check in result.checks:
        lines.append(f"  [{'ok' if check.ok else '!!'}] {check.name}: {check.detail}")
    return "\n".join(lines)


def _key_evidence(diagnosis: Any) -> str:
    return ", ".join(f"{name}={_fmt(value)}" for name, value in diagnosis.key_evidence().items())
