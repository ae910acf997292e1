"""The sample-weighted mean loss over batches, as a function of a model's flat trainable parameters.

:class:`BatchObjective` is the one place where optdiag evaluates a model's loss: the Hessian operator
differentiates it twice at the current parameters, the sharpness measures and the loss landscape evaluate it at
perturbed parameters, and the gradient-noise estimate takes its per-batch gradients. Evaluating it leaves the model
alone:

* parameters go in through ``torch.func.functional_call`` and are never written; buffers are replaced by private
  copies for each forward pass (so a train-mode BatchNorm never updates the model's running statistics);
* gradients are taken with ``torch.autograd.grad`` (``.grad`` is never touched); modes are never changed;
* random ops (dropout) draw fixed values: the batches draw from one continuing stream starting at the RNG state at
  construction, as in a training loop, and every later evaluation of a batch replays its draws. The global RNGs
  never move.

Forwards run with grad enabled, autocast off and, by default, attention on the math kernel (full precision and
twice differentiable). ``math_attention=False`` leaves attention on whatever kernel the model picks (fused kernels
have a first derivative but no second): what the finite-difference Hessian-vector product needs
(docs/finite-difference-and-fsdp.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from optdiag.curvature.base import all_finite
from optdiag.curvature.batches import as_batch_list, batch_weights, move_batch
from optdiag.curvature.params import flatten, is_sharded, trainable_parameters, unflatten
from optdiag.curvature.state import GENERATORS, RngState, replayed_rng, rng_state
from optdiag.errors import NonFiniteError, UsageError

__all__ = ["BatchObjective", "LossFn"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _LossCall(nn.Module):
    """Holds the model so that ``functional_call`` can swap its tensors around a whole ``loss_fn`` call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


@contextlib.contextmanager
def _exact_forward(device: torch.device, math_attention: bool = True) -> Iterator[None]:
    """Full precision forward: grad on, autocast off, attention by the math kernel when ``math_attention``
    (twice differentiable), else by the model's own choice of kernel."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
        if device.type != "cpu":
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        if math_attention:
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
            except ImportError:  # torch < 2.3: only the math kernel is twice differentiable anyway on CPU
                pass
            else:
                # Fused attention kernels have no double backward; the math kernel is plain differentiable ops.
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def _only(state: RngState, generators: tuple[str, ...]) -> RngState:
    """``state`` restricted to ``generators`` (the others set to ``None``: neither replayed nor put back)."""
    return dataclasses.replace(
        state,
        torch_cpu=state.torch_cpu if "torch" in generators else None,
        torch_cuda=state.torch_cuda if "torch" in generators else None,
        numpy=state.numpy if "numpy" in generators else None,
        python=state.python if "python" in generators else None,
    )


class BatchObjective:
    """``L(theta) = sum_i w_i loss_fn(model, batch_i)`` at any flat trainable-parameter vector ``theta``.

    ``w_i = n_i / sum_j n_j`` with ``n_i`` the size of batch ``i`` (the leading dimension of its first tensor, or
    ``batch_sizes[i]``). Flat vectors follow ``model.named_parameters()`` order restricted to parameters with
    ``requires_grad`` (:func:`optdiag.curvature.params.trainable_parameters`). The model is evaluated in the mode it
    is in; see the module docstring for what is (not) touched and how dropout masks stay fixed.

    Args:
        model: the network; its trainable parameters define :meth:`point` and the device.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch (reaching the parameters through
            ``model``), e.g. ``supervised_loss(nn.MSELoss())``.
        batches: one batch or an iterable of batches (see :func:`optdiag.curvature.batches.as_batch_list`); kept,
            as a list, on the model's device.
        batch_sizes: the size ``n_i`` of each batch; inferred from the leading dimension when ``None``.
        dtype: compute in this floating dtype (the model is not cast: private converted copies of the parameters,
            buffers and floating inputs are used). ``None``: the trainable parameters' dtype.
        batch_list: ``batches`` is already a list of batches (no guessing whether a list of tensors is one batch).
        math_attention: force ``scaled_dot_product_attention`` onto the math kernel (twice differentiable, memory
            O(L^2) in the sequence length); ``False`` keeps the model's own kernel (a fused one has no double
            backward, which only exact Hessian-vector products need).

    Attributes:
        model, loss_fn: as given.
        names: the trainable parameters' names, in flat order.
        parameters: the tensors at the point, in flat order and ``dtype``: the model's own parameters, or their
            converted copies when computing in another dtype. Read them; never write them.
        batches: the batches, on the device (floating tensors converted when computing in another dtype).
        weights: ``w_i`` of each batch.
        num_params, device, dtype: the length, device and dtype of flat vectors.
        n_evals: evaluations of the whole objective so far (:meth:`value`, :meth:`value_and_grad`,
            :meth:`per_batch`).

    Raises:
        UsageError: a bad model, ``loss_fn``, ``dtype`` or batch sizes, no batches, ``torch.inference_mode``,
            parameters on several devices or of mixed dtypes without ``dtype``.
        ValueError: the model has no trainable parameters.

    Example:
        >>> net = nn.Linear(2, 1, bias=False); _ = net.weight.data.zero_()
        >>> f = BatchObjective(net, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (torch.ones(4, 2), torch.ones(4, 1)))
        >>> f.value(f.point()), f.value(torch.tensor([0.5, 0.5]))
        (1.0, 0.0)
        >>> f.value_and_grad(f.point())[1]
        tensor([-2., -2.])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Any,
        *,
        batch_sizes: Optional[Sequence[float]] = None,
        dtype: Optional[torch.dtype] = None,
        batch_list: bool = False,
        math_attention: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise UsageError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise UsageError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if torch.is_inference_mode_enabled():
            raise UsageError(
                "optdiag cannot evaluate a loss under torch.inference_mode(): inference tensors record no autograd "
                "graph. Call it outside inference_mode (torch.no_grad() is fine)."
            )
        named = trainable_parameters(model)
        for name, p in named:
            if p.is_inference():
                raise UsageError(f"parameter {name!r} is an inference tensor (created under inference_mode)")
        if dtype is None:
            param_dtypes = {p.dtype for _, p in named}
            if len(param_dtypes) != 1:
                raise UsageError(
                    f"the trainable parameters have mixed dtypes {sorted(map(str, param_dtypes))}; pass dtype=..."
                )
            dtype = next(iter(param_dtypes))
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise UsageError(f"the trainable parameters live on several devices {sorted(map(str, devices))}")

        self.model = model
        self.loss_fn = loss_fn
        self.names = [name for name, _ in named]
        self.device = next(iter(devices))
        self.dtype = dtype
        self.num_params = sum(p.numel() for _, p in named)
        raw = list(batches) if batch_list else as_batch_list(batches)
        if not raw:
            raise UsageError("batches is empty: at least one batch is needed")
        self.weights = batch_weights(raw, batch_sizes)
        self._cast = any(p.dtype != dtype for p in model.parameters() if p.is_floating_point())
        self.batches = [move_batch(b, self.device, dtype if self._cast else None) for b in raw]
        self._holder = _LossCall(model, loss_fn)
        self.math_attention = bool(math_attention)
        self.sharded = any(is_sharded(p) for _, p in named)
        self._keys = [f"model.{name}" for name in self.names]
        self._fixed = self._fixed_tensors()
        self.parameters = (
            [self._fixed[key].requires_grad_(True) for key in self._keys] if self._cast else [p for _, p in named]
        )
        # Random draws: batch i's RNG snapshot is taken when it is first evaluated, continuing the stream where
        # batch i-1 left it, starting at the global state now; later evaluations replay it.
        self._next_state = rng_state()
        self._snapshots: list[RngState] = []
        self._moved: set[str] = set()
        self._replayed: tuple[str, ...] = GENERATORS
        self.n_evals = 0

    # ------------------------------------------------------------------------------------------------------------
    # The model's tensors as functional_call sees them

    def _fixed_tensors(self) -> dict[str, torch.Tensor]:
        """Converted copies of every floating parameter when computing in another dtype, else nothing (the
        model's own parameters are used)."""
        if not self._cast:
            return {}
        return {
            f"model.{name}": (p.detach().to(self.dtype) if p.is_floating_point() else p.detach())
            for name, p in self.model.named_parameters()
        }

    def _buffer_copies(self) -> dict[str, torch.Tensor]:
        """Fresh private copies of the buffers, so a train-mode forward (BatchNorm's running statistics) never
        writes the model's own."""
        copies = {}
        for name, buf in self.model.named_buffers():
            value = buf.detach()
            if self._cast and value.is_floating_point():
                value = value.to(self.dtype)
            copies[f"model.{name}"] = value.clone()
        return copies

    def _forward(self, index: int, params: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
        tensors = dict(self._fixed)
        tensors.update(self._buffer_copies())
        if params is not None:
            tensors.update(zip(self._keys, params))
        with _exact_forward(self.device, self.math_attention):
            loss = functional_call(self._holder, tensors, (self.batches[index],), strict=False)
        return self._checked_loss(loss, index)

    @staticmethod
    def _checked_loss(loss: Any, index: int) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor):
            raise UsageError(f"loss_fn must return a tensor, got {type(loss).__name__} for batch {index}")
        if loss.numel() != 1:
            raise UsageError(
                f"loss_fn must return a scalar (the mean loss of the batch), got shape {tuple(loss.shape)} for "
                f"batch {index}; reduce it with .mean()"
            )
        if not loss.is_floating_point():
            raise UsageError(f"loss_fn returned a {loss.dtype} tensor for batch {index}; a floating loss is needed")
        return loss.reshape(())

    # ------------------------------------------------------------------------------------------------------------
    # Fixed random draws

    def _first_visit(self, index: int, params: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Evaluate batch ``index`` for the first time, continuing the random stream, and keep its snapshot."""
        with replayed_rng(self._next_state):
            before = rng_state()
            loss = self._forward(index, params)
            self._next_state = rng_state()
        self._moved.update(self._next_state.changed_since(before))
        self._snapshots.append(before)
        if len(self._snapshots) == len(self.batches):
            # Replay only the generators the forward passes use (usually torch's, for dropout; none in eval mode),
            # so later evaluations do not pay for snapshots they do not need.
            self._replayed = tuple(g for g in GENERATORS if g in self._moved)
            self._snapshots = [_only(state, self._replayed) for state in self._snapshots]
        return loss

    def replaying(self, index: int) -> contextlib.AbstractContextManager:
        """A context in which random ops draw what batch ``index`` drew at its first evaluation (the global RNGs
        are put back on exit). Needed only with ``loss(..., replay=False)``.

        Raises:
            UsageError: batch ``index`` was never evaluated, so there are no draws to replay yet.
        """
        if index >= len(self._snapshots):
            raise UsageError(f"batch {index} has not been evaluated yet; call loss({index}) first")
        if len(self._snapshots) == len(self.batches) and not self._replayed:
            return contextlib.nullcontext()
        return replayed_rng(self._snapshots[index])

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation

    def loss(
        self, index: int, params: Optional[Sequence[torch.Tensor]] = None, *, replay: bool = True
    ) -> torch.Tensor:
        """The mean loss of batch ``index`` as a scalar tensor with its autograd graph.

        Args:
            index: which batch.
            params: one tensor per trainable parameter (shapes of :attr:`parameters`, in flat order), e.g. leaves
                to differentiate; ``None`` uses :attr:`parameters`.
            replay: draw the batch's fixed random values (see :meth:`replaying`). ``False`` leaves the RNGs to the
                caller, for use inside ``torch.func`` transforms, which must not reset generators themselves; the
                caller wraps the transform in ``replaying(index)``.

        Raises:
            UsageError: ``loss_fn`` returned no floating scalar tensor.
        """
        if not replay:
            return self._forward(index, params)
        for earlier in range(len(self._snapshots), index):  # earlier batches come first in the random stream
            self._first_visit(earlier, None)
        if index == len(self._snapshots):
            return self._first_visit(index, params)
        with self.replaying(index):
            return self._forward(index, params)

    def loss_and_grad(
        self,
        index: int,
        params: Optional[Sequence[torch.Tensor]] = None,
        *,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The loss of batch ``index`` (as :meth:`loss`) and its gradient with respect to ``params`` (default
        :attr:`parameters`), one tensor per parameter; zeros for parameters the loss does not use.

        Args:
            create_graph: keep the gradient's graph, to differentiate it again (Hessian-vector products).

        Raises:
            NonFiniteError: the loss is NaN or infinite.
            UsageError: the loss does not depend on the parameters (no autograd graph).
        """
        inputs = self.parameters if params is None else list(params)
        loss = self.loss(index, inputs)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(f"the loss of batch {index} is {value}")
        if loss.grad_fn is None:
            raise UsageError(
                f"the loss of batch {index} does not depend on the trainable parameters (it has no autograd "
                "graph): was it computed under torch.no_grad() or detached?"
            )
        return loss, torch.autograd.grad(loss, inputs, create_graph=create_graph, materialize_grads=True)

    def _check_whole(self) -> None:
        """Refuse flat parameter vectors for sharded (FSDP ``DTensor``) parameters: FSDP gathers its own shards
        for each forward, so ``functional_call`` cannot put other values in, and trying leaves FSDP's state
        broken. Only the model's own parameters can be evaluated there (``loss(index)``)."""
        if self.sharded:
            raise UsageError(
                "the loss at other parameters than the model's own is not available for sharded (FSDP) parameters; "
                "curvature there comes from finite differences of FSDP's own gradients "
                "(docs/finite-difference-and-fsdp.md)"
            )

    def point(self) -> torch.Tensor:
        """The current parameters as one flat vector in :attr:`dtype` (a copy).

        Raises:
            UsageError: the parameters are sharded (see :meth:`_check_whole`).
        """
        self._check_whole()
        return flatten(p.detach() for p in self.parameters)

    def _leaves(self, point: torch.Tensor, requires_grad: bool) -> list[torch.Tensor]:
        self._check_whole()
        point = torch.as_tensor(point)
        if point.dim() != 1 or point.numel() != self.num_params:
            raise UsageError(f"expected flat parameters of length {self.num_params}, got shape {tuple(point.shape)}")
        parts = unflatten(point.to(device=self.device, dtype=self.dtype), self.parameters)
        return [t.detach().clone().requires_grad_(requires_grad) for t in parts]

    def per_batch(
        self, point: torch.Tensor, with_grad: bool = True, *, finite: bool = True
    ) -> list[tuple[float, Optional[torch.Tensor]]]:
        """Each batch's loss and flat gradient (``None`` unless ``with_grad``) at flat parameters ``point``.

        Args:
            point: flat parameters of length :attr:`num_params`.
            with_grad: also take each batch's gradient.
            finite: refuse a NaN or infinite loss; ``False`` returns it as it is (only without ``with_grad``: a
                gradient of a non-finite loss means nothing).

        Raises:
            UsageError: ``point`` has the wrong length, or a bad loss (see :meth:`loss_and_grad`).
            NonFiniteError: a loss (when ``finite`` or ``with_grad``) or gradient is NaN or infinite.
        """
        return list(self.each_batch(point, with_grad, finite=finite))

    def each_batch(
        self, point: torch.Tensor, with_grad: bool = True, *, finite: bool = True
    ) -> Iterator[tuple[float, Optional[torch.Tensor]]]:
        """:meth:`per_batch`'s results one batch at a time, so that a caller holds one gradient at a time (an
        evaluation is counted once all are taken)."""
        leaves = self._leaves(point, with_grad)
        for index in range(len(self.batches)):
            if with_grad:
                loss, grads = self.loss_and_grad(index, leaves)
                gradient = flatten(grads)
                if not all_finite(gradient):
                    raise NonFiniteError(f"the gradient of batch {index} has NaN or infinite entries")
            else:
                loss, gradient = self.loss(index, leaves), None
            value = float(loss.detach())
            if finite and not math.isfinite(value):
                raise NonFiniteError(f"the loss of batch {index} is {value}")
            yield value, gradient
        self.n_evals += 1

    def value(self, point: torch.Tensor, *, finite: bool = True) -> float:
        """``L(point)``, the weighted mean loss at flat parameters ``point`` (no gradient is taken).

        Args:
            finite: refuse a NaN or infinite loss with :class:`NonFiniteError`; ``False`` returns it (a loss
                landscape far from the point may well be infinite).
        """
        parts = self.per_batch(point, with_grad=False, finite=finite)
        return sum(w * loss for w, (loss, _) in zip(self.weights, parts))

    def value_and_grad(self, point: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``L(point)`` and its flat gradient, summed batch by batch: one batch's gradient is held at a time
        besides the sum (not every batch's, as :meth:`per_batch` returns them)."""
        value, gradient = 0.0, None
        for index, (loss, part) in enumerate(self.each_batch(point)):
            weight = float(self.weights[index])
            value += weight * loss
            gradient = part.mul_(weight) if gradient is None else gradient.add_(part.mul_(weight))
        return value, gradient

    def __repr__(self) -> str:
        return (
            f"BatchObjective(num_params={self.num_params}, batches={len(self.batches)}, device={self.device}, "
            f"dtype={self.dtype})"
        )
