"""The demo scenarios' ground truth (checked without optdiag), and the ``optdiag demo`` command line.

The truth of each scenario is verified here independently of the diagnosis: dense float64 Hessians from
``torch.autograd.functional.hessian``, the data's own spectrum and plain-torch replays of the training dynamics.
What optdiag *finds* on the scenarios is tested in ``test_stall_diagnoser.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

from optdiag.demo import cli as demo_cli
from optdiag.demo.scenarios import (
    DEFAULT_SCENARIOS,
    EOS_LR,
    SADDLE_OFFSET_SCALE,
    SADDLE_SIGMAS,
    SCENARIOS,
    ScenarioModule,
    StepBatches,
    half_squared_error,
    regression_lambda_max,
    scaled_regression_data,
    scenario,
    whitened_linear_map_data,
)
from optdiag.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_hessian(module: ScenarioModule, batch) -> torch.Tensor:
    """The exact float64 Hessian of the module's loss on ``batch`` (the module is not modified)."""
    names = [n for n, _ in module.net.named_parameters()]
    shapes = [p.shape for p in module.net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in module.net.parameters()]).double()
    x, y = (t.double() for t in batch)

    def loss(vector: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[offset: offset + math.prod(shape)].view(shape)
            offset += math.prod(shape)
        return module.loss_fn(functional_call(module.net, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data and building blocks ---------------------------------------------------------------------------------
def test_whitened_data_has_identity_covariance_and_best_fit_exactly_a():
    offset = torch.tensor([3.0, -3.0, 1.5])
    x, y, a = whitened_linear_map_data(n=64, sigmas=(3.0, 1.0), offset=offset)
    assert torch.allclose(x.T @ x / 64, torch.eye(4), atol=1e-5)
    assert torch.allclose(x.mean(0), torch.zeros(4), atol=1e-6)  # centred: offset and map decouple
    assert torch.allclose(torch.linalg.svdvals(a)[:2], torch.tensor([3.0, 1.0]), atol=1e-5)
    design = torch.cat([x, torch.ones(64, 1)], dim=1).double()
    best = torch.linalg.lstsq(design, y.double()).solution.T
    assert torch.allclose(best[:, :4].float(), a, atol=1e-5)  # the noise is orthogonal to inputs and offset
    assert torch.allclose(best[:, 4].float(), offset, atol=1e-5)
    residual = 0.5 * ((y - x @ a.T - offset) ** 2).sum(1).mean()
    assert residual > 0.01  # a minimum with a loss above zero


def test_data_generators_reject_impossible_shapes():
    with pytest.raises(UsageError, match="n > in_features"):
        whitened_linear_map_data(n=4, in_features=4)
    with pytest.raises(UsageError, match="singular values do not fit"):
        whitened_linear_map_data(in_features=2, out_features=2, sigmas=(3.0, 2.0, 1.0))


def test_regression_lambda_max_matches_the_dense_hessian():
    x, y = scaled_regression_data(n=128)
    module = ScenarioModule(nn.Linear(8, 1), nn.functional.mse_loss, lr=0.1)
    top = float(torch.linalg.eigvalsh(dense_hessian(module, (x, y)))[-1])
    assert regression_lambda_max(x) == pytest.approx(top, rel=1e-6)
    assert top > 100  # the x10 feature: lambda ~ 2 * 100


def test_half_squared_error_normalisation():
    prediction, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert float(half_squared_error(prediction, target)) == pytest.approx(0.5 * (1 + 4) / 2)


def test_step_batches_are_seeded_and_cover_each_epoch_once():
    x, y = torch.arange(10.0).view(10, 1), torch.zeros(10, 1)
    batches = StepBatches(x, y, steps=7, batch_size=5, seed=3)
    again = StepBatches(x, y, steps=7, batch_size=5, seed=3)
    assert len(batches) == 7
    assert all(torch.equal(batches[i][0], again[i][0]) for i in range(7))
    epoch = torch.cat([batches[0][0], batches[1][0]]).view(-1)
    assert sorted(epoch.tolist()) == list(range(10))
    full = StepBatches(x, y, steps=3)
    assert torch.equal(full[2][0], x)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 3, "batch_size": 11}, r"batch_size must be in \[1, 10\]"),
])
def test_step_batches_reject_bad_arguments(kwargs, message):
    with pytest.raises(UsageError, match=message):
        StepBatches(torch.zeros(10, 1), torch.zeros(10, 1), **kwargs)
    with pytest.raises(UsageError, match="differ in length"):
        StepBatches(torch.zeros(10, 1), torch.zeros(9, 1), steps=1)


def test_scenario_module_validates_lr_and_momentum():
    with pytest.raises(UsageError, match="lr must be positive"):
        ScenarioModule(nn.Linear(1, 1), nn.functional.mse_loss, lr=0.0)
    with pytest.raises(UsageError, match=r"momentum must be in \[0, 1\)"):
        ScenarioModule(nn.Linear(1, 1), nn.functional.mse_loss, lr=0.1, momentum=1.0)


def test_every_scenario_builds_fresh_deterministic_runs():
    for name, spec in SCENARIOS.items():
        first, second = spec.build(), spec.build()
        assert first and len(first) == len(second)
        for a, b in zip(first, second):
            assert a.module is not b.module and a.max_steps == len(a.loader.dataset)
            for p, q in zip(a.module.parameters(), b.module.parameters()):
                assert torch.equal(p, q)  # the same init every time, from a fixed seed


def test_building_a_scenario_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    scenario("edge_of_stability").build()
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_scenario_names_the_choices():
    with pytest.raises(UsageError, match="unknown scenario 'nope'; choose one of: saddle, oscillation"):
        scenario("nope")


# --- the truth of each scenario, without optdiag ----------------------------------------------------------------
def test_saddle_truth_plateaus_at_the_saddles_with_lambda_min_minus_sigma():
    (run,) = scenario("saddle").build()
    k2 = SADDLE_OFFSET_SCALE**2
    start = torch.linalg.eigvalsh(dense_hessian(run.module, run.data))
    # W ~ 0: the offset's curvature k^2, and +-sigma_i from the saddle (each twice: hidden width 2)
    assert float(start[-1]) == pytest.approx(k2, rel=1e-3) and float(start[0]) == pytest.approx(-SADDLE_SIGMAS[0], rel=1e-3)
    optimizer = run.module.configure_optimizers()
    losses, lambda_min = [], {}
    for step, batch in enumerate(run.loader):
        if step in (40, 350):  # inside the first and the second plateau
            lambda_min[step] = float(torch.linalg.eigvalsh(dense_hessian(run.module, run.data))[0])
        loss = run.module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    floor = losses[-1]
    # the offset is learnt first; the plateaus sit at 1/2 (sigma_1^2 + sigma_2^2) and 1/2 sigma_2^2 above the floor
    assert losses[0] - floor > 10 * (losses[40] - floor - 0.5 * (SADDLE_SIGMAS[0] ** 2 + SADDLE_SIGMAS[1] ** 2))
    assert losses[40] - floor == pytest.approx(0.5 * (SADDLE_SIGMAS[0] ** 2 + SADDLE_SIGMAS[1] ** 2), rel=0.01)
    assert losses[350] - floor == pytest.approx(0.5 * SADDLE_SIGMAS[1] ** 2, rel=0.02)
    assert lambda_min[40] == pytest.approx(-SADDLE_SIGMAS[0], rel=0.01)
    assert lambda_min[350] == pytest.approx(-SADDLE_SIGMAS[1], rel=0.02)
    final = torch.linalg.eigvalsh(dense_hessian(run.module, run.data))
    assert float(final[0]) > -1e-3 and float(final[-1]) == pytest.approx(k2, rel=0.01)


def test_oscillation_truth_bounces_with_anti_aligned_gradients():
    (run,) = scenario("oscillation").build()
    assert run.truth["lr_lambda_max"] == 1.8
    assert run.module.lr * regression_lambda_max(run.data[0]) == pytest.approx(1.8)
    optimizer = run.module.configure_optimizers()
    cosines, previous, losses = [], None, []
    for step, batch in enumerate(run.loader):
        loss = run.module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in run.module.parameters()])
        if previous is not None and step > 100:
            cosines.append(float(torch.nn.functional.cosine_similarity(gradient, previous, dim=0)))
        previous = gradient.clone()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(cosines) / len(cosines) < -0.5
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.1 * losses[0]


def test_divergence_truth_overflows():
    (run,) = scenario("divergence").build()
    assert run.truth["lr_lambda_max"] > 2
    optimizer = run.module.configure_optimizers()
    finite = True
    for step, batch in enumerate(run.loader):
        loss = run.module.training_step(batch, step)
        if not math.isfinite(float(loss.detach())):
            finite = False
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not finite


def test_minimum_and_plateau_truth_convex_with_known_step():
    (minimum,) = scenario("minimum").build()
    (plateau,) = scenario("plateau").build()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(minimum.module, minimum.data))
    assert float(eigenvalues[0]) > 0.5  # convex: every eigenvalue positive, everywhere
    assert minimum.module.lr * float(eigenvalues[-1]) == pytest.approx(0.3, rel=1e-4)
    assert plateau.module.lr * float(eigenvalues[-1]) < 1e-4  # the same problem, lr ~ 4 orders too small


@pytest.mark.slow
def test_edge_of_stability_truth_sharpness_rises_to_two_over_lr():
    (run,) = scenario("edge_of_stability").build()
    optimizer = run.module.configure_optimizers()
    sharpness, losses = {}, []
    for step, batch in enumerate(run.loader):
        if step in (0, 400, 599):
            sharpness[step] = float(torch.linalg.eigvalsh(dense_hessian(run.module, run.data))[-1])
        loss = run.module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    target = 2.0 / EOS_LR
    assert sharpness[0] < 0.6 * target  # progressive sharpening starts well below the threshold
    assert sharpness[400] == pytest.approx(target, rel=0.1)
    assert sharpness[599] == pytest.approx(target, rel=0.1)
    assert sum(losses[-100:]) < sum(losses[-300:-200])  # ... while the loss keeps falling


# --- the command line -------------------------------------------------------------------------------------------
def test_resolve_scenarios():
    assert demo_cli.resolve_scenarios(None) == list(DEFAULT_SCENARIOS)
    assert demo_cli.resolve_scenarios("all") == list(SCENARIOS)
    assert demo_cli.resolve_scenarios("minimum, saddle") == ["saddle", "minimum"]
    with pytest.raises(UsageError, match="unknown scenario 'sadle'"):
        demo_cli.resolve_scenarios("saddle,sadle")
    with pytest.raises(UsageError, match="empty scenario name"):
        demo_cli.resolve_scenarios("saddle,")


def test_default_subset_is_representative():
    kinds = {k for name in DEFAULT_SCENARIOS for k in (SCENARIOS[name].expected or ())}
    assert {"saddle_point", "local_minimum", "oscillation", "plateau"} <= kinds
    assert "edge_of_stability" in DEFAULT_SCENARIOS  # the "not a stall" case


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    root = tmp_path / "out"
    first, second = demo_cli.new_run_dir(str(root)), demo_cli.new_run_dir(str(root))
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        demo_cli.new_run_dir(str(tmp_path / "file"))


def test_list_prints_every_scenario(capsys):
    assert demo_cli.run(argparse.Namespace(list=True, scenario=None, out="unused", no_figures=True)) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)


def _optdiag(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "optdiag", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning
def test_cli_bad_scenario_exits_2_with_one_line(tmp_path):
    done = _optdiag("demo", "--scenario", "nope", "--out", str(tmp_path / "o"), cwd=str(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown scenario 'nope'" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()  # nothing was created for a bad request


@pytest.mark.parametrize("argv, message", [
    (("demo", "nope"), "unknown scenario 'nope'"),  # the positional name is the --scenario name
    (("demo", "saddle", "--scenario", "minimum"), "two scenarios asked for: 'saddle' and --scenario 'minimum'"),
])
def test_cli_positional_scenario_name(tmp_path, argv, message):
    done = _optdiag(*argv, "--out", str(tmp_path / "o"), cwd=str(tmp_path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_saddle_scenario_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = _optdiag("demo", "--scenario", "saddle", "--out", str(out), cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "saddle_point" in done.stdout and "1/1 scenarios as expected" in done.stdout
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary[0]["found"] == ["saddle_point", "saddle_point", "local_minimum"] and summary[0]["as_expected"]
    events = run_dir / "saddle" / "main" / "optdiag" / "events.jsonl"
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["kind"] for r in records if r.get("record") != "outcome"] == summary[0]["found"]
    # the two saddles' predictions (the loss drops once the escape grows) were checked and held
    assert [r["outcome"] for r in records if r.get("record") == "outcome" and r["kind"] == "saddle_point"] == [
        "confirmed", "confirmed"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "saddle" / "main"))
    assert (run_dir / "saddle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
