"""Extreme eigenvalues of a curvature operator: thick-restart (block) Lanczos and a power-iteration baseline.

Everything here talks to the operator only through products ``A v``. The Krylov basis is bounded (thick restart;
on large models by default ``max(2 k + 2, 12)`` vectors), allocated in slabs as it grows and kept on the
operator's device or the CPU; only the small projected matrix (at most ``max_basis`` square) is eigendecomposed on the CPU in float64. See
docs/api/eigenvalues.md ("Memory") for the reasoning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np
import scipy.linalg
import torch

from optdiag.curvature._checks import check_count, check_operator, check_seed
from optdiag.curvature.base import CurvatureOperator, vectors_that_fit
from optdiag.errors import UsageError

__all__ = ["EigenResult", "top_eigenvalues", "power_iteration", "lanczos_tridiagonal"]

_WHICH = ("LA", "SA", "LM")
# Kahan-Parlett "twice is enough" (the DGKS test): a Gram-Schmidt pass that keeps less than 1/sqrt(2) of the vector's
# norm means cancellation ate it, and the pass is repeated; if it keeps shrinking the vector lies in the span.
_TWICE_IS_ENOUGH = 0.717
_MAX_ORTHOGONALISATION_PASSES = 4
# The basis is stored in at most this many slabs (one matrix product per slab and pass), allocated as it grows.
_SLABS = 4
# A thick restart and the final Ritz vectors rotate the basis in place, a chunk of about this many elements at a time.
_COMBINE_CHUNK_ELEMENTS = 1 << 22
# Default basis (see _default_max_basis and docs/api/eigenvalues.md, "Memory"): as many vectors as fit in
# VECTOR_MEMORY_BYTES, at least max(2 k + _BASIS_EXTRA, _MIN_BASIS) and at most 3 k + 20 (or 60).
_BASIS_EXTRA = 2
# 8, not 12: where memory binds (above ~8M float32 parameters) a one-eigenvalue solve then holds 4 copies of the
# parameters less (what keeps a training snapshot of a ResNet-18 within 20x), for up to 1.5x the products of a
# lambda_min and the same accuracy (docs/performance.md section 8); top-5 keeps 2 k + 2 = 12.
_MIN_BASIS = 8

# A random share of 10x the tolerance in a warm start keeps a wrong start's residual well above the convergence
# test (see _warm_starts) while costing little; capped where a start would stop being warm at all.
_WARM_START_MIX_PER_TOL = 10.0
_WARM_START_MIX_MAX = 0.3


@dataclass
class EigenResult:
    """Eigenpairs estimated from products with a symmetric operator (like the output of scipy's ``eigsh``).

    Attributes:
        eigenvalues: 1-D CPU tensor of length ``k`` in the operator's dtype; ``"LA"`` descending, ``"SA"``
            ascending, ``"LM"`` by descending magnitude.
        eigenvectors: ``(k, num_params)`` tensor on the operator's device, one unit-norm eigenvector per row.
        residuals: 1-D CPU tensor of length ``k``: the absolute residual norm ``|A u - lambda u|`` of each pair.
        converged: whether every residual is at most ``tol * scale``.
        n_hvp: operator products spent by the call that produced this result.
        which: the part of the spectrum asked for (``"LA"``, ``"SA"`` or ``"LM"``).
        scale: the spectral scale the relative tolerance was measured against (the largest Ritz value magnitude).
        basis_rows: the most basis vectors (of length ``num_params``) the call held at once, at most ``max_basis``
            (the returned eigenvectors are allocated after the basis is cut to its first ``k`` rows); 0 for power
            iteration.

    Example:
        >>> from optdiag.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> res = top_eigenvalues(op, k=1)
        >>> round(res.eigenvalues.item(), 6), res.converged
        (3.0, True)
        >>> top_eigenvalues(op, k=1, v0=res).n_hvp <= res.n_hvp  # warm start from the previous eigenvectors
        True
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    n_hvp: int
    which: str
    scale: float
    basis_rows: int = 0

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.eigenvalues.numel())

    def to_dict(self) -> dict[str, Any]:
        """Plain Python numbers (no eigenvectors), ready for JSON."""
        return {
            "eigenvalues": [float(x) for x in self.eigenvalues.tolist()],
            "residuals": [float(x) for x in self.residuals.tolist()],
            "converged": bool(self.converged),
            "n_hvp": int(self.n_hvp),
            "which": self.which,
            "scale": float(self.scale),
        }


StartVector = Union[torch.Tensor, EigenResult, None]


class _Rows:
    """The basis vectors, stored as rows of a few fixed-size slabs allocated as the basis grows.

    No slab is allocated before a row in it is needed, so a call that converges early never touches the memory a
    full basis would take, and rows are never copied to grow the storage (which would briefly hold both copies).
    Projections run one matrix product per slab (at most ``_SLABS`` of them).
    """

    def __init__(self, n: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.n, self.capacity, self.device, self.dtype = n, capacity, device, dtype
        self.slab_rows = max(1, -(-capacity // _SLABS))
        self.slabs: list[torch.Tensor] = []
        self.count = 0  # rows in use
        self.peak_rows = 0  # the most rows allocated at once

    def _spans(self, count: int) -> list[tuple[torch.Tensor, int, int]]:
        """``(slab, first row index, rows used)`` for the slabs covering the first ``count`` rows."""
        spans, first = [], 0
        for slab in self.slabs:
            if first >= count:
                break
            used = min(slab.shape[0], count - first)
            spans.append((slab, first, used))
            first += used
        return spans

    def __getitem__(self, index: int) -> torch.Tensor:
        slab = self.slabs[index // self.slab_rows]
        return slab[index % self.slab_rows]

    def append(self, w: torch.Tensor, norm: float) -> None:
        if self.count == sum(slab.shape[0] for slab in self.slabs):
            rows = min(self.slab_rows, self.capacity - self.count)
            self.slabs.append(torch.empty(rows, self.n, device=self.device, dtype=self.dtype))
            self.peak_rows = max(self.peak_rows, self.count + rows)
        torch.div(w, norm, out=self[self.count])
        self.count += 1

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """``V w`` over the rows in use."""
        return torch.cat([slab[:used] @ w for slab, _, used in self._spans(self.count)])

    def subtract(self, w: torch.Tensor, h: torch.Tensor) -> None:
        """``w -= V^T h`` in place (no temporary of the vector's size)."""
        for slab, first, used in self._spans(self.count):
            w.addmv_(slab[:used].T, h[first : first + used], alpha=-1.0)

    def combine(self, coefficients: np.ndarray) -> None:
        """Replace the rows in use by ``coefficients @ rows`` in place, one chunk of columns at a time.

        ``coefficients`` has shape ``(new_count, count)`` with ``new_count <= count``; only a chunk of
        ``count`` x ``chunk`` elements is held besides the basis (a restart or the final Ritz vectors never need a
        second basis).
        """
        new_count = coefficients.shape[0]
        c = torch.as_tensor(coefficients, dtype=self.dtype).to(self.device)
        spans = self._spans(self.count)
        targets = self._spans(new_count)
        chunk = max(1024, _COMBINE_CHUNK_ELEMENTS // max(self.count, 1))
        for start in range(0, self.n, chunk):
            stop = min(start + chunk, self.n)
            y = None
            for slab, first, used in spans:  # slab by slab: no copy of the chunk's rows into one matrix
                if y is None:
                    y = c[:, first : first + used] @ slab[:used, start:stop]
                else:
                    y.addmm_(c[:, first : first + used], slab[:used, start:stop])
            for slab, first, used in targets:
                slab[:used, start:stop] = y[first : first + used]
        self.count = new_count

    def release(self) -> None:
        """Free the slabs that hold no row in use."""
        while self.slabs and sum(slab.shape[0] for slab in self.slabs[:-1]) >= self.count:
            self.slabs.pop()

    def matrix(self) -> torch.Tensor:
        """The rows in use as one ``(count, n)`` tensor (a copy)."""
        return torch.cat([slab[:used] for slab, _, used in self._spans(self.count)])


class _Window:
    """The last ``size`` basis vectors only, as rows of one ``(size, n)`` tensor: row ``i`` lives in slot
    ``i % size``, so appending beyond ``size`` rows overwrites the oldest (local reorthogonalisation, for the
    density; the same interface as :class:`_Rows` for :meth:`_KrylovBasis._orthogonalise`)."""

    def __init__(self, n: int, size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows = torch.empty(size, n, device=device, dtype=dtype)
        self.size, self.appended = size, 0
        self.peak_rows = size

    @property
    def count(self) -> int:
        """Rows in use (the last ``size`` appended at most)."""
        return min(self.appended, self.size)

    def slot(self, index: int) -> int:
        return index % self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index % self.size]

    def append(self, w: torch.Tensor, norm: float) -> None:
        torch.div(w, norm, out=self[self.appended])
        self.appended += 1

    def project(self, w: torch.Tensor) -> torch.Tensor:
        return self.rows[: self.count] @ w

    def subtract(self, w: torch.Tensor, h: torch.Tensor) -> None:
        w.addmv_(self.rows[: self.count].T, h, alpha=-1.0)


class _KrylovBasis:
    """An orthonormal basis ``V`` with the projection ``S = V A V^T`` of the operator onto it.

    Rows ``[0, n_processed)`` have been multiplied by the operator, so the columns ``S[:, :n_processed]`` are
    known exactly: ``A v_l = sum_i S[i, l] v_i`` over all ``n_basis`` rows. Rows ``[n_processed, n_basis)`` are
    pending (the next block to multiply). Single-vector Lanczos is the block size 1 case, for which ``S`` stays
    tridiagonal until a thick restart replaces the processed rows by Ritz vectors (arrowhead form).

    The rows live on ``device`` (the operator's, or the CPU to spare an accelerator's memory); each product's
    vector travels to the operator and back.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        capacity: int,
        generator: torch.Generator,
        refill: bool,
        device: torch.device | None = None,
    ) -> None:
        self.op = op
        self.n = op.num_params
        self.capacity = capacity
        self.generator = generator
        self.refill = refill  # on an invariant subspace: continue with a fresh random vector (True) or stop
        self.device = op.device if device is None else device
        self.V = _Rows(self.n, capacity, self.device, op.dtype)
        self.S = np.zeros((capacity, capacity))
        self.n_processed = 0
        self.tridiagonal = True
        self.operator_norm = 0.0  # largest |A v| seen: the scale below which a remainder is rounding noise
        self.eps = float(torch.finfo(op.dtype).eps)

    @property
    def n_basis(self) -> int:
        return self.V.count

    @property
    def n_pending(self) -> int:
        return self.n_basis - self.n_processed

    def random_vector(self) -> torch.Tensor:
        # Drawn on the CPU from the call's own generator: deterministic and the global RNG is never touched.
        return torch.randn(self.n, generator=self.generator, dtype=torch.float64).to(self.device, self.op.dtype)

    def _orthogonalise(
        self, w: torch.Tensor, norm: float, reference: float, subtracted: np.ndarray | None = None,
        pending: tuple[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, float]:
        """Project the basis out of ``w`` (norm ``norm``) in place by block classical Gram-Schmidt, repeated only
        while a pass cancels (the Daniel-Gragg-Kaufman-Stewart criterion).

        Each pass is two matrix products with the basis (``h = V w``, ``w -= V^T h``); its coefficients and the
        remainder's norm come back to the host in one transfer. Kahan-Parlett "twice is enough": a pass that kept
        at least ``0.717`` (about ``1/sqrt(2)``) of the norm it was given leaves a remainder orthogonal to the basis
        at rounding level, so no further pass runs; one that kept less lost its orthogonality to cancellation and
        is repeated, at most ``_MAX_ORTHOGONALISATION_PASSES`` passes in all (docs/performance.md, section 5,
        "Lanczos overhead per product", measures how often a second pass runs).

        ``subtracted``: coefficients on the first rows already subtracted from ``w`` (by
        :meth:`_subtract_local`; ``norm`` is then the norm before them), counted in the returned coefficients.
        ``pending``: ``(row, c)``, one more such coefficient still on the device (a one-element tensor), which comes
        back with the first pass's transfer instead of a transfer of its own.

        Returns the remainder, the accumulated coefficients on the basis rows (float64) and the remainder's norm,
        which is 0.0 when ``w`` lies numerically in the span of the basis (its remainder is rounding noise, below
        ``100 * eps * reference``, or it still shrank in the last pass).
        """
        count = self.n_basis
        coefficients = np.zeros(count)
        if subtracted is not None:
            coefficients[: subtracted.size] += subtracted
        threshold = 100.0 * self.eps * reference
        if norm <= threshold or count == 0:
            if pending is not None:
                coefficients[pending[0]] += float(pending[1])
            return w, coefficients, (0.0 if norm <= threshold else norm)
        for _ in range(_MAX_ORTHOGONALISATION_PASSES):
            h = self.op.shard_sum(self.V.project(w))  # sharded vectors: each rank holds part of every dot
            self.V.subtract(w, h)
            parts = [h, self.op.vector_norm(w).reshape(1)]
            if pending is not None:
                parts.append(pending[1].reshape(1).to(h.dtype))
            values = torch.cat(parts).double().cpu().numpy()  # the pass's one transfer to the host
            if pending is not None:
                coefficients[pending[0]] += values[-1]
                values, pending = values[:-1], None
            coefficients += values[:count]
            norm = float(values[-1])
            if not math.isfinite(norm):  # finite entries whose squares overflow the dtype
                norm = float(self.op.finite_norms(w, "a Lanczos vector")[0])
            before = math.hypot(norm, float(np.linalg.norm(values[:count])))  # |w| the pass was given
            if norm <= threshold:
                return w, coefficients, 0.0
            if norm >= _TWICE_IS_ENOUGH * before:
                return w, coefficients, norm
        return w, coefficients, 0.0

    def _checked_product(self, row: int) -> tuple[torch.Tensor, float]:
        """``A v_row`` on the basis device and its norm (the operator's one finiteness check of the product)."""
        product, norm = self.op.matvec_and_norm(self.V[row])
        return product.to(self.device), norm

    def add_random_vector(self) -> bool:
        """Append a random unit vector orthogonal to the basis; False when the basis already spans the space."""
        if self.n_basis >= min(self.op.total_params, self.capacity):
            return False
        for _ in range(3):
            w = self.random_vector()
            length = float(self.op.vector_norm(w))
            w, _, norm = self._orthogonalise(w, length, length)
            if norm > 0.0:
                self.V.append(w, norm)
                return True
        return False

    def add_start_vectors(self, vectors: list[torch.Tensor]) -> None:
        """Append start vectors as pending rows; dependent or zero ones are replaced by random vectors."""
        for vector in vectors:
            w = vector.to(self.device, self.op.dtype).clone()
            length = float(self.op.vector_norm(w))
            w, _, norm = self._orthogonalise(w, length, length)
            if norm > 0.0 and self.n_basis < self.capacity:
                self.V.append(w, norm)
            else:
                self.add_random_vector()

    def _subtract_local(self, product: torch.Tensor, column: int) -> tuple[np.ndarray, torch.Tensor]:
        """Subtract from ``A v_column`` in place its large components, on the rows known to carry them, before
        Gram-Schmidt sees it; returns the coefficients subtracted (on rows ``0..column``).

        By symmetry the components on the processed rows were measured by their own products
        (``v_i . A v_column = S[i, column]``, nonzero only for the previous row in plain Lanczos, or the kept Ritz
        vectors after a restart), and the one on ``v_column`` is its Rayleigh quotient (one dot product). What is
        left is about ``beta`` in size, so the Gram-Schmidt pass that follows only mops up rounding and rarely
        cancels: "twice is enough" with the first pass on one or a few rows (docs/performance.md, section 5).
        The Rayleigh quotient stays on the device (returned as a one-element tensor, its entry in the coefficients
        left 0): Gram-Schmidt's transfer brings it to the host, so a product costs no synchronisation of its own.
        """
        coefficients = self.S[: column + 1, column].copy()
        coefficients[column] = 0.0
        for row in np.flatnonzero(coefficients[:column]):
            product.add_(self.V[int(row)], alpha=-float(coefficients[row]))
        row = self.V[column]
        rayleigh = self.op.shard_sum(torch.dot(row.reshape(-1), product.reshape(-1)).reshape(1))
        product.addcmul_(row, rayleigh.to(product.dtype), value=-1.0)
        return coefficients, rayleigh

    def expand(self, count: int) -> None:
        """Multiply the next ``count`` pending rows by the operator and append what is new as pending rows.

        One product at a time (each is orthogonalised and appended before the next is computed), so at most one
        product is held besides the basis.
        """
        first = self.n_processed
        for column in range(first, first + count):
            product, norm = self._checked_product(column)
            self.operator_norm = max(self.operator_norm, norm)
            self.n_processed = column + 1
            subtracted, rayleigh = self._subtract_local(product, column)
            w, known, norm = self._orthogonalise(product, norm, self.operator_norm, subtracted, (column, rayleigh))
            self.S[: known.size, column] = known
            self.S[column, : known.size] = known  # A is symmetric: mirror what the product measured
            if self.n_basis >= min(self.op.total_params, self.capacity):
                continue  # the basis spans the whole space; the remainder is rounding noise
            if norm > 0.0:
                self.S[self.n_basis, column] = self.S[column, self.n_basis] = norm
                self.V.append(w, norm)
            elif self.refill:
                # Invariant subspace (beta ~ 0): continue, decoupled, in a random direction not yet explored.
                self.add_random_vector()

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors of the processed projection, in float64."""
        m = self.n_processed
        if self.tridiagonal:
            diagonal = np.diag(self.S[:m, :m]).copy()
            if m == 1:
                return diagonal, np.ones((1, 1))
            return scipy.linalg.eigh_tridiagonal(diagonal, np.diag(self.S[:m, :m], -1).copy())
        return scipy.linalg.eigh(self.S[:m, :m])

    def residual_norms(self, vectors: np.ndarray) -> np.ndarray:
        """``|A y - theta y|`` of Ritz pairs from the Lanczos relation: the norm of their pending components."""
        coupling = self.S[self.n_processed : self.n_basis, : self.n_processed] @ vectors
        return np.linalg.norm(coupling, axis=0)

    def take_ritz_vectors(self, vectors: np.ndarray, device: torch.device) -> torch.Tensor:
        """The Ritz vectors ``vectors^T V`` as unit rows on ``device``; consumes the basis (rotated in place)."""
        coefficients = np.zeros((vectors.shape[1], self.n_basis))
        coefficients[:, : self.n_processed] = vectors.T
        self.V.combine(coefficients)
        self.V.release()
        self.n_processed = 0
        out = torch.empty(vectors.shape[1], self.n, device=device, dtype=self.op.dtype)
        tiny = torch.finfo(self.op.dtype).tiny
        for i in range(vectors.shape[1]):
            row = self.V[i]
            out[i].copy_(row.div_(self.op.vector_norm(row).clamp_min(tiny)))
        return out

    def restart(self, keep: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> None:
        """Thick restart in place: keep the Ritz vectors ``vectors[:, keep]`` and the pending rows, drop the rest."""
        z = vectors[:, keep]
        p, pending, m = z.shape[1], self.n_pending, self.n_processed
        coupling = self.S[m : self.n_basis, :m] @ z
        coefficients = np.zeros((p + pending, self.n_basis))
        coefficients[:p, :m] = z.T
        coefficients[p:, m:] = np.eye(pending)
        self.V.combine(coefficients)
        self.S[:] = 0.0
        self.S[:p, :p] = np.diag(values[keep])
        self.S[p : p + pending, :p] = coupling
        self.S[:p, p : p + pending] = coupling.T
        self.n_processed = p
        self.tridiagonal = False


def _wanted_order(values: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``values`` from most to least wanted."""
    if which == "LA":
        return np.argsort(-values, kind="stable")
    if which == "SA":
        return np.argsort(values, kind="stable")
    return np.argsort(-np.abs(values), kind="stable")


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not np.isfinite(tol) or tol <= 0:
        raise UsageError(f"tol must be a positive finite number (relative to the spectral scale), got {tol!r}")
    return float(tol)


def _start_rows(op: CurvatureOperator, v0: StartVector) -> torch.Tensor | None:
    """``v0`` as a validated ``(rows, num_params)`` matrix on the operator's device, or None for a random start."""
    if v0 is None:
        return None
    if isinstance(v0, EigenResult):
        rows = v0.eigenvectors
        source = "v0 (an EigenResult's eigenvectors)"
    elif isinstance(v0, torch.Tensor):
        rows = v0
        source = "v0"
    else:
        raise UsageError(f"v0 must be a tensor, an EigenResult or None, got {type(v0).__name__}")
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.dim() != 2 or rows.shape[1] != op.num_params or rows.shape[0] == 0:
        raise UsageError(
            f"{source} must hold vectors of length num_params={op.num_params}, got shape {tuple(rows.shape)}"
        )
    rows = rows.detach().to(op.device, op.dtype)
    if not torch.isfinite(rows).all():
        raise UsageError(f"{source} contains NaN or Inf")
    return rows


def _combine_rows(rows: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Sum the rows round-robin into ``count`` start vectors, so every row is in the starting Krylov space."""
    return [rows[slot::count].sum(dim=0) for slot in range(min(count, rows.shape[0]))]


def _warm_starts(rows: torch.Tensor, count: int, generator: torch.Generator, tol: float,
                 norm_of: Callable[[torch.Tensor], torch.Tensor] = torch.linalg.vector_norm) -> list[torch.Tensor]:
    """Warm-start vectors: the combined rows, each plus a share ``min(0.3, 10 tol)`` of a fresh random direction.

    A warm start comes from a nearby but different operator, where it may be (nearly) an eigenvector of the
    wrong eigenvalue, say an interior one after the spectrum moved. Alone it spans an (almost) invariant
    subspace, its Ritz residual is tiny and the convergence test would accept the wrong eigenvalue after one
    product. The random share makes the Krylov space reach the whole spectrum and keeps such a start's residual
    (about share x the spectrum's spread) above ``tol`` times the scale, so only the wanted extreme pairs can
    pass the residual test. The share is tied to ``tol`` because it costs products (on the synthetic spectrum of
    docs/theory.md section 7, k=5 at tol=1e-4: 10 products with share 1e-3, 90 with share 0.3, 119 cold).
    """
    mix = min(_WARM_START_MIX_MAX, _WARM_START_MIX_PER_TOL * tol)
    starts = []
    for vector in _combine_rows(rows, count):
        noise = torch.randn(vector.numel(), generator=generator, dtype=torch.float64).to(vector.device, vector.dtype)
        noise = noise / norm_of(noise)
        norm = norm_of(vector)
        direction = vector / norm if float(norm) > 0.0 else torch.zeros_like(vector)
        starts.append(direction + mix * noise)
    return starts


def _default_max_basis(k: int, block: int, num_params: int, itemsize: int) -> int:
    """The default basis size of :func:`top_eigenvalues`.

    As many vectors as fit in 256 MiB, but at least ``max(2 k + 2, 8, k + 4 block)`` (thick restarts keep about
    half of them) and at most ``max(3 k + 20, 60, k + 4 block)`` (past which restarts rarely happen), and never
    more than ``num_params``. Small models thus keep the large basis that converges in the fewest products; large
    ones get a bounded basis (ResNet-18, 11.2M float32 parameters, ``k = 5``: 12 vectors, 0.54 GB).

    Example:
        >>> _default_max_basis(5, 1, 11_200_000, 4), _default_max_basis(10, 1, 11_200_000, 4)
        (12, 22)
        >>> _default_max_basis(1, 1, 11_200_000, 4)  # one eigenvalue of a ResNet-18: the floor of 8
        8
        >>> _default_max_basis(5, 1, 100_000, 4), _default_max_basis(1, 1, 2_000_000, 4)
        (60, 33)
        >>> _default_max_basis(1, 1, 30, 4)  # never more vectors than dimensions
        30
    """
    floor = max(2 * k + _BASIS_EXTRA, _MIN_BASIS, k + 4 * block)
    ceiling = max(3 * k + 20, 60, k + 4 * block)
    fitting = vectors_that_fit(num_params, itemsize)
    return min(num_params, max(floor, min(ceiling, fitting)))


def _restart_keep(k: int, capacity: int, block: int) -> int:
    """How many Ritz vectors a thick restart keeps: the ``k`` wanted and half of the rest of the basis."""
    return max(k, min(capacity - 2 * block, k + (capacity - k) // 2))


def _check_basis_device(basis_device: Any, op: CurvatureOperator) -> torch.device:
    if basis_device is None:
        return op.device
    try:
        return torch.device(basis_device)
    except (TypeError, RuntimeError) as error:
        raise UsageError(
            f"basis_device must be None, a torch.device or a device string, got {basis_device!r}"
        ) from error


def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_hvp: int | None = None,
    v0: StartVector = None,
    *,
    seed: int = 0,
    block: int = 1,
    max_basis: int | None = None,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos with full reorthogonalisation.

    Each step multiplies ``block`` basis vectors by the operator, orthogonalises each product against the whole
    basis (its components that earlier products already measured and its Rayleigh quotient are subtracted first,
    then block classical Gram-Schmidt: matrix products with the basis, no loop over its vectors, repeated only
    while a pass cancels) and checks the Ritz residual estimates of the ``k``
    wanted pairs. It stops as soon as all of them satisfy ``|A u - theta u| <= tol * scale`` with
    ``scale = max |Ritz value|``, or when ``max_hvp`` products are spent. When the basis would exceed
    ``max_basis`` rows it restarts in place from the best Ritz vectors (thick restart), so any ``k`` and any
    budget fit in bounded memory; the basis is allocated as it grows, never at full size up front.
    An invariant subspace (a zero remainder: low rank, repeated eigenvalues, ``k`` close to ``num_params``)
    is continued in a fresh random direction orthogonal to the basis, never an exception.

    Args:
        op: the symmetric operator (e.g. ``HessianOperator``), used only through ``op.matvec``.
        k: number of eigenpairs, ``1 <= k <= op.num_params``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
        tol: relative tolerance: residual norms at most ``tol`` times the spectral scale. An eigenvalue error is
            at most its residual, and about ``residual**2 / gap`` once isolated from the rest of the spectrum.
        max_hvp: the most operator products to spend; default ``max(20 * k, 100)``. Must be at least ``k``.
        v0: a start vector of length ``num_params``, a matrix of start vectors (rows), or a previous
            ``EigenResult`` (warm start). With ``r`` rows the block size grows to ``min(r, k)``: each row (up to
            ``k``; further ones are summed in round-robin) starts its own block column, so a warm start from ``k``
            previous eigenvectors begins with their Rayleigh-Ritz pairs. Each warm-start vector gets a share
            ``min(0.3, 10 tol)`` of a seeded random direction, because a vector from an earlier operator can be an eigenvector of the
            wrong (interior) eigenvalue of this one and would otherwise "converge" at once. Default: one random
            vector; for ``"SA"`` the operator's product of one (one product more: a random vector's share of the
            null space would otherwise report the eigenvalue 0 as converged before a negative one is found).
        seed: seed of the private ``torch.Generator`` for random start and refill vectors (global RNG untouched).
        block: vectors multiplied per step (block Lanczos). A single-vector Krylov space holds one copy of a
            repeated eigenvalue per invariant subspace; use ``block`` >= the multiplicity you need resolved.
            Per product, ``block=1`` converges fastest on simple eigenvalues.
        max_basis: the most basis vectors held (memory ``max_basis * num_params`` elements); by default as many
            as fit in 256 MiB, at least ``max(2 k + 2, 12, k + 4 block)``, at most ``max(3 k + 20, 60, k + 4 block)``
            (and ``num_params``). Fewer vectors restart more often: less memory, more products on hard spectra.
        basis_device: where the basis lives (default: the operator's device). ``"cpu"`` keeps it in host memory
            when the operator is on an accelerator (each product's vector is copied there and back).

    Returns:
        EigenResult with ``k`` eigenpairs ordered as ``which`` asks, their residuals, ``converged`` and the
        products spent.

    Raises:
        ValueError (``UsageError``): bad ``k``, ``which``, ``tol``, ``max_hvp``, ``block``, ``max_basis``,
            ``basis_device`` or ``v0``.
        NonFiniteError: the operator returned NaN or Inf.

    Example:
        >>> from optdiag.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
        >>> res = top_eigenvalues(op, k=2, which="LA", tol=1e-8)
        >>> [round(x, 6) for x in res.eigenvalues.tolist()], res.converged
        ([100.0, 99.0], True)
        >>> round(top_eigenvalues(op, k=1, which="SA", tol=1e-8).eigenvalues.item(), 6)
        1.0
    """
    check_operator(op)
    n = op.total_params  # the whole dimension, the same on every rank when vectors are sharded
    k = check_count("k", k)
    if k > n:
        raise UsageError(f"k={k} eigenpairs asked of an operator with only num_params={n} dimensions (need k <= n)")
    if which not in _WHICH:
        raise UsageError(f"which must be one of {_WHICH} (largest, smallest algebraic, largest magnitude), got {which!r}")
    tol = _check_tol(tol)
    block = min(check_count("block", block), n)
    start_rows = _start_rows(op, v0)
    if start_rows is not None:
        # Warm start: each previous eigenvector seeds its own block column. Their sum as one vector would mix
        # nearby eigenvectors back together; as a block the first product already gives their Rayleigh-Ritz pairs.
        block = max(block, min(start_rows.shape[0], k, n))
    max_hvp = max(20 * k, 100) if max_hvp is None else check_count("max_hvp", max_hvp)
    if max_hvp < k:
        raise UsageError(f"max_hvp={max_hvp} is too small for k={k}: at least k operator products are needed")
    if max_basis is None:
        capacity = _default_max_basis(k, block, n, op.dtype.itemsize)
    else:
        capacity = min(check_count("max_basis", max_basis), n)
        if capacity < min(n, k + 2 * block):
            raise UsageError(
                f"max_basis={max_basis} is too small: it must hold k + 2 * block = {k + 2 * block} vectors "
                f"(or num_params={n})"
            )
    keep = _restart_keep(k, capacity, block)

    generator = torch.Generator().manual_seed(check_seed(seed))
    basis = _KrylovBasis(op, capacity, generator, refill=True, device=_check_basis_device(basis_device, op))
    basis.tridiagonal = block == 1  # blocks couple each vector to up to 2 * block neighbours
    hvp_before = op.n_hvp
    if start_rows is not None:
        basis.add_start_vectors(_warm_starts(start_rows, block, generator, tol, op.vector_norm))
    elif which == "SA" and k < n:
        # A cold start's share of the null space (dead units, unused embeddings: often most of a network's
        # parameters) is an exact eigenvector of eigenvalue 0 with zero residual, so the smallest Ritz value
        # "converges" to 0 before the Krylov space has found a negative direction. Starting from the product of
        # random vectors keeps the basis in the range of the operator (docs/performance.md, section 5).
        basis.add_start_vectors([op.matvec(basis.random_vector().to(op.device)) for _ in range(block)])
    while basis.n_basis < block:
        basis.add_random_vector()
    values = vectors = None
    while True:
        if basis.n_processed >= k:
            values, vectors = basis.ritz()
            wanted = _wanted_order(values, which)[:k]
            residuals = basis.residual_norms(vectors[:, wanted])
            scale = max(float(np.abs(values).max()), np.finfo(np.float64).tiny)
            if np.all(residuals <= tol * scale):
                break
        budget = max_hvp - (op.n_hvp - hvp_before)
        if basis.n_pending == 0 or budget <= 0:
            break
        count = min(block, basis.n_pending, budget)
        if basis.n_basis + count > capacity and capacity < n:
            basis.restart(_wanted_order(values, which)[:keep], values, vectors)
        basis.expand(count)

    assert values is not None and vectors is not None  # max_hvp >= k and k <= n guarantee k processed rows
    return EigenResult(
        eigenvalues=torch.as_tensor(values[wanted], dtype=op.dtype),
        eigenvectors=basis.take_ritz_vectors(vectors[:, wanted], op.device),
        residuals=torch.as_tensor(residuals, dtype=op.dtype),
        converged=bool(np.all(residuals <= tol * scale)),
        n_hvp=op.n_hvp - hvp_before,
        which=which,
        scale=scale,
        basis_rows=basis.V.peak_rows,
    )


def power_iteration(
    op: CurvatureOperator,
    tol: float = 1e-3,
    max_hvp: int = 1000,
    v0: StartVector = None,
    seed: int = 0,
) -> EigenResult:
    """The eigenvalue of largest magnitude by power iteration: the plain baseline (docs/theory.md section 7).

    Each product ``A v`` gives the Rayleigh quotient ``theta = v . A v`` and its residual ``|A v - theta v|`` for
    free; it stops when the residual is at most ``tol * |theta|``. Convergence goes like
    ``(lambda_2 / lambda_1) ** (2 t)`` and it finds the largest ``|lambda|``, which may be negative; prefer
    :func:`top_eigenvalues`, which needs far fewer products.

    Args:
        op: the symmetric operator.
        tol: relative residual tolerance.
        max_hvp: the most operator products to spend.
        v0: a start vector, rows to combine, or a previous ``EigenResult``; default random.
        seed: seed of the private generator for the random start.

    Returns:
        EigenResult with ``k = 1`` and ``which = "LM"``.

    Example:
        >>> from optdiag.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)))
        >>> round(power_iteration(op, tol=1e-10).eigenvalues.item(), 6)
        -4.0
    """
    check_operator(op, sharded=False)
    tol = _check_tol(tol)
    max_hvp = check_count("max_hvp", max_hvp)
    generator = torch.Generator().manual_seed(check_seed(seed))
    rows = _start_rows(op, v0)
    starts = [] if rows is None else _combine_rows(rows, 1)
    if starts and float(torch.linalg.vector_norm(starts[0])) > 0.0:
        v = starts[0]  # exactly the given start: the baseline follows its textbook closed form
    else:
        v = torch.randn(op.num_params, generator=generator, dtype=torch.float64).to(op.device, op.dtype)
    v = v / torch.linalg.vector_norm(v)
    hvp_before = op.n_hvp
    while True:
        av, norm = op.matvec_and_norm(v)
        theta = float(v @ av)
        residual = float(torch.linalg.vector_norm(av - theta * v))
        scale = max(abs(theta), np.finfo(np.float64).tiny)
        converged = residual <= tol * scale
        if converged or op.n_hvp - hvp_before >= max_hvp or norm == 0.0:
            break
        v = av / norm
    return EigenResult(
        eigenvalues=torch.tensor([theta], dtype=op.dtype),
        eigenvectors=v.unsqueeze(0),
        residuals=torch.tensor([residual], dtype=op.dtype),
        converged=converged,
        n_hvp=op.n_hvp - hvp_before,
        which="LM",
        scale=scale,
    )


def lanczos_tridiagonal(
    op: CurvatureOperator,
    start: torch.Tensor,
    num_steps: int,
    *,
    return_basis: bool = True,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """Plain Lanczos from ``start``: the tridiagonal ``T = V A V^T`` and the basis ``V`` (for quadrature).

    Full reorthogonalisation as in :func:`top_eigenvalues`. Stops early, without error, when the Krylov space
    becomes invariant (then the Ritz values of ``T`` are exact eigenvalues and the quadrature is exact).

    Args:
        op: the symmetric operator.
        start: a nonzero start vector of length ``num_params`` (normalised here).
        num_steps: the most products (Lanczos steps) to take.
        return_basis: whether to return the basis; quadrature needs only ``T``, and the returned basis is a copy
            (``m`` more vectors held at once, besides the ones reorthogonalised against).
        window: hold only the last ``window`` (at least 2) basis vectors and reorthogonalise each product
            against them alone (local reorthogonalisation: memory ``window`` vectors instead of
            ``num_steps + 1``). The basis then loses orthogonality as Ritz values converge, and ``T`` gains
            spurious copies of them, but its quadrature stays that of a nearby matrix (Greenbaum 1989), which is
            what the density needs; see docs/performance.md, section 8, for its measured cost in accuracy. Not
            together with ``return_basis``. ``None`` (default) or ``window > num_steps``: full
            reorthogonalisation.

    Returns:
        ``(alphas, betas, basis)``: the diagonal (length ``m <= num_steps``) and off-diagonal (length ``m - 1``)
        of ``T`` as float64 numpy arrays, and the ``(m, num_params)`` orthonormal basis on the operator's device
        (None with ``return_basis=False``).

    Example:
        >>> from optdiag.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> alphas, betas, basis = lanczos_tridiagonal(op, torch.ones(3, dtype=torch.float64), 5)
        >>> len(alphas), sorted(round(float(x), 6) for x in scipy.linalg.eigh_tridiagonal(alphas, betas)[0])
        (3, [1.0, 2.0, 3.0])
    """
    check_operator(op, sharded=False)
    num_steps = check_count("num_steps", num_steps)
    if not isinstance(start, torch.Tensor) or start.dim() != 1 or start.numel() != op.num_params:
        raise UsageError(f"start must be a flat tensor of length num_params={op.num_params}")
    if not torch.isfinite(start).all() or float(torch.linalg.vector_norm(start)) == 0.0:
        raise UsageError("start must be a finite, nonzero vector")
    capacity = min(op.num_params, num_steps + 1)
    if window is not None:
        window = check_count("window", window, minimum=2)
        if window < capacity:
            if return_basis:
                raise UsageError("a window of the last vectors cannot return the whole basis: give "
                                 "return_basis=False")
            return (*_windowed_tridiagonal(op, start, num_steps, window), None)
    basis = _KrylovBasis(op, capacity, torch.Generator().manual_seed(0), refill=False)
    basis.add_start_vectors([start])
    while basis.n_pending and basis.n_processed < num_steps:
        basis.expand(1)
    m = basis.n_processed
    alphas = np.diag(basis.S[:m, :m]).copy()
    betas = np.diag(basis.S[:m, :m], -1).copy()
    basis.V.count = m  # drop the pending row
    return alphas, betas, basis.V.matrix() if return_basis else None


def _windowed_tridiagonal(
    op: CurvatureOperator, start: torch.Tensor, num_steps: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos reorthogonalised against the last ``window`` vectors only (see :func:`lanczos_tridiagonal`)."""
    basis = _KrylovBasis(op, window, torch.Generator().manual_seed(0), refill=False)
    basis.V = _Window(op.num_params, window, basis.device, op.dtype)  # type: ignore[assignment]
    basis.add_start_vectors([start])
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(num_steps):
        product, norm = basis._checked_product(step)
        basis.operator_norm = max(basis.operator_norm, norm)
        w, known, norm = basis._orthogonalise(product, norm, basis.operator_norm)
        alphas.append(float(known[basis.V.slot(step)]))
        if norm == 0.0 or step + 1 == num_steps:
            break  # an invariant subspace: T's Ritz values are exact eigenvalues
        betas.append(norm)
        basis.V.append(w, norm)
    return np.asarray(alphas), np.asarray(betas)
