"""The operator interface every curvature matrix implements, and a dense matrix wrapped as one."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class CurvatureOperator(ABC):
    """A symmetric linear operator on flat parameter-space vectors.

    Subclasses implement :meth:`_matvec`; the base validates input, counts products in :attr:`n_hvp` and offers
    ``op @ v`` on a vector or on a matrix of column vectors.

    Attributes:
        num_params: the dimension ``n`` of the space the operator acts on.
        device, dtype: where and in which precision the operator computes (inputs are moved there).
    """

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

    @abstractmethod
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for a flat vector ``v`` already on the operator's device and dtype."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector of length :attr:`num_params`."""
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        if v.dim() != 1 or v.numel() != self.num_params:
            raise ValueError(f"expected a flat vector of length {self.num_params}, got shape {tuple(v.shape)}")
        out = self._matvec(v.to(device=self.device, dtype=self.dtype))
        self._n_hvp += 1
        return out

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
