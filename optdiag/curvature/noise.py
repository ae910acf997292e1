"""The gradient noise scale (McCandlish et al. 2018) and a test for a statistically zero gradient.

A minibatch gradient of batch size ``B`` has ``E|g_B|^2 = |G|^2 + tr(Sigma) / B`` (``G`` the true gradient,
``Sigma`` the per-sample gradient covariance). Measuring ``|g_B|^2`` at two batch sizes gives both terms
(docs/theory.md section 6), and with them the *simple noise scale* ``B_simple = tr(Sigma) / |G|^2``: the batch size at
which noise and signal in a step are equal, a proxy for the critical batch size. The same two numbers say whether the
gradient at a stalled point is distinguishable from noise at all (docs/theory.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from optdiag.curvature._checks import check_count, check_positive
from optdiag.curvature.batches import as_batch_list, iter_tensors, map_tensors
from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.state import preserved_state
from optdiag.errors import UsageError
from optdiag.policy import Measurements, check_number

__all__ = [
    "NoiseScaleResult",
    "ZeroGradientTest",
    "gradient_noise_scale",
    "estimate_gradient_noise_scale",
    "gradient_is_zero",
]


@dataclass(frozen=True)
class NoiseScaleResult:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from squared gradient norms at two batch sizes.

    Attributes:
        grad_sq_norm: unbiased estimate of ``|G|^2``, the squared norm of the true gradient. Being unbiased it can
            come out negative when the gradient is small against the noise.
        trace_sigma: estimate of ``tr(Sigma)``, the trace of the per-sample gradient covariance: the unbiased
            estimate, clamped to 0 when it comes out negative (a variance cannot be; the raw value is in
            ``clamped``).
        b_simple: ``trace_sigma / grad_sq_norm``; ``inf`` when ``grad_sq_norm <= 0 < trace_sigma`` (no measurable
            signal: the gradient is noise at every batch size), ``nan`` when the raw trace estimate was negative or
            both are ``<= 0`` (the measurements are too noisy to say anything; take more).
        b_small, b_big: the two batch sizes.
        sq_norm_small, sq_norm_big: the mean measured ``|g_B|^2`` at each batch size (the raw inputs, averaged).
        n_small, n_big: how many measurements were averaged at each batch size.
        grad_sq_norm_stderr, trace_sigma_stderr: standard errors of the two estimates (``nan`` with a single
            measurement, where there is no spread to estimate them from).
        clamped: ``{name: raw value}`` of what was moved into its possible range (docs/errors.md): a negative
            ``trace_sigma``, or a negative squared norm among the measurements (``sq_norm_small``/``sq_norm_big``,
            the most negative one); empty when nothing was.
        b_simple_log_stderr: standard error of ``log(b_simple)`` by the delta method, ``se(log T - log G)``
            with the two estimates' correlation included when the measurements are paired; ``b_simple *
            exp(+-b_simple_log_stderr)`` is its one-standard-error band. ``nan`` where the standard errors are, or
            where ``b_simple`` is not a finite positive number.
    """

    grad_sq_norm: float
    trace_sigma: float
    b_simple: float
    b_small: float
    b_big: float
    sq_norm_small: float
    sq_norm_big: float
    n_small: int
    n_big: int
    grad_sq_norm_stderr: float
    trace_sigma_stderr: float
    clamped: dict[str, float] = field(default_factory=dict)
    b_simple_log_stderr: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (floats and ints; JSON-ready apart from ``inf``/``nan``)."""
        return asdict(self)


def gradient_noise_scale(
    sq_norm_small: float | Iterable[float] | np.ndarray | torch.Tensor,
    sq_norm_big: float | Iterable[float] | np.ndarray | torch.Tensor,
    b_small: float,
    b_big: float,
    *,
    paired: bool = False,
) -> NoiseScaleResult:
    """``|G|^2``, ``tr(Sigma)`` and ``B_simple`` from squared gradient norms measured at two batch sizes.

    With ``|g_B|^2`` measured at ``b_small < b_big`` (McCandlish et al. 2018, appendix A)::

        |G|^2     ~ (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
        tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1 / b_small - 1 / b_big)

    Both are unbiased, but their ratio is not, and single measurements are very noisy. So repeated measurements are
    averaged first and the ratio is taken of the averages (``B_simple = mean tr(Sigma) / mean |G|^2``), never
    averaged over ratios.

    Standard errors: with ``paired=False`` the two sets of measurements are treated as independent. With
    ``paired=True`` (equal lengths, the ``i``-th small and big measurement taken on the same data, as
    :func:`estimate_gradient_noise_scale` does) each pair gives its own estimate and the standard error is their
    spread, which is right also when the two are correlated.

    Args:
        sq_norm_small: ``|g_B|^2`` at batch size ``b_small``: one number or repeated measurements.
        sq_norm_big: ``|g_B|^2`` at batch size ``b_big``: one number or repeated measurements.
        b_small, b_big: the batch sizes, ``0 < b_small < b_big``.
        paired: whether the measurements come in pairs taken on the same data (see above).

    Returns:
        A :class:`NoiseScaleResult`.

    The squared norms are measurements, cleaned by the package's one rule (:mod:`optdiag.policy`): a negative one
    (rounding) counts as 0 and a negative ``trace_sigma`` estimate is clamped to 0, both recorded in ``clamped``;
    NaN or infinite ones are not refused but make the estimates that depend on them NaN or infinite.

    Raises:
        UsageError (a ``ValueError``): for batch sizes that are not ``0 < b_small < b_big``, no squared norms or
            ones that are not numbers, or ``paired=True`` with unequal lengths.

    Example:
        >>> r = gradient_noise_scale(4.125, 1.390625, b_small=32, b_big=256)  # |G|^2 = 1, tr(Sigma) = 100
        >>> r.grad_sq_norm, r.trace_sigma, r.b_simple
        (1.0, 100.0, 100.0)
    """
    m = Measurements()
    small = _measurements("sq_norm_small", sq_norm_small, m)
    big = _measurements("sq_norm_big", sq_norm_big, m)
    b_small, b_big = check_positive("b_small", b_small), check_positive("b_big", b_big)
    if not b_small < b_big:
        raise UsageError(f"need b_small < b_big, got b_small={b_small:g} and b_big={b_big:g}")
    if paired and small.size != big.size:
        raise UsageError(f"paired=True needs as many small as big measurements, got {small.size} and {big.size}")

    def grad_sq(s, b):
        return (b_big * b - b_small * s) / (b_big - b_small)

    def trace(s, b):
        return (s - b) / (1.0 / b_small - 1.0 / b_big)

    mean_small, mean_big = float(small.mean()), float(big.mean())
    grad_sq_norm, raw_trace = grad_sq(mean_small, mean_big), trace(mean_small, mean_big)
    trace_sigma = m.number("trace_sigma", raw_trace, low=0.0, keep_nonfinite=True)
    usable = 0 < raw_trace < math.inf and 0 < grad_sq_norm < math.inf  # log(b_simple) exists
    if paired:
        grad_sq_err = _stderr(grad_sq(small, big))
        trace_err = _stderr(trace(small, big))
        # d log B = dT/T - dG/G per pair: the spread of that sum carries the correlation of T and G
        log_err = _stderr(trace(small, big) / raw_trace - grad_sq(small, big) / grad_sq_norm) if usable else math.nan
    else:
        var_small, var_big = _stderr(small) ** 2, _stderr(big) ** 2
        grad_sq_err = math.sqrt(b_big**2 * var_big + b_small**2 * var_small) / (b_big - b_small)
        trace_err = math.sqrt(var_small + var_big) / (1.0 / b_small - 1.0 / b_big)
        log_err = math.hypot(trace_err / raw_trace, grad_sq_err / grad_sq_norm) if usable else math.nan
    return NoiseScaleResult(
        grad_sq_norm=grad_sq_norm,
        trace_sigma=trace_sigma,
        b_simple=_b_simple(grad_sq_norm, raw_trace),
        b_small=b_small,
        b_big=b_big,
        sq_norm_small=mean_small,
        sq_norm_big=mean_big,
        n_small=int(small.size),
        n_big=int(big.size),
        grad_sq_norm_stderr=grad_sq_err,
        trace_sigma_stderr=trace_err,
        clamped=m.clamped,
        b_simple_log_stderr=log_err,
    )


def _measurements(name: str, values, m: Measurements) -> np.ndarray:
    """The squared norms as a float64 array; negative ones (rounding) set to 0 and the most negative recorded."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        array = np.atleast_1d(np.asarray(values, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must hold numbers (squared gradient norms), got {values!r}") from None
    if array.size == 0:
        raise UsageError(f"{name} is empty: need at least one squared gradient norm")
    lowest = float(np.min(array))
    if lowest < 0:  # np.min is NaN when a NaN is present, and NaN < 0 is False: NaN stays
        m.number(name, lowest, low=0.0)
        array = np.where(array < 0, 0.0, array)
    return array


def _stderr(values: np.ndarray) -> float:
    """Standard error of the mean; ``nan`` from a single value."""
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def _b_simple(grad_sq_norm: float, trace_sigma: float) -> float:
    if trace_sigma < 0:
        return math.nan
    if grad_sq_norm > 0:
        return trace_sigma / grad_sq_norm
    return math.inf if trace_sigma > 0 else math.nan


@dataclass(frozen=True)
class ZeroGradientTest:
    """Whether the true gradient is statistically zero at a batch size (Byrd et al. 2012 norm test, reversed).

    Attributes:
        statistic: the signal-to-noise ratio ``B |G|^2 / tr(Sigma)`` of a batch-``B`` gradient: the squared true
            gradient over the expected squared noise ``tr(Sigma) / B`` in it. Equals ``B / B_simple``. Negative
            when the unbiased ``|G|^2`` estimate is; ``inf`` when there is no noise (``tr(Sigma) <= 0``) and
            ``|G|^2 > 0``, ``0.0`` when both are ``<= 0``.
        threshold: ``1 / theta^2``; the gradient counts as zero when ``statistic < threshold``.
        is_zero: the verdict. The result is also truthy exactly when ``is_zero``.
        grad_sq_norm, trace_sigma, batch_size, theta: the inputs.
        noise_sq_norm: ``tr(Sigma) / B``, the expected squared norm of the noise in a batch-``B`` gradient.
    """

    statistic: float
    threshold: float
    is_zero: bool
    grad_sq_norm: float
    trace_sigma: float
    batch_size: float
    theta: float
    noise_sq_norm: float

    def __bool__(self) -> bool:
        return self.is_zero

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def gradient_is_zero(
    sq_norm: float, trace_sigma: float, batch_size: float, *, theta: float = 1.0
) -> ZeroGradientTest:
    """Is the true gradient statistically zero, as seen by an optimizer taking batches of ``batch_size``?

    Byrd et al. (2012, "Sample size selection in optimization methods for machine learning") accept a batch
    gradient as a descent direction when its noise is small against the signal, ``tr(Sigma) / B <= theta^2 |G|^2``.
    Read the other way: when the noise ``tr(Sigma) / B`` in a step exceeds ``theta^2 |G|^2``, a batch gradient says
    nothing reliable about the direction of the true one, which is then indistinguishable from zero. The test is
    therefore on ``statistic = B |G|^2 / tr(Sigma) = B / B_simple`` against ``1 / theta^2``. The default
    ``theta = 1`` calls a gradient zero when the noise in a step is larger than the signal; Byrd et al. use
    ``theta < 1`` for a stricter descent guarantee, which here calls more gradients zero.

    Args:
        sq_norm: the *unbiased* estimate of ``|G|^2`` (``NoiseScaleResult.grad_sq_norm``), not a raw ``|g_B|^2``,
            which carries the noise ``tr(Sigma) / B`` in it.
        trace_sigma: the estimate of ``tr(Sigma)`` (``NoiseScaleResult.trace_sigma``).
        batch_size: the batch size ``B`` the optimizer trains with.
        theta: Byrd et al.'s tolerance, ``> 0``.

    Returns:
        A :class:`ZeroGradientTest` carrying the statistic, threshold and verdict.

    Raises:
        UsageError (a ``ValueError``): for non-finite inputs, or a batch size or ``theta`` that is not
            positive.

    Example:
        >>> test = gradient_is_zero(sq_norm=1.0, trace_sigma=100.0, batch_size=32)  # B_simple = 100 > 32
        >>> test.statistic, bool(test)
        (0.32, True)
    """
    sq_norm, trace_sigma = check_number("sq_norm", sq_norm), check_number("trace_sigma", trace_sigma)
    batch_size, theta = check_positive("batch_size", batch_size), check_positive("theta", theta)
    if trace_sigma > 0:
        statistic = batch_size * sq_norm / trace_sigma
    else:
        # No measurable noise: any positive gradient is real signal.
        statistic = math.inf if sq_norm > 0 else 0.0
    threshold = 1.0 / theta**2
    return ZeroGradientTest(
        statistic=statistic,
        threshold=threshold,
        is_zero=bool(statistic < threshold),
        grad_sq_norm=sq_norm,
        trace_sigma=trace_sigma,
        batch_size=batch_size,
        theta=theta,
        noise_sq_norm=max(trace_sigma, 0.0) / batch_size,
    )


def estimate_gradient_noise_scale(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: Any, *, small_batch_size: int
) -> NoiseScaleResult:
    """Measure ``|G|^2``, ``tr(Sigma)`` and ``B_simple`` on a model from batches split into micro-batches.

    For each batch (all of the same size ``B``): ``|g_B|^2`` of the whole batch, and ``|g_b|^2`` of each of its
    ``B // b`` consecutive chunks of ``b = small_batch_size`` samples (a remainder is left out of the small
    measurements). The chunks' mean and the whole batch's value form one pair per batch, passed to
    :func:`gradient_noise_scale` with ``paired=True``; so ``n_small = n_big`` is the number of batches, and the
    standard errors need at least two batches.

    The loss is evaluated as by ``HessianOperator`` (``loss_fn`` returns a batch's *mean* loss; the model's mode
    as it is; parameters never written). Afterwards the model's buffers, modes, ``.grad`` and RNGs are as before.
    A loss that is not a mean of per-sample terms (BatchNorm in train mode) has no per-sample covariance; the
    numbers are then those of the batches as they are.

    Args:
        model: the network at the point to measure.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
        batches: one batch or an iterable of batches; every tensor in a batch has the samples along dim 0.
        small_batch_size: ``b``, with ``1 <= b < B``.

    Returns:
        A :class:`NoiseScaleResult` with ``b_small = small_batch_size`` and ``b_big = B``.

    Raises:
        UsageError: no batches, batches of different sizes, tensors in a batch with different leading sizes, or a
            ``small_batch_size`` that is not in ``[1, B)``.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> data = [(torch.randn(64, 3), torch.randn(64, 1)) for _ in range(4)]
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> estimate_gradient_noise_scale(net, loss_fn, data, small_batch_size=8).n_big
        4
    """
    small_batch_size = check_count("small_batch_size", small_batch_size)
    raw = as_batch_list(batches)
    if not raw:
        raise UsageError("batches is empty: at least one batch is needed")
    big_size = _leading_size(raw[0], 0)
    if not small_batch_size < big_size:
        raise UsageError(f"small_batch_size must be smaller than the batch size {big_size}, got {small_batch_size}")
    small_means, big = [], []
    with preserved_state(model):
        for index, batch in enumerate(raw):
            size = _leading_size(batch, index)
            if size != big_size:
                raise UsageError(
                    f"batch {index} has {size} samples but batch 0 has {big_size}: the noise scale needs batches of "
                    "one size (DataLoader(..., drop_last=True))"
                )
            chunks = [_take(batch, start, small_batch_size) for start in range(0, size - small_batch_size + 1,
                                                                                  small_batch_size)]
            # One evaluation object per batch: the whole batch first, then its chunks.
            objective = BatchObjective(model, loss_fn, [batch, *chunks], batch_list=True)
            # One gradient at a time: a model's batch and chunk gradients together are several copies of it.
            sq_norms = [float(g.double().pow_(2).sum()) for _, g in objective.each_batch(objective.point())]
            big.append(sq_norms[0])
            small_means.append(float(np.mean(sq_norms[1:])))
    return gradient_noise_scale(small_means, big, small_batch_size, big_size, paired=True)


def _leading_size(batch: Any, index: int) -> int:
    """The number of samples in a batch: the common leading dimension of all its tensors."""
    sizes = {int(t.shape[0]) for t in iter_tensors(batch) if t.dim() > 0}
    if len(sizes) != 1:
        raise UsageError(
            f"batch {index} must hold tensors with one common leading (sample) dimension to be split into "
            f"micro-batches, got leading sizes {sorted(sizes)}"
        )
    return sizes.pop()


def _take(batch: Any, start: int, length: int) -> Any:
    """Samples ``start:start+length`` of every tensor in a nested batch (scalars and other leaves unchanged)."""
    return map_tensors(batch, lambda t: t[start : start + length] if t.dim() > 0 else t)
