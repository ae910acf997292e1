"""Ill-conditioning and loss-choice findings: the rules on exact numbers, the measurements on real modules and graphs,
and real short Lightning runs (docs/conditioning.md)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import optdiag
from optdiag.callbacks.conditioning import ConditioningMonitor
from optdiag.curvature.conditioning import (
    FeatureStats,
    InputScaleProbe,
    LossGraph,
    inspect_loss_graph,
    saturation_statistics,
)
from optdiag.demo.runner import quiet_lightning
from optdiag.demo.scenarios import scenario
from optdiag.diagnosis.conditioning import (
    BIAS_CONDITION,
    GRADIENT_ATTENUATION,
    LOSS_RATIO_HIGH,
    OFFSET_RATIO,
    SCALE_SPREAD,
    bias_condition,
    conditioning_tests,
    curvature_evidence,
    ill_conditioning_finding,
    input_scale_evidence,
    loss_choice_finding,
    loss_choice_tests,
)
from optdiag.errors import UsageError


def _p(stat: float, boundary: float) -> float:
    """The log-ratio probability written out: logistic(ln(stat / boundary) * ln 9 / ln 2)."""
    return 1.0 / (1.0 + math.exp(-math.log(stat / boundary) * math.log(9.0) / math.log(2.0)))


# --- the rules on exact numbers ----------------------------------------------------------------------------------
def test_input_scale_evidence_leaves_out_constant_and_sparse_features():
    means = [5.0, 0.0, 0.01, 0.2, -3.0]
    stds = [200.0, 0.0, 0.1, 4.0, 0.5]
    zeros = [0.0, 1.0, 0.95, 0.1, 0.0]
    ev = input_scale_evidence(means, stds, zeros, layer="net.0", samples=128)
    assert (ev["features"], ev["features_considered"], ev["constant_features"], ev["sparse_features"]) == (5, 3, 1, 1)
    assert ev["std_spread"] == 400.0 and (ev["std_max_feature"], ev["std_min_feature"]) == (0, 4)
    assert (ev["std_max"], ev["std_min"]) == (200.0, 0.5)
    assert ev["offset_feature"] == 4 and ev["offset_ratio"] == 6.0  # |-3| / 0.5; feature 0 has 5/200
    assert ev["layer"] == "net.0" and ev["samples"] == 128


def test_a_single_feature_has_no_spread():
    ev = input_scale_evidence([0.0], [3.0])
    assert ev["std_spread"] is None and ev["offset_ratio"] == 0.0
    assert conditioning_tests(ev)["feature_scale_spread"] is None


def test_conditioning_tests_are_half_on_the_boundary_and_nine_tenths_at_twice():
    tests = conditioning_tests({"std_spread": SCALE_SPREAD, "offset_ratio": 2 * OFFSET_RATIO})
    assert tests["feature_scale_spread"] == 0.5
    assert tests["feature_offset"] == pytest.approx(0.9, abs=1e-12)
    assert tests["inputs_unscaled"] == tests["feature_offset"]  # either makes the valley narrow
    assert conditioning_tests({})["inputs_unscaled"] is None


def test_ill_conditioning_finding_with_its_numbers():
    ev = input_scale_evidence([0.0] * 8, [0.1 * 10 ** (i / 3.5) for i in range(8)])  # 0.1 ... 10: spread 100
    curvature = curvature_evidence({"net.0": 97.0, "net.2": 3.0}, "net.0", {"net.0": 288, "net.2": 33},
                                   {"net.0": 0.999, "net.2": 0.001})
    finding = ill_conditioning_finding(40, ev, curvature)
    assert finding.kind == "ill_conditioning" and finding.step == 40
    assert finding.confidence == pytest.approx(_p(100.0, SCALE_SPREAD), rel=1e-9)
    assert finding.evidence["std_spread"] == pytest.approx(100.0, rel=1e-12)
    assert finding.evidence["first_layer_trace_share"] == 0.97
    assert finding.evidence["first_layer_param_share"] == pytest.approx(288 / 321)
    assert "feature 7 has std 100x feature 0's (10 vs 0.1: curvatures ~1e+04 apart" in finding.summary
    assert "97% of the Hessian trace" in finding.summary
    assert [r.action for r in finding.recommendations] == ["Standardize the input features",
                                                           "Or normalize inside the model"]


def test_no_ill_conditioning_for_min_max_scaled_pixels():
    # digits-like: blank border pixels (sparse), a spread of 8 and |mean|/std of 3 among the others
    means = [0.0, 0.01, 0.3, 0.9, 0.5]
    stds = [0.0, 0.05, 0.4, 0.3, 0.05 * 8]
    zeros = [1.0, 0.97, 0.2, 0.0, 0.3]
    ev = input_scale_evidence(means, stds, zeros)
    assert ev["std_spread"] == pytest.approx(0.4 / 0.3, rel=1e-12) and ev["offset_ratio"] == pytest.approx(3.0)
    assert ill_conditioning_finding(10, ev) is None
    assert ill_conditioning_finding(10, input_scale_evidence([0.0, 0.0], [1.0, 8.0])) is None  # spread 8


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (120.0, 60.0), (40.0, 12.0), (0.019, 0.056), (-3.0, 0.01)])
def test_bias_condition_is_that_of_the_weight_and_bias_block(mean, std):
    block = np.array([[mean * mean + std * std, mean], [mean, 1.0]])
    low, high = np.linalg.eigvalsh(block)
    assert bias_condition(mean, std) == pytest.approx(high / low, rel=1e-6)


def test_a_large_common_scale_is_off_scale_for_the_bias():
    # raw 0-255 pixels: every feature alike (spread ~1, |mean|/std 2), all far from the bias's constant input 1
    ev = input_scale_evidence([120.0, 110.0, 130.0], [60.0, 55.0, 62.0])
    tests = conditioning_tests(ev)
    assert tests["feature_scale_spread"] < 0.01 and tests["feature_offset"] < 0.01
    assert ev["bias_condition_feature"] == 2 and ev["bias_condition"] == pytest.approx(bias_condition(130.0, 62.0))
    finding = ill_conditioning_finding(5, ev)
    assert finding.confidence == pytest.approx(_p(bias_condition(130.0, 62.0), BIAS_CONDITION), rel=1e-9)
    assert "feature 2 (mean 130, std 62) and the bias span a valley" in finding.summary
    # a nearly sparse pixel of digits scaled to [0, 1] (zero in 88%: kept) stays well below the boundary
    assert bias_condition(0.017, 0.051) < 0.5 * BIAS_CONDITION


def test_curvature_shares_only_when_every_block_is_non_negative():
    ev = curvature_evidence({"a": 3.0, "b": 1.0}, "a")
    assert ev["trace_shares"] == {"a": 0.75, "b": 0.25} and ev["first_layer_trace_share"] == 0.75
    mixed = curvature_evidence({"a": 3.0, "b": -1.0}, "a")
    assert "trace_shares" not in mixed and mixed["layer_traces"] == {"a": 3.0, "b": -1.0}
    assert curvature_evidence(None) == {}


def test_loss_choice_needs_every_test():
    stats = {"saturated_share": 0.6, "wrong_saturated_share": 0.55, "gradient_ratio": GRADIENT_ATTENUATION / 4,
             "loss_ratio": 4 * LOSS_RATIO_HIGH, "classes": 10.0}
    finding = loss_choice_finding(70, "mse_on_softmax", stats, stalled=1.0, squared_error="MseLossBackward0")
    assert finding.kind == "loss_choice"
    # min over the row: both log-ratio tests at a factor 4 past their boundary, the others 1
    assert finding.confidence == pytest.approx(_p(4.0, 1.0), rel=1e-9)
    assert finding.evidence["tests"]["mse_on_probabilities"] == 1.0
    assert "nn.CrossEntropyLoss" in finding.recommendations[0].reason
    assert loss_choice_finding(70, "mse_on_softmax", stats, stalled=0.0) is None  # still falling: no plateau
    assert loss_choice_finding(70, "mse_on_softmax", stats, stalled=None) is None  # no stall detector
    assert loss_choice_finding(70, None, stats, stalled=1.0) is None  # the graph shows no squared error
    low = dict(stats, loss_ratio=0.05)
    assert loss_choice_finding(70, "mse_on_softmax", low, stalled=1.0) is None  # converged, not a plateau
    healthy = dict(stats, gradient_ratio=0.2)  # a uniform 10-class output: 2/K
    assert loss_choice_finding(70, "mse_on_softmax", healthy, stalled=1.0) is None
    declared = loss_choice_tests(None, stats, 1.0, declared="mse_on_probabilities")
    assert declared["mse_on_probabilities"] == 1.0
    sigmoid = loss_choice_finding(5, "mse_on_sigmoid", stats, stalled=1.0)
    assert "BCEWithLogitsLoss" in sigmoid.recommendations[0].reason


# --- the measurements --------------------------------------------------------------------------------------------
def test_feature_stats_merge_batches_exactly():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=gen) * torch.tensor([1e-3, 1.0, 1e3]) + torch.tensor([0.0, 1e4, -5.0])
               for n in (5, 17, 64)]
    batches[1][:, 0] = 0.0
    stats = FeatureStats()
    for batch in batches:
        stats.update(batch)
    whole = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(stats.means().numpy(), whole.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.stds().numpy(), whole.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.zero_share().numpy(), (whole == 0).mean(axis=0))
    assert stats.samples == 86


def test_feature_stats_of_a_convolution_input_are_per_channel():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    stats = FeatureStats(feature_dim=1)
    stats.update(x)
    per_channel = x.permute(1, 0, 2).reshape(3, -1).double()
    np.testing.assert_allclose(stats.stds().numpy(), per_channel.std(dim=1, unbiased=False).numpy())


class _HeadFirst(nn.Module):
    """Registers the head before the body: the first layer reached is not the first registered."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 1)
        self.body = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_the_probe_measures_the_first_layer_reached_then_removes_its_hooks():
    net = _HeadFirst()
    probe = InputScaleProbe(net, max_batches=2, min_samples=10_000)
    x = torch.tensor([[1.0, 10.0, 0.0], [3.0, 30.0, 0.0]])
    for _ in range(2):
        probe.arm()
        net(x)
        net(x * 100)  # a second forward in the same batch (a monitor's) is not measured
        probe.disarm()
    assert probe.layer == "body" and probe.layer_type == "Linear" and probe.done and probe.batches == 2
    np.testing.assert_allclose(probe.stats.stds().numpy(), [1.0, 10.0, 0.0])
    assert not net.body._forward_pre_hooks and not net.head._forward_pre_hooks
    result = probe.result()
    assert result["samples"] == 4 and result["zero_share"] == [0.0, 0.0, 1.0]


def test_the_probe_knows_a_batchnorm_input_layer_and_an_embedding():
    bn = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 1))
    probe = InputScaleProbe(bn)
    probe.arm()
    bn(torch.randn(4, 3))
    assert probe.normalized and probe.done and probe.stats is None and not bn[0]._forward_pre_hooks
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 1))
    probe = InputScaleProbe(emb)
    probe.arm()
    emb(torch.tensor([[1, 2]]))
    assert probe.done and "Embedding" in probe.unsupported


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_graph_finds_mse_on_softmax_and_its_targets():
    net, x = _mlp(), torch.randn(6, 4)
    y = nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    for loss in (nn.functional.mse_loss(torch.softmax(net(x), dim=-1), y),
                 nn.functional.mse_loss(nn.Softmax(dim=1)(net(x)).flatten(), y.flatten(), reduction="sum"),
                 nn.functional.mse_loss(y, torch.softmax(net(x), dim=-1))):  # either argument order
        graph = inspect_loss_graph(loss)
        assert graph.kind == "mse_on_softmax" and graph.squared_error == "MseLossBackward0"
        assert torch.equal(graph.probabilities, torch.softmax(net(x), dim=-1).detach())
        assert torch.equal(graph.targets, y)


def test_graph_finds_squared_sigmoid_outputs_written_by_hand():
    net, x = _mlp(), torch.randn(6, 4)
    y = torch.randint(0, 2, (6, 3)).float()
    graph = inspect_loss_graph(((torch.sigmoid(net(x)) - y) ** 2).mean())
    assert graph.kind == "mse_on_sigmoid" and graph.squared_error == "PowBackward0"
    torch.testing.assert_close(graph.targets, y)
    d = torch.sigmoid(net(x)) - y
    assert inspect_loss_graph((d * d).mean()).kind == "mse_on_sigmoid"


def test_a_declared_loss_accepts_hand_written_weighted_squares():
    net, x = _mlp(), torch.randn(6, 4)
    weighted = ((torch.softmax(net(x), dim=-1) - torch.zeros(6, 3)) * 2.0) ** 2  # a weighted error, written by hand
    assert inspect_loss_graph(weighted.mean()).kind is None
    graph = inspect_loss_graph(weighted.mean(), declared="mse_on_probabilities")
    assert graph.kind == "mse_on_softmax" and graph.squared_error == "PowBackward0"
    torch.testing.assert_close(graph.probabilities, torch.softmax(net(x), dim=-1).detach())
    assert graph.targets is None  # (2 (p - y))^2 does not say what p was compared with


def test_graph_does_not_flag_cross_entropy_regression_or_log_probabilities():
    net, x = _mlp(), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert inspect_loss_graph(nn.functional.cross_entropy(net(x), labels)).kind is None
    assert inspect_loss_graph(nn.functional.mse_loss(net(x), torch.randn(6, 3))).kind is None  # raw regression
    assert inspect_loss_graph(nn.functional.binary_cross_entropy(torch.sigmoid(net(x)),
                                                                 torch.ones(6, 3))).kind is None
    log_p = torch.log_softmax(net(x), dim=-1)  # a squared error of log-probabilities is no probability's
    assert inspect_loss_graph(nn.functional.mse_loss(log_p, torch.zeros(6, 3))).kind is None
    # a softmax deep inside the model (attention-like) feeding a layer is not the loss's input
    hidden = nn.Linear(3, 3)(torch.softmax(net(x), dim=-1))
    assert inspect_loss_graph(nn.functional.mse_loss(hidden, torch.zeros(6, 3))).kind is None
    assert inspect_loss_graph(torch.tensor(1.0)).kind is None
    assert inspect_loss_graph(nn.functional.mse_loss(torch.softmax(net(x), -1), torch.zeros(6, 3)),
                              declared="other").kind is None


def test_after_backward_the_saved_tensors_are_gone_and_nothing_raises():
    net, x = _mlp(), torch.randn(6, 4)
    loss = nn.functional.mse_loss(torch.softmax(net(x), dim=-1), torch.zeros(6, 3))
    loss.backward()
    graph = inspect_loss_graph(loss)
    assert graph.kind == "mse_on_softmax" and graph.probabilities is None
    assert saturation_statistics(graph)["gradient_ratio"] is None


def test_saturation_statistics_on_exact_numbers():
    p = torch.tensor([[0.995, 0.004, 0.001], [0.2, 0.5, 0.3]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    stats = saturation_statistics(LossGraph("mse_on_softmax", "MseLossBackward0", p, y))
    # per sample r = p - y; the squared error's logit gradient projected on r is 2 (sum p r^2 - (p . r)^2)
    projected, norm = 0.0, 0.0
    for row_p, row_y in zip(p.tolist(), y.tolist()):
        r = [a - b for a, b in zip(row_p, row_y)]
        mean = sum(pi * ri for pi, ri in zip(row_p, r))
        projected += 2 * (sum(pi * ri * ri for pi, ri in zip(row_p, r)) - mean * mean)
        norm += sum(ri * ri for ri in r)
    assert stats["gradient_ratio"] == pytest.approx(projected / norm, rel=1e-12)
    assert stats["saturated_share"] == 0.5 and stats["wrong_saturated_share"] == 0.5
    uniform = sum((1 / 3 - v) ** 2 for row in y.tolist() for v in row) / 6
    loss = sum((a - b) ** 2 for rp, ry in zip(p.tolist(), y.tolist()) for a, b in zip(rp, ry)) / 6
    assert stats["loss_ratio"] == pytest.approx(loss / uniform, rel=1e-12) and stats["classes"] == 3.0
    sig = saturation_statistics(LossGraph("mse_on_sigmoid", "PowBackward0", torch.tensor([[0.999, 0.5]]),
                                          torch.tensor([[0.0, 1.0]])))
    r = [0.999, -0.5]
    expected = 2 * (0.999 * 0.001 * r[0] ** 2 + 0.25 * r[1] ** 2) / (r[0] ** 2 + r[1] ** 2)
    assert sig["gradient_ratio"] == pytest.approx(expected, rel=1e-6)
    assert sig["saturated_share"] == 0.5 and sig["wrong_saturated_share"] == 0.5 and sig["classes"] == 1.0


# --- real short Lightning runs -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _quiet():
    with quiet_lightning():
        yield


def _fit(tmp_path, run, callbacks, max_steps=None, logger=False):
    trainer = pl.Trainer(max_steps=max_steps or run.max_steps, accelerator="cpu", devices=1, logger=logger,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, default_root_dir=str(tmp_path))
    trainer.fit(run.module, run.loader)
    return trainer


def test_unscaled_inputs_run_gets_the_finding_with_the_measured_spread(tmp_path):
    unscaled, standardized = scenario("unscaled_inputs").build()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    cb = optdiag.OptDiag(every_n_steps=10, verbose=False)
    _fit(tmp_path, unscaled, [cb], max_steps=30, logger=logger)
    kinds = [f.kind for f in cb.findings if f.kind != "needs_validation"]
    assert kinds == ["ill_conditioning"]
    finding = cb.findings[[f.kind for f in cb.findings].index("ill_conditioning")]
    # the probe read the first 4 batches of 64 (256 samples): the spread of their standard deviations
    seen = torch.cat([unscaled.loader.dataset[i][0] for i in range(4)]).double().numpy().std(axis=0)
    assert finding.evidence["std_spread"] == pytest.approx(seen.max() / seen.min(), rel=1e-9)
    assert (finding.evidence["std_max_feature"], finding.evidence["std_min_feature"]) == (7, 0)
    assert finding.evidence["layer"] == "net.0" and finding.evidence["samples"] == 256
    events = [json.loads(line) for line in open(os.path.join(logger.log_dir, "optdiag", "events.jsonl"))]
    assert [e["kind"] for e in events if e.get("record") == "finding" and e["kind"] == "ill_conditioning"] == [
        "ill_conditioning"]
    # the same run on standardized features: silent
    healthy = optdiag.OptDiag(every_n_steps=10, verbose=False)
    _fit(tmp_path / "std", standardized, [healthy], max_steps=30)
    assert not [f for f in healthy.findings if f.kind in ("ill_conditioning", "loss_choice")]
    assert healthy.conditioning_monitor.inputs["samples"] == 256


def test_mse_on_softmax_run_gets_the_loss_choice_finding_and_cross_entropy_does_not(tmp_path):
    mse, ce = scenario("mse_softmax").build()
    cb = optdiag.OptDiag(verbose=False)
    _fit(tmp_path, mse, [cb])
    finding = next(f for f in cb.findings if f.kind == "loss_choice")
    assert cb.stall_diagnoser.diagnoses and finding.evidence["tests"]["loss_stalled"] == 1.0
    assert finding.evidence["loss_graph"] == "mse_on_softmax" and finding.evidence["gradient_ratio"] < 0.05
    assert finding.evidence["loss_ratio"] > 1.0  # worse than a uniform guess: saturated at wrong classes
    assert finding.recommendations[0].action == "Use cross-entropy on the logits"
    other = optdiag.OptDiag(verbose=False)
    _fit(tmp_path / "ce", ce, [other])
    assert not [f for f in other.findings if f.kind in ("ill_conditioning", "loss_choice")]
    assert other.conditioning_monitor.loss_graph["kind"] is None


def test_declared_loss_and_switched_off_check(tmp_path):
    mse, _ = scenario("mse_softmax").build()
    off = ConditioningMonitor(loss="other", verbose=False)
    _fit(tmp_path, mse, [optdiag.StallDiagnoser(verbose=False), off], max_steps=120)
    assert off.loss_graph is None and not off.findings
    with pytest.raises(UsageError, match="loss must be one of"):
        ConditioningMonitor(loss="mse")
    with pytest.raises(UsageError, match="graph_every"):
        ConditioningMonitor(graph_every=0)


def test_conditioning_monitor_does_no_harm(tmp_path):
    def weights(with_monitor):
        mse, _ = scenario("mse_softmax").build()
        callbacks = [ConditioningMonitor(verbose=False, graph_every=1, input_batches=3)] if with_monitor else []
        torch.manual_seed(7)
        _fit(tmp_path / str(with_monitor), mse, callbacks, max_steps=20)
        return {k: v.clone() for k, v in mse.module.state_dict().items()}, torch.get_rng_state()

    (a, rng_a), (b, rng_b) = weights(True), weights(False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_a, rng_b)


def test_hessian_monitor_splits_the_trace_and_the_top_direction_over_layers(tmp_path):
    from optdiag.callbacks.hessian import HessianMonitor
    from optdiag.demo.scenarios import ScenarioModule, _loader
    from torch.func import functional_call

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, generator=gen) * torch.tensor([10.0, 1.0, 0.1])
    y = torch.randn(32, 1, generator=gen)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))  # 8 + 3 parameters
    module = ScenarioModule(net, nn.functional.mse_loss, lr=1e-3)
    # Hutch++ with three products per parameter sketches the whole space: the split is exact
    monitor = HessianMonitor(every_n_steps=2, probe_batches=1, trace_hvp=33, max_hvp=11, tol=1e-9, density_every=0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, _loader(x, y, 2))
    (snap,) = monitor.history  # at step 2, the parameters training ends with
    assert monitor.parameter_blocks == {"net.0": 8, "net.2": 3}
    names = [n for n, _ in module.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).double()

    def loss(vector):
        params, offset = {}, 0
        for name, p in module.named_parameters():
            params[name] = vector[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return nn.functional.mse_loss(functional_call(module, params, (x.double(),)), y.double())

    module.double()
    hessian = torch.autograd.functional.hessian(loss, flat)
    diagonal = torch.diagonal(hessian)
    assert names[0] == "net.0.weight"
    assert snap["hessian_trace_blocks"]["net.0"] == pytest.approx(float(diagonal[:8].sum()), rel=1e-4)
    assert snap["hessian_trace_blocks"]["net.2"] == pytest.approx(float(diagonal[8:].sum()), rel=1e-4)
    _, vectors = torch.linalg.eigh(hessian)
    top = vectors[:, -1]
    assert snap["lambda_max_blocks"]["net.0"] == pytest.approx(float(top[:8].square().sum()), abs=1e-3)
    assert sum(snap["lambda_max_blocks"].values()) == pytest.approx(1.0)
