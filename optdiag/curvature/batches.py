"""Batches: what counts as one batch or many, how many samples a batch holds, and the tensors inside it.

The single home of optdiag's batch conventions, shared by the Hessian operator, the sharpness and noise
measures, the post-hoc analysis and the callbacks:

* ``batches`` is one batch or an iterable of batches (:func:`as_batch_list`);
* a batch is any nesting of tuples, lists (namedtuples included) and dicts with tensors (and other values) as
  leaves; its samples run along the leading dimension of its tensors (:func:`sample_count`);
* several batches are combined as a *sample-weighted* mean, ``w_i = n_i / sum_j n_j`` (:func:`batch_weights`).

Example:
    >>> x, y = torch.zeros(6, 3), torch.zeros(6)
    >>> len(as_batch_list((x, y))), len(as_batch_list([(x, y), (x[:2], y[:2])]))
    (1, 2)
    >>> batch_weights([(x, y), (x[:2], y[:2])])
    [0.75, 0.25]
    >>> map_tensors({"x": x, "y": y}, lambda t: t[:4])["x"].shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from optdiag.errors import UsageError
from optdiag.policy import check_number

__all__ = [
    "as_batch_list",
    "iter_tensors",
    "first_tensor",
    "sample_count",
    "batch_weights",
    "map_tensors",
    "move_batch",
]


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (tuple, list, dict))


def as_batch_list(batches: Any) -> list:
    """One batch, or an iterable of batches, as a list of batches.

    A tensor, a dict, or a tuple/list with at least one element that is not a tuple/list/dict is one batch; a
    tuple/list whose elements are all tuples/lists/dicts is a sequence of batches; any other iterable (a
    ``DataLoader``, a generator) is iterated to the end. Wrap a single nested batch in a list to be explicit:
    ``[((x1, x2), y)]``.

    Raises:
        UsageError: ``batches`` is neither a batch nor an iterable (a string, a number).

    Example:
        >>> as_batch_list(torch.ones(2)), as_batch_list([])
        ([tensor([1., 1.])], [])
    """
    if isinstance(batches, (torch.Tensor, dict)):
        return [batches]
    if isinstance(batches, (tuple, list)):
        if len(batches) > 0 and all(_is_container(b) for b in batches):
            return list(batches)
        return [batches] if len(batches) > 0 else []
    if isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
        return list(batches)
    raise UsageError(f"batches must be a batch or an iterable of batches, got {type(batches).__name__}")


def iter_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested batch, depth first (dict values in order, then tuple/list items).

    Example:
        >>> [t.shape[0] for t in iter_tensors({"x": torch.ones(3, 2), "meta": ("id", torch.ones(3))})]
        [3, 3]
    """
    if isinstance(batch, torch.Tensor):
        yield batch
        return
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            yield from iter_tensors(item)


def first_tensor(batch: Any) -> Optional[torch.Tensor]:
    """The first tensor of a nested batch (see :func:`iter_tensors`), or ``None`` if it holds none.

    Example:
        >>> first_tensor(("text", torch.zeros(5))).shape, first_tensor(["no", "tensors"])
        (torch.Size([5]), None)
    """
    return next(iter_tensors(batch), None)


def sample_count(batch: Any, index: int = 0) -> int:
    """The number of samples in a batch: the leading dimension of its first tensor.

    Args:
        batch: a nested batch.
        index: the batch's position, named in the error message.

    Raises:
        UsageError: the batch has no tensor with a leading (sample) dimension.

    Example:
        >>> sample_count((torch.zeros(8, 3), torch.zeros(8)))
        8
    """
    first = first_tensor(batch)
    if first is None or first.dim() == 0:
        raise UsageError(
            f"cannot infer the size of batch {index}: it has no tensor with a leading (sample) dimension; "
            "pass batch_sizes=[...]"
        )
    return int(first.shape[0])


def batch_weights(batches: Sequence[Any], batch_sizes: Optional[Sequence[float]] = None) -> list[float]:
    """The weight ``w_i = n_i / sum_j n_j`` of each batch in a sample-weighted mean.

    Args:
        batches: the list of batches.
        batch_sizes: ``n_i`` for each batch; inferred with :func:`sample_count` when ``None``.

    Raises:
        UsageError: ``batch_sizes`` of the wrong length, a size that is not a positive finite number, or a batch
            whose size cannot be inferred.

    Example:
        >>> batch_weights([torch.zeros(3), torch.zeros(1)])
        [0.75, 0.25]
        >>> batch_weights([None, None], batch_sizes=[1, 1])
        [0.5, 0.5]
    """
    if batch_sizes is None:
        sizes = [sample_count(b, i) for i, b in enumerate(batches)]
    else:
        sizes = list(batch_sizes)
        if len(sizes) != len(batches):
            raise UsageError(f"batch_sizes has {len(sizes)} entries for {len(batches)} batches")
    for i, s in enumerate(sizes):
        check_number(f"batch size {i}", s, low=0.0, low_open=True, what="a positive number")
    total = float(sum(sizes))
    return [float(s) / total for s in sizes]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """A copy of a nested batch with ``fn`` applied to every tensor; containers keep their type (namedtuples
    included), other leaves are kept as they are.

    Example:
        >>> map_tensors((torch.ones(4, 2), "label"), lambda t: t[:1])
        (tensor([[1., 1.]]), 'label')
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def move_batch(batch: Any, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> Any:
    """Every tensor of a nested batch on ``device``, and floating ones in ``float_dtype`` when given.

    Example:
        >>> move_batch((torch.ones(1), torch.ones(1, dtype=torch.long)), torch.device("cpu"), torch.float64)
        (tensor([1.], dtype=torch.float64), tensor([1]))
    """

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and tensor.is_floating_point():
            return tensor.to(device=device, dtype=float_dtype)
        return tensor.to(device=device)

    return map_tensors(batch, move)
