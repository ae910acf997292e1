"""Post-hoc analysis of saved checkpoints: curvature, sharpness, a verdict for the point, and loss landscapes.

The numbers come from the same functions the callbacks use (:mod:`optdiag.curvature`) and the verdict from
:func:`optdiag.diagnosis.classify_point`, so a report and a training run speak the same language. A minimum or
saddle verdict stands only when the loss agrees that the point is stationary (the gate of
:mod:`optdiag.analysis.story`), and a series is told as phases. The function analysed is the training-mode one
for BatchNorm nets (:mod:`optdiag.analysis.modes`).

What is computed over which data:

* ``loss`` and ``grad_norm``: the sample-weighted mean loss and the norm of its gradient over the whole data (or
  its first ``loss_batches`` batches), passed over in chunks of ``max_batches`` batches so memory stays bounded.
  The verdict's gradient evidence and the gate's loss along the gradient use the same data.
* Everything else (eigenvalues, trace, density, sharpness, slices, barriers): the Hessian of the mean loss over the
  first ``max_batches`` batches, the operator's "analysis batches".
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from optdiag.analysis import landscape, story
from optdiag.analysis.loading import LoadedCheckpoint, iter_batches, load_checkpoint, resolve_data, resolve_loss
from optdiag.analysis.modes import MODES, ModeChoice, choose_mode, function_mode
from optdiag.curvature import (
    DensityResult,
    EigenResult,
    HessianOperator,
    SharpnessResult,
    TraceResult,
    adaptive_sharpness,
    epsilon_sharpness,
    hessian_trace,
    sam_sharpness,
    spectral_density,
    top_eigenvalues,
)
from optdiag.curvature._checks import check_count, check_positive
from optdiag.curvature.batches import sample_count
from optdiag.curvature.params import trainable_parameters
from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.operator import HVP_METHODS, FiniteDifferenceOperator, choose_hvp_method
from optdiag.curvature.state import preserved_state
from optdiag.diagnosis.types import to_jsonable
from optdiag.diagnosis.classify import MIN_GRADIENT_PAIRS
from optdiag.errors import OptDiagError, UsageError
from optdiag.policy import LOGGER

__all__ = ["AnalysisSettings", "CheckpointAnalysis", "AnalysisReport", "analyze_checkpoint", "POINT_TYPES"]

POINT_TYPES = ("local_minimum", "saddle_point", "plateau", "not_critical", "undecided")
SCHEMA_VERSION = 1


@dataclass
class AnalysisSettings:
    """How much work the analysis does, and where.

    Attributes:
        max_batches: batches of the Hessian (the analysis batches), and the chunk size of the loss pass.
        loss_batches: batches of the loss and gradient pass (None: all the data yields).
        k: eigenpairs at each end of the spectrum.
        tol: Lanczos relative tolerance.
        trace_hvp: products for the Hutch++ trace.
        density_runs, density_steps: stochastic Lanczos quadrature runs and steps per run.
        eps: Keskar's box size. rho_sam, rho_adaptive: the SAM and ASAM radii.
        resolution: points of each 1-D slice. surface_resolution: points per side of the 2-D contour (0: none).
        radius: the half-width of the eigenvector slices and of the contour (None: chosen from the loss and
            curvature, see :func:`_eigen_radius`). Random filter-normalised slices span [-1, 1].
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        mode: which function of the weights is analysed: ``"train"`` (batch statistics, dropout off), ``"eval"``
            (running statistics) or ``"auto"`` (train when the model has BatchNorm-like layers or its train and
            eval outputs differ, else eval); see :mod:`optdiag.analysis.modes`.
        dtype: compute dtype of the curvature (None: the model's).
        hvp: Hessian-vector products by ``"exact"`` double backward, ``"finite_difference"`` of the gradient, or
            ``"auto"`` (exact where the model's backward can be differentiated, else finite differences;
            docs/finite-difference-and-fsdp.md).
        seed: seeds every random choice (start vectors, probes, directions) through private generators.
        progress: show progress bars on stderr.
    """

    max_batches: int = 4
    loss_batches: Optional[int] = None
    k: int = 3
    tol: float = 1e-3
    trace_hvp: int = 60
    density_runs: int = 2
    density_steps: int = 40
    eps: float = 1e-3
    rho_sam: float = 0.05
    rho_adaptive: float = 0.5
    resolution: int = 21
    surface_resolution: int = 11
    radius: Optional[float] = None
    device: str = "auto"
    dtype: Optional[torch.dtype] = None
    mode: str = "auto"
    hvp: str = "auto"
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batches", "k", "trace_hvp", "density_runs", "density_steps"):
            check_count(name, getattr(self, name))
        if self.loss_batches is not None:
            check_count("loss_batches", self.loss_batches)
        check_count("resolution", self.resolution, minimum=3)
        if isinstance(self.surface_resolution, bool) or not isinstance(self.surface_resolution, int) or (
            self.surface_resolution != 0 and self.surface_resolution < 3
        ):
            raise UsageError(f"surface_resolution must be 0 (no contour) or at least 3, got {self.surface_resolution!r}")
        for name in ("tol", "eps", "rho_sam", "rho_adaptive"):
            check_positive(name, getattr(self, name))
        if self.radius is not None and not (isinstance(self.radius, (int, float)) and self.radius > 0):
            raise UsageError(f"radius must be a positive number or None, got {self.radius!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("device 'cuda' was asked for but no CUDA device is available")
        check_count("seed", self.seed, minimum=0)
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        if self.hvp not in HVP_METHODS:
            raise UsageError(f"hvp must be one of {HVP_METHODS}, got {self.hvp!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("dtype", "progress")}
        out["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        out["device_used"] = str(self.torch_device)
        return out


@dataclass
class CheckpointAnalysis:
    """Everything measured at one checkpoint.

    Attributes:
        path, step, epoch, format: the checkpoint, its saved optimizer step and epoch, ``"lightning"`` or
            ``"state_dict"``.
        num_params: trainable parameters.
        loss, grad_norm: mean loss and gradient norm over the loss pass (``n_samples`` samples in ``n_batches``).
        analysis_loss: the mean loss over the analysis (Hessian) batches, ``hessian_batches`` of them.
        top, bottom: the ``k`` largest (``"LA"``) and smallest (``"SA"``) Hessian eigenpairs.
        trace: the Hutch++ trace estimate. density: the spectral density.
        sharpness: ``{"epsilon": ..., "sam": ..., "adaptive": ...}`` (None where undefined, see ``notes``).
        optimizer: the :class:`~optdiag.diagnosis.OptimizerSpec` read from the module and checkpoint, if any.
        evidence: the :class:`~optdiag.diagnosis.Evidence` the verdict was made from.
        diagnosis: the verdict for the point (None: not a critical point, or still descending; see
            ``critical_point``).
        slices: 1-D loss slices by direction; surface: the 2-D contour over the top two eigenvectors.
        noise: gradient noise statistics on the analysis batches (None when they cannot be measured).
        notes: what was skipped and why.
        n_hvp: Hessian-vector products spent. seconds: wall time.
        classified: classify_point's verdict before the critical-point gate (``diagnosis`` is it when it stands).
        mode: the function analysed and why (:meth:`optdiag.analysis.modes.ModeChoice.to_dict`).
        critical_point: the critical-point gate (:mod:`optdiag.analysis.story`): ``critical``, ``reason``,
            ``classified_as`` (classify_point's verdict before the gate) and the ``tests`` it weighed.
        lambda_min_measured_on: what ``lambda_min`` was measured on: batches, samples, mode, products, residual.
    """

    path: str
    step: Optional[int]
    epoch: Optional[int]
    format: str
    num_params: int
    loss: float
    grad_norm: float
    n_samples: int
    n_batches: int
    analysis_loss: float
    hessian_batches: int
    top: EigenResult
    bottom: EigenResult
    trace: TraceResult
    density: DensityResult
    sharpness: dict[str, Optional[SharpnessResult]]
    optimizer: Any
    evidence: Any
    diagnosis: Any
    slices: dict[str, landscape.LossSlice]
    surface: Optional[landscape.LossSurface]
    noise: Any = None
    notes: list[str] = field(default_factory=list)
    n_hvp: int = 0
    seconds: float = 0.0
    classified: Any = None
    mode: dict[str, Any] = field(default_factory=dict)
    critical_point: dict[str, Any] = field(default_factory=dict)
    lambda_min_measured_on: dict[str, Any] = field(default_factory=dict)

    @property
    def lambda_max(self) -> float:
        return float(self.top.eigenvalues[0])

    @property
    def lambda_min(self) -> float:
        return float(self.bottom.eigenvalues[0])

    @property
    def point_type(self) -> str:
        if self.diagnosis is not None:
            return self.diagnosis.kind
        return "undecided" if self.critical_point.get("state") == "undecided" else "not_critical"

    @property
    def label(self) -> str:
        return Path(self.path).name

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see ``docs/analyzing-checkpoints.md`` for the schema)."""
        evidence = self.evidence
        return {
            "path": self.path,
            "step": self.step,
            "epoch": self.epoch,
            "format": self.format,
            "num_params": self.num_params,
            "n_samples": self.n_samples,
            "n_batches": self.n_batches,
            "hessian_batches": self.hessian_batches,
            "loss": _num(self.loss),
            "analysis_loss": _num(self.analysis_loss),
            "grad_norm": _num(self.grad_norm),
            "lambda_max": _num(self.lambda_max),
            "lambda_min": _num(self.lambda_min),
            "top_eigenvalues": _nums(self.top.eigenvalues),
            "bottom_eigenvalues": _nums(self.bottom.eigenvalues),
            "residuals": {"top": _nums(self.top.residuals), "bottom": _nums(self.bottom.residuals)},
            "converged": {"top": bool(self.top.converged), "bottom": bool(self.bottom.converged)},
            "hessian_trace": _num(self.trace.estimate),
            "hessian_trace_stderr": _num(self.trace.stderr),
            "stability_threshold": _num(getattr(evidence, "stability_threshold", None)),
            "stability_ratio": _num(getattr(evidence, "stability_ratio", None)),
            "stability": None if evidence is None else evidence.stability_text,
            "preconditioned_lambda_max": _num(getattr(evidence, "preconditioned_lambda_max", None)),
            "epsilon_sharpness": _sharpness_value(self.sharpness.get("epsilon")),
            "sam_sharpness": _sharpness_value(self.sharpness.get("sam")),
            "adaptive_sharpness": _sharpness_value(self.sharpness.get("adaptive")),
            "sharpness": {k: (None if v is None else _jsonable(v.to_dict())) for k, v in self.sharpness.items()},
            "density": {
                "grid": _nums(self.density.grid),
                "density": _nums(self.density.density),
                "nodes": [_nums(row) for row in np.atleast_2d(self.density.nodes)],
                "weights": [_nums(row) for row in np.atleast_2d(self.density.weights)],
                "sigma": _num(self.density.sigma),
            },
            "gradient_noise": None if self.noise is None else _jsonable(_noise_dict(self.noise)),
            "optimizer": None if self.optimizer is None else _jsonable(self.optimizer.to_dict()),
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict(),
            "point_type": self.point_type,
            "slices": {name: s.to_dict() for name, s in self.slices.items()},
            "surface": None if self.surface is None else self.surface.to_dict(),
            "notes": list(self.notes),
            "n_hvp": int(self.n_hvp),
            "seconds": round(float(self.seconds), 3),
            "mode": _jsonable(self.mode),
            "critical_point": _jsonable(self.critical_point),
            "lambda_min_measured_on": _jsonable(self.lambda_min_measured_on),
        }

    def lambda_min_label(self) -> str:
        """``lambda_min`` with what it was measured on, e.g. ``-3 (Lanczos, 4 batches / 128 samples, train mode,
        41 products, residual 1e-05)``."""
        on = self.lambda_min_measured_on
        if not on:
            return f"{self.lambda_min:.4g}"
        return (f"{self.lambda_min:.4g} (Lanczos, {on['batches']} batches / {on['samples']} samples, {on['mode']} "
                f"mode, {on['n_hvp']} products, residual {on['residual']:.2g})")


def _noise_dict(noise: Any) -> dict[str, Any]:
    return {k: getattr(noise, k) for k in ("grad_sq_norm", "trace_sigma", "b_simple", "b_big", "clamped")}


def _num(value: Any) -> Any:
    """A number's JSON form by the package's one encoder: a float, ``"nan"``/``"inf"``/``"-inf"``, or None if
    missing (docs/errors.md, "JSON")."""
    return None if value is None else to_jsonable(float(value))


def _nums(values: Any) -> list[Optional[float]]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return [_num(v) for v in np.asarray(values, dtype=float).reshape(-1)]


def _jsonable(value: Any) -> Any:
    """:func:`to_jsonable`, with objects it does not know (a path, a device) written as their ``str``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    try:
        return to_jsonable(value)
    except UsageError:
        return str(value)


def _sharpness_value(result: Optional[SharpnessResult]) -> Optional[float]:
    return None if result is None else _num(result.value)


@dataclass
class AnalysisReport:
    """The analysis of one or more checkpoints, and what connects consecutive ones.

    Attributes:
        checkpoints: one :class:`CheckpointAnalysis` per checkpoint, in step order (given order when a step is
            unknown).
        barriers: the loss on the straight line between each consecutive pair
            (:class:`~optdiag.analysis.landscape.InterpolationPath`).
        settings: the :class:`AnalysisSettings` used.
        created: ISO timestamp (UTC).
        findings: the triage findings saved in the checkpoints by a ``TriageMonitor`` (``Finding.to_dict()``
            dicts), from the latest checkpoint that has any; empty otherwise.

    Example::

        report = analyze_checkpoint("epoch=3.ckpt", model=MyModule)
        report.checkpoints[0].lambda_max, report.checkpoints[0].point_type
        # (12.3, 'local_minimum')
        report.write("optdiag-report")
    """

    checkpoints: list[CheckpointAnalysis]
    barriers: list[landscape.InterpolationPath]
    settings: AnalysisSettings
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    barrier_notes: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, index: int) -> CheckpointAnalysis:
        return self.checkpoints[index]

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def story(self) -> dict[str, Any]:
        """The series as phases (:func:`optdiag.analysis.story.tell_story`): ``text``, ``final``, ``phases``."""
        rows = [dict(label=c.label, step=c.step, loss=c.loss, point_type=c.point_type, lambda_min=c.lambda_min,
                     lambda_max=c.lambda_max)
                for c in self.checkpoints]
        return story.tell_story(rows, [b.to_dict() for b in self.barriers])

    @property
    def series(self) -> dict[str, list]:
        """Quantities across checkpoints: ``step``, ``loss``, ``grad_norm``, ``lambda_max``, ``lambda_min``,
        ``hessian_trace`` and the three sharpness measures."""
        rows = [c.to_dict() for c in self.checkpoints]
        keys = ("step", "loss", "grad_norm", "lambda_max", "lambda_min", "hessian_trace", "epsilon_sharpness",
                "sam_sharpness", "adaptive_sharpness")
        out: dict[str, list] = {"checkpoint": [c.label for c in self.checkpoints]}
        out.update({k: [row[k] for row in rows] for k in keys})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` content (schema version :data:`SCHEMA_VERSION`)."""
        from optdiag import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "optdiag_version": __version__,
            "created": self.created,
            "settings": _jsonable(self.settings.to_dict()),
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "series": self.series,
            "barriers": [b.to_dict() for b in self.barriers],
            "barrier_notes": list(self.barrier_notes),
            "story": _jsonable(self.story),
            "findings": _jsonable(self.findings),
        }

    def summary(self) -> str:
        """A few plain-text lines per checkpoint, for the terminal."""
        lines = []
        if self.checkpoints:
            lines.append(f"story: {self.story['text']}")
        for c in self.checkpoints:
            step = "?" if c.step is None else c.step
            lines.append(
                f"{c.label} (step {step}): loss {c.loss:.4g}, |grad| {c.grad_norm:.3g}, "
                f"lambda_max {c.lambda_max:.4g}, lambda_min {c.lambda_min_label()}, trace {c.trace.estimate:.4g} "
                f"+- {c.trace.stderr:.2g} -> {c.point_type.replace('_', ' ')}"
            )
            if c.mode:
                lines.append(f"    analysed: the {c.mode['function']} ({c.mode['reason']})")
            if c.critical_point and c.diagnosis is None:
                lines.append(f"    {c.critical_point['reason']}")
            if c.diagnosis is not None:
                lines.append(f"    {c.diagnosis.summary}")
                for s in c.diagnosis.suggestions:
                    lines.append(f"    - {s.target}: {s.action}")
        for b in self.barriers:
            lines.append(f"barrier {b.labels[0]} -> {b.labels[1]}: {b.barrier:.4g} (distance {b.distance:.4g})")
        return "\n".join(lines)

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``report.html`` and ``report.json`` into ``out_dir`` (created if needed).

        Existing files are never overwritten: when ``report.html`` or ``report.json`` exist, the pair is written as
        ``report-2.*``, ``report-3.*``, ...

        Returns:
            The paths of the HTML and JSON files.
        """
        from optdiag.sinks.report import write_report

        return write_report(self, out_dir)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


def analyze_checkpoint(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    model: Any,
    data: Any = None,
    *,
    loss: Any = None,
    optimizer: Any = None,
    trust_checkpoint: bool = False,
    settings: Optional[AnalysisSettings] = None,
    **options: Any,
) -> AnalysisReport:
    """Analyse one checkpoint (or several, in order) and return an :class:`AnalysisReport`.

    Args:
        path: a checkpoint file, or a sequence of them (then also the series and the barriers between
            consecutive checkpoints).
        model: a LightningModule class (Lightning checkpoints are rebuilt with ``load_from_checkpoint``, saved
            hyper-parameters included), an ``nn.Module`` class or a factory taking no arguments, or a module
            instance (copied; the caller's object is never changed).
        data: a DataLoader (or any iterable of batches), a LightningDataModule, or a callable returning one; None
            uses the module's own ``train_dataloader``.
        loss: ``loss_fn(model, batch) -> scalar mean loss`` or a criterion (e.g. ``torch.nn.MSELoss``); None uses
            the module's ``training_step``.
        optimizer: an ``OptimizerSpec`` or a torch optimizer for the stability threshold; None reads it from the
            module's ``configure_optimizers`` and the checkpoint's saved learning rate, when there is one.
        trust_checkpoint: unpickle fully (``weights_only=False``); only for files from a trusted source.
        settings: an :class:`AnalysisSettings`; or give its fields as keyword ``options`` (``max_batches=8``, ...).

    Returns:
        An :class:`AnalysisReport`; ``report.write(dir)`` writes ``report.html`` and ``report.json``.

    Raises:
        UsageError: any bad input (missing or unreadable file, weights that do not fit the model, unusable data or
            loss, bad settings), with one line naming the problem.

    Example::

        report = analyze_checkpoint("last.ckpt", model=MyModule, max_batches=4)
        print(report.summary())
    """
    if settings is None:
        try:
            settings = AnalysisSettings(**options)
        except TypeError as err:
            raise UsageError(f"unknown analysis option: {err}") from err
    elif options:
        raise UsageError("give either settings=AnalysisSettings(...) or keyword options, not both")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise UsageError("no checkpoint given")
    loaded = [load_checkpoint(p, model, trust_checkpoint) for p in paths]  # fail fast before any long work
    if all(item.step is not None for item in loaded):
        loaded.sort(key=lambda item: item.step)
    results: list[CheckpointAnalysis] = []
    barriers: list[landscape.InterpolationPath] = []
    barrier_notes: list[str] = []
    previous: Optional[tuple[str, torch.Tensor, Optional[torch.Tensor]]] = None
    initial_grad_norm: Optional[float] = None  # the gradient scale of early training, from a step-0 checkpoint
    for index, item in enumerate(loaded):
        with contextlib.ExitStack() as scope:  # the analysed function's mode, for the checkpoint and its path
            analysis, op, gradient = _analyze_one(item, data, loss, optimizer, settings,
                                                  f"[{index + 1}/{len(loaded)}]", scope, initial_grad_norm)
            if item.step == 0 and initial_grad_norm is None:
                initial_grad_norm = analysis.grad_norm
            point = landscape.point_of(op)
            if previous is not None:
                label, start, start_gradient = previous
                path = None
                try:
                    path = landscape.linear_interpolation(op, start, point,
                                                          t=np.linspace(0.0, 1.0, settings.resolution),
                                                          labels=(label, analysis.label))
                    barriers.append(path)
                except UsageError as err:
                    barrier_notes.append(f"{label} -> {analysis.label}: {err}")
                _judge_towards_next(results[-1], start, start_gradient, analysis, point, path)
            previous = (analysis.label, point.detach().cpu(), gradient)
            op.close()
        results.append(analysis)
        item.model = None  # release the weights as we go
    # findings accumulate over a run: the latest checkpoint that saved any holds them all
    findings = next((item.findings for item in reversed(loaded) if item.findings), [])
    return AnalysisReport(results, barriers, settings, barrier_notes=barrier_notes, findings=list(findings))


class _Progress:
    """One progress bar per checkpoint, stage by stage (silent when disabled)."""

    STAGES = ("loss pass", "top eigenvalues", "bottom eigenvalues", "trace", "density", "sharpness", "verdict",
              "slices", "contour")

    def __init__(self, enabled: bool, label: str) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.STAGES), desc=label, file=sys.stderr, leave=True, unit="stage")

    def stage(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _chunks(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _loss_pass(
    model: nn.Module, loss_fn: Callable, batches: Iterator[Any], settings: AnalysisSettings,
    kept: Optional[list] = None, keep: int = 0,
) -> tuple[HessianOperator, float, torch.Tensor, int, int]:
    """The analysis operator (first chunk) and the mean loss, gradient (summed in float64, in the operator's dtype),
    samples and batches over all
    chunks of ``batches``; the first ``keep`` batches are appended to ``kept`` on the way.

    Each chunk's loss and gradient come from a ``HessianOperator`` over it (the same sample weighting and forward
    as the curvature); later chunks use the ``"recompute"`` engine, which keeps no graph (and, unlike ``"func"``,
    needs no forward-mode derivatives), and are freed at once. Where ``settings.hvp`` resolves to finite
    differences (a model without double backward), every chunk gets a
    :class:`~optdiag.curvature.operator.FiniteDifferenceOperator` instead (one gradient at construction).
    """
    first: Optional[HessianOperator] = None
    loss_sum, grad_sum, n_samples, n_batches = 0.0, None, 0, 0
    hvp: Optional[str] = None
    for chunk in _chunks(batches, settings.max_batches):
        if kept is not None and len(kept) < keep:
            kept.extend(chunk[: keep - len(kept)])
        sizes = [sample_count(b, n_batches + i) for i, b in enumerate(chunk)]
        if hvp is None:
            hvp, reason = choose_hvp_method(model, loss_fn, chunk[0], hvp=settings.hvp, dtype=settings.dtype)
            if hvp == "finite_difference":
                LOGGER.info("optdiag analyze: Hessian-vector products by finite differences: %s", reason)
        if hvp == "finite_difference":
            op = FiniteDifferenceOperator(model, loss_fn, chunk, dtype=settings.dtype)
        else:
            op = HessianOperator(model, loss_fn, chunk, method="auto" if first is None else "recompute",
                                 dtype=settings.dtype)
        count = sum(sizes)
        loss_sum += op.loss * count
        gradient = op.gradient().double().mul_(count)
        grad_sum = gradient if grad_sum is None else grad_sum.add_(gradient)
        del gradient
        n_samples += count
        n_batches += len(chunk)
        if first is None:
            first = op
        else:
            op.close()
    assert first is not None and grad_sum is not None  # iter_batches raised if there was no batch
    # Summed in float64, kept in the operator's dtype: every later stage (and the next checkpoint's gate) holds it,
    # and in float64 it would be two more copies of a float32 model's parameters for the whole analysis.
    return first, loss_sum / n_samples, grad_sum.div_(n_samples).to(first.dtype), n_samples, n_batches


def _full_data_loss(model: nn.Module, loss_fn: Callable, data: Any, settings: AnalysisSettings,
                    params: torch.Tensor, where: str) -> float:
    """The sample-weighted mean loss over the loss pass's data at flat parameters ``params`` (the model keeps its
    own), chunk by chunk as in :func:`_loss_pass`."""
    total, count = 0.0, 0
    for chunk in _chunks(iter_batches(data, settings.loss_batches, where), settings.max_batches):
        size = sum(sample_count(b, i) for i, b in enumerate(chunk))
        objective = BatchObjective(model, loss_fn, chunk, dtype=settings.dtype, batch_list=True)
        with preserved_state(model), torch.no_grad():
            total += objective.value(params, finite=False) * size
        count += size
    return total / count


def _analyze_one(
    item: LoadedCheckpoint, data: Any, loss: Any, optimizer: Any, settings: AnalysisSettings, label: str,
    scope: contextlib.ExitStack, initial_grad_norm: Optional[float] = None,
) -> tuple[CheckpointAnalysis, HessianOperator, torch.Tensor]:
    """Analyse one checkpoint; the analysed function's mode is entered into ``scope`` (kept for the barrier path).
    Also returns the full-data gradient (on the CPU) for the gate on the path to the next checkpoint."""
    started = time.perf_counter()
    progress = _Progress(settings.progress, f"{label} {item.path.name}")
    model = item.model.to(settings.torch_device)
    loss_fn = resolve_loss(model, loss)
    source = resolve_data(model, data)
    notes: list[str] = []
    where = f"the data of {item.path.name}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log.*")
            progress.stage("loss pass")
            batches = iter_batches(source, settings.loss_batches, where)
            first = next(batches)  # iter_batches raises a UsageError when there is none
            mode = choose_mode(model, loss_fn, first, settings.mode, settings.dtype)
            scope.enter_context(function_mode(model, mode.used))
            kept: list = []
            op, mean_loss, gradient, n_samples, n_batches = _loss_pass(
                model, loss_fn, itertools.chain([first], batches), settings, kept,
                max(settings.max_batches, MIN_GRADIENT_PAIRS),
            )
            progress.done()
            full = _FullData(mean_loss, gradient, n_samples, source, where, kept,
                             float(gradient.double().norm()) if item.step == 0 else initial_grad_norm)
            analysis = _curvature_and_verdict(item, op, model, loss_fn, optimizer, settings, progress, notes, full,
                                              mode)
    except UsageError:
        raise
    except OptDiagError as err:  # NaN/Inf loss, no double backward: a property of this checkpoint and model
        raise UsageError(f"analysing {item.path}: {err}") from err
    except (RuntimeError, ValueError, TypeError) as err:
        # The user's model or loss failed on the user's data: bad input, reported in one line.
        raise UsageError(f"analysing {item.path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    finally:
        progress.close()
    analysis.update(
        loss=mean_loss, grad_norm=float(gradient.double().norm()), n_samples=n_samples, n_batches=n_batches, notes=notes,
        seconds=time.perf_counter() - started, mode=mode.to_dict(),
    )
    return CheckpointAnalysis(**analysis), op, gradient.detach().cpu()


@dataclass
class _FullData:
    """The loss pass's results and data, for the evidence and the gradient line."""

    loss: float
    gradient: torch.Tensor
    n_samples: int
    source: Any
    where: str
    first_batches: list  # the data's first batches, for the gradient-noise estimate
    initial_grad_norm: Optional[float]  # the full-data gradient norm at step 0, when the series has it


def _curvature_and_verdict(
    item: LoadedCheckpoint,
    op: HessianOperator,
    model: nn.Module,
    loss_fn: Callable,
    optimizer: Any,
    settings: AnalysisSettings,
    progress: _Progress,
    notes: list[str],
    full: _FullData,
    mode: ModeChoice,
) -> dict[str, Any]:
    k = min(settings.k, op.num_params)
    seed = settings.seed
    progress.stage("top eigenvalues")
    top = top_eigenvalues(op, k=k, which="LA", tol=settings.tol, seed=seed)
    progress.done()
    progress.stage("bottom eigenvalues")
    bottom = top_eigenvalues(op, k=k, which="SA", tol=settings.tol, seed=seed + 1)
    progress.done()
    for name, result in (("largest", top), ("smallest", bottom)):
        if not result.converged:
            notes.append(f"Lanczos for the {name} eigenvalues did not reach tol={settings.tol} in {result.n_hvp} "
                         f"products (residuals {', '.join(f'{r:.2g}' for r in result.residuals.tolist())})")
    progress.stage("trace")
    trace = hessian_trace(op, settings.trace_hvp if op.num_params > 3 else 3, seed=seed)
    progress.done()
    progress.stage("density")
    density = spectral_density(op, n_runs=settings.density_runs, n_steps=settings.density_steps, seed=seed)
    progress.done()

    progress.stage("sharpness")
    batches = op.objective.batches  # the analysis batches, already on the device
    sharpness = _sharpness(model, loss_fn, batches, settings, notes)
    # The noise estimate rests on at least MIN_GRADIENT_PAIRS batches where the data have them (classify_point
    # trusts the norm test only then), all of the first batch's size (a short last batch is left out).
    size = sample_count(full.first_batches[0], 0)
    noise_batches = [b for i, b in enumerate(full.first_batches) if sample_count(b, i) == size]
    # A train-mode BatchNorm cannot normalise one sample: its micro-batches need two at least.
    noise = _noise(model, loss_fn, noise_batches, notes,
                   2 if mode.used == "train" and mode.batchnorm_layers else 1)
    progress.done()

    progress.stage("verdict")
    spec, torch_optimizer = _optimizer_spec(model, item, optimizer, notes)
    preconditioned = _preconditioned(op, spec, torch_optimizer, settings, notes)
    from optdiag.diagnosis import Evidence, classify_point

    # The gradient evidence is the full-data gradient (exact for the loss the optimizer minimised over this data),
    # against the per-sample noise measured on the analysis batches: the norm test on the whole data.
    grad_sq = float(full.gradient.double().pow_(2).sum())
    # tr(Sigma) comes clamped at 0 from the estimator, which records a negative raw value: the evidence says so too
    noise_trace = None if noise is None or not math.isfinite(noise.trace_sigma) else noise.trace_sigma
    clamped = {"grad_noise_trace": noise.clamped["trace_sigma"]} if noise_trace is not None and \
        "trace_sigma" in noise.clamped else {}
    evidence = Evidence(
        step=item.step if item.step is not None else 0,
        loss=full.loss,
        grad_norm=math.sqrt(grad_sq),
        grad_sq_norm_unbiased=None if noise_trace is None else grad_sq,
        grad_noise_trace=noise_trace,
        batch_size=None if noise_trace is None else int(noise.b_big),
        grad_noise_batches=None if noise_trace is None else int(noise.n_big),
        dataset_size=full.n_samples,
        grad_norm_initial=full.initial_grad_norm or None,
        lambda_max=float(top.eigenvalues[0]),
        lambda_max_residual=float(top.residuals[0]),
        lambda_min=float(bottom.eigenvalues[0]),
        lambda_min_residual=float(bottom.residuals[0]),
        hessian_trace=trace.estimate,
        hessian_trace_stderr=trace.stderr if math.isfinite(trace.stderr) else None,
        epsilon_sharpness=None if sharpness["epsilon"] is None else sharpness["epsilon"].value,
        num_params=op.num_params,
        optimizer=spec,
        clamped=clamped,
        **preconditioned,
    )
    classified = classify_point(evidence)
    line = _gradient_line(op, model, loss_fn, settings, full, top, bottom, notes)
    critical_point = {"classified_as": None if classified is None else {
        "kind": classified.kind, "confidence": classified.confidence, "summary": classified.summary},
        "tests": {"gradient_zero": story.norm_test_record(evidence), "gradient_line": line, "towards_next": None}}
    diagnosis = _apply_gate(classified, critical_point)
    progress.done()

    progress.stage("slices")
    slices = _slices(op, top, bottom, settings)
    progress.done()
    progress.stage("contour")
    surface = None
    if settings.surface_resolution and top.k >= 2:
        radius = _eigen_radius(op, top, bottom, settings)
        grid = np.linspace(-radius, radius, settings.surface_resolution)
        surface = landscape.loss_surface(op, top.eigenvectors[0], top.eigenvectors[1], grid, grid)
    elif settings.surface_resolution:
        notes.append("no 2-D contour: it needs two eigenvectors (k >= 2 and at least 2 parameters)")
    progress.done()
    return dict(
        path=str(item.path),
        step=item.step,
        epoch=item.epoch,
        format=item.format,
        num_params=op.num_params,
        analysis_loss=op.loss,
        hessian_batches=len(op.weights),
        top=top,
        bottom=bottom,
        trace=trace,
        density=density,
        sharpness=sharpness,
        optimizer=spec,
        evidence=evidence,
        diagnosis=diagnosis,
        slices=slices,
        surface=surface,
        noise=noise,
        n_hvp=op.n_hvp,
        classified=classified,
        critical_point=critical_point,
        lambda_min_measured_on={
            "batches": len(op.weights),
            "samples": sum(sample_count(b, i) for i, b in enumerate(op.objective.batches)),
            "mode": mode.used,
            "n_hvp": int(bottom.n_hvp),
            "residual": float(bottom.residuals[0]),
        },
    )


def _gradient_line(op: HessianOperator, model: nn.Module, loss_fn: Callable, settings: AnalysisSettings,
                   full: _FullData, top: EigenResult, bottom: EigenResult, notes: list[str]) -> Optional[dict]:
    """The gate's gradient line: the full-data loss at the step along ``-G`` that the quadratic model (one product
    for the curvature along ``G``) calls best; None for a zero gradient."""
    norm = float(full.gradient.double().norm())
    if not math.isfinite(norm) or norm == 0.0:
        return None
    direction = (full.gradient / norm).to(device=op.device, dtype=op.dtype)
    with preserved_state(model):
        curvature = float(op.matvec(direction) @ direction)
    step = story.gradient_step(norm, curvature, _quadratic_radius(full.loss, top, bottom))
    if step is None:
        return None
    t, predicted = step
    try:
        measured = _full_data_loss(model, loss_fn, full.source, settings, landscape.point_of(op) - t * direction,
                                   full.where)
    except UsageError as err:  # e.g. data that can be iterated only once
        notes.append(f"the loss along the gradient was not measured: {err}")
        measured = None
    return story.gradient_line_record(full.loss, norm, curvature, t, predicted, measured)


def _apply_gate(classified: Any, critical_point: dict[str, Any]) -> Any:
    """Record the gate's decision in ``critical_point`` and return the verdict that stands (None: not critical)."""
    tests = critical_point["tests"]
    state, reason = story.gate(classified, tests["gradient_zero"], tests["gradient_line"], tests["towards_next"])
    keep = classified is not None and state == classified.kind
    critical_point.update(critical=keep, state=state, reason=reason)
    return classified if keep else None


def _judge_towards_next(earlier: CheckpointAnalysis, start: torch.Tensor, start_gradient: Optional[torch.Tensor],
                        later: CheckpointAnalysis, point: torch.Tensor,
                        path: Optional[landscape.InterpolationPath]) -> None:
    """Add the path to ``later`` to the evidence of ``earlier``, and gate its verdict again."""
    if start_gradient is None or start_gradient.numel() != point.numel() or not earlier.critical_point:
        return
    delta = point.detach().cpu().double() - start.double()
    first_order = -float(start_gradient.double() @ delta)
    earlier.critical_point["tests"]["towards_next"] = story.towards_next_record(
        later.label, earlier.loss, later.loss, first_order, None if path is None else path.barrier)
    earlier.diagnosis = _apply_gate(earlier.classified, earlier.critical_point)


def _sharpness(
    model: nn.Module, loss_fn: Callable, batches: list, settings: AnalysisSettings, notes: list[str]
) -> dict[str, Optional[SharpnessResult]]:
    measures = {
        "epsilon": lambda: epsilon_sharpness(model, loss_fn, batches, eps=settings.eps, seed=settings.seed),
        "sam": lambda: sam_sharpness(model, loss_fn, batches, rho=settings.rho_sam),
        "adaptive": lambda: adaptive_sharpness(model, loss_fn, batches, rho=settings.rho_adaptive),
    }
    out: dict[str, Optional[SharpnessResult]] = {}
    for name, measure in measures.items():
        try:
            out[name] = measure()
        except UsageError:
            raise
        except ValueError as err:  # e.g. a zero gradient leaves first-order SAM without a direction
            out[name] = None
            notes.append(f"{name} sharpness undefined here: {err}")
    return out


def _noise(model: nn.Module, loss_fn: Callable, batches: list, notes: list[str], smallest: int = 1) -> Any:
    """``|G|^2`` and ``tr(Sigma)`` from the analysis batches split in quarters (for the zero-gradient test), in
    micro-batches of ``smallest`` samples at least."""
    from optdiag.curvature.noise import estimate_gradient_noise_scale

    try:
        size = sample_count(batches[0], 0)
        if size <= smallest:
            raise UsageError(f"batches of {size} sample{'s' if size > 1 else ''} cannot be split into micro-batches "
                             f"of {smallest} or more")
        return estimate_gradient_noise_scale(model, loss_fn, batches, small_batch_size=max(smallest, size // 4))
    except (UsageError, ValueError) as err:
        notes.append(f"gradient noise not measured: {err}")
        return None


def _optimizer_spec(model: nn.Module, item: LoadedCheckpoint, optimizer: Any,
                    notes: list[str]) -> tuple[Any, Any]:
    """The optimizer's settings at the checkpoint and, when there is one, the torch optimizer itself: given, or the
    module's ``configure_optimizers`` with the checkpoint's saved learning rate (schedulers change it) and other
    scalar settings, and its saved state (Adam's second moments) when the checkpoint holds it."""
    from optdiag.diagnosis import OptimizerSpec

    if isinstance(optimizer, OptimizerSpec):
        return optimizer, None
    if optimizer is not None:
        return OptimizerSpec.from_torch(optimizer), optimizer
    configure = getattr(model, "configure_optimizers", None)
    if configure is None:
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            configured = configure()
        torch_optimizer = _first_optimizer(configured)
        if torch_optimizer is None:
            return None, None
        if item.optimizer_group:
            group = torch_optimizer.param_groups[0]
            for key, value in item.optimizer_group.items():
                if key in group:
                    group[key] = type(group[key])(value) if isinstance(group[key], (tuple, list)) else value
        spec = OptimizerSpec.from_torch(torch_optimizer)
    except Exception as err:  # noqa: BLE001 - configure_optimizers may need a Trainer; the verdict goes on
        notes.append(f"optimizer unknown ({type(err).__name__} from configure_optimizers): no stability threshold")
        return None, None
    if spec.preconditioned and item.optimizer_state is not None:
        try:
            torch_optimizer.load_state_dict(item.optimizer_state)
        except Exception as err:  # noqa: BLE001 - a state saved by another optimizer layout: no preconditioner
            notes.append(f"the checkpoint's optimizer state does not fit configure_optimizers() "
                         f"({type(err).__name__}): no preconditioned sharpness")
    return spec, torch_optimizer


def _preconditioned(op: HessianOperator, spec: Any, torch_optimizer: Any, settings: AnalysisSettings,
                    notes: list[str]) -> dict[str, Any]:
    """Adam's/RMSprop's preconditioned sharpness at the checkpoint from its saved second moments (the Evidence
    fields ``preconditioned_lambda_max`` or ``preconditioner_warmup``); nothing for other optimizers."""
    from optdiag.curvature.preconditioned import PreconditionedOperator, preconditioner_warmup

    if spec is None or not spec.preconditioned:
        return {}
    if torch_optimizer is None or not torch_optimizer.state:
        notes.append(f"{spec.name or spec.kind}'s stability threshold applies to the preconditioned sharpness, and "
                     "the checkpoint holds no optimizer state to read the preconditioner from: stability ratio "
                     "unknown")
        return {}
    try:
        params = [p for _, p in trainable_parameters(op.model)]
        warmup = preconditioner_warmup(torch_optimizer, params)
        if not warmup.ready:
            return {"preconditioner_warmup": {"steps": warmup.steps, "ready_at": warmup.ready_at}}
        result = top_eigenvalues(PreconditionedOperator.from_optimizer(op, torch_optimizer, params=params), k=1,
                                 which="LA", tol=settings.tol, seed=settings.seed + 2)
    except UsageError as err:
        notes.append(f"preconditioned sharpness not measured: {err}")
        return {}
    return {"preconditioned_lambda_max": float(result.eigenvalues[0])}


def _first_optimizer(configured: Any) -> Any:
    """The first torch optimizer in whatever ``configure_optimizers`` returned (Lightning's accepted forms)."""
    if hasattr(configured, "param_groups"):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    return None


def _quadratic_radius(loss: float, top: EigenResult, bottom: EigenResult) -> float:
    """Where the stiffest direction's quadratic model changes by about four times the loss:
    ``|lambda| r^2 / 2 = 4 max(L, 0.01)``."""
    scale = max(abs(float(top.eigenvalues[0])), abs(float(bottom.eigenvalues[0])), 1e-12)
    return math.sqrt(8.0 * max(loss, 1e-2) / scale)


def _eigen_radius(op: HessianOperator, top: EigenResult, bottom: EigenResult, settings: AnalysisSettings) -> float:
    """Half-width of the eigenvector slices: :func:`_quadratic_radius` of the analysis loss, capped at the norm of
    the weights (at least 1)."""
    if settings.radius is not None:
        return float(settings.radius)
    radius = _quadratic_radius(op.loss, top, bottom)
    return min(radius, max(float(landscape.point_of(op).norm()), 1.0))


def _slices(op: HessianOperator, top: EigenResult, bottom: EigenResult, settings: AnalysisSettings) -> dict:
    radius = _eigen_radius(op, top, bottom, settings)
    steps = np.linspace(-radius, radius, settings.resolution)
    unit = np.linspace(-1.0, 1.0, settings.resolution)
    random_direction = landscape.filter_normalized_direction(op, seed=settings.seed)
    return {
        "top_eigenvector": landscape.loss_slice(op, top.eigenvectors[0], steps, "top eigenvector"),
        "bottom_eigenvector": landscape.loss_slice(op, bottom.eigenvectors[0], steps, "bottom eigenvector"),
        "random_filter_normalized": landscape.loss_slice(op, random_direction, unit, "random (filter-normalised)"),
    }

