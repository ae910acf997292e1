"""Ill-conditioning and loss-choice findings: the input side of a stalled run, numbers in, findings out.

Two causes of slow training that no learning rate fixes (``docs/conditioning.md`` has the reasoning and the
numbers behind every boundary):

* **Unscaled inputs** (``ill_conditioning``): for a first layer ``W x + b`` the curvature along the weights of
  feature ``i`` grows with ``E[x_i^2]``; features whose standard deviations differ by a factor ``r`` give curvatures
  ``r^2`` apart, and a feature whose mean is far from 0 couples its weight with the bias into a narrow valley. The
  largest curvature caps the stable learning rate, so the flat directions crawl. Measured: the per-feature mean and
  standard deviation of what the first layer receives (:func:`input_scale_evidence`), and where the Hessian's trace
  sits over the layers (:func:`curvature_evidence`).
* **Mean squared error on probabilities** (``loss_choice``): through a softmax or sigmoid the squared error's
  gradient carries the factor ``p (1 - p)``, which vanishes when an output saturates, even at the wrong end, so the
  loss sits on a high plateau; cross-entropy on the logits passes ``p - y`` unattenuated. Measured from the loss's
  autograd graph: the saturated share of the outputs, the gradient attenuation and the loss against a uniform guess
  (:func:`loss_choice_tests`).

Each finding is one row of :data:`optdiag.diagnosis.triage.RULES`, scored like every triage finding.

Example:
    >>> ev = input_scale_evidence(means=[0.0, 0.1, 2.0], stds=[400.0, 1.0, 1.0])
    >>> ev["std_spread"], ev["std_max_feature"], ev["std_min_feature"]
    (400.0, 0, 1)
    >>> ill_conditioning_finding(100, ev).kind
    'ill_conditioning'
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from optdiag.diagnosis.classify import log_ratio_probability
from optdiag.diagnosis.triage import DECIDES_ABOVE, Finding, Recommendation, rule_scores

__all__ = ["SCALE_SPREAD", "OFFSET_RATIO", "BIAS_CONDITION", "SPARSE_ZERO_SHARE", "GRADIENT_ATTENUATION", "LOSS_RATIO_HIGH",
           "input_scale_evidence", "curvature_evidence", "conditioning_tests", "ill_conditioning_finding",
           "loss_choice_tests", "loss_choice_finding"]

#: Feature standard deviations spread by more than this (largest over smallest) make the inputs "unscaled": the
#: first layer's curvatures then span 30^2 ~ 1000, and gradient descent at the largest stable step needs ~1000 steps
#: per e-fold along the flattest feature. Min-max-scaled data (pixels in [0, 1]) stay below 10.
SCALE_SPREAD = 30.0
#: A feature whose ``|mean| / std`` exceeds this is "off-centre": with the bias it spans a valley of condition number
#: ~``(2 + r^2)^2``, ~10^4 at r = 10. Pixel-like features in [0, 1] stay near 3.
OFFSET_RATIO = 10.0
#: A feature whose weight and the first layer's bias span a valley of condition number above this is "off-scale":
#: the block ``[[mean^2 + std^2, mean], [mean, 1]]`` (the Hessian of a weight and the bias for a unit output
#: curvature; the bias's input is the constant 1). It catches a large common scale (raw 0-255 pixels: ~10^5, an
#: age in years: ~2 10^4) that the scale-free spread and offset do not; features scaled to [0, 1] stay below ~400.
BIAS_CONDITION = 1000.0
#: Features that are exactly zero in at least this share of the samples (one-hot columns, blank pixels, bags of
#: words) are sparse: their standard deviation measures how rarely they fire, not a scale; they are left out.
SPARSE_ZERO_SHARE = 0.9
#: A feature whose standard deviation is below this share of the largest is constant (never a scale).
CONSTANT_SHARE = 1e-9
#: The squared error keeps at most this share of cross-entropy's pull on the logits: attenuated. The share
#: (``optdiag.curvature.conditioning.saturation_statistics``) is 2/K for K classes at a uniform output (0.2 for 10)
#: and falls to ~0.02 once the outputs saturate; below 0.05 the squared error descends 20 times slower than
#: cross-entropy from the same point.
GRADIENT_ATTENUATION = 0.05
#: The squared error is "high" above this share of a uniform guess's (p = 1/K, sigmoid 1/2).
LOSS_RATIO_HIGH = 0.5


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def bias_condition(mean: float, std: float) -> float:
    """The condition number of ``[[mean^2 + std^2, mean], [mean, 1]]``: a first-layer weight with the bias.

    Example:
        >>> bias_condition(0.0, 1.0), round(bias_condition(0.0, 10.0), 6), round(bias_condition(10.0, 1.0))
        (1.0, 100.0, 10402)
    """
    trace, det = 1.0 + mean * mean + std * std, std * std
    if not det > 0:
        return math.inf
    root = math.sqrt(max(trace * trace - 4.0 * det, 0.0))
    return (trace + root) ** 2 / (4.0 * det)  # (l+ / l-) with l+ l- = det: l+^2 / det


# --- input scales -------------------------------------------------------------------------------------------------
def input_scale_evidence(means: Sequence[float], stds: Sequence[float], zero_share: Sequence[float] | None = None,
                         *, layer: str | None = None, samples: int | None = None) -> dict[str, Any]:
    """The numbers the unscaled-inputs test reads, from per-feature means and standard deviations.

    Constant features (standard deviation at most :data:`CONSTANT_SHARE` of the largest) and sparse ones (zero in
    at least :data:`SPARSE_ZERO_SHARE` of the samples) are counted and left out. Among the others:
    ``std_spread`` = largest / smallest standard deviation with the two features' indices and values, and the
    feature with the largest ``|mean| / std`` (``offset_ratio``, ``offset_feature``, ``offset_mean``,
    ``offset_std``). With fewer than two features left there is no spread (None).

    Example:
        >>> ev = input_scale_evidence([0.0, 0.0, 0.5, 3.0], [2.0, 0.0, 0.1, 0.1], [0.0, 1.0, 0.95, 0.0])
        >>> ev["features_considered"], ev["constant_features"], ev["sparse_features"], ev["std_spread"]
        (2, 1, 1, 20.0)
        >>> ev["offset_feature"], ev["offset_ratio"]
        (3, 30.0)
    """
    means, stds = [float(m) for m in means], [float(s) for s in stds]
    zeros = [float(z) for z in zero_share] if zero_share is not None else [0.0] * len(stds)
    finite = [i for i in range(len(stds)) if _finite(stds[i]) and _finite(means[i])]
    largest = max((stds[i] for i in finite), default=0.0)
    constant = [i for i in finite if not stds[i] > CONSTANT_SHARE * largest]
    sparse = [i for i in finite if i not in constant and zeros[i] >= SPARSE_ZERO_SHARE]
    kept = [i for i in finite if i not in constant and i not in sparse]
    ev: dict[str, Any] = {"layer": layer, "samples": samples, "features": len(stds), "features_considered": len(kept),
                          "constant_features": len(constant), "sparse_features": len(sparse),
                          "std_spread": None, "offset_ratio": None}
    if len(kept) >= 2:
        hi, lo = max(kept, key=lambda i: stds[i]), min(kept, key=lambda i: stds[i])
        ev.update(std_spread=stds[hi] / stds[lo], std_max_feature=hi, std_max=stds[hi], std_min_feature=lo,
                  std_min=stds[lo])
    if kept:
        worst = max(kept, key=lambda i: abs(means[i]) / stds[i])
        ev.update(offset_ratio=abs(means[worst]) / stds[worst], offset_feature=worst, offset_mean=means[worst],
                  offset_std=stds[worst])
        worst = max(kept, key=lambda i: bias_condition(means[i], stds[i]))
        ev.update(bias_condition=bias_condition(means[worst], stds[worst]), bias_condition_feature=worst,
                  bias_condition_mean=means[worst], bias_condition_std=stds[worst])
    return {k: v for k, v in ev.items() if v is not None or k in ("std_spread", "offset_ratio", "bias_condition")}


def curvature_evidence(block_traces: Mapping[str, float] | None, first_layer: str | None = None,
                       block_sizes: Mapping[str, int] | None = None,
                       top_eigenvector_shares: Mapping[str, float] | None = None) -> dict[str, Any]:
    """How the Hessian's curvature splits over layers: trace shares, the first layer's, and its top direction's.

    ``trace_shares`` are each layer's block trace ``tr(H_bb)`` over the whole trace, given only when every block is
    non-negative (a share of a sum with negative parts means nothing; the raw blocks are kept then). The first
    layer's share is compared with its share of the parameters (``first_layer_param_share``): a first layer that
    carries far more curvature than parameters is where the inputs' scale shows. ``first_layer_lambda_max_share``
    is the share of the top Hessian eigenvector's squared norm in the first layer.

    Example:
        >>> ev = curvature_evidence({"0": 97.0, "2": 3.0}, "0", {"0": 30, "2": 10}, {"0": 0.999, "2": 0.001})
        >>> ev["first_layer_trace_share"], ev["first_layer_param_share"], ev["first_layer_lambda_max_share"]
        (0.97, 0.75, 0.999)
    """
    ev: dict[str, Any] = {}
    traces = {k: float(v) for k, v in (block_traces or {}).items() if _finite(v)}
    if traces:
        ev["layer_traces"] = traces
        total = sum(traces.values())
        if total > 0 and all(v >= 0 for v in traces.values()):
            ev["trace_shares"] = {k: v / total for k, v in traces.items()}
            if first_layer in traces:
                ev["first_layer_trace_share"] = traces[first_layer] / total
    if block_sizes and first_layer in block_sizes:
        ev["first_layer_param_share"] = block_sizes[first_layer] / max(sum(block_sizes.values()), 1)
    if top_eigenvector_shares and first_layer in top_eigenvector_shares:
        ev["first_layer_lambda_max_share"] = float(top_eigenvector_shares[first_layer])
    if first_layer is not None and ev:
        ev["first_layer"] = first_layer
    return ev


def conditioning_tests(evidence: Mapping[str, Any]) -> dict[str, float | None]:
    """The unscaled-inputs tests: ``feature_scale_spread`` (``std_spread`` vs :data:`SCALE_SPREAD`),
    ``feature_offset`` (``offset_ratio`` vs :data:`OFFSET_RATIO`), ``feature_bias_condition`` (``bias_condition``
    vs :data:`BIAS_CONDITION`) and ``inputs_unscaled``, the largest (each makes the valley narrow). 0.5 on a
    boundary, 0.9 at twice it; None when not measured.

    Example:
        >>> conditioning_tests({"std_spread": 60.0, "offset_ratio": 1.0})["inputs_unscaled"]
        0.9
    """
    spread, offset, bias = evidence.get("std_spread"), evidence.get("offset_ratio"), evidence.get("bias_condition")
    tests: dict[str, float | None] = {
        "feature_scale_spread": log_ratio_probability(spread, SCALE_SPREAD) if _finite(spread) else None,
        "feature_offset": log_ratio_probability(offset, OFFSET_RATIO) if _finite(offset) else None,
        "feature_bias_condition": log_ratio_probability(bias, BIAS_CONDITION) if _finite(bias) else None,
    }
    measured = [p for p in tests.values() if p is not None]
    tests["inputs_unscaled"] = max(measured) if measured else None
    return tests


def _g(x: Any) -> str:
    return f"{x:.3g}" if _finite(x) else "?"


def ill_conditioning_finding(step: int, inputs: Mapping[str, Any], curvature: Mapping[str, Any] | None = None
                             ) -> Finding | None:
    """The ``ill_conditioning`` finding, or None when the inputs' scales do not support it.

    Args:
        step: the optimizer step the finding refers to.
        inputs: :func:`input_scale_evidence`'s numbers.
        curvature: :func:`curvature_evidence`'s numbers (quoted, not tested: a first layer with little curvature
            can still hold a flat, slow direction).

    Example:
        >>> ill_conditioning_finding(10, input_scale_evidence([0.0, 0.0], [1.0, 2.0])) is None
        True
    """
    tests = conditioning_tests(inputs)
    score = rule_scores(tests, ("ill_conditioning",))["ill_conditioning"]
    if not score > DECIDES_ABOVE:
        return None
    curvature = dict(curvature or {})
    evidence = {**{k: v for k, v in inputs.items() if v is not None}, **curvature, "tests": tests,
                "scores": {"ill_conditioning": score}}
    layer = f"layer {inputs['layer']!r}" if inputs.get("layer") else "the first layer"
    said, recs = [], []
    spread_p, offset_p = tests["feature_scale_spread"] or 0.0, tests["feature_offset"] or 0.0
    if spread_p > DECIDES_ABOVE:
        hi, lo = inputs["std_max_feature"], inputs["std_min_feature"]
        said.append(f"feature {hi} has std {_g(inputs['std_spread'])}x feature {lo}'s "
                    f"({_g(inputs['std_max'])} vs {_g(inputs['std_min'])}: curvatures ~{_g(inputs['std_spread'] ** 2)} "
                    "apart along their weights)")
    if offset_p > DECIDES_ABOVE:
        said.append(f"feature {inputs['offset_feature']} has mean {_g(inputs['offset_mean'])} with std "
                    f"{_g(inputs['offset_std'])} (|mean|/std {_g(inputs['offset_ratio'])})")
    if (tests["feature_bias_condition"] or 0.0) > DECIDES_ABOVE and not (
            offset_p > DECIDES_ABOVE and inputs.get("offset_feature") == inputs.get("bias_condition_feature")):
        said.append(f"feature {inputs['bias_condition_feature']} (mean {_g(inputs['bias_condition_mean'])}, std "
                    f"{_g(inputs['bias_condition_std'])}) and the bias span a valley of condition number "
                    f"{_g(inputs['bias_condition'])}")
    where = ""
    share = curvature.get("first_layer_trace_share")
    if _finite(share):
        params = curvature.get("first_layer_param_share")
        where = (f"; {layer} carries {share:.0%} of the Hessian trace"
                 + (f" with {params:.0%} of the parameters" if _finite(params) else ""))
    top = curvature.get("first_layer_lambda_max_share")
    if _finite(top):
        where += f"{';' if not where else ','} {top:.0%} of the sharpest direction lies in it"
    summary = (f"Ill-conditioned inputs: {' and '.join(said)} as {layer} sees them{where}. The largest curvature "
               "caps the stable learning rate, so the directions of the small or off-centre features crawl: no "
               "learning rate fixes this, scaling the inputs does.")
    numbers = {k: inputs[k] for k in ("std_spread", "std_max_feature", "std_min_feature", "offset_ratio",
                                      "offset_feature", "bias_condition", "bias_condition_feature")
               if inputs.get(k) is not None}
    if _finite(share):
        numbers["first_layer_trace_share"] = share
    recs.append(Recommendation(
        "Standardize the input features",
        "Subtract each feature's training-set mean and divide by its standard deviation (e.g. sklearn's "
        "StandardScaler fitted on the training data, applied to every split): the first layer's curvatures then "
        "agree within the features' correlations. Check: the same lr converges faster.", numbers))
    recs.append(Recommendation(
        "Or normalize inside the model",
        f"A BatchNorm layer in front of {layer} (nn.BatchNorm1d(n_features) for vectors) standardizes with batch "
        "statistics while training; BatchNorm or LayerNorm after hidden layers does the same for what later layers "
        "see.", {k: numbers[k] for k in ("std_spread", "offset_ratio", "bias_condition") if k in numbers}))
    return Finding(step, "ill_conditioning", score, evidence, recs, summary)


# --- loss choice --------------------------------------------------------------------------------------------------
def loss_choice_tests(graph_kind: str | None, statistics: Mapping[str, Any], stalled: float | None,
                      declared: str = "auto") -> dict[str, float | None]:
    """The loss-choice tests.

    * ``mse_on_probabilities``: 1 when the loss graph shows a squared error of softmax or sigmoid outputs
      (``graph_kind``) or the user declared it, 0 when the graph was read and shows none; None when unknown.
    * ``gradient_attenuated``: the squared error passes at most :data:`GRADIENT_ATTENUATION` of cross-entropy's
      gradient (``gradient_ratio`` below the boundary; 0.9 at half of it).
    * ``loss_high``: ``loss_ratio`` (the squared error over a uniform guess's) vs :data:`LOSS_RATIO_HIGH`.
    * ``loss_stalled``: the stall detector's judgement (a probability; None without a detector).

    Example:
        >>> t = loss_choice_tests("mse_on_softmax", {"gradient_ratio": 0.001, "loss_ratio": 1.8}, 1.0)
        >>> t["mse_on_probabilities"], t["gradient_attenuated"] > 0.9, t["loss_high"] > 0.9
        (1.0, True, True)
    """
    ratio, loss = statistics.get("gradient_ratio"), statistics.get("loss_ratio")
    if graph_kind is not None or declared == "mse_on_probabilities":
        mse = 1.0
    else:
        mse = None if declared == "unknown" else 0.0
    return {
        "mse_on_probabilities": mse,
        "gradient_attenuated": (log_ratio_probability(GRADIENT_ATTENUATION / ratio, 1.0) if ratio and _finite(ratio)
                                else (1.0 if ratio == 0 else None)),
        "loss_high": log_ratio_probability(loss, LOSS_RATIO_HIGH) if _finite(loss) else None,
        "loss_stalled": None if stalled is None else float(stalled),
    }


def loss_choice_finding(step: int, graph_kind: str | None, statistics: Mapping[str, Any], stalled: float | None,
                        *, declared: str = "auto", squared_error: str | None = None) -> Finding | None:
    """The ``loss_choice`` finding (advise cross-entropy on the logits), or None when the numbers do not support it.

    Args:
        step: the optimizer step.
        graph_kind: ``"mse_on_softmax"``, ``"mse_on_sigmoid"`` or None (from the loss graph).
        statistics: :func:`optdiag.curvature.conditioning.saturation_statistics`'s numbers.
        stalled: the probability that the training loss is stalled (the stall detector's).
        declared: what the user declared about the loss (``"auto"`` when nothing).
        squared_error: the graph node of the squared error, quoted in the evidence.

    Example:
        >>> stats = {"saturated_share": 0.9, "wrong_saturated_share": 0.6, "gradient_ratio": 0.002, "loss_ratio": 1.7,
        ...          "classes": 10.0}
        >>> loss_choice_finding(300, "mse_on_softmax", stats, stalled=1.0).recommendations[0].action
        'Use cross-entropy on the logits'
        >>> loss_choice_finding(300, None, stats, stalled=1.0) is None
        True
    """
    tests = loss_choice_tests(graph_kind, statistics, stalled, declared)
    score = rule_scores(tests, ("loss_choice",))["loss_choice"]
    if not score > DECIDES_ABOVE:
        return None
    link = "sigmoid" if graph_kind == "mse_on_sigmoid" else "softmax"
    source = (f"the loss graph shows {squared_error or 'a squared error'} of {link} outputs" if graph_kind
              else "the loss is declared a squared error of probabilities")
    stats = {k: v for k, v in statistics.items() if v is not None}
    evidence = {"loss_graph": graph_kind, "squared_error": squared_error, "declared": declared, **stats,
                "tests": tests, "scores": {"loss_choice": score}}
    evidence = {k: v for k, v in evidence.items() if v is not None}
    wrong = stats.get("wrong_saturated_share")
    saturated = (f"{stats['saturated_share']:.0%} of the outputs are saturated"
                 + (f" ({wrong:.0%} at the wrong end)" if _finite(wrong) else "")) \
        if _finite(stats.get("saturated_share")) else "the outputs saturate"
    ratio = stats.get("gradient_ratio")
    kept = f"{ratio:.1%}" if _finite(ratio) else "?"
    summary = (f"Loss choice: {source}; {saturated}, and the squared error keeps {kept} of cross-entropy's pull on "
               f"the logits; the loss stalled at {_g(stats.get('loss_ratio'))}x that of a uniform guess: a plateau "
               "of the loss function, not of the model.")
    fix = ("nn.BCEWithLogitsLoss on the logits (drop the sigmoid)" if link == "sigmoid"
           else "nn.CrossEntropyLoss on the logits (drop the softmax; it takes class indices or probabilities)")
    numbers = {k: stats[k] for k in ("saturated_share", "wrong_saturated_share", "gradient_ratio", "loss_ratio")
               if k in stats}
    return Finding(step, "loss_choice", score, evidence, [Recommendation(
        "Use cross-entropy on the logits",
        f"Use {fix}: its gradient with respect to the logits is p - y, which stays large exactly where a "
        f"saturated {link} makes the squared error's vanish. Check: the same run with cross-entropy leaves the "
        "plateau.", numbers)], summary)
