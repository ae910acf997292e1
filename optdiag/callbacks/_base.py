"""The base every optdiag callback shares: both Lightning namespaces, rank zero, warnings, loggers, guards.

``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` are different classes, and each Trainer checks
``isinstance(cb, <its own> Callback)`` when it is given callbacks. :class:`OptDiagCallback` inherits from both (from
the second only when the ``lightning`` package imports), so one class with one implementation serves both Trainers.
Both bases define the same hooks with empty bodies, so the method resolution order does not matter.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch

from optdiag._lightning import LIGHTNING_NAMESPACES
from optdiag.curvature.batches import first_tensor
from optdiag import policy
from optdiag.errors import UsageError
from optdiag.sinks import events as events_sink
from optdiag.sinks import logger as logger_sink
from optdiag.sinks import tensorboard as tensorboard_sink


_CALLBACK_BASES = tuple(ns.Callback for ns in LIGHTNING_NAMESPACES)
_TENSORBOARD_LOGGERS = tuple(ns.loggers.TensorBoardLogger for ns in LIGHTNING_NAMESPACES)
# Strategies whose sharded parameters optdiag cannot reach: DeepSpeed's ZeRO partitions (flat buffers outside
# PyTorch's DTensor) and XLA's FSDP. FSDP2 (ModelParallelStrategy with fully_shard) is supported through its DTensor
# parameters, Lightning's FSDPStrategy (FSDP1) through its original parameters' views of the local shards (with
# use_orig_params and a sharding strategy whose shards are disjoint): docs/finite-difference-and-fsdp.md.
_UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy", "XLAFSDPStrategy")
_FSDP1_SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP")

_F = TypeVar("_F", bound=Callable[..., Any])


def guarded(hook: _F) -> _F:
    """Decorate a callback hook so that any exception becomes one warning instead of a crash.

    The exception policy (:mod:`optdiag.policy`, ``docs/errors.md``): nothing optdiag does after ``setup`` may
    raise into the training loop, :class:`~optdiag.errors.UsageError` included (configuration errors are found in
    the constructor or in ``setup``, which is not guarded). The exception's type is counted in
    ``self.warning_counts`` and reported once per type; the hook is skipped and training continues unchanged.
    """

    @functools.wraps(hook)
    def wrapper(self: "OptDiagCallback", *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the point is to keep training alive
            self.warn_once(
                f"hook-error:{type(exc).__name__}",
                f"{type(self).__name__}.{hook.__name__} failed and was skipped ({type(exc).__name__}: {exc}); "
                "training continues unchanged.",
            )
            return None

    wrapper._optdiag_guarded = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


# Lightning calls these on a callback after ``setup`` too (checkpoint saving and restoring, the end of a run).
_GUARDED_METHODS = ("state_dict", "load_state_dict", "teardown")


def _needs_guard(name: str, attribute: Any) -> bool:
    return (name.startswith("on_") or name in _GUARDED_METHODS) and callable(attribute) \
        and not getattr(attribute, "_optdiag_guarded", False)


class _HookActivity:
    """The version of the optdiag callbacks' idle hooks (:meth:`OptDiagCallback.set_hook_idle`): every change bumps
    it, so that a bundle rebuilds the per-hook lists of children it forwards to (one integer compared per hook)."""

    version = 0


HOOK_ACTIVITY = _HookActivity()


class OptDiagCallback(*_CALLBACK_BASES):  # type: ignore[misc]
    """Shared machinery of the optdiag callbacks (not used directly).

    Attributes:
        warning_counts: how often each kind of problem happened (non-finite values, skipped estimates, ...); each
            kind is warned about once, then only counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.warning_counts: dict[str, int] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Guard every hook a subclass defines (``on_*``, ``state_dict``, ``load_state_dict``, ``teardown``), so that
        no hook can be left unguarded by mistake; ``setup`` stays unguarded (configuration errors stop the run).
        A failing ``state_dict`` saves nothing for this callback; a failing ``load_state_dict`` keeps its fresh state.
        """
        super().__init_subclass__(**kwargs)
        for name, attribute in list(vars(cls).items()):
            if _needs_guard(name, attribute):
                setattr(cls, name, guarded(attribute))

    # --- identity -------------------------------------------------------------------------------------------------
    def _state_key_arguments(self) -> dict[str, Any]:
        """The constructor arguments that tell two instances of this class apart in a checkpoint."""
        return {}

    @property
    def state_key(self) -> str:
        """Checkpoint key: the class name and its key arguments, e.g. ``HessianMonitor{'every_n_steps': 10, ...}``.

        Built once and cached: Lightning reads it around every hook call (for its profiler's action names), and
        the key arguments are constructor settings that do not change.
        """
        key = self.__dict__.get("_cached_state_key")
        if key is None:
            key = self.__dict__["_cached_state_key"] = self._generate_state_key(**self._state_key_arguments())
        return key

    # --- hooks a bundle may skip ----------------------------------------------------------------------------------
    @property
    def idle_hooks(self) -> frozenset[str]:
        """The hooks that do nothing for now (:meth:`set_hook_idle`)."""
        return frozenset(self.__dict__.get("_idle_hooks", ()))

    def set_hook_idle(self, name: str, idle: bool = True) -> None:
        """Mark hook ``name`` as doing nothing for now (``idle``), or as doing something again.

        A bundle (:class:`~optdiag.OptDiag`) skips its children's idle hooks: Lightning calls every hook of every
        callback on every step, and on a model of 10 ms steps each call of an empty hook costs microseconds once the
        step has flushed the caches. Lightning itself ignores the mark, so an idle hook must still be right (and
        cheap) when it is called.
        """
        idle_hooks = self.__dict__.setdefault("_idle_hooks", set())
        if (name in idle_hooks) != bool(idle):
            if idle:
                idle_hooks.add(name)
            else:
                idle_hooks.discard(name)
            HOOK_ACTIVITY.version += 1

    # --- messages -------------------------------------------------------------------------------------------------
    def warn_once(self, kind: str, message: str) -> None:
        """Count a problem of ``kind``; warn (``UserWarning``, every rank) the first time it happens.

        The warning goes through :func:`optdiag.policy.warn`: a filter that turns warnings into errors cannot make
        it raise (it is logged instead), and it is counted either way.
        """
        count = self.warning_counts.get(kind, 0)
        self.warning_counts[kind] = count + 1
        if count == 0:
            policy.warn(f"optdiag: {message}", stacklevel=3)

    # --- environment ----------------------------------------------------------------------------------------------
    @staticmethod
    def check_strategy(trainer: Any) -> None:
        """Refuse strategies whose sharded parameters optdiag cannot reach (DeepSpeed, XLA FSDP), and FSDPStrategy
        (FSDP1) set up otherwise than optdiag measures it (``use_orig_params=False``: the parameters are flat
        buffers; ``NO_SHARD``/``HYBRID_SHARD``: the ranks' parts overlap), with a clear error.

        Raises:
            UsageError: naming the strategy and what is supported.
        """
        strategy = trainer.strategy
        name = type(strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise UsageError(
                f"optdiag callbacks do not support {name}: its parameter partitions are not PyTorch DTensors, so "
                "neither gradients nor curvature can be measured on them. Use a single device, DDP, or FSDP: "
                "FSDPStrategy, or ModelParallelStrategy(tensor_parallel_size=1) with "
                "torch.distributed.fsdp.fully_shard in configure_model (docs/finite-difference-and-fsdp.md)."
            )
        if "FSDPStrategy" in {cls.__name__ for cls in type(strategy).__mro__}:
            sharding = getattr(getattr(strategy, "sharding_strategy", None), "name", None)
            if not getattr(strategy, "kwargs", {}).get("use_orig_params") or sharding not in _FSDP1_SHARDINGS:
                raise UsageError(
                    f"optdiag measures {name} with use_orig_params=True (Lightning's default) and sharding_strategy "
                    f"FULL_SHARD or SHARD_GRAD_OP, got use_orig_params={strategy.kwargs.get('use_orig_params')} and "
                    f"{sharding}: without the original parameters there is nothing to measure per parameter, and "
                    "other shardings repeat parameters across ranks (docs/finite-difference-and-fsdp.md)."
                )

    @staticmethod
    def world_size(trainer: Any) -> int:
        return int(getattr(trainer, "world_size", 1) or 1)

    @staticmethod
    def tensorboard_logger(trainer: Any) -> Any | None:
        """The first ``TensorBoardLogger`` among the trainer's loggers (either namespace), or None."""
        for logger in getattr(trainer, "loggers", []):
            if isinstance(logger, _TENSORBOARD_LOGGERS):
                return logger
        return None

    @staticmethod
    def log_dir(trainer: Any) -> str:
        """Where files go: the first logger's ``log_dir`` (or ``save_dir``), else the trainer's default root dir."""
        for logger in getattr(trainer, "loggers", []):
            directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if directory:
                return str(directory)
        return str(trainer.default_root_dir)

    # --- output (rank zero only) ----------------------------------------------------------------------------------
    def _append_event(self, trainer: Any, record: dict[str, Any]) -> None:
        """One line of ``<log_dir>/optdiag/events.jsonl``; never into the working directory by default.

        Without a logger the folder is ``trainer.default_root_dir``, which Lightning sets to the working directory
        when the user names none: an ``optdiag/`` folder there would shadow the installed package for the next
        script started in it. Then nothing is written (said once); the records stay in memory (``diagnoses``,
        ``findings``).
        """
        directory = self.log_dir(trainer)
        if not getattr(trainer, "loggers", []) and os.path.abspath(directory) == os.path.abspath(os.getcwd()):
            self.warn_once("events-cwd", "no logger and no default_root_dir: events.jsonl is not written into the "
                           "working directory (an optdiag/ folder there would shadow the package); the verdicts are "
                           "in diagnoses. Pass a logger or Trainer(default_root_dir=...) to keep them on disk.")
            return
        try:
            events_sink.append_event(events_sink.events_path(directory), record)
        except OSError as error:
            self.warn_once("events-file", f"could not append to events.jsonl ({error}); diagnoses stay in memory")

    def log_scalars(self, trainer: Any, values: Mapping[str, Any], step: int) -> dict[str, float]:
        """Write plain numbers to every logger as ``optdiag/<name>``; registers the TensorBoard layout first."""
        if trainer.is_global_zero:
            tb = self.tensorboard_logger(trainer)
            if tb is not None:
                tensorboard_sink.register_layout(tb)
        return logger_sink.log_scalars(trainer, values, step)

    # --- module helpers -------------------------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def silenced_logging(pl_module: Any) -> Iterator[None]:
        """Make ``pl_module.log``/``log_dict`` no-ops inside the block (to call ``training_step`` from a hook)."""
        patched = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
        pl_module.log = lambda *args, **kwargs: None
        pl_module.log_dict = lambda *args, **kwargs: None
        try:
            yield
        finally:
            for name, previous in patched.items():
                if previous is None:
                    del pl_module.__dict__[name]
                else:
                    pl_module.__dict__[name] = previous


class _LossRead:
    """The float of the last loss tensor read (one entry, held by a weak reference to the tensor and its version
    counter, so a tensor written in place since is read again): the callbacks of one step that each want the
    batch's loss read it once (a host transfer, and a device sync on a GPU)."""

    def __init__(self) -> None:
        self.tensor: Callable[[], Any] = lambda: None
        self.version = -1
        self.value = math.nan

    def remember(self, tensor: torch.Tensor, value: float) -> None:
        self.tensor, self.version, self.value = weakref.ref(tensor), tensor._version, value

    def recall(self, tensor: torch.Tensor) -> float | None:
        return self.value if self.tensor() is tensor and tensor._version == self.version else None


_LOSS_READ = _LossRead()


def loss_of(outputs: Any) -> float | None:
    """The training loss in a batch's outputs (a tensor, or a dict with ``"loss"``), as a float (read once per
    tensor, see :func:`remember_loss`); None when the outputs hold no scalar loss.

    Example:
        >>> import torch
        >>> loss_of({"loss": torch.tensor(0.5)}), loss_of(2), loss_of(None)
        (0.5, 2.0, None)
    """
    loss = _loss_in(outputs)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        value = _LOSS_READ.recall(loss)
        if value is not None:
            return value
        value = float(loss.detach())  # a training_step output may carry its graph (manual optimization)
        _LOSS_READ.remember(loss, value)
        return value
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    return None


def undivided_loss(loss: float, trainer: Any) -> float:
    """A batch's loss as ``training_step`` returned it, from the value automatic optimization hands on (before
    backward, and in the outputs of ``on_train_batch_end``): that loss divided by ``trainer.accumulate_grad_batches``,
    the share of the step's loss each micro-batch backpropagates, multiplied back here."""
    divisor = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return loss * divisor if divisor > 1 else loss


def step_loss_of(trainer: Any, pl_module: Any, outputs: Any) -> float | None:
    """The loss ``training_step`` returned for a batch, read from the batch's outputs (:func:`loss_of`).

    Under automatic optimization the outputs hold it divided by ``accumulate_grad_batches`` (:func:`undivided_loss`),
    so that a run with gradient accumulation reports, and compares with its validation and probe-batch losses, the
    loss its ``training_step`` computed. Manual optimization hands the loss over as returned.
    """
    loss = loss_of(outputs)
    if loss is None or not getattr(pl_module, "automatic_optimization", True):
        return loss
    return undivided_loss(loss, trainer)


def remember_loss(outputs: Any, value: float) -> None:
    """Tell :func:`loss_of` the value of the loss in ``outputs``, read by other means (the stall diagnoser has it
    from before the optimizer step), so that no callback reads it again."""
    loss = _loss_in(outputs)
    if isinstance(loss, torch.Tensor):
        _LOSS_READ.remember(loss, float(value))


def _loss_in(outputs: Any) -> Any:
    """``outputs["loss"]`` for a mapping (a dict checked first: the ABC test costs microseconds every step)."""
    return outputs.get("loss") if type(outputs) is dict or isinstance(outputs, Mapping) else outputs


def grad_scaler(trainer: Any) -> Any | None:
    """The mixed-precision ``GradScaler`` of the trainer's precision plugin, or None (no loss scaling)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def loss_scale(trainer: Any) -> float:
    """The mixed-precision loss scale the backward pass saw (a ``GradScaler``'s, constant from the backward pass to
    the optimizer step), 1.0 without one. A GradScaler's scale is a power of two: dividing by it is exact."""
    scaler = grad_scaler(trainer)
    return float(scaler.get_scale()) if scaler is not None else 1.0


class DeferredValue:
    """A scalar tensor's value, requested now and read later without stalling the device in between.

    On a CUDA device the value is copied to pinned host memory asynchronously when it is requested, and an event marks
    the copy in the stream; :meth:`get` then waits for that event only, i.e. for the kernels queued before the request.
    A loss requested in ``on_before_backward`` and read at the optimizer step waits for the forward pass, while the
    backward pass already queued keeps the device busy; a plain ``.item()`` there would wait for the backward pass
    too and leave the device idle until the next kernels are launched (docs/performance.md, section 9). Elsewhere
    the tensor itself is kept and read by :meth:`get`. A number is kept as it is.

    Example:
        >>> import torch
        >>> DeferredValue(torch.tensor(0.25, requires_grad=True) * 2).get(), DeferredValue(3).get()
        (0.5, 3.0)
    """

    __slots__ = ("_value", "_event")

    def __init__(self, value: Any) -> None:
        self._event: Any = None
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.is_cuda:
                try:
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    host.copy_(value, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    value, self._event = host, event
                except RuntimeError:  # no pinned memory to be had (a locked-memory limit): read it synchronously
                    pass
        self._value = value

    def get(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return float(self._value)


def deferred_loss_scale(trainer: Any) -> DeferredValue:
    """:func:`loss_scale` as a :class:`DeferredValue`: the ``GradScaler``'s scale tensor copied without a device
    synchronisation (its ``get_scale()`` synchronises), requested where the backward pass sees that scale."""
    scaler = grad_scaler(trainer)
    scale = getattr(scaler, "_scale", None)  # GradScaler's scale tensor (private, hence the fallback)
    return DeferredValue(scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else loss_scale(trainer))


class _HeldStep:
    """The optimizer step a bundle read once for the hook it is forwarding (Lightning's ``trainer.global_step`` is a
    chain of properties, microseconds a read once a training step has flushed the caches, and every child of a
    bundle reads it in the same hook)."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.step = 0

    def hold(self, trainer: Any) -> None:
        """Until :meth:`release`, :func:`global_step` of ``trainer`` is the step read now (a hook's children run
        within one hook call, where no optimizer step happens). Never raises: unreadable, nothing is held."""
        try:
            self.trainer, self.step = trainer, int(trainer.global_step)
        except Exception:  # noqa: BLE001 - the children read it themselves, and report what fails (guarded)
            self.trainer = None

    def release(self) -> None:
        self.trainer = None


HELD_STEP = _HeldStep()


def global_step(trainer: Any) -> int:
    """``trainer.global_step`` as an int (the step a bundle holds for the hook it forwards, if any)."""
    return HELD_STEP.step if HELD_STEP.trainer is trainer else int(trainer.global_step)


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the first tensor found in a (nested) batch, or None if there is none."""
    first = first_tensor(batch)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else None


def ceil_to(value: float, quantum: float = 1.0) -> float:
    """``value`` rounded up to a multiple of ``quantum``, a rounding error above a multiple not counted as more.

    Example:
        >>> ceil_to(0.006 / (0.03 * 0.01)), ceil_to(0.3100000001, 0.01)
        (20.0, 0.32)
    """
    return math.ceil(value / quantum - 1e-9) * quantum
