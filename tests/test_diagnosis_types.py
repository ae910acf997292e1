"""Diagnosis / Suggestion: validation, JSON-safe round trip, Markdown."""

import json
import math

import numpy as np
import pytest

from optdiag.diagnosis.evidence import Evidence
from optdiag.diagnosis.stability import OptimizerSpec
from optdiag.diagnosis.types import KINDS, Diagnosis, Suggestion, from_jsonable, to_jsonable
from optdiag.errors import UsageError


def _diagnosis(**evidence):
    s = Suggestion("lr", "Lower the learning rate", current=0.01, proposed=0.00667,
                   reason="lr*lambda_max = 1.5 | past 1", code="for g in opt.param_groups: g['lr'] = 0.00667")
    return Diagnosis(step=12, kind="oscillation", confidence=0.8, evidence=evidence, suggestions=[s],
                     summary="The step bounces.")


def test_kinds_are_the_contract():
    assert KINDS == ("local_minimum", "saddle_point", "oscillation", "plateau", "divergence", "loss_spike")


def test_round_trip_is_lossless_and_strict_json():
    d = _diagnosis(lambda_max=np.float64(150.0), loss_window=[1.0, float("nan"), float("inf")],
                   slope_ci=(-1.0, 2.0), batch_size=np.int64(32), tests={"flat": None, "x": -math.inf})
    text = json.dumps(d.to_dict(), allow_nan=False)  # strict JSON: no NaN tokens
    back = Diagnosis.from_dict(json.loads(text))
    assert back.to_dict() == d.to_dict()
    assert math.isnan(back.evidence["loss_window"][1]) and back.evidence["loss_window"][2] == math.inf
    assert back.evidence["tests"] == {"flat": None, "x": -math.inf}
    assert back.evidence["slope_ci"] == [-1.0, 2.0] and isinstance(back.evidence["batch_size"], int)
    assert back.suggestions == d.suggestions


def test_jsonable_helpers():
    assert to_jsonable({"a": (1, float("nan"))}) == {"a": [1, "nan"]}
    assert from_jsonable(["inf", "-inf", "sgd"]) == [math.inf, -math.inf, "sgd"]
    with pytest.raises(UsageError, match="JSON"):
        to_jsonable({"f": object()})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "stuck"}, "kind"),
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": float("nan")}, "confidence"),
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
        ({"summary": ""}, "summary"),
        ({"evidence": [1]}, "evidence"),
    ],
)
def test_diagnosis_validation(kwargs, match):
    base = dict(step=1, kind="plateau", confidence=0.5, evidence={}, suggestions=[], summary="Flat.")
    with pytest.raises(UsageError, match=match):
        Diagnosis(**{**base, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "weight_decay"}, "target"),
        ({"action": ""}, "action"),
        ({"reason": ""}, "reason"),
        ({"proposed": float("inf")}, "proposed"),
        ({"code": "a\nb"}, "code"),
    ],
)
def test_suggestion_validation(kwargs, match):
    base = dict(target="lr", action="Lower it", current=0.1, proposed=0.05, reason="Because.", code=None)
    with pytest.raises(UsageError, match=match):
        Suggestion(**{**base, **kwargs})


def test_markdown_has_evidence_and_suggestion_tables():
    md = _diagnosis(lambda_max=150.0, loss_window=list(np.linspace(1, 0, 20))).to_markdown()
    lines = md.splitlines()
    assert lines[0] == "**oscillation** at step 12 (confidence 0.80): The step bounces."
    assert "| lambda_max | 150 |" in lines
    assert any(line.startswith("| loss_window | [20 values, last:") for line in lines)
    row = next(line for line in lines if line.startswith("| lr |"))
    assert "\\|" in row and "`for g in opt.param_groups" in row  # the pipe in the reason is escaped


def test_evidence_round_trip_and_nonfinite_flag():
    ev = Evidence(step=4, loss=0.5, lambda_max=10.0, batch_size=8, optimizer=OptimizerSpec("sgd", lr=0.1))
    assert Evidence.from_dict(json.loads(json.dumps(ev.to_dict(), allow_nan=False))) == ev
    assert Evidence(step=1, loss_window=[1.0, float("inf")]).nonfinite
    # measured numbers are cleaned, never refused (docs/errors.md): NaN curvature is "not available" ...
    nan_curvature = Evidence(step=1, lambda_max=float("nan"))
    assert not nan_curvature.nonfinite and nan_curvature.lambda_max is None
    assert nan_curvature.unavailable == ["lambda_max"]
    # ... a negative norm is clamped to 0 and said so, a batch of 0 samples is not a count
    negative = Evidence(step=1, grad_norm=-1.0, batch_size=0)
    assert negative.grad_norm == 0.0 and negative.clamped == {"grad_norm": -1.0}
    assert negative.batch_size is None and negative.unavailable == ["batch_size"]
    # ... while a value that is not a number at all is the caller's mistake
    with pytest.raises(UsageError, match="grad_norm"):
        Evidence(step=1, grad_norm="1.0")
    with pytest.raises(UsageError, match="unknown keys"):
        Evidence.from_dict({"step": 1, "sharpnes": 3})


def test_evidence_derived_quantities():
    ev = Evidence(step=0, lambda_max=150.0, preconditioned_lambda_max=1900.0, grad_sq_norm_unbiased=1.0,
                  grad_noise_trace=100.0, batch_size=32, grad_norm=0.05, grad_norm_initial=1.0,
                  optimizer=OptimizerSpec("sgd", lr=0.01))
    assert ev.stability_threshold == 200.0 and ev.stability_ratio == 0.75 and ev.lr_lambda_max == 1.5
    assert ev.grad_snr == pytest.approx(0.32) and ev.b_simple == 100.0 and ev.grad_norm_ratio == 0.05
    adam = Evidence(step=0, lambda_max=150.0, preconditioned_lambda_max=1900.0,
                    optimizer=OptimizerSpec("adam", lr=0.01, beta1=0.9))
    assert adam.sharpness == 1900.0 and adam.stability_ratio == pytest.approx(0.5)
    full_batch = Evidence(step=0, grad_sq_norm_unbiased=1e-8, grad_noise_trace=0.0, batch_size=10)
    assert full_batch.grad_snr == math.inf
    record = ev.record()
    for key in ("lambda_max", "stability_threshold", "stability_ratio", "lr", "momentum", "grad_norm"):
        assert key in record
