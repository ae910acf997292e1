"""``GradientNormMonitor``: gradient and update statistics on a sampled cadence of optimizer steps (pairs of
consecutive steps, so that the cosines stay exact), at the cost of a few fused (``torch._foreach_*``) kernels per
measured step; the gradient is never concatenated into one vector."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any, Callable

import torch

from optdiag.callbacks._base import OptDiagCallback, batch_size_of, ceil_to, global_step, guarded, loss_scale
from optdiag.curvature.distributed import reduce_sum
from optdiag.curvature.noise import gradient_noise_scale
from optdiag.curvature.params import is_sharded, local_part
from optdiag.policy import check_number
from optdiag.sinks import tensorboard as tensorboard_sink

# Quantities that are undefined at some steps (first step, no clipping); NaN there, and then not logged.
_OPTIONAL = ("grad_cosine", "update_cosine", "grad_norm_clipped")
#: The default cadence starts no sparser than this (the stall diagnoser averages over 50-step windows).
MAX_DEFAULT_EVERY_N_STEPS = 10
#: The default cadence then spaces its pairs so that they cost at most this share of the training time (a measured
#: step copies the gradient and the parameters: on a large model with small batches, a pair every 10 steps costs
#: tens of percent), never sparser than ``MAX_PRICED_EVERY_N_STEPS`` (docs/callbacks/gradient-norm-monitor.md).
PAIR_SHARE = 0.03
MAX_PRICED_EVERY_N_STEPS = 100
#: With a diagnoser deciding when pairs are needed (:meth:`GradientNormMonitor.pairs_on_demand`), the pairs between
#: the stretches it judges cost at most this share, on a multiple of the cadence above.
ROUTINE_PAIR_SHARE = 0.01


def measured_steps_interval(log_every_n_steps: int, every_n_steps: int | None) -> int:
    """The measuring cadence: ``every_n_steps``, or by default the logging interval capped at 10.

    Example:
        >>> measured_steps_interval(50, None), measured_steps_interval(1, None), measured_steps_interval(50, 1)
        (10, 1, 1)
    """
    return every_n_steps or max(1, min(log_every_n_steps, MAX_DEFAULT_EVERY_N_STEPS))


def layer_name(parameter_name: str, depth: int | None) -> str:
    """The module a parameter belongs to, cut to ``depth`` leading components (``None``: the owning module).

    Example:
        >>> layer_name("encoder.0.weight", None), layer_name("encoder.0.weight", 1), layer_name("bias", None)
        ('encoder.0', 'encoder', 'bias')
    """
    parts = parameter_name.split(".")
    module = parts[:-1] or parts  # a parameter registered on the root module is its own group
    return ".".join(module if depth is None else module[:depth])


def _cosine(dot: float, sq_a: float, sq_b: float) -> float:
    """``a.b / (|a| |b|)`` from the products; NaN where undefined (a zero or non-finite vector)."""
    denominator = math.sqrt(sq_a * sq_b) if sq_a >= 0 and sq_b >= 0 else math.nan
    return dot / denominator if denominator > 0 and math.isfinite(denominator) else math.nan


class _Buffer:
    """Preallocated float32 rows with, per row, one view shaped like each tensor of a parameter list.

    The views let fused ``torch._foreach_*`` kernels copy, multiply or subtract a whole list of per-parameter
    tensors into a row without concatenating them, and a row's sum or product with another row is then one kernel.
    ``step`` is the optimizer step of the vector the buffer holds (None: nothing usable).
    """

    def __init__(self, n_rows: int, like: list[torch.Tensor]) -> None:
        self.key = self.key_of(like)
        total = sum(t.numel() for t in like)
        self.data = torch.empty(n_rows, total, dtype=torch.float32, device=like[0].device)
        offsets = [0]
        for t in like:
            offsets.append(offsets[-1] + t.numel())
        self.views = [[row[a:b].view(t.shape) for t, a, b in zip(like, offsets, offsets[1:])] for row in self.data]
        self.step: int | None = None
        self.slot = 0  # with two rows: the row of the current vector (the other holds the previous one)
        self.previous_sq = math.nan  # squared norm of the previous vector

    @staticmethod
    def key_of(like: list[torch.Tensor]) -> tuple:
        return (like[0].device, *(t.shape for t in like))

    @classmethod
    def fitting(cls, current: _Buffer | None, n_rows: int, like: list[torch.Tensor]) -> _Buffer:
        """``current`` if it still fits tensors shaped like ``like``, else new rows (a different parameter set has
        no comparable direction, so the previous vector is forgotten)."""
        return current if current is not None and current.key == cls.key_of(like) else cls(n_rows, like)

    def follows(self, step: int) -> bool:
        """Whether the held vector belongs to the step just before ``step`` (a cosine needs consecutive steps)."""
        return self.step == step - 1


class GradientNormMonitor(OptDiagCallback):
    """Log gradient norms, update sizes and their directions, on every ``every_n_steps``-th optimizer step.

    Measured in ``on_before_optimizer_step`` (after AMP unscaling, before clipping, once per gradient-accumulation
    window) and completed after the step:

    * ``grad_norm``: global L2 norm of the gradient; per layer ``<layer>/grad_norm`` (layers are modules, cut to
      ``layer_depth`` name components).
    * ``grad_norm_clipped``: the norm after clipping, i.e. of the gradient the optimizer used (logged when
      ``gradient_clip_val`` is set; equal to ``grad_norm`` otherwise).
    * ``update_norm`` = ``|theta_new - theta_old|`` and ``update_ratio`` = ``update_norm / |theta_old|``.
    * ``grad_cosine`` / ``update_cosine``: cosine between consecutive gradients / updates. Persistently negative
      values mean the optimizer bounces across a valley (oscillation); near zero, noise-dominated steps.
    * under gradient accumulation (single process), the gradient noise scale from the micro-batch gradients
      (McCandlish et al. 2018), pooled over the last ``noise_window`` measured windows: ``grad_sq_unbiased``
      (``|G|^2``), ``grad_noise_trace`` (``tr(Sigma)``) and ``noise_scale`` (``B_simple``, a critical-batch-size
      proxy).

    **Cadence.** With ``n = every_n_steps``, the measured steps are the first ``n`` steps of training (the
    early-training gradient scale) and then the pairs ``k n - 1, k n``: two consecutive steps, so that the cosines
    of step ``k n`` are exact cosines of consecutive gradients and updates (NaN at the first step of a pair).
    Unmeasured steps cost almost nothing: no norms, no copies of the parameters. By default ``n`` is the Trainer's
    ``log_every_n_steps`` capped at 10: every logged step is measured, and the stall diagnoser gets at least a pair
    per 10 steps for its window means. After those first ``n`` steps the default ``n`` grows, if needed, so that a
    pair costs at most ``PAIR_SHARE`` (3%) of the training time between pairs (timed on the first ``n`` steps,
    rank 0's clock, broadcast; at most ``MAX_PRICED_EVERY_N_STEPS``): a measured step copies the gradient and the
    parameters, which on a large model with small batches costs a quarter of a step, so pairs every 10 steps cost
    5% or more; a small model keeps 10. ``every_n_steps=1`` measures every step; a fixed ``every_n_steps`` is never
    spaced. The schedule depends on ``trainer.global_step`` (and that one broadcast cadence), so every DDP rank
    measures the same steps. Some measured steps measure the gradient only, not the update (:meth:`tracks_update`:
    most of the first window, and the dense pairs a diagnoser asks for).

    All are logged as ``optdiag/<name>`` through the trainer's loggers at ``trainer.global_step`` (the step the
    gradient belongs to), on global rank 0, every ``log_every_n_steps`` steps (rounded up to a multiple of ``n``,
    so that only measured steps are logged); every measured step is kept in :attr:`latest` and :attr:`history`.
    With a ``TensorBoardLogger``, per-layer gradient histograms are added every ``histogram_every_n_steps`` steps
    (on their own cadence). Only the first optimizer is monitored.

    Args:
        layer_depth: how many module-name components make a layer (``None``: the module owning the parameter).
        per_layer: whether to measure and log per-layer gradient norms.
        log_every_n_steps: logging interval in optimizer steps (``None``: the Trainer's ``log_every_n_steps``).
        every_n_steps: measuring cadence ``n`` (pairs of consecutive steps every ``n`` steps, see above); ``None``:
            the logging interval capped at 10; ``1``: every step.
        track_directions: whether to keep the previous gradient and update (float32 copies of the parameters'
            size) to compute the cosines.
        noise_window: number of accumulation windows pooled for the noise scale; ``0`` switches it off.
        histogram_every_n_steps: interval of per-layer gradient histograms in TensorBoard; ``0`` switches them off.
        history_size: how many measured steps :attr:`history` keeps (oldest dropped first).
        clock: the time source that prices the default cadence (injectable; ``time.perf_counter``).

    Attributes:
        latest: the values of the last measured step (keys above, plus ``step``).
        history: one dict per measured optimizer step, oldest first, each with a ``step`` key.

    Example:
        >>> import pytorch_lightning as pl
        >>> monitor = GradientNormMonitor(layer_depth=1, every_n_steps=1)  # every step
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=100)  # doctest: +SKIP
        >>> trainer.fit(model, data); monitor.latest["grad_norm"]  # doctest: +SKIP
    """

    def __init__(
        self,
        layer_depth: int | None = None,
        per_layer: bool = True,
        log_every_n_steps: int | None = None,
        every_n_steps: int | None = None,
        track_directions: bool = True,
        noise_window: int = 10,
        histogram_every_n_steps: int = 100,
        history_size: int = 100_000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("layer_depth", layer_depth), ("log_every_n_steps", log_every_n_steps),
                            ("every_n_steps", every_n_steps)):
            check_number(name, value, low=1, integer=True, allow_none=True, what="None or an int >= 1")
        for name, value, low in (("noise_window", noise_window, 0), ("histogram_every_n_steps", histogram_every_n_steps, 0),
                                 ("history_size", history_size, 1)):
            check_number(name, value, low=low, integer=True, what=f"an int >= {low}")
        self.layer_depth = layer_depth
        self.per_layer = bool(per_layer)
        self.log_every_n_steps = log_every_n_steps
        self.every_n_steps = every_n_steps
        self.track_directions = bool(track_directions)
        self.noise_window = noise_window
        self.histogram_every_n_steps = histogram_every_n_steps
        self.history_size = history_size
        self.clock: Callable[[], float] = clock or time.perf_counter
        self.latest: dict[str, float] = {}
        self._on_demand = False  # a diagnoser says when pairs are dense (pairs_on_demand); configuration, kept
        self._history: deque[dict[str, float]] = deque(maxlen=history_size)
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Per-run state that is not checkpointed (tensors tied to the current model and window)."""
        self._pending: dict[str, Any] | None = None
        self._cadence = self.every_n_steps or 1  # measuring interval, resolved against the Trainer at train start
        self._initial = self._cadence  # the first steps, all measured (the cadence at train start)
        self._routine = self._cadence  # pairs outside the stretches a diagnoser judges (a multiple of _cadence)
        self._dense_pairs_until = -1  # pairs at _cadence up to this step (measure_pairs_until)
        self._log_every = 1  # the logging interval asked for (the Trainer's, or log_every_n_steps)
        self._own_seconds: dict[int, float] = {}  # this monitor's seconds on each measured step of the first window
        self._step_seconds: list[float] = []  # training seconds of each step of the first window, less its own
        self._step_started: tuple[int, float, float] | None = None  # (step, clock, own seconds so far) at its start
        self._own_total = 0.0  # this monitor's seconds so far (measured steps)
        self._priced = self.every_n_steps is not None  # whether the default cadence has been spaced by its cost
        self._noise_possible = True  # whether the micro-batch noise hooks may have work in this fit (train start)
        self._dense_until = -1  # every step up to this one is measured (measure_every_step)
        self._log_interval = self._cadence  # logging interval, a multiple of the cadence
        self._named_cache: tuple[tuple[int, int], list] | None = None
        self._sharded = False  # the monitored parameters are DTensors (FSDP): norms are summed over ranks
        self._layer_of: dict[str, str] = {}  # parameter name -> layer name (computed once per name)
        self._grad_previous: _Buffer | None = None  # the previous measured gradient, when the next step needs it
        self._updates: _Buffer | None = None  # rows: the parameters before this step, then minus its update; the
        # other row: minus the previous update
        self._theta_sq = math.nan  # |theta_old|^2 of the pending step
        self._theta_tracked = False  # whether the pending step's parameters were copied (its update is measured)
        self._micro_previous: _Buffer | None = None  # accumulated gradient after the previous micro-batch
        self._micro_started = False
        self._micro_sq_norms: list[float] = []
        self._micro_sizes: list[int] = []
        # per window: (micro batch size, window batch size, micro-batch |g|^2 list, window |g|^2)
        self._noise_windows: deque[tuple[int, int, list[float], float]] = deque(maxlen=max(self.noise_window, 1))

    @property
    def history(self) -> list[dict[str, float]]:
        return list(self._history)

    def is_measured(self, step: int) -> bool:
        """Whether optimizer step ``step`` is measured: one of the first ``n`` steps (``n`` the cadence), or a pair
        ``k n - 1, k n``.

        Example:
            >>> monitor = GradientNormMonitor(every_n_steps=4)
            >>> [s for s in range(13) if monitor.is_measured(s)]
            [0, 1, 2, 3, 4, 7, 8, 11, 12]
        """
        cadence = self._cadence if step <= self._dense_pairs_until else self._routine
        phase = step % cadence
        return step < self._initial or phase == 0 or (self.track_directions and phase == cadence - 1) \
            or step <= self._dense_until

    def tracks_update(self, step: int) -> bool:
        """Whether measured step ``step`` also measures the update (``update_norm``, ``update_ratio``,
        ``update_cosine``: a copy of the parameters before the step): the pairs of the routine cadence, where every
        logged step lies, and of the first ``n`` steps the first and the last two. The other steps of the first
        window, the extra pairs a diagnoser asks for (:meth:`measure_pairs_until`) and the steps of
        :meth:`measure_every_step` measure the gradient only (its norms and the cosine with the previous one):
        their tests need nothing else, and they cost about half.

        Example:
            >>> monitor = GradientNormMonitor(every_n_steps=4)
            >>> monitor._routine = 12  # as pricing would set it with pairs_on_demand
            >>> monitor.measure_pairs_until(8)
            >>> [(s, monitor.tracks_update(s)) for s in range(0, 13) if monitor.is_measured(s)]
            [(0, True), (1, False), (2, True), (3, True), (4, False), (7, False), (8, False), (11, True), (12, True)]
        """
        if step < self._initial:
            # the first window: its first step (logged) and its last two (which price a full step) measure the
            # update; the rest, like the dense pairs, the gradient only (on a large model a full step copies
            # the parameters, and ten of them were most of what a short run paid the monitor)
            return step == 0 or step >= self._initial - 2
        phase = step % self._routine
        return phase == 0 or (self.track_directions and phase == self._routine - 1)

    def measure_every_step(self, until: int) -> None:
        """Measure every optimizer step up to ``until`` (inclusive), whatever the cadence: the stall diagnoser asks
        for it when a stall cannot be judged for want of consecutive-gradient pairs (a pair every ``n`` steps gives
        too few in a short horizon). A few norms and a dot product a step, never the model.

        Example:
            >>> monitor = GradientNormMonitor(every_n_steps=4)
            >>> monitor.measure_every_step(until=13)
            >>> [s for s in range(9, 17) if monitor.is_measured(s)]
            [9, 10, 11, 12, 13, 15, 16]
        """
        self._dense_until = max(self._dense_until, int(until))

    def pairs_on_demand(self) -> None:
        """Let a diagnoser decide where the pairs must be dense: after the first window the default cadence then
        has a routine one too, a multiple of it priced at ``ROUTINE_PAIR_SHARE`` (1%), and the priced cadence
        (``PAIR_SHARE``, 3%) only up to the steps :meth:`measure_pairs_until` names. The stall diagnoser asks for
        it: its gradient tests need many pairs only where it judges a flat-looking or spiking stretch. A fixed
        ``every_n_steps`` is never spaced.

        Example:
            >>> monitor = GradientNormMonitor()
            >>> monitor.pairs_on_demand(); monitor._on_demand
            True
        """
        self._on_demand = True

    def measure_pairs_until(self, until: int) -> None:
        """Pairs at the priced cadence up to step ``until`` (inclusive) instead of the routine one (see
        :meth:`pairs_on_demand`; without it, they are anyway).

        Example:
            >>> monitor = GradientNormMonitor(every_n_steps=4)
            >>> monitor._routine = 12  # as pricing would set it with pairs_on_demand
            >>> monitor.measure_pairs_until(8)
            >>> [s for s in range(4, 25) if monitor.is_measured(s)]
            [4, 7, 8, 11, 12, 23, 24]
        """
        self._dense_pairs_until = max(self._dense_pairs_until, int(until))

    def _state_key_arguments(self) -> dict[str, Any]:
        return {"layer_depth": self.layer_depth, "per_layer": self.per_layer}

    # --- hooks ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.check_strategy(trainer)

    @guarded
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_transient()
        log_every = self.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        self._cadence = self._initial = self._routine = measured_steps_interval(log_every, self.every_n_steps)
        self._log_every = log_every
        self._set_log_interval()
        self._priced = self.every_n_steps is not None or self._cadence == 1
        # an accumulation schedule may turn accumulation on at any epoch: the noise hooks then stay busy
        self._noise_possible = self._noise_enabled(trainer, pl_module) or any(
            type(cb).__name__ == "GradientAccumulationScheduler" for cb in getattr(trainer, "callbacks", ()) or ())
        self._settle_hooks()

    def _settle_hooks(self) -> None:
        """Mark idle the per-step hooks that have nothing to do in this fit (a bundle skips them): the micro-batch
        noise's without gradient accumulation, and the first window's step timer once the cadence is priced."""
        self.set_hook_idle("on_after_backward", not self._noise_possible)
        self.set_hook_idle("on_train_batch_start", self._priced and not self._noise_possible)

    def _time_step(self, trainer: Any) -> None:
        """Keep the training seconds of each step of the first window (less this monitor's own), and once the window
        is over, space the default cadence's pairs by their cost (:meth:`_price_cadence`)."""
        step, now = global_step(trainer), self.clock()
        started = self._step_started
        if started is not None and step > started[0]:
            if started[0] < self._initial:
                self._step_seconds.append((now - started[1]) - (self._own_total - started[2]))
            if step >= self._initial:
                self._price_cadence(trainer)
        if started is None or step > started[0]:
            self._step_started = (step, now, self._own_total)

    def _price_cadence(self, trainer: Any) -> None:
        """The default cadence after the first window: pairs every ``n`` steps with ``n`` such that a pair (two
        measured steps at the median cost of the first window's) takes at most ``PAIR_SHARE`` of the training time
        of ``n`` steps (at their median), at least the initial cadence and at most ``MAX_PRICED_EVERY_N_STEPS``.
        Each kind of pair at the price of its kind of step (:meth:`tracks_update`): the routine pairs at that of
        the first window's full steps, the dense gradient-only ones at that of its gradient-only steps.
        Rank 0's clock decides; every rank gets the same cadence (broadcast), so all measure the same steps."""
        self._priced = True
        self._settle_hooks()
        cadence, routine = self._cadence, self._cadence
        if len(self._own_seconds) >= 3 and len(self._step_seconds) >= 3:
            full = [s for step, s in self._own_seconds.items() if self.tracks_update(step)]
            light = [s for step, s in self._own_seconds.items() if not self.tracks_update(step)]
            full_pair = 2.0 * statistics.median(full or self._own_seconds.values())
            # with a diagnoser the dense pairs measure the gradient only (tracks_update): priced as such
            pair = 2.0 * statistics.median(light) if self._on_demand and len(light) >= 3 else full_pair
            step_seconds = max(statistics.median(self._step_seconds), 1e-9)
            needed = int(ceil_to(pair / (PAIR_SHARE * step_seconds)))
            cadence = routine = max(self._cadence, min(MAX_PRICED_EVERY_N_STEPS, needed))
            if self._on_demand:  # a multiple of the cadence, so that its pairs are pairs of the dense one too
                spaced = min(MAX_PRICED_EVERY_N_STEPS, int(ceil_to(full_pair / (ROUTINE_PAIR_SHARE * step_seconds))))
                routine = cadence * max(1, -(-spaced // cadence))
        cadence, routine = (int(n) for n in trainer.strategy.broadcast((cadence, routine), src=0))
        if (cadence, routine) != (self._cadence, self._routine):
            self._cadence, self._routine = cadence, routine
            self._set_log_interval()

    def _set_log_interval(self) -> None:
        """Log every ``log_every_n_steps`` rounded up to a multiple of the routine cadence: a step measured whichever
        cadence holds."""
        self._log_interval = -(-self._log_every // self._routine) * self._routine

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._priced:
            self._time_step(trainer)
        if self._noise_enabled(trainer, pl_module) and self.is_measured(global_step(trainer)):
            self._micro_sizes.append(batch_size_of(batch) or 0)

    @guarded
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if not self._noise_enabled(trainer, pl_module) or not self.is_measured(global_step(trainer)):
            return
        grads = [p.grad for p in self._monitored(trainer) if p.grad is not None]
        if not grads:
            return
        previous = self._micro_previous = _Buffer.fitting(self._micro_previous, 1, grads)
        if self._micro_started:  # this micro-batch's gradient is what the accumulated one grew by
            torch._foreach_sub_(previous.views[0], grads)  # minus the micro-batch gradient, in place
            sq = float(torch.linalg.vector_norm(previous.data[0])) ** 2
        else:
            sq = math.fsum(float(n) ** 2 for n in torch._foreach_norm(grads))
        torch._foreach_copy_(previous.views[0], grads)
        self._micro_started = True
        # Lightning divides each micro-batch loss by accumulate_grad_batches; undo it to get the batch gradient.
        self._micro_sq_norms.append(sq / loss_scale(trainer) ** 2 * trainer.accumulate_grad_batches**2)

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.optimizers and optimizer is not trainer.optimizers[0]:
            self.warn_once("multiple-optimizers", "GradientNormMonitor measures the first optimizer only.")
            return
        step = global_step(trainer)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._maybe_histograms(trainer, self._named_monitored(pl_module, optimizer), step)
        if self.is_measured(step):
            started = self.clock()
            self._measure_gradient(trainer, pl_module, optimizer, step)
            self._count_own(self.clock() - started, step)

    def _count_own(self, seconds: float, step: int) -> None:
        """This monitor's seconds on measured step ``step`` (its two hooks); the first window's price the cadence."""
        self._own_total += seconds
        if not self._priced and step < self._initial:
            self._own_seconds[step] = self._own_seconds.get(step, 0.0) + seconds

    def _measure_gradient(self, trainer: Any, pl_module: Any, optimizer: Any, step: int) -> None:
        """Norms and the gradient cosine of this step; the parameters are kept to measure the update after it."""
        named = self._named_monitored(pl_module, optimizer)
        with_grad = [(name, p) for name, p in named if p.grad is not None]
        grads = [local_part(p.grad) for _, p in with_grad]  # sharded (FSDP): this rank's part, reduced below
        if self._sharded:  # every rank reduces the same list: an FSDP1 slice empty on a rank has no .grad there
            with_grad = named
            grads = [local_part(p.grad) if p.grad is not None else local_part(p.detach()).new_zeros(0)
                     for _, p in named]
        # the update only on the steps that log it (tracks_update); elsewhere the gradient alone, half the copies
        params = [local_part(p.detach()) for _, p in named] if self.tracks_update(step) else []
        record: dict[str, Any] = {"step": step}
        # One fused kernel for the norms of every gradient and parameter (|theta_old| for the update ratio); the
        # dot product with the previous gradient joins them in the single transfer to Python of this step.
        norms = torch._foreach_norm(grads + params) if grads or params else []
        dot = self._gradient_dot(grads, step)
        values = torch.stack([n.float() for n in norms] + ([dot] if dot is not None else [])) if norms else None
        values = self._across_shards(values, len(norms)).tolist() if values is not None else []
        squares = [v * v for v in values[: len(grads)]]
        total_sq = math.fsum(squares)
        theta_sq = math.fsum(v * v for v in values[len(grads) : len(grads) + len(params)])
        if not math.isfinite(theta_sq) and params:  # float32 norms overflow: exact ones in float64
            theta_sq = math.fsum(float(torch.linalg.vector_norm(p.double())) ** 2 for p in params)
            theta_sq = float(self._across_shards(torch.tensor([theta_sq])))
        record["grad_norm"] = math.sqrt(total_sq) if math.isfinite(total_sq) else total_sq
        if self.per_layer:
            layers: dict[str, float] = {}
            for (name, _), sq in zip(with_grad, squares):
                key = self._layer_of.get(name) or self._layer_of.setdefault(name, layer_name(name, self.layer_depth))
                layers[key] = layers.get(key, 0.0) + sq
            record.update({f"{layer}/grad_norm": math.sqrt(v) if v >= 0 else v for layer, v in layers.items()})
        finite = math.isfinite(total_sq)
        if not finite:
            self.warn_once("non-finite-gradient", f"non-finite gradient norm at step {step}; directions not updated.")
        if self.track_directions and grads:
            previous_sq = self._grad_previous.previous_sq if dot is not None else math.nan
            self._keep_gradient(grads, step if finite else None)
            if finite:
                record["grad_cosine"] = _cosine(values[-1], total_sq, previous_sq) if dot is not None else math.nan
                self._grad_previous.previous_sq = total_sq
        self._remember_parameters(params, theta_sq)
        self._pending = record
        self._finish_noise_window(trainer, total_sq if grads else None, record)

    @guarded
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        started, step = self.clock(), self._pending["step"]
        try:
            self._complete(trainer, pl_module)
        finally:
            self._count_own(self.clock() - started, step)

    def _complete(self, trainer: Any, pl_module: Any) -> None:
        """The update's norm and cosines of the measured step just taken; the record kept and logged."""
        record, self._pending = self._pending, None
        named = self._named_monitored(pl_module, trainer.optimizers[0])
        update_sq, dot, previous_sq = self._update_products(named, record["step"]) if self._theta_tracked \
            else (math.nan, None, math.nan)
        record["update_norm"] = math.sqrt(update_sq) if update_sq >= 0 else math.nan
        theta_norm = math.sqrt(self._theta_sq) if self._theta_sq >= 0 else math.nan
        record["update_ratio"] = record["update_norm"] / theta_norm if theta_norm > 0 else math.nan
        rows = self._updates
        if self.track_directions and math.isfinite(record["update_norm"]):
            record["update_cosine"] = _cosine(dot, update_sq, previous_sq) if dot is not None else math.nan
            rows.previous_sq, rows.step, rows.slot = update_sq, record["step"], 1 - rows.slot
        elif rows is not None:
            rows.step = None  # no update measured at this step: the next one has no consecutive previous update
        record["grad_norm_clipped"] = self._clipped_norm(trainer, pl_module, named, record["grad_norm"])
        for key in _OPTIONAL:
            record.setdefault(key, math.nan)
        self.latest = record
        self._history.append(record)
        if record["step"] % self._log_interval == 0:
            self.log_scalars(trainer, self._loggable(trainer, record), record["step"])

    # --- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._history), "latest": dict(self.latest), "warning_counts": dict(self.warning_counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = deque(state_dict.get("history", []), maxlen=self.history_size)
        self.latest = dict(state_dict.get("latest", {}))
        self.warning_counts = dict(state_dict.get("warning_counts", {}))

    # --- helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def _monitored(trainer: Any) -> list[torch.Tensor]:
        if not trainer.optimizers:
            return []
        return [p for group in trainer.optimizers[0].param_groups for p in group["params"] if p.requires_grad]

    def _named_monitored(self, pl_module: Any, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's parameters with their names in the module, in a fixed (module) order (cached: this
        runs every step, and for small models Python overhead is most of the monitor's cost)."""
        key = (id(optimizer), sum(len(g["params"]) for g in optimizer.param_groups))
        if self._named_cache is None or self._named_cache[0] != key:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad and id(p) in in_optimizer]
            self._named_cache = (key, named)
            self._sharded = any(is_sharded(p) for _, p in named)
        return self._named_cache[1]

    def _across_shards(self, values: torch.Tensor, n_norms: int = 0) -> torch.Tensor:
        """Per-rank results made global when the parameters are sharded (FSDP; every rank calls this together):
        the first ``n_norms`` entries are norms of this rank's parts (their squares are summed over ranks), the
        rest dot products of parts (summed). Unsharded (one device, DDP's reduced gradients): ``values`` itself."""
        if not self._sharded:
            return values
        values = values.double()
        summed = reduce_sum(torch.cat([values[:n_norms].square(), values[n_norms:]]))
        return torch.cat([summed[:n_norms].sqrt(), summed[n_norms:]])

    def _gradient_dot(self, grads: list[torch.Tensor], step: int) -> torch.Tensor | None:
        """``g . g_previous`` as a 0-d tensor when the previous step's gradient is held (None otherwise).

        The products overwrite the held gradient in place (one fused multiply, then one sum of the row): it is
        not needed afterwards."""
        previous = self._grad_previous
        if not (self.track_directions and grads and previous is not None and previous.follows(step)):
            return None
        if previous.key != _Buffer.key_of(grads):
            return None
        torch._foreach_mul_(previous.views[0], grads)
        return previous.data[0].sum()

    def _keep_gradient(self, grads: list[torch.Tensor], step: int | None) -> None:
        """Keep this step's gradient for the next step's cosine, only when the next step is measured too (the
        second step of a pair keeps nothing); ``step`` None (a non-finite gradient) forgets the previous one."""
        previous = self._grad_previous = _Buffer.fitting(self._grad_previous, 1, grads)
        previous.step = None
        if step is not None and self.is_measured(step + 1):
            torch._foreach_copy_(previous.views[0], grads)
            previous.step = step

    def _remember_parameters(self, params: list[torch.Tensor], theta_sq: float) -> None:
        """Copy the parameters before the optimizer step into the current row of the update buffer (none on a
        step that measures the gradient only)."""
        self._theta_sq = theta_sq
        self._theta_tracked = bool(params)
        if not params:
            return
        rows = self._updates = _Buffer.fitting(self._updates, 2, params)
        torch._foreach_copy_(rows.views[rows.slot], params)

    def _update_products(self, named: list[tuple[str, torch.Tensor]], step: int) -> tuple[float, float | None, float]:
        """``|u|^2``, ``u . u_previous`` (None without a consecutive previous update) and ``|u_previous|^2`` for the
        update ``u`` just made. Both rows hold minus the update, so their product is ``u . u_previous``."""
        rows = self._updates
        if rows is None:
            return math.nan, None, math.nan
        s = rows.slot
        torch._foreach_sub_(rows.views[s], [local_part(p.detach()) for _, p in named])  # theta_old - theta_new = -u
        follows = self.track_directions and rows.follows(step)
        if follows:
            products = self._across_shards(rows.data @ rows.data[s]).tolist()  # both in one kernel, one transfer
            update_sq, dot = products[s], products[1 - s]
        else:
            update_sq, dot = float(self._across_shards(torch.linalg.vector_norm(rows.data[s]).reshape(1), 1)) ** 2, None
        if not math.isfinite(update_sq):  # float32 squares overflow: the exact norm in float64
            update_sq = float(self._across_shards(torch.linalg.vector_norm(rows.data[s].double()).reshape(1), 1)) ** 2
        return update_sq, dot, rows.previous_sq

    def _noise_enabled(self, trainer: Any, pl_module: Any) -> bool:
        return (
            self.noise_window > 0
            and int(trainer.accumulate_grad_batches) > 1
            and self.world_size(trainer) == 1  # under DDP micro-batch gradients are local and partly reduced
            and bool(pl_module.automatic_optimization)
        )

    def _finish_noise_window(self, trainer: Any, gradient_sq: float | None, record: dict[str, Any]) -> None:
        """Close an accumulation window: pool its micro-batch norms with earlier windows and estimate the noise."""
        sq_norms, sizes = self._micro_sq_norms, self._micro_sizes
        self._micro_sq_norms, self._micro_sizes, self._micro_started = [], [], False
        if gradient_sq is None or len(sq_norms) < 2 or len(sq_norms) != len(sizes) or min(sizes) <= 0:
            return
        if len(set(sizes)) != 1 or not all(math.isfinite(v) for v in sq_norms):
            return  # a ragged last batch or an overflowed micro-gradient: the two-batch-size formula does not apply
        # the accumulated gradient is sum(g_i) / accumulate_grad_batches; rescale it to the mean over the window
        big_sq = gradient_sq * (trainer.accumulate_grad_batches / len(sq_norms)) ** 2
        b_small, b_big = sizes[0], sizes[0] * len(sizes)
        self._noise_windows.append((b_small, b_big, sq_norms, big_sq))
        pooled = [w for w in self._noise_windows if w[:2] == (b_small, b_big)]
        result = gradient_noise_scale(
            [s for w in pooled for s in w[2]], [w[3] for w in pooled], b_small=b_small, b_big=b_big
        )
        record.update(
            grad_sq_unbiased=result.grad_sq_norm, grad_noise_trace=result.trace_sigma, noise_scale=result.b_simple
        )

    def _clipped_norm(self, trainer: Any, pl_module: Any, named: list, grad_norm: float) -> float:
        """Norm of the gradient the optimizer used: read back after clipping (automatic optimization only)."""
        if not trainer.gradient_clip_val or not pl_module.automatic_optimization:
            return grad_norm
        grads = [local_part(p.grad) for _, p in named if p.grad is not None]
        sq = sum(float(torch.linalg.vector_norm(g, dtype=torch.float32).square()) for g in grads)
        sq = float(self._across_shards(torch.tensor([sq])))  # a sum of squares: summed over shards as it is
        return math.sqrt(sq) if math.isfinite(sq) else sq

    @staticmethod
    def _loggable(trainer: Any, record: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in record.items() if k != "step" and not (k in _OPTIONAL and math.isnan(v))}
        if not trainer.gradient_clip_val:
            out.pop("grad_norm_clipped", None)
        return out

    def _maybe_histograms(self, trainer: Any, named: list, step: int) -> None:
        if not self.histogram_every_n_steps or step % self.histogram_every_n_steps or not trainer.is_global_zero:
            return
        tb = self.tensorboard_logger(trainer)
        if tb is None:
            return
        layers: dict[str, list[torch.Tensor]] = {}
        for name, p in named:
            if p.grad is None:
                continue
            # sharded (FSDP): rank 0's part of the gradient only (gathering it whole would defeat the sharding)
            layers.setdefault(layer_name(name, self.layer_depth), []).append(local_part(p.grad).reshape(-1))
        skipped = tensorboard_sink.log_histograms(
            tb, {f"optdiag/{k}/grad": torch.cat(v) for k, v in layers.items()}, step)
        if skipped:  # TensorBoard cannot bin NaN or Inf: those layers get no histogram at this step
            self.warn_once("non-finite-histogram", f"gradient histograms of {', '.join(skipped)} skipped at step "
                           f"{step}: non-finite values (counted in warning_counts['non-finite-histogram']).")
