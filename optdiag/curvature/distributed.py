"""The sample-weighted mean of curvature operators, over local batches and across ``torch.distributed`` ranks.

Under data parallelism every rank holds its own probe batches. The Hessian of the union of all of them is
``H = sum_r sum_i n_ri H_ri / sum_r sum_i n_ri``: each rank forms its local weighted sum, one ``all_reduce`` adds
them up, and every rank gets the same product. Iterative methods (Lanczos, Hutchinson with the same seed) then
take identical branches on every rank, so their collectives always match.

Under fully sharded data parallelism (FSDP) the operators are sharded themselves
(:class:`~optdiag.curvature.operator.FiniteDifferenceOperator` on ``DTensor`` parameters): each product is already
the Hessian of the union of the ranks' batch ``i``, on this rank's part of the vector (FSDP's own gradient reduction
did the sum over ranks). The mean then only weights the batches, and it is the dot products and norms of vectors that
are summed over ranks (``shard_sum``), never the products.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from optdiag.curvature.base import CurvatureOperator
from optdiag.errors import OptDiagError


def _distributed(group: object | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def reduce_sum(tensor: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group`` (the input itself when not distributed).

    Every rank must call it (a collective). CPU tensors go through gloo as they are; with nccl the sum runs on the
    tensor's CUDA device.

    Example:
        >>> reduce_sum(torch.tensor([2.0])).tolist()  # one process
        [2.0]
    """
    if not _distributed(group):
        return tensor
    device = torch.device("cpu") if dist.get_backend(group) == "gloo" else tensor.device
    if device.type == "cpu" and dist.get_backend(group) != "gloo":
        device = torch.device("cuda", torch.cuda.current_device())
    reduced = tensor.detach().clone().to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced.to(tensor.device)


class ReducedMeanOperator(CurvatureOperator):
    """``sum_i w_i A_i / sum_i w_i`` over local operators ``A_i`` and, when initialised, all ranks.

    Without ``torch.distributed`` (or with one process) it is the weighted mean of the local operators. Every rank
    must construct it and call :meth:`matvec` / :meth:`reduce_sum` the same number of times (collectives).

    If a local product fails with an optdiag error (NaN, not twice differentiable) the rank contributes NaN
    instead of raising, so the other ranks are not left waiting in the ``all_reduce``; then every rank raises
    :class:`~optdiag.errors.NonFiniteError` together.

    **Sharded operators** (all of them :attr:`~optdiag.curvature.base.CurvatureOperator.sharded`; see the module
    docstring): every rank holds one operator per batch index, the same number on every rank; the weight of batch
    ``i`` is summed over ranks (the size of the union batch), products are weighted locally and not reduced,
    :meth:`reduce_sum` is the identity (the values are already those of the union) and :meth:`shard_sum` sums
    dot products over ranks.

    Args:
        operators: the local operators (same ``num_params``, device and dtype); may be empty on a rank without data.
        weights: one non-negative weight per operator, normally its number of samples.
        num_params, device, dtype: needed when ``operators`` is empty; otherwise taken from the first operator.
        group: the process group (default: the world).

    Attributes:
        total_weight: the sum of all weights over all ranks.

    Example:
        >>> from optdiag.curvature.base import MatrixOperator
        >>> a, b = MatrixOperator(torch.eye(2)), MatrixOperator(3 * torch.eye(2))
        >>> (ReducedMeanOperator([a, b], [1.0, 3.0]) @ torch.ones(2)).tolist()
        [2.5, 2.5]
    """

    def __init__(
        self,
        operators: Sequence[CurvatureOperator],
        weights: Sequence[float],
        *,
        num_params: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        group: object | None = None,
    ) -> None:
        operators, weights = list(operators), [float(w) for w in weights]
        if len(operators) != len(weights):
            raise ValueError(f"got {len(operators)} operators but {len(weights)} weights")
        if any(not isinstance(op, CurvatureOperator) for op in operators):
            raise TypeError("every operator must be a CurvatureOperator")
        if any(w < 0 for w in weights):
            raise ValueError(f"weights must be non-negative, got {weights}")
        if operators:
            first = operators[0]
            num_params, device, dtype = first.num_params, first.device, first.dtype
            if any(op.num_params != num_params for op in operators):
                raise ValueError("all operators must act on vectors of the same length")
        elif num_params is None or device is None or dtype is None:
            raise ValueError("with no local operators, give num_params, device and dtype")
        super().__init__(num_params, torch.device(device), dtype)
        self.sharded = bool(operators) and all(op.sharded for op in operators)
        self.operators, self.weights, self.group = operators, weights, group
        if self.sharded:
            self.weights = reduce_sum(torch.tensor(weights, dtype=torch.float64), group).tolist()
        self.total_weight = float(self.reduce_sum(torch.tensor([sum(self.weights)], dtype=torch.float64)))
        if not self.total_weight > 0:
            raise ValueError("the weights sum to zero over all ranks: there is no data")

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the operator's ranks (see :func:`reduce_sum`): the ranks' data added up. The
        identity for sharded operators, whose values are already those of every rank's data."""
        return tensor if self.sharded else reduce_sum(tensor, self.group)

    @property
    def total_params(self) -> int:
        return self.operators[0].total_params if self.sharded else self.num_params

    @property
    def shard_index(self) -> int:
        return self.operators[0].shard_index if self.sharded else 0

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.operators[0].shard_sum(tensor) if self.sharded else tensor

    def weighted_mean(self, local: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i t_i / total_weight`` over ranks, for one tensor per local operator (e.g. gradients)."""
        out = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
        for w, t in zip(self.weights, local):
            out.add_(t.to(self.device, self.dtype), alpha=w)
        return self.reduce_sum(out) / self.total_weight

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
        try:
            for w, op in zip(self.weights, self.operators):
                out.add_(op.matvec(v), alpha=w)
        except OptDiagError:
            if self.sharded:
                raise  # a sharded operator raises on every rank together
            out.fill_(float("nan"))  # take part in the collective anyway; every rank raises below
        # in place: no second vector beside the basis; a NaN from any rank raises on every rank in matvec's check
        return self.reduce_sum(out).div_(self.total_weight)
