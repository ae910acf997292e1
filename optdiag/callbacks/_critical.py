"""Glue for the forward-only critical sharpness in :class:`~optdiag.callbacks.HessianMonitor`.

The monitor keeps the parameters from before an optimizer step that ends in a scheduled snapshot, and the batch
the step was computed from (:class:`UpdateCapture`); the snapshot then looks along that step,
``u = theta_after - theta_before``, from ``theta_before`` on that batch with
:func:`~optdiag.curvature.critical.line_sharpness` (a handful of forwards, the losses reduced over the ranks, so the
loss is the one the step descended and every rank takes the same step sizes). On another batch (the probe set) the
slope along a minibatch step is as noisy as two minibatch gradients' alignment, and with it the critical step;
docs/critical-sharpness.md has the method and the measurements.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from optdiag.curvature.critical import line_sharpness
from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.params import flatten, local_part, trainable_parameters

__all__ = ["CRITICAL_KEYS", "UpdateCapture", "critical_snapshot"]

#: The snapshot keys the critical sharpness fills (None when not measured); ``critical_note`` says why not.
CRITICAL_KEYS = ("critical_sharpness", "critical_sharpness_ratio", "critical_lr", "critical_lr_ratio",
                 "directional_curvature", "directional_curvature_stderr", "n_forward", "critical_note")


class UpdateCapture:
    """The trainable parameters (one flat copy) from before one optimizer step, and the batch of that step.

    Attributes:
        batch: the batch the step was computed from (a reference, not a copy; the last micro-batch under gradient
            accumulation), or None.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> capture = UpdateCapture(); capture.keep(net, step=4, batch=torch.ones(3, 2))
        >>> capture.before(5).shape, capture.before(6), capture.batch.shape
        (torch.Size([3]), None, torch.Size([3, 2]))
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._before: torch.Tensor | None = None
        self.batch: Any = None

    def keep(self, module: torch.nn.Module, step: int, batch: Any = None) -> None:
        """Copy ``module``'s trainable parameters now, before the optimizer step taken at ``step`` on ``batch``."""
        # a sharded (FSDP2 DTensor) parameter is kept as this rank's shard
        self._step = int(step)
        self._before = flatten(local_part(p.detach()) for _, p in trainable_parameters(module))
        self.batch = batch

    def release(self) -> None:
        """Forget the copy (its memory is the size of the parameters) and the batch."""
        self._step = self._before = self.batch = None

    def before(self, step: int) -> torch.Tensor | None:
        """The parameters before the step that ended at optimizer step ``step``; None when not kept for it."""
        if self._step is None or self._step + 1 != int(step):
            return None
        return self._before


def critical_snapshot(
    module: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Sequence[Any],
    sizes: Sequence[float],
    before: torch.Tensor,
    *,
    dtype: torch.dtype,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    lr: float | None,
    threshold: float | None,
) -> dict[str, Any]:
    """The :data:`CRITICAL_KEYS` along the step from ``before`` to ``module``'s parameters, on ``batches``.

    Args:
        module: the model after the step, in the mode the loss is to be taken in.
        loss_fn: ``loss_fn(module, batch) -> scalar``.
        batches, sizes: this rank's batches (the step's own) and their sizes.
        before: the flat trainable parameters before the step (:class:`UpdateCapture`; this rank's shards of
            sharded parameters).
        dtype: the dtype to compute in.
        reduce: sums a float64 tensor over the ranks (every rank calls it equally often).
        lr: the learning rate of the step (None if unknown: no critical learning rate or sharpness).
        threshold: the optimizer's stability threshold (None if unknown: no ratio).

    Example:
        >>> net = torch.nn.Linear(1, 1, bias=False).double(); before = torch.tensor([1.0], dtype=torch.float64)
        >>> _ = net.weight.data.fill_(0.8)  # one SGD step at lr 0.1 on the loss w^2 (curvature 2)
        >>> out = critical_snapshot(net, lambda m, b: (m(b) ** 2).mean(), [torch.ones(1, 1).double()], [1.0], before,
        ...                         dtype=torch.float64, reduce=lambda t: t, lr=0.1, threshold=20.0)
        >>> [round(out[k], 9) for k in ("directional_curvature", "critical_lr", "critical_sharpness_ratio")]
        [2.0, 1.0, 0.1]
    """
    objective = BatchObjective(module, loss_fn, list(batches), batch_sizes=list(sizes), dtype=dtype, batch_list=True,
                               math_attention=False)  # forwards only: the model's own (fused) attention kernel
    weight = float(sum(sizes))
    value = _sharded_value(objective) if objective.sharded else objective.value
    after = torch.cat([local_part(p).detach().reshape(-1) for p in objective.parameters]).to(objective.dtype)
    start = before.to(device=after.device, dtype=after.dtype)
    update = after - start

    def phi(t: float) -> float:
        local = value(start + t * update, finite=False) * weight
        total = reduce(torch.tensor([local, weight], dtype=torch.float64))
        return float(total[0] / total[1])

    lr = lr if lr is not None and math.isfinite(lr) and lr > 0 else None
    squares = torch.tensor([float(update.double().square().sum())], dtype=torch.float64)
    update_sq = float(reduce(squares)) if objective.sharded else float(squares)  # shards: summed over the ranks
    result = line_sharpness(phi, update_norm=math.sqrt(update_sq), lr=lr, precision=float(torch.finfo(dtype).eps))
    sharpness = result.critical_sharpness
    return {
        "critical_sharpness": sharpness,
        "critical_sharpness_ratio": sharpness / threshold if sharpness is not None and threshold else None,
        "critical_lr": result.critical_lr,
        "critical_lr_ratio": result.lr_ratio,
        "directional_curvature": result.directional_curvature,
        "directional_curvature_stderr": result.directional_curvature_stderr,
        "n_forward": result.n_evals,
        "critical_note": result.reason,
    }


def _sharded_value(objective: BatchObjective) -> Callable[..., float]:
    """``value(point)`` for sharded (FSDP2) parameters, ``point`` this rank's shards: FSDP gathers the shards for
    each forward itself, so the point is written into the local shards (no gradient taken), the model's own forward
    runs, and the shards are put back bit for bit; every rank must call it together (FSDP's all-gathers). A module
    that keeps its gathered parameters after the forward (``reshard_after_forward=False``, the root's default)
    would keep them until a backward that never comes, and the next forward would not see the new shards: each
    forward is followed by a reshard, the state a training step leaves FSDP in. FSDP1's slices (Lightning's
    FSDPStrategy) go the same way: the loss runs through the root wrapper, which frees what it gathered itself
    (``_fsdp1.py``); there is no FSDP2 module to reshard."""
    from torch.distributed.fsdp import FSDPModule

    local = [local_part(p) for p in objective.parameters]
    sharded_modules = [m for m in objective.model.modules() if isinstance(m, FSDPModule)]

    def value(point: torch.Tensor, *, finite: bool = False) -> float:
        saved = [t.detach().clone() for t in local]
        try:
            with torch.no_grad():
                offset = 0
                for t in local:
                    t.copy_(point[offset:offset + t.numel()].view_as(t).to(t.dtype))
                    offset += t.numel()
            total = 0.0
            for i, w in enumerate(objective.weights):
                total += w * float(objective.loss(i).detach())
                for m in sharded_modules:
                    m.reshard()
            return total
        finally:
            with torch.no_grad():
                for t, copy in zip(local, saved):
                    t.copy_(copy)

    return value
