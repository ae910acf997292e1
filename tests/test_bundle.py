"""OptDiag: one callback that drives GradientNormMonitor, HessianMonitor and StallDiagnoser."""

from __future__ import annotations

import inspect
import os

import pytest
import pytorch_lightning as pl
import torch

import optdiag
from lightning_models import models_for
from optdiag.callbacks import _base
from optdiag.callbacks._base import _CALLBACK_BASES
from optdiag.callbacks.bundle import FORWARDED_HOOKS, OptDiag
from optdiag.callbacks.conditioning import ConditioningMonitor
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.callbacks.stall import StallDiagnoser
from optdiag.callbacks.triage import TriageMonitor
from optdiag.demo.runner import quiet_lightning
from optdiag.demo.scenarios import scenario
from optdiag.errors import UsageError


@pytest.fixture(autouse=True)
def quiet():
    with quiet_lightning():
        yield


def _trainer(root, callbacks, max_steps, **kwargs):
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                   default_root_dir=str(root))
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def test_one_line_bundle_with_reachable_children():
    cb = optdiag.OptDiag()
    assert isinstance(cb.gradient_monitor, GradientNormMonitor)
    assert isinstance(cb.hessian_monitor, HessianMonitor)
    assert isinstance(cb.stall_diagnoser, StallDiagnoser)
    assert isinstance(cb.triage_monitor, TriageMonitor)
    assert isinstance(cb.conditioning_monitor, ConditioningMonitor)
    assert cb.children == (cb.gradient_monitor, cb.hessian_monitor, cb.stall_diagnoser, cb.conditioning_monitor,
                           cb.triage_monitor)
    assert cb.diagnoses is cb.stall_diagnoser.diagnoses and cb.findings is cb.triage_monitor.findings
    assert cb.triage_monitor.stall_diagnoser is cb.stall_diagnoser
    assert cb.conditioning_monitor.triage_monitor is cb.triage_monitor  # its findings join the triage's
    off = optdiag.OptDiag(triage=False, conditioning=False)
    assert off.triage_monitor is None and off.conditioning_monitor is None and off.findings == [] and \
        off.children == (off.gradient_monitor, off.hessian_monitor, off.stall_diagnoser)
    alone = optdiag.OptDiag(triage=False)
    assert alone.findings is alone.conditioning_monitor.findings
    # defaults that keep overhead small: curvature on a 5% time budget, not on a fixed cadence
    assert cb.hessian_monitor.every_n_steps is None and cb.hessian_monitor.budget == 0.05
    assert optdiag.OptDiag is OptDiag and isinstance(cb, _CALLBACK_BASES)


def test_knobs_reach_the_children():
    cb = OptDiag(every_n_steps=7, window=80, min_window=30, probe_batches=3, max_hvp=25, max_snapshots=4,
                 per_layer=False, escape_check=False, loss_floor=0.1, verbose=False)
    assert cb.hessian_monitor.every_n_steps == 7 and cb.hessian_monitor.probe_batches == 3
    assert cb.hessian_monitor.max_hvp == 25 and cb.gradient_monitor.per_layer is False
    d = cb.stall_diagnoser
    assert (d.detector.window, d.detector.min_window, d.max_snapshots) == (80, 30, 4)
    assert (d.escape_check, d.loss_floor, d.verbose) == (False, 0.1, False)
    assert d.gradient_monitor is cb.gradient_monitor and d.hessian_monitor is cb.hessian_monitor


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 2.0}, "budget must be a fraction"),
    ({"window": 1}, "window must be"),
    ({"max_snapshots": -2}, "max_snapshots"),
])
def test_bad_knobs_fail_at_construction(kwargs, message):
    with pytest.raises(UsageError, match=message):
        OptDiag(**kwargs)


def test_every_lightning_hook_is_forwarded_in_order():
    base_hooks = {name for base in _CALLBACK_BASES for name in vars(base)
                  if name.startswith("on_") or name in ("setup", "teardown")}
    assert set(FORWARDED_HOOKS) == base_hooks
    assert {"on_train_batch_end", "on_before_optimizer_step", "on_save_checkpoint", "setup"} <= base_hooks

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, hook):
            return lambda *args, **kwargs: calls.append((self.name, hook, args, kwargs))

    cb = OptDiag()
    cb.children = (Recorder("a"), Recorder("b"), Recorder("c"))
    for hook in FORWARDED_HOOKS:
        assert hook in vars(OptDiag), hook  # generated on the class, not inherited as a no-op
        calls.clear()
        getattr(cb, hook)("trainer", "module", key="value")
        assert calls == [(n, hook, ("trainer", "module"), {"key": "value"}) for n in "abc"]


def test_state_dict_is_composed_and_restored():
    cb = OptDiag()
    cb.stall_diagnoser.detector.update(0, 1.0)
    cb.gradient_monitor.latest = {"step": 0, "grad_norm": 2.0}
    state = cb.state_dict()
    assert set(state) == {"gradient_monitor", "hessian_monitor", "stall_diagnoser", "conditioning_monitor",
                          "triage_monitor"}
    fresh = OptDiag()
    fresh.load_state_dict(state)
    assert fresh.stall_diagnoser.detector.state_dict() == cb.stall_diagnoser.detector.state_dict()
    assert fresh.gradient_monitor.latest == {"step": 0, "grad_norm": 2.0}


def test_logs_scalars_and_diagnoses_in_a_real_run(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    cb = OptDiag(every_n_steps=5, verbose=False)
    (run,) = scenario("divergence").build()
    _trainer(tmp_path, [cb], 45, logger=logger, log_every_n_steps=1).fit(run.module, run.loader)
    assert [d.kind for d in cb.diagnoses] == ["divergence"]
    header = open(os.path.join(logger.log_dir, "metrics.csv"), encoding="utf-8").readline().split(",")
    for name in ("grad_norm", "lambda_max", "lambda_min", "hessian_trace", "stability_threshold",
                 "stability_ratio"):
        assert f"optdiag/{name}" in header, name
    assert os.path.exists(os.path.join(logger.log_dir, "optdiag", "events.jsonl"))


def test_works_with_the_lightning_pytorch_namespace(tmp_path):
    models = models_for("lightning.pytorch")
    cb = OptDiag(every_n_steps=4, grad_every_n_steps=4, verbose=False)
    trainer = models.L.Trainer(max_steps=8, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                               default_root_dir=str(tmp_path))
    trainer.fit(models.RegressionModule(), models.RegressionDataModule())
    assert [s["step"] for s in cb.hessian_monitor.history] == [4, 8]
    assert [h["step"] for h in cb.gradient_monitor.history] == [0, 1, 2, 3, 4, 7]  # 4 first, then pairs


@pytest.mark.slow
def test_resume_from_a_checkpoint_keeps_diagnoses_and_detector(tmp_path):
    (run,) = scenario("minimum").build()
    # a curvature cadence: the verdict must not rest on what a loaded machine's time budget paid for
    first = OptDiag(verbose=False, every_n_steps=25)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, [first, checkpoint], 450, enable_checkpointing=True).fit(run.module, run.loader)
    assert [d.kind for d in first.diagnoses] == ["local_minimum"]

    (again,) = scenario("minimum").build()
    second = OptDiag(verbose=False, every_n_steps=25)
    _trainer(tmp_path, [second], 460).fit(again.module, again.loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.diagnoses[0] == first.diagnoses[0]  # restored from the checkpoint, not re-diagnosed
    detector = second.stall_diagnoser.detector.state_dict()
    assert detector["last_step"] == 460 and detector["first"] == first.stall_diagnoser.detector.state_dict()["first"]


def test_bundle_does_not_change_training(tmp_path):
    def weights(callbacks):
        (run,) = scenario("oscillation").build()
        _trainer(tmp_path, callbacks, 60).fit(run.module, run.loader)
        return [p.detach().clone() for p in run.module.parameters()]

    with_bundle = weights([OptDiag(every_n_steps=10, verbose=False)])
    without = weights([])
    assert all(torch.equal(a, b) for a, b in zip(with_bundle, without))


def test_signature_documents_every_knob():
    documented = inspect.getdoc(OptDiag)
    for name in inspect.signature(OptDiag).parameters:
        assert f"{name}:" in documented or f"{name}," in documented, name


def test_the_children_share_one_read_of_the_step_per_hook(tmp_path, monkeypatch):
    """Lightning's trainer.global_step is a chain of properties, and every child wants the step in the same hooks:
    the bundle reads it once for all of them in the two hooks where several do (the children see the same step
    the trainer does, which the rest of this suite checks). Counted against a run without optdiag."""
    reads = [0]
    step_property = pl.Trainer.global_step

    def counted(trainer):
        reads[0] += 1
        return step_property.fget(trainer)

    monkeypatch.setattr(pl.Trainer, "global_step", property(counted))
    m = models_for("pytorch_lightning")

    def reads_in(callbacks, steps=40):
        reads[0] = 0
        _trainer(tmp_path, callbacks, steps).fit(m.RegressionModule(), m.RegressionDataModule())
        return reads[0]

    optdiag_reads = reads_in([OptDiag(verbose=False, probe_every=0)]) - reads_in([])
    # one read before the optimizer step (three children), one at the batch's end (two), one before backward (the
    # conditioning monitor's loss-graph cadence); and a few at the start and end of the fit
    assert optdiag_reads <= 40 * 3 + 20


class _Recording(pl.LightningModule):
    """A regression whose training_step keeps each loss it returns (its float), for comparison with optdiag's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.returned: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.returned.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n=128):
    """A noisy linear regression of ``n`` samples in batches of 8 (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


class _CountingLossRead(_base._LossRead):
    """The one-entry cache of the batch loss's float, counting the reads it could not answer (a host read of the
    outputs' loss tensor: on a GPU, a wait for the backward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.misses = 0

    def recall(self, tensor):
        value = super().recall(tensor)
        self.misses += value is None
        return value


@pytest.mark.parametrize("accumulate", [1, 4])
def test_the_loss_training_step_returned_under_gradient_accumulation(tmp_path, monkeypatch, accumulate):
    """Lightning hands on_train_batch_end the loss divided by accumulate_grad_batches; the stall detector and the
    triage (which compares the training loss with the validation loss) must see the loss training_step returned:
    with 4 micro-batches a step they saw a quarter of it, a training loss 4x below a validation loss on the same
    data. Every micro-batch's loss is the one requested before its backward pass (no read of the outputs' tensor,
    which on a GPU waits for the backward pass)."""
    reads = _CountingLossRead()
    monkeypatch.setattr(_base, "_LOSS_READ", reads)
    bundle, module, steps = OptDiag(verbose=False), _Recording(), 6
    _trainer(tmp_path, [bundle], steps, accumulate_grad_batches=accumulate).fit(module, _data())
    returned = module.returned
    assert len(returned) == steps * accumulate
    per_step = [sum(returned[i:i + accumulate]) / accumulate for i in range(0, len(returned), accumulate)]
    assert list(bundle.stall_diagnoser.detector._losses) == pytest.approx(per_step, rel=1e-6)
    triage = bundle.triage_monitor
    assert triage.loss_initial == pytest.approx(returned[0], rel=1e-6)
    assert triage._loss_sum / triage._loss_count == pytest.approx(sum(returned) / len(returned), rel=1e-6)
    assert reads.misses == 0


def test_hooks_with_nothing_to_do_are_skipped_and_come_back(tmp_path):
    """Lightning calls every hook of a callback on every step, and after a training step has flushed the caches even
    an empty call costs microseconds: the bundle skips its children's hooks marked idle (the micro-batch noise hooks
    without accumulation, the step timer once the gradient cadence is priced, the input probe once it has its
    batches, the triage's batch size once known). Under gradient accumulation the noise hooks stay busy and measure;
    and a mark takes effect at the next hook call."""
    def receivers(bundle, hook):
        return [type(method.__self__).__name__ for method in bundle._receivers(hook)]

    bundle = OptDiag(verbose=False)
    _trainer(tmp_path, [bundle], 40).fit(_Recording(), _data())
    assert receivers(bundle, "on_after_backward") == []
    assert receivers(bundle, "on_train_batch_start") == ["HessianMonitor", "StallDiagnoser"]
    assert bundle.gradient_monitor.idle_hooks >= {"on_after_backward", "on_train_batch_start"}

    accumulating = OptDiag(verbose=False)
    _trainer(tmp_path, [accumulating], 40, accumulate_grad_batches=2).fit(_Recording(), _data())
    assert receivers(accumulating, "on_after_backward") == ["GradientNormMonitor"]
    assert "GradientNormMonitor" in receivers(accumulating, "on_train_batch_start")
    noise = [r["noise_scale"] for r in accumulating.gradient_monitor.history if r["noise_scale"] == r["noise_scale"]]
    assert noise, "the micro-batch noise hooks measured nothing under accumulation"

    accumulating.stall_diagnoser.set_hook_idle("on_train_batch_end")
    assert "StallDiagnoser" not in receivers(accumulating, "on_train_batch_end")
    accumulating.stall_diagnoser.set_hook_idle("on_train_batch_end", False)
    assert "StallDiagnoser" in receivers(accumulating, "on_train_batch_end")
