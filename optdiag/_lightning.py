"""The importable Lightning namespaces: ``pytorch_lightning`` and, when installed, ``lightning.pytorch``.

They define different classes of the same names (``Callback``, ``LightningModule``, the loggers), so code that
accepts either checks against the pair. Imported by the callbacks and by the checkpoint analysis only (the core
never imports Lightning).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning


def _lightning_namespaces() -> list[Any]:
    found = [pytorch_lightning]
    try:
        import lightning.pytorch as lightning_pytorch
    except ImportError:  # the unified ``lightning`` package is optional
        return found
    return found + [lightning_pytorch]


#: ``pytorch_lightning`` and, if installed, ``lightning.pytorch``.
LIGHTNING_NAMESPACES = tuple(_lightning_namespaces())
#: The ``LightningModule`` class of each namespace.
LIGHTNING_MODULES = tuple(ns.LightningModule for ns in LIGHTNING_NAMESPACES)
#: The ``LightningDataModule`` class of each namespace.
LIGHTNING_DATAMODULES = tuple(ns.LightningDataModule for ns in LIGHTNING_NAMESPACES)


def lightning_module_base(obj: Any) -> type | None:
    """The ``LightningModule`` class (of either namespace) that an instance or class derives from, else None.

    Example:
        >>> import torch
        >>> lightning_module_base(torch.nn.Linear(1, 1)) is None
        True
    """
    cls = obj if isinstance(obj, type) else type(obj)
    return next((base for base in LIGHTNING_MODULES if issubclass(cls, base)), None)
