"""GradientNormMonitor: every logged number checked against an independent computation on a real Trainer."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_models import RegressionDataModule, RegressionModule, make_trainer
from optdiag.callbacks.gradient_norm import GradientNormMonitor, layer_name, measured_steps_interval
from optdiag.curvature.noise import gradient_noise_scale
from optdiag.errors import UsageError


class GradientRecorder(pl.Callback):
    """Independent record of what the optimizer saw: gradients before clipping, parameters around each step."""

    def __init__(self) -> None:
        self.grads, self.params_before, self.params_after, self.batches = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()})
        self.params_before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.params_after) < len(self.params_before):
            self.params_after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _flat(d: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in d.values()])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _fit(tmp_path, monitor, module=None, steps=4, **trainer_kwargs):
    recorder = GradientRecorder()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor, recorder], max_steps=steps, **trainer_kwargs)
    trainer.fit(module or RegressionModule(optimizer="sgd", lr=0.05, momentum=0.9), RegressionDataModule())
    return trainer, recorder


def _assert_matches_record(monitor, rec):
    """Every measured step's numbers against the independent record; cosines only between consecutive steps."""
    measured = {h["step"] for h in monitor.history}
    for h in monitor.history:
        k = h["step"]
        g = _flat(rec.grads[k])
        assert h["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
        for layer in ("net.0", "net.2"):
            layer_g = torch.cat([v.reshape(-1).double() for n, v in rec.grads[k].items() if n.startswith(layer + ".")])
            assert h[f"{layer}/grad_norm"] == pytest.approx(float(layer_g.norm()), rel=1e-6)
        update = _flat(rec.params_after[k]) - _flat(rec.params_before[k])
        tracked = monitor.tracks_update(k)  # else a gradient-only step: no update measured
        if tracked:
            assert h["update_norm"] == pytest.approx(float(update.norm()), rel=1e-5)
            assert h["update_ratio"] == pytest.approx(float(update.norm() / _flat(rec.params_before[k]).norm()),
                                                      rel=1e-5)
        else:
            assert math.isnan(h["update_norm"]) and math.isnan(h["update_ratio"]) and math.isnan(h["update_cosine"])
        assert h["grad_norm_clipped"] == h["grad_norm"]  # no clipping configured
        if k - 1 not in measured:  # the first step, or the first of a pair: no consecutive previous vector
            assert math.isnan(h["grad_cosine"]) and math.isnan(h["update_cosine"])
        else:
            assert h["grad_cosine"] == pytest.approx(_cos(g, _flat(rec.grads[k - 1])), abs=1e-6)
            previous = _flat(rec.params_after[k - 1]) - _flat(rec.params_before[k - 1])
            if tracked and monitor.tracks_update(k - 1):
                assert h["update_cosine"] == pytest.approx(_cos(update, previous), abs=1e-5)
            else:
                assert math.isnan(h["update_cosine"])
    assert monitor.latest == monitor.history[-1]


def test_norms_updates_and_cosines_match_an_independent_record(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1)
    _, rec = _fit(tmp_path, monitor, steps=4)
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3]
    _assert_matches_record(monitor, rec)


def test_sampled_cadence_measures_the_first_steps_then_consecutive_pairs_exactly(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=3)
    _, rec = _fit(tmp_path, monitor, steps=10)
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 5, 6, 8, 9]  # 0-2, then pairs (3k - 1, 3k)
    _assert_matches_record(monitor, rec)
    cosines = {h["step"]: h["grad_cosine"] for h in monitor.history}
    assert math.isnan(cosines[5]) and math.isnan(cosines[8]) and not math.isnan(cosines[6])


@pytest.mark.parametrize("trainer_every, expected", [(1, 1), (4, 4), (50, 10)])
def test_default_cadence_is_the_logging_interval_capped_at_ten(tmp_path, trainer_every, expected):
    monitor = GradientNormMonitor(clock=lambda: 0.0)  # a clock that never moves: measuring costs nothing
    _fit(tmp_path, monitor, steps=12, log_every_n_steps=trainer_every)
    measured = [s for s in range(12) if s < expected or s % expected in (0, expected - 1)]
    assert [h["step"] for h in monitor.history] == measured
    assert measured_steps_interval(trainer_every, None) == expected and measured_steps_interval(50, 7) == 7


class _Clock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _StepSeconds(pl.Callback):
    """10 ms of training per batch on ``clock``."""

    def __init__(self, clock):
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.now += 0.01


def test_the_default_cadence_spaces_its_pairs_by_their_cost_after_the_first_window(tmp_path, monkeypatch):
    clock = _Clock()
    measure = GradientNormMonitor._measure_gradient

    def costly(self, *args):  # a measured step costing 3 ms against 10 ms steps (a large model, small batches)
        clock.now += 0.003
        return measure(self, *args)

    monkeypatch.setattr(GradientNormMonitor, "_measure_gradient", costly)
    monitor = GradientNormMonitor(clock=clock)
    recorder = GradientRecorder()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [_StepSeconds(clock), monitor, recorder], max_steps=45, log_every_n_steps=50)
    trainer.fit(RegressionModule(optimizer="sgd", lr=0.05, momentum=0.9), RegressionDataModule())
    # a pair (6 ms) may take 3% of n steps' 10 ms: n = 6 / 0.3 = 20, from step 10 on (the first 10 all measured)
    assert monitor._cadence == 20 and monitor._log_interval == 60
    assert [h["step"] for h in monitor.history] == list(range(10)) + [19, 20, 39, 40]
    _assert_matches_record(monitor, recorder)
    # a fixed cadence is the user's choice of cost: never spaced
    fixed = GradientNormMonitor(every_n_steps=10, clock=clock)
    pl.seed_everything(0)
    make_trainer(tmp_path / "fixed", [_StepSeconds(clock), fixed], max_steps=25).fit(
        RegressionModule(optimizer="sgd", lr=0.05, momentum=0.9), RegressionDataModule())
    assert [h["step"] for h in fixed.history] == list(range(10)) + [10, 19, 20]


def test_pairs_on_demand_are_routine_between_the_stretches_a_diagnoser_judges(tmp_path, monkeypatch):
    """With pairs_on_demand (the stall diagnoser asks for it) the same 3 ms measured steps get a routine cadence
    priced at 1% (a multiple of the 3% one: 6 ms / 0.1 ms = 60), and the 3% cadence (20) only up to the step
    measure_pairs_until names; the logged steps are measured under both."""
    clock = _Clock()
    measure = GradientNormMonitor._measure_gradient

    def costly(self, *args):
        clock.now += 0.003
        return measure(self, *args)

    class JudgeFrom(pl.Callback):  # as the diagnoser does while a stretch looks flat: dense pairs up to step 85
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 70:
                monitor.measure_pairs_until(85)

    monkeypatch.setattr(GradientNormMonitor, "_measure_gradient", costly)
    monitor = GradientNormMonitor(clock=clock)
    monitor.pairs_on_demand()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [_StepSeconds(clock), monitor, JudgeFrom()], max_steps=130, log_every_n_steps=50)
    trainer.fit(RegressionModule(optimizer="sgd", lr=0.05, momentum=0.9), RegressionDataModule())
    assert (monitor._cadence, monitor._routine, monitor._log_interval) == (20, 60, 60)
    assert [h["step"] for h in monitor.history] == list(range(10)) + [59, 60, 79, 80, 119, 120]
    # the dense pair measures the gradient only (its cosine exact); the routine ones and the first window the update too
    light = {h["step"] for h in monitor.history if math.isnan(h["update_norm"])}
    assert light == {1, 2, 3, 4, 5, 6, 7, 79, 80}  # the first window's first and last two steps track the update
    dense = {h["step"]: h for h in monitor.history}
    assert math.isfinite(dense[80]["grad_cosine"]) and math.isnan(dense[80]["update_cosine"])
    assert math.isfinite(dense[120]["update_cosine"]) and math.isfinite(dense[120]["update_ratio"])


def test_each_kind_of_pair_is_priced_at_its_kind_of_step(tmp_path, monkeypatch):
    """With a diagnoser the dense pairs measure the gradient only, the routine ones the update too: a full step
    costing 3 ms and a gradient-only one 2.5 ms against 10 ms training steps give a dense cadence of
    5 / 0.3 = 16.7 -> 17 and a routine one of 6 / 0.1 = 60, rounded up to a multiple of 17: 68."""
    clock = _Clock()
    measure = GradientNormMonitor._measure_gradient

    def costly(self, trainer, pl_module, optimizer, step):
        clock.now += 0.003 if self.tracks_update(step) else 0.0025
        return measure(self, trainer, pl_module, optimizer, step)

    monkeypatch.setattr(GradientNormMonitor, "_measure_gradient", costly)
    monitor = GradientNormMonitor(clock=clock)
    monitor.pairs_on_demand()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [_StepSeconds(clock), monitor], max_steps=20, log_every_n_steps=50)
    trainer.fit(RegressionModule(optimizer="sgd", lr=0.05, momentum=0.9), RegressionDataModule())
    assert (monitor._cadence, monitor._routine) == (17, 68)


def test_plain_sgd_update_is_lr_times_gradient(tmp_path):
    monitor = GradientNormMonitor()
    _fit(tmp_path, monitor, module=RegressionModule(optimizer="sgd", lr=0.05), steps=3)
    for h in monitor.history:
        assert h["update_norm"] == pytest.approx(0.05 * h["grad_norm"], rel=1e-5)


class OneWeight(pl.LightningModule):
    """loss = (w x)^2 with x = 1: Hessian 2, so lr 0.75 gives w <- -0.5 w, an exact sign flip every step."""

    def __init__(self, lr: float = 0.75, blow_up_at: int | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.lr, self.blow_up_at = lr, blow_up_at

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = ((self.w * x) ** 2).mean()
        if self.blow_up_at is not None and self.global_step >= self.blow_up_at:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _ones_loader():
    return DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=1)


def test_oscillation_gives_cosines_of_minus_one_and_exact_update_ratio(tmp_path):
    monitor = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(OneWeight(), _ones_loader())
    w = [1.0, -0.5, 0.25, -0.125]
    for k, h in enumerate(monitor.history):
        assert h["grad_norm"] == pytest.approx(2 * abs(w[k]))
        assert h["update_norm"] == pytest.approx(1.5 * abs(w[k]))
        assert h["update_ratio"] == pytest.approx(1.5)
        assert h["w/grad_norm"] == pytest.approx(2 * abs(w[k]))  # a root-module parameter is its own layer
        if k:
            assert h["grad_cosine"] == pytest.approx(-1.0) and h["update_cosine"] == pytest.approx(-1.0)


def test_clipped_norm_is_the_norm_the_optimizer_used(tmp_path):
    monitor = GradientNormMonitor()
    _fit(tmp_path, monitor, steps=3, gradient_clip_val=0.5)
    for h in monitor.history:
        assert h["grad_norm"] > 0.5  # this problem's gradients exceed the clip value
        assert h["grad_norm_clipped"] == pytest.approx(0.5, rel=1e-5)


def test_once_per_accumulation_window_and_noise_scale_from_micro_batches(tmp_path):
    monitor = GradientNormMonitor(noise_window=10)
    module = RegressionModule(optimizer="sgd", lr=0.05)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    _, rec = _fit(tmp_path, monitor, module=module, steps=2, accumulate_grad_batches=4)
    assert [h["step"] for h in monitor.history] == [0, 1]
    assert len(rec.batches) == 8
    # independent: gradient of each of the first window's four batches at the initial parameters
    probe = RegressionModule(optimizer="sgd", lr=0.05)
    probe.load_state_dict(initial)
    micro = []
    for x, y in rec.batches[:4]:
        probe.zero_grad()
        nn.functional.mse_loss(probe(x), y).backward()
        micro.append(torch.cat([p.grad.reshape(-1).double() for p in probe.parameters()]))
    window = torch.stack(micro).mean(0)
    assert monitor.history[0]["grad_norm"] == pytest.approx(float(window.norm()), rel=1e-5)
    expected = gradient_noise_scale([float(g.square().sum()) for g in micro], float(window.square().sum()), 32, 128)
    assert monitor.history[0]["grad_noise_trace"] == pytest.approx(expected.trace_sigma, rel=1e-4)
    assert monitor.history[0]["grad_sq_unbiased"] == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert monitor.history[0]["noise_scale"] == pytest.approx(expected.b_simple, rel=1e-4)


def test_noise_scale_only_from_the_micro_batches_of_measured_steps(tmp_path):
    monitor = GradientNormMonitor(noise_window=1, every_n_steps=3)
    module = RegressionModule(optimizer="sgd", lr=0.05)
    _, rec = _fit(tmp_path, monitor, module=module, steps=6, accumulate_grad_batches=2)
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 5]
    # step 5 pools only its own two micro-batches (noise_window=1), not those of the unmeasured step 4
    probe = RegressionModule(optimizer="sgd", lr=0.05)
    probe.load_state_dict({n: p for n, p in rec.params_before[5].items()})
    micro = []
    for x, y in rec.batches[10:12]:
        probe.zero_grad()
        nn.functional.mse_loss(probe(x), y).backward()
        micro.append(torch.cat([p.grad.reshape(-1).double() for p in probe.parameters()]))
    window = torch.stack(micro).mean(0)
    expected = gradient_noise_scale([float(g.square().sum()) for g in micro], float(window.square().sum()), 32, 64)
    assert monitor.history[-1]["grad_noise_trace"] == pytest.approx(expected.trace_sigma, rel=1e-4)


def test_no_noise_keys_without_accumulation(tmp_path):
    monitor = GradientNormMonitor()
    _fit(tmp_path, monitor, steps=2)
    assert "noise_scale" not in monitor.latest


def _csv_rows(tmp_path) -> list[dict]:
    (path,) = Path(tmp_path).glob("csv/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_logged_through_the_trainer_loggers_at_the_gradient_step(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=2)
    _fit(tmp_path, monitor, steps=5)
    rows = [r for r in _csv_rows(tmp_path) if r.get("optdiag/grad_norm")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # the default cadence follows: every step up to 2
    for r in rows:
        h = monitor.history[int(r["step"])]
        assert float(r["optdiag/grad_norm"]) == pytest.approx(h["grad_norm"])
        assert float(r["optdiag/net.0/grad_norm"]) == pytest.approx(h["net.0/grad_norm"])
    assert "optdiag/grad_norm_clipped" not in rows[0] or not rows[0]["optdiag/grad_norm_clipped"]
    assert rows[0]["optdiag/grad_cosine"] == ""  # undefined at the first step: not logged


def test_sampled_steps_are_logged_on_the_logging_interval_rounded_up_to_the_cadence(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=4, every_n_steps=3)
    _fit(tmp_path, monitor, steps=14)
    rows = [r for r in _csv_rows(tmp_path) if r.get("optdiag/grad_norm")]
    assert [int(r["step"]) for r in rows] == [0, 6, 12]  # 4 -> 6, a measured step with its cosines
    assert all(r["optdiag/grad_cosine"] for r in rows[1:])


def test_non_finite_gradient_warns_once_counts_and_training_goes_on(tmp_path):
    monitor = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    with pytest.warns(UserWarning, match="non-finite gradient") as caught:
        trainer.fit(OneWeight(lr=0.1, blow_up_at=2), _ones_loader())
    assert sum("non-finite gradient" in str(w.message) for w in caught) == 1
    assert monitor.warning_counts["non-finite-gradient"] == 4
    assert trainer.global_step == 6 and len(monitor.history) == 6
    assert not math.isfinite(monitor.history[2]["grad_norm"])


def test_layer_depth_groups_parameters_by_module_prefix():
    assert layer_name("encoder.block.0.weight", None) == "encoder.block.0"
    assert layer_name("encoder.block.0.weight", 2) == "encoder.block"
    assert layer_name("encoder.block.0.weight", 9) == "encoder.block.0"
    assert layer_name("w", 1) == "w"


def test_layer_depth_one_merges_the_sequential(tmp_path):
    monitor = GradientNormMonitor(layer_depth=1)
    _fit(tmp_path, monitor, steps=1)
    assert monitor.latest["net/grad_norm"] == pytest.approx(monitor.latest["grad_norm"])


@pytest.mark.parametrize(
    "kwargs",
    [{"layer_depth": 0}, {"log_every_n_steps": 0}, {"noise_window": -1}, {"history_size": 0}, {"layer_depth": "1"},
     {"every_n_steps": 0}, {"every_n_steps": True}],
)
def test_bad_arguments_are_refused_with_the_name(kwargs):
    with pytest.raises(UsageError, match=next(iter(kwargs))):
        GradientNormMonitor(**kwargs)


def test_resumed_run_continues_its_history(tmp_path):
    first = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [first], max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(RegressionModule(), RegressionDataModule())
    (ckpt,) = Path(tmp_path).rglob("*.ckpt")
    assert first.state_key in torch.load(ckpt, weights_only=False)["callbacks"]
    resumed = GradientNormMonitor()
    trainer = make_trainer(tmp_path, [resumed], max_steps=5)
    trainer.fit(RegressionModule(), RegressionDataModule(), ckpt_path=str(ckpt))
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3, 4]
    assert [h["grad_norm"] for h in resumed.history[:3]] == [h["grad_norm"] for h in first.history]


def test_state_key_tells_configurations_apart():
    assert GradientNormMonitor().state_key != GradientNormMonitor(layer_depth=1).state_key
    assert GradientNormMonitor().state_key.startswith("GradientNormMonitor")


class WithUnusedParameter(RegressionModule):
    """A parameter the loss never touches (its gradient stays None) between the used ones, with weight decay so that
    it still moves: gradient statistics cover the gradients that exist, update statistics every parameter."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.05, momentum=0.9)
        self.unused = nn.Parameter(torch.ones(3, 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)


def test_foreach_statistics_equal_a_flat_reference_with_a_gradient_less_parameter(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=3)
    steps = 9
    _, rec = _fit(tmp_path, monitor, module=WithUnusedParameter(), steps=steps)
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 5, 6, 8]

    def flat(d: dict, skip_none: bool) -> torch.Tensor:
        return torch.cat([v.reshape(-1).double() for v in d.values() if not (skip_none and v is None)])

    measured = {h["step"] for h in monitor.history}
    for h in monitor.history:
        k = h["step"]
        assert rec.grads[k]["unused"] is None
        g = flat(rec.grads[k], skip_none=True)
        assert h["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
        update = flat(rec.params_after[k], False) - flat(rec.params_before[k], False)
        assert float(update[-6:].abs().min()) > 0  # weight decay moved the unused parameter
        assert h["update_norm"] == pytest.approx(float(update.norm()), rel=1e-5)
        assert h["update_ratio"] == pytest.approx(float(update.norm() / flat(rec.params_before[k], False).norm()),
                                                  rel=1e-5)
        if k - 1 in measured:
            assert h["grad_cosine"] == pytest.approx(_cos(g, flat(rec.grads[k - 1], True)), abs=1e-6)
            previous = flat(rec.params_after[k - 1], False) - flat(rec.params_before[k - 1], False)
            assert h["update_cosine"] == pytest.approx(_cos(update, previous), abs=1e-5)
        else:
            assert math.isnan(h["grad_cosine"]) and math.isnan(h["update_cosine"])
