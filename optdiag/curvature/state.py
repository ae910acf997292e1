"""Do no harm: put a model's mutable state (buffers, modes, ``.grad``, RNGs) back exactly as it was.

This is the one place where optdiag saves and restores state around its own work; the operator and the Lightning
callbacks both use it. Parameters are never copied: curvature work reads them and does not write them.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["RngState", "rng_state", "replayed_rng", "preserved_state"]


@dataclass(frozen=True)
class RngState:
    """A snapshot of every global random number generator optdiag may touch.

    Attributes:
        torch_cpu: ``torch.get_rng_state()``.
        torch_cuda: one state per CUDA device, only when CUDA was already initialised (never initialises it).
        numpy: ``numpy.random.get_state()`` of the legacy global generator.
        python: ``random.getstate()``.
    """

    torch_cpu: torch.Tensor
    torch_cuda: Optional[tuple[torch.Tensor, ...]]
    numpy: Any
    python: Any

    def restore(self) -> None:
        """Set every generator back to this snapshot."""
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(list(self.torch_cuda))
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def rng_state() -> RngState:
    """Snapshot the torch (CPU and initialised CUDA devices), numpy and python RNGs.

    Example:
        >>> state = rng_state()
        >>> a = torch.rand(1); state.restore(); b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return RngState(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())


@contextlib.contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run a block with the RNGs set to ``state``, then put the caller's RNGs back.

    Replaying the same snapshot makes random ops (dropout) draw the same values every time, without disturbing
    the global streams.

    Example:
        >>> s = rng_state()
        >>> with replayed_rng(s): a = torch.rand(2)
        >>> with replayed_rng(s): b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    if not isinstance(state, RngState):
        raise TypeError(f"replayed_rng expects an RngState from rng_state(), got {type(state).__name__}")
    outer = rng_state()
    state.restore()
    try:
        yield
    finally:
        outer.restore()


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 differs from 0.0 and a NaN equals the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class _BufferSnapshot:
    """Each module's buffer slots: which tensor object sat there, and a copy of its values."""

    def __init__(self, model: nn.Module) -> None:
        self._slots = []
        for module in model.modules():
            for name, buf in module._buffers.items():
                copy = None if buf is None else buf.detach().clone()
                self._slots.append((module, name, buf, copy))

    def restore(self) -> None:
        for module, name, buf, copy in self._slots:
            if module._buffers.get(name, None) is not buf:
                module._buffers[name] = buf  # the slot was reassigned: put the original object back
            # Only write when the values changed, so an unchanged buffer keeps its version counter (and any
            # autograd graph that saved it stays valid).
            if buf is not None and not _bitwise_equal(buf.detach(), copy):
                with torch.no_grad():
                    buf.copy_(copy)


@contextlib.contextmanager
def preserved_state(
    model: Optional[nn.Module],
    *,
    rng: bool = True,
    grads: bool = True,
    buffers: bool = True,
    modes: bool = True,
) -> Iterator[None]:
    """Leave a model's mutable state exactly as it was, whatever happens inside the block.

    On exit (also when the block raises):

    * ``buffers``: every buffer holds its entry values bit for bit, as the same tensor object (BatchNorm running
      statistics and ``num_batches_tracked`` included). Buffers are copied on entry (they are small); a buffer whose
      values did not change is not written, so its version counter is untouched.
    * ``modes``: every module's ``training`` flag is as on entry (set directly, so custom ``train()`` overrides
      are not re-run).
    * ``grads``: every parameter's ``.grad`` is the very object it was on entry (``None`` stays ``None``). The
      gradients are *set aside* for the duration of the block, so inside it every ``.grad`` is ``None`` and a
      ``backward()`` inside cannot add to or overwrite the training gradients; read them before entering if you need
      them. Nothing is copied.
    * ``rng``: the torch CPU generator, the generators of already-initialised CUDA devices, numpy's global
      generator and python's ``random`` are as on entry.

    Parameters themselves are neither copied nor restored.

    Args:
        model: the module whose state to keep; ``None`` keeps only the RNG states.
        rng, grads, buffers, modes: which kinds of state to keep (all by default).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
        >>> before = net[1].running_mean.clone()
        >>> with preserved_state(net):
        ...     net.eval(); _ = net.train()(torch.randn(4, 2))
        >>> torch.equal(net[1].running_mean, before), net.training
        (True, True)
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"preserved_state expects a torch.nn.Module (or None), got {type(model).__name__}")
    for flag_name, flag in (("rng", rng), ("grads", grads), ("buffers", buffers), ("modes", modes)):
        if not isinstance(flag, bool):
            raise TypeError(f"preserved_state: {flag_name} must be a bool, got {type(flag).__name__}")

    saved_rng = rng_state() if rng else None
    saved_buffers = _BufferSnapshot(model) if (buffers and model is not None) else None
    saved_modes = [(m, m.training) for m in model.modules()] if (modes and model is not None) else None
    saved_grads = None
    if grads and model is not None:
        saved_grads = [(p, p.grad) for p in model.parameters()]
        for p, _ in saved_grads:
            p.grad = None
    try:
        yield
    finally:
        if saved_grads is not None:
            for p, grad in saved_grads:
                p.grad = grad
        if saved_modes is not None:
            for module, training in saved_modes:
                module.training = training
        if saved_buffers is not None:
            saved_buffers.restore()
        if saved_rng is not None:
            saved_rng.restore()
