"""Advice numbers against docs/theory.md: stability targets, Polyak/YellowFin pairs, warmup, batch sizes."""

import itertools
import math

import numpy as np
import pytest

from optdiag.diagnosis import advice as A
from optdiag.diagnosis.advice import suggest, warmup_iters
from optdiag.diagnosis.evidence import Evidence
from optdiag.diagnosis.stability import OptimizerSpec, stability_threshold
from optdiag.diagnosis.tuning import polyak_heavy_ball, yellowfin
from optdiag.diagnosis.types import KINDS
from optdiag.errors import UsageError


def _by(suggestions, target):
    return [s for s in suggestions if s.target == target]


def test_polyak_theory_numbers():
    lr, momentum, rate = polyak_heavy_ball(1.0, 100.0)
    assert round(lr, 5) == 0.03306 and round(momentum, 4) == 0.6694 and round(rate, 3) == 0.818
    # heavy ball at that pair contracts every curvature in [1, 100] at rate sqrt(momentum)
    for lam in (1.0, 10.0, 100.0):
        roots = np.roots([1.0, -(1 + momentum - lr * lam), momentum])
        assert np.max(np.abs(roots)) == pytest.approx(rate, rel=1e-6)
    # ~69 heavy-ball steps to 1e-6 vs ~691 for GD at its best lr 2/101 (rate 99/101)
    assert math.ceil(math.log(1e-6) / math.log(rate)) == 69
    assert math.ceil(math.log(1e-6) / math.log(99 / 101)) == 691


def test_yellowfin_without_noise_is_polyak():
    lr, momentum = yellowfin(1.0, 100.0, 0.0, 1.0)
    assert round(momentum, 3) == 0.669 and round(lr, 4) == 0.0331
    p_lr, p_mom, _ = polyak_heavy_ball(1.0, 100.0)
    assert lr == pytest.approx(p_lr) and momentum == pytest.approx(p_mom)


def test_yellowfin_solves_its_cubic_exactly():
    h_min, h_max, c, d = 1.0, 2.0, 5.0, 0.3  # narrow range: the noise term decides the momentum
    lr, momentum = yellowfin(h_min, h_max, c, d)
    x = math.sqrt(momentum)
    derivative = 2 * x * d * d - 4 * (1 - x) ** 3 * c / h_min**2  # of x^2 D^2 + (1-x)^4 C / h_min^2
    assert abs(derivative) < 1e-10
    assert lr == pytest.approx((1 - x) ** 2 / h_min)
    # more gradient noise -> more momentum (averaging), smaller lr
    lr2, momentum2 = yellowfin(h_min, h_max, 10 * c, d)
    assert momentum2 > momentum and lr2 < lr
    with pytest.raises(UsageError, match="distance"):
        yellowfin(1.0, 2.0, 1.0, 0.0)
    # measured bounds in the wrong order span the same range (docs/errors.md): the same answer, no exception
    assert polyak_heavy_ball(2.0, 1.0) == polyak_heavy_ball(1.0, 2.0)
    assert yellowfin(2.0, 1.0, 5.0, 0.3) == yellowfin(1.0, 2.0, 5.0, 0.3)
    with pytest.raises(UsageError, match="mu"):
        polyak_heavy_ball(0.0, 1.0)


def test_oscillation_sgd_lr_puts_lr_lambda_at_one():
    ev = Evidence(step=0, lambda_max=150.0, optimizer=OptimizerSpec("sgd", lr=0.01))
    lr = _by(suggest("oscillation", ev), "lr")[0]
    assert lr.current == 0.01 and lr.proposed * 150.0 == pytest.approx(1.0)
    assert "0.75" in lr.reason and "g['lr'] = 0.006667" in lr.code


def test_oscillation_heavy_ball_targets_half_its_threshold():
    spec = OptimizerSpec("heavy_ball", lr=0.01, momentum=0.9)
    lr = _by(suggest("oscillation", Evidence(step=0, lambda_max=500.0, optimizer=spec)), "lr")[0]
    assert lr.proposed * 500.0 == pytest.approx(A.TARGET_RATIO * 2 * 1.9)  # lr*lambda = 1.9 of 3.8


def test_oscillation_adam_uses_preconditioned_sharpness_and_betas():
    spec = OptimizerSpec("adam", lr=0.01, beta1=0.9)
    ev = Evidence(step=0, lambda_max=10.0, preconditioned_lambda_max=5000.0, optimizer=spec)
    out = suggest("oscillation", ev)
    lr = _by(out, "lr")[0]
    assert lr.proposed == pytest.approx(A.TARGET_RATIO * 0.01 * 3800 / 5000)
    beta = _by(out, "momentum")[0]
    assert beta.proposed == pytest.approx(98 / 102)
    raised = stability_threshold(OptimizerSpec("adam", lr=0.01, beta1=beta.proposed))
    assert raised == pytest.approx(5000.0 / A.TARGET_RATIO) and "betas" in beta.code


def test_oscillation_schedules_and_batch():
    ev = Evidence(step=0, grad_cosine=-0.6, grad_sq_norm_unbiased=1.0, grad_noise_trace=100.0, batch_size=32,
                  optimizer=OptimizerSpec("sgd", lr=0.1))
    out = suggest("oscillation", ev)
    assert _by(out, "lr")[0].proposed == pytest.approx(0.05)  # no curvature: halve (Chee & Toulis)
    codes = [s.code for s in _by(out, "schedule")]
    assert "torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5)" in codes
    assert any("CosineAnnealingLR" in c for c in codes)
    batch = _by(out, "batch_size")[0]
    assert batch.current == 32 and batch.proposed == 128  # power of two >= B_simple = 100


def test_saddle_momentum_checked_against_stability():
    plain = suggest("saddle_point", Evidence(step=0, lambda_max=100.0, lambda_min=-5.0, loss=2.0,
                                             optimizer=OptimizerSpec("sgd", lr=0.001), batch_size=64))
    assert _by(plain, "momentum")[0].proposed == 0.9
    assert _by(plain, "lr")[0].proposed == pytest.approx(0.002)
    assert _by(plain, "batch_size")[0].proposed == 32
    step = next(s for s in plain if s.target == "schedule")
    assert 0.5 * 5.0 * step.proposed**2 == pytest.approx(0.01 * 2.0)  # 1/2 |lambda_min| t^2 = 1% of the loss
    # nesterov's threshold shrinks with momentum: at lr 0.01, lambda_max 120 no higher momentum keeps ratio <= 0.5
    nesterov = OptimizerSpec("nesterov", lr=0.01, momentum=0.5)
    assert _by(suggest("saddle_point", Evidence(step=0, lambda_max=120.0, lambda_min=-5.0, optimizer=nesterov)),
               "momentum") == []
    ok = _by(suggest("saddle_point", Evidence(step=0, lambda_max=60.0, lambda_min=-5.0, optimizer=nesterov)),
             "momentum")[0]
    assert ok.proposed == 0.9 and 60.0 <= A.TARGET_RATIO * stability_threshold(
        OptimizerSpec("nesterov", lr=0.01, momentum=0.9))


def test_saddle_lr_increase_capped_by_stability():
    out = suggest("saddle_point", Evidence(step=0, lambda_max=80.0, lambda_min=-5.0,
                                           optimizer=OptimizerSpec("sgd", lr=0.01)))
    assert _by(out, "lr")[0].proposed == pytest.approx(A.TARGET_RATIO * 2 / 80.0)


def test_plateau_lr_and_warmup():
    ev = Evidence(step=0, lambda_max=1e-3, lambda_min=0.0, optimizer=OptimizerSpec("sgd", lr=0.01))
    out = suggest("plateau", ev)
    lr = _by(out, "lr")[0]
    assert lr.proposed == pytest.approx(0.1)  # a decade at most
    warm = _by(out, "schedule")[0]
    assert warm.code == "torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=900)"
    assert any("Adam" in s.code for s in _by(out, "lr"))
    assert warmup_iters(0.1) == 900 and warmup_iters(1.0) == 1 and warmup_iters(0.5) == 100


def test_minimum_polyak_pair_decay_and_smaller_batch():
    spec = OptimizerSpec("heavy_ball", lr=0.015, momentum=0.9)
    ev = Evidence(step=0, lambda_max=100.0, lambda_min=1.0, batch_size=512, dataset_size=512, optimizer=spec)
    out = suggest("local_minimum", ev)
    (lr,), (momentum,) = _by(out, "lr"), _by(out, "momentum")
    assert round(lr.proposed, 5) == 0.03306 and round(momentum.proposed, 4) == 0.6694
    # one line sets both: the pair's lr alone, at this run's momentum 0.9, is another optimizer
    assert lr.code == momentum.code == "for g in opt.param_groups: g['lr'], g['momentum'] = 0.03306, 0.6694"
    assert _by(out, "schedule")[0].proposed == pytest.approx(0.0075)
    # stability ratio 100 / 253 < 0.5: not sharp for this optimizer, so no smaller-batch advice
    assert ev.stability_ratio < A.TARGET_RATIO and _by(out, "batch_size") == []


def test_minimum_with_minibatches_gets_the_decay_not_polyaks_larger_step():
    # Polyak's pair is for full-batch steps: with minibatches its larger lr raises the noise floor the decay lowers
    spec = OptimizerSpec("sgd", lr=0.124)
    for batch, dataset in ((32, 1024), (32, None), (None, 1024)):
        out = suggest("local_minimum", Evidence(step=0, lambda_max=2.42, lambda_min=1.52, batch_size=batch,
                                                dataset_size=dataset, optimizer=spec))
        assert [(s.target, s.proposed) for s in out] == [("schedule", pytest.approx(0.062))]
    # the same full batch every step, whatever the loader calls an epoch: no gradient noise between probe batches
    same = suggest("local_minimum", Evidence(step=0, lambda_max=2.42, lambda_min=1.52, batch_size=64, dataset_size=400,
                                             grad_noise_trace=0.0, optimizer=spec))
    assert [s.target for s in same] == ["schedule", "lr", "momentum"]


def test_minimum_small_batch_advice_only_when_sharp():
    spec = OptimizerSpec("sgd", lr=0.01)
    sharp = suggest("local_minimum", Evidence(step=0, lambda_max=120.0, lambda_min=1.0, batch_size=512,
                                              optimizer=spec))
    assert _by(sharp, "batch_size")[0].proposed == 128
    blunt = suggest("local_minimum", Evidence(step=0, lambda_max=50.0, lambda_min=1.0, batch_size=512,
                                              optimizer=spec))
    assert _by(blunt, "batch_size") == []
    small = suggest("local_minimum", Evidence(step=0, lambda_max=120.0, lambda_min=1.0, batch_size=32,
                                              optimizer=spec))
    assert _by(small, "batch_size") == []


def test_divergence_lr_below_limit_and_warmup():
    ev = Evidence(step=0, lambda_max=300.0, optimizer=OptimizerSpec("sgd", lr=0.01))
    out = suggest("divergence", ev)
    lr = _by(out, "lr")[0]
    assert lr.proposed * 300.0 == pytest.approx(1.0)  # lr*lambda_max = 1: half the 2/lr limit
    warm = _by(out, "schedule")[0]
    assert warm.code == "torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.3333, total_iters=200)"
    blind = _by(suggest("divergence", Evidence(step=0, loss=float("nan"), optimizer=OptimizerSpec("sgd", lr=0.1))),
                "lr")[0]
    assert blind.proposed == pytest.approx(0.01)


def test_every_suggestion_is_physically_sensible():
    rng = np.random.default_rng(0)
    specs = [OptimizerSpec("sgd", lr=0.05), OptimizerSpec("heavy_ball", lr=0.01, momentum=0.9),
             OptimizerSpec("nesterov", lr=0.01, momentum=0.5), OptimizerSpec("adam", lr=1e-3, beta1=0.9),
             OptimizerSpec("rmsprop", lr=1e-3), OptimizerSpec("unknown", lr=0.1), None]
    for spec, kind, _ in itertools.product(specs, KINDS, range(4)):
        lam_max = float(10 ** rng.uniform(-4, 4))
        ev = Evidence(step=1, loss=float(rng.uniform(0.01, 5)), lambda_max=lam_max,
                      lambda_min=float(lam_max * rng.uniform(-1, 1)), preconditioned_lambda_max=lam_max * 30,
                      grad_sq_norm_unbiased=float(rng.uniform(0, 2)), grad_noise_trace=float(rng.uniform(0, 500)),
                      batch_size=int(rng.integers(1, 1024)), grad_cosine=float(rng.uniform(-1, 1)), optimizer=spec,
                      grad_norm=float(rng.uniform(0.01, 10)), spike_count=int(rng.integers(1, 5)))
        for s in suggest(kind, ev):
            assert s.reason and s.action
            if s.target == "lr" and s.proposed is not None:
                # a learning rate, proposed against the current one (a clipping norm is not offered as one)
                assert s.proposed > 0 and s.current == ev.lr
            if s.target == "schedule" and None not in (s.current, s.proposed):
                # a schedule's lr from the current one: never a warmup's length in steps beside it
                assert s.current == ev.lr and 0 < s.proposed <= A.MAX_LR_INCREASE * s.current
            if s.target == "momentum":
                assert 0 <= s.proposed < 1
            if s.target == "batch_size":
                assert s.proposed >= 1 and s.proposed == int(s.proposed)


def test_suggest_validation():
    with pytest.raises(UsageError, match="kind"):
        suggest("stuck", Evidence(step=0))
    with pytest.raises(UsageError, match="Evidence"):
        suggest("plateau", {"step": 0})


def test_repeated_spikes_get_advice_only_where_the_curvature_shows_the_step_too_large():
    spec = OptimizerSpec("sgd", lr=0.05)
    # one spike that recovers is reported, not acted on
    assert suggest("loss_spike", Evidence(step=100, spike_count=1, lambda_max=400.0, optimizer=spec)) == []
    assert A.spike_advice_note(Evidence(step=100, spike_count=1, optimizer=spec)) == ""
    # repeated, the curvature unmeasured: no guess (a halved lr, a warmup or clipping made the 670k MLP's run no
    # better), and the summary's note says why
    blind = Evidence(step=102, spike_count=2, grad_norm=1.429, optimizer=spec)
    assert suggest("loss_spike", blind) == []
    assert A.spike_advice_note(blind).startswith(" Spike 2 of the run; no change suggested: the curvature at the "
                                                 "spikes was not measured")
    # repeated, early, the sharpness past half the threshold (SGD 2 / lr = 40; lambda_max 60): the lr at half the
    # threshold (lr * lambda_max = 1) and a warmup over twice the spike's step (in tens), its length in the action
    # and the code, never in current/proposed beside an lr
    warm, lower = suggest("loss_spike", Evidence(step=102, spike_count=2, lambda_max=60.0, optimizer=spec))
    assert (warm.target, warm.action, warm.current, warm.proposed) == (
        "schedule", "Warm up the learning rate over 210 steps", None, None)
    assert warm.code == "torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=210)"
    assert (lower.target, lower.current) == ("lr", 0.05) and lower.proposed * 60.0 == pytest.approx(1.0)
    assert "0.5 of the threshold" in lower.reason
    # late spikes (after step 2000) get no warmup
    late = suggest("loss_spike", Evidence(step=3000, spike_count=3, lambda_max=60.0, optimizer=spec))
    assert [s.target for s in late] == ["lr"]
    # the lr already within half the threshold: the spikes recover on their own, and the note says so
    calm = Evidence(step=3000, spike_count=3, lambda_max=4.0, optimizer=spec)
    assert suggest("loss_spike", calm) == []
    assert "lambda_max = 4 is 0.1 of the sgd stability threshold 40" in A.spike_advice_note(calm)
    assert A.spike_advice_note(calm).endswith("within the step's limit, so the spikes recover on their own.")
    # no threshold for the optimizer: unknown, said so
    other = Evidence(step=300, spike_count=2, lambda_max=4.0, optimizer=OptimizerSpec("unknown", lr=0.1))
    assert suggest("loss_spike", other) == [] and "the step's limit is unknown" in A.spike_advice_note(other)
