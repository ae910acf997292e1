"""The operator interface every curvature matrix implements, and a dense matrix wrapped as one."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from optdiag.errors import NonFiniteError

VECTOR_MEMORY_BYTES = 256 * 2**20
"""The default memory for the vectors an estimator keeps besides its operator: the Lanczos basis, Hutch++'s sketch,
the density's reorthogonalisation window, a sharpness search's history. On a large model each of them would
otherwise hold tens of copies of the parameters (docs/performance.md, section 8)."""


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, from one reduction in the common case.

    A NaN or infinite entry makes the sum NaN or infinite, so a finite sum proves every entry finite without an
    elementwise pass or a mask of the tensor's size; only a non-finite sum (NaN/Inf, or finite entries whose sum
    overflows) is looked at elementwise.

    Example:
        >>> all_finite(torch.tensor([3e38, 3e38])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def vectors_that_fit(num_params: int, itemsize: int, memory: int = VECTOR_MEMORY_BYTES) -> int:
    """How many vectors of ``num_params`` elements of ``itemsize`` bytes fit in ``memory`` bytes (possibly 0).

    Example:
        >>> vectors_that_fit(11_200_000, 4), vectors_that_fit(1000, 8)
        (5, 33554)
    """
    return memory // max(1, num_params * itemsize)


class CurvatureOperator(ABC):
    """A symmetric linear operator on flat parameter-space vectors.

    Subclasses implement :meth:`_matvec`; the base validates input, counts products in :attr:`n_hvp` and offers
    ``op @ v`` on a vector or on a matrix of column vectors.

    **Sharded vectors.** An operator over parameters sharded across ranks (FSDP) acts on this rank's part of each
    vector only; every rank holds its part and no rank ever holds a whole vector. Dot products and norms are then
    sums over the ranks: solvers take them through :meth:`dot` and :meth:`vector_norm` (which reduce through
    :meth:`shard_sum`, a collective every rank joins), and :attr:`total_params` is the whole dimension. For every
    other operator these are the plain local operations.

    Attributes:
        num_params: the length of the (local part of the) vectors the operator acts on.
        total_params: the dimension of the whole space (``num_params`` unless the vectors are sharded).
        sharded: whether vectors are split across ranks (see above).
        device, dtype: where and in which precision the operator computes (inputs are moved there).
    """

    sharded = False

    def __init__(self, num_params: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_params = int(num_params)
        self.device = torch.device(device)
        self.dtype = dtype
        self._n_hvp = 0

    @property
    def n_hvp(self) -> int:
        """Number of matrix-vector products computed so far."""
        return self._n_hvp

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def total_params(self) -> int:
        """The dimension of the whole space: ``num_params`` summed over the ranks holding parts of the vectors."""
        return self.num_params

    @property
    def shard_index(self) -> int:
        """Which part of the vectors this rank holds (0 unless :attr:`sharded`): seeds random parts apart."""
        return 0

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A partial result (a local dot product, a squared norm) summed over the ranks that hold the other parts
        of the vectors: ``tensor`` itself unless :attr:`sharded`. A collective for sharded operators."""
        return tensor

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The dot product of two flat vectors of the operator's space, whole or sharded.

        Example:
            >>> MatrixOperator(torch.eye(2)).dot(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
            11.0
        """
        return float(self.shard_sum(torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)))

    def vector_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The Euclidean norm of a flat vector (or of each row of a matrix) of the operator's space, whole or
        sharded, as a tensor."""
        if not self.sharded:
            return torch.linalg.vector_norm(x, dim=-1)
        return self.shard_sum(torch.linalg.vector_norm(x, dim=-1).double().square()).sqrt().to(x.dtype)

    @abstractmethod
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for a flat vector ``v`` already on the operator's device and dtype."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector of length :attr:`num_params`.

        Raises:
            NonFiniteError: the product has a NaN or infinite entry (see :meth:`matvec_and_norm`).
        """
        return self.matvec_and_norm(v)[0]

    def matvec_and_norm(self, v: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``A v`` and its norm ``|A v|`` (over all ranks when :attr:`sharded`): every product's one finiteness
        check, whose norm a solver that needs it (Lanczos) takes from here instead of computing it again.

        Raises:
            NonFiniteError: the product has a NaN or infinite entry (on every rank together when sharded); it is
                not counted in :attr:`n_hvp`.

        Example:
            >>> product, norm = MatrixOperator(torch.diag(torch.tensor([3.0, 4.0]))).matvec_and_norm(torch.ones(2))
            >>> product.tolist(), norm
            ([3.0, 4.0], 5.0)
        """
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        if v.dim() != 1 or v.numel() != self.num_params:
            raise ValueError(f"expected a flat vector of length {self.num_params}, got shape {tuple(v.shape)}")
        out = self._matvec(v.to(device=self.device, dtype=self.dtype))
        norm = float(self.finite_norms(out, f"product {self._n_hvp + 1} of {type(self).__name__}").max())
        self._n_hvp += 1
        return out, norm

    def finite_norms(self, x: torch.Tensor, what: str = "a vector") -> torch.Tensor:
        """The norm of a flat vector, or of each row of a matrix (a 1-D float64 CPU tensor, one entry per row):
        finite, or :class:`~optdiag.errors.NonFiniteError` naming ``what``.

        A NaN or infinite entry makes its row's norm NaN or infinite, so a finite norm proves the row finite at the
        cost of the norm alone (no elementwise pass, no mask of the vector's size). Only an infinite norm is looked
        at elementwise, to tell NaN or Inf apart from finite entries whose squares overflow the dtype (a float32
        entry above about 1.8e19); those rows' norms are then taken in float64. Sharded: the norms and the verdict
        are summed over the ranks, so every rank agrees.

        Example:
            >>> op = MatrixOperator(torch.eye(2))
            >>> op.finite_norms(torch.tensor([[3e20, 4e20], [0.0, 1.0]])).tolist()  # 3e20 ** 2 overflows float32
            [5.000000100204387e+20, 1.0]
        """
        norms = self.vector_norm(x).double().reshape(-1).cpu()
        if bool(torch.isfinite(norms).all()):
            return norms
        bad = self.shard_sum(torch.tensor([0.0 if all_finite(x) else 1.0], dtype=torch.float64))
        if float(bad) > 0:
            raise NonFiniteError(f"{what} has NaN or Inf entries: the loss or the model is not finite at this point")
        return self.vector_norm(x.double()).reshape(-1).cpu()

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``A V`` for a matrix whose columns are vectors, shape ``(num_params, k)``."""
        if vectors.dim() != 2 or vectors.shape[0] != self.num_params:
            raise ValueError(f"expected shape ({self.num_params}, k), got {tuple(vectors.shape)}")
        return torch.stack([self.matvec(vectors[:, j]) for j in range(vectors.shape[1])], dim=1)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_dense(self) -> torch.Tensor:
        """The full matrix, one product per column: for small problems and tests only."""
        eye = torch.eye(self.num_params, device=self.device, dtype=self.dtype)
        dense = self.matmat(eye)
        return 0.5 * (dense + dense.T)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_params={self.num_params}, device={self.device}, dtype={self.dtype})"


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as a :class:`CurvatureOperator` (known spectra in tests, small problems).

    Example:
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0])))
        >>> (op @ torch.ones(3)).tolist()
        [3.0, 1.0, -2.0]
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        if not torch.allclose(matrix, matrix.T, rtol=1e-5, atol=1e-8 * float(matrix.abs().max().clamp_min(1))):
            raise ValueError("MatrixOperator needs a symmetric matrix")
        super().__init__(matrix.shape[0], matrix.device, matrix.dtype)
        self.matrix = matrix

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v
