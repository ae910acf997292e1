"""Everything a verdict may rest on, measured or not, and the quantities derived from it (in one place).

The Lightning callbacks fill an :class:`Evidence` during training (loss window from the stall detector, gradient
statistics, a curvature snapshot on a probe batch); the post-hoc analysis fills one from a checkpoint. Every field
but ``step`` is optional: ``None`` means "not measured", and every rule in :mod:`optdiag.diagnosis.classify`
says what it does without it.

Example:
    >>> from optdiag.diagnosis.stability import OptimizerSpec
    >>> ev = Evidence(step=100, lambda_max=150.0, optimizer=OptimizerSpec("sgd", lr=0.01))
    >>> ev.stability_threshold, ev.stability_ratio
    (200.0, 0.75)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from optdiag.diagnosis.stability import OptimizerSpec, stability_threshold
from optdiag.diagnosis.types import from_jsonable, to_jsonable
from optdiag.errors import UsageError
from optdiag.policy import Measurements, check_number

# How each measured field is cleaned (optdiag.policy; docs/errors.md, "Measured numbers").
# A non-finite loss is the evidence of divergence: kept, and it sets ``nonfinite``.
_LOSS_FIELDS = ("loss", "loss_min", "loss_initial")
# An overflowing gradient (+inf) is divergence evidence too; NaN there is "not available".
_GRADIENT_SIZE = ("grad_norm", "grad_sq_norm_unbiased")
# Quantities that cannot be negative (norms, variances, residuals, standard errors): rounding below 0 is clamped.
_NON_NEGATIVE = ("grad_norm", "grad_norm_initial", "grad_sq_norm_unbiased", "grad_noise_trace", "lambda_max_residual",
                 "lambda_min_residual", "hessian_trace_stderr", "grad_pair_sq", "grad_pair_dot_stderr",
                 "grad_pair_cosine_stderr", "stability_ratio_before", "spike_probe_ratio")
# Counts: a value that is not a positive integer is a measurement gone wrong ("not available").
_COUNTS = ("batch_size", "num_params", "grad_pair_count", "grad_noise_batches", "dataset_size", "spike_count")
_COSINES = ("grad_cosine", "update_cosine", "grad_pair_cosine")
_NOT_MEASURED_HERE = ("step", "loss_window", "optimizer", "nonfinite", "clamped", "unavailable",
                      "preconditioner_warmup") + _COUNTS


@dataclass
class Evidence:
    """The measurements at one step. All optional except ``step``; ``None`` = not measured.

    Attributes:
        step: optimizer step the evidence refers to.
        loss_window: the recent losses the stall detector looked at.
        loss: current (recent mean) loss. loss_min: best loss seen. loss_initial: loss at the start of training.
        rel_slope: the stall event's relative slope (per step, divided by the loss level).
        grad_norm: mean minibatch gradient norm ``|g_B|`` over the window.
        grad_norm_initial: the same in early training (the scale "tiny" is measured against).
        grad_sq_norm_unbiased: unbiased estimate of the full-gradient ``|G|^2`` (docs/theory.md section 6).
        grad_noise_trace: ``tr(Sigma)``, the per-example gradient covariance trace. batch_size: ``B``.
        grad_cosine: mean cosine between consecutive minibatch gradients. update_cosine: same for updates.
        lambda_max, lambda_min: extreme Hessian eigenvalues, with their Lanczos residuals ``*_residual``.
        hessian_trace, hessian_trace_stderr: Hutchinson trace estimate and its standard error.
        preconditioned_lambda_max: ``lambda_max(P^-1 H)`` for Adam/RMSprop.
        preconditioner_warmup: ``{"steps", "ready_at"}`` while Adam's/RMSprop's second-moment estimate is too young
            for a preconditioned sharpness (:func:`~optdiag.curvature.preconditioned.preconditioner_warmup`); the
            stability ratio is then "warming up", not a number.
        epsilon_sharpness: Keskar's epsilon-sharpness (percent). num_params: parameter count.
        optimizer: the :class:`OptimizerSpec` of the run. loss_floor: the user's idea of a good loss, if known.
        grad_pair_count: pairs of consecutive steps whose gradients were measured over the stalled horizon;
            grad_pair_dot: their mean inner product ``g_t . g_(t-1)`` (an estimate of ``|G|^2`` that minibatch noise
            does not inflate), with its standard error grad_pair_dot_stderr; grad_pair_sq: the mean
            ``|g_t| |g_(t-1)|`` of the same pairs (``|G|^2 + tr(Sigma)/B``). See ``docs/diagnosis-rules.md``, "The gradient is about zero".
            grad_pair_cosine: the mean of the same pairs' cosines, each pair counting once, with its standard error
            grad_pair_cosine_stderr (the anti-alignment test; docs/diagnosis-rules.md).
        grad_noise_batches: the batches the probe set's noise estimate rests on. dataset_size: samples per epoch
            (a batch of that size is a full batch: no gradient noise).
        stability_ratio_before: the stability ratio measured before a loss spike (a catapult crosses 1 downwards).
        spike_count: loss spikes seen so far in the run, this one included.
        spike_probe_ratio: the loss on the fixed probe batches when a spike started over the same loss once it had
            recovered: well above 1 for a spike of the model, about 1 for a few hard minibatches.
        directional_sharpness: the critical sharpness along the optimizer's update, ``2 / eta_c`` with ``eta_c`` the
            largest learning rate at which the step does not raise the loss (forwards only, HessianMonitor's
            ``critical_sharpness``; docs/critical-sharpness.md): compared with ``stability_threshold`` like
            ``sharpness``, where no eigen-solve was affordable. 0 or negative: nothing limits the step.
        nonfinite: the run diverged: set automatically when a loss (``loss``, ``loss_window``, ``loss_min``,
            ``loss_initial``) is NaN or infinite or a gradient size (``grad_norm``, ``grad_sq_norm_unbiased``) is
            ``+inf``.
        clamped: ``{field: raw value}`` of measurements that rounding put outside their possible range (a negative
            noise trace, a cosine above 1), stored clamped to it. Filled automatically; a producer that clamped a
            value itself may pass its own entries.
        unavailable: fields that came in as NaN (or as an infinity that cannot be a measurement, e.g. an infinite
            eigenvalue) and are stored as ``None``. Filled automatically, like ``clamped``.

    Measured numbers are never refused (``docs/errors.md``): only a value that is not a number at all (a string)
    raises :class:`~optdiag.errors.UsageError`.

    Example:
        >>> Evidence(step=5, loss=float("nan")).nonfinite
        True
        >>> ev = Evidence(step=5, grad_noise_trace=-1e-10, lambda_max=float("nan"))
        >>> ev.grad_noise_trace, ev.lambda_max, ev.clamped, ev.unavailable
        (0.0, None, {'grad_noise_trace': -1e-10}, ['lambda_max'])
    """

    step: int
    loss_window: list[float] | None = None
    loss: float | None = None
    loss_min: float | None = None
    loss_initial: float | None = None
    rel_slope: float | None = None
    grad_norm: float | None = None
    grad_norm_initial: float | None = None
    grad_sq_norm_unbiased: float | None = None
    grad_noise_trace: float | None = None
    batch_size: int | None = None
    grad_cosine: float | None = None
    update_cosine: float | None = None
    lambda_max: float | None = None
    lambda_max_residual: float | None = None
    lambda_min: float | None = None
    lambda_min_residual: float | None = None
    hessian_trace: float | None = None
    hessian_trace_stderr: float | None = None
    preconditioned_lambda_max: float | None = None
    preconditioner_warmup: dict[str, int] | None = None
    epsilon_sharpness: float | None = None
    num_params: int | None = None
    optimizer: OptimizerSpec | None = None
    nonfinite: bool = False
    loss_floor: float | None = None
    grad_pair_count: int | None = None
    grad_pair_dot: float | None = None
    grad_pair_dot_stderr: float | None = None
    grad_pair_sq: float | None = None
    grad_pair_cosine: float | None = None
    grad_pair_cosine_stderr: float | None = None
    grad_noise_batches: int | None = None
    dataset_size: int | None = None
    stability_ratio_before: float | None = None
    spike_count: int | None = None
    spike_probe_ratio: float | None = None
    directional_sharpness: float | None = None
    clamped: dict[str, float] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.step = check_number("Evidence.step", self.step, low=0, integer=True, what="a non-negative int")
        if not isinstance(self.nonfinite, bool):
            raise UsageError(f"Evidence.nonfinite must be a bool, got {self.nonfinite!r}")
        if not isinstance(self.clamped, dict) or not isinstance(self.unavailable, (list, tuple)):
            raise UsageError("Evidence.clamped must be a dict and Evidence.unavailable a list of field names")
        m = Measurements()
        m.clamped.update({str(k): float(v) for k, v in self.clamped.items()})
        m.unavailable.extend(str(name) for name in self.unavailable)
        if self.loss_window is not None:
            try:
                self.loss_window = [float(x) for x in self.loss_window]
            except (TypeError, ValueError):
                raise UsageError("Evidence.loss_window must be a sequence of numbers") from None
            self.nonfinite |= not all(math.isfinite(x) for x in self.loss_window)
        for f in fields(self):
            if f.name in _NOT_MEASURED_HERE:
                continue
            name = f.name
            value = m.number(
                name, getattr(self, name),
                low=0.0 if name in _NON_NEGATIVE else (-1.0 if name in _COSINES else None),
                high=1.0 if name in _COSINES else None,
                keep_nonfinite=name in _LOSS_FIELDS, keep_inf=name in _GRADIENT_SIZE)
            setattr(self, name, value)
            if value is not None and not math.isfinite(value):
                self.nonfinite = True  # a non-finite loss or an overflowing gradient: evidence of divergence
        for name in _COUNTS:
            value = m.number(name, getattr(self, name))
            if value is not None and (value < 1 or value != int(value)):
                m.unavailable.append(name)  # not a count: a measurement gone wrong, not evidence
                value = None
            setattr(self, name, None if value is None else int(value))
        self.clamped, self.unavailable = m.clamped, m.unavailable
        if self.preconditioner_warmup is not None:
            warmup = self.preconditioner_warmup
            if not isinstance(warmup, dict) or set(warmup) != {"steps", "ready_at"}:
                raise UsageError(f"Evidence.preconditioner_warmup must be {{'steps': int, 'ready_at': int}}, "
                                 f"got {warmup!r}")
            self.preconditioner_warmup = {k: check_number(f"preconditioner_warmup[{k!r}]", v, low=0, integer=True,
                                                          what="a non-negative int") for k, v in warmup.items()}
        if self.optimizer is not None and not isinstance(self.optimizer, OptimizerSpec):
            if isinstance(self.optimizer, dict):
                self.optimizer = OptimizerSpec.from_dict(self.optimizer)
            else:
                raise UsageError(f"Evidence.optimizer must be an OptimizerSpec, got {type(self.optimizer).__name__}")

    # ---- derived quantities: computed here and nowhere else -------------------------------------------------
    @property
    def lr(self) -> float | None:
        """The optimizer's learning rate, when known."""
        if self.optimizer is None or math.isnan(self.optimizer.lr):
            return None
        return self.optimizer.lr

    @property
    def noise_free(self) -> bool:
        """Whether the steps carry no minibatch noise: each batch is the whole data set (``batch_size`` at least
        ``dataset_size``), or the probe batches' gradients do not differ at all (``grad_noise_trace`` 0: the same
        full batch every step, whatever the loader says its epoch holds).

        Example:
            >>> Evidence(step=0, batch_size=64, dataset_size=64).noise_free, Evidence(step=0, batch_size=32).noise_free
            (True, False)
        """
        return self.grad_noise_trace == 0 or (self.batch_size is not None and self.dataset_size is not None
                                              and self.batch_size >= self.dataset_size)

    @property
    def stability_threshold(self) -> float | None:
        """Largest stable curvature for the optimizer (docs/theory.md section 1); None when unknown."""
        return None if self.optimizer is None else stability_threshold(self.optimizer)

    @property
    def sharpness(self) -> float | None:
        """The curvature the threshold applies to: ``preconditioned_lambda_max`` for Adam/RMSprop, else
        ``lambda_max``. None when not measured."""
        if self.optimizer is not None and self.optimizer.preconditioned:
            return self.preconditioned_lambda_max
        return self.lambda_max

    @property
    def stability_ratio(self) -> float | None:
        """``sharpness / stability_threshold``: 1 on the edge of stability, 0.5 at SGD's sign-flip boundary."""
        threshold, sharp = self.stability_threshold, self.sharpness
        if threshold is None or sharp is None or threshold <= 0 or not math.isfinite(sharp):
            return None
        return sharp / threshold

    @property
    def stability_text(self) -> str:
        """The stability ratio as a sentence shows it (:func:`stability_text` of :meth:`record`)."""
        return stability_text(self.record())

    @property
    def lr_lambda_max(self) -> float | None:
        """``lr * sharpness`` (the per-step curvature factor of docs/theory.md section 4)."""
        if self.lr is None or self.sharpness is None:
            return None
        return self.lr * self.sharpness

    @property
    def grad_snr(self) -> float | None:
        """Norm-test statistic ``|G|^2 / (tr(Sigma) / B)`` = ``B / B_simple`` (Byrd et al. 2012).

        Below 1 the full gradient is smaller than one minibatch's noise: statistically zero. ``inf`` for a
        noiseless (full-batch) gradient that is not exactly zero.
        """
        g2, noise, b = self.grad_sq_norm_unbiased, self.grad_noise_trace, self.batch_size
        if g2 is None or noise is None or b is None:
            return None
        if noise == 0:
            return math.inf if g2 > 0 else 0.0
        return g2 * b / noise  # not g2 / (noise / b): noise / b can underflow to 0

    @property
    def b_simple(self) -> float | None:
        """McCandlish's simple noise scale ``tr(Sigma) / |G|^2`` (docs/theory.md section 6); None if not measured."""
        g2, noise = self.grad_sq_norm_unbiased, self.grad_noise_trace
        if g2 is None or noise is None:
            return None
        return math.inf if g2 <= 0 else noise / g2

    @property
    def grad_norm_ratio(self) -> float | None:
        """``grad_norm / grad_norm_initial``: the gradient against its early-training scale."""
        if self.grad_norm is None or not self.grad_norm_initial:
            return None
        return self.grad_norm / self.grad_norm_initial

    def derived(self) -> dict[str, Any]:
        """The derived quantities under the logged-scalar names (None when they cannot be computed)."""
        opt = self.optimizer
        return {
            "lr": self.lr,
            "momentum": None if opt is None or opt.kind == "unknown" else (
                opt.beta1 if opt.kind in ("adam", "adamw") else opt.momentum),
            "optimizer": None if opt is None else opt.name or opt.kind,
            "optimizer_kind": None if opt is None else opt.kind,
            "effective_lr": None if opt is None else opt.effective_lr,
            "stability_threshold": self.stability_threshold,
            "stability_note": None if opt is None else opt.reason or None,
            "stability_ratio": self.stability_ratio,
            "lr_lambda_max": self.lr_lambda_max,
            "grad_snr": self.grad_snr,
            "b_simple": self.b_simple,
            "grad_norm_ratio": self.grad_norm_ratio,
        }

    def record(self) -> dict[str, Any]:
        """Measured fields (those not None) plus :meth:`derived`, ready for ``Diagnosis.evidence``.

        ``clamped`` and ``unavailable`` appear only when something was clamped or unavailable.
        """
        out = {k: v for k, v in self.to_dict().items() if v not in (None, {}, []) and k != "optimizer"}
        out.update({k: v for k, v in to_jsonable(self.derived()).items() if v is not None})
        return from_jsonable(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (``optimizer`` as its own dict)."""
        return to_jsonable({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evidence:
        """Rebuild from :meth:`to_dict` output."""
        if not isinstance(data, dict):
            raise UsageError(f"Evidence.from_dict needs a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UsageError(f"Evidence.from_dict: unknown keys {sorted(unknown)}")
        return cls(**from_jsonable(data))


def stability_text(record: dict[str, Any]) -> str:
    """The stability ratio in words, from an evidence record (``Diagnosis.evidence``, :meth:`Evidence.record`):
    the number, "warming up" while Adam's preconditioner is too young for one, or why it is unknown. Texts that
    quote the ratio use this, so none prints a bare "?".

    Example:
        >>> stability_text({"stability_ratio": 0.5})
        '0.5 of the stability threshold'
        >>> stability_text({"stability_threshold": 3800.0, "preconditioner_warmup": {"steps": 12, "ready_at": 51}})
        "stability ratio warming up (the optimizer's second-moment estimate has 12 of the 51 steps it needs)"
    """
    ratio = record.get("stability_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        return f"{ratio:.3g} of the stability threshold"
    warmup = record.get("preconditioner_warmup")
    if isinstance(warmup, dict):
        return (f"stability ratio warming up (the optimizer's second-moment estimate has {warmup.get('steps')} "
                f"of the {warmup.get('ready_at')} steps it needs)")
    if record.get("stability_threshold") is None:
        note = record.get("stability_note")
        return f"stability ratio unknown ({note or 'no threshold for this optimizer'})"
    return "stability ratio unknown (the sharpness the threshold applies to was not measured)"
