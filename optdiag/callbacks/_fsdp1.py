"""Lightning's ``FSDPStrategy`` (FSDP1): optdiag's losses go through the root ``FullyShardedDataParallel``.

FSDP1 gathers a unit's parameters in that unit's own forward. Lightning wraps the whole LightningModule in the root
unit and calls ``training_step`` through it; optdiag calls the module's own loss, so without the root's forward the
parameters the root holds (those of no nested unit) stay 1-D slices and the loss cannot be computed. Every loss
optdiag takes under FSDP1 is therefore run as the root's forward, and afterwards every unit that still holds gathered
parameters frees them: the root keeps its own for a backward that a forward-only evaluation never runs, and the
next forward would take them as they were instead of gathering the shards again (a finite-difference point, or the
next training step after the parameters changed). docs/finite-difference-and-fsdp.md.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")
_INSIDE = "_optdiag_inside_fsdp_root"  # set on the module while its loss runs inside the root's forward


def fsdp1_root(pl_module: Any) -> Any | None:
    """The root ``FullyShardedDataParallel`` that Lightning's ``FSDPStrategy`` wrapped ``pl_module`` in, or None
    (another strategy, no trainer attached).

    Example:
        >>> from torch import nn
        >>> fsdp1_root(nn.Linear(2, 1)) is None
        True
    """
    model = getattr(getattr(getattr(pl_module, "_trainer", None), "strategy", None), "model", None)
    if model is None or model is pl_module:
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed
        return None
    if isinstance(model, FullyShardedDataParallel) and model.module is pl_module:
        return model
    return None


def through_root(pl_module: Any, call: Callable[[], _T]) -> _T:
    """``call()`` run as the forward of ``pl_module``'s FSDP1 root (gathering the root's parameters, and hooking the
    result so that a backward reduce-scatters the gradient into the shards), then every gathered parameter freed
    (see the module docstring); ``call()`` itself when there is no such root or when already inside it.

    Example:
        >>> from torch import nn
        >>> through_root(nn.Linear(2, 1), lambda: 3)
        3
    """
    root = fsdp1_root(pl_module)
    if root is None or pl_module.__dict__.get(_INSIDE):
        return call()
    own_forward = pl_module.__dict__.get("forward")

    def restore_forward() -> None:
        if own_forward is None:
            pl_module.__dict__.pop("forward", None)
        else:
            pl_module.__dict__["forward"] = own_forward

    def redirected(*args: Any, **kwargs: Any) -> _T:
        restore_forward()  # first: the loss itself calls the module's own forward
        return call()

    # the root's forward calls the wrapped module's forward (with the inputs it prepared from none)
    pl_module.__dict__["forward"] = redirected
    pl_module.__dict__[_INSIDE] = True
    try:
        return root()
    finally:
        del pl_module.__dict__[_INSIDE]
        restore_forward()
        _free_gathered(root)


def _free_gathered(root: Any) -> None:
    """Free the gathered parameters of every unit under ``root`` that holds them (a backward that comes later
    gathers them again from the shards, as it does for every unit that frees after its forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._runtime_utils import _reshard

    for unit in FullyShardedDataParallel.fsdp_modules(root):
        handle = unit._handle
        if handle is not None and handle.uses_sharded_strategy and not handle.needs_unshard():
            _reshard(unit, handle, True)


def routed(loss_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``loss_fn(module, batch)`` run through the module's FSDP1 root when it has one (:func:`through_root`).

    Example:
        >>> from torch import nn
        >>> routed(lambda module, batch: batch + 1)(nn.Linear(2, 1), 1)
        2
    """
    @functools.wraps(loss_fn)
    def loss(module: Any, batch: Any) -> Any:
        return through_root(module, lambda: loss_fn(module, batch))

    return loss
