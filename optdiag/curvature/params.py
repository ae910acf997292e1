"""Parameters as one flat vector: the single place where flattening and unflattening live."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters with ``requires_grad``, in ``model.named_parameters()`` order.

    Raises:
        ValueError: if the model has no trainable parameter.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            "there is no Hessian to analyse."
        )
    return named


def parameter_blocks(model: nn.Module) -> dict[str, int]:
    """The flat parameter vector cut into layers: ``{module name: number of its trainable parameters}``, in the order
    of :func:`trainable_parameters` (a layer's weight and bias form one block; a layer whose parameters are not
    consecutive in that order gets a ``#2``, ``#3`` ... block per run).

    Example:
        >>> parameter_blocks(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)))
        {'0': 8, '2': 3}
    """
    blocks: dict[str, int] = {}
    last = None
    for name, p in trainable_parameters(model):
        layer = name.rpartition(".")[0] or name
        if layer != last:
            key, n = layer, 1
            while key in blocks:
                n += 1
                key = f"{layer}#{n}"
            blocks[key], last = 0, layer
        blocks[key] += p.numel()
    return blocks


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``.

    Raises:
        ValueError: if the vector's length is not the total number of elements of ``like``.
    """
    total = sum(t.numel() for t in like)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"expected a flat vector of length {total}, got shape {tuple(vector.shape)}")
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    return out


#: The attribute FSDP1 (``FullyShardedDataParallel``) sets on every parameter it flattens into a flat parameter.
_FSDP1_FLATTENED = "_fsdp_flattened"


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is this rank's part of a parameter sharded across ranks: a ``DTensor`` (FSDP2), or a
    parameter FSDP1 flattened (``FullyShardedDataParallel`` with ``use_orig_params=True``, which between steps shows
    each original parameter as a 1-D view of this rank's slice of its flat parameter, possibly empty). A gradient
    of an FSDP1 parameter is a plain tensor (its slice): :func:`local_part` takes it as it is.

    Example:
        >>> is_sharded(torch.zeros(2))
        False
    """
    return is_fsdp1_flattened(tensor) or _is_dtensor(tensor)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing is a DTensor
        return False
    return isinstance(tensor, DTensor)


def is_fsdp1_flattened(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter flattened by FSDP1 (see :func:`is_sharded`).

    Example:
        >>> is_fsdp1_flattened(nn.Parameter(torch.zeros(2)))
        False
    """
    return bool(getattr(tensor, _FSDP1_FLATTENED, False))


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's elements of ``tensor``: the local shard of a ``DTensor`` (a view sharing its storage, so writing
    it writes the parameter), else ``tensor`` itself (an FSDP1 parameter already is its slice).

    Example:
        >>> t = torch.zeros(2)
        >>> local_part(t) is t
        True
    """
    return tensor.to_local() if _is_dtensor(tensor) else tensor
