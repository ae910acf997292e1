"""No stability ratio from an adaptive optimizer's preconditioner before it is estimated: the rule, a real Adam run
read back from TensorBoard, and the texts that would otherwise print a number ("warming up", never "?")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_models import RegressionDataModule, RegressionModule, make_trainer
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.curvature.preconditioned import (PRECONDITIONER_SAMPLES, PreconditionerWarmup, effective_samples,
                                              preconditioner_warmup, ready_after)
from optdiag.diagnosis.classify import diagnose_stall
from optdiag.diagnosis.evidence import Evidence, stability_text
from optdiag.diagnosis.stability import OptimizerSpec


@pytest.mark.parametrize("beta, steps", [(0.999, 1), (0.999, 37), (0.9, 5), (0.9, 200), (0.5, 3)])
def test_effective_samples_is_the_kish_size_of_the_average_weights(beta, steps):
    weights = beta ** np.arange(steps, dtype=np.float64)
    assert effective_samples(beta, steps) == pytest.approx(weights.sum() ** 2 / (weights**2).sum(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.999, 0.99, 0.95, 0.9, 0.5])
def test_ready_after_is_the_first_step_with_enough_samples(beta):
    target = min(PRECONDITIONER_SAMPLES, 0.9 * (1 + beta) / (1 - beta))
    t = ready_after(beta)
    assert effective_samples(beta, t) >= target > effective_samples(beta, t - 1)


def test_rmsprop_also_waits_for_its_average_to_lose_the_zero_start():
    # square_avg = (1 - alpha^t) of its value after t steps: 0.9 of it at t = ceil(log 0.1 / log alpha)
    assert ready_after(0.99, bias_corrected=False) == math.ceil(math.log(0.1) / math.log(0.99)) == 230
    assert ready_after(0.9, bias_corrected=False) == ready_after(0.9) == 28  # the samples rule is the later one


def test_warmup_reads_the_fewest_steps_from_the_optimizer_state():
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([{"params": [first]}, {"params": [second], "betas": (0.9, 0.99)}])
    assert preconditioner_warmup(opt) == PreconditionerWarmup(steps=0, ready_at=ready_after(0.99))
    for _ in range(7):
        first.grad = torch.ones(2)
        opt.step()  # ``second`` has no gradient: no state, no step
    assert preconditioner_warmup(opt).steps == 0
    assert preconditioner_warmup(opt, [first]) == PreconditionerWarmup(steps=7, ready_at=51)
    assert not preconditioner_warmup(opt, [first]).ready


def test_adam_logs_no_ratio_before_its_preconditioner_is_estimated(tmp_path):
    pl.seed_everything(0)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    monitor = HessianMonitor(every_n_steps=10, probe_batches=2, trace_hvp=0, density_every=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=70, logger=logger)
    trainer.fit(RegressionModule(optimizer="adam", lr=0.01), RegressionDataModule())

    steps = [h["step"] for h in monitor.history]
    assert steps == [10, 20, 30, 40, 50, 60, 70]
    for h in monitor.history:
        if h["step"] < 51:  # Adam's default beta2 = 0.999: 51 steps
            assert h["preconditioner_warmup"] == {"steps": h["step"], "ready_at": 51}
            assert h["preconditioned_lambda_max"] is None and h["stability_ratio"] is None
            assert "preconditioned_lambda_max" not in h["n_hvp_parts"]  # no products spent on it either
        else:
            assert h["preconditioner_warmup"] is None and h["n_hvp_parts"]["preconditioned_lambda_max"] > 0
            assert h["stability_ratio"] == pytest.approx(h["preconditioned_lambda_max"] / h["stability_threshold"])
    accumulator = EventAccumulator(logger.log_dir)
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("optdiag/stability_ratio")] == [60, 70]
    assert [e.step for e in accumulator.Scalars("optdiag/preconditioned_lambda_max")] == [60, 70]
    assert [e.step for e in accumulator.Scalars("optdiag/stability_threshold")] == steps  # known all along
    assert not any("warmup" in tag for tag in accumulator.Tags()["scalars"])


ADAM = OptimizerSpec("adam", lr=1e-3, beta1=0.9)
WARMING = {"steps": 25, "ready_at": 51}


def test_texts_say_warming_up_instead_of_a_number():
    ev = Evidence(step=25, lambda_max=10.0, optimizer=ADAM, preconditioner_warmup=WARMING)
    assert ev.stability_ratio is None
    assert ev.stability_text == ("stability ratio warming up (the optimizer's second-moment estimate has 25 of the "
                                 "51 steps it needs)")
    assert Evidence.from_dict(ev.to_dict()).preconditioner_warmup == WARMING
    measured = Evidence(step=60, lambda_max=10.0, preconditioned_lambda_max=1900.0, optimizer=ADAM)
    assert measured.stability_text == "0.05 of the stability threshold"
    assert stability_text({"stability_threshold": 3800.0}) == (
        "stability ratio unknown (the sharpness the threshold applies to was not measured)")
    assert stability_text({"stability_note": "Adagrad: not analysed"}) == "stability ratio unknown (Adagrad: not analysed)"


def test_a_minimum_under_a_warming_adam_says_so_in_its_summary():
    # gradient ~0 against its noise (8 pairs), lambda_min > 0: a local minimum
    ev = Evidence(step=25, loss=1.0, lambda_max=100.0, lambda_min=5.0, grad_pair_count=8, grad_pair_dot=0.0,
                  grad_pair_dot_stderr=0.0, grad_pair_sq=1.0, optimizer=ADAM, preconditioner_warmup=WARMING)
    d = diagnose_stall(ev)
    assert d.kind == "local_minimum"
    assert "stability ratio warming up" in d.summary and "?" not in d.summary
    assert "?" not in d.to_markdown()
