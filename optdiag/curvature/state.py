"""Do no harm: put a model's mutable state (buffers, modes, ``.grad``, RNGs) back exactly as it was.

This is the one place where optdiag saves and restores state around its own work; the operator and the Lightning
callbacks both use it. Parameters are never copied: curvature work reads them and does not write them.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["GENERATORS", "RngState", "rng_state", "replayed_rng", "preserved_state"]


GENERATORS = ("torch", "numpy", "python")


@dataclass(frozen=True)
class RngState:
    """A snapshot of the global random number generators optdiag may touch (``None``: not captured).

    Attributes:
        torch_cpu: ``torch.get_rng_state()``.
        torch_cuda: one state per CUDA device, only when CUDA was already initialised (never initialises it).
        numpy: ``numpy.random.get_state()`` of the legacy global generator.
        python: ``random.getstate()``.
    """

    torch_cpu: Optional[torch.Tensor]
    torch_cuda: Optional[tuple[torch.Tensor, ...]]
    numpy: Any
    python: Any

    def restore(self) -> None:
        """Set every captured generator back to this snapshot."""
        if self.torch_cpu is not None:
            torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(list(self.torch_cuda))
        if self.numpy is not None:
            np.random.set_state(self.numpy)
        if self.python is not None:
            random.setstate(self.python)

    def changed_since(self, earlier: "RngState") -> tuple[str, ...]:
        """Which generators (of ``"torch"``, ``"numpy"``, ``"python"``) moved between ``earlier`` and this one.

        Example:
            >>> before = rng_state(); _ = torch.rand(1)
            >>> rng_state().changed_since(before)
            ('torch',)
        """
        moved = []
        if not _same_tensors((self.torch_cpu,) + (self.torch_cuda or ()),
                             (earlier.torch_cpu,) + (earlier.torch_cuda or ())):
            moved.append("torch")
        if (self.numpy is None) != (earlier.numpy is None) or (
            self.numpy is not None
            and (self.numpy[2:] != earlier.numpy[2:] or not np.array_equal(self.numpy[1], earlier.numpy[1]))
        ):
            moved.append("numpy")
        if self.python != earlier.python:
            moved.append("python")
        return tuple(moved)


def _same_tensors(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


def rng_state(generators: Sequence[str] = GENERATORS) -> RngState:
    """Snapshot the torch (CPU and initialised CUDA devices), numpy and python RNGs.

    Args:
        generators: which of ``"torch"``, ``"numpy"``, ``"python"`` to capture (all by default; fewer is cheaper,
            python's ``random.getstate()`` copies 625 integers).

    Example:
        >>> state = rng_state()
        >>> a = torch.rand(1); state.restore(); b = torch.rand(1)
        >>> bool(a == b)
        True
    """
    unknown = set(generators) - set(GENERATORS)
    if unknown:
        raise ValueError(f"unknown generators {sorted(unknown)}; choose from {GENERATORS}")
    want_torch = "torch" in generators
    cuda = None
    if want_torch and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(torch.cuda.get_rng_state_all())
    return RngState(
        torch.get_rng_state() if want_torch else None,
        cuda,
        np.random.get_state() if "numpy" in generators else None,
        random.getstate() if "python" in generators else None,
    )


@contextlib.contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run a block with the RNGs set to ``state``, then put the caller's RNGs back.

    Only the generators captured in ``state`` are set and put back. Replaying the same snapshot makes random ops
    (dropout) draw the same values every time, without disturbing the global streams.

    Example:
        >>> s = rng_state()
        >>> with replayed_rng(s): a = torch.rand(2)
        >>> with replayed_rng(s): b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    if not isinstance(state, RngState):
        raise TypeError(f"replayed_rng expects an RngState from rng_state(), got {type(state).__name__}")
    captured = [name for name, value in zip(GENERATORS, (state.torch_cpu, state.numpy, state.python))
                if value is not None]
    outer = rng_state(captured)
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
        ...     _ = net.eval()
        ...     _ = net.train()(torch.randn(4, 2))
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
