"""The verdict corpus harness (benchmarks/verdict_corpus.py): its scoring and its run table, not the corpus itself
(one of its runs pins how the stall diagnoser retries)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "verdict_corpus.py")


@pytest.fixture(scope="module")
def vc():
    spec = importlib.util.spec_from_file_location("verdict_corpus", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def test_right_run_gets_exactly_what_it_should(vc):
    s = vc.score_run(["saddle_point", "saddle_point", "local_minimum"], should={"saddle_point"},
                     may={"local_minimum"})
    assert s.ok
    assert s.right == {"saddle_point"} and s.accepted == {"local_minimum"}
    assert s.missed == s.wrong == s.false_alarms == frozenset()


def test_extra_kind_is_wrong_on_a_run_that_expected_another(vc):
    s = vc.score_run(["loss_spike", "divergence"], should={"loss_spike"})
    assert not s.ok
    assert s.right == {"loss_spike"} and s.wrong == {"divergence"} and s.false_alarms == frozenset()


def test_any_kind_on_a_healthy_run_is_a_false_alarm_unless_allowed(vc):
    s = vc.score_run(["saddle_point", "loss_spike"], should=(), may={"loss_spike"})
    assert not s.ok
    assert s.false_alarms == {"saddle_point"} and s.accepted == {"loss_spike"} and s.wrong == frozenset()
    assert vc.score_run([], should=()).ok


def test_missed_kind(vc):
    s = vc.score_run(["plateau"], should={"oscillation"})
    assert s.missed == {"oscillation"} and s.wrong == {"plateau"} and s.right == frozenset()


def test_tally_counts_runs_per_kind_and_precision(vc):
    scores = [
        vc.score_run(["saddle_point", "saddle_point"], should={"saddle_point"}),  # right once, not twice
        vc.score_run(["saddle_point"], should=()),                                 # false alarm
        vc.score_run(["saddle_point"], should={"plateau"}),                        # wrong + plateau missed
        vc.score_run(["local_minimum"], should={"saddle_point"}, may={"local_minimum"}),  # saddle missed, min ok
    ]
    t = vc.tally(scores)
    saddle, plateau, minimum = t["saddle_point"], t["plateau"], t["local_minimum"]
    assert (saddle.right, saddle.accepted, saddle.wrong, saddle.false_alarms, saddle.missed) == (1, 0, 1, 1, 1)
    assert saddle.precision == pytest.approx(1 / 3) and saddle.recall == pytest.approx(1 / 2)
    assert (plateau.missed, plateau.precision, plateau.recall) == (1, None, 0.0)
    assert (minimum.accepted, minimum.precision, minimum.recall) == (1, 1.0, None)
    assert list(t)[:len(vc.KINDS)] == list(vc.KINDS)


def test_spike_detector_on_synthetic_losses(vc):
    assert vc.spike_in([2.0, 1.0, 3.0, 0.8]) == (2, 1.0, 3.0)
    assert vc.spike_in([2.0, 1.0, 3.0, 1.2]) is None       # rose but never came back below 1.0
    assert vc.spike_in([2.0, 1.0, 1.4, 0.5]) is None       # a 1.4x bump is not a 1.5x spike
    assert vc.spikes_in([2.0, 1.0, 3.0, 4.0, 0.8, 0.9, 2.0, 0.5]) == [(2, 1.0, 4.0, 3), (6, 0.8, 2.0, 6)]


def test_a_loss_spike_verdict_must_follow_a_real_spike(vc):
    assert vc.spike_verdicts_supported([], [])                 # no verdict needs no support
    assert vc.spike_verdicts_supported([150], [60])            # 90 steps after the peak
    assert not vc.spike_verdicts_supported([176], [10])        # a spike 166 steps before does not cover it
    assert vc.spike_verdicts_supported([55], [60])             # the sampled peak may trail by up to 10 steps
    assert not vc.spike_verdicts_supported([40, 150], [60])    # every verdict needs its spike


def test_every_run_has_a_truth_class_and_check(vc):
    names = [spec.name for spec in vc.RUNS]
    assert len(names) == len(set(names)) and len(names) >= 20
    for spec in vc.RUNS:
        assert spec.truth in vc.EXPECTED, spec.name
        assert callable(vc.TRUTH_CHECKS[spec.truth]), spec.name
        assert spec.model in vc.MODELS and spec.data in vc.DATA and spec.loss in vc.LOSSES, spec.name
        assert spec.description, spec.name
    assert set(vc.TRUTH_CHECKS) == set(vc.EXPECTED)
    healthy = [s for s in vc.RUNS if s.truth == "healthy"]
    assert len(healthy) >= 6
    assert {s.truth for s in vc.RUNS} == set(vc.EXPECTED)


def test_schedules_and_selection(vc):
    burst = vc.lr_factor("burst:150:5:30", 300)
    assert [burst(t) for t in (149, 150, 154, 155)] == [1.0, 30.0, 30.0, 1.0]
    warm = vc.lr_factor("warmup_cosine", 100)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0) and warm(100) == pytest.approx(0.1)
    assert [s.name for s in vc.select("osc_sgd_b16,plateau_mlp_sgd_b64")] == ["osc_sgd_b16", "plateau_mlp_sgd_b64"]
    with pytest.raises(SystemExit):
        vc.select("no_such_run")


def test_judge_applies_truth_class_truth_check_and_spike_support(vc):
    falls = [(0, 2.0), (50, 1.5), (100, 1.0), (150, 0.8)]
    spiky = [(0, 2.0), (50, 1.0), (100, 3.0), (150, 0.8)]  # a full-data spike peaking at step 100
    # a healthy run: silence is right, a saddle is a false alarm
    assert vc.judge("healthy", vc.Truth(True, ""), [], falls).ok
    assert vc.judge("healthy", vc.Truth(True, ""), [(120, "saddle_point")], falls).false_alarms == {"saddle_point"}
    # loss_spike: accepted after a real spike, a false alarm without one or long after it
    assert vc.judge("healthy", vc.Truth(True, ""), [(130, "loss_spike")], spiky).accepted == {"loss_spike"}
    assert vc.judge("healthy", vc.Truth(True, ""), [(130, "loss_spike")], falls).false_alarms == {"loss_spike"}
    assert vc.judge("healthy", vc.Truth(True, ""), [(260, "loss_spike")], spiky).false_alarms == {"loss_spike"}
    # a spike run calling its spike divergence: the spike is missed and divergence is wrong
    s = vc.judge("spike", vc.Truth(True, ""), [(110, "divergence")], spiky)
    assert s.missed == {"loss_spike"} and s.wrong == {"divergence"}
    # the truth check's own allowance (a saddle run that ended at its minimum)
    ended_at_minimum = vc.Truth(True, "", frozenset({"local_minimum"}))
    s = vc.judge("saddle", ended_at_minimum, [(20, "saddle_point"), (140, "local_minimum")], falls)
    assert s.ok and s.accepted == {"local_minimum"}
    # truth not established: not scored at all
    assert vc.judge("oscillation", vc.Truth(False, "no bounce"), [(20, "plateau")], falls) is None


def test_a_retry_takes_the_curvature_its_first_look_measured(vc, tmp_path):
    """saddle_linear2_gd (the 2-layer linear net at the origin, full batch): the first look at its stall measures
    lambda_min < 0 but cannot call the gradient zero yet; the retry judges the gradients gathered since with that
    snapshot's curvature (a stall barely moves the point) instead of paying for another snapshot, and calls the
    saddle, naming the step its lambda_min was measured at."""
    import pytorch_lightning as pl

    import optdiag
    from optdiag.demo.runner import quiet_lightning

    spec = next(r for r in vc.RUNS if r.name == "saddle_linear2_gd")
    built = vc.build(spec)
    callback = optdiag.OptDiag(verbose=False)
    with quiet_lightning():
        pl.Trainer(max_steps=60, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0).fit(built.module, built.loader)
    diagnoser = callback.stall_diagnoser
    (first, *_) = [u for u in diagnoser.undecided if u["reason"] == "stall"]
    assert first["tests"]["negative_curvature"] > 0.99 and first["tests"]["grad_zero"] < 0.5
    (verdict,) = [d for d in callback.diagnoses if d.kind == "saddle_point"]
    snapshots = [c["step"] for c in callback.hessian_monitor.charges if c["what"] == "stall"]
    assert verdict.step > first["step"] and snapshots == [first["step"]]  # the retry paid for no snapshot
    assert verdict.evidence["lambda_min_step"] == first["step"] and verdict.evidence["lambda_min"] < 0


def test_set_takes_python_literals_and_refuses_anything_else_with_the_reason(vc):
    """``--set`` of verdict_corpus.py and bench_overhead.py (benchmarks/optdiag_settings.py): a setting replaces a
    default only as a Python literal, and the report says which; a malformed one is an argparse error, not a
    traceback."""
    import argparse

    from optdiag_settings import not_the_defaults, setting  # on the path since verdict_corpus.py was loaded

    assert setting("budget=0.03") == ("budget", 0.03) and setting(" loss = 'auto' ") == ("loss", "auto")
    for text, reason in (("budget", "expected KEY=VALUE"), ("=1", "expected KEY=VALUE"),
                         ("loss=auto", "a string needs quotes: loss='...'")):
        with pytest.raises(argparse.ArgumentTypeError, match=reason):
            setting(text)
    assert not_the_defaults({"budget": 0.03, "loss": "auto"}) == "NOT THE DEFAULTS: OptDiag(budget=0.03, loss='auto')"
    assert not_the_defaults({}) == ""
    vc.OVERRIDES.update(budget=0.03)
    try:
        assert vc.summary_line([]).startswith("NOT THE DEFAULTS: OptDiag(budget=0.03); 0 runs")
    finally:
        vc.OVERRIDES.clear()


def test_advice_reruns_judge_each_kind_by_its_own_yardstick(vc):
    """check_advice on hand-made records (the rerun returns given full-data losses): the proposed lr is the first
    suggestion that proposes one (a minimum's decay is a schedule with both numbers), and each kind is judged by
    what its advice promises."""
    from optdiag.diagnosis import Diagnosis, Suggestion

    def record(truth, evals, suggestions, kind):
        spec = next(s for s in vc.RUNS if s.truth == truth)
        d = Diagnosis(step=10, kind=kind, confidence=0.9, evidence={}, suggestions=suggestions, summary="s")
        return vc.Record(spec, 0.1, None, [], list(enumerate(evals)), [], None, None, diagnoses=[d])

    def rerun_with(evals, asked):
        def rerun(lr):
            asked.append(lr)
            return vc.Record(None, lr, None, [], list(enumerate(evals)), [], None, None)
        return rerun

    decay = Suggestion("schedule", "Decay", current=0.1, proposed=0.05, reason="r")
    polyak_momentum = Suggestion("momentum", "Set", current=0.0, proposed=0.5, reason="r")
    asked = []
    floor = [1.0, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    minimum = record("minimum", floor, [polyak_momentum, decay], "local_minimum")
    assert vc.check_advice(minimum, rerun_with([1.0, 0.5, 0.3, 0.3, 0.3, 0.3, 0.2, 0.2], asked)).endswith("(helped)")
    assert asked == [0.05]
    assert vc.check_advice(minimum, rerun_with(floor, [])).endswith("(no change)")
    assert vc.check_advice(minimum, rerun_with([1.0, 0.5, 0.3, 0.3, 0.3, 0.3, 0.4, 0.4], [])).endswith("(BAD)")
    raise_lr = Suggestion("lr", "Raise", current=0.1, proposed=0.2, reason="r")
    saddle = record("saddle", [5.0, 5.0, 5.0, 1.0, 0.2, 0.1], [polyak_momentum, raise_lr], "saddle_point")
    sooner = vc.check_advice(saddle, rerun_with([5.0, 1.0, 0.104, 0.1, 0.1, 0.1], []))
    assert sooner == "lr 0.1 -> 0.2: within 5% of the final loss at eval 5 -> 2 (helped)"
    assert vc.check_advice(saddle, rerun_with([5.0] * 6, [])).endswith("-> None (BAD)")
    assert vc.check_advice(saddle, rerun_with([5.0, float("nan")], [])).endswith("BAD (the rerun diverged)")
    warmup = Suggestion("schedule", "Warm up over 210 steps", reason="r")  # no numbers: proposes no lr
    assert vc.check_advice(record("saddle", [1.0], [warmup], "saddle_point"), rerun_with([], [])) == "no lr suggestion"
