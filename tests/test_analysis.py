"""analyze_checkpoint: its numbers are the core's, exact on known Hessians, and its JSON/HTML keep their form."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import numpy as np
import pytest
import torch

import optdiag
from optdiag.analysis import AnalysisReport, analyze_checkpoint
from optdiag.curvature import HessianOperator, hessian_trace, sam_sharpness, top_eigenvalues
from optdiag.errors import UsageError
from tests import fixtures_analysis as fx

FAST = dict(max_batches=3, resolution=5, surface_resolution=3, trace_hvp=30, density_runs=1, density_steps=6)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    zero = {"net.0.weight": torch.zeros(2, 3), "net.1.weight": torch.zeros(2, 2)}
    return {
        # step 0 gives a series its early-training gradient scale: with it an exactly zero gradient is "tiny"
        "init": fx.write_lightning_checkpoint(folder / "init.ckpt", hidden=2, steps=0),
        "init_linear": fx.write_lightning_checkpoint(folder / "init_linear.ckpt", hidden=0, steps=0),
        "trained": fx.write_lightning_checkpoint(folder / "trained.ckpt", hidden=2, steps=2),
        "saddle": fx.write_lightning_checkpoint(folder / "saddle.ckpt", hidden=2, weights=zero, steps=3),
        "minimum": fx.write_lightning_checkpoint(folder / "minimum.ckpt", hidden=0, weights=fx.target_weights()),
    }


@pytest.fixture(scope="module")
def pair_report(checkpoints):
    # Given out of order on purpose: the report sorts by step. The Hessian is over all 3 batches (whitened data).
    return analyze_checkpoint([checkpoints["saddle"], checkpoints["trained"], checkpoints["init"]],
                              model=fx.LinearNet, **FAST)


@pytest.fixture(scope="module")
def written(pair_report, tmp_path_factory):
    """The pair report written once: (html path, json path)."""
    return pair_report.write(tmp_path_factory.mktemp("out") / "report")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_public_entry_point_and_hyper_parameters_restored(checkpoints, pair_report):
    assert optdiag.analyze_checkpoint is analyze_checkpoint and optdiag.AnalysisReport is AnalysisReport
    first = pair_report[0]
    assert [c.step for c in pair_report.checkpoints] == [0, 2, 3]
    assert first.format == "lightning"
    assert first.num_params == 10  # hidden=2 came from the checkpoint's hyper-parameters (the default is 0)


def test_numbers_equal_the_core_on_the_same_model_and_data(checkpoints):
    # Batches of 5, 5 and 2: the loss pass runs in chunks of 2 batches, the Hessian over the first two.
    report = analyze_checkpoint(checkpoints["trained"], model=fx.LinearNet, data=fx.make_uneven_loader,
                                **dict(FAST, max_batches=2))
    analysed = report[0]
    model = fx.LinearNet.load_from_checkpoint(checkpoints["trained"], weights_only=True).eval()
    batches = list(fx.make_uneven_loader())[:2]
    op = HessianOperator(model, fx.half_squared_error, batches)
    top = top_eigenvalues(op, k=3, which="LA", tol=1e-3, seed=0)
    bottom = top_eigenvalues(op, k=3, which="SA", tol=1e-3, seed=1)
    np.testing.assert_allclose(analysed.top.eigenvalues, top.eigenvalues, rtol=1e-6)
    np.testing.assert_allclose(analysed.bottom.eigenvalues, bottom.eigenvalues, rtol=1e-6)
    assert analysed.trace.estimate == pytest.approx(hessian_trace(op, 30, seed=0).estimate, rel=1e-6)
    assert analysed.sharpness["sam"].value == pytest.approx(
        sam_sharpness(model, fx.half_squared_error, batches, rho=0.05).value, rel=1e-6)
    assert analysed.analysis_loss == pytest.approx(op.loss, rel=1e-7)
    # Whole data (3 batches, in chunks of 2), dense float64 reference for the loss and gradient.
    x, y = fx.make_dataset().tensors
    weights = [p.detach().double().requires_grad_(True) for p in model.parameters()]
    loss = 0.5 * ((x.double() @ weights[0].T @ weights[1].T - y.double()) ** 2).sum(1).mean()
    grads = torch.autograd.grad(loss, weights)
    assert analysed.loss == pytest.approx(float(loss), rel=1e-6)
    assert analysed.grad_norm == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-5)
    assert (analysed.n_samples, analysed.n_batches, analysed.hessian_batches) == (12, 3, 2)
    assert analysed.analysis_loss != pytest.approx(analysed.loss)  # the Hessian's batches are not all the data


def test_saddle_of_the_two_layer_linear_net_at_the_origin(pair_report):
    saddle = pair_report[-1]
    assert saddle.loss == pytest.approx(5.0, rel=1e-6)  # 0.5 |A|_F^2 with whitened inputs
    assert saddle.grad_norm == 0.0
    assert saddle.lambda_max == pytest.approx(3.0, abs=1e-4)  # +- the singular values of A
    assert saddle.lambda_min == pytest.approx(-3.0, abs=1e-4)
    assert saddle.trace.estimate == pytest.approx(0.0, abs=1e-4)
    assert saddle.point_type == "saddle_point"
    assert saddle.evidence.grad_norm_initial == pytest.approx(pair_report[0].grad_norm)  # the step-0 scale
    escape = saddle.slices["bottom_eigenvector"]
    assert escape.curvature == pytest.approx(-3.0, abs=1e-4)
    centre = len(escape.t) // 2
    assert escape.loss[centre] == pytest.approx(5.0, rel=1e-6) and escape.loss.max() == pytest.approx(5.0, rel=1e-6)


def test_minimum_of_linear_regression_has_the_input_covariance_as_hessian(checkpoints):
    report = analyze_checkpoint([checkpoints["init_linear"], checkpoints["minimum"]], model=fx.LinearNet, **FAST)
    point = report[1]
    assert point.loss == pytest.approx(0.0, abs=1e-10) and point.grad_norm == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(point.top.eigenvalues, [1.0, 1.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(point.bottom.eigenvalues, [1.0, 1.0, 1.0], atol=1e-4)
    assert point.trace.estimate == pytest.approx(6.0, abs=1e-4)
    assert point.point_type == "local_minimum"
    top = point.slices["top_eigenvector"]
    np.testing.assert_allclose(top.loss, 0.5 * top.t**2, atol=1e-5)  # exactly quadratic
    assert point.optimizer is not None and point.optimizer.lr == pytest.approx(0.05)
    assert point.to_dict()["stability_threshold"] == pytest.approx(2 / 0.05)


def test_series_and_barrier_between_consecutive_checkpoints(pair_report):
    series = pair_report.series
    assert series["step"] == [0, 2, 3]
    assert series["lambda_max"] == [c.lambda_max for c in pair_report.checkpoints]
    first, barrier = pair_report.barriers
    assert first.labels == ("init.ckpt", "trained.ckpt") and barrier.labels == ("trained.ckpt", "saddle.ckpt")
    assert barrier.loss[0] == pytest.approx(pair_report[1].analysis_loss, rel=1e-6)
    assert barrier.loss[-1] == pytest.approx(pair_report[2].analysis_loss, rel=1e-6)


TOP_KEYS = {"schema_version", "optdiag_version", "created", "settings", "checkpoints", "series", "barriers",
            "barrier_notes", "story", "findings"}
CHECKPOINT_KEYS = {
    "path", "step", "epoch", "format", "num_params", "n_samples", "n_batches", "hessian_batches", "loss",
    "analysis_loss", "grad_norm", "lambda_max", "lambda_min", "top_eigenvalues", "bottom_eigenvalues", "residuals",
    "converged", "hessian_trace", "hessian_trace_stderr", "stability_threshold", "stability_ratio", "stability",
    "preconditioned_lambda_max", "epsilon_sharpness", "sam_sharpness", "adaptive_sharpness", "sharpness", "density", "gradient_noise",
    "optimizer", "diagnosis", "point_type", "slices", "surface", "notes", "n_hvp", "seconds", "mode",
    "critical_point", "lambda_min_measured_on",
}


def test_json_schema_is_stable_and_strict(written):
    html_path, json_path = written
    data = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(data) == TOP_KEYS and data["schema_version"] == 1
    for ckpt in data["checkpoints"]:
        assert set(ckpt) == CHECKPOINT_KEYS
        assert ckpt["point_type"] in ("local_minimum", "saddle_point", "plateau", "not_critical", "undecided")
        assert set(ckpt["density"]) == {"grid", "density", "nodes", "weights", "sigma"}
        assert set(ckpt["slices"]) == {"top_eigenvector", "bottom_eigenvector", "random_filter_normalized"}
        assert set(ckpt["slices"]["top_eigenvector"]) == {"name", "t", "loss", "slope", "curvature", "quadratic",
                                                          "direction_norm"}
        assert set(ckpt["residuals"]) == {"top", "bottom"} and len(ckpt["top_eigenvalues"]) == 3
        assert ckpt["diagnosis"] is None or {"step", "kind", "confidence", "evidence", "suggestions",
                                             "summary"} <= set(ckpt["diagnosis"])
    assert set(data["series"]) == {"checkpoint", "step", "loss", "grad_norm", "lambda_max", "lambda_min",
                                   "hessian_trace", "epsilon_sharpness", "sam_sharpness", "adaptive_sharpness"}
    assert set(data["barriers"][0]) == {"from", "to", "t", "loss", "barrier", "distance"}
    assert data["checkpoints"][2]["lambda_min"] == pytest.approx(-3.0, abs=1e-4)


def test_html_is_self_contained_and_holds_its_plots(written):
    html_path, _ = written
    page = html_path.read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    alts = [alt for alt, _ in images]
    # per checkpoint: density, slices, contour; then the series and the barriers
    assert len(images) == 3 * 3 + 2
    assert "series" in alts and "barriers" in alts and "density of saddle.ckpt" in alts
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from anywhere
    assert "saddle point" in page and "trained.ckpt" in page


def test_writing_never_overwrites(pair_report, tmp_path):
    (tmp_path / "report.html").write_text("mine")
    empty = AnalysisReport([], [], pair_report.settings)
    first = empty.write(tmp_path)
    second = empty.write(tmp_path)
    assert (tmp_path / "report.html").read_text() == "mine"
    assert [p.name for p in first] == ["report-2.html", "report-2.json"]
    assert [p.name for p in second] == ["report-3.html", "report-3.json"]
    assert json.loads(first[1].read_text())["checkpoints"] == []
    with pytest.raises(UsageError, match="not a directory"):
        empty.write(tmp_path / "report.html")


def test_nothing_of_the_user_is_changed(checkpoints):
    instance = fx.LinearNet(hidden=2)
    before = {k: v.clone() for k, v in instance.state_dict().items()}
    digest = _sha(checkpoints["saddle"])
    analyze_checkpoint(checkpoints["saddle"], model=instance, **FAST)
    assert all(torch.equal(before[k], v) for k, v in instance.state_dict().items())
    assert instance.training and _sha(checkpoints["saddle"]) == digest


def test_plain_state_dict_with_a_factory_and_a_criterion(tmp_path):
    net = fx.make_plain_net()
    with torch.no_grad():
        net.net[0].weight.copy_(fx.TARGET_MAP)
    path = tmp_path / "plain.pt"
    torch.save({"model_state_dict": net.state_dict()}, path)
    report = analyze_checkpoint(path, model=fx.make_plain_net, data=fx.make_datamodule, loss=torch.nn.MSELoss,
                                **FAST)
    point = report[0]
    assert point.format == "state_dict" and point.step is None
    # MSELoss averages over the 2 outputs too: H = 2 I / 2 = I with whitened inputs
    assert point.lambda_max == pytest.approx(1.0, abs=1e-4) and point.loss == pytest.approx(0.0, abs=1e-10)
    assert point.n_batches == 2  # the datamodule's batches of 6


def test_finite_difference_products_give_the_same_analysis_of_a_quadratic(tmp_path):
    # the linear net with MSE is a quadratic: central differences have no truncation error, only float32 rounding
    path = tmp_path / "zero.pt"
    torch.save({"model_state_dict": {"net.0.weight": torch.zeros(2, 3)}}, path)
    runs = [analyze_checkpoint(path, model=fx.make_plain_net, data=fx.make_datamodule, loss=torch.nn.MSELoss,
                               **dict(FAST, max_batches=1), hvp=hvp)[0] for hvp in ("exact", "finite_difference")]
    exact, fd = runs
    # (the first batch's Hessian: not I alone); within the analysis's Lanczos tolerance, 1e-3 of the scale
    assert fd.lambda_max == pytest.approx(exact.lambda_max, rel=1e-3)
    assert fd.lambda_min == pytest.approx(exact.lambda_min, abs=2e-3 * exact.lambda_max)
    assert (fd.loss, fd.grad_norm) == (pytest.approx(5.0, rel=1e-6), pytest.approx(10.0**0.5, rel=1e-6))
    with pytest.raises(UsageError, match="hvp must be one of"):
        analyze_checkpoint(path, model=fx.make_plain_net, data=fx.make_datamodule, loss=torch.nn.MSELoss, hvp="fd")


def test_loss_pass_over_several_chunks_of_an_mse_model(tmp_path):
    # max_batches=1 and two batches of 6: the second batch is a later chunk of the loss pass. Its operator must not
    # need forward-mode derivatives, which F.mse_loss lacks in torch 2.13.
    path = tmp_path / "zero.pt"
    torch.save({"model_state_dict": {"net.0.weight": torch.zeros(2, 3)}}, path)
    report = analyze_checkpoint(path, model=fx.make_plain_net, data=fx.make_datamodule, loss=torch.nn.MSELoss,
                                **dict(FAST, max_batches=1))
    point = report[0]
    assert (point.n_batches, point.hessian_batches, point.n_samples) == (2, 1, 12)
    # At W = 0 with whitened inputs: mean |A x|^2 / 2 = |A|_F^2 / 2 = 5, and the gradient is -A, of norm sqrt(10).
    assert point.loss == pytest.approx(5.0, rel=1e-6)
    assert point.grad_norm == pytest.approx(10.0**0.5, rel=1e-6)


def test_bad_settings_are_usage_errors(checkpoints):
    with pytest.raises(UsageError, match="max_batches"):
        analyze_checkpoint(checkpoints["minimum"], model=fx.LinearNet, max_batches=0)
    with pytest.raises(UsageError, match="unknown analysis option"):
        analyze_checkpoint(checkpoints["minimum"], model=fx.LinearNet, frobnicate=1)
    with pytest.raises(UsageError, match="no checkpoint"):
        analyze_checkpoint([], model=fx.LinearNet)


# ---------------------------------------------------------------------------------------------------------------
# The function analysed: train mode (batch statistics, dropout off) for BatchNorm nets, eval mode on request


@pytest.fixture(scope="module")
def bn_ckpt(tmp_path_factory):
    return fx.write_batchnorm_checkpoint(tmp_path_factory.mktemp("bn") / "bn.ckpt")


def _direct_loss(path, mode, batches=None):
    """The sample-weighted mean loss of a fresh copy of the checkpoint's BatchNormNet, in ``mode`` with dropout off
    (a fresh copy each time: a plain train-mode forward updates the running statistics)."""
    model = fx.BatchNormNet.load_from_checkpoint(path, weights_only=True)
    model.train(mode == "train")
    model.net[2].eval()
    batches = list(fx.make_loader()) if batches is None else batches
    with torch.no_grad():
        total = sum(float(fx.half_squared_error(model, b)) * len(b[0]) for b in batches)
    return total / sum(len(b[0]) for b in batches)


def test_batchnorm_net_is_analysed_as_the_training_function(bn_ckpt):
    train, evaluation = _direct_loss(bn_ckpt, "train"), _direct_loss(bn_ckpt, "eval")
    assert abs(train - evaluation) > 0.5 * train  # the premise: two different functions of the same weights
    point = analyze_checkpoint(bn_ckpt, model=fx.BatchNormNet, **FAST)[0]
    assert point.mode["used"] == "train" and point.mode["requested"] == "auto"
    assert point.mode["batchnorm_layers"] == ["net.1"] and point.mode["dropout_layers"] == ["net.2"]
    assert "BatchNorm" in point.mode["reason"] and "dropout off" in point.mode["reason"]
    assert point.loss == pytest.approx(train, rel=1e-6)
    assert point.analysis_loss == pytest.approx(train, rel=1e-6)  # max_batches=3 is all the data
    first = [next(iter(fx.make_loader()))]
    assert point.mode["first_batch_loss"]["train"] == pytest.approx(_direct_loss(bn_ckpt, "train", first), rel=1e-6)
    assert point.mode["first_batch_loss"]["eval"] == pytest.approx(_direct_loss(bn_ckpt, "eval", first), rel=1e-6)
    assert point.lambda_min_measured_on == {"batches": 3, "samples": 12, "mode": "train",
                                            "n_hvp": point.bottom.n_hvp, "residual": float(point.bottom.residuals[0])}
    data = point.to_dict()
    assert data["mode"]["function"] == "training-mode function (batch statistics, dropout off)"


def test_eval_mode_on_request_reproduces_the_eval_loss(bn_ckpt):
    point = analyze_checkpoint(bn_ckpt, model=fx.BatchNormNet, mode="eval", **FAST)[0]
    assert point.mode["used"] == "eval" and point.mode["reason"].startswith("asked for")
    assert point.loss == pytest.approx(_direct_loss(bn_ckpt, "eval"), rel=1e-6)
    assert point.lambda_min_measured_on["mode"] == "eval"
    with pytest.raises(UsageError, match="mode must be one of"):
        analyze_checkpoint(bn_ckpt, model=fx.BatchNormNet, mode="training")


def _bits(model):
    return {k: v.clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}


def test_train_mode_analysis_leaves_buffers_and_modes_bitwise_unchanged(bn_ckpt):
    instance = fx.BatchNormNet.load_from_checkpoint(bn_ckpt, weights_only=True).eval()
    before, digest = _bits(instance), _sha(bn_ckpt)
    analyze_checkpoint(bn_ckpt, model=instance, **FAST)
    after = _bits(instance)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in instance.modules()) and _sha(bn_ckpt) == digest
    # The context the analysis runs in: train-mode forwards inside, running statistics bit for bit outside.
    from optdiag.analysis.modes import function_mode

    running_mean = instance.net[1].running_mean
    with function_mode(instance, "train"):
        assert instance.net[1].training and not instance.net[2].training
        instance(next(iter(fx.make_loader()))[0])  # a plain forward updates the running statistics ...
        assert not torch.equal(instance.net[1].running_mean, before["net.1.running_mean"].view(torch.float32))
    assert instance.net[1].running_mean is running_mean  # ... and they are put back, as the same tensor
    assert all(torch.equal(before[k], v) for k, v in _bits(instance).items())
    assert not instance.training


def test_auto_mode_is_eval_when_both_modes_compute_the_same_function(checkpoints):
    point = analyze_checkpoint(checkpoints["minimum"], model=fx.LinearNet, **FAST)[0]
    assert point.mode["used"] == "eval" and point.mode["batchnorm_layers"] == []
    assert point.mode["first_batch_loss"]["train"] == point.mode["first_batch_loss"]["eval"]


# ---------------------------------------------------------------------------------------------------------------
# One consistent story: no minimum verdict for a point that still descends; phases that match the run


def _dense_loss_and_gradient(weight, dataset):
    """Float64 half squared error of ``y = W x`` over the whole dataset, and its gradient."""
    x, y = (t.double() for t in dataset.tensors)
    w = weight.detach().double().requires_grad_(True)
    loss = 0.5 * ((x @ w.T - y) ** 2).sum(1).mean()
    (grad,) = torch.autograd.grad(loss, w)
    return float(loss), grad


def test_a_still_descending_checkpoint_is_not_called_a_minimum(tmp_path):
    # Halfway to the minimum of a convex problem, with batches of one sample: no gradient noise can be measured and
    # there is no early-training scale, so the gradient evidence cannot tell a critical point. The loss along the
    # gradient can.
    half = {"net.0.weight": fx.TARGET_MAP / 2}
    path = fx.write_lightning_checkpoint(tmp_path / "half.ckpt", hidden=0, weights=half)
    point = analyze_checkpoint(path, model=fx.LinearNet, data=fx.make_one_sample_loader,
                               **dict(FAST, max_batches=12))[0]
    loss, grad = _dense_loss_and_gradient(half["net.0.weight"], fx.make_dataset())
    step = float(grad.norm())  # the Hessian is the identity: the quadratic model is lowest at t = |G|
    expected, _ = _dense_loss_and_gradient(half["net.0.weight"] - grad.float(), fx.make_dataset())
    assert point.point_type == "not_critical" and point.diagnosis is None
    assert point.critical_point["state"] == "descending"
    line = point.critical_point["tests"]["gradient_line"]
    assert line["curvature"] == pytest.approx(1.0, rel=1e-5) and line["step"] == pytest.approx(step, rel=1e-5)
    assert line["measured_loss"] == pytest.approx(expected, abs=1e-6)
    assert line["measured_drop"] == pytest.approx(loss - expected, rel=1e-5) and line["descends"] is True
    assert point.critical_point["critical"] is False
    assert point.critical_point["reason"].startswith("not a critical point: still descending")
    assert "noise not measured" in " ".join(point.notes)


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    paths = fx.write_noisy_run(tmp_path_factory.mktemp("run"))
    report = analyze_checkpoint(paths, model=fx.NoisyRegression, **dict(FAST, max_batches=1, surface_resolution=0))
    return paths, report


def test_a_real_run_is_told_as_phases_that_match_its_losses(run_report):
    from optdiag.analysis.story import DESCENT_FRACTION

    paths, report = run_report
    # The truth, independently: the full-data loss of each saved weight; "descending" while the next checkpoint
    # is lower by more than the descent fraction, "minimum" once it is not (the last checkpoint as the one before).
    dataset = fx.make_noisy_dataset()
    saved = [torch.load(p, weights_only=True) for p in paths]
    truth = [_dense_loss_and_gradient(s["state_dict"]["net.0.weight"], dataset)[0] for s in saved]
    steps = [s["global_step"] for s in saved]
    states = ["descending" if a - b > DESCENT_FRACTION * a else "minimum" for a, b in zip(truth, truth[1:])]
    states.append(states[-1])
    assert "descending" in states and states[-1] == "minimum"  # the run is what the test is about
    expected = []
    for i, state in enumerate(states):
        if not expected or expected[-1]["state"] != state:
            expected.append({"state": state, "members": []})
        expected[-1]["members"].append(i)
    story = report.story
    assert [p["state"] for p in story["phases"]] == [e["state"] for e in expected]
    for n, (phase, want) in enumerate(zip(story["phases"], expected)):
        end = expected[n + 1]["members"][0] if n + 1 < len(expected) else want["members"][-1]
        assert phase["checkpoints"] == [report[i].label for i in want["members"]]
        assert (phase["first_step"], phase["last_step"]) == (steps[want["members"][0]], steps[end])
        assert phase["loss_start"] == pytest.approx(truth[want["members"][0]], rel=1e-5)
        assert phase["loss_end"] == pytest.approx(truth[end], rel=1e-5)
        assert phase["text"].startswith(f"steps {steps[want['members'][0]]}-{steps[end]}: {want['state']} (loss ")
    assert story["final"] == "minimum" and story["text"].endswith("; final: minimum")
    for c, state in zip(report.checkpoints, states):
        assert (c.point_type == "local_minimum") == (state == "minimum"), c.label
    # Every verdict agrees with its own evidence: no minimum where the loss still falls along the gradient or
    # on the path to the next checkpoint.
    for c in report.checkpoints:
        tests = c.critical_point["tests"]
        falls = any((tests[k] or {}).get("descends") for k in ("gradient_line", "towards_next"))
        assert not (falls and c.point_type in ("local_minimum", "saddle_point")), c.label


def test_the_runs_still_descending_checkpoint_loses_its_minimum_verdict(run_report):
    from optdiag.analysis.story import DESCENT_FRACTION

    _, report = run_report
    gated = [c for c in report.checkpoints if c.classified is not None and c.diagnosis is None]
    assert gated  # the premise: the gradient evidence alone called a still-descending checkpoint a minimum
    for c in gated:
        weight = torch.load(c.path, weights_only=True)["state_dict"]["net.0.weight"]
        loss, grad = _dense_loss_and_gradient(weight, fx.make_noisy_dataset())
        # The Hessian is the identity: the quadratic model along -G is lowest at t = |G|, at weight - G.
        expected, _ = _dense_loss_and_gradient(weight - grad.float(), fx.make_noisy_dataset())
        line = c.critical_point["tests"]["gradient_line"]
        assert c.classified.kind == "local_minimum" and c.critical_point["classified_as"]["kind"] == "local_minimum"
        assert c.point_type == "not_critical" and c.critical_point["state"] == "descending"
        assert line["step"] == pytest.approx(float(grad.norm()), rel=1e-5)
        assert line["measured_loss"] == pytest.approx(expected, rel=1e-5)
        assert line["relative_drop"] == pytest.approx((loss - expected) / loss, rel=1e-4)
        assert line["relative_drop"] > DESCENT_FRACTION
        assert c.critical_point["reason"].startswith("not a critical point: still descending")


def test_the_story_and_the_gate_are_in_report_json_and_html(run_report, tmp_path):
    _, report = run_report
    html_path, json_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["story"] == json.loads(json.dumps(report.story))
    gated = [c for c in data["checkpoints"] if c["critical_point"]["classified_as"] and c["diagnosis"] is None]
    page = html_path.read_text()
    assert "The story" in page and report.story["text"] in page.replace("&gt;", ">")
    for c in gated:
        assert c["point_type"] == "not_critical" and c["critical_point"]["reason"].startswith("not a critical point")
    assert "Function analysed" in page and "Is it a critical point?" in page
    assert "Lanczos on 1 batches (64 samples), eval mode" in page


def test_story_splits_phases_at_a_barrier_between_minima():
    from optdiag.analysis.story import tell_story

    rows = [dict(label=f"{s}.ckpt", step=s, loss=1.0, point_type="local_minimum", lambda_min=0.5, lambda_max=2.0)
            for s in (10, 20, 30)]
    barriers = [{"from": "10.ckpt", "to": "20.ckpt", "barrier": 0.0}, {"from": "20.ckpt", "to": "30.ckpt",
                                                                        "barrier": 0.3}]
    story = tell_story(rows, barriers)
    assert [p["checkpoints"] for p in story["phases"]] == [["10.ckpt", "20.ckpt"], ["30.ckpt"]]
    assert story["phases"][0]["max_barrier"] == 0.0 and "a barrier of 0.3" in story["phases"][1]["text"]
    assert story["text"] == ("steps 10-30: minimum (loss 1 -> 1, lambda_min 0.5); step 30: minimum (loss 1, "
                             "lambda_min 0.5; a barrier of 0.3 separates it from the previous one); final: minimum")


def test_a_lightning_pytorch_module_is_analysed_like_a_pytorch_lightning_one(tmp_path):
    """The unified ``lightning`` package's LightningModule is another class: its training_step and
    train_dataloader are found all the same (it was refused as having no training_step)."""
    ckpt = fx.write_unified_checkpoint(tmp_path / "unified.ckpt")
    point = analyze_checkpoint(ckpt, model=fx.UnifiedNet, **FAST)[0]
    model = fx.UnifiedNet.load_from_checkpoint(ckpt, weights_only=True)
    x = torch.cat([b[0] for b in fx.make_loader()])
    y = torch.cat([b[1] for b in fx.make_loader()])
    with torch.no_grad():
        expected = float(0.5 * ((model(x) - y) ** 2).sum(dim=1).mean())
    assert point.loss == pytest.approx(expected, rel=1e-5)
