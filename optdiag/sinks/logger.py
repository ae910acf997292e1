"""Scalars to the trainer's loggers (CSV, TensorBoard, W&B, ...), under the ``optdiag/...`` names.

The one place that turns a dict of measured numbers into logged scalars: it prefixes names, drops what is not a
finite-or-not plain number (objects, ``None``), and writes on global rank 0 only.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

PREFIX = "optdiag/"


def scalar_metrics(values: Mapping[str, Any], *, prefix: str = PREFIX) -> dict[str, float]:
    """The plain numbers of ``values`` as ``{prefix + name: float}``; other entries are left out.

    NaN and infinities are kept (a diverging run should show them); booleans, ``None`` and objects are not scalars.

    Example:
        >>> scalar_metrics({"grad_norm": 2, "optimizer": object(), "lr": None})
        {'optdiag/grad_norm': 2.0}
    """
    out: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            if hasattr(value, "numel") and getattr(value, "numel")() == 1:  # a 0-d tensor
                value = float(value)
            else:
                continue
        out[name if name.startswith(prefix) else prefix + name] = float(value)
    return out


def log_scalars(trainer: Any, values: Mapping[str, Any], step: int) -> dict[str, float]:
    """Write the plain numbers of ``values`` to every logger of ``trainer`` at ``step`` (global rank 0 only).

    Args:
        trainer: a Lightning ``Trainer`` (either namespace).
        values: measured quantities by short name (``"grad_norm"``) or full name (``"optdiag/grad_norm"``).
        step: the x-axis value, normally ``trainer.global_step``.

    Returns:
        The metrics dict that was (or, on other ranks, would have been) written.

    Example::

        log_scalars(trainer, {"lambda_max": 12.5}, step=trainer.global_step)
        # {'optdiag/lambda_max': 12.5}
    """
    metrics = scalar_metrics(values)
    if metrics and getattr(trainer, "is_global_zero", True):
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(metrics, step=int(step))
    return metrics

