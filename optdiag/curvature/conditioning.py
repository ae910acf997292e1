"""What the input side of a model measures: the scales of the features its first layer sees, the loss's autograd graph.

Two cheap, torch-only measurements behind the ill-conditioning and loss-choice findings
(:mod:`optdiag.diagnosis.conditioning` decides; ``docs/conditioning.md`` has the reasoning):

* :class:`InputScaleProbe`: forward pre-hooks find the first layer with parameters that a training forward pass
  reaches, and :class:`FeatureStats` merges the per-feature mean, standard deviation and share of exact zeros of
  what that layer receives over a few batches. The hooks only read their input (no copy kept, nothing changed), and
  are removed once enough samples were seen.
* :func:`inspect_loss_graph`: walks the autograd graph of a loss (``grad_fn`` links, before ``backward``) for a
  squared error (``MseLossBackward0``, ``(a - b) ** 2``, ``d * d``) whose input comes from a ``softmax`` or
  ``sigmoid``, and reads the probabilities and targets the graph already saved. :func:`saturation_statistics`
  turns them into the numbers the loss-choice rule needs. Reading a graph runs nothing and allocates only the
  small statistics.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 2)
    >>> p = torch.softmax(net(torch.ones(4, 3)), dim=-1)
    >>> inspect_loss_graph(nn.functional.mse_loss(p, torch.zeros(4, 2))).kind
    'mse_on_softmax'
    >>> inspect_loss_graph(nn.functional.cross_entropy(net(torch.ones(4, 3)), torch.zeros(4).long())).kind is None
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureStats", "InputScaleProbe", "LossGraph", "inspect_loss_graph", "saturation_statistics",
           "SATURATION_MARGIN", "LOSS_DECLARATIONS"]

#: An output probability within this of 0 or 1 is saturated: its sigmoid slope p (1 - p) is below 0.0099, so the
#: squared error passes at most 2% of the gradient that cross-entropy passes at the same output.
SATURATION_MARGIN = 0.01
#: What a user may declare about the loss (``loss=`` of the monitor): ``"auto"`` reads the graph for the known
#: squared-error nodes; ``"mse_on_probabilities"`` also accepts hand-written forms (any square, through scaling
#: and sums on the way to the probabilities) and keeps reading the graph; ``"other"`` switches the check off.
LOSS_DECLARATIONS = ("auto", "mse_on_probabilities", "other")

_PROBABILITY_NODES = {"SoftmaxBackward0": "softmax", "SigmoidBackward0": "sigmoid"}
# Nodes that move, copy, reshape or convert a tensor without changing its values' meaning: a probability seen
# through them is still a probability.
_PASS_THROUGH = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
                 "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "SelectBackward0", "SliceBackward0",
                 "IndexBackward0", "CloneBackward0", "ExpandBackward0", "PermuteBackward0", "TransposeBackward0",
                 "TBackward0", "ToCopyBackward0", "CatBackward0", "StackBackward0", "SplitBackward0",
                 "UnbindBackward0", "SubBackward0", "RsubBackward0", "SubBackward1", "RsubBackward1",
                 "FlattenBackward0", "AliasBackward0"}
# With the declaration, arithmetic on the way from the probabilities to the square is accepted too (a weighted or
# scaled error written by hand).
_PASS_THROUGH_DECLARED = _PASS_THROUGH | {"MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1",
                                          "AddBackward0", "AddBackward1", "NegBackward0"}
_MAX_NODES = 20_000  # a graph walk visits at most this many nodes (large models' graphs are larger; the loss is near the top)
_BIG = 1 << 63


# --- input scales --------------------------------------------------------------------------------------------------
class FeatureStats:
    """Per-feature mean, standard deviation and share of exact zeros, merged over batches.

    Each batch's moments are taken in float64 and merged with the parallel update of Chan, Golub & LeVeque (1979),
    so a large mean does not swallow a small spread.

    Args:
        feature_dim: the axis that holds the features (``-1`` for a linear layer's input, ``1`` for a convolution's
            channels); every other axis counts as samples.

    Example:
        >>> stats = FeatureStats()
        >>> stats.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> stats.update(torch.tensor([[5.0, 2.0], [7.0, 0.0]]))
        >>> [round(v, 6) for v in stats.stds().tolist()], stats.means().tolist(), stats.zero_share().tolist(), stats.samples
        ([2.236068, 0.866025], [4.0, 0.5], [0.0, 0.75], 4)
    """

    def __init__(self, feature_dim: int = -1) -> None:
        self.feature_dim = int(feature_dim)
        self.samples = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._zeros: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Merge one batch of inputs (read only: no gradient, nothing of ``x`` kept)."""
        with torch.no_grad():
            axis = self.feature_dim % x.dim()
            flat = x.detach().movedim(axis, -1).reshape(-1, x.shape[axis]).to(torch.float64)
            n = flat.shape[0]
            if n == 0:
                return
            mean = flat.mean(dim=0)
            m2 = (flat - mean).square().sum(dim=0)
            zeros = (flat == 0).sum(dim=0).to(torch.float64)
            if self._mean is None or self._mean.shape != mean.shape:
                self.samples, self._mean, self._m2, self._zeros = n, mean.cpu(), m2.cpu(), zeros.cpu()
                return
            total = self.samples + n
            delta = mean.cpu() - self._mean
            self._mean = self._mean + delta * (n / total)
            self._m2 = self._m2 + m2.cpu() + delta.square() * (self.samples * n / total)
            self._zeros = self._zeros + zeros.cpu()
            self.samples = total

    def means(self) -> torch.Tensor:
        """The per-feature means (float64; empty before any update)."""
        return torch.zeros(0, dtype=torch.float64) if self._mean is None else self._mean.clone()

    def stds(self) -> torch.Tensor:
        """The per-feature population standard deviations (float64)."""
        if self._m2 is None:
            return torch.zeros(0, dtype=torch.float64)
        return (self._m2 / max(self.samples, 1)).clamp_min(0).sqrt()

    def zero_share(self) -> torch.Tensor:
        """Per feature, the share of samples that were exactly zero (one-hot columns, blank pixels)."""
        if self._zeros is None:
            return torch.zeros(0, dtype=torch.float64)
        return self._zeros / max(self.samples, 1)


def _feature_axis(module: nn.Module) -> int | None:
    """Where a layer's input holds its features: -1 (linear, recurrent), 1 (convolution); None when not known."""
    if isinstance(module, (nn.Linear, nn.Bilinear, nn.RNNBase)):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    return None


class InputScaleProbe:
    """Measure the per-feature scales of what the first parametrized layer of a model receives.

    :meth:`arm` before a training batch's forward pass: pre-hooks on every module that owns parameters record
    which one the forward reaches first (its input is what the model makes of the raw features); from then on only
    that layer is hooked, and each armed forward merges its input into :attr:`stats` once. :meth:`close` removes the
    hooks (done by itself once ``min_samples`` were seen or ``max_batches`` merged). A first layer that is a
    BatchNorm normalizes the features itself (:attr:`normalized`); one whose feature axis is unknown (an
    embedding, a custom module) is named in :attr:`unsupported` and not measured.

    The hooks read their input and return nothing: training is unchanged (see docs/index.md, do no harm).

    Args:
        model: the module (a LightningModule is a module).
        max_batches: the most batches merged.
        min_samples: stop once this many samples (rows, or positions for a convolution) were seen.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> probe = InputScaleProbe(net, max_batches=1)
        >>> probe.arm(); _ = net(torch.tensor([[1.0, 100.0], [3.0, 300.0]])); probe.disarm()
        >>> probe.layer, probe.done, probe.stats.stds().tolist()
        ('0', True, [1.0, 100.0])
    """

    def __init__(self, model: nn.Module, max_batches: int = 8, min_samples: int = 256) -> None:
        self.model = model
        self.max_batches, self.min_samples = int(max_batches), int(min_samples)
        self.layer: str | None = None
        self.layer_type: str | None = None
        self.normalized = False
        self.unsupported: str | None = None
        self.stats: FeatureStats | None = None
        self.batches = 0
        self.done = False
        self._armed = False
        self._handles: dict[str, Any] = {}

    def arm(self) -> None:
        """Measure the next forward pass (the training batch's)."""
        if self.done:
            return
        if not self._handles:
            for name, module in self.model.named_modules():
                if any(True for _ in module.parameters(recurse=False)):
                    self._handles[name] = module.register_forward_pre_hook(self._hook(name))
            if not self._handles:
                self._finish(unsupported="the model has no layer with parameters")
                return
        self._armed = True

    def disarm(self) -> None:
        """Stop measuring (after the training batch); closes the probe once it has seen enough."""
        self._armed = False
        if self.batches >= self.max_batches or (self.stats is not None and self.stats.samples >= self.min_samples):
            self.close()

    def close(self) -> None:
        """Remove every hook; the statistics stay."""
        self._armed = False
        self.done = True
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def _finish(self, *, unsupported: str | None = None, normalized: bool = False) -> None:
        self.unsupported, self.normalized = unsupported, normalized
        self.close()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self._armed:
                return
            self._armed = False  # one measurement per armed forward: the first layer reached
            if self.layer is None:
                self._choose(name, module)
                if self.done:
                    return
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
                self._finish(unsupported=f"layer {name!r} receives no floating-point batch of features")
                return
            self.stats.update(x)
            self.batches += 1
        return hook

    def _choose(self, name: str, module: nn.Module) -> None:
        """The first layer reached: keep its hook only."""
        self.layer, self.layer_type = name, type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self._finish(normalized=True)
            return
        axis = _feature_axis(module)
        if axis is None:
            self._finish(unsupported=f"the first layer {name!r} is a {type(module).__name__}, whose input has no "
                                     "known feature axis")
            return
        self.stats = FeatureStats(axis)
        for other, handle in list(self._handles.items()):
            if other != name:
                handle.remove()
                del self._handles[other]

    def result(self) -> dict[str, Any]:
        """What was measured, as plain numbers: ``layer``, ``layer_type``, ``samples``, ``batches``, ``means``,
        ``stds``, ``zero_share`` (lists), ``normalized`` and ``unsupported`` (why nothing was measured, or None)."""
        stats = self.stats
        return {
            "layer": self.layer, "layer_type": self.layer_type, "normalized": self.normalized,
            "unsupported": self.unsupported, "batches": self.batches, "samples": 0 if stats is None else stats.samples,
            "means": [] if stats is None else stats.means().tolist(),
            "stds": [] if stats is None else stats.stds().tolist(),
            "zero_share": [] if stats is None else stats.zero_share().tolist(),
        }


# --- the loss graph -----------------------------------------------------------------------------------------------
@dataclass
class LossGraph:
    """What the autograd graph of a loss says about the loss.

    Attributes:
        kind: ``"mse_on_softmax"``, ``"mse_on_sigmoid"``, or None (no squared error of probabilities found).
        squared_error: the node of the squared error (``"MseLossBackward0"``, ``"PowBackward0"``, ...), or None.
        probabilities: the probabilities the graph saved (detached, the class axis last), or None.
        targets: what they were compared with, in the same shape, or None when the graph does not show it.
        nodes: how many graph nodes were visited.
    """

    kind: str | None = None
    squared_error: str | None = None
    probabilities: torch.Tensor | None = field(default=None, repr=False)
    targets: torch.Tensor | None = field(default=None, repr=False)
    nodes: int = 0


def _parents(node: Any) -> list[Any]:
    return [n for n, _ in getattr(node, "next_functions", ()) if n is not None]


def _squared_error_inputs(node: Any, declared: bool) -> list[Any] | None:
    """The input nodes of a squared error, or None when ``node`` is not one."""
    name = type(node).__name__
    if name == "MseLossBackward0":
        return _parents(node)
    if name == "PowBackward0" and getattr(node, "_saved_exponent", None) == 2:
        parents = _parents(node)
        if declared or (parents and type(parents[0]).__name__ in ("SubBackward0", "RsubBackward0")):
            return parents
    if name == "MulBackward0":
        links = [n for n, _ in node.next_functions]
        if len(links) == 2 and links[0] is not None and links[0] is links[1]:
            return [links[0]]
    return None


def _probability_node(start: Any, declared: bool = False) -> Any | None:
    """The softmax or sigmoid a squared error's input comes from, through value-preserving nodes only (and
    elementwise arithmetic when the loss is declared a squared error of probabilities)."""
    passing = _PASS_THROUGH_DECLARED if declared else _PASS_THROUGH
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or len(seen) > 256:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name in _PROBABILITY_NODES:
            return node
        if name in passing:
            stack.extend(_parents(node))
    return None


def _saved(node: Any, name: str) -> torch.Tensor | None:
    try:
        value = getattr(node, name)
    except (AttributeError, RuntimeError):  # freed by a backward pass already, or not saved
        return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def _class_last(probabilities: torch.Tensor, node: Any) -> torch.Tensor:
    dim = getattr(node, "_saved_dim", -1)
    dim = int(dim) - 2 * _BIG if int(dim) >= _BIG else int(dim)  # the graph stores -1 as an unsigned 64-bit number
    if probabilities.dim() == 0:
        return probabilities.reshape(1, 1)
    return probabilities.movedim(dim % probabilities.dim(), -1)


def _targets(se_node: Any, prob_node: Any, probabilities: torch.Tensor) -> torch.Tensor | None:
    """What the probabilities were compared with, in their shape (class axis last), when the graph saved it."""
    name = type(se_node).__name__
    raw = _saved(prob_node, "_saved_result")
    if name == "MseLossBackward0":
        a, b = _saved(se_node, "_saved_self"), _saved(se_node, "_saved_target")
        if a is None or b is None or raw is None:
            return None
        # the side that is not the probabilities (either argument order)
        other = b if a.numel() == raw.numel() and torch.equal(a.reshape(-1), raw.reshape(-1)) else a
    elif name == "PowBackward0":
        difference = _saved(se_node, "_saved_self")
        parents = _parents(se_node)
        if not parents or type(parents[0]).__name__ not in ("SubBackward0", "RsubBackward0"):
            return None  # a weighted or rescaled error: what it compared the probabilities with is not recoverable
        if difference is None or raw is None or difference.numel() != raw.numel():
            return None
        other = raw.reshape(-1) - difference.reshape(-1)
        # p - y or y - p: the targets are whichever of p - d and p + d lies in [0, 1] more often
        plus = raw.reshape(-1) + difference.reshape(-1)
        inside = lambda t: float(((t >= -1e-6) & (t <= 1 + 1e-6)).float().mean())
        other = other if inside(other) >= inside(plus) else plus
    else:
        return None
    if other.numel() != raw.numel():
        return None
    return _class_last(other.reshape(raw.shape).to(probabilities.dtype), prob_node)


def inspect_loss_graph(loss: Any, declared: str = "auto") -> LossGraph:
    """Whether ``loss`` is a squared error of softmax or sigmoid probabilities, from its autograd graph.

    The walk goes from ``loss.grad_fn`` down the graph (at most 20,000 nodes) to the first squared error whose
    input is a softmax or sigmoid output, seen through value-preserving nodes only (views, copies, indexing,
    ``p - y``); a probability that passes through anything else (a log, a layer) is not the loss's input. Call it
    before ``backward`` (which frees what the graph saved: the probabilities and targets are then None).

    Args:
        loss: the loss tensor; anything without a ``grad_fn`` gives an empty :class:`LossGraph`.
        declared: ``"auto"``; ``"mse_on_probabilities"`` also accepts a squared ``pow`` of anything (a hand-written
            error); ``"other"`` returns an empty result without walking.

    Example:
        >>> x = torch.ones(3, 2, requires_grad=True)
        >>> g = inspect_loss_graph(((torch.sigmoid(x) - torch.ones(3, 2)) ** 2).mean())
        >>> g.kind, g.squared_error, g.targets.tolist()[0]
        ('mse_on_sigmoid', 'PowBackward0', [1.0, 1.0])
    """
    root = getattr(loss, "grad_fn", None)
    if root is None or declared == "other":
        return LossGraph()
    stack, seen = [root], set()
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        inputs = _squared_error_inputs(node, declared == "mse_on_probabilities")
        for start in inputs or ():
            prob_node = _probability_node(start, declared == "mse_on_probabilities")
            if prob_node is not None:
                raw = _saved(prob_node, "_saved_result")
                probabilities = None if raw is None else _class_last(raw, prob_node)
                targets = None if probabilities is None else _targets(node, prob_node, probabilities)
                return LossGraph(kind=f"mse_on_{_PROBABILITY_NODES[type(prob_node).__name__]}",
                                 squared_error=type(node).__name__, probabilities=probabilities, targets=targets,
                                 nodes=len(seen))
        stack.extend(reversed(_parents(node)))
    return LossGraph(nodes=len(seen))


def saturation_statistics(graph: LossGraph, margin: float = SATURATION_MARGIN) -> dict[str, float | None]:
    """The numbers the loss-choice rule reads from the saved probabilities ``p`` and targets ``y``.

    * ``saturated_share``: share of outputs within ``margin`` of 0 or 1 (sigmoid: each output; softmax: each
      sample whose largest probability is above ``1 - margin``).
    * ``wrong_saturated_share``: share of outputs saturated at the wrong end: ``|p - y| > 1/2`` there.
    * ``gradient_ratio``: how much of cross-entropy's pull on the logits the squared error keeps: its logit
      gradient ``2 J (p - y)`` (``J = diag(p) - p p^T`` the softmax's Jacobian; sigmoid: ``p (1 - p)``) projected on
      cross-entropy's ``p - y``, summed over the batch, over ``sum |p - y|^2``. Per sample ``2 Var_p(p - y) /
      |p - y|^2``: 2/K at a uniform softmax output (sigmoid: at most 1/2), near 0 once an output saturates (the true
      class's logit then gets almost no push, where cross-entropy's is ``p_y - 1 ~ -1``).
    * ``loss_ratio``: ``mean (p - y)^2`` over that of the uniform output (``1/K``; sigmoid: 1/2): 1 means no better
      than knowing nothing.
    * ``classes``: ``K`` (softmax) or 1 (sigmoid, per output).

    Without targets only ``saturated_share`` and ``classes`` are given (the others are None).

    Example:
        >>> p, y = torch.tensor([[0.999, 0.001], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> s = saturation_statistics(LossGraph("mse_on_softmax", "MseLossBackward0", p, y))
        >>> s["saturated_share"], s["wrong_saturated_share"], round(s["loss_ratio"], 3)
        (0.5, 0.5, 2.496)
    """
    out: dict[str, float | None] = {"saturated_share": None, "wrong_saturated_share": None,
                                    "gradient_ratio": None, "loss_ratio": None, "classes": None}
    if graph.probabilities is None or graph.kind is None:
        return out
    with torch.no_grad():
        p = graph.probabilities.to(torch.float64)
        softmax = graph.kind == "mse_on_softmax"
        p = p.reshape(-1, p.shape[-1]) if softmax else p.reshape(-1, 1)
        if p.numel() == 0:
            return out
        top = p.max(dim=-1).values if softmax else p[:, 0]
        saturated = top >= 1 - margin if softmax else (top <= margin) | (top >= 1 - margin)
        out.update(saturated_share=float(saturated.double().mean()), classes=float(p.shape[-1] if softmax else 1))
        if graph.targets is None or graph.targets.numel() != p.numel():
            return out
        y = graph.targets.to(torch.float64).reshape(p.shape)
        residual = p - y
        if softmax:
            at_top = residual.gather(-1, p.argmax(dim=-1, keepdim=True))[:, 0]
            jacobian_residual = p * residual - p * (p * residual).sum(dim=-1, keepdim=True)
            uniform = torch.full_like(p, 1.0 / p.shape[-1])
        else:
            at_top = residual[:, 0]
            jacobian_residual = p * (1 - p) * residual
            uniform = torch.full_like(p, 0.5)
        wrong = saturated & (at_top.abs() > 0.5)
        out["wrong_saturated_share"] = float(wrong.double().mean())
        norm = float(residual.square().sum())
        out["gradient_ratio"] = 2.0 * float((residual * jacobian_residual).sum()) / norm if norm > 0 else None
        chance = float((uniform - y).square().mean())
        loss = float(residual.square().mean())
        out["loss_ratio"] = loss / chance if chance > 0 else None
    for key, value in out.items():
        if value is not None and not math.isfinite(value):
            out[key] = None
    return out
