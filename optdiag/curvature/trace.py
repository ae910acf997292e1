"""The trace of a curvature operator from matrix-vector products: Hutchinson's estimator and Hutch++.

Both estimators see the matrix only through ``op @ v``. Hutchinson averages ``z^T H z`` over random sign vectors
``z``; Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021, "Hutch++: Optimal Stochastic Trace Estimation") first
captures the top of the spectrum with a randomized sketch, takes the trace there exactly, and runs Hutchinson only on
what is left, which cuts the error from ``O(1/sqrt(m))`` to ``O(1/m)`` when the spectrum decays.

This module also holds the random probe vectors shared by the other randomized estimators (the start vectors of
stochastic Lanczos quadrature): drawn from a seeded generator on the operator's device, never from the global RNG,
so an estimate never changes a training run's random stream.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from optdiag.curvature._checks import check_count, check_operator, check_seed
from optdiag.curvature.base import CurvatureOperator, vectors_that_fit
from optdiag.curvature.lanczos import _KrylovBasis, _Rows  # the Lanczos basis's storage and its Gram-Schmidt
from optdiag.errors import NonFiniteError, UsageError
from optdiag.policy import check_number

DEFAULT_N_HVP = 100
"""Products spent when neither ``n_hvp`` nor ``n_probes`` is given."""

_MIN_PROBES_BEFORE_STOPPING = 10
"""With ``tol``, the spread of fewer probes is too unreliable to stop on."""

_METHODS = ("hutch++", "hutchinson")
_DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass
class TraceResult:
    """A trace estimate with its standard error.

    Attributes:
        estimate: the estimated trace ``tr(H)``.
        stderr: its standard error (``nan`` when a single probe leaves no spread to measure, ``0`` when the
            probes agree exactly, as for a diagonal matrix with Rademacher probes).
        n_hvp: the matrix-vector products this estimate spent.
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: the per-probe estimates of the whole trace; their mean is ``estimate`` and their standard
            deviation over ``sqrt(len(samples))`` is ``stderr``. For Hutch++ each is the exact trace on the sketch
            plus one remainder probe.
        block_estimates: with ``blocks``, the trace of each diagonal block ``tr(H_bb)`` (consecutive slices of the
            parameter vector, e.g. one per layer); they sum to ``estimate`` up to rounding. None without ``blocks``.
        block_stderr: their standard errors, like ``stderr``; None without ``blocks``.
    """

    estimate: float
    stderr: float
    n_hvp: int
    method: str
    samples: np.ndarray
    block_estimates: np.ndarray | None = None
    block_stderr: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as plain Python numbers and lists (JSON-ready, except ``nan`` for an unknown stderr)."""
        return plain_values(asdict(self))


def plain_values(value: Any) -> Any:
    """Numpy arrays and scalars inside dicts, lists and tuples turned into Python lists and numbers."""
    if isinstance(value, dict):
        return {key: plain_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def probe_generator(op: CurvatureOperator, seed: int) -> torch.Generator:
    """A private generator on the operator's device, so probes never touch (or depend on) the global RNG."""
    generator = torch.Generator(device=op.device)
    # Sharded vectors: each rank draws its own part, from its own stream (one stream would repeat the same entries
    # on every rank, correlated probes that bias the estimate).
    generator.manual_seed(check_seed(seed) + 1_000_003 * op.shard_index)
    return generator


def random_probe(op: CurvatureOperator, generator: torch.Generator, distribution: str = "rademacher") -> torch.Tensor:
    """One random vector of length ``op.num_params`` in the operator's dtype, with ``E[z z^T] = I``.

    Args:
        op: the operator whose space, device and dtype the probe lives in.
        generator: the source of randomness (see :func:`probe_generator`).
        distribution: ``"rademacher"`` (independent +-1 entries) or ``"gaussian"`` (standard normal entries).
    """
    if distribution == "rademacher":
        signs = torch.empty(op.num_params, device=op.device, dtype=op.dtype)
        return signs.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)
    return torch.randn(op.num_params, generator=generator, device=op.device, dtype=op.dtype)


def hessian_trace(
    op: CurvatureOperator,
    n_hvp: int | None = None,
    *,
    method: str = "hutch++",
    n_probes: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    blocks: Sequence[int] | None = None,
    max_sketch: int | None = None,
) -> TraceResult:
    """Estimate ``tr(H)`` from matrix-vector products.

    **Hutchinson**: ``tr(H) = E[z^T H z]`` for random ``z`` with ``E[z z^T] = I``. The estimate is the mean of
    ``z_j^T H z_j`` over ``m`` probes and its standard error the sample standard deviation over ``sqrt(m)``. One
    Rademacher probe has variance ``2 (|H|_F^2 - sum_i H_ii^2)`` (zero for a diagonal matrix); a Gaussian one
    ``2 |H|_F^2``. Each probe costs one product.

    **Hutch++** (Meyer, Musco, Musco & Woodruff 2021): the budget is split in thirds. A sketch ``H S`` of ``k``
    random vectors is orthonormalised into ``Q``, whose span holds the largest eigen-directions; ``tr(Q^T H Q)`` is
    computed exactly (``k`` more products), and Hutchinson with ``l`` probes projected by ``I - Q Q^T`` estimates
    the trace of the deflated remainder. The estimator is unbiased for any ``Q``, so, conditional on the sketch,
    its only randomness is the remainder's average: ``stderr`` is the sample standard deviation of the ``l``
    remainder probes over ``sqrt(l)``. It is exact (``stderr`` 0 up to rounding) when ``H`` has rank below ``k``,
    and much more accurate than Hutchinson at equal cost when the spectrum decays, as Hessians' do. The sketch is
    the only set of vectors held at once (``k`` of them, orthonormalised one at a time as they are multiplied);
    ``max_sketch`` bounds it, and the products it leaves go to the remainder probes, held one at a time.

    Args:
        op: the operator (``HessianOperator``, ``MatrixOperator``, ...).
        n_hvp: the total number of products to spend (default 100). Hutchinson uses one per probe; Hutch++ needs
            at least 3 and uses ``k = n_hvp // 3`` sketch vectors (at most ``op.num_params``) and the rest,
            ``n_hvp - 2k``, as remainder probes. With ``tol`` it is the most that will be spent.
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        n_probes: instead of ``n_hvp``: the number of Hutchinson probes (Hutchinson), or the number of remainder
            probes and of sketch vectors (Hutch++, so about ``3 * n_probes`` products).
        tol: stop early once ``stderr <= tol * |estimate|`` (checked from the tenth probe on; for Hutch++ the
            sketch, a third of ``n_hvp``, is spent first); ``None`` spends
            the whole budget.
        seed: seeds a private ``torch.Generator`` on the operator's device; the global RNG is neither used nor
            advanced.
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"`` probes.
        blocks: sizes of consecutive slices of the parameter vector (summing to ``op.num_params``; e.g. one per
            layer, :func:`~optdiag.curvature.params.parameter_blocks`) whose diagonal-block traces ``tr(H_bb)`` to
            estimate from the same products, at no extra product: each quadratic form ``v^T H v`` splits into the
            slices' ``v_b^T (H v)_b``. For Hutchinson's probes their mean is ``tr(H_bb)``; for Hutch++ the sketch
            part gives ``tr(D_b H Q Q^T)`` exactly and the projected probes ``tr(D_b H (I - Q Q^T))`` on average
            (``D_b`` selects the slice; ``(I - Q Q^T)`` is a projection and the trace cyclic), so the block
            estimates are unbiased too and sum to ``estimate``. Not for operators over sharded vectors.
        max_sketch: Hutch++'s most sketch vectors. Default: as many as fit in 256 MiB
            (:data:`~optdiag.curvature.base.VECTOR_MEMORY_BYTES`), at least 1: no bound below about a million
            float32 parameters at the default budget; 6 on an 11M-parameter ResNet-18, whose 60 products are then
            6 sketch vectors, their 6 exact products and 48 remainder probes (docs/performance.md, section 8).

    Returns:
        A :class:`TraceResult`.

    Raises:
        UsageError: (a ``ValueError``) for an ``op`` that is not a ``CurvatureOperator``, a bad budget, method,
            distribution or tolerance.
        NonFiniteError: if a product comes out NaN or infinite.

    Example:
        >>> import torch
        >>> from optdiag.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = hessian_trace(op, n_hvp=30)
        >>> round(res.estimate, 6), res.n_hvp
        (55.0, 30)
        >>> [round(b, 6) for b in hessian_trace(op, n_hvp=30, blocks=[4, 6]).block_estimates.tolist()]
        [10.0, 45.0]
    """
    check_operator(op)
    method = _choose(method, "method", _METHODS)
    distribution = _choose(distribution, "distribution", _DISTRIBUTIONS)
    tol = check_number("tol", tol, low=0.0, low_open=True, allow_none=True, what="a positive number")
    blocks = _check_blocks(op, blocks)
    generator = probe_generator(op, seed)
    start = op.n_hvp
    rows: list[np.ndarray] | None = None if blocks is None else []  # per probe, its quadratic form's block split
    if method == "hutchinson":
        samples = _probe_samples(op, _hutchinson_probes(n_hvp, n_probes), tol, generator, distribution,
                                 blocks=blocks, rows=rows)
    else:
        sketch_cap = (max(1, vectors_that_fit(op.num_params, op.dtype.itemsize)) if max_sketch is None
                      else check_count("max_sketch", max_sketch))
        sketch_size, remainder_probes = _hutchpp_split(op, n_hvp, n_probes, sketch_cap)
        basis = _range_sketch(op, sketch_size, generator, distribution, seed)
        exact_rows: list[np.ndarray] | None = None if blocks is None else []
        exact_part = sum(_quadratic_form(op, basis[i], blocks, exact_rows) for i in range(basis.count))

        def project(z: torch.Tensor) -> torch.Tensor:
            basis.subtract(z, op.shard_sum(basis.project(z)))  # z - Q Q^T z in place: no temporary vector
            return z

        samples = _probe_samples(
            op,
            remainder_probes,
            tol,
            generator,
            distribution,
            project=project,
            shift=exact_part,
            blocks=blocks,
            rows=rows,
        )
        if rows is not None and exact_rows:
            rows = [row + np.sum(exact_rows, axis=0) for row in rows]
    estimate, stderr = _mean_and_stderr(samples)
    result = TraceResult(estimate=estimate, stderr=stderr, n_hvp=op.n_hvp - start, method=method, samples=samples)
    if rows:
        table = np.asarray(rows, dtype=np.float64)
        result.block_estimates = table.mean(axis=0)
        result.block_stderr = (table.std(axis=0, ddof=1) / math.sqrt(table.shape[0]) if table.shape[0] >= 2
                               else np.full(table.shape[1], math.nan))
    return result


def _check_blocks(op: CurvatureOperator, blocks: Sequence[int] | None) -> list[int] | None:
    if blocks is None:
        return None
    if getattr(op, "sharded", False):
        raise UsageError("blocks need an operator over whole vectors, not sharded ones")
    sizes = [check_number("blocks[i]", size, low=1, integer=True, what="a positive int") for size in blocks]
    if sum(sizes) != op.num_params:
        raise UsageError(f"blocks must sum to the operator's {op.num_params} parameters, got {sum(sizes)}")
    return sizes


def _choose(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def _hutchinson_probes(n_hvp: int | None, n_probes: int | None) -> int:
    if n_hvp is not None and n_probes is not None:
        raise UsageError("give either n_hvp (the total budget) or n_probes, not both")
    if n_probes is not None:
        return check_count("n_probes", n_probes)
    return check_count("n_hvp", DEFAULT_N_HVP if n_hvp is None else n_hvp)


def _hutchpp_split(op: CurvatureOperator, n_hvp: int | None, n_probes: int | None,
                   max_sketch: int) -> tuple[int, int]:
    """(sketch vectors, remainder probes): thirds of the budget, the sketch capped at the dimension and at
    ``max_sketch`` (the products it leaves become remainder probes)."""
    if n_hvp is not None and n_probes is not None:
        raise UsageError("give either n_hvp (the total budget) or n_probes, not both")
    if n_probes is not None:
        n_probes = check_count("n_probes", n_probes)
        return min(n_probes, op.total_params, max_sketch), n_probes
    budget = DEFAULT_N_HVP if n_hvp is None else n_hvp
    budget = check_count("n_hvp", budget)
    if budget < 3:
        raise UsageError(
            f"Hutch++ needs n_hvp >= 3 (a third each for the sketch, its exact trace and the remainder probes), "
            f"got {budget}; use method='hutchinson' for a smaller budget"
        )
    sketch_size = min(budget // 3, op.total_params, max_sketch)
    return sketch_size, budget - 2 * sketch_size


def _range_sketch(
    op: CurvatureOperator, size: int, generator: torch.Generator, distribution: str, seed: int
) -> _Rows:
    """An orthonormal basis ``Q`` (``size`` rows of length num_params) of ``range(H S)`` for ``size`` random
    vectors ``S``.

    Each column of ``H S`` is orthogonalised against the rows kept so far as soon as it is computed (block
    Gram-Schmidt, the Lanczos basis's), so only the basis and one product are held. A column that lies in the span
    of the others (``H`` of rank below ``size``) is replaced by a random direction orthogonal to them: Hutch++ is
    unbiased for any ``Q``, and the trace on the span is still exact.
    """
    basis = _KrylovBasis(op, size, torch.Generator().manual_seed(check_seed(seed)), refill=False)
    for _ in range(size):
        basis.add_start_vectors([op.matvec(random_probe(op, generator, distribution))])  # checked by matvec
    return basis.V


def _quadratic_form(op: CurvatureOperator, vector: torch.Tensor, blocks: list[int] | None = None,
                    rows: list[np.ndarray] | None = None) -> float:
    """``v^T H v``; with ``blocks``, its split over the slices, ``v_b^T (H v)_b``, appended to ``rows``."""
    product = op.matvec(vector)
    value = op.dot(vector, product)
    if not math.isfinite(value):
        raise NonFiniteError("a Hessian-vector product came out NaN or infinite: the loss is not finite here")
    if blocks is not None and rows is not None:
        split = torch.stack([part.sum() for part in (vector * product).split(blocks)])
        rows.append(split.detach().to("cpu", torch.float64).numpy())
    return value


def _probe_samples(
    op: CurvatureOperator,
    n_probes: int,
    tol: float | None,
    generator: torch.Generator,
    distribution: str,
    project: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
    shift: float = 0.0,
    blocks: list[int] | None = None,
    rows: list[np.ndarray] | None = None,
) -> np.ndarray:
    """``shift + z^T H z`` for up to ``n_probes`` (projected) probes, stopping early once ``tol`` is met."""
    samples: list[float] = []
    for _ in range(n_probes):
        probe = project(random_probe(op, generator, distribution))
        samples.append(shift + _quadratic_form(op, probe, blocks, rows))
        if tol is not None and len(samples) >= _MIN_PROBES_BEFORE_STOPPING:
            estimate, stderr = _mean_and_stderr(samples)
            if stderr <= tol * abs(estimate):
                break
    return np.asarray(samples, dtype=np.float64)


def _mean_and_stderr(samples: np.ndarray | list[float]) -> tuple[float, float]:
    values = np.asarray(samples, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))
