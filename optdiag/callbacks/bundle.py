"""``OptDiag``: the gradient monitor, the Hessian monitor, the stall diagnoser and the triage as one callback."""

from __future__ import annotations

from typing import Any, Callable

from optdiag.callbacks._base import HELD_STEP, HOOK_ACTIVITY, OptDiagCallback, _CALLBACK_BASES
from optdiag.callbacks.conditioning import ConditioningMonitor
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor, LossFn
from optdiag.callbacks.stall import StallDiagnoser
from optdiag.callbacks.triage import VAL_METRICS, TriageMonitor
from optdiag.diagnosis import Diagnosis, Finding

__all__ = ["OptDiag", "FORWARDED_HOOKS"]


def _lightning_hooks() -> tuple[str, ...]:
    """Every hook a Lightning ``Callback`` defines (both namespaces): ``setup``, ``teardown`` and ``on_*``.

    ``state_dict``/``load_state_dict`` are not forwarded but composed (see :meth:`OptDiag.state_dict`).
    """
    names = {
        name
        for base in _CALLBACK_BASES
        for name, member in vars(base).items()
        if callable(member) and (name.startswith("on_") or name in ("setup", "teardown"))
    }
    return tuple(sorted(names))


FORWARDED_HOOKS = _lightning_hooks()
_CHILD_NAMES = ("gradient_monitor", "hessian_monitor", "stall_diagnoser", "conditioning_monitor", "triage_monitor")


_EMPTY_HOOKS = {(name, member) for base in _CALLBACK_BASES for name, member in vars(base).items() if callable(member)}


def _implements(child: Any, name: str) -> bool:
    """Whether ``child`` does something in hook ``name`` now: not Lightning's empty base implementation, and not
    marked idle (:meth:`~optdiag.callbacks.OptDiagCallback.set_hook_idle`)."""
    idle = vars(child).get("_idle_hooks", ())  # set_hook_idle's marks (a child need not be an OptDiagCallback)
    return (name, getattr(type(child), name, None)) not in _EMPTY_HOOKS and name not in idle


#: Per-step hooks in which several children read the step: it is read once for all of them (HELD_STEP).
_STEP_SHARING_HOOKS = ("on_before_optimizer_step", "on_train_batch_end")


def _forwarding(name: str) -> Callable[..., None]:
    if name in _STEP_SHARING_HOOKS:
        def hook(self: "OptDiag", trainer: Any, *args: Any, **kwargs: Any) -> None:
            HELD_STEP.hold(trainer)
            try:
                for method in self._receivers(name):
                    method(trainer, *args, **kwargs)
            finally:
                HELD_STEP.release()
    else:
        def hook(self: "OptDiag", *args: Any, **kwargs: Any) -> None:
            # Lightning calls every hook of every callback; skipping the children's empty ones saves per-step time
            for method in self._receivers(name):
                method(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"Call ``{name}`` of each child in order (gradient, Hessian, stall diagnoser, triage)."
    return hook


class OptDiag(OptDiagCallback):
    """Why did the loss stop going down? The three optdiag callbacks with sensible defaults, as one callback.

    Bundles a :class:`~optdiag.callbacks.GradientNormMonitor` (gradient norms and cosines of the first steps, then
    of a pair of consecutive steps every ``grad_every_n_steps``), a
    :class:`~optdiag.callbacks.HessianMonitor` (``lambda_max``, ``lambda_min``, trace and the stability ratio within
    a time ``budget``, or every ``every_n_steps``) and a :class:`~optdiag.callbacks.StallDiagnoser` (a verdict with
    evidence and suggestions whenever the loss stalls or diverges) that uses those two monitors, and a
    :class:`~optdiag.callbacks.TriageMonitor` (model bias or optimization, overfitting or mismatch, from the
    training and validation losses and those verdicts; ``docs/triage.md``). Every Lightning hook is forwarded to
    the children in that order; their checkpoint state is saved under this callback's key.

    Cost at the defaults: every curvature product (scheduled snapshots, the snapshots verdicts ask for, the escape
    check) is charged to one token bucket that earns ``budget`` of the training time and holds a bounded burst
    (see :class:`~optdiag.callbacks.HessianMonitor`); a verdict whose snapshot the bucket cannot pay uses the newest
    curvature measured within its stalled horizon, or waits. The per-step work is outside that budget: the gradient
    pairs (priced at 1-3% of the training time), the stall tests and the bookkeeping of the hooks, together about
    0.3-0.6 ms per step on a CPU (1-2% of a 100 ms step, 4-6% of a 10 ms one, more of a 2 ms one;
    ``benchmarks/bench_overhead.py --lockstep``, docs/performance.md section 7).

    Args:
        every_n_steps: curvature snapshot cadence in optimizer steps; ``None`` schedules them within ``budget``.
        budget: fraction of training time the curvature snapshots (scheduled and at stalls) may take.
        window: losses the stall test looks at; raise it for very noisy losses.
        min_window: fewest losses before a stall may be declared.
        rel_improvement: relative loss improvement across a window below which training counts as stalled.
        probe_batches: training batches kept as the fixed probe set for curvature (the "probe size").
        max_hvp: Hessian-vector products per eigenvalue solve.
        trace_hvp: products for the Hessian trace (``0`` switches it off).
        density_every: a spectral density every this many snapshots, drawn in TensorBoard (computed only with a
            ``TensorBoardLogger``; ``0`` switches it off).
        per_layer: log per-layer gradient norms.
        grad_every_n_steps: the gradient monitor's cadence: a pair of consecutive steps every this many steps
            (``None``: the Trainer's ``log_every_n_steps`` capped at 10; ``1``: every step).
        max_snapshots: extra curvature snapshots the diagnoser may take at stalls per run (also bounded in time by
            the budget).
        escape_check: at a saddle, evaluate the real loss along the escape direction.
        loss_floor: the loss you would be happy with, if known.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` for curvature; default ``optdiag_loss`` or
            ``training_step``.
        verbose: print a summary of the verdicts and findings when ``fit`` ends (rank 0).
        seed: seed of the curvature probes.
        burst_hvp: Hessian-vector products the budget may spend at once beyond its steady share (the bucket's
            depth, see :class:`~optdiag.callbacks.HessianMonitor`).
        probe_every: while the minibatch losses look flat but are too noisy to prove it, read the loss on the
            fixed probe batches every this many steps (forward passes only) to decide sooner; ``0`` switches it off.
        val_metrics: the validation-loss names the triage looks for in ``trainer.callback_metrics``.
        triage: include the :class:`~optdiag.callbacks.TriageMonitor`.
        loss: what the training loss is, for the loss-choice check: ``"auto"`` (read from its autograd graph),
            ``"mse_on_probabilities"`` or ``"other"`` (no check); see :class:`~optdiag.callbacks.ConditioningMonitor`.
        conditioning: include the :class:`~optdiag.callbacks.ConditioningMonitor` (unscaled inputs, MSE on
            probabilities; docs/conditioning.md). Its findings join the triage's.
        hvp: how Hessian-vector products are computed: ``"auto"`` (exact double backward where it exists, finite
            differences of the gradient for FSDP-sharded parameters or a model without double backward),
            ``"exact"`` or ``"finite_difference"`` (docs/finite-difference-and-fsdp.md).

    Attributes:
        gradient_monitor, hessian_monitor, stall_diagnoser, triage_monitor: the children (``triage_monitor`` is
            None with ``triage=False``).
        children: the children, in the order hooks reach them.

    Example:
        >>> import optdiag, pytorch_lightning as pl
        >>> cb = optdiag.OptDiag()
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=1000)  # doctest: +SKIP
        >>> trainer.fit(model, data)  # doctest: +SKIP
        >>> for d in cb.diagnoses: print(d.step, d.kind, d.suggestions[0].action)  # doctest: +SKIP
        >>> for f in cb.findings: print(f.step, f.kind, f.summary)  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        budget: float = 0.05,
        *,
        window: int = 50,
        min_window: int = 20,
        rel_improvement: float = 0.01,
        probe_batches: int = 2,
        max_hvp: int = 40,
        trace_hvp: int = 12,
        density_every: int = 10,
        per_layer: bool = True,
        grad_every_n_steps: int | None = None,
        max_snapshots: int = 20,
        escape_check: bool = True,
        loss_floor: float | None = None,
        loss_fn: LossFn | None = None,
        verbose: bool = True,
        seed: int = 0,
        burst_hvp: int = 40,
        probe_every: int = 5,
        val_metrics: Any = VAL_METRICS,
        triage: bool = True,
        loss: str = "auto",
        conditioning: bool = True,
        hvp: str = "auto",
    ) -> None:
        super().__init__()
        self.gradient_monitor = GradientNormMonitor(per_layer=per_layer, every_n_steps=grad_every_n_steps)
        self.hessian_monitor = HessianMonitor(
            every_n_steps, budget, probe_batches=probe_batches, loss_fn=loss_fn, max_hvp=max_hvp,
            trace_hvp=trace_hvp, density_every=density_every, seed=seed, burst_hvp=burst_hvp, hvp=hvp,
        )
        self.stall_diagnoser = StallDiagnoser(
            window, min_window, rel_improvement, max_snapshots=max_snapshots, escape_check=escape_check,
            loss_floor=loss_floor, verbose=verbose, gradient_monitor=self.gradient_monitor,
            hessian_monitor=self.hessian_monitor, probe_every=probe_every,
        )
        self.triage_monitor = TriageMonitor(
            val_metrics=val_metrics, loss_floor=0.0 if loss_floor is None else loss_floor, verbose=verbose,
            stall_diagnoser=self.stall_diagnoser, hessian_monitor=self.hessian_monitor) if triage else None
        self.conditioning_monitor = ConditioningMonitor(
            loss=loss, verbose=verbose, stall_diagnoser=self.stall_diagnoser, hessian_monitor=self.hessian_monitor,
            triage_monitor=self.triage_monitor) if conditioning else None
        # the conditioning monitor before the triage: its findings at the end of training join the triage's summary
        self.children: tuple[OptDiagCallback, ...] = tuple(c for c in (
            self.gradient_monitor, self.hessian_monitor, self.stall_diagnoser, self.conditioning_monitor,
            self.triage_monitor) if c is not None)

    @property
    def children(self) -> tuple[Any, ...]:
        """The children, in the order hooks reach them."""
        return self._children

    @children.setter
    def children(self, value: tuple[Any, ...]) -> None:
        self._children = tuple(value)
        self._receivers_by_hook: dict[str, list[Callable[..., Any]]] = {}
        self._receivers_version = HOOK_ACTIVITY.version

    def _receivers(self, name: str) -> list[Callable[..., Any]]:
        """The children's bound ``name`` hooks that do something, in order (looked up once per hook, and again after
        a child marks a hook idle or busy)."""
        if self._receivers_version != HOOK_ACTIVITY.version:
            self._receivers_by_hook, self._receivers_version = {}, HOOK_ACTIVITY.version
        receivers = self._receivers_by_hook.get(name)
        if receivers is None:
            receivers = self._receivers_by_hook[name] = [
                getattr(child, name) for child in self._children if _implements(child, name)]
        return receivers

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis so far, oldest first."""
        return self.stall_diagnoser.diagnoses

    @property
    def findings(self) -> list[Finding]:
        """Every triage finding so far (the conditioning monitor's included), oldest first."""
        if self.triage_monitor is not None:
            return self.triage_monitor.findings
        return [] if self.conditioning_monitor is None else self.conditioning_monitor.findings

    def summary(self) -> str:
        """The stall diagnoser's summary of the last fit, then the triage's."""
        parts = [self.stall_diagnoser.summary()]
        if self.triage_monitor is not None:
            parts.append(self.triage_monitor.summary())
        elif self.conditioning_monitor is not None:
            parts.append(self.conditioning_monitor.summary())
        return "\n".join(parts)

    def _state_key_arguments(self) -> dict[str, Any]:
        return {"every_n_steps": self.hessian_monitor.every_n_steps, "window": self.stall_diagnoser.window}

    @property
    def warning_counts(self) -> dict[str, int]:  # type: ignore[override]
        """The children's problem counts, as ``"<Child>.<kind>"``."""
        return {f"{type(c).__name__}.{k}": n for c in getattr(self, "children", ()) for k, n in c.warning_counts.items()}

    @warning_counts.setter
    def warning_counts(self, value: dict[str, int]) -> None:
        pass  # the bundle itself has no problems to count; the base class's initial {} is dropped

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in _CHILD_NAMES if getattr(self, name) is not None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in _CHILD_NAMES:
            if name in state_dict and getattr(self, name) is not None:
                getattr(self, name).load_state_dict(state_dict[name])


for _name in FORWARDED_HOOKS:
    setattr(OptDiag, _name, _forwarding(_name))
del _name
