"""``HessianMonitor``: lambda_max, lambda_min, trace, density and the optimizer's stability margin during training."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections import deque
from typing import Any, Callable, Iterator, Mapping

import torch

from optdiag.callbacks._base import OptDiagCallback, batch_size_of, ceil_to, global_step, guarded
from optdiag.callbacks._critical import CRITICAL_KEYS, UpdateCapture, critical_snapshot
from optdiag.callbacks._fsdp1 import routed, through_root
from optdiag.curvature.critical import MAX_EVALS
from optdiag.curvature.density import spectral_density
from optdiag.curvature.distributed import ReducedMeanOperator, reduce_sum
from optdiag.curvature.lanczos import EigenResult, top_eigenvalues
from optdiag.curvature.noise import gradient_noise_scale
from optdiag.curvature.operator import HVP_METHODS, choose_hvp_method, make_hessian_operator
from optdiag.curvature.params import parameter_blocks, trainable_parameters
from optdiag.curvature.preconditioned import PreconditionedOperator, preconditioner_warmup
from optdiag.curvature.state import preserved_state
from optdiag.curvature.trace import hessian_trace
from optdiag.diagnosis.stability import OptimizerSpec, stability_threshold
from optdiag.errors import NonFiniteError, NotTwiceDifferentiableError, UsageError
from optdiag.policy import LOGGER, check_number
from optdiag.sinks import tensorboard as tensorboard_sink

LossFn = Callable[[Any, Any], torch.Tensor]
#: Snapshots whose probe-set gradient norms are pooled for ``probe_noise_scale`` and its spread.
NOISE_POOL = 10
CURVATURE_NOTE_TAG = "optdiag/curvature"  # TensorBoard text: why a fit took no curvature estimate
_HEAVY = ("optimizer",)  # kept in the returned dict, left out of the history and of checkpoints
_MIN_SOLVE_HVP = 4  # an eigen-solve given fewer products has seen too little of the spectrum to be worth its setup
_FULL_EVERY = 4  # adaptive schedule: every 4th scheduled snapshot adds lambda_min and the trace to lambda_max
_OVER_BUDGET = "over budget"
_FD_ERROR_WARN = 1e-2  # a finite-difference product's estimated relative error worth a warning
_FORWARDS_PER_PRODUCT = 3  # a double-backward product costs about a forward, a backward and their derivative
# Before a product is timed, a product over one probe batch (with the solver's bookkeeping) is priced as this many
# training steps: docs/performance.md measures 1.6-2.5 gradients per product, and a training step is more than a
# gradient (the optimizer, the loop). Only the first estimate's price uses it (docs/callbacks/hessian-monitor.md).
_PRODUCT_STEPS = 1.5
_LOG_FLOAT_MAX = math.log(sys.float_info.max)
_MIN_PRODUCT_SECONDS = 1e-9  # the least a product is priced at (see _update_costs)


def lightning_loss(pl_module: Any, batch: Any) -> torch.Tensor:
    """The default curvature loss: ``pl_module.optdiag_loss(batch)`` if defined, else ``training_step``'s loss.

    ``training_step`` is called with ``self.log``/``self.log_dict`` silenced (they may not be called outside the
    training loop) and batch index 0; its loss is the returned tensor or ``output["loss"]``.

    Under Lightning's ``FSDPStrategy`` (FSDP1) it runs as the forward of the root ``FullyShardedDataParallel``, as
    Lightning's own training step does (:func:`~optdiag.callbacks._fsdp1.through_root`).

    Raises:
        UsageError: if ``training_step`` returns neither a tensor nor a dict with ``"loss"``.
    """
    return through_root(pl_module, lambda: _module_loss(pl_module, batch))


def _module_loss(pl_module: Any, batch: Any) -> torch.Tensor:
    if hasattr(pl_module, "optdiag_loss"):
        return pl_module.optdiag_loss(batch)
    with OptDiagCallback.silenced_logging(pl_module):
        output = pl_module.training_step(batch, 0)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise UsageError(
            f"{type(pl_module).__name__}.training_step returned {type(output).__name__}, not a loss tensor or a dict "
            "with 'loss'; define optdiag_loss(batch) on the module or pass HessianMonitor(loss_fn=...)"
        )
    return loss


def _clone_batch(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, Mapping):
        return type(batch)({k: _clone_batch(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_clone_batch(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone_batch(v) for v in batch)
    return batch


@dataclasses.dataclass
class Charge:
    """The seconds a :meth:`HessianMonitor.charged` block was charged (set when the block ends)."""

    seconds: float = 0.0


class HessianMonitor(OptDiagCallback):
    """Estimate the Hessian's extreme eigenvalues, trace and density on a fixed probe set while training runs.

    Each estimate ("snapshot"), taken after an optimizer step at the current parameters, logs as ``optdiag/...``:

    * ``lambda_max`` (Lanczos "LA") and ``lambda_min`` (Lanczos "SA") with their residuals, ``hessian_trace``
      (Hutch++) with its standard error, ``hvp_count`` (Hessian-vector products the snapshot took). Eigen-solves
      warm-start from the previous snapshot's eigenvectors, so a refresh usually takes few products.
    * ``stability_threshold``: the largest curvature the optimizer in use is stable at, at its current lr and
      momentum (SGD, heavy ball, Nesterov; Adam/AdamW/RMSprop on the preconditioned sharpness); absent for other
      optimizers (reported as unknown, never guessed). ``preconditioned_lambda_max`` = ``lambda_max(P^-1 H)`` for
      Adam/AdamW/RMSprop. ``stability_ratio`` = (preconditioned) sharpness / threshold: above 1 the step is
      unstable along the sharpest direction. Neither is measured while the optimizer's second-moment estimate is
      warming up (:func:`~optdiag.curvature.preconditioned.preconditioner_warmup`: 51 steps for Adam's default
      ``beta2``); the snapshot's ``preconditioner_warmup`` says how far it is.
    * ``batch_sharpness``: mean over probe batches of ``g_B^T H_B g_B / |g_B|^2`` (what minibatch SGD holds at
      ``2/lr``; docs/theory.md section 1).
    * ``critical_sharpness`` (forwards only; docs/critical-sharpness.md): along the optimizer step just taken, from
      the parameters before it, the loss of the batch it was computed from at a few multiples of the step gives the
      curvature
      ``directional_curvature`` = ``u^T H u / |u|^2`` (with ``directional_curvature_stderr``), the largest stable
      learning rate ``critical_lr`` (where the step would no longer lower the loss) and ``critical_sharpness`` =
      ``2 / critical_lr``; ``critical_sharpness_ratio`` = ``critical_sharpness / stability_threshold`` and
      ``critical_lr_ratio`` = ``lr / critical_lr``. At most 9 forwards (``n_forward``), priced in products.
      Computed when the snapshot follows its step (the parameters before a step are kept only for that).
    * ``probe_loss``, ``probe_grad_norm``, and with two or more probe batches the gradient noise:
      ``probe_grad_sq_unbiased`` (``|G|^2``) and ``grad_noise_trace`` (``tr(Sigma)``), and the noise scale
      ``probe_noise_scale`` (``B_simple``) pooled over the last :data:`NOISE_POOL` snapshots with its
      one-standard-error band ``probe_noise_scale_lower``/``_upper``.
    * ``lambda_max_lower``/``lambda_max_upper``: ``lambda_max`` -+ its residual, the Lanczos error band.
    * every ``density_every``-th snapshot, a spectral density (stochastic Lanczos quadrature) as a TensorBoard
      figure. A figure is the only place a density is shown, so it is computed only when a ``TensorBoardLogger``
      is attached (it would be the costliest part of a snapshot otherwise: 40 products and a growing basis).

    **Probe set.** ``probe="fixed"`` (default): copies of the first ``probe_batches`` training batches, exactly as
    the model received them (already on its device), kept for the whole run so that estimates compare over time;
    the data loader is never touched. ``probe="current"``: the batch just trained on.

    **Loss.** ``loss_fn(pl_module, batch) -> scalar``; default :func:`lightning_loss` (``optdiag_loss`` if the
    module defines it, else ``training_step`` with logging silenced). With manual optimization ``training_step``
    steps the optimizer, so define ``optdiag_loss`` or pass ``loss_fn``; otherwise Hessian estimates stay off.

    **Schedule.** ``every_n_steps=n``: every ``n`` optimizer steps, everything measured. ``every_n_steps=None``
    (default): adaptive, within ``budget`` of the training time (wall time less the Hessian work) over any window of
    the run, give or take one bucket. Every piece of curvature work is charged to one token bucket, whatever asked
    for it (scheduled and stall snapshots, the diagnoser's escape check; :attr:`charges` lists them): it earns
    ``budget`` seconds per training second, holds at most :meth:`capacity` (five setups and ``burst_hvp``
    products, priced by the cost model :meth:`estimate_seconds` that every snapshot refines) and starts full.

    * The first snapshot comes as soon as the probe set is complete: lambda_max alone, cold, at most half of
      ``burst_hvp`` products. Then lambda_max refreshes (warm-started: a few products) whenever the bucket holds
      their estimated cost above the stall reserve (:meth:`can_afford_snapshot`); every ``_FULL_EVERY`` = 4th
      scheduled snapshot adds lambda_min (warm), and the trace and a density if due when the products left cover
      them.
    * A stall snapshot (:class:`~optdiag.callbacks.StallDiagnoser`) runs when the bucket holds the stall reserve
      and may spend all of it: :meth:`measure` with ``trace=False``.

    So over any window of training time ``T`` the Hessian work is at most ``budget * T + capacity()``, plus the
    amount by which one piece of work overran its estimate. docs/callbacks/hessian-monitor.md has the reasoning.

    Decisions that depend on the clock are rank 0's, broadcast so that all ranks meet in the same collectives.

    **Do no harm.** Work happens inside :func:`~optdiag.curvature.state.preserved_state` with autocast off, in
    float32 (or the parameters' dtype if wider), on the LightningModule itself (not the DDP wrapper); dropout masks
    come from a fixed seed and the RNGs are restored afterwards. **DDP**: every rank uses its own probe batches and
    the products are all-reduced, so the estimates are those of the union; only rank 0 logs. Non-finite values skip a
    snapshot (warned once, counted); a model that cannot be differentiated twice switches estimates off with one
    warning. Nothing raises into the training loop.

    Args:
        every_n_steps: fixed cadence in optimizer steps, or ``None`` for the adaptive budget.
        budget: fraction of training time the adaptive schedule (and the stall snapshots it admits) may spend, in
            ``(0, 1]``, over any window (plus one bucket, see ``burst_hvp``).
        probe: ``"fixed"`` or ``"current"``.
        probe_batches: number of training batches in the fixed probe set.
        loss_fn: the curvature loss (see above).
        mode: ``"train"`` (the objective being optimized: dropout on with fixed masks, BatchNorm batch statistics)
            or ``"eval"``.
        tol: relative residual tolerance of the eigen-solves.
        max_hvp: products allowed per eigen-solve.
        trace_hvp: products for the trace (Hutch++: a sketch of ``trace_hvp // 3`` vectors, as many products on
            it, the rest as probes of the remainder); ``0`` switches the trace off. The default 12 is a third of a
            cold snapshot's products; the trace is reported with its standard error and no verdict depends on it.
        density_every: a spectral density every this many snapshots (the first one included), computed only when
            a ``TensorBoardLogger`` is attached; ``0`` switches it off.
        density_steps: Lanczos steps per density run.
        seed: seed of the probes, start vectors and dropout masks.
        history_size: how many snapshots :attr:`history` (and charges :attr:`charges`) keeps.
        burst_hvp: the bucket's size in products (plus five setups): the most curvature work the adaptive
            schedule may do at once beyond the budget's rate; half of it is the stall reserve.
        clock: the time source, ``time.perf_counter`` by default (tests inject a fake one).
        hvp: how Hessian-vector products are computed: ``"auto"`` (default) the exact double backward where it
            exists, finite differences of the gradient where it does not (sharded FSDP parameters, a fused
            attention kernel or other op without double backward; found once, by a probe product, and said once
            in the ``optdiag`` log with the reason and the accuracy to expect); ``"exact"`` or
            ``"finite_difference"`` to force one. docs/finite-difference-and-fsdp.md.

    Attributes:
        history: one dict per snapshot (the :meth:`measure` keys, without the ``OptimizerSpec``).
        last_eigenvectors: ``{"LA": EigenResult, "SA": EigenResult}`` of the last snapshot (for escape directions).
        parameter_blocks: ``{layer: number of parameters}``, the layers the per-layer numbers split the parameter
            vector into (None before a snapshot).
        last_density: the last ``DensityResult`` or None.
        monitor_seconds: wall seconds of Hessian work charged over all fits (snapshots of any reason, escape checks).
        charges: one dict per charge: ``step``, ``what`` (the snapshot's reason, or e.g. ``"escape"``), ``seconds``,
            ``n_hvp`` and ``balance`` (the bucket's credit after it; None while its size is unknown).
        estimated_seconds: the expected cost of the next scheduled snapshot (adaptive schedule); None before one.
        clock: the time source (injectable).
        hvp_method, hvp_reason: the method ``hvp`` resolved to (``"exact"`` or ``"finite_difference"``) and why;
            None before the first snapshot.

    Example:
        >>> import pytorch_lightning as pl
        >>> monitor = HessianMonitor(every_n_steps=50)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=500)  # doctest: +SKIP
        >>> trainer.fit(model, data); monitor.history[-1]["lambda_max"]  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        budget: float = 0.05,
        *,
        probe: str = "fixed",
        probe_batches: int = 2,
        loss_fn: LossFn | None = None,
        mode: str = "train",
        tol: float = 1e-3,
        max_hvp: int = 40,
        trace_hvp: int = 12,
        density_every: int = 10,
        density_steps: int = 40,
        seed: int = 0,
        history_size: int = 10_000,
        burst_hvp: int = 40,
        clock: Callable[[], float] | None = None,
        hvp: str = "auto",
    ) -> None:
        super().__init__()
        check_number("every_n_steps", every_n_steps, low=1, integer=True, allow_none=True,
                     what="None (adaptive) or an int >= 1")
        check_number("budget", budget, low=0.0, high=1.0, low_open=True, what="a fraction of training time in (0, 1]")
        if probe not in ("fixed", "current"):
            raise UsageError(f"probe must be 'fixed' or 'current', got {probe!r}")
        if mode not in ("train", "eval"):
            raise UsageError(f"mode must be 'train' or 'eval', got {mode!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise UsageError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {type(loss_fn).__name__}")
        check_number("tol", tol, low=0.0, high=1.0, low_open=True, high_open=True)
        for name, value, low in (("probe_batches", probe_batches, 1), ("max_hvp", max_hvp, 2),
                                 ("trace_hvp", trace_hvp, 0), ("density_every", density_every, 0),
                                 ("density_steps", density_steps, 2), ("seed", seed, 0),
                                 ("history_size", history_size, 1), ("burst_hvp", burst_hvp, 4 * _MIN_SOLVE_HVP)):
            check_number(name, value, low=low, integer=True, what=f"an int >= {low}")
        if trace_hvp and trace_hvp < 3:
            raise UsageError(f"trace_hvp must be 0 (off) or at least 3 (Hutch++), got {trace_hvp}")
        self.every_n_steps, self.budget, self.probe, self.probe_batches = every_n_steps, float(budget), probe, probe_batches
        self.loss_fn: LossFn = lightning_loss if loss_fn is None else routed(loss_fn)  # routed: FSDP1 (_fsdp1.py)
        self.mode, self.tol, self.max_hvp, self.trace_hvp = mode, float(tol), max_hvp, trace_hvp
        self.density_every, self.density_steps, self.seed = density_every, density_steps, seed
        self.history_size, self.burst_hvp = history_size, burst_hvp
        self.clock: Callable[[], float] = clock or time.perf_counter
        if hvp not in HVP_METHODS:
            raise UsageError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        self.hvp = hvp
        self.hvp_method: str | None = None
        self.hvp_reason: str | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self.charges: deque[dict[str, Any]] = deque(maxlen=history_size)
        # the cost model (estimate_seconds): timed on every snapshot, kept across fits like the warm starts
        self._setup_seconds: float | None = None
        self._product_seconds: float | None = None
        self._part_hvp: dict[str, int] = {}  # each part's products at its last snapshot
        self._cost_samples = 0
        self._last_setup_seconds = 0.0
        self.last_eigenvectors: dict[str, EigenResult] = {}
        self.parameter_blocks: dict[str, int] | None = None
        self.last_density: Any = None
        self.enabled = True
        self.monitor_seconds = 0.0
        self._n_snapshots = 0
        self._next_step: int | None = None
        self._capture = UpdateCapture()  # the parameters before a step that a snapshot looks along, and its batch
        self._step_batch: Any = None  # the batch of the optimizer step to come (a reference until the step)
        self._critical_seconds = 0.0  # the last snapshot's forward-only part (kept out of the product cost)
        self._forward_seconds: float | None = None  # one forward of the critical sharpness, as last timed
        self._last_n_forward: int | None = None  # the forwards the last critical sharpness took
        self._reset_run()

    def _reset_run(self) -> None:
        self._probe_set: list[Any] = []
        self._current_batch: Any = None
        self._train_started: float | None = None
        self._steps_at_start = 0
        self._last_step_seen = -1
        self._spent = 0.0  # Hessian seconds of this fit, whatever asked for them
        self._tokens: float | None = None  # the bucket's credit in seconds; None: full, size not yet known
        self._credit_train = 0.0  # training seconds at the last refill
        self._advance = 0.0  # the starting credit not yet repaid: earnings repay it before they refill the bucket
        self._run_steps: int | None = None  # the optimizer steps this fit will run (the Trainer's plan); None: unknown
        self._fit_snapshots = 0
        self._fit_scheduled = 0
        self._fit_estimates = 0
        self._scheduling = False  # whether this monitor's own batch-end hook runs (a diagnoser's private one: no)
        self.estimated_seconds: float | None = None  # what the next scheduled snapshot is expected to cost
        # the probe set's (b_small, b_big, mean |g_b|^2, |g_B|^2) of the last snapshots, pooled for the noise scale
        self._noise_pool: deque[tuple[float, float, float, float]] = deque(maxlen=NOISE_POOL)

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self._history)

    def _state_key_arguments(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "probe": self.probe, "probe_batches": self.probe_batches}

    # --- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.check_strategy(trainer)

    @guarded
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run()
        self._train_started = self.clock()
        self._steps_at_start = global_step(trainer)
        self._last_step_seen = global_step(trainer)
        if self.every_n_steps is None and self._next_step is None:
            self._place_first_estimate(trainer)
        if self.loss_fn is lightning_loss and not pl_module.automatic_optimization \
                and not hasattr(pl_module, "optdiag_loss"):
            self._disable(
                "manual-optimization",
                "with manual optimization training_step steps the optimizer, so it cannot serve as the curvature "
                "loss; define optdiag_loss(batch) on the module or pass HessianMonitor(loss_fn=...). Hessian "
                "estimates are off for this run.",
            )

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_batch = batch  # the critical sharpness is taken on the batch its step descended
        if self.probe == "current":
            self._current_batch = batch
        elif len(self._probe_set) < self.probe_batches:
            self._probe_set.append(_clone_batch(batch))

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # The critical sharpness looks along the step a scheduled snapshot follows, on the batch it descended: keep
        # the parameters before that step (one flat copy) and the batch, nothing at other steps
        # (docs/critical-sharpness.md).
        step = global_step(trainer)
        if self.enabled and self._probe_ready() and (
                self._due(step + 1) or (self.every_n_steps is None and self._next_step is None)):
            self._capture.keep(pl_module, step, batch=self._step_batch)
        else:
            self._capture.release()
        self._step_batch = None

    @guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = global_step(trainer)
        if step == self._last_step_seen:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step_seen = step
        self._scheduling = True
        if not self.enabled or not self._probe_ready():
            return
        if self._due(step) or (self.every_n_steps is None and self._next_step is None):
            self._scheduled(trainer, pl_module, step)

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._scheduling and self.enabled and self.every_n_steps is None and not self._fit_estimates:
            why = self.summary().removeprefix("optdiag: ")  # one line, with the numbers: the cost vs the budget
            self.warn_once("no-estimate", why)
            tb = self.tensorboard_logger(trainer)
            if tb is not None and trainer.is_global_zero:  # where the empty curvature charts are looked at
                tensorboard_sink.log_text(tb, CURVATURE_NOTE_TAG, why, global_step(trainer))

    # --- schedule and budget ---------------------------------------------------------------------------------------
    def first_estimate_price(self) -> float:
        """What the adaptive schedule's first estimate is priced at before anything is timed, in training steps: a
        setup (a forward and backward pass per probe batch, about a training step each) and a cold lambda_max at
        its cap of ``burst_hvp // 2`` products over the probe batches, each ``_PRODUCT_STEPS`` training steps per
        batch. In steps, not seconds, so that the decision it serves is the same on every rank and every machine.

        Example:
            >>> HessianMonitor().first_estimate_price()  # two probe batches: 2 * (1 + 1.5 * 20)
            62.0
        """
        return self._n_probe_batches() * (1.0 + _PRODUCT_STEPS * (self.burst_hvp // 2))

    def _place_first_estimate(self, trainer: Any) -> None:
        """Lend the first estimate (taken as soon as the probe set is complete) only when this fit's own budget
        covers its price: ``budget`` times the steps the Trainer will run. A shorter fit takes it once its earnings
        have paid for it, which a run that ends first never reaches (the end-of-fit summary then says so, with the
        numbers); a fit of unknown length is lent. Lending the first estimate to every fit put an 800-step run of a
        670k-parameter MLP at 1.09x on its own (docs/performance.md section 7)."""
        planned = _planned_steps(trainer)
        self._run_steps = int(planned) - self._steps_at_start if math.isfinite(planned) else None
        price = self.first_estimate_price()
        if self._run_steps is None or price <= self.budget * self._run_steps:
            return  # lent: _next_step None, so the first probe-ready step takes it
        self._next_step = self._steps_at_start + self._n_probe_batches() + math.ceil(price / self.budget)

    def _first_estimate_earned(self, trainer: Any, step: int) -> bool:
        """Whether a first estimate that was not lent (nothing timed yet) may run at ``step``: the fit's earnings
        less what it spent before (the diagnoser's probe-set losses, paid from the same earnings) must cover its
        price, in training steps at the fit's seconds per step so far. If not, it waits for the shortfall at the
        earning rate (rank 0's clock decides, broadcast)."""
        shortfall = self.first_estimate_price() * self._seconds_per_step(step) - self._earned_balance()
        wait = self.steps_to_earn(trainer, step, shortfall)
        if wait:
            self._next_step = step + wait
        return wait == 0

    def _seconds_per_step(self, step: int) -> float:
        """This fit's training seconds per optimizer step up to ``step`` (at least one step counted)."""
        return self._train_seconds() / max(step - self._steps_at_start, 1)

    def _earned_balance(self) -> float:
        """What the fit has earned (``budget`` times its training time) less everything it spent: the credit there
        is when no bucket lends (nothing timed yet)."""
        return self.budget * self._train_seconds() - self._spent

    def _steps_to_earn(self, step: int, seconds: float) -> int:
        """Steps until the fit earns ``seconds`` more, at its earnings per step so far; 0 when nothing is owed."""
        if seconds <= 0:
            return 0
        per_step = self.budget * self._seconds_per_step(step)
        return max(1, int(ceil_to(seconds / max(per_step, 1e-12))))  # 120.00000000000001 steps are 120

    def _probe_ready(self) -> bool:
        return self.probe != "fixed" or len(self._probe_set) >= self.probe_batches

    def _due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self._next_step is not None and step >= self._next_step

    def _scheduled(self, trainer: Any, pl_module: Any, step: int) -> None:
        """A scheduled snapshot. Fixed cadence: everything. Adaptive: a lambda_max refresh that leaves the stall
        reserve in the bucket, every ``_FULL_EVERY``-th one with lambda_min and (if the products left cover it)
        the trace."""
        if self.every_n_steps is not None:
            self.measure(trainer, pl_module, trace=True, budgeted=False)
            return
        if self.capacity() is None and self._next_step is not None and not self._first_estimate_earned(trainer, step):
            return
        full = self._full_due()
        result = self.measure(trainer, pl_module, trace=full, lambda_min=full, reserve_seconds=self._reserve() or 0.0)
        if result.get("skipped") != _OVER_BUDGET:
            self._fit_scheduled += 1
        with contextlib.suppress(Exception):
            self._plan_next(trainer, step)

    def _density_due(self, trainer: Any) -> bool:
        """Densities are drawn only as TensorBoard figures: computed only when a TensorBoard logger will show them."""
        return bool(self.density_every) and self._n_snapshots % self.density_every == 0 \
            and self.tensorboard_logger(trainer) is not None

    def _full_due(self) -> bool:
        return self._fit_scheduled % _FULL_EVERY == _FULL_EVERY - 1

    def _train_seconds(self) -> float:
        """Wall time of this fit so far, less the time the Hessian work took."""
        if self._train_started is None:
            return 0.0
        return max(self.clock() - self._train_started - self._spent, 0.0)

    def estimate_seconds(self, n_hvp: int = 0) -> float | None:
        """What a piece of curvature work is expected to cost: one setup (state saved and restored, a forward and
        backward pass over the probe set) plus ``n_hvp`` products over the probe set; None until a snapshot has
        been timed. The diagnoser prices its escape check (a few forward passes) as one setup.

        Example:
            >>> HessianMonitor().estimate_seconds(10) is None  # nothing timed yet
            True
        """
        if self._setup_seconds is None or self._product_seconds is None:
            return None
        return self._setup_seconds + n_hvp * self._product_seconds

    def capacity(self) -> float | None:
        """The bucket's size in seconds: five setups and ``burst_hvp`` products (None until a snapshot is timed).

        The stall reserve that scheduled lambda_max refreshes leave alone (:meth:`_reserve`: a snapshot's setup,
        half the products and the escape check's setup), and three setups and the other half for the refreshes (a
        short run's first estimate and two warm refreshes come at once); a stall snapshot may use all of it. See
        docs/callbacks/hessian-monitor.md.
        """
        reserve = self._reserve()
        if reserve is None:
            return None
        return reserve + 2 * self._setup_seconds + self.estimate_seconds(self.burst_hvp - self.burst_hvp // 2)

    def stall_price(self) -> float | None:
        """What a stall snapshot is priced at in seconds (the reserve :meth:`can_afford_snapshot` asks the bucket
        to hold); None before the first product was timed."""
        return self._reserve()

    def _reserve(self) -> float | None:
        """The credit scheduled refreshes leave for a stall: two setups (the snapshot's and the escape check's) and
        half of ``burst_hvp`` products."""
        single = self.estimate_seconds(self.burst_hvp // 2)
        return None if single is None else single + self._setup_seconds

    def _credit(self) -> float | None:
        """Refill the bucket with ``budget`` times the training seconds since the last refill (capped at its
        capacity) and return its credit; None while the capacity is unknown (the bucket then counts as full).

        The bucket starts full, so that the first estimates come early; that starting credit is lent, not given:
        the earnings repay it before they refill the bucket, so up to training time ``T`` the curvature work is at
        most ``max(budget * T, first + capacity)`` (``first``: the first snapshot, priced before the bucket's size
        is known), plus the last overrun of an estimate: ``budget`` of the training time once the fit is long
        enough to repay its start (docs/performance.md), not ``budget`` plus a bucket.
        """
        train = self._train_seconds()
        capacity = self.capacity()
        if capacity is None:
            self._credit_train = train
            return None
        if self._tokens is None:
            self._tokens = capacity
            self._advance = max(capacity - self.budget * train, 0.0)  # what was earned so far repays it
        else:
            earned = self.budget * max(train - self._credit_train, 0.0)
            repaid = min(self._advance, earned)
            self._advance -= repaid
            self._tokens = min(capacity, self._tokens + earned - repaid)
        self._credit_train = train
        return self._tokens

    def budget_balance(self) -> float:
        """Seconds of Hessian work the budget holds now: the token bucket's credit.

        The bucket earns ``budget`` seconds per second of training (wall time less Hessian time), holds at most
        :meth:`capacity`, and every piece of curvature work is charged to it, whatever asked for it (scheduled
        snapshots, stall snapshots, the diagnoser's escape check). Work starts only when its estimated cost is
        covered, so the balance is negative only by the amount the last piece of work overran its estimate.
        ``inf`` before the first snapshot has been timed (the bucket starts full; its size is not known yet).
        Rank 0's clock is what counts under DDP: the decisions built on it are broadcast from rank 0.

        Example:
            >>> HessianMonitor().budget_balance()
            inf
        """
        credit = self._credit()
        return math.inf if credit is None else credit

    def can_afford(self, trainer: Any, seconds: float | None) -> bool:
        """Whether curvature work expected to cost ``seconds`` may start now (every rank must call it under DDP:
        rank 0 decides, the answer is broadcast). Always with a fixed cadence (the cadence is the user's choice of
        cost) and while the cost is unknown (``seconds`` None: the bucket starts full).

        Example:
            >>> HessianMonitor(every_n_steps=10).can_afford(trainer=None, seconds=5.0)
            True
        """
        return self.every_n_steps is not None or self._holds(trainer, seconds)

    def _holds(self, trainer: Any, seconds: float | None, above: float = 0.0, earned: bool = False,
               loan: float = 0.0) -> bool:
        """The one affordability rule: whether the bucket holds ``seconds`` (None: not priced yet, held) beyond
        ``above`` seconds of credit left alone, counting only the credit it earned (the starting credit repaid) with
        ``earned``. Rank 0's clock decides: the answer is broadcast (without a trainer, this process's)."""
        credit = self._credit()
        if credit is None:  # nothing timed yet, so no bucket to lend from: the fit's earnings (or a loan, while
            # more) less what it spent
            available = max(self._earned_balance(), loan - self._spent) if earned else math.inf
        else:
            available = credit - (self._advance if earned else 0.0)
        affordable = seconds is None or available - above >= seconds
        return bool(trainer.strategy.broadcast(affordable, src=0)) if trainer is not None else affordable

    def can_afford_snapshot(self, trainer: Any, routine: bool = False) -> bool:
        """Whether a stall snapshot may run now: the bucket holds the stall reserve (a setup and ``burst_hvp // 2``
        products for the snapshot, a setup for the diagnoser's escape check; :meth:`can_afford`), which the
        scheduled refreshes leave alone. So a stall gets its curvature unless another stall snapshot spent the
        reserve less than ``reserve / (budget * seconds per step)`` steps ago.

        With ``routine`` (a snapshot a verdict can do without, such as a recovered spike's catapult check): like a
        scheduled refresh, only from *earned* credit (the starting credit repaid) above the stall reserve, which it
        leaves alone (measure it with ``reserve_seconds=stall_price()``): a healthy run with a few spikes must not
        pay a snapshot for each.

        Example:
            >>> HessianMonitor(every_n_steps=100).can_afford_snapshot(trainer=None)
            True
        """
        if not routine or self.every_n_steps is not None:
            return self.can_afford(trainer, self._reserve())
        price = self.estimate_seconds(self._refresh_products())
        if price is None:  # nothing timed yet, so nothing earned (every rank in the broadcast all the same)
            return bool(trainer.strategy.broadcast(False, src=0))
        return self._holds(trainer, price, above=self._reserve(), earned=True)

    def can_afford_extra(self, trainer: Any, seconds: float | None) -> bool:
        """Whether measurement work outside a snapshot (the diagnoser's probe-set losses, a few forward passes)
        expected to cost ``seconds`` may run now, from the one budget every measurement is charged to
        (:meth:`charged`). Adaptive schedule: the bucket must hold ``seconds`` above the stall reserve, which such
        work leaves alone (a stall it helps prove still gets its snapshot). Fixed cadence: always, like its
        snapshots: the user chose the cost, and nothing optdiag decides then depends on the clock (the same run
        gets the same verdicts on a loaded machine). True while ``seconds`` is unknown (the first read prices it).
        Before any snapshot has been timed (a short run whose first estimate waits for its earnings) there is no
        bucket to lend from: such work is paid from what the fit has earned so far or, while that is less, from a
        loan of the planned fit's budget of at most a first estimate's price (:meth:`_extra_loan`), so that a
        spike in a run's first steps is still read on the model. Every rank must call it under DDP: rank 0
        decides, the answer is broadcast.

        Example:
            >>> HessianMonitor().can_afford_extra(trainer=None, seconds=None)
            True
        """
        if seconds is None or self.every_n_steps is not None:
            return True
        if self.capacity() is not None:
            return self._holds(trainer, seconds, above=self._reserve() or 0.0)
        return self._holds(trainer, seconds, earned=True, loan=self._extra_loan(trainer))

    def _extra_loan(self, trainer: Any) -> float:
        """Seconds that work outside a snapshot may borrow before any snapshot has been timed: the planned fit's
        budget (``budget`` times its steps), at most a first estimate's price (about one bucket), in training steps
        at the fit's seconds per step so far; the same rule that lends the first estimate (a fit that pays for it).
        Borrowed up front and repaid by the earnings, so a fit that runs as planned spends at most its budget, and a
        window of steps at most its budget plus about one bucket. 0 without a trainer or before a step has run."""
        step = None if trainer is None else global_step(trainer)
        if step is None or step <= self._steps_at_start:
            return 0.0
        planned = self.budget * self._run_steps if self._run_steps is not None else math.inf
        return min(self.first_estimate_price(), planned) * self._seconds_per_step(step)

    def steps_to_earn(self, trainer: Any, step: int, seconds: float | None) -> int:
        """Training steps over which the fit earns ``seconds`` of measurement at its rate so far (``budget`` times
        its seconds per step): how far apart work that costs ``seconds`` must be spaced to live on its earnings.
        0 with a fixed cadence (the user chose the cost) and while ``seconds`` is unknown. Rank 0's clock decides
        under DDP (every rank must call it: the answer is broadcast).

        Example:
            >>> HessianMonitor().steps_to_earn(trainer=None, step=0, seconds=None)
            0
        """
        steps = 0 if seconds is None or self.every_n_steps is not None else self._steps_to_earn(step, seconds)
        return int(trainer.strategy.broadcast(steps, src=0)) if trainer is not None else steps

    def _n_probe_batches(self) -> int:
        """The batches a snapshot is computed on: those of the probe set, or before it is complete, those it will
        have (one with ``probe="current"``)."""
        return len(self.probe_set()) or (1 if self.probe == "current" else self.probe_batches)

    def _charge(self, seconds: float, what: str, step: int, n_hvp: int = 0, merge: bool = False) -> None:
        """Debit measurement work from the account (the training clock excludes it) and write it in
        :attr:`charges`; with ``merge``, a charge of the same ``what`` as the last one is added to it (``count``),
        so that frequent small work (probe-set losses) does not push the snapshots out of the bounded ledger."""
        self._spent += seconds
        self.monitor_seconds += seconds
        self._credit()  # refill up to now first: the work's own seconds earn nothing
        if self._tokens is not None:
            self._tokens -= seconds
        last = self.charges[-1] if self.charges else None
        if merge and last is not None and last["what"] == what:
            last.update(step=step, seconds=last["seconds"] + seconds, count=last.get("count", 1) + 1,
                        balance=self._tokens)
            return
        self.charges.append({"step": step, "what": what, "seconds": seconds, "n_hvp": n_hvp,
                             "balance": self._tokens})

    @contextlib.contextmanager
    def charged(self, step: int, what: str, merge: bool = False) -> Iterator[Charge]:
        """Charge the wall time of the block to the budget, as ``what`` at ``step`` (work done outside
        :meth:`measure` on the monitor's behalf, such as the diagnoser's escape check). ``merge``: for frequent small
        work (probe-set losses), consecutive charges of the same ``what`` become one entry of :attr:`charges`.
        Yields a :class:`Charge` whose ``seconds`` are what was charged, once the block is done (a caller that
        prices its work reads the same figure the budget was charged).

        Example:
            >>> monitor = HessianMonitor()
            >>> with monitor.charged(step=0, what="escape") as charge:
            ...     pass
            >>> monitor.charges[-1]["what"], monitor.charges[-1]["seconds"] == charge.seconds
            ('escape', True)
        """
        charge = Charge()
        started = self.clock()
        try:
            yield charge
        finally:
            charge.seconds = self.clock() - started
            self._charge(charge.seconds, what, step, merge=merge)

    def _refresh_products(self, lambda_min: bool = False) -> int:
        """Products a scheduled snapshot is expected to take: each solve's last count (it warm-starts from it, and
        gets at least ``_MIN_SOLVE_HVP``), batch sharpness, the preconditioned solve's for Adam/AdamW/RMSprop, and the
        critical sharpness's forwards as products once they have been timed."""
        def last(part: str) -> int:
            return max(self._part_hvp.get(part, self.burst_hvp // 4), _MIN_SOLVE_HVP)

        pla = self._part_hvp.get("preconditioned_lambda_max", 0)
        critical = 0 if self._forward_seconds is None else self._critical_products()
        return last("lambda_max") + pla + (last("lambda_min") if lambda_min else 0) + self._n_probe_batches() + critical

    def _plan_next(self, trainer: Any, step: int) -> None:
        """Adaptive schedule: the next snapshot at the step where the bucket will hold its estimated cost above the
        stall reserve (at most the whole bucket), at the fit's credit per step so far."""
        if self.every_n_steps is not None:
            return
        credit, capacity = self._credit(), self.capacity()
        if credit is None or capacity is None:
            wait = 1
        else:
            full = self._full_due()  # a full snapshot's trace is planned for too, or it never finds its products
            products = self._refresh_products(full) + (self.trace_hvp if full else 0)
            needed = min(capacity, self._reserve() + self.estimate_seconds(products))
            self.estimated_seconds = needed - self._reserve()
            # Refreshes are paid from earned credit only: the starting credit not yet repaid stays for the evidence
            # a stall needs (the diagnoser's probe losses, its snapshot), which a routine refresh must not take.
            wait = max(1, self._steps_to_earn(step, needed - credit + self._advance))
        wait = trainer.strategy.broadcast(wait, src=0)  # rank 0's clock decides, so all ranks meet in collectives
        self._next_step = step + int(wait)

    def _plan(self, trainer: Any, budgeted: bool, lambda_min: bool, reserve_seconds: float) -> int | None:
        """Products this snapshot may spend beyond batch sharpness (rank 0's bucket, broadcast); -1 for no limit,
        None when the bucket cannot pay for the smallest useful snapshot."""
        if not budgeted:
            return -1
        n_batches = self._n_probe_batches()
        solves = 1 + int(lambda_min) + int(self._preconditioned(trainer))
        credit = self._credit()
        if credit is None:  # nothing timed yet: the bucket is full, and holds burst_hvp products and two setups
            products = (self.burst_hvp if lambda_min else self.burst_hvp // 2) - n_batches
        else:
            products = math.floor((credit - reserve_seconds - self._setup_seconds) / self._product_seconds) - n_batches
        plan = int(products) if products >= solves * _MIN_SOLVE_HVP else None
        return trainer.strategy.broadcast(plan, src=0)

    @staticmethod
    def _preconditioned(trainer: Any) -> bool:
        optimizer = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else None
        return optimizer is not None and OptimizerSpec.from_torch(optimizer).preconditioned

    def _update_costs(self, seconds: float, setup: float, n_hvp: int) -> None:
        """The cost model behind :meth:`estimate_seconds`: each snapshot's setup and its seconds per product
        (Lanczos bookkeeping and the gradient quantities included), averaged with the previous estimates."""
        # a clock too coarse to see a product (or one that did not move) must not price products at zero: the
        # products a bucket holds are its credit divided by this
        per_product = max(max(seconds - setup, 0.0) / max(n_hvp, 1), _MIN_PRODUCT_SECONDS)
        self._cost_samples += 1
        if self._setup_seconds is None or self._cost_samples == 2:  # the first one carries one-time costs
            self._setup_seconds, self._product_seconds = setup, per_product
        else:
            self._setup_seconds = 0.5 * (self._setup_seconds + setup)
            self._product_seconds = 0.5 * (self._product_seconds + per_product)

    def summary(self) -> str:
        """One line on this fit's curvature work; when the schedule took no estimate, why, with the numbers.

        Example:
            >>> print(HessianMonitor().summary())
            optdiag: HessianMonitor took no curvature estimate in 0 steps (the probe set was never complete).
        """
        steps = max(self._last_step_seen - self._steps_at_start, 0)
        if self._fit_estimates:
            return (f"optdiag: HessianMonitor took {self._fit_estimates} curvature estimate"
                    f"{'s' if self._fit_estimates != 1 else ''} in {steps} steps, {self._spent:.3g} s of Hessian work "
                    f"for {self._train_seconds():.3g} s of training (budget {self.budget:g}).")
        refresh = self.estimate_seconds(self._refresh_products())
        if not self._probe_ready():
            return f"optdiag: HessianMonitor took no curvature estimate in {steps} steps (the probe set was never complete)."
        if refresh is None and self._run_steps is not None and self._next_step is not None \
                and self._next_step > self._last_step_seen:
            price = self.first_estimate_price()
            needed = ceil_to(price / self._run_steps, 0.01)
            remedy = f"pass budget={needed:g} or a fixed every_n_steps" if needed <= 1 else "pass a fixed every_n_steps"
            return (f"optdiag: HessianMonitor took no curvature estimate in {steps} steps: a first lambda_max costs up "
                    f"to about {price:.0f} training steps' time, more than this {self._run_steps}-step run's budget "
                    f"({self.budget:g} of its steps: {self.budget * self._run_steps:.0f}), so it was due at step "
                    f"{self._next_step}, once earned. For curvature on a run this short, {remedy}.")
        if refresh is None:
            return f"optdiag: HessianMonitor took no curvature estimate in {steps} steps (every snapshot failed: see the warnings)."
        return (f"optdiag: HessianMonitor took no curvature estimate in {steps} steps: one lambda_max estimate costs "
                f"about {refresh:.3g} s, the budget ({self.budget:g} of {self._train_seconds():.3g} s of training, "
                f"plus a burst of {self.capacity():.3g} s) had {self.budget_balance():.3g} s left.")

    # --- the snapshot ---------------------------------------------------------------------------------------------
    def measure(self, trainer: Any, pl_module: Any, *, reason: str = "scheduled", trace: bool = False,
                lambda_min: bool = True, budgeted: bool | None = None, reserve_seconds: float = 0.0) -> dict[str, Any]:
        """Take a curvature snapshot now, whatever the schedule, charged to the budget (every rank must call it
        under DDP).

        The work is bounded by the bucket's credit less ``reserve_seconds`` (``budgeted``, the default with the
        adaptive schedule; a fixed cadence measures everything at the ``max_hvp`` caps): batch sharpness first,
        then lambda_max (warm-started from the last estimate, at most half of the products when lambda_min
        follows), the preconditioned sharpness for Adam/AdamW/RMSprop, lambda_min with the rest, the trace if
        ``trace`` and products are left, a density for scheduled snapshots when due. Each solve gets at most
        ``max_hvp`` products. lambda_min starts from its last eigenvector for scheduled snapshots; for any other
        ``reason`` (a stall) from that eigenvector plus an equal share of a random vector: a start from before the
        stall may hold almost nothing along the new negative direction (a new saddle), and within a small product
        cap Lanczos then reports a wrong, even positive, lambda_min (the warm start's own random share is only
        ``10 tol``); the random half reaches every direction as a cold start does (within a factor 1/sqrt(2)), while
        the warm half converges at once when the stall sits where the last estimate was taken.

        Args:
            trainer, pl_module: the Lightning objects.
            reason: ``"scheduled"``, ``"stall"``, ``"divergence"``, ...; snapshots for any reason other than
                ``"scheduled"`` are logged under ``optdiag/<reason>/...``, so a stall's lambda_min never shares a
                tag with the schedule's.
            trace: estimate the trace too (``trace_hvp`` products).
            lambda_min: estimate lambda_min (a lambda_max refresh leaves it out).
            budgeted: bound the work by the bucket; default: with the adaptive schedule.
            reserve_seconds: credit to leave in the bucket (for work that follows, e.g. the escape check).

        Returns:
            The snapshot: ``step``, ``reason``, ``lambda_max``, ``lambda_max_residual``, ``lambda_min``,
            ``lambda_min_residual``, ``lambda_min_start`` (``"warm"``, ``"mixed"``, ``"cold"``),
            ``eigen_converged``, ``hessian_trace``, ``hessian_trace_stderr``, ``hessian_trace_blocks`` (the trace
            of each layer's diagonal block, from the same products: ``{layer: trace}``), ``lambda_max_blocks`` (the
            share of the top eigenvector's squared norm in each layer), ``stability_threshold``,
            ``stability_ratio``, ``preconditioned_lambda_max``, ``preconditioner_warmup`` (``{"steps",
            "ready_at"}`` while Adam's/RMSprop's preconditioner is too young for a ratio, else None),
            ``batch_sharpness``, ``probe_loss``,
            ``probe_grad_norm``, ``probe_grad_sq_unbiased``, ``grad_noise_trace``, ``probe_batch_size``,
            ``hvp_method`` (``"exact"`` or ``"finite_difference"``), ``hvp_relative_error`` (finite differences:
            the estimated relative error of a product, which bounds the eigenvalues' relative error too; None for
            exact products), ``probe_batches`` (how many), ``lr``, ``momentum``, ``optimizer`` (an ``OptimizerSpec``), ``n_hvp``
            (products over the probe set), ``n_hvp_parts`` (``{"batch_sharpness", "lambda_max",
            "preconditioned_lambda_max", "lambda_min", "hessian_trace", "density"}``: the products of each part
            taken), ``setup_seconds``, ``seconds`` and ``budget_balance`` (the bucket's credit after it). Quantities
            not measured are ``None``. When no snapshot could be taken: ``{"step", "reason", "skipped": why}``
            (``"over budget"`` when the bucket cannot pay for the smallest useful snapshot). The critical
            sharpness keys (``critical_sharpness``, ``critical_sharpness_ratio``, ``critical_lr``,
            ``critical_lr_ratio``, ``directional_curvature``, ``directional_curvature_stderr``, ``n_forward``,
            ``critical_note``: why not) are None unless the snapshot follows the step the parameters were kept for.
        """
        step = global_step(trainer)
        if budgeted is None:
            budgeted = self.every_n_steps is None
        products = self._plan(trainer, budgeted, lambda_min, reserve_seconds)
        if products is None:
            return {"step": step, "reason": reason, "skipped": _OVER_BUDGET}
        started = self.clock()
        self._last_setup_seconds = 0.0
        result = self._guarded(step, reason, lambda: self._with_operators(
            trainer, pl_module, lambda mean, operators, optimizer: self._snapshot(
                trainer, pl_module, mean, operators, optimizer, step, reason,
                _Allowance(None if products < 0 else products), trace, lambda_min)))
        seconds = self.clock() - started
        n_hvp = int(result.get("n_hvp") or 0)
        if "skipped" not in result:
            self._update_costs(seconds - self._critical_seconds, self._last_setup_seconds, n_hvp)
        self._charge(seconds, reason, step, n_hvp)
        result["seconds"] = seconds
        if "skipped" not in result:
            result["setup_seconds"] = self._last_setup_seconds
            result["budget_balance"] = self._tokens
            self._n_snapshots += 1
            self._fit_snapshots += 1
            self._fit_estimates += 1
            self._history.append({k: v for k, v in result.items() if k not in _HEAVY})
            prefix = "" if reason == "scheduled" else f"{reason}/"
            self.log_scalars(trainer, {prefix + k: v for k, v in result.items()}, step)
        return result

    def _guarded(self, step: int, reason: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``work()``, or ``{"step", "reason", "skipped": why}`` after warning (once per kind) if it failed."""
        try:
            return work()
        except NotTwiceDifferentiableError as error:
            self._disable("not-twice-differentiable", f"Hessian estimates switched off: {error}")
            return {"step": step, "reason": reason, "skipped": "not twice differentiable"}
        except NonFiniteError as error:
            self.warn_once("non-finite", f"curvature snapshot at step {step} skipped: {error}")
            return {"step": step, "reason": reason, "skipped": "non-finite"}
        except UsageError as error:
            self._disable("usage", f"Hessian estimates switched off: {error}")
            return {"step": step, "reason": reason, "skipped": str(error)}
        except Exception as error:  # noqa: BLE001 - degrade, don't crash
            self.warn_once(f"error:{type(error).__name__}", f"curvature snapshot at step {step} failed "
                           f"({type(error).__name__}: {error}); skipped")
            return {"step": step, "reason": reason, "skipped": f"{type(error).__name__}"}

    def _disable(self, kind: str, message: str) -> None:
        self.enabled = False
        self.warn_once(kind, message)

    def probe_set(self) -> list[Any]:
        """The batches a snapshot is computed on now: the fixed probe set (the copies kept from the first training
        batches; fewer until they have all been seen) or, with ``probe="current"``, the batch just trained on.

        Example:
            >>> monitor = HessianMonitor(probe_batches=2)
            >>> monitor.probe_set()  # nothing seen yet
            []
        """
        if self.probe == "fixed":
            return list(self._probe_set)
        return [] if self._current_batch is None else [self._current_batch]

    def _compute_dtype(self, pl_module: Any) -> torch.dtype:
        dtypes = {p.dtype for _, p in trainable_parameters(pl_module)}
        widest = max(dtypes, key=lambda d: torch.finfo(d).bits)
        return widest if torch.finfo(widest).bits >= 32 else torch.float32

    def _with_operators(self, trainer: Any, pl_module: Any, work: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        """``work(mean, operators, optimizer)`` on the probe set's Hessian operators, with the training state saved
        and restored around it (do no harm), autocast off and fixed dropout masks."""
        started = self.clock()
        batches = self.probe_set()
        dtype = self._compute_dtype(pl_module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        with preserved_state(pl_module), _autocast_off(pl_module.device):
            # the same dropout masks at every snapshot (RNGs restored on exit); only the generators the module draws
            # from: torch.manual_seed visits every backend and costs a fifth of a small model's lambda_max refresh
            torch.default_generator.manual_seed(self.seed)
            if pl_module.device.type == "cuda":
                torch.cuda.manual_seed_all(self.seed)
            pl_module.train(self.mode == "train")
            operators, failure = [], None
            try:
                method = self._resolve_hvp(trainer, pl_module, batches[0], dtype)
                for batch in batches:
                    operators.append(make_hessian_operator(method, pl_module, self.loss_fn, [batch], dtype=dtype))
            except (NonFiniteError, NotTwiceDifferentiableError) as error:
                operators, failure = [], error
            # every rank learns whether any rank failed, so all take the same branch (collectives must match)
            usable = reduce_sum(torch.tensor([1.0 if operators else 0.0], dtype=torch.float64))
            if float(usable) < self.world_size(trainer):
                if failure is not None:
                    raise failure
                raise NonFiniteError("no usable probe batch on some rank")
            mean = ReducedMeanOperator(operators, [float(batch_size_of(b) or 1) for b in batches])
            self._last_setup_seconds = self.clock() - started
            try:
                return work(mean, operators, optimizer)
            finally:
                for op in operators:
                    op.close()

    def _snapshot(self, trainer, pl_module, mean, operators, optimizer, step, reason, allowance, trace,
                  lambda_min) -> dict[str, Any]:
        parts: dict[str, int] = {"batch_sharpness": len(operators)}  # one product per probe batch
        allowance.spend(len(operators))
        out: dict[str, Any] = {"step": step, "reason": reason, "probe_batches": len(operators)}
        out.update(self._gradient_quantities(mean, operators))
        preconditioned = optimizer is not None and OptimizerSpec.from_torch(optimizer).preconditioned
        later = int(lambda_min) + int(preconditioned)  # solves after lambda_max, each owed _MIN_SOLVE_HVP products
        out.update(self._critical(pl_module, mean, optimizer, step, allowance))  # before the solves take it all
        self._capture.release()  # the parameters before the step: one copy less beside the solves' basis
        la = top_eigenvalues(mean, k=1, which="LA", tol=self.tol, max_hvp=allowance.cap(self.max_hvp, later),
                             v0=self.last_eigenvectors.get("LA"), seed=self.seed)
        self.last_eigenvectors["LA"] = la
        parts["lambda_max"] = allowance.spend(la.n_hvp)
        out.update(lambda_max=float(la.eigenvalues[0]), lambda_max_residual=float(la.residuals[0]))
        # the residual bound: an eigenvalue lies within |H u - theta u| of the Ritz value (the margin chart's band)
        out.update(lambda_max_lower=out["lambda_max"] - out["lambda_max_residual"],
                   lambda_max_upper=out["lambda_max"] + out["lambda_max_residual"])
        blocks = self._layer_blocks(pl_module, mean)
        out["lambda_max_blocks"] = _block_shares(la.eigenvectors[0], blocks)  # where the sharpest direction lies
        out.update(self._stability(mean, optimizer, pl_module, out["lambda_max"], allowance, int(lambda_min), parts))
        if out["critical_sharpness"] is not None and out["stability_threshold"]:
            out["critical_sharpness_ratio"] = out["critical_sharpness"] / out["stability_threshold"]
        out.update(lambda_min=None, lambda_min_residual=None, lambda_min_start=None)
        converged = la.converged
        if lambda_min:
            previous = self.last_eigenvectors.get("SA")
            start = None if previous is None else "warm" if reason == "scheduled" else "mixed"
            v0: Any = previous
            if start == "mixed":  # see measure(): half the last eigenvector, half a random direction
                generator = torch.Generator().manual_seed(self.seed + 3 + step)
                noise = torch.randn(mean.num_params, generator=generator, dtype=torch.float64)
                noise = (noise / noise.norm()).to(previous.eigenvectors.device, previous.eigenvectors.dtype)
                v0 = torch.stack([previous.eigenvectors[0], noise])
            sa = top_eigenvalues(mean, k=1, which="SA", tol=self.tol, max_hvp=allowance.cap(self.max_hvp, 0),
                                 v0=v0, seed=self.seed + 1)
            self.last_eigenvectors["SA"] = sa
            parts["lambda_min"] = allowance.spend(sa.n_hvp)
            converged = converged and sa.converged
            out.update(lambda_min=float(sa.eigenvalues[0]), lambda_min_residual=float(sa.residuals[0]),
                       lambda_min_start=start or "cold")
        out["eigen_converged"] = bool(converged)
        out.update(hessian_trace=None, hessian_trace_stderr=None, hessian_trace_blocks=None)
        if trace and self.trace_hvp and allowance.covers(self.trace_hvp):
            before = mean.n_hvp
            result = hessian_trace(mean, n_hvp=self.trace_hvp, seed=self.seed,
                                   blocks=None if blocks is None else list(blocks.values()))
            parts["hessian_trace"] = allowance.spend(mean.n_hvp - before)
            out.update(hessian_trace=float(result.estimate), hessian_trace_stderr=float(result.stderr))
            if result.block_estimates is not None:  # the same products, split over the layers
                out["hessian_trace_blocks"] = dict(zip(blocks, result.block_estimates.tolist()))
        density = None
        n_density = min(self.density_steps, mean.num_params)
        # (no density on sharded vectors: its Lanczos quadrature takes no dot product across ranks)
        if reason == "scheduled" and trace and self._density_due(trainer) and allowance.covers(n_density) \
                and not mean.sharded:
            before = mean.n_hvp
            density = spectral_density(mean, n_runs=1, n_steps=n_density, seed=self.seed)
            parts["density"] = allowance.spend(mean.n_hvp - before)
            self.last_density = density
        self._part_hvp.update(parts)
        out["n_hvp_parts"] = parts
        out["n_hvp"] = sum(parts.values())
        out["hvp_count"] = out["n_hvp"]
        if density is not None and trainer.is_global_zero:
            self._log_density(trainer, density, step)
        return out

    def _layer_blocks(self, pl_module: Any, mean: Any) -> dict[str, int] | None:
        """The layers as consecutive slices of the products' parameter vector (:attr:`parameter_blocks`); None
        when the vectors are sharded or laid out otherwise."""
        if getattr(mean, "sharded", False):
            return None
        blocks = parameter_blocks(pl_module)
        if sum(blocks.values()) != mean.num_params:
            return None
        self.parameter_blocks = blocks
        return blocks

    def _resolve_hvp(self, trainer: Any, pl_module: Any, batch: Any, dtype: torch.dtype) -> str:
        """The product method, resolved at the first snapshot (a probe product, see
        :func:`~optdiag.curvature.operator.choose_hvp_method`) and kept; every rank takes finite differences if any
        rank needs them (their collectives differ). Said once in the ``optdiag`` log when it is not the exact one."""
        if self.hvp_method is None:
            method, reason = choose_hvp_method(pl_module, self.loss_fn, batch, hvp=self.hvp, dtype=dtype)
            needed = reduce_sum(torch.tensor([float(method == "finite_difference")], dtype=torch.float64))
            if float(needed) > 0 and method != "finite_difference":
                method, reason = "finite_difference", "another rank's model cannot be differentiated twice"
            self.hvp_method, self.hvp_reason = method, reason
            if method == "finite_difference" and trainer.is_global_zero:
                LOGGER.info("optdiag: HessianMonitor takes Hessian-vector products by finite differences: "
                            "%s (docs/finite-difference-and-fsdp.md)", reason)
        return self.hvp_method

    def _gradient_quantities(self, mean: ReducedMeanOperator, operators: list) -> dict[str, Any]:
        """Probe loss, gradient, noise and batch sharpness, reduced over batches and ranks."""
        grads = [op.gradient() for op in operators]
        gradient = mean.weighted_mean(grads)
        local_loss = sum(w * op.loss for w, op in zip(mean.weights, operators))
        sums = [local_loss, 0.0, 0.0, float(len(operators)), 0.0]
        for g, op in zip(grads, operators):
            sq = mean.dot(g, g)  # sharded (FSDP) vectors: summed over ranks
            sums[1] += sq
            if sq > 0:
                sums[2] += mean.dot(g, op.matvec(g)) / sq  # g_B^T H_B g_B / |g_B|^2, one product per batch
                sums[4] += 1.0
        loss, sq_small, sharpness, n_batches, n_sharp = mean.reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
        out: dict[str, Any] = {
            "probe_loss": loss / mean.total_weight,
            "probe_grad_norm": float(mean.vector_norm(gradient)),
            "hvp_method": self.hvp_method,
            # finite differences: the largest relative error estimated for a product (exact products: None)
            "hvp_relative_error": max((op.relative_error for op in operators
                                       if getattr(op, "relative_error", None) is not None), default=None),
            "batch_sharpness": sharpness / n_sharp if n_sharp else None,
            "probe_batch_size": int(mean.total_weight),
            "probe_grad_sq_unbiased": None,
            "grad_noise_trace": None,
        }
        if (out["hvp_relative_error"] or 0.0) > _FD_ERROR_WARN:
            self.warn_once("fd-inaccurate", f"finite-difference Hessian-vector products are inaccurate here "
                           f"(estimated relative error {out['hvp_relative_error']:.2g}): the loss is not smooth on "
                           "the step's scale (ReLU or max-pool kinks, in float32); the eigenvalues carry that error "
                           "(docs/finite-difference-and-fsdp.md)")
        b_small = mean.total_weight / n_batches
        out.update(probe_noise_scale=None, probe_noise_scale_lower=None, probe_noise_scale_upper=None)
        if n_batches >= 2:
            measured = (b_small, mean.total_weight, sq_small / n_batches, mean.dot(gradient, gradient))
            noise = gradient_noise_scale(*measured[2:], b_small, mean.total_weight)
            out.update(probe_grad_sq_unbiased=noise.grad_sq_norm, grad_noise_trace=noise.trace_sigma)
            out.update(self._pooled_noise_scale(measured))
        return out

    def _pooled_noise_scale(self, measured: tuple[float, float, float, float]) -> dict[str, float]:
        """``B_simple`` over the last :data:`NOISE_POOL` snapshots' probe measurements (one pair each), with its
        one-standard-error band ``B exp(+-se(log B))``: one snapshot's two batches are too noisy alone, and their
        spread is what the band needs (docs/theory.md section 6)."""
        self._noise_pool.append(measured)
        pooled = [m for m in self._noise_pool if m[:2] == measured[:2]]
        noise = gradient_noise_scale([m[2] for m in pooled], [m[3] for m in pooled], measured[0], measured[1],
                                     paired=True)
        out: dict[str, float] = {}
        if math.isfinite(noise.b_simple) and noise.b_simple > 0:
            out["probe_noise_scale"] = noise.b_simple
            # a band wider than floats reach (two nearly equal batches' gradients) is no band: left unmeasured
            if math.isfinite(noise.b_simple_log_stderr) and noise.b_simple_log_stderr < _LOG_FLOAT_MAX:
                out["probe_noise_scale_lower"] = noise.b_simple * math.exp(-noise.b_simple_log_stderr)
                out["probe_noise_scale_upper"] = noise.b_simple * math.exp(noise.b_simple_log_stderr)
        return out

    def _stability(self, mean, optimizer, pl_module, lambda_max: float, allowance: "_Allowance", later: int,
                   parts: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": None, "lr": None, "momentum": None, "stability_threshold": None,
                               "stability_ratio": None, "preconditioned_lambda_max": None,
                               "preconditioner_warmup": None}
        if optimizer is None:
            return out
        spec = OptimizerSpec.from_torch(optimizer)
        momentum = spec.beta1 if spec.kind in ("adam", "adamw") else spec.momentum
        threshold = stability_threshold(spec)
        out.update(optimizer=spec, lr=spec.lr, momentum=momentum, stability_threshold=threshold)
        sharpness = lambda_max
        if spec.preconditioned:
            params = [p for _, p in trainable_parameters(pl_module)]
            torch_optimizer = getattr(optimizer, "optimizer", optimizer)
            try:
                warmup = preconditioner_warmup(torch_optimizer, params)
                # no ratio from a preconditioner that is still noise (docs/theory.md section 1); sharded: summed
                # over ranks, so that every rank goes on to the (collective) solve or none does
                if float(mean.shard_sum(torch.tensor([float(not warmup.ready)]))) > 0:
                    out["preconditioner_warmup"] = {"steps": warmup.steps, "ready_at": warmup.ready_at}
                    return out
                pre = PreconditionedOperator.from_optimizer(mean, torch_optimizer, params=params)
            except ValueError as error:  # e.g. a parameter the optimizer has no state for
                self.warn_once("preconditioner", f"preconditioned sharpness unavailable: {error}")
                out["stability_threshold"] = None
                return out
            warm = self.last_eigenvectors.get("PLA")
            result = top_eigenvalues(pre, k=1, which="LA", tol=self.tol, max_hvp=allowance.cap(self.max_hvp, later),
                                     v0=warm, seed=self.seed + 2)
            self.last_eigenvectors["PLA"] = result
            parts["preconditioned_lambda_max"] = allowance.spend(result.n_hvp)
            sharpness = float(result.eigenvalues[0])
            out["preconditioned_lambda_max"] = sharpness
        if threshold is not None and threshold > 0:
            out["stability_ratio"] = sharpness / threshold
        return out

    def _critical(self, pl_module: Any, mean: ReducedMeanOperator, optimizer: Any, step: int,
                  allowance: "_Allowance") -> dict[str, Any]:
        """The critical sharpness along the optimizer step that ended at ``step`` (forwards only), when the
        parameters before it were kept and the allowance covers its price and lambda_max's least products: at most
        ``MAX_EVALS`` forwards over the step's batch, priced in products at the timed ratio of a forward to a product
        (before one is timed, a product as ``_FORWARDS_PER_PRODUCT`` forwards). Its wall time is part of the
        snapshot's charge; the forwards taken are the snapshot's ``n_forward``."""
        self._critical_seconds = 0.0
        out: dict[str, Any] = dict.fromkeys(CRITICAL_KEYS)
        before = self._capture.before(step)
        if before is None:
            return out
        # Every rank must take the same branch (the forwards' losses are summed over the ranks): one price for all,
        # from the ranks' mean ratio of a forward to a product.
        ratio, ranks = reduce_sum(torch.tensor([self._forward_ratio(), 1.0], dtype=torch.float64)).tolist()
        ratio /= ranks
        if not allowance.covers(self._critical_products(ratio=ratio) + _MIN_SOLVE_HVP):
            out["critical_note"] = _OVER_BUDGET
            return out
        started = self.clock()
        batches = self.probe_set() if self._capture.batch is None else [self._capture.batch]
        spec = OptimizerSpec.from_torch(optimizer) if optimizer is not None else None
        sizes = [float(batch_size_of(b) or 1) for b in batches]
        try:
            out.update(critical_snapshot(pl_module, self.loss_fn, batches, sizes, before, dtype=mean.dtype,
                                         reduce=reduce_sum, lr=None if spec is None else spec.lr,
                                         threshold=None))
        except Exception as error:  # noqa: BLE001 - the eigenvalues of this snapshot stand without it
            self.warn_once(f"critical:{type(error).__name__}", f"critical sharpness at step {step} unavailable "
                           f"({type(error).__name__}: {error})")
            out["critical_note"] = type(error).__name__
        self._critical_seconds = self.clock() - started
        if out["n_forward"]:
            allowance.spend(self._critical_products(out["n_forward"], ratio))
            seconds, previous = self._critical_seconds / out["n_forward"], self._forward_seconds
            self._forward_seconds = seconds if previous is None else 0.5 * (previous + seconds)
            self._last_n_forward = out["n_forward"]
        return out

    def _critical_products(self, n_forward: int | None = None, ratio: float | None = None) -> int:
        """The critical sharpness's price in products: ``n_forward`` forwards (default its last count, at first
        ``MAX_EVALS``) at ``ratio`` products a forward (default :meth:`_forward_ratio`)."""
        ratio = self._forward_ratio() if ratio is None else ratio
        return math.ceil((n_forward or self._last_n_forward or MAX_EVALS) * ratio)

    def _forward_ratio(self) -> float:
        """One forward of the critical sharpness in products: their timed ratio, or before either is timed
        ``1 / _FORWARDS_PER_PRODUCT``."""
        if self._forward_seconds is not None and self._product_seconds:
            return self._forward_seconds / self._product_seconds
        return 1 / _FORWARDS_PER_PRODUCT

    def _log_density(self, trainer: Any, density: Any, step: int) -> None:
        tb = self.tensorboard_logger(trainer)
        if tb is None:
            return
        from optdiag.sinks.figures import plot_spectral_density

        # nodes flattened over runs: plot_spectral_density draws them as one rug
        flat = dataclasses.replace(density, nodes=density.nodes.reshape(-1), weights=density.weights.reshape(-1))
        figure = plot_spectral_density(flat, title=f"Hessian spectral density, step {step}")
        tensorboard_sink.register_layout(tb)
        tensorboard_sink.log_figure(tb, "optdiag/spectral_density", figure, step)

    # --- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self._history),
            "n_snapshots": self._n_snapshots,
            "next_step": self._next_step,
            "monitor_seconds": self.monitor_seconds,
            "enabled": self.enabled,
            "warning_counts": dict(self.warning_counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = deque(state_dict.get("history", []), maxlen=self.history_size)
        self._n_snapshots = int(state_dict.get("n_snapshots", len(self._history)))
        self._next_step = state_dict.get("next_step")
        self.monitor_seconds = float(state_dict.get("monitor_seconds", 0.0))
        self.enabled = bool(state_dict.get("enabled", True))
        self.warning_counts = dict(state_dict.get("warning_counts", {}))


class _Allowance:
    """The products a budgeted snapshot may still spend (``None``: no limit), handed out part by part."""

    def __init__(self, products: int | None) -> None:
        self.left = products

    def cap(self, max_hvp: int, later_solves: int) -> int:
        """An eigen-solve's cap: ``max_hvp``, and with a limit at most what is left once each later solve is owed
        its minimum, and at most half of it when one follows (a warm refresh rarely needs more)."""
        if self.left is None:
            return max_hvp
        share = self.left - later_solves * _MIN_SOLVE_HVP
        if later_solves:
            share = min(share, max(self.left // 2, _MIN_SOLVE_HVP))
        return max(1, min(max_hvp, share))

    def covers(self, products: int) -> bool:
        return self.left is None or self.left >= products

    def spend(self, products: int) -> int:
        if self.left is not None:
            self.left -= products
        return products


def _planned_steps(trainer: Any) -> float:
    """The optimizer steps the Trainer plans for the whole fit (``estimated_stepping_batches``); inf when unknown or
    unbounded."""
    try:
        planned = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - a loader without a length, an unusual loop: the length is unknown
        return math.inf
    return planned if planned > 0 else math.inf


def _block_shares(vector: torch.Tensor, blocks: dict[str, int] | None) -> dict[str, float] | None:
    """The share of ``|vector|^2`` in each block (None without blocks or for a zero vector)."""
    if blocks is None:
        return None
    squares = torch.stack([part.double().square().sum() for part in vector.reshape(-1).split(list(blocks.values()))])
    total = float(squares.sum())
    return dict(zip(blocks, (squares / total).tolist())) if total > 0 and math.isfinite(total) else None


@contextlib.contextmanager
def _autocast_off(device: torch.device):
    """Curvature in full precision whatever mixed-precision context the caller is in."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield
