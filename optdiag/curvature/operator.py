"""The Hessian of a model's loss as a linear operator, applied with exact Hessian-vector products.

``HessianOperator(model, loss_fn, batches)`` fixes a point (the current parameters) and a set of batches, and then
computes ``H v`` for the Hessian ``H`` of the sample-weighted mean loss over those batches, without ever forming
``H``. Three exact engines compute the product (``method``):

* ``"graph"``: the first-order gradient is built once per batch with ``create_graph=True`` and kept; every product
  is one backward pass through it (Pearlmutter's double backward). Cheapest per product; holds the graphs in memory.
* ``"recompute"``: the same double backward, but each batch's first-order graph is rebuilt for every product and
  freed at once. Holds at most one batch's graph; costs a forward and a backward more per product.
* ``"func"``: forward-over-reverse ``torch.func.jvp(torch.func.grad(f))``, recomputed for every product. Holds
  nothing between products, but needs forward-mode derivatives of every op (torch 2.13 lacks working ones for
  ``mse_loss`` and ``huber_loss``, for example; such models get a :class:`UsageError` naming the op).
* ``"linearize"``: ``torch.func.linearize`` of the gradient, traced once per batch and replayed (same limits as
  ``"func"``).
* ``"auto"`` (default): ``"graph"`` when the first-order graphs of all batches fit ``memory_budget``, else
  ``"recompute"`` (which supports exactly the models ``"graph"`` does, unlike the forward-mode engines).

The model is never modified: the forward passes run through ``torch.func.functional_call`` with private copies of
the buffers, gradients are taken with ``torch.autograd.grad`` (``.grad`` is never touched), and random ops draw from
a replayed snapshot of the RNGs (so a dropout mask is fixed for the operator's life and the global RNGs do not move).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from optdiag.curvature.base import CurvatureOperator
from optdiag.curvature.objective import BatchObjective, LossFn
from optdiag.errors import NonFiniteError, NotTwiceDifferentiableError, UsageError
from optdiag.policy import check_number

__all__ = ["HessianOperator", "supervised_loss", "LossFn", "METHODS"]

METHODS = ("auto", "graph", "recompute", "func", "linearize")

# Messages by which autograd / torch.func say a backward cannot be differentiated again.
_NOT_TWICE_HINTS = (
    "derivative for",
    "not implemented",
    "once_differentiable",
    "differentiate twice",
    "setup_context",
    "does not require grad and does not have a grad_fn",
    "double backward",
)


def supervised_loss(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> LossFn:
    """A ``loss_fn`` for supervised batches: ``criterion(model(inputs), targets)``.

    A batch is either a tuple/list ``(inputs, targets)`` or a dict with keys ``"x"`` and ``"y"``. ``inputs`` is
    passed to the model as one argument. The criterion must return the *mean* loss over the batch (the operator
    weights batches by their size itself); an ``nn.Module`` criterion with ``reduction`` other than ``"mean"`` is
    refused.

    Args:
        criterion: e.g. ``nn.CrossEntropyLoss()``, ``nn.MSELoss()`` or ``torch.nn.functional.mse_loss``.

    Returns:
        ``loss_fn(model, batch) -> scalar tensor``.

    Raises:
        UsageError: the criterion is not callable or does not reduce by the mean.

    Example:
        >>> loss_fn = supervised_loss(nn.MSELoss())
        >>> float(loss_fn(nn.Identity(), (torch.ones(2), torch.zeros(2))))
        1.0
    """
    if not callable(criterion):
        raise UsageError(f"supervised_loss needs a callable criterion, got {type(criterion).__name__}")
    reduction = getattr(criterion, "reduction", "mean")
    if reduction != "mean":
        raise UsageError(
            f"supervised_loss needs a criterion that returns the mean loss over a batch; "
            f"{type(criterion).__name__} has reduction={reduction!r}. Use reduction='mean'."
        )

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = _split_supervised(batch)
        return criterion(model(inputs), targets)

    loss_fn.criterion = criterion  # type: ignore[attr-defined]
    return loss_fn


def _split_supervised(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict):
        if "x" in batch and "y" in batch:
            return batch["x"], batch["y"]
        raise UsageError(f"a dict batch for supervised_loss needs keys 'x' and 'y', got {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UsageError(
        "supervised_loss expects a batch (inputs, targets) or {'x': inputs, 'y': targets}, "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _default_memory_budget(device: torch.device) -> int:
    """Bytes the kept graphs may use: half the free accelerator memory, or a quarter of the host's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2 * 1024**3


def _walk_graph(roots: Sequence[torch.Tensor], known_storages: set[int]) -> tuple[int, bool]:
    """Bytes of the tensors saved by the autograd graph behind ``roots`` (not counting ``known_storages``), and
    whether it contains a node that refuses to be differentiated (``@once_differentiable``'s error node)."""
    seen_nodes: set = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    saved_bytes, refuses = 0, False
    attr_cache: dict[type, list[str]] = {}
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        kind = type(node)
        if kind.__name__ in ("Error", "DelayedError", "DelayedErrorBackward"):
            refuses = True
        names = attr_cache.get(kind)
        if names is None:
            names = [a for a in dir(node) if a.startswith("_saved_")]
            attr_cache[kind] = names
        for name in names:
            try:
                value = getattr(node, name)
            except RuntimeError:
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    if key not in known_storages:
                        known_storages.add(key)
                        saved_bytes += storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return saved_bytes, refuses


_FORWARD_AD_HINTS = ("forward ad", "zerotensors are immutable", "forward-mode", "jvp")


def _forward_mode_unsupported(error: BaseException) -> UsageError:
    return UsageError(
        f"torch.func cannot differentiate this model in forward mode ({type(error).__name__}: {error}); use "
        "method='graph' or 'recompute' (reverse-over-reverse), which need no forward-mode derivatives"
    )


def _is_forward_ad_failure(error: BaseException) -> bool:
    text = str(error).lower()
    return any(hint in text for hint in _FORWARD_AD_HINTS)


def _is_not_twice_differentiable(error: BaseException) -> bool:
    text = str(error).lower()
    return any(hint in text for hint in _NOT_TWICE_HINTS)


class HessianOperator(CurvatureOperator):
    """The Hessian of the sample-weighted mean loss over some batches, at a model's current parameters.

    ``H = sum_i w_i * Hessian(loss_fn(model, batch_i))`` with ``w_i = n_i / sum_j n_j``, ``n_i`` the size of
    batch ``i`` (the leading dimension of its first tensor, or ``batch_sizes[i]``). Vectors are flat, in the order
    of ``model.named_parameters()`` restricted to parameters with ``requires_grad`` (see
    :func:`optdiag.curvature.params.trainable_parameters`); parameters the loss does not use get zero rows.

    The model is differentiated in the mode it is in: in train mode BatchNorm uses batch statistics and dropout is
    active (one fixed mask for the operator's life); in eval mode running statistics are used. The model's buffers,
    modes, ``.grad`` and the torch/numpy/python RNG states are exactly as before, after construction and after
    every product. Inputs are moved to the model's device.

    Args:
        model: the network; its parameters define the point and the device.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch, e.g. ``supervised_loss(nn.MSELoss())``.
        batches: one batch, or an iterable of batches (materialised into a list and kept on the model's device).
        method: ``"auto"``, ``"graph"``, ``"recompute"``, ``"func"`` or ``"linearize"`` (see the module
            docstring).
        batch_sizes: the weight of each batch; inferred from the leading dimension when ``None``.
        dtype: compute in this floating dtype, e.g. ``torch.float64`` for a float32 model (the model is not cast:
            the operator works on private converted copies of the parameters, buffers and floating inputs).
            ``None`` uses the parameters' dtype.
        memory_budget: bytes the kept graphs may occupy when ``method="auto"``; default half the free GPU memory,
            or a quarter of host RAM on CPU.

    Attributes:
        method: the engine actually used (``"auto"`` resolved).
        weights: the weight ``w_i`` of each batch.
        graph_bytes: bytes saved by the first-order graphs (measured at construction).
        loss: the weighted mean loss at the point (float).
        objective: the :class:`~optdiag.curvature.objective.BatchObjective` whose Hessian this is: the batches
            (``op.objective.batches``, on the device), the point (``op.objective.point()``) and the same loss at any
            other parameters (``op.objective.value(theta)``), with the same dropout masks.

    Raises:
        UsageError: no batches, a bad argument, ``torch.inference_mode``, a loss that is not a scalar or does not
            depend on the trainable parameters.
        NonFiniteError: the loss or its gradient is NaN/Inf.
        NotTwiceDifferentiableError: the backward pass cannot itself be differentiated.
        ValueError: the model has no trainable parameters.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> data = (torch.randn(16, 3), torch.randn(16, 1))
        >>> with HessianOperator(net, supervised_loss(nn.MSELoss()), data) as op:
        ...     hv = op @ torch.randn(op.num_params)
        >>> hv.shape == (op.num_params,)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Any,
        *,
        method: str = "auto",
        batch_sizes: Optional[Sequence[float]] = None,
        dtype: Optional[torch.dtype] = None,
        memory_budget: Optional[int] = None,
    ) -> None:
        if method not in METHODS:
            raise UsageError(f"method must be one of {METHODS}, got {method!r}")
        check_number("memory_budget", memory_budget, low=0, integer=True, allow_none=True,
                     what="a non-negative number of bytes")
        self.objective = BatchObjective(model, loss_fn, batches, batch_sizes=batch_sizes, dtype=dtype)
        device = self.objective.device
        super().__init__(self.objective.num_params, device, self.objective.dtype)
        self.model = model
        self.loss_fn = loss_fn
        self.weights = self.objective.weights
        self._leaves = self.objective.parameters
        self._closed = False
        self._flat_grad_graph: Optional[torch.Tensor] = None  # "graph": sum_i w_i g_i with its graph
        self._linearized: list[Callable] = []
        self._batched_ok = True
        self.matmat_chunk = 64

        budget = _default_memory_budget(device) if (method == "auto" and memory_budget is None) else memory_budget
        self._evaluate_point(keep_graph=method in ("auto", "graph"), budget=budget if method == "auto" else None)
        if method == "auto":
            method = "graph" if self._flat_grad_graph is not None else "recompute"
        self.method = method
        if method in ("func", "linearize"):
            self._probe_forward_mode()
        if method == "linearize":
            self._linearize_all()

    @torch.enable_grad()
    def _evaluate_point(self, keep_graph: bool, budget: Optional[int]) -> None:
        """Loss and gradient of every batch (their first evaluations, which fix each batch's random draws); keep
        the first-order graphs for the graph method while they fit ``budget``."""
        total_loss = torch.zeros((), device=self.device, dtype=self.dtype)
        gradient = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
        graph_terms: list[torch.Tensor] = []
        known = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        known.update(p.untyped_storage().data_ptr() for p in self._leaves)
        self.graph_bytes = 0
        n_batches = len(self.objective.batches)
        for i in range(n_batches):
            loss, grads = self.objective.loss_and_grad(i, create_graph=True)
            flat = self._check_gradient(grads, i)
            saved, refuses = _walk_graph([flat], known)
            if refuses:
                raise NotTwiceDifferentiableError(
                    f"the backward pass of batch {i} contains an operation marked @once_differentiable, so it "
                    "cannot be differentiated again; Hessian-vector products are impossible for this model"
                )
            self.graph_bytes += saved
            w = self.weights[i]
            total_loss += w * loss.detach()
            gradient += w * flat.detach()
            if keep_graph and (budget is None or self.graph_bytes <= budget):
                graph_terms.append(flat * w if n_batches > 1 else flat)
            else:
                keep_graph = False
                graph_terms.clear()
        self.loss = float(total_loss)
        self._gradient = gradient
        if keep_graph:
            self._flat_grad_graph = graph_terms[0] if len(graph_terms) == 1 else torch.stack(graph_terms).sum(0)

    @staticmethod
    def _check_gradient(grads: Sequence[torch.Tensor], i: int) -> torch.Tensor:
        """The flat first-order gradient of batch ``i``, refused if it has no graph or is not finite."""
        if not any(g.requires_grad for g in grads):
            raise NotTwiceDifferentiableError(
                f"the gradient of batch {i} has no autograd graph although the loss depends on the parameters: "
                "the backward pass is not differentiable (a custom autograd.Function with "
                "@once_differentiable, or a backward computed under no_grad/detach). (A loss that is affine in "
                "every parameter would also end here; its Hessian is zero.)"
            )
        flat = torch.cat([g.reshape(-1) for g in grads])
        if not torch.isfinite(flat.detach()).all():
            raise NonFiniteError(f"the gradient of batch {i} has NaN or infinite entries")
        return flat

    # ------------------------------------------------------------------------------------------------------------
    # torch.func engines

    def _stateless_loss(self, index: int) -> Callable[..., torch.Tensor]:
        """Batch ``index``'s loss as a function of the parameters, for torch.func; the caller replays the RNGs
        around the whole transform (see ``_func_hvp``)."""

        def f(*params: torch.Tensor) -> torch.Tensor:
            return self.objective.loss(index, params, replay=False)

        return f

    def _primals(self) -> tuple[torch.Tensor, ...]:
        return tuple(leaf.detach() for leaf in self._leaves)

    @torch.enable_grad()
    def _probe_forward_mode(self) -> None:
        """One eager forward-over-reverse pass on batch 0, so a model without forward-mode derivatives is refused
        at construction. (Tracing such a model for ``linearize`` can even crash the interpreter inside torch, seen
        with ``mse_loss`` on torch 2.13, while the eager pass raises cleanly.)"""
        try:
            self._func_hvp([torch.zeros_like(p) for p in self._primals()], 0, linearized=False)
        except (RuntimeError, NotImplementedError) as error:
            if _is_forward_ad_failure(error):
                raise _forward_mode_unsupported(error) from error
            if _is_not_twice_differentiable(error):
                raise NotTwiceDifferentiableError(f"cannot differentiate the gradient: {error}") from error
            raise

    @torch.enable_grad()
    def _linearize_all(self) -> None:
        argnums = tuple(range(len(self._leaves)))
        primals = self._primals()
        for i in range(len(self.objective.batches)):
            with self.objective.replaying(i), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.fx const-folding chatter
                try:
                    _, jvp_fn = torch.func.linearize(torch.func.grad(self._stateless_loss(i), argnums), *primals)
                except Exception as error:  # noqa: BLE001 - reported with its cause
                    if _is_forward_ad_failure(error):
                        raise _forward_mode_unsupported(error) from error
                    if _is_not_twice_differentiable(error):
                        raise NotTwiceDifferentiableError(f"cannot linearize the gradient: {error}") from error
                    raise UsageError(
                        f"method='linearize' does not support this model ({type(error).__name__}: {error}); "
                        "use method='graph' or 'func'"
                    ) from error
            self._linearized.append(jvp_fn)

    def _recomputed_hvp(self, vectors: torch.Tensor, index: int, batched: bool) -> tuple[torch.Tensor, ...]:
        loss = self.objective.loss(index)
        grads = torch.autograd.grad(loss, self._leaves, create_graph=True, materialize_grads=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        return torch.autograd.grad(
            flat, self._leaves, grad_outputs=vectors, is_grads_batched=batched, materialize_grads=True
        )

    def _func_hvp(self, tangents: Sequence[torch.Tensor], index: int, linearized: bool) -> Sequence[torch.Tensor]:
        with self.objective.replaying(index):
            if linearized:
                return self._linearized[index](*tangents)
            argnums = tuple(range(len(self._leaves)))
            grad_f = torch.func.grad(self._stateless_loss(index), argnums)
            _, hvp = torch.func.jvp(grad_f, self._primals(), tuple(tangents))
            return hvp

    # ------------------------------------------------------------------------------------------------------------
    # Products

    def _products(self, vectors: torch.Tensor, batched: bool) -> torch.Tensor:
        """``H v`` for a flat ``v``, or ``H v_j`` for every row of a ``(k, n)`` matrix when ``batched`` (one
        vectorised pass instead of ``k``)."""
        lead = (vectors.shape[0],) if batched else ()

        def flat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
            return torch.cat([h.reshape(*lead, -1) for h in parts], dim=-1)

        if self.method == "graph":
            # One backward through the kept sum_i w_i g_i covers every batch at once.
            return flat(torch.autograd.grad(
                self._flat_grad_graph, self._leaves, grad_outputs=vectors, retain_graph=True,
                is_grads_batched=batched, materialize_grads=True,
            ))
        out = None
        if self.method == "recompute":
            for i, w in enumerate(self.weights):
                term = flat(self._recomputed_hvp(vectors, i, batched))
                out = term.mul_(w) if out is None else out.add_(term, alpha=w)
            return out
        sizes = [p.numel() for p in self._leaves]
        tangents = [t.reshape(*lead, *p.shape) for t, p in zip(torch.split(vectors, sizes, dim=-1), self._leaves)]
        linearized = self.method == "linearize"
        for i, w in enumerate(self.weights):
            if batched:
                # randomness="same": the replayed dropout mask is shared by every column, as in a single product.
                parts = torch.func.vmap(lambda *t: tuple(self._func_hvp(t, i, linearized)), randomness="same")(
                    *tangents
                )
            else:
                parts = self._func_hvp(tangents, i, linearized)
            term = flat(parts)
            out = term.mul_(w) if out is None else out.add_(term, alpha=w)
        return out

    @torch.enable_grad()
    def _checked_products(self, vectors: torch.Tensor, batched: bool) -> torch.Tensor:
        if self._closed:
            raise UsageError("this HessianOperator was closed; build a new one")
        try:
            out = self._products(vectors, batched)
        except (RuntimeError, NotImplementedError) as error:
            if self.method in ("func", "linearize") and _is_forward_ad_failure(error):
                raise _forward_mode_unsupported(error) from error
            if _is_not_twice_differentiable(error):
                raise NotTwiceDifferentiableError(
                    f"the backward pass of this model cannot be differentiated again ({error})"
                ) from error
            raise
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"Hessian-vector product {self.n_hvp + 1} has NaN or infinite entries")
        return out

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._checked_products(v, batched=False)

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``(num_params, k)``, vectorised over columns (``torch.vmap``) in chunks of
        :attr:`matmat_chunk` columns; falls back to one product per column where an op has no batching rule.
        Counts ``k`` products in :attr:`n_hvp`."""
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != self.num_params:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ValueError(f"expected shape ({self.num_params}, k), got {shape}")
        rows = vectors.to(device=self.device, dtype=self.dtype).T
        if not self._batched_ok or rows.shape[0] == 1:
            return super().matmat(vectors)
        blocks = []
        for start in range(0, rows.shape[0], self.matmat_chunk):
            block = rows[start : start + self.matmat_chunk].contiguous()
            try:
                blocks.append(self._checked_products(block, batched=True))
            except (NotTwiceDifferentiableError, NonFiniteError, UsageError):
                raise
            except Exception:  # noqa: BLE001 - no batching rule for some op: one product per column instead
                self._batched_ok = False
                done = sum(b.shape[0] for b in blocks)
                self._n_hvp += done
                rest = super().matmat(vectors[:, done:])
                return torch.cat([torch.cat(blocks).T, rest], dim=1) if blocks else rest
        self._n_hvp += rows.shape[0]
        return torch.cat(blocks).T

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the same weighted mean loss at the same point (a fresh tensor)."""
        return self._gradient.clone()

    def close(self) -> None:
        """Free the kept graphs and traced functions; further products raise :class:`UsageError`."""
        self._flat_grad_graph = None
        self._linearized = []
        self._closed = True

    def __enter__(self) -> "HessianOperator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HessianOperator(num_params={self.num_params}, batches={len(self.objective.batches)}, method={self.method!r}, "
            f"device={self.device}, dtype={self.dtype})"
        )
