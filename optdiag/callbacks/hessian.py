"""``HessianMonitor``: lambda_max, lambda_min, trace, density and the optimizer's stability margin during training."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import deque
from typing import Any, Callable, Mapping

import torch

from optdiag.callbacks._base import OptDiagCallback, batch_size_of, guarded
from optdiag.curvature.density import spectral_density
from optdiag.curvature.distributed import ReducedMeanOperator, reduce_sum
from optdiag.curvature.lanczos import EigenResult, top_eigenvalues
from optdiag.curvature.noise import gradient_noise_scale
from optdiag.curvature.operator import HessianOperator
from optdiag.curvature.params import trainable_parameters
from optdiag.curvature.preconditioned import PreconditionedOperator
from optdiag.curvature.state import preserved_state
from optdiag.curvature.trace import hessian_trace
from optdiag.diagnosis.stability import OptimizerSpec, stability_threshold
from optdiag.errors import NonFiniteError, NotTwiceDifferentiableError, OptDiagError, UsageError
from optdiag.sinks import tensorboard as tensorboard_sink

LossFn = Callable[[Any, Any], torch.Tensor]
_HEAVY = ("optimizer",)  # kept in the returned dict, left out of the history and of checkpoints


def lightning_loss(pl_module: Any, batch: Any) -> torch.Tensor:
    """The default curvature loss: ``pl_module.optdiag_loss(batch)`` if defined, else ``training_step``'s loss.

    ``training_step`` is called with ``self.log``/``self.log_dict`` silenced (they may not be called outside the
    training loop) and batch index 0; its loss is the returned tensor or ``output["loss"]``.

    Raises:
        UsageError: if ``training_step`` returns neither a tensor nor a dict with ``"loss"``.
    """
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
      unstable along the sharpest direction.
    * ``batch_sharpness``: mean over probe batches of ``g_B^T H_B g_B / |g_B|^2`` (what minibatch SGD holds at
      ``2/lr``; THEORY.md section 1).
    * ``probe_loss``, ``probe_grad_norm``, and with two or more probe batches the gradient noise:
      ``probe_grad_sq_unbiased`` (``|G|^2``) and ``grad_noise_trace`` (``tr(Sigma)``).
    * every ``density_every``-th snapshot, a spectral density (stochastic Lanczos quadrature) as a TensorBoard
      figure. A figure is the only place a density is shown, so it is computed only when a ``TensorBoardLogger``
      is attached (it would be the costliest part of a snapshot otherwise: 40 products and a growing basis).

    **Probe set.** ``probe="fixed"`` (default): copies of the first ``probe_batches`` training batches, exactly as
    the model received them (already on its device), kept for the whole run so that estimates compare over time;
    the data loader is never touched. ``probe="current"``: the batch just trained on.

    **Loss.** ``loss_fn(pl_module, batch) -> scalar``; default :func:`lightning_loss` (``optdiag_loss`` if the
    module defines it, else ``training_step`` with logging silenced). With manual optimization ``training_step``
    steps the optimizer, so define ``optdiag_loss`` or pass ``loss_fn``; otherwise Hessian estimates stay off.

    **Schedule.** ``every_n_steps=n``: every ``n`` optimizer steps. ``every_n_steps=None`` (default): adaptive, so
    that the Hessian work stays within ``budget`` of the training time (wall time less the Hessian work). It keeps
    an account: :meth:`budget_balance` = ``budget * training seconds - Hessian seconds`` of this fit.

    * The first snapshot (cold: no warm start, the most expensive of the run) is not taken right away. When the
      probe set is complete, one Hessian-vector product on it is timed (the "cost probe": building the operators
      plus one product, charged to the account), and the snapshot's cost is estimated as that setup plus the
      product time the number of products a cold snapshot may take: each eigen-solve at its ``max_hvp`` cap (capped
      by the number of parameters), ``trace_hvp``, one for batch sharpness, and a density if one is due. Solves often
      converge before their cap, which leaves room for the Lanczos bookkeeping the estimate does not count. The
      first snapshot comes once training time pays for the probe and this estimate within the budget.
    * Each later snapshot is placed the same way, with the last snapshot's measured time as the estimate.
    * Stall snapshots (:class:`~optdiag.callbacks.StallDiagnoser`) are charged to the same account: see
      :meth:`can_afford_snapshot`. One may run early and overdraw the budget; the scheduled ones then wait until
      training time has repaid the debt.

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
            ``(0, 1]``.
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
        history_size: how many snapshots :attr:`history` keeps.

    Attributes:
        history: one dict per snapshot (the :meth:`measure` keys, without the ``OptimizerSpec``).
        last_eigenvectors: ``{"LA": EigenResult, "SA": EigenResult}`` of the last snapshot (for escape directions).
        last_density: the last ``DensityResult`` or None.
        monitor_seconds: wall seconds of Hessian work (snapshots and cost probes) over all fits.
        estimated_seconds: the expected cost of the next snapshot (the cost probe's estimate, then the last
            snapshot's measured time); None before either.

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
    ) -> None:
        super().__init__()
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise UsageError(f"every_n_steps must be None (adaptive) or an int >= 1, got {every_n_steps!r}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise UsageError(f"budget must be a fraction of training time in (0, 1], got {budget!r}")
        if probe not in ("fixed", "current"):
            raise UsageError(f"probe must be 'fixed' or 'current', got {probe!r}")
        if mode not in ("train", "eval"):
            raise UsageError(f"mode must be 'train' or 'eval', got {mode!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise UsageError(f"loss_fn must be callable as loss_fn(pl_module, batch), got {type(loss_fn).__name__}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise UsageError(f"tol must be in (0, 1), got {tol!r}")
        for name, value, low in (("probe_batches", probe_batches, 1), ("max_hvp", max_hvp, 2),
                                 ("trace_hvp", trace_hvp, 0), ("density_every", density_every, 0),
                                 ("density_steps", density_steps, 2), ("seed", seed, 0),
                                 ("history_size", history_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an int >= {low}, got {value!r}")
        if trace_hvp and trace_hvp < 3:
            raise UsageError(f"trace_hvp must be 0 (off) or at least 3 (Hutch++), got {trace_hvp}")
        self.every_n_steps, self.budget, self.probe, self.probe_batches = every_n_steps, float(budget), probe, probe_batches
        self.loss_fn: LossFn = loss_fn or lightning_loss
        self.mode, self.tol, self.max_hvp, self.trace_hvp = mode, float(tol), max_hvp, trace_hvp
        self.density_every, self.density_steps, self.seed = density_every, density_steps, seed
        self.history_size = history_size
        self._history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self.last_eigenvectors: dict[str, EigenResult] = {}
        self.last_density: Any = None
        self.enabled = True
        self.monitor_seconds = 0.0
        self._n_snapshots = 0
        self._next_step: int | None = None
        self._reset_run()

    def _reset_run(self) -> None:
        self._probe_set: list[Any] = []
        self._current_batch: Any = None
        self._train_started: float | None = None
        self._steps_at_start = 0
        self._last_step_seen = -1
        self._spent = 0.0  # Hessian seconds of this fit (snapshots and the cost probe): the budget's debit side
        self._fit_snapshots = 0
        self.estimated_seconds: float | None = None  # what the next snapshot is expected to cost

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
        self._train_started = time.perf_counter()
        self._steps_at_start = int(trainer.global_step)
        self._last_step_seen = int(trainer.global_step)
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
        if self.probe == "current":
            self._current_batch = batch
        elif len(self._probe_set) < self.probe_batches:
            self._probe_set.append(_clone_batch(batch))

    @guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self._last_step_seen:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step_seen = step
        if not self.enabled or not self._probe_ready():
            return
        if self.every_n_steps is None and self._next_step is None:
            self._plan_first(trainer, pl_module, step)
        elif self._due(step):
            self.measure(trainer, pl_module)

    # --- schedule and budget ---------------------------------------------------------------------------------------
    def _probe_ready(self) -> bool:
        return self.probe != "fixed" or len(self._probe_set) >= self.probe_batches

    def _due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        return self._next_step is not None and step >= self._next_step

    def _train_seconds(self) -> float:
        """Wall time of this fit so far, less the time the Hessian work took."""
        if self._train_started is None:
            return 0.0
        return max(time.perf_counter() - self._train_started - self._spent, 0.0)

    def budget_balance(self) -> float:
        """Seconds of Hessian work this fit may still spend: ``budget * training time - Hessian time so far``.

        Negative while in debt (after a stall snapshot taken early). Rank 0's clock is what counts under DDP: the
        decisions built on it (:meth:`can_afford_snapshot`, the adaptive schedule) are broadcast from rank 0.
        """
        return self.budget * self._train_seconds() - self._spent

    def can_afford_snapshot(self, trainer: Any) -> bool:
        """Whether an unscheduled snapshot (a stall's) may run now.

        With a fixed cadence always (the cadence is the user's choice of cost). With the adaptive budget: the first
        snapshot of a fit always (the first verdict gets its curvature, however early), later ones only while the
        account is not in debt (:meth:`budget_balance` >= 0). A snapshot allowed here may overdraw the budget by its
        own cost; the scheduled snapshots then wait until training time has repaid the debt. So the Hessian work of
        a fit stays within ``budget`` of its training time plus one snapshot (and the cost probe). Every rank must
        call this under DDP: rank 0 decides, the answer is broadcast.

        Example:
            >>> HessianMonitor(every_n_steps=100).can_afford_snapshot(trainer=None)
            True
        """
        if self.every_n_steps is not None:
            return True
        affordable = self._fit_snapshots == 0 or self.budget_balance() >= 0.0
        return bool(trainer.strategy.broadcast(affordable, src=0))

    def _plan_first(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Before the first adaptive snapshot: estimate its cost from one timed product, and schedule it once the
        training time pays for that estimate within the budget (rather than right away, when it would be the most
        expensive snapshot of the run, cold, against almost no training time)."""
        started = time.perf_counter()
        result = self._guarded(step, "cost-probe", lambda: self._with_operators(trainer, pl_module, self._time_product))
        seconds = time.perf_counter() - started
        self._charge(seconds)
        if "per_product" in result:
            products = self._expected_products(trainer, result["num_params"])
            setup = seconds - result["per_product"]  # building the operators, saving and restoring the state
            self.estimated_seconds = setup + result["per_product"] * products
        else:  # the probe failed (warned and counted): a snapshot of about the same cost is retried later
            self.estimated_seconds = seconds
        with contextlib.suppress(Exception):
            self._plan_next(trainer, step, self.estimated_seconds)

    def _time_product(self, mean: ReducedMeanOperator, operators: list, optimizer: Any) -> dict[str, Any]:
        built = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)  # its own generator: the global RNG never moves
        v = torch.randn(mean.num_params, generator=generator, dtype=torch.float64).to(mean.device, mean.dtype)
        mean.matvec(v)
        return {"per_product": time.perf_counter() - built, "num_params": mean.num_params}

    def _expected_products(self, trainer: Any, num_params: int) -> int:
        """Products over the probe set a cold snapshot may take: each eigen-solve at its cap (a Krylov space has at
        most ``num_params`` dimensions), the trace, batch sharpness (one product per probe batch: one over the set)
        and a density if one is due."""
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        solves = 2 + int(optimizer is not None and OptimizerSpec.from_torch(optimizer).preconditioned)
        density = min(self.density_steps, num_params) if self._density_due(trainer) else 0
        return solves * min(self.max_hvp, num_params) + self.trace_hvp + 1 + density

    def _density_due(self, trainer: Any) -> bool:
        """Densities are drawn only as TensorBoard figures: computed only when a TensorBoard logger will show them."""
        return bool(self.density_every) and self._n_snapshots % self.density_every == 0 \
            and self.tensorboard_logger(trainer) is not None

    def _charge(self, seconds: float) -> None:
        self._spent += seconds
        self.monitor_seconds += seconds

    def _plan_next(self, trainer: Any, step: int, seconds: float) -> None:
        """Adaptive schedule: the next snapshot when training time has paid for the work so far and for the next
        one (expected to cost ``seconds``) within the budget; a debt from an early stall snapshot is repaid first."""
        if self.every_n_steps is not None:
            return
        steps_done = max(step - self._steps_at_start, 1)
        train_seconds = max(self._train_seconds(), 1e-9)
        seconds_per_step = train_seconds / steps_done
        needed_train_seconds = (self._spent + seconds) / self.budget
        wait = max(1, math.ceil((needed_train_seconds - train_seconds) / seconds_per_step))
        wait = trainer.strategy.broadcast(wait, src=0)  # rank 0's clock decides, so all ranks meet in collectives
        self._next_step = step + int(wait)

    # --- the snapshot ---------------------------------------------------------------------------------------------
    def measure(self, trainer: Any, pl_module: Any, *, reason: str = "scheduled") -> dict[str, Any]:
        """Take a curvature snapshot now, whatever the schedule (every rank must call it under DDP).

        Returns:
            The snapshot: ``step``, ``reason``, ``lambda_max``, ``lambda_max_residual``, ``lambda_min``,
            ``lambda_min_residual``, ``hessian_trace``, ``hessian_trace_stderr``, ``stability_threshold``,
            ``stability_ratio``, ``preconditioned_lambda_max``, ``batch_sharpness``, ``probe_loss``,
            ``probe_grad_norm``, ``probe_grad_sq_unbiased``, ``grad_noise_trace``, ``probe_batch_size``, ``lr``,
            ``momentum``, ``optimizer`` (an ``OptimizerSpec``), ``n_hvp``, ``seconds``. Quantities that do not
            apply are ``None``. When no snapshot could be taken: ``{"step", "reason", "skipped": why}``.
        """
        step = int(trainer.global_step)
        started = time.perf_counter()
        result = self._guarded(step, reason, lambda: self._with_operators(
            trainer, pl_module, lambda mean, operators, optimizer: self._snapshot(
                trainer, pl_module, mean, operators, optimizer, step, reason)))
        seconds = time.perf_counter() - started
        self._charge(seconds)
        result["seconds"] = seconds
        if "skipped" not in result:
            self._n_snapshots += 1
            self._fit_snapshots += 1
            self._history.append({k: v for k, v in result.items() if k not in _HEAVY})
            self.log_scalars(trainer, result, step)
            self.estimated_seconds = seconds
        with contextlib.suppress(Exception):
            self._plan_next(trainer, step, self.estimated_seconds or seconds)
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
        batches = self.probe_set()
        dtype = self._compute_dtype(pl_module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        with preserved_state(pl_module), _autocast_off(pl_module.device):
            torch.manual_seed(self.seed)  # the same dropout masks at every snapshot (RNGs restored on exit)
            pl_module.train(self.mode == "train")
            operators, failure = [], None
            try:
                for batch in batches:
                    operators.append(HessianOperator(pl_module, self.loss_fn, [batch], dtype=dtype))
            except (NonFiniteError, NotTwiceDifferentiableError) as error:
                operators, failure = [], error
            # every rank learns whether any rank failed, so all take the same branch (collectives must match)
            usable = reduce_sum(torch.tensor([1.0 if operators else 0.0], dtype=torch.float64))
            if float(usable) < self.world_size(trainer):
                if failure is not None:
                    raise failure
                raise NonFiniteError("no usable probe batch on some rank")
            mean = ReducedMeanOperator(operators, [float(batch_size_of(b) or 1) for b in batches])
            try:
                return work(mean, operators, optimizer)
            finally:
                for op in operators:
                    op.close()

    def _snapshot(self, trainer, pl_module, mean, operators, optimizer, step, reason) -> dict[str, Any]:
        hvp_before = mean.n_hvp
        la = top_eigenvalues(mean, k=1, which="LA", tol=self.tol, max_hvp=self.max_hvp,
                             v0=self.last_eigenvectors.get("LA"), seed=self.seed)
        sa = top_eigenvalues(mean, k=1, which="SA", tol=self.tol, max_hvp=self.max_hvp,
                             v0=self.last_eigenvectors.get("SA"), seed=self.seed + 1)
        self.last_eigenvectors = {"LA": la, "SA": sa}
        out: dict[str, Any] = {
            "step": step,
            "reason": reason,
            "lambda_max": float(la.eigenvalues[0]),
            "lambda_max_residual": float(la.residuals[0]),
            "lambda_min": float(sa.eigenvalues[0]),
            "lambda_min_residual": float(sa.residuals[0]),
            "eigen_converged": bool(la.converged and sa.converged),
        }
        if self.trace_hvp:
            trace = hessian_trace(mean, n_hvp=self.trace_hvp, seed=self.seed)
            out.update(hessian_trace=float(trace.estimate), hessian_trace_stderr=float(trace.stderr))
        else:
            out.update(hessian_trace=None, hessian_trace_stderr=None)
        out.update(self._gradient_quantities(mean, operators))
        out.update(self._stability(mean, optimizer, pl_module, out["lambda_max"]))
        density = None
        if self._density_due(trainer):
            density = spectral_density(mean, n_runs=1, n_steps=min(self.density_steps, mean.num_params),
                                       seed=self.seed)
            self.last_density = density
        out["n_hvp"] = mean.n_hvp - hvp_before + len(operators)  # + one product per batch for batch sharpness
        out["hvp_count"] = out["n_hvp"]
        if density is not None and trainer.is_global_zero:
            self._log_density(trainer, density, step)
        return out

    def _gradient_quantities(self, mean: ReducedMeanOperator, operators: list) -> dict[str, Any]:
        """Probe loss, gradient, noise and batch sharpness, reduced over batches and ranks."""
        grads = [op.gradient() for op in operators]
        gradient = mean.weighted_mean(grads)
        local_loss = sum(w * op.loss for w, op in zip(mean.weights, operators))
        sums = [local_loss, 0.0, 0.0, float(len(operators)), 0.0]
        for g, op in zip(grads, operators):
            sq = float(g.square().sum())
            sums[1] += sq
            if sq > 0:
                sums[2] += float(g @ op.matvec(g)) / sq  # g_B^T H_B g_B / |g_B|^2, one product per batch
                sums[4] += 1.0
        loss, sq_small, sharpness, n_batches, n_sharp = mean.reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
        out: dict[str, Any] = {
            "probe_loss": loss / mean.total_weight,
            "probe_grad_norm": float(gradient.norm()),
            "batch_sharpness": sharpness / n_sharp if n_sharp else None,
            "probe_batch_size": int(mean.total_weight),
            "probe_grad_sq_unbiased": None,
            "grad_noise_trace": None,
        }
        b_small = mean.total_weight / n_batches
        if n_batches >= 2:
            noise = gradient_noise_scale(sq_small / n_batches, float(gradient.square().sum()), b_small,
                                         mean.total_weight)
            out.update(probe_grad_sq_unbiased=noise.grad_sq_norm, grad_noise_trace=noise.trace_sigma)
        return out

    def _stability(self, mean, optimizer, pl_module, lambda_max: float) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": None, "lr": None, "momentum": None, "stability_threshold": None,
                               "stability_ratio": None, "preconditioned_lambda_max": None}
        if optimizer is None:
            return out
        spec = OptimizerSpec.from_torch(optimizer)
        momentum = spec.beta1 if spec.kind in ("adam", "adamw") else spec.momentum
        threshold = stability_threshold(spec)
        out.update(optimizer=spec, lr=spec.lr, momentum=momentum, stability_threshold=threshold)
        sharpness = lambda_max
        if spec.preconditioned:
            params = [p for _, p in trainable_parameters(pl_module)]
            try:
                pre = PreconditionedOperator.from_optimizer(mean, getattr(optimizer, "optimizer", optimizer),
                                                            params=params)
            except ValueError as error:  # e.g. a parameter the optimizer has no state for
                self.warn_once("preconditioner", f"preconditioned sharpness unavailable: {error}")
                out["stability_threshold"] = None
                return out
            warm = self.last_eigenvectors.get("PLA")
            result = top_eigenvalues(pre, k=1, which="LA", tol=self.tol, max_hvp=self.max_hvp, v0=warm,
                                     seed=self.seed + 2)
            self.last_eigenvectors["PLA"] = result
            sharpness = float(result.eigenvalues[0])
            out["preconditioned_lambda_max"] = sharpness
        if threshold is not None and threshold > 0:
            out["stability_ratio"] = sharpness / threshold
        return out

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


@contextlib.contextmanager
def _autocast_off(device: torch.device):
    """Curvature in full precision whatever mixed-precision context the caller is in."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield
