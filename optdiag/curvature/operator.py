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

import math
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from optdiag.curvature.base import CurvatureOperator, all_finite
from optdiag.curvature.batches import sample_count
from optdiag.curvature.objective import BatchObjective, LossFn
from optdiag.curvature.params import is_fsdp1_flattened, is_sharded, local_part
from optdiag.errors import NonFiniteError, NotTwiceDifferentiableError, UsageError
from optdiag.policy import check_number

__all__ = ["HessianOperator", "FiniteDifferenceOperator", "supervised_loss", "LossFn", "METHODS", "HVP_METHODS",
           "choose_hvp_method", "make_hessian_operator", "parameters_sharded"]

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
        if not all_finite(flat.detach()):
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
        return out  # checked for NaN and Inf by the caller: matvec_and_norm, or matmat below

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
                self.finite_norms(blocks[-1], f"the block of Hessian-vector products {self.n_hvp + start + 1}-"
                                              f"{self.n_hvp + start + block.shape[0]}")
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


# ----------------------------------------------------------------------------------------------------------------
# Finite differences of the gradient

#: The Hessian-vector product engines a caller can choose between (``HessianMonitor(hvp=...)``, ``analyze``).
HVP_METHODS = ("auto", "exact", "finite_difference")


def _shard_group(parameters: Sequence[torch.Tensor]) -> tuple[Any, int, int] | None:
    """``(process group, its size, this rank's index in it)`` when the parameters are sharded: ``DTensor``s on one
    1-D device mesh (FSDP2's layout), or FSDP1's flattened parameters (their slices are disjoint over the ranks of
    the default group: ``FULL_SHARD`` or ``SHARD_GRAD_OP``, which the caller makes sure of); None when none is.

    Raises:
        UsageError: some parameters are sharded and others not, several meshes, a mesh of more than one
            dimension, or a placement other than ``Shard`` (tensor parallelism: the local parts overlap or are
            combined differently, which this operator does not model).
    """
    flags = [is_sharded(p) for p in parameters]
    if not any(flags):
        return None
    if not all(flags):
        raise UsageError("some trainable parameters are sharded (FSDP) and others are not; shard all of them "
                         "(fully_shard the root module too, or wrap the whole model in FullyShardedDataParallel) "
                         "or none")
    fsdp1 = [is_fsdp1_flattened(p) for p in parameters]
    if all(fsdp1):
        import torch.distributed as dist

        group = dist.group.WORLD
        return group, dist.get_world_size(group), dist.get_rank(group)
    if any(fsdp1):
        raise UsageError("some parameters are sharded by FSDP1 (FullyShardedDataParallel) and others by FSDP2 "
                         "(fully_shard); use one of them")
    from torch.distributed.tensor import Shard
    meshes = {id(p.device_mesh): p.device_mesh for p in parameters}
    if len(meshes) != 1:
        raise UsageError("the sharded parameters live on several device meshes; one FSDP mesh is supported")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1 or any(not all(isinstance(pl, Shard) for pl in p.placements) for p in parameters):
        raise UsageError(
            "only fully sharded data parallelism (FSDP, a 1-D mesh with Shard placements) is supported; tensor or "
            "hybrid parallelism is not (ModelParallelStrategy needs tensor_parallel_size=1)"
        )
    return mesh.get_group(), mesh.size(), mesh.get_local_rank()


class FiniteDifferenceOperator(CurvatureOperator):
    """The Hessian of the sample-weighted mean loss over some batches by central differences of the gradient.

    ``H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps)``: two gradients per product and no double backward,
    so it works wherever the gradient does: fused attention kernels (their backward has no derivative), compiled
    models, and parameters sharded across ranks by FSDP (FSDP2's ``DTensor`` parameters, FSDP1's flattened
    parameters with ``use_orig_params=True``), where vectors are this rank's
    part only (see :class:`~optdiag.curvature.base.CurvatureOperator`) and each gradient is FSDP's own backward,
    reduced across the ranks' batches. The same loss, weights and fixed dropout masks as :class:`HessianOperator`
    (one :class:`~optdiag.curvature.objective.BatchObjective`), but attention keeps the model's own kernel.

    **Step.** ``eps = step_scale * u**(1/3) * (1 + |theta|) / |v|`` with ``u`` the unit roundoff of the dtype: the
    step that balances the truncation error ``O(eps^2)`` of central differences against the rounding error
    ``O(u / eps)`` of the gradients' difference, on the scale of the parameters (docs/finite-difference-and-fsdp.md
    derives it and gives the accuracy measured in float32 and float64). The first ``error_checks`` products are
    also taken at ``2 eps`` (two gradients more each, counted as one more product in :attr:`n_hvp`); the relative
    difference of the two is the product's error estimate (truncation and rounding together), in :attr:`errors`.

    **Do no harm.** Unsharded, the model is never written (parameters go in through ``functional_call``). Sharded,
    the parameters' local shards are moved in place for each gradient and copied back from saved copies (bitwise,
    never by subtracting the step), and every ``.grad`` is put back as the very tensor it was. Buffers are private
    copies and the RNGs are replayed and restored (as for :class:`HessianOperator`).

    **Sharded (FSDP2, FSDP1).** Every rank must build the operator and ask for every product together (each
    gradient is a collective), with the same number of batches. The product of batch ``i`` is the Hessian of the
    union of every rank's batch ``i``; FSDP's gradient reduction averages over ranks, so each rank's loss is scaled
    by its share of the samples first. The parameters' own dtype is used (no ``dtype`` conversion). Under FSDP1,
    ``loss_fn`` must run the model through its root ``FullyShardedDataParallel`` (which gathers the root's own
    parameters), and that root must free its gathered parameters after a forward that no backward follows
    (the callbacks do both: docs/finite-difference-and-fsdp.md).

    Args:
        model, loss_fn, batches, batch_sizes, dtype: as for :class:`HessianOperator`.
        step_scale: the constant in front of the step rule (default 0.1, the best measured on smooth networks in
            float32 and float64: docs/finite-difference-and-fsdp.md).
        error_checks: how many of the first products get an error estimate (``0``: none).

    Attributes:
        method: ``"finite_difference"``.
        loss: the weighted mean loss at the point (over all ranks when sharded).
        weights: the weight of each local batch.
        theta_norm: ``|theta|`` (over all ranks when sharded).
        errors: the relative error estimate of each checked product, ``|D(2 eps) - D(eps)| / |D(eps)|``.
        n_gradients: gradients computed so far (the point's included).
        objective: the :class:`~optdiag.curvature.objective.BatchObjective` (attention on the model's kernel).

    Raises:
        UsageError: as for :class:`HessianOperator`, a ``dtype`` other than the sharded parameters' own, an
            unsupported sharding, different numbers of batches on different ranks.
        NonFiniteError: the loss or its gradient is NaN/Inf.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
        >>> fd = FiniteDifferenceOperator(net, supervised_loss(nn.MSELoss()), data)
        >>> exact = HessianOperator(net, supervised_loss(nn.MSELoss()), data)
        >>> v = torch.randn(fd.num_params, dtype=torch.float64)
        >>> bool(torch.allclose(fd @ v, exact @ v, rtol=1e-6, atol=1e-8)), fd.n_gradients
        (True, 5)
    """

    method = "finite_difference"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Any,
        *,
        batch_sizes: Optional[Sequence[float]] = None,
        dtype: Optional[torch.dtype] = None,
        step_scale: float = 0.1,
        error_checks: int = 1,
    ) -> None:
        check_number("step_scale", step_scale, low=0.0, low_open=True, what="a positive number")
        check_number("error_checks", error_checks, low=0, integer=True, what="an int >= 0")
        self.objective = BatchObjective(model, loss_fn, batches, batch_sizes=batch_sizes, dtype=dtype,
                                        math_attention=False)
        params = self.objective.parameters
        shards = _shard_group(params)
        if shards is not None and self.objective.dtype != params[0].dtype:
            raise UsageError(f"sharded parameters are differentiated in their own dtype {params[0].dtype}, not "
                             f"{self.objective.dtype}: pass dtype=None")
        self._local = [local_part(p) for p in params] if shards is not None else list(params)
        super().__init__(sum(t.numel() for t in self._local), self.objective.device, self.objective.dtype)
        self.model, self.loss_fn = model, loss_fn
        self.sharded = shards is not None
        self._group, self._world, self._rank = shards if shards is not None else (None, 1, 0)
        self._total = int(self.shard_sum(torch.tensor([float(self.num_params)], dtype=torch.float64)).item())
        self.weights = self.objective.weights
        self._scales = self._loss_scales(batch_sizes)
        self.step_scale, self.error_checks = float(step_scale), int(error_checks)
        self.errors: list[float] = []
        self.n_gradients = 0
        self._closed = False
        self._point = torch.cat([t.detach().reshape(-1) for t in self._local]).to(self.dtype)
        self.theta_norm = float(self.vector_norm(self._point))
        self._roundoff = float(torch.finfo(self.dtype).eps) / 2
        self.loss, self._gradient = self._loss_and_gradient(None)

    # --- sharding ------------------------------------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        return self._total

    @property
    def shard_index(self) -> int:
        return self._rank

    def shard_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return tensor
        from optdiag.curvature.distributed import reduce_sum

        return reduce_sum(tensor, self._group)

    def _loss_scales(self, batch_sizes: Optional[Sequence[float]]) -> list[float]:
        """What each local batch's loss is multiplied by before its backward pass.

        Unsharded: its weight ``w_i``. Sharded: FSDP averages the gradient over the ``W`` ranks, so rank ``r``'s
        batch ``i`` (``n_ri`` samples) is scaled by ``n_ri W / N`` with ``N`` all samples of all batches on all
        ranks: the average is then the sample-weighted mean gradient of the union.
        """
        if not self.sharded:
            return list(self.weights)
        batches = self.objective.batches
        sizes = [float(n) for n in batch_sizes] if batch_sizes is not None else \
            [float(sample_count(b, i)) for i, b in enumerate(batches)]
        count, squares, total = self.shard_sum(
            torch.tensor([float(len(sizes)), float(len(sizes)) ** 2, sum(sizes)], dtype=torch.float64)).tolist()
        if count**2 != squares * self._world:  # (sum x)^2 == W sum x^2 only when every rank's x is the same
            raise UsageError("every rank must hold the same number of probe batches (each gradient is a collective)")
        return [n * self._world / total for n in sizes]

    # --- gradients -----------------------------------------------------------------------------------------------
    def _loss_and_gradient(self, delta: Optional[torch.Tensor]) -> tuple[float, torch.Tensor]:
        """The weighted mean loss and flat (local) gradient at ``theta + delta`` (``delta`` None: at ``theta``)."""
        self.n_gradients += 1
        if not self.sharded:
            point = self._point if delta is None else self._point + delta
            loss, gradient = self.objective.value_and_grad(point)
            return float(loss), gradient
        return self._sharded_loss_and_gradient(delta)

    def _sharded_loss_and_gradient(self, delta: Optional[torch.Tensor]) -> tuple[float, torch.Tensor]:
        params = self.objective.parameters
        grads = [p.grad for p in params]
        saved = [t.detach().clone() for t in self._local] if delta is not None else []
        local_loss = 0.0
        try:
            with torch.no_grad():
                if delta is not None:
                    offset = 0
                    for t in self._local:
                        t.add_(delta[offset : offset + t.numel()].view_as(t).to(t.dtype))
                        offset += t.numel()
                for p in params:
                    p.grad = None
            for i, scale in enumerate(self._scales):
                loss = self.objective.loss(i)
                # every rank runs every backward (collectives), finite or not; the check comes after
                (loss * scale).backward()
                local_loss += float(loss.detach()) * scale / self._world
            gradient = torch.cat([
                (local_part(p.grad) if p.grad is not None else torch.zeros_like(t)).reshape(-1).to(self.dtype)
                for p, t in zip(params, self._local)
            ])
        finally:
            with torch.no_grad():
                for t, copy in zip(self._local, saved):
                    t.copy_(copy)
            for p, g in zip(params, grads):
                p.grad = g
        loss = float(self.shard_sum(torch.tensor([local_loss], dtype=torch.float64)))
        bad = self.shard_sum(torch.tensor([0.0 if math.isfinite(loss) and all_finite(gradient)
                                           else 1.0], dtype=torch.float64))
        if float(bad) > 0:  # every rank raises together
            raise NonFiniteError("the loss or its gradient is NaN or infinite at a finite-difference point")
        return loss, gradient

    # --- products ------------------------------------------------------------------------------------------------
    def step(self, v: torch.Tensor) -> float:
        """The difference step ``eps`` for direction ``v`` (see the class docstring); 0.0 for ``v = 0``."""
        length = float(self.vector_norm(v))
        if length == 0.0:
            return 0.0
        return self.step_scale * self._roundoff ** (1.0 / 3.0) * (1.0 + self.theta_norm) / length

    def _difference(self, v: torch.Tensor, eps: float) -> torch.Tensor:
        _, plus = self._loss_and_gradient(eps * v)
        _, minus = self._loss_and_gradient(-eps * v)
        return (plus - minus) / (2.0 * eps)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise UsageError("this FiniteDifferenceOperator was closed; build a new one")
        eps = self.step(v)
        if eps == 0.0:
            return torch.zeros_like(v)
        product = self._difference(v, eps)
        if len(self.errors) < self.error_checks:
            wider = self._difference(v, 2.0 * eps)
            scale = float(self.vector_norm(product))
            difference = float(self.vector_norm(wider - product))
            self.errors.append(difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf))
            self._n_hvp += 1  # the check costs what a product costs: the budget sees it
        return product

    @property
    def relative_error(self) -> Optional[float]:
        """The largest relative error estimate of the checked products (None before one was checked)."""
        return max(self.errors) if self.errors else None

    def gradient(self) -> torch.Tensor:
        """The flat (local) gradient of the weighted mean loss at the point (a fresh tensor)."""
        return self._gradient.clone()

    def close(self) -> None:
        """Further products raise :class:`UsageError` (nothing is held but the point and its gradient)."""
        self._closed = True

    def __enter__(self) -> "FiniteDifferenceOperator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FiniteDifferenceOperator(num_params={self.num_params}, batches={len(self.objective.batches)}, "
                f"sharded={self.sharded}, device={self.device}, dtype={self.dtype})")



#: The relative error of a finite-difference product to expect, by dtype (measured on smooth networks,
#: docs/finite-difference-and-fsdp.md); said when the method is chosen.
_EXPECTED_ERROR = {torch.float64: "1e-9", torch.float32: "1e-4"}


def parameters_sharded(model: nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is sharded (a ``DTensor`` of FSDP2, a flattened parameter of
    FSDP1): then no exact product.

    Example:
        >>> parameters_sharded(nn.Linear(2, 1))
        False
    """
    return any(is_sharded(p) for p in model.parameters() if p.requires_grad)


def choose_hvp_method(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, hvp: str = "auto", dtype: Optional[torch.dtype] = None
) -> tuple[str, str]:
    """Resolve ``hvp`` (one of :data:`HVP_METHODS`) to ``"exact"`` or ``"finite_difference"``, with the reason.

    ``"auto"``: the exact double-backward product where it exists, finite differences where it does not: sharded
    parameters (FSDP), or a model whose backward cannot be differentiated (a fused attention kernel, a custom
    ``autograd.Function`` without double backward, a compiled model), found by one exact product on ``batch`` (a
    probe; a not-twice-differentiable failure, or running out of memory (the exact product's math-kernel
    attention), chooses finite differences; any other error propagates). Call it once and
    keep the answer: the probe costs a forward, a backward and a product.

    Returns:
        ``(method, reason)``; the reason names the cause and the accuracy to expect, for the log.

    Raises:
        UsageError: ``hvp`` is not one of :data:`HVP_METHODS`; ``"exact"`` for sharded parameters.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> choose_hvp_method(net, supervised_loss(nn.MSELoss()), (torch.ones(4, 2), torch.ones(4, 1)))[0]
        'exact'
    """
    if hvp not in HVP_METHODS:
        raise UsageError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    precision = dtype or next(p.dtype for p in model.parameters() if p.requires_grad)
    expected = _EXPECTED_ERROR.get(precision, "1e-2 or worse")
    accuracy = (f"two gradients per product, relative error about {expected} in {str(precision).removeprefix('torch.')}"
                " (each snapshot reports its estimate)")
    if parameters_sharded(model):
        if hvp == "exact":
            raise UsageError("exact Hessian-vector products need whole parameters; sharded (FSDP) parameters need "
                             "hvp='finite_difference' or 'auto'")
        return "finite_difference", f"the parameters are sharded (FSDP): no double backward; {accuracy}"
    if hvp == "finite_difference":
        return hvp, f"asked for; {accuracy}"
    if hvp == "exact":
        return hvp, "asked for"
    try:
        with HessianOperator(model, loss_fn, [batch], method="recompute", dtype=dtype) as op:
            op.matvec(torch.zeros(op.num_params, device=op.device, dtype=op.dtype))
    except NotTwiceDifferentiableError as error:
        return "finite_difference", f"the backward pass cannot be differentiated ({error}); {accuracy}"
    except torch.OutOfMemoryError as error:
        # the exact product forces attention onto the math kernel (O(L^2) memory): where that does not fit, the
        # fused kernel the model trains with still does, and finite differences keep it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return "finite_difference", f"the exact product does not fit in memory ({first_line}); {accuracy}"
    return "exact", "the backward pass is twice differentiable"


def make_hessian_operator(
    method: str, model: nn.Module, loss_fn: LossFn, batches: Any, *, dtype: Optional[torch.dtype] = None
) -> CurvatureOperator:
    """The Hessian operator of a resolved method (see :func:`choose_hvp_method`): :class:`HessianOperator` for
    ``"exact"``, :class:`FiniteDifferenceOperator` for ``"finite_difference"`` (in the parameters' own dtype
    when they are sharded).

    Example:
        >>> op = make_hessian_operator("finite_difference", nn.Linear(2, 1), supervised_loss(nn.MSELoss()),
        ...                            (torch.ones(4, 2), torch.ones(4, 1)))
        >>> op.method
        'finite_difference'
    """
    if method == "exact":
        return HessianOperator(model, loss_fn, batches, dtype=dtype)
    if method == "finite_difference":
        return FiniteDifferenceOperator(model, loss_fn, batches, dtype=None if parameters_sharded(model) else dtype)
    raise UsageError(f"method must be 'exact' or 'finite_difference', got {method!r}")
