"""``StallDiagnoser``: when the loss stops going down, take a curvature snapshot and say why, and what to change.

Data flow (docs/index.md): training loss -> :class:`~optdiag.diagnosis.stall.StallDetector` -> at a stall, a bounded
curvature snapshot on the probe batches (:meth:`HessianMonitor.measure`) plus the gradient statistics of the window
(:class:`GradientNormMonitor`) -> :class:`~optdiag.diagnosis.evidence.Evidence` ->
:func:`~optdiag.diagnosis.classify.diagnose_stall` -> a :class:`~optdiag.diagnosis.types.Diagnosis` in
:attr:`StallDiagnoser.diagnoses`, ``events.jsonl``, a TensorBoard text panel and the end-of-fit summary.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from optdiag.callbacks._base import (
    DeferredValue, OptDiagCallback, batch_size_of, deferred_loss_scale, global_step, grad_scaler, guarded,
    remember_loss, step_loss_of, undivided_loss)
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.params import trainable_parameters
from optdiag.curvature.state import preserved_state
from optdiag.diagnosis import Diagnosis, Evidence, OptimizerSpec, StallDetector, StallEvent, diagnose_stall
from optdiag.diagnosis.advice import REPEATED_SPIKES
from optdiag.diagnosis.classify import MIN_GRADIENT_PAIRS, Thresholds, check_prediction
from optdiag.policy import LOGGER, check_number
from optdiag.errors import OptDiagError, UsageError
from optdiag.sinks import tensorboard as tensorboard_sink

__all__ = ["StallDiagnoser"]

# Snapshot keys that become Evidence fields under the same name, and the two that are renamed.
_SNAPSHOT_FIELDS = ("lambda_max", "lambda_max_residual", "lambda_min", "lambda_min_residual", "hessian_trace",
                    "hessian_trace_stderr", "preconditioned_lambda_max", "preconditioner_warmup",
                    "grad_noise_trace")
_SNAPSHOT_RENAMED = {"probe_grad_sq_unbiased": "grad_sq_norm_unbiased", "critical_sharpness": "directional_sharpness"}
_INITIAL_STEPS = 10  # the early-training gradient scale is the mean |g| over this many steps
#: Reads of the probe set (two batches by default) for brief spikes per training step, beyond the first four: one
#: candidate (two reads: four forward passes, about 1.3 training steps) per 40 steps at most, whatever the noise
#: (healthy minibatch runs nominate about one per 100 steps, mostly hard batches; docs/diagnosis-rules.md).
BRIEF_READ_SHARE = 0.05
#: Probe-set losses read to prove a stall may live on this share of what the fit earns (the rest refills the stall
#: reserve, and leaves the budget guard room for the clock's jitter), spaced out as far as MAX_PROBE_STRIDE times
#: probe_every; a window of them holds at least MIN_PROBE_READS (docs/diagnosis-rules.md).
PROBE_READ_SHARE = 0.75
MAX_PROBE_STRIDE = 2
MIN_PROBE_READS = 5
#: An episode whose probe losses refute the flat look (they surely fall faster than the stall limit) or cannot tell
#: ends early, and no new one starts for PROBE_QUIET_WINDOWS windows (the span "looks flat" judges: its losses are
#: then all new), twice as long after each further early end in a row, at most MAX_PROBE_QUIET_WINDOWS
#: (docs/diagnosis-rules.md). A healthy run's noisy loss near its floor looks flat again and again.
PROBE_QUIET_WINDOWS = 2
MAX_PROBE_QUIET_WINDOWS = 8
#: Probe reads count as no better than the minibatch losses when their noise, scaled to the same span, is at least
#: this multiple of the minibatch losses': a robust noise from ten reads is uncertain by about a third, and a
#: borderline episode is worth finishing (docs/diagnosis-rules.md).
PROBE_NOISE_MARGIN = 1.5
#: Before that, from MIN_PROBE_READS + 1 reads, an episode ends only if its reads are this many times the minibatch
#: losses' noise (twice the margin: a robust noise from five differences is uncertain by about a half, and a fast
#: descent's knee inflates it), clearly more than the rest of the episode could redeem (docs/diagnosis-rules.md).
PROBE_FUTILE_MARGIN = 2 * PROBE_NOISE_MARGIN
_RETRIES = 8  # an undecided stall is looked at again (every half window, four windows in all) before silence


class _PendingStall(NamedTuple):
    """An undecided stall, looked at again at step ``retry`` (its try ``tries``): with the curvature of its last
    look when that measured the curvature tests (``reuse_curvature``), and with every step measured up to the retry
    when its gradient could not be judged for want of pairs (``every_step``)."""

    event: StallEvent
    tries: int
    retry: int
    reuse_curvature: bool
    every_step: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self._asdict(), "event": self.event.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _PendingStall:
        return cls(StallEvent.from_dict(data["event"]), int(data["tries"]), int(data["retry"]),
                   bool(data["reuse_curvature"]), bool(data["every_step"]))


class _WaitingSpike(NamedTuple):
    """A repeated spike whose verdict waits for the gradient pairs measured just after it, judged at step
    ``judged_at`` (docs/diagnosis-rules.md, "Repeated spikes")."""

    event: StallEvent
    judged_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event.to_dict(), "judged_at": self.judged_at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _WaitingSpike:
        return cls(StallEvent.from_dict(data["event"]), int(data["judged_at"]))


TEXT_TAG = "optdiag/diagnosis"


def _dataset_size(trainer: Any, batch_size: int | None) -> int | None:
    """Samples per epoch: the batch size when an epoch is one batch (full batch), else the dataset's length; None
    when its items are whole batches (a loader with ``batch_size=None``: the length counts batches, not samples) or
    it has no length."""
    batches = getattr(trainer, "num_training_batches", None)
    if batches == 1 and batch_size:
        return int(batch_size)
    loader = getattr(trainer, "train_dataloader", None)
    if getattr(loader, "batch_size", 0) is None:
        return None
    try:
        return int(len(loader.dataset))
    except (AttributeError, TypeError):
        return None


def _number(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def _finite_mean(values: list[float]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def gradient_pairs(records: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """Mean inner product of consecutive gradients and mean product of their norms, from the monitor's records.

    A record with a finite ``grad_cosine`` and the record of the step before it form a pair:
    ``g_t . g_(t-1) = cos * |g_t| |g_(t-1)|``. Over many pairs the mean inner product estimates ``|G|^2`` (the
    minibatch noise of two different batches averages out) and the mean ``|g_t| |g_(t-1)|`` estimates
    ``|G|^2 + tr(Sigma)/B`` (the product, not the squares: a gradient that merely shrinks from step to step, as a
    full-batch one does, must not look noisy).

    The pairs' cosines, each pair counting once (``grad_pair_cosine``, with its standard error), test whether
    consecutive gradients point against each other: unlike the ratio of the means above, a few pairs with large
    gradients (a spike's steps) do not outweigh the rest, so which steps a cadence happened to sample matters less.

    Returns:
        ``grad_pair_count``, ``grad_pair_dot`` (mean), ``grad_pair_dot_stderr``, ``grad_pair_sq``,
        ``grad_pair_cosine`` (mean) and ``grad_pair_cosine_stderr``; the numbers are None without pairs (the
        standard errors with fewer than two).

    Example:
        >>> recs = [{"step": 0, "grad_norm": 2.0}, {"step": 1, "grad_norm": 1.0, "grad_cosine": 0.5}]
        >>> gradient_pairs(recs)["grad_pair_dot"], gradient_pairs(recs)["grad_pair_cosine"]
        (1.0, 0.5)
    """
    norms = {r.get("step"): r.get("grad_norm") for r in records}
    dots, squares, cosines = [], [], []
    for r in records:
        cosine, now, before = r.get("grad_cosine"), r.get("grad_norm"), norms.get(r.get("step", -2) - 1)
        if None in (cosine, now, before) or not all(math.isfinite(v) for v in (cosine, now, before)):
            continue
        dots.append(cosine * now * before)
        squares.append(now * before)
        cosines.append(cosine)
    n = len(dots)
    if not n:
        return {"grad_pair_count": 0, "grad_pair_dot": None, "grad_pair_dot_stderr": None, "grad_pair_sq": None,
                "grad_pair_cosine": None, "grad_pair_cosine_stderr": None}
    mean, mean_cosine = sum(dots) / n, sum(cosines) / n
    return {"grad_pair_count": n, "grad_pair_dot": mean, "grad_pair_dot_stderr": _standard_error(dots, mean),
            "grad_pair_sq": sum(squares) / n, "grad_pair_cosine": mean_cosine,
            "grad_pair_cosine_stderr": _standard_error(cosines, mean_cosine)}


def _standard_error(values: list[float], mean: float) -> float | None:
    n = len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None


class StallDiagnoser(OptDiagCallback):
    """Detect when the training loss stops going down and diagnose why, with evidence and suggestions.

    At every optimizer step the training loss (averaged over gradient accumulation and over ranks, so that every
    rank takes the same decision) goes into a :class:`~optdiag.diagnosis.StallDetector`, which declares a stall only
    when the losses prove it against their own noise, a spike once it has recovered, and divergence for a
    non-finite loss or a sustained rise (``docs/diagnosis-rules.md``). While the losses look flat but are too noisy
    to prove it, the loss on the fixed probe batches is read every ``probe_every`` steps (eval-mode forward passes)
    into a second detector that decides sooner. At an event the diagnoser gathers the evidence:

    * a curvature snapshot now, charged to the Hessian monitor's budget (cheapest evidence first: a warm
      ``lambda_max``, ``lambda_min``, batch sharpness; :meth:`HessianMonitor.measure`); when the budget cannot pay
      for it, the newest curvature measured within the stalled horizon. None for a non-finite loss; at most
      ``max_snapshots`` per run;
    * from the gradient monitor, the mean ``|g|``, cosines and the consecutive-gradient pairs of the stalled horizon
      (the "gradient is about zero" test) and the early-training ``|g|``;
    * for a spike, the probe batches' loss at its worst and after it (a spike of the model, not of a few batches);
    * lr, momentum and the optimizer kind with its stability threshold.

    :func:`~optdiag.diagnosis.diagnose_stall` turns them into a :class:`~optdiag.diagnosis.Diagnosis`, or into
    nothing when they do not decide: the stall is then looked at again every half window for four windows, and
    otherwise no verdict is given (a debug record in :attr:`undecided`). A saddle verdict also carries the escape
    direction's expected drop ``1/2 lambda_min t^2`` at the step ``t`` the diagnosis quotes (``escape_distance``), and
    the drop actually measured along the eigenvector on the probe batches (``escape_t``, ``escape_expected_drop``,
    ``escape_measured_drop``); the model is never written. Every verdict states what it predicts; the prediction is
    checked a few windows later (``evidence["outcome"]``).

    Each diagnosis is appended to :attr:`diagnoses`, to ``<log_dir>/optdiag/events.jsonl`` (global rank 0; the
    first logger's ``log_dir``, else ``trainer.default_root_dir``; the file is appended to, never overwritten; an
    outcome is a later ``{"record": "outcome", ...}`` line) and, with a ``TensorBoardLogger``, to a text panel
    (``optdiag/diagnosis``) holding its evidence and suggestion tables. A short summary is printed when ``fit`` ends
    (rank 0). Nothing raises into the training loop.

    **Monitors.** The diagnoser uses the :class:`GradientNormMonitor` and :class:`HessianMonitor` passed to it or
    found in ``trainer.callbacks``. Missing ones are created privately and driven by the diagnoser itself: the
    private gradient monitor logs as usual (no one else does), the private Hessian monitor only collects its probe
    batches and measures at stalls (no scheduled snapshots). :class:`~optdiag.OptDiag` bundles all three.

    Args:
        window: losses the stall test fits (the detector's window).
        min_window: fewest losses before a stall may be declared.
        rel_improvement: relative improvement across a window below which the loss counts as stalled.
        max_snapshots: curvature snapshots the diagnoser may request per run (each bounded in HVPs, and all of
            them in time by the Hessian monitor's budget, see above).
        probe_every: read the probe batches' loss every this many steps while the losses look flat without
            proving it (``0`` switches it off).
        escape_check: evaluate the real loss along a saddle's escape direction (two probe-set forward passes).
        loss_floor: the loss you would be happy with, if you know it (passed to the diagnosis as evidence).
        verbose: print the end-of-fit summary (global rank 0).
        gradient_monitor, hessian_monitor: monitors to use instead of looking in ``trainer.callbacks``.
        **detector_kwargs: further :class:`~optdiag.diagnosis.StallDetector` settings (``confidence``,
            ``cooldown``, ``resolution``, ``spike_sigmas``, ``rise_tolerance``, ``check_every``: 10 here).

    Attributes:
        diagnoses: every diagnosis so far, oldest first.
        detector: the :class:`~optdiag.diagnosis.StallDetector`; probe_detector: the one on the probe-set losses.
        undecided: one record per check that did not decide (debugging only).
        n_probe_losses, probe_seconds: probe-set losses read, and their wall time.

    Example:
        >>> import pytorch_lightning as pl
        >>> diagnoser = StallDiagnoser(window=100)
        >>> trainer = pl.Trainer(callbacks=[diagnoser], max_steps=2000)  # doctest: +SKIP
        >>> trainer.fit(model, data)  # doctest: +SKIP
        >>> [(d.step, d.kind) for d in diagnoser.diagnoses]  # doctest: +SKIP
        [(412, 'saddle_point')]
    """

    def __init__(
        self,
        window: int = 50,
        min_window: int = 20,
        rel_improvement: float = 0.01,
        *,
        max_snapshots: int = 20,
        escape_check: bool = True,
        loss_floor: float | None = None,
        verbose: bool = True,
        gradient_monitor: GradientNormMonitor | None = None,
        hessian_monitor: HessianMonitor | None = None,
        probe_every: int = 5,
        **detector_kwargs: Any,
    ) -> None:
        super().__init__()
        detector_kwargs.setdefault("check_every", 10)  # the fit is most of the per-step cost (docs/performance.md)
        self.detector = StallDetector(window=window, min_window=min_window, rel_improvement=rel_improvement,
                                      **detector_kwargs)
        self.probe_every = check_number("probe_every", probe_every, low=0, integer=True)
        self.window, self.min_window, self.rel_improvement = window, min_window, rel_improvement
        # The probe-set loss: the same few fixed batches every probe_every steps (or a multiple, as the budget
        # allows), so it carries no batch-to-batch noise and proves a stall within a window or two where minibatch
        # losses need many (docs/diagnosis-rules.md)
        probe_window, probe_improvement = self._probe_window(1)
        self.probe_detector = None if not self.probe_every else StallDetector(
            window=probe_window, min_window=probe_window, rel_improvement=probe_improvement,
            **{k: v for k, v in detector_kwargs.items() if k in ("confidence", "resolution", "max_horizon")})
        if isinstance(max_snapshots, bool) or not isinstance(max_snapshots, int) or max_snapshots < 0:
            raise UsageError(f"max_snapshots must be an int >= 0, got {max_snapshots!r}")
        if loss_floor is not None and (isinstance(loss_floor, bool) or not isinstance(loss_floor, (int, float))
                                       or not math.isfinite(loss_floor)):
            raise UsageError(f"loss_floor must be a finite number or None, got {loss_floor!r}")
        if gradient_monitor is not None and not isinstance(gradient_monitor, GradientNormMonitor):
            raise UsageError(f"gradient_monitor must be a GradientNormMonitor, got {type(gradient_monitor).__name__}")
        if hessian_monitor is not None and not isinstance(hessian_monitor, HessianMonitor):
            raise UsageError(f"hessian_monitor must be a HessianMonitor, got {type(hessian_monitor).__name__}")
        self.max_snapshots = max_snapshots
        self.escape_check = bool(escape_check)
        self.loss_floor = None if loss_floor is None else float(loss_floor)
        self.verbose = bool(verbose)
        self._given = (gradient_monitor, hessian_monitor)
        self.gradient_monitor: GradientNormMonitor | None = gradient_monitor
        self.hessian_monitor: HessianMonitor | None = hessian_monitor
        self._private: dict[str, OptDiagCallback] = {}
        self.diagnoses: list[Diagnosis] = []
        self.n_snapshots = 0
        self.thresholds = Thresholds.from_detector(self.detector)
        self.undecided: list[dict[str, Any]] = []  # evidence of checks that did not decide (a debug trail)
        self._open: list[int] = []  # indices of verdicts whose prediction has not been checked yet
        self._next_check: float | None = None  # the earliest step an open prediction is due (None: to compute)
        self.n_spikes = 0
        self.n_probe_losses = 0  # probe-set losses read to prove or refute a stall, and their seconds
        self.probe_seconds = 0.0
        self._loss_initial: float | None = None
        self._loss_min = math.inf
        self._grad_norms_initial: list[float] = []
        self._initial_until: int | None = None  # the early-training |g| is collected from steps before this one
        # the probe reads' episode: every stride * probe_every steps from its first read's step (kept with the
        # probe detector, whose window they set, when a run is resumed)
        self._probe_stride: int | None = None
        self._probe_start: int | None = None
        self._probe_quiet_until = -1  # no episode starts before this step (one ended early: _quiet_probing)
        self._early_ends = 0  # probe episodes ended early in a row (_quiet_probing)
        # verdicts in flight, checkpointed: an undecided stall and a repeated spike waiting for gradient pairs
        # (_waits_for_pairs: event, the step it is judged at)
        self._pending: _PendingStall | None = None
        self._waiting_spike: _WaitingSpike | None = None
        # a resumed fit asks the gradient monitor again for every step up to this one (what they wait for)
        self._rearm_until: int | None = None
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._pending_losses: list[float] = []
        self._last_step_seen: int | None = None
        self._batch_size: int | None = None
        self._dataset_size: int | None = None
        self._steps_run = 0
        self._last_loss: float | None = None
        self._first_loss_this_fit: float | None = None
        self._diagnoses_at_fit_start = len(self.diagnoses)
        self._last_gradient_step: int | None = None  # the gradient monitor's last record already looked at
        self._probing_until: int | None = None  # the probe loss is read up to this step
        self._probe_price: float | None = None  # what the last probe-set loss took (HessianMonitor.can_afford_extra)
        self._spike_probe: float | None = None  # the probe loss when the spike in progress started
        self._step_loss: DeferredValue | None = None  # this step's loss, requested at backward, read at the step
        self._step_scale: DeferredValue | None = None  # the loss scale backward saw (mixed precision)
        self._step_value: float | None = None  # its value, read there
        self._brief_events: list[StallEvent] = []  # brief spikes confirmed before this step's end
        self._brief_reads = 0  # probe losses read for brief spikes this fit
        self._brief_enabled = False  # decided in on_train_start (_brief_spikes)
        self._automatic = False  # automatic optimization: the loss backward sees is the outputs' (on_train_start)
        self._distributed = False  # more than one process (decided in on_train_start)
        self._scaled = False  # mixed precision with a GradScaler (decided in on_train_start)
        # (step, loss) since the oldest verdict whose prediction is still open (for the retrospective check)
        self._recent_losses: list[tuple[int, float]] = []

    def _state_key_arguments(self) -> dict[str, Any]:
        return {"window": self.window, "min_window": self.min_window, "rel_improvement": self.rel_improvement}

    # --- monitors -------------------------------------------------------------------------------------------------
    def _resolve_monitors(self, trainer: Any) -> None:
        """Given monitors first, then those in ``trainer.callbacks``, else private ones (created once)."""
        given_gradient, given_hessian = self._given
        callbacks = list(getattr(trainer, "callbacks", []))
        self.gradient_monitor = given_gradient or next(
            (cb for cb in callbacks if isinstance(cb, GradientNormMonitor)), None)
        self.hessian_monitor = given_hessian or next(
            (cb for cb in callbacks if isinstance(cb, HessianMonitor)), None)
        if self.gradient_monitor is None:
            self.gradient_monitor = self._private_monitor("gradient_monitor")
        else:
            self._private.pop("gradient_monitor", None)
        if self.hessian_monitor is None:
            self.hessian_monitor = self._private_monitor("hessian_monitor")
        else:
            self._private.pop("hessian_monitor", None)

    def _private_monitor(self, name: str) -> Any:
        """The private monitor called ``name``, created on first use (cheap settings: no per-layer norms)."""
        if name not in self._private:
            self._private[name] = (GradientNormMonitor(per_layer=False, histogram_every_n_steps=0)
                                   if name == "gradient_monitor" else HessianMonitor())
        return self._private[name]

    def _drive(self, hook: str, *args: Any) -> None:
        """Forward a hook to the private monitors (never the Hessian monitor's schedule: it measures at stalls)."""
        for name, monitor in self._private.items():
            if name == "hessian_monitor" and hook == "on_train_batch_end":
                continue
            getattr(monitor, hook)(*args)

    # --- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.check_strategy(trainer)
        self._resolve_monitors(trainer)
        self.set_hook_idle("on_after_backward", not self._private)  # it only forwards to the private monitors
        if self.gradient_monitor is not None:
            # its gradient tests need many pairs only where a stretch is judged (on_train_batch_end)
            self.gradient_monitor.pairs_on_demand()
        self._drive("setup", trainer, pl_module, stage)

    @guarded
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._drive("on_train_start", trainer, pl_module)
        self._reset_transient()
        # the step before this fit's first optimizer step: the first accumulation window ends when the step moves on
        # (with the step unknown, its first micro-batch alone made a window, and every later window straddled two)
        self._last_step_seen = global_step(trainer)
        self._brief_enabled = self._brief_spikes(trainer)  # once per fit, not on every backward
        self._automatic = bool(getattr(pl_module, "automatic_optimization", True))
        self._distributed = OptDiagCallback.world_size(trainer) > 1  # once per fit, not on every step
        self._scaled = grad_scaler(trainer) is not None  # a GradScaler scales the loss backward sees
        last = self.detector.state_dict()["last_step"]
        if last is not None and global_step(trainer) < int(last):
            self.detector.reset()  # a new run from step 0, not a resume: the old loss history does not apply
            self._probe_quiet_until, self._early_ends = -1, 0
            self._pending = self._waiting_spike = None
            if self.probe_detector is not None:
                self._end_probing()
        # the gradient monitor forgets at its own train start which steps it was asked to measure: asked again at
        # the first batch, when every callback has started
        waits = [self._waiting_spike.judged_at] if self._waiting_spike is not None else []
        waits += [self._pending.retry] if self._pending is not None and self._pending.every_step else []
        self._rearm_until = max(waits, default=None)

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._drive("on_train_batch_start", trainer, pl_module, batch, batch_idx)
        if self._rearm_until is not None:
            if self.gradient_monitor is not None:
                self.gradient_monitor.measure_every_step(until=self._rearm_until)
            self._rearm_until = None
        if batch_idx == 0 or self._batch_size is None:  # an epoch's first batch: full (a ragged one comes last)
            self._batch_size = batch_size_of(batch) or self._batch_size
        if self._dataset_size is None:
            self._dataset_size = _dataset_size(trainer, self._batch_size)

    @guarded
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._drive("on_after_backward", trainer, pl_module)

    @guarded
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if (self._brief_enabled or self._automatic) and isinstance(loss, torch.Tensor):
            # requested now, read before the step (the brief-spike test) or at the batch's end: on a GPU the read
            # waits for the forward pass only, where a read of the outputs' loss at the batch's end would wait for
            # the backward pass too (for every micro-batch of an accumulation step; docs/performance.md section 9)
            self._step_loss = DeferredValue(loss)
            self._step_scale = deferred_loss_scale(trainer) if self._scaled else None

    def _read_step_loss(self) -> float:
        """The loss backward saw, unscaled (mixed precision scales it by a power of two: exact), which is the batch's
        loss in the outputs too (automatic optimization; divided by ``accumulate_grad_batches``, like them)."""
        loss, self._step_loss = self._step_loss.get(), None
        if self._step_scale is not None:
            loss /= self._step_scale.get()
        return loss

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._drive("on_before_optimizer_step", trainer, pl_module, optimizer)
        if self._brief_enabled and self._step_loss is not None:
            # one batch per step: the step's loss, read once, kept for on_train_batch_end
            self._step_value = self._read_step_loss()
            if self.detector.brief_spike_may_start(self._step_value):  # the usual step stops here
                self._brief_spike(trainer, pl_module, global_step(trainer) + 1, self._step_value)

    @guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._drive("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
        loss, self._step_value = self._step_value, None
        if self._automatic and loss is None and self._step_loss is not None:
            loss = self._read_step_loss()  # a micro-batch of an accumulation step, or no brief-spike test
        if self._automatic and loss is not None:
            # the outputs' loss, read without waiting for the backward pass: the triage's read of it too
            remember_loss(outputs, loss)
            loss = undivided_loss(loss, trainer)  # training_step's loss, as step_loss_of gives it
        else:
            loss = step_loss_of(trainer, pl_module, outputs)
        if loss is None:
            self.warn_once("no-loss", "StallDiagnoser found no loss in training_step's output (return the loss "
                           "tensor or a dict with 'loss'); stall detection is off.")
            return
        self._pending_losses.append(loss)
        step = global_step(trainer)
        if step == self._last_step_seen:
            return  # gradient accumulation: no optimizer step yet
        self._last_step_seen = step
        loss = self._reduced_mean(trainer, self._pending_losses)
        self._pending_losses = []
        self._track(loss)
        event = self.detector.update(step, loss)
        if self.gradient_monitor is not None and (self.detector.looks_flat or self.detector.in_spike):
            # a stretch that may become a verdict: its gradient tests get pairs at the priced cadence (3%), not the
            # routine one (1%), for the two windows the probe loss also looks at (docs/diagnosis-rules.md)
            self.gradient_monitor.measure_pairs_until(step + 2 * self.thresholds.window)
        self._follow_spike(trainer, pl_module, event)
        probe_event = self._probe(trainer, pl_module, step)
        if event is None and probe_event is not None and probe_event.reason == "stall" and not self.detector.stalled \
                and not self.detector.diverged:
            # the probe loss proved the stall first: the minibatch detector takes it as its own (one verdict)
            self.detector.mark_stalled()
            event = probe_event
            self._early_ends = 0
        elif event is not None and event.reason == "stall" and self.probe_detector is not None:
            self.probe_detector.mark_stalled()
            self._early_ends = 0
        if self._waiting_spike is not None and (self._brief_events or event is not None
                                                or step >= self._waiting_spike.judged_at):
            self._judge_waiting_spike(trainer, pl_module, step)  # before a new event: verdicts in their spikes' order
        for brief in self._brief_events:
            self._handle(trainer, pl_module, brief)
        self._brief_events = []
        if event is not None:
            self._pending = None
            self._handle(trainer, pl_module, event)
        elif self._pending is not None and step >= self._pending.retry:
            self._retry(trainer, pl_module, step)
        self._check_predictions(trainer, step, loss)

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._drive("on_train_end", trainer, pl_module)
        if self._waiting_spike is not None:  # the run ends before the pairs: judged with those it has
            self._judge_waiting_spike(trainer, pl_module, global_step(trainer))
        if self.verbose and trainer.is_global_zero:
            print(self.summary(), flush=True)

    def _probe(self, trainer: Any, pl_module: Any, step: int) -> StallEvent | None:
        """While the minibatch losses look flat without proving it, the loss on the Hessian monitor's fixed probe
        batches (forward passes only, the model never written) goes into the probe detector: no batch-to-batch
        noise, so it proves or refutes the stall within a window or two. The reads come every ``probe_every`` steps,
        or every ``stride * probe_every`` when that is what the fit earns (:meth:`_plan_probe_stride`, once per
        episode of flat-looking losses: evenly spaced reads, whose windows span the same steps at any stride). Their
        time is kept in ``probe_seconds`` and charged to the monitor's budget, and a read runs only when the budget
        holds it above the stall reserve (:meth:`HessianMonitor.can_afford_extra`). Its stall event is returned,
        with its horizon in steps."""
        monitor = self.hessian_monitor
        if self.probe_detector is None or step % self.probe_every or monitor is None or not monitor.enabled:
            return None
        if self.detector.looks_flat and not (self.detector.stalled or self.detector.diverged) \
                and step >= self._probe_quiet_until:
            self._probing_until = step + 2 * self.thresholds.window  # long enough for the probe loss to decide
        if self._probing_until is None or step > self._probing_until:
            # measure more only while (and shortly after) the minibatch losses look flat but cannot prove it
            if self._probing_until is not None:
                self._end_probing()
                self._early_ends = 0  # the flat look went away by itself: the next one is a new situation
            return None
        if self._probe_stride is not None and (step - self._probe_start) % (self._probe_stride * self.probe_every):
            return None
        value = self._probe_loss(trainer, pl_module, step, "probe_loss")  # None when the budget cannot hold it
        if value is None or not math.isfinite(value):
            return None  # not collected yet, refused by the budget, or a diverging run (the minibatch detector's)
        if self._probe_stride is None:  # the episode's first read: now priced, it sets the spacing of the rest
            self._probe_stride, self._probe_start = self._plan_probe_stride(trainer, step), step
            self.probe_detector.set_window(*self._probe_window(self._probe_stride))
        event = self.probe_detector.update(step, value)
        if event is None and not self.probe_detector.stalled:
            # reads that refute the flat look the minibatch losses still have (an episode that outlives its flat
            # look is left to run: a descent's end is where a plateau may begin), or that cannot tell
            improving = self.probe_detector.surely_improving(MIN_PROBE_READS)
            if improving and self.detector.looks_flat:
                self._quiet_probing(step)
                return None
            if not improving and not self._probe_informative():
                # a futile episode ended before its full judgement saves those reads, not the quiet after them
                unread = self._judged_reads() - self.probe_detector.n_losses
                self._quiet_probing(step + max(0, unread) * self.probe_every * self._probe_stride)
                return None
        if event is None or event.reason != "stall":
            return None
        event.horizon *= self.probe_every * self._probe_stride  # in steps, like the minibatch detector's
        event.trigger = "flat_probe"
        return event

    def _end_probing(self) -> None:
        self.probe_detector.reset()
        self._probing_until = self._probe_stride = self._probe_start = None

    def _probe_informative(self) -> bool:
        """Whether the episode's probe losses can settle the trend, and sooner than the minibatch losses over the
        same steps. With ``n`` reads ``s`` steps apart against ``n s`` minibatch losses, a trend's interval
        narrows as ``noise * sqrt(s)`` against the minibatch losses' noise (relative to their levels): reads
        clearly no less noisy than that (:data:`PROBE_NOISE_MARGIN`; a model whose weights bounce near the floor
        moves its fixed batches' loss as much as the batches do) only cost. Judged once the probe detector holds a
        window of reads and at least ``2 MIN_PROBE_READS`` (the median of fewer differences is a guess, and the knee
        of a fast descent's end would pass for noise), against the minibatch noise of the two windows "looks flat"
        judges; from ``MIN_PROBE_READS + 1`` reads until then, only reads clearly futile by the wider
        :data:`PROBE_FUTILE_MARGIN` end the episode (each read of a hopeless episode is half a training step)."""
        reads = self.probe_detector.n_losses
        if reads <= MIN_PROBE_READS:
            return True
        spacing = self.probe_every * (self._probe_stride or 1)
        probe_noise = self.probe_detector.relative_noise(reads)
        minibatch_noise = self.detector.relative_noise(2 * self.thresholds.window)
        if reads < self._judged_reads():
            # early: only reads far noisier than the minibatch losses end it (PROBE_FUTILE_MARGIN), sooner
            return not probe_noise * math.sqrt(spacing) >= PROBE_FUTILE_MARGIN * minibatch_noise
        if probe_noise * math.sqrt(spacing) >= PROBE_NOISE_MARGIN * minibatch_noise:  # NaN: no evidence against them
            return False
        # and they can prove a stall within the reads so far and two windows more (near a classifier's zero loss
        # the fixed batches' loss swings by a third between reads: far less than the batches, far too much to tell),
        # at their noise over the same reads as above (a window's few differences would be a guess)
        return self.probe_detector.could_prove_flat(reads + 2 * self.probe_detector.window, reads)

    def _judged_reads(self) -> int:
        """Reads an episode holds when :meth:`_probe_informative` judges it in full: a window, and at least
        ``2 MIN_PROBE_READS``."""
        return max(self.probe_detector.window, 2 * MIN_PROBE_READS)

    def _quiet_probing(self, step: int) -> None:
        """The probe losses surely fall faster than the stall limit (no stall), or cannot tell sooner than the
        minibatch losses (:meth:`_probe_informative`): the episode ends, and the minibatch losses' flat look starts
        no new one for :data:`PROBE_QUIET_WINDOWS` windows, doubled for each such end in a row up to
        :data:`MAX_PROBE_QUIET_WINDOWS` (reads that keep ending so are a healthy run's cost; a stall that begins
        meanwhile is read later, or proven by the minibatch losses themselves)."""
        self._early_ends += 1
        windows = min(PROBE_QUIET_WINDOWS * 2 ** (self._early_ends - 1), MAX_PROBE_QUIET_WINDOWS)
        self._probe_quiet_until = step + windows * self.thresholds.window
        self._end_probing()

    def _probe_window(self, stride: int) -> tuple[int, float]:
        """The probe detector's window for reads every ``stride * probe_every`` steps: the reads that span a window
        of steps (at least :data:`MIN_PROBE_READS`: a handful of smooth probe losses would "prove" any short lull
        flat), at the minibatch detector's relative improvement per step."""
        spacing = max(self.probe_every, 1) * stride
        reads = max(MIN_PROBE_READS, self.window // spacing)
        return reads, self.rel_improvement * (reads - 1) * spacing / (self.window - 1)

    def _plan_probe_stride(self, trainer: Any, step: int) -> int:
        """Reads every ``stride * probe_every`` steps, ``stride`` the least that lets them live on
        :data:`PROBE_READ_SHARE` of what the fit earns (the rest refills the stall reserve), at most
        :data:`MAX_PROBE_STRIDE` (the budget guard then skips a read it cannot pay). One clock decision per
        episode, not one per read, so the reads stay evenly spaced (and the same on every rank)."""
        earn = self.hessian_monitor.steps_to_earn(trainer, step, self._probe_price / PROBE_READ_SHARE)
        return min(MAX_PROBE_STRIDE, max(1, -(-earn // self.probe_every)))

    def _probe_loss(self, trainer: Any, pl_module: Any, step: int, what: str, per_batch: bool = False) -> Any:
        """The loss on the Hessian monitor's fixed probe batches at the current point (their mean, or with
        ``per_batch`` the list of each batch's, one process only), in eval mode (forward passes only, the model's
        state restored); None until the set is complete (a loss over a changing set would not compare over time).
        Taken only when the monitor's budget holds it (:meth:`HessianMonitor.can_afford_extra`, priced at the last
        read), None otherwise; charged as ``what`` at ``step``, and counted in ``n_probe_losses`` and
        ``probe_seconds``."""
        monitor = self.hessian_monitor
        if monitor is None or not monitor.enabled:
            return None
        batches = monitor.probe_set()
        if len(batches) < monitor.probe_batches:
            return None
        # From the one budget all measurement is charged to, above the stall reserve (HessianMonitor.
        # can_afford_extra), whatever asked for the read: a clock decision, rank 0's under DDP (every rank calls it,
        # since every rank must meet in the all-reduce). A refused read is None, like a read not yet possible.
        if not monitor.can_afford_extra(trainer, self._probe_price):
            return None
        # Eval mode: a deterministic function of the weights (no dropout draw, BatchNorm on its running statistics),
        # which is all a trend or a before/after ratio needs, at the price of plain forward passes.
        with monitor.charged(step, what, merge=True) as charge, preserved_state(pl_module), torch.no_grad():
            pl_module.eval()
            sizes = [batch_size_of(b) or 1 for b in batches]
            losses = [float(monitor.loss_fn(pl_module, b)) for b in batches]
            value = losses if per_batch else self._reduced_mean(
                trainer, [sum(n * x for n, x in zip(sizes, losses)) / sum(sizes)])
        self._probe_price = charge.seconds  # priced as charged: on the monitor's clock, the same figure
        self.probe_seconds += self._probe_price
        self.n_probe_losses += 1
        return value

    def _brief_spikes(self, trainer: Any) -> bool:
        """Brief spikes are read on the model before its step: one process, one batch per step (the loss then is
        the step's loss, the same on every rank), and probe losses allowed."""
        return self.probe_detector is not None and OptDiagCallback.world_size(trainer) == 1 \
            and int(getattr(trainer, "accumulate_grad_batches", 1) or 1) == 1

    def _brief_spike(self, trainer: Any, pl_module: Any, step: int, loss: float) -> None:
        """A spike of a step or two, which no median of losses shows: when the minibatch loss of ``step`` jumps
        (:meth:`StallDetector.brief_spike_start`), the loss of each probe batch is read at this point, before the
        optimizer moves it, and every few steps after until the detector decides whether the model's loss on those
        batches rose and came back (a spike) or not (one hard batch; docs/diagnosis-rules.md)."""
        detector = self.detector
        value: list[float | None] = []  # the model's loss at this point, read at most once

        def read() -> None:
            if not value:
                value.append(self._probe_loss(trainer, pl_module, step, "brief_spike_read", per_batch=True))
                self._brief_reads += value[0] is not None  # a read the budget refused (None) costs none
            candidate = detector.brief_spike or {}
            event = detector.brief_spike_read(step, value[0])  # no read (None): the nomination is dropped
            if event is not None:
                self._brief_events.append(event)  # handled with this step's other events (on_train_batch_end)
            elif detector.brief_spike is None and candidate.get("reads"):
                # dismissed (one hard batch, not the model) or left unread: a debug record only, like an undecided
                # spike
                reads = candidate["reads"] + [(float(step), value[0])]
                self.undecided.append({"step": step, "reason": "brief_spike", "tries": 1, "scores": {}, "tests": {},
                                       "spike": dict(candidate, reads=reads)})

        if detector.brief_spike_due(step):
            read()
        # An allowance in steps, so that the same run reads the same spikes: four reads (two candidates: a spike
        # often comes in a cluster of jumps) at any time, and BRIEF_READ_SHARE reads per step after that; each read
        # also waits for the monitor's budget (_probe_loss), so that a storm of hard batches stays within it.
        allowance = 4 + BRIEF_READ_SHARE * self._steps_run
        if self._brief_reads + 2 - len(value) <= allowance and detector.brief_spike_start(step, loss):
            read()

    def _follow_spike(self, trainer: Any, pl_module: Any, event: StallEvent | None) -> None:
        """Tell a spike of the model from one of the batches: the probe batches' loss at the spike's worst (its start
        and each new peak) and when it has recovered. The same batches at both points, so only the parameters differ: a model that got
        worse shows it on them too, a few hard minibatches do not (``spike_probe_ratio``, docs/diagnosis-rules.md)."""
        if self.detector.in_spike:
            # at the spike's start and at each new peak of the losses: the model at its worst
            if self._spike_probe is None or self.detector.spike_peaked:
                value = self._probe_loss(trainer, pl_module, global_step(trainer), "spike_probe")
                value = math.nan if value is None else value  # not measurable: judged on the losses alone
                self._spike_probe = value if self._spike_probe is None or not value <= self._spike_probe \
                    else self._spike_probe
        elif event is not None and event.reason == "spike":
            during, after = self._spike_probe, self._probe_loss(trainer, pl_module, event.step, "spike_probe")
            self._spike_probe = None
            if during is not None and after is not None and math.isfinite(during) and math.isfinite(after) \
                    and after > 0:
                event.spike.update(probe_loss_during=during, probe_loss_after=after)
        elif not self.detector.in_spike:
            self._spike_probe = None  # a spike dropped unrecovered, or none

    # --- per-step bookkeeping -------------------------------------------------------------------------------------
    def _reduced_mean(self, trainer: Any, losses: list[float]) -> float:
        """The mean loss over the accumulation window and over ranks (identical on every rank)."""
        if len(losses) == 1 and not self._distributed:
            return losses[0]  # the usual step: one batch, one process
        local = sum(losses) / len(losses)
        if self._distributed:
            reduced = trainer.strategy.reduce(torch.tensor(local, dtype=torch.float64,
                                                           device=trainer.strategy.root_device), reduce_op="mean")
            return float(reduced)
        return local

    def _track(self, loss: float) -> None:
        self._steps_run += 1
        self._last_loss = loss
        if math.isfinite(loss):
            if self._loss_initial is None:
                self._loss_initial = loss
            if self._first_loss_this_fit is None:
                self._first_loss_this_fit = loss
            self._loss_min = min(self._loss_min, loss)
        self._track_initial_gradient()

    def _track_initial_gradient(self) -> None:
        """Collect ``|g|`` of the measured steps among the first ``_INITIAL_STEPS`` steps of the run (the gradient
        monitor may measure only every few steps, so each measured step is taken once)."""
        if self._initial_until is not None and self._last_gradient_step is not None \
                and self._last_gradient_step >= self._initial_until:
            return  # the early-training window is over: nothing more to collect
        latest = self.gradient_monitor.latest if self.gradient_monitor is not None else {}
        step, norm = latest.get("step"), latest.get("grad_norm")
        if step is None or step == self._last_gradient_step:
            return
        self._last_gradient_step = step
        if self._initial_until is None:
            self._initial_until = step + _INITIAL_STEPS
        if step < self._initial_until and norm is not None and math.isfinite(norm):
            self._grad_norms_initial.append(float(norm))

    # --- a stall --------------------------------------------------------------------------------------------------
    def _handle(self, trainer: Any, pl_module: Any, event: StallEvent, tries: int = 0,
                reuse_curvature: bool = False, pairs_until: int | None = None) -> None:
        """Gather the evidence for a detector event and record the verdict, or note that it did not decide.
        ``reuse_curvature``: a retry whose first look measured the curvature tests (only the gradient or the loss
        did not decide) takes that curvature again, within the stalled horizon, instead of a new snapshot.
        ``pairs_until``: a spike judged again takes the gradient pairs measured after it up to this step too."""
        if event.reason == "spike" and tries == 0:
            self.n_spikes += 1
        snapshot = self._recent_curvature(event) if reuse_curvature else {}
        snapshot = snapshot or self._snapshot(trainer, pl_module, event)
        evidence = self._evidence(trainer, pl_module, event, snapshot, pairs_until)
        undecided: list[dict[str, Any]] = []
        diagnosis = diagnose_stall(evidence, event, self.thresholds, undecided=undecided)
        if diagnosis is not None and tries == 0 and self._waits_for_pairs(event, evidence, diagnosis):
            # Repeated spikes may be the bounce of a step too large for the curvature (an oscillation), which the
            # consecutive gradients before the spike could not tell for want of pairs (a cadence priced sparser than
            # every 12 steps leaves fewer than MIN_GRADIENT_PAIRS in the two windows): rather than call it a
            # loss_spike by default, measure every step just after it and judge it again with those pairs too
            # (docs/diagnosis-rules.md, "Repeated spikes").
            judged_at = event.step + MIN_GRADIENT_PAIRS + 2  # the gradient of step s is measured before step s + 1
            self.gradient_monitor.measure_every_step(until=judged_at)
            self._waiting_spike = _WaitingSpike(event, judged_at)
            return
        if diagnosis is None:
            # No verdict without evidence: keep the record for debugging only, and look again later (more gradient
            # pairs, perhaps a scheduled curvature estimate) while the loss stays stalled.
            record = undecided[0] if undecided else {}
            self.undecided.append({"step": event.step, "reason": event.reason, "tries": tries + 1,
                                   "scores": record.get("scores", {}), "tests": record.get("tests", {}),
                                   "spike": record.get("spike")})
            LOGGER.debug("optdiag: %s at step %d did not decide a verdict (try %d): %s", event.reason, event.step,
                         tries + 1, self.undecided[-1]["scores"])
            if event.reason == "stall" and tries + 1 < _RETRIES:
                retry = event.step + max(1, self.thresholds.window // 2)
                every_step = record.get("tests", {}).get("grad_zero") is None and self.gradient_monitor is not None
                if every_step:
                    # too few consecutive-gradient pairs to judge the gradient against its noise: measure every
                    # step, and look again as soon as there are enough pairs (the stall may not last half a window)
                    retry = min(retry, event.step + MIN_GRADIENT_PAIRS + 1)
                    self.gradient_monitor.measure_every_step(until=retry)
                # A stall barely moves the point: when the curvature tests were measured, the next look needs the
                # gradient and the losses gathered since, not another snapshot at full price (docs/diagnosis-rules.md)
                measured = record.get("tests", {}).get("negative_curvature") is not None
                self._pending = _PendingStall(event, tries + 1, retry, measured, every_step)
            return
        # what the verdict's curvature cost, or where it came from when the budget allowed no snapshot now
        diagnosis.evidence.update({k: v for k, v in snapshot.items() if k.endswith("_step") or k in (
            "n_hvp", "n_hvp_parts", "lambda_min_start")})
        if diagnosis.kind == "saddle_point" and self.escape_check:
            try:
                diagnosis.evidence.update(self._escape(trainer, pl_module, diagnosis))
            except (OptDiagError, RuntimeError, ValueError) as error:
                self.warn_once("escape-check", f"the saddle's escape direction could not be evaluated ({error})")
        self._record(trainer, diagnosis)

    def _waits_for_pairs(self, event: StallEvent, evidence: Evidence, diagnosis: Diagnosis) -> bool:
        """Whether a spike's verdict waits for more gradient pairs: a repeated spike (which the oscillation could
        explain, see :func:`~optdiag.diagnosis.diagnose_stall`) called a loss_spike only because the oscillation
        test had fewer than :data:`MIN_GRADIENT_PAIRS` pairs and no stability ratio to go on."""
        return event.reason == "spike" and diagnosis.kind == "loss_spike" and self.gradient_monitor is not None \
            and (evidence.spike_count or 0) >= REPEATED_SPIKES \
            and (evidence.grad_pair_count or 0) < MIN_GRADIENT_PAIRS \
            and diagnosis.evidence.get("tests", {}).get("oscillation_signal") is None

    def _judge_waiting_spike(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Judge the spike that waited for gradient pairs (:meth:`_waits_for_pairs`) with those measured up to
        ``step``: at its step, or sooner when a new event or the end of training comes (a verdict either way)."""
        event, self._waiting_spike = self._waiting_spike.event, None
        self._handle(trainer, pl_module, event, tries=1, reuse_curvature=True, pairs_until=step)

    def _retry(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Look again at an undecided stall, with the evidence gathered since (only while it is still stalled)."""
        event, tries, reuse = self._pending.event, self._pending.tries, self._pending.reuse_curvature
        self._pending = None
        if not self.detector.stalled:
            return
        history = self.detector.state_dict()
        window = self.thresholds.window
        steps, losses = history["steps"][-window:], [float(v) for v in history["losses"][-window:]]
        retried = StallEvent(step=step, reason="stall", slope=event.slope, slope_ci=event.slope_ci,
                             rel_slope=event.rel_slope, window=losses, window_steps=[int(v) for v in steps],
                             trigger=event.trigger, rel_improvement=event.rel_improvement, margin=event.margin,
                             improvement_hi=event.improvement_hi, horizon=event.horizon + (step - event.step),
                             noise=event.noise)
        self._handle(trainer, pl_module, retried, tries, reuse_curvature=reuse)

    def _snapshot(self, trainer: Any, pl_module: Any, event: StallEvent) -> dict[str, Any]:
        """A curvature snapshot at this step, even if one was just scheduled, within the monitor's budget."""
        monitor = self.hessian_monitor
        if monitor is None or event.trigger == "nonfinite" or not monitor.enabled:
            return {}
        if self.n_snapshots >= self.max_snapshots:
            self.warn_once("max-snapshots", f"the {self.max_snapshots} stall snapshots of this run are used up; "
                           "further verdicts rest on the loss and gradient only")
            return {}
        spike = event.reason == "spike"
        if spike:
            # A recovered spike's verdict stands on the losses and the probe batches; a repeated spike's stability
            # ratio uses the last estimate before it. Its own snapshot is routine (earned credit above the stall
            # reserve, which it leaves alone), unless the run was past the stability threshold before it: then only
            # the curvature after it tells a catapult (the loss jumped to a flatter region) from a bounce, and it may
            # use the reserve.
            before = self._ratio_before(event)
            catapult_possible = before is not None and before > 1.0
            if not monitor.can_afford_snapshot(trainer, routine=not catapult_possible):
                return {}
            reserve = 0.0 if catapult_possible else monitor.stall_price() or 0.0
        elif not monitor.can_afford_snapshot(trainer):  # every rank asks: rank 0's answer is broadcast
            recent = self._recent_curvature(event)
            price = monitor.stall_price()
            self.warn_once("over-budget", "a stall snapshot was skipped: the Hessian monitor's budget holds "
                           f"{monitor.budget_balance():.3g} s, less than the "
                           f"{'?' if price is None else format(price, '.3g')} s a stall snapshot is priced at; this "
                           "verdict rests on the last curvature estimate within the stalled horizon, if any "
                           "(counted in warning_counts['over-budget'])")
            return recent
        else:
            # lambda_min not started from a warm start alone (see HessianMonitor.measure); credit for one setup is
            # left for the escape check
            reserve = (monitor.estimate_seconds() or 0.0) if self.escape_check else 0.0
        self.n_snapshots += 1
        # Charged to the monitor's budget, no trace; a spike's verdict reads lambda_max alone
        snapshot = monitor.measure(trainer, pl_module, reason=event.reason, trace=False, lambda_min=not spike,
                                   reserve_seconds=reserve)
        return {} if "skipped" in snapshot else snapshot

    def _recent_curvature(self, event: StallEvent) -> dict[str, Any]:
        """The latest curvature estimates taken within the stalled horizon (the loss was flat there, so the point
        barely moved): lambda_max, lambda_min and the critical sharpness along the update each from the newest
        snapshot that measured it, with its step."""
        if self.hessian_monitor is None or event.reason != "stall":
            return {}
        since = event.step - max(event.horizon, len(event.window_steps))
        recent = [h for h in self.hessian_monitor.history if h.get("step", -1) >= since and "skipped" not in h]
        out: dict[str, Any] = {}
        for h in reversed(recent):
            for name in ("lambda_max", "lambda_min", "preconditioned_lambda_max", "critical_sharpness"):
                if name not in out and h.get(name) is not None:
                    out[name] = h[name]
                    out[f"{name}_residual"] = h.get(f"{name}_residual")
                    out[f"{name}_step"] = h.get("step")
        return {k: v for k, v in out.items() if v is not None}

    def _window_gradients(self, event: StallEvent, pairs_until: int | None = None) -> dict[str, float | None]:
        """Gradient statistics of the stalled horizon (a gradient's step is one before its update's).

        ``grad_norm`` is the current level, the mean over the last fifth of the window's steps (as for the loss).
        The cosines are means over the whole window. The consecutive-gradient pairs (both steps measured) over the
        whole horizon the stall test used give ``grad_pair_dot``, the mean ``g_t . g_(t-1)`` (with its standard
        error), and ``grad_pair_sq``, the mean ``|g|^2`` of the same steps: the classifier's "is the gradient about
        zero?" compares them with enough samples (docs/diagnosis-rules.md). For a spike, the window is the one
        before the spike (its typical gradient norm sets the clipping advice), and the pairs those of the two
        windows before it (whether the step bounced there), and with ``pairs_until`` (a spike judged again) also
        the pairs measured from the spike's end up to that step.
        """
        if self.gradient_monitor is None or not event.window_steps:
            return {}
        last = event.window_steps[-1] - 1
        if event.reason == "spike" and event.spike:
            last = int(event.spike["start_step"]) - 2
        first = event.window_steps[0] - 1 if event.reason != "spike" else last - self.thresholds.window
        records = [r for r in self.gradient_monitor.history if first <= r.get("step", -1) <= last]
        if not records:
            return {}
        recent_from = last - max(1, (last - first + 1) // 5)
        recent = [r for r in records if r["step"] > recent_from] or records[-1:]
        out = {
            "grad_norm": _finite_mean([r.get("grad_norm") for r in recent]),
            "grad_cosine": _finite_mean([r.get("grad_cosine") for r in records]),
            "update_cosine": _finite_mean([r.get("update_cosine") for r in records]),
        }
        horizon_first = last - max(event.horizon, len(event.window_steps)) + 1
        if event.reason == "spike":  # the regime it came from: two windows, as the stability ratio before it
            horizon_first = last - 2 * self.window + 1
        spans = [(horizon_first, last)]
        if event.reason == "spike" and pairs_until is not None:
            spans.append((event.step, pairs_until))  # the pairs measured after the spike, while it waited for them
        out.update(gradient_pairs([r for r in self.gradient_monitor.history
                                   if any(a <= r.get("step", -1) <= b for a, b in spans)]))
        return out

    def _ratio_before(self, event: StallEvent) -> float | None:
        """For a spike: the stability ratio of the last curvature estimate in the two windows before it began (None
        if none: an older one may describe another stretch of the run)."""
        if event.reason != "spike" or not event.spike or self.hessian_monitor is None:
            return None
        start = event.spike["start_step"]
        before = [h for h in self.hessian_monitor.history if start - 2 * self.window <= h.get("step", math.inf) < start
                  and h.get("stability_ratio") is not None]
        return before[-1]["stability_ratio"] if before else None

    def _evidence(self, trainer: Any, pl_module: Any, event: StallEvent, snapshot: dict[str, Any],
                  pairs_until: int | None = None) -> Evidence:
        window = [float(v) for v in event.window]
        recent = window[-max(1, len(window) // 5):]  # the current level: the last fifth of the window
        fields: dict[str, Any] = {
            "step": event.step,
            "loss_window": window,
            "loss": _finite_mean(recent) if event.trigger != "nonfinite" else self._last_loss,
            "loss_min": self._loss_min if math.isfinite(self._loss_min) else None,
            "loss_initial": self._loss_initial,
            "rel_slope": event.rel_slope if math.isfinite(event.rel_slope) else None,
            "grad_norm_initial": _finite_mean(self._grad_norms_initial),
            "batch_size": self._batch_size,
            "num_params": sum(p.numel() for _, p in trainable_parameters(pl_module)),
            "loss_floor": self.loss_floor,
            "nonfinite": event.trigger == "nonfinite",
            "dataset_size": self._dataset_size,
            "spike_count": self.n_spikes if event.reason == "spike" else None,
            "spike_probe_ratio": (event.spike["probe_loss_during"] / event.spike["probe_loss_after"]
                                  if "probe_loss_during" in event.spike else None),
            "stability_ratio_before": self._ratio_before(event),
        }
        fields.update(self._window_gradients(event, pairs_until))
        for name in _SNAPSHOT_FIELDS:
            fields[name] = snapshot.get(name)
        for name, field_name in _SNAPSHOT_RENAMED.items():
            fields[field_name] = snapshot.get(name)
        if fields["directional_sharpness"] is None:  # measured along a scheduled snapshot's step only
            fields["directional_sharpness"] = self._recent_curvature(event).get("critical_sharpness")
        if fields["grad_sq_norm_unbiased"] is None and self.gradient_monitor is not None:
            # gradient accumulation gives the monitor its own noise estimate
            fields["grad_sq_norm_unbiased"] = self.gradient_monitor.latest.get("grad_sq_unbiased")
            fields["grad_noise_trace"] = fields["grad_noise_trace"] or self.gradient_monitor.latest.get(
                "grad_noise_trace")
        optimizer = snapshot.get("optimizer")
        if optimizer is None and trainer.optimizers:
            optimizer = OptimizerSpec.from_torch(trainer.optimizers[0])
        fields["optimizer"] = optimizer
        return Evidence(**fields)  # it cleans measured numbers itself (clamped, unavailable: docs/errors.md)

    def _escape(self, trainer: Any, pl_module: Any, diagnosis: Diagnosis) -> dict[str, float]:
        """The real loss along the escape direction at the step ``t`` the diagnosis quotes, vs ``1/2 lambda_min t^2``.

        The diagnosis gives ``escape_drop_coefficient`` (``1/2 lambda_min``) and ``escape_distance`` (the ``t`` at
        which the second-order model predicts a 1% drop); the loss is evaluated at ``theta +- t u`` on the probe
        batches through ``functional_call`` (the model is never written).
        """
        monitor = self.hessian_monitor
        result = monitor.last_eigenvectors.get("SA") if monitor is not None else None
        coefficient = diagnosis.evidence.get("escape_drop_coefficient")
        t = diagnosis.evidence.get("escape_distance")
        if result is None or coefficient is None or t is None:
            return {}
        u = result.eigenvectors[0]
        out = {"escape_t": t, "escape_expected_drop": coefficient * t * t}
        batches = monitor.probe_set()  # the probe set the eigenvector was computed on
        if not batches:
            return out
        if not monitor.can_afford(trainer, monitor.estimate_seconds()):  # priced as one setup of the monitor's
            self.warn_once("escape-over-budget", "the saddle's escape direction was not evaluated: the Hessian "
                           f"monitor's time budget is spent (balance {monitor.budget_balance():.3g} s)")
            return out
        with monitor.charged(global_step(trainer), "escape"), preserved_state(pl_module):
            pl_module.train(monitor.mode == "train")
            objective = BatchObjective(pl_module, monitor.loss_fn, batches, dtype=u.dtype, batch_list=True)
            theta = objective.point()
            direction = u.to(device=theta.device, dtype=theta.dtype)
            values = [objective.value(theta + sign * t * direction) for sign in (0.0, 1.0, -1.0)]
        base, plus, minus = (self._reduced_mean(trainer, [v]) for v in values)
        # the eigenvector's sign is arbitrary: the escape goes whichever way the loss falls more
        out.update(escape_measured_drop=min(plus, minus) - base, escape_probe_loss=base)
        return out

    # --- output ---------------------------------------------------------------------------------------------------
    def _record(self, trainer: Any, diagnosis: Diagnosis) -> None:
        self.diagnoses.append(diagnosis)
        self._open.append(len(self.diagnoses) - 1)
        self._next_check = None
        if not trainer.is_global_zero:
            return
        self._append_event(trainer, diagnosis.to_dict())
        tb = self.tensorboard_logger(trainer)
        if tb is not None:
            tensorboard_sink.log_text(tb, TEXT_TAG, diagnosis.to_markdown(), diagnosis.step)

    # --- retrospective check ----------------------------------------------------------------------------------------
    def _check_predictions(self, trainer: Any, step: int, loss: float) -> None:
        """Check each open verdict's prediction once its time has come (``evidence["outcome"]``, events, TensorBoard)."""
        if not self._open:
            self._recent_losses = []
            return
        self._recent_losses.append((step, loss))
        if self._next_check is None:
            self._next_check = min(self._due(index) for index in self._open)
        if step < self._next_check:
            return  # the usual step: no prediction due yet
        self._next_check = None
        still_open = []
        for index in self._open:
            diagnosis = self.diagnoses[index]
            if step < self._due(index):
                still_open.append(index)
                continue
            losses = [v for s, v in self._recent_losses if s > diagnosis.step]
            lr = OptimizerSpec.from_torch(trainer.optimizers[0]).lr if trainer.optimizers else None
            outcome = check_prediction(diagnosis, losses, lr, self.thresholds)
            outcome["checked_at_step"] = step
            diagnosis.evidence["outcome"] = outcome
            self._log_outcome(trainer, diagnosis, outcome)
        if len(still_open) == len(self._open):
            return  # nothing checked this step: the losses kept are still needed (pruned only when one closes)
        self._open = still_open
        if self._open:  # keep only the losses the oldest open verdict still needs
            oldest = min(self.diagnoses[i].step for i in self._open)
            self._recent_losses = [(s, v) for s, v in self._recent_losses if s > oldest]
        else:
            self._recent_losses = []

    def _due(self, index: int) -> float:
        """The step verdict ``index``'s prediction is checked at (infinity: it has none)."""
        return (self.diagnoses[index].evidence.get("prediction") or {}).get("check_at_step", math.inf)

    def _log_outcome(self, trainer: Any, diagnosis: Diagnosis, outcome: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        record = {"record": "outcome", "verdict_step": diagnosis.step, "kind": diagnosis.kind,
                  "claim": (diagnosis.evidence.get("prediction") or {}).get("claim"), **outcome}
        self._append_event(trainer, record)
        tb = self.tensorboard_logger(trainer)
        if tb is not None:
            tensorboard_sink.log_text(tb, TEXT_TAG, f"**{diagnosis.kind}** at step {diagnosis.step}, checked at step "
                                      f"{outcome['checked_at_step']}: **{outcome['outcome']}** "
                                      f"({outcome.get('detail', '')})", outcome["checked_at_step"])

    def summary(self) -> str:
        """A few lines on this fit: how many steps, the loss, and one line per verdict with its top suggestion.

        Example:
            >>> print(StallDiagnoser().summary())
            optdiag: no stall in 0 steps.
        """
        new = self.diagnoses[self._diagnoses_at_fit_start:]
        loss = ""
        if self._first_loss_this_fit is not None and self._last_loss is not None:
            loss = f" (loss {self._first_loss_this_fit:.4g} -> {self._last_loss:.4g})"
        if not new:
            return f"optdiag: no stall in {self._steps_run} steps{loss}."
        lines = [f"optdiag: {len(new)} verdict{'s' if len(new) != 1 else ''} in {self._steps_run} steps{loss}:"]
        for d in new:
            top = d.suggestions[0] if d.suggestions else None
            advice = "no change suggested" if top is None else top.action + (
                "" if top.proposed is None else f" ({_number(top.current)} -> {_number(top.proposed)})")
            lines.append(f"  step {d.step:>6}  {d.kind:<13}  confidence {d.confidence:.2f}  {d.summary}  -> {advice}")
            outcome = d.evidence.get("outcome")
            if outcome:
                lines.append(f"  {'':>11}  checked at step {outcome.get('checked_at_step')}: {outcome['outcome']}"
                             f" ({outcome.get('detail', '')})")
        return "\n".join(lines)

    # --- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "detector": self.detector.state_dict(),
            "probe_detector": None if self.probe_detector is None else self.probe_detector.state_dict(),
            "probe_stride": self._probe_stride,
            "probe_start": self._probe_start,
            "probe_quiet_until": self._probe_quiet_until,
            "probe_early_ends": self._early_ends,
            "pending_stall": None if self._pending is None else self._pending.to_dict(),
            "waiting_spike": None if self._waiting_spike is None else self._waiting_spike.to_dict(),
            "n_snapshots": self.n_snapshots,
            "n_spikes": self.n_spikes,
            "open_predictions": list(self._open),
            "loss_initial": self._loss_initial,
            "loss_min": self._loss_min if math.isfinite(self._loss_min) else None,
            "grad_norms_initial": list(self._grad_norms_initial),
            "grad_norms_initial_until": self._initial_until,
            "warning_counts": dict(self.warning_counts),
        }
        state.update({name: monitor.state_dict() for name, monitor in self._private.items()})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnoses = [Diagnosis.from_dict(d) for d in state_dict.get("diagnoses", [])]
        if "detector" in state_dict:
            self.detector.load_state_dict(state_dict["detector"])
        if state_dict.get("probe_detector") and self.probe_detector is not None:
            stride, start = state_dict.get("probe_stride"), state_dict.get("probe_start")
            if stride is not None and start is not None:  # the reads' spacing sets the window the history fits
                self._probe_stride, self._probe_start = int(stride), int(start)
                self.probe_detector.set_window(*self._probe_window(self._probe_stride))
            self.probe_detector.load_state_dict(state_dict["probe_detector"])
        self._probe_quiet_until = int(state_dict.get("probe_quiet_until", -1))
        self._early_ends = int(state_dict.get("probe_early_ends", 0))
        pending, waiting = state_dict.get("pending_stall"), state_dict.get("waiting_spike")
        self._pending = _PendingStall.from_dict(pending) if pending else None
        self._waiting_spike = _WaitingSpike.from_dict(waiting) if waiting else None
        self.n_snapshots = int(state_dict.get("n_snapshots", 0))
        self.n_spikes = int(state_dict.get("n_spikes", 0))
        self._open = [int(i) for i in state_dict.get("open_predictions", []) if 0 <= int(i) < len(self.diagnoses)]
        self._next_check = None
        self._loss_initial = state_dict.get("loss_initial")
        loss_min = state_dict.get("loss_min")
        self._loss_min = math.inf if loss_min is None else float(loss_min)
        self._grad_norms_initial = [float(v) for v in state_dict.get("grad_norms_initial", [])]
        until = state_dict.get("grad_norms_initial_until")
        # a checkpoint without the bound: its list is final if it was full, else collection goes on from the resume
        self._initial_until = int(until) if until is not None else (-1 if self._grad_norms_initial else None)
        self.warning_counts = dict(state_dict.get("warning_counts", {}))
        for name in ("gradient_monitor", "hessian_monitor"):
            if name in state_dict:
                self._private_monitor(name).load_state_dict(state_dict[name])
        self._diagnoses_at_fit_start = len(self.diagnoses)
