"""Which function of the weights a checkpoint analysis measures: the training-mode or the eval-mode loss.

A network with BatchNorm computes two different functions of the same weights. In train mode each batch is
normalised by its own statistics, which is the function the optimizer differentiated; in eval mode the running
statistics are used, which early in training (or after a change of batch size) can be far from any batch's: a
ResNet checkpoint can show an eval-mode loss several times its training loss. Curvature, slices and verdicts of the
eval-mode function then describe a landscape the optimizer never saw.

Modes (``AnalysisSettings.mode``, ``--mode``):

* ``"train"``: train mode with every dropout layer in eval mode, so BatchNorm uses batch statistics and the numbers
  do not depend on random masks (the expected training loss, not one draw of it).
* ``"eval"``: eval mode (running statistics, no dropout).
* ``"auto"`` (default): ``"train"`` when the model has BatchNorm-like layers (normalisation layers that keep running
  statistics) or when its loss on the first batch differs between the two modes (some other module reads
  ``self.training``), else ``"eval"`` (the two are then the same function).

The model's buffers (running statistics and ``num_batches_tracked``) and every module's ``training`` flag are put
back exactly by :func:`optdiag.curvature.state.preserved_state`; forward passes of the analysis go through
:class:`~optdiag.curvature.objective.BatchObjective`, whose private buffer copies keep the running statistics from
being updated in the first place. See ``docs/analyzing-checkpoints.md``.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    >>> with function_mode(net, "train"):
    ...     net[1].training, net[2].training
    (True, False)
    >>> net.training
    True
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from optdiag.curvature.objective import BatchObjective
from optdiag.curvature.state import preserved_state
from optdiag.errors import UsageError

__all__ = ["MODES", "ModeChoice", "function_mode", "batchnorm_like_layers", "dropout_layers", "choose_mode"]

MODES = ("auto", "train", "eval")


def batchnorm_like_layers(model: nn.Module) -> list[str]:
    """Names of the normalisation layers whose train and eval outputs differ (they keep running statistics).

    Example:
        >>> batchnorm_like_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.LayerNorm(2)))
        ['1']
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "running_mean", None) is not None]


def dropout_layers(model: nn.Module) -> list[str]:
    """Names of the dropout layers (``nn.Dropout`` and its relatives), switched off in the train-mode analysis.

    Example:
        >>> dropout_layers(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
        ['1']
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


@contextlib.contextmanager
def function_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in the ``"train"`` (dropout off) or ``"eval"`` mode for a block; modes and buffers are put
    back exactly on exit, also when the block raises.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2)).eval()
        >>> with function_mode(net, "train"):
        ...     _ = net(torch.randn(4, 2))  # a plain forward would update the running statistics ...
        >>> float(net[0].running_mean.abs().sum()), net.training  # ... which are restored bit for bit
        (0.0, False)
    """
    if mode not in ("train", "eval"):
        raise UsageError(f"mode must be 'train' or 'eval' here, got {mode!r}")
    with preserved_state(model):
        model.train(mode == "train")
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
        yield


@dataclass
class ModeChoice:
    """The function analysed, and why.

    Attributes:
        requested: ``"auto"``, ``"train"`` or ``"eval"``.
        used: ``"train"`` (batch statistics, dropout off) or ``"eval"`` (running statistics).
        reason: one sentence for the report.
        batchnorm_layers: names of the layers with running statistics.
        dropout_layers: names of the dropout layers (off in both modes).
        first_batch_loss: ``{"train": ..., "eval": ...}``, the loss of the first batch in each mode (None where not
            measured: only ``"auto"`` measures both).
    """

    requested: str
    used: str
    reason: str
    batchnorm_layers: list[str] = field(default_factory=list)
    dropout_layers: list[str] = field(default_factory=list)
    first_batch_loss: dict[str, Optional[float]] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """What the function is, in words."""
        if self.used == "train":
            return f"training-mode function ({'batch statistics, ' if self.batchnorm_layers else ''}dropout off)"
        return f"eval-mode function ({'running statistics, ' if self.batchnorm_layers else ''}dropout off)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "used": self.used,
            "function": self.description,
            "reason": self.reason,
            "batchnorm_layers": list(self.batchnorm_layers),
            "dropout_layers": list(self.dropout_layers),
            "first_batch_loss": dict(self.first_batch_loss),  # a NaN stays a NaN: the report's encoder writes it
        }


def _first_batch_loss(model: nn.Module, loss_fn: Callable, batch: Any, mode: str,
                      dtype: Optional[torch.dtype]) -> float:
    with function_mode(model, mode), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log.*")
        objective = BatchObjective(model, loss_fn, [batch], dtype=dtype, batch_list=True)
        return objective.value(objective.point(), finite=False)


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(n or "<root>" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def choose_mode(model: nn.Module, loss_fn: Callable, first_batch: Any, requested: str = "auto",
                dtype: Optional[torch.dtype] = None) -> ModeChoice:
    """Decide which function to analyse (see the module docstring); ``"auto"`` measures the first batch's loss in
    both modes (two forward passes) and reports them.

    Raises:
        UsageError: ``requested`` is not one of :data:`MODES`.
    """
    if requested not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {requested!r}")
    norms, drops = batchnorm_like_layers(model), dropout_layers(model)
    off = f"; dropout off ({_names(drops)})" if drops else ""
    if requested != "auto":
        why = "asked for" + (f"; BatchNorm-like layers: {_names(norms)}" if norms else "")
        return ModeChoice(requested, requested, why + off, norms, drops, {})
    losses = {mode: _first_batch_loss(model, loss_fn, first_batch, mode, dtype) for mode in ("train", "eval")}
    train, evaluation = losses["train"], losses["eval"]
    differ = not (train == evaluation or (math.isnan(train) and math.isnan(evaluation)))
    measured = f"first-batch loss {train:.4g} in train mode, {evaluation:.4g} in eval mode"
    if norms:
        reason = (f"auto: the model has BatchNorm-like layers ({_names(norms)}): the optimizer saw batch "
                  f"statistics ({measured})")
        used = "train"
    elif differ:
        reason = f"auto: the model's train and eval outputs differ ({measured})"
        used = "train"
    else:
        reason = f"auto: train and eval mode compute the same function here ({measured})"
        used = "eval"
    return ModeChoice("auto", used, reason + off, norms, drops, losses)
