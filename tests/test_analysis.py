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
        "trained": fx.write_lightning_checkpoint(folder / "trained.ckpt", hidden=2, steps=2),
        "saddle": fx.write_lightning_checkpoint(folder / "saddle.ckpt", hidden=2, weights=zero, steps=3),
        "minimum": fx.write_lightning_checkpoint(folder / "minimum.ckpt", hidden=0, weights=fx.target_weights()),
    }


@pytest.fixture(scope="module")
def pair_report(checkpoints):
    # Given out of order on purpose: the report sorts by step. The Hessian is over all 3 batches (whitened data).
    return analyze_checkpoint([checkpoints["saddle"], checkpoints["trained"]], model=fx.LinearNet, **FAST)


@pytest.fixture(scope="module")
def written(pair_report, tmp_path_factory):
    """The pair report written once: (html path, json path)."""
    return pair_report.write(tmp_path_factory.mktemp("out") / "report")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_public_entry_point_and_hyper_parameters_restored(checkpoints, pair_report):
    assert optdiag.analyze_checkpoint is analyze_checkpoint and optdiag.AnalysisReport is AnalysisReport
    first = pair_report[0]
    assert [c.step for c in pair_report.checkpoints] == [2, 3]
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
    saddle = pair_report[1]
    assert saddle.loss == pytest.approx(5.0, rel=1e-6)  # 0.5 |A|_F^2 with whitened inputs
    assert saddle.grad_norm == 0.0
    assert saddle.lambda_max == pytest.approx(3.0, abs=1e-4)  # +- the singular values of A
    assert saddle.lambda_min == pytest.approx(-3.0, abs=1e-4)
    assert saddle.trace.estimate == pytest.approx(0.0, abs=1e-4)
    assert saddle.point_type == "saddle_point"
    escape = saddle.slices["bottom_eigenvector"]
    assert escape.curvature == pytest.approx(-3.0, abs=1e-4)
    centre = len(escape.t) // 2
    assert escape.loss[centre] == pytest.approx(5.0, rel=1e-6) and escape.loss.max() == pytest.approx(5.0, rel=1e-6)


def test_minimum_of_linear_regression_has_the_input_covariance_as_hessian(checkpoints):
    report = analyze_checkpoint(checkpoints["minimum"], model=fx.LinearNet, **FAST)
    point = report[0]
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
    assert series["step"] == [2, 3]
    assert series["lambda_max"] == [c.lambda_max for c in pair_report.checkpoints]
    (barrier,) = pair_report.barriers
    assert barrier.labels == ("trained.ckpt", "saddle.ckpt")
    assert barrier.loss[0] == pytest.approx(pair_report[0].analysis_loss, rel=1e-6)
    assert barrier.loss[-1] == pytest.approx(pair_report[1].analysis_loss, rel=1e-6)


TOP_KEYS = {"schema_version", "optdiag_version", "created", "settings", "checkpoints", "series", "barriers",
            "barrier_notes", "story"}
CHECKPOINT_KEYS = {
    "path", "step", "epoch", "format", "num_params", "n_samples", "n_batches", "hessian_batches", "loss",
    "analysis_loss", "grad_norm", "lambda_max", "lambda_min", "top_eigenvalues", "bottom_eigenvalues", "residuals",
    "converged", "hessian_trace", "hessian_trace_stderr", "stability_threshold", "stability_ratio",
    "epsilon_sharpness", "sam_sharpness", "adaptive_sharpness", "sharpness", "density", "gradient_noise",
    "optimizer", "diagnosis", "point_type", "slices", "surface", "notes", "n_hvp", "seconds", "mode",
    "critical_point", "lambda_min_measured_on",
}


def test_json_schema_is_stable_and_strict(written):
    html_path, json_path = written
    data = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(data) == TOP_KEYS and data["schema_version"] == 1
    for ckpt in data["checkpoints"]:
        assert set(ckpt) == CHECKPOINT_KEYS
        assert ckpt["point_type"] in ("local_minimum", "saddle_point", "plateau", "not_critical")
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
    assert data["checkpoints"][1]["lambda_min"] == pytest.approx(-3.0, abs=1e-4)


def test_html_is_self_contained_and_holds_its_plots(written):
    html_path, _ = written
    page = html_path.read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    alts = [alt for alt, _ in images]
    # per checkpoint: density, slices, contour; then the series and the barriers
    assert len(images) == 3 * 2 + 2
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
