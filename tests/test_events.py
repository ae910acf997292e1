"""events.jsonl: one strict JSON object per line, appended, never overwritten, read back exactly."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from optdiag.errors import UsageError
from optdiag.sinks.events import append_event, append_events, events_path, read_events, to_json_line


def test_events_path_is_under_optdiag_folder(tmp_path):
    assert events_path(tmp_path) == os.path.join(str(tmp_path), "optdiag", "events.jsonl")


def test_lines_are_strict_json_and_nonfinite_numbers_round_trip(tmp_path):
    path = events_path(tmp_path)
    record = {"kind": "divergence", "step": 7, "evidence": {"loss": math.inf, "lambda_min": -math.inf,
                                                            "grad_norm": math.nan, "loss_window": [1.0, 2.5]}}
    append_event(path, record)
    (line,) = open(path, encoding="utf-8").read().splitlines()
    # strict JSON: a parser that refuses NaN/Infinity tokens still reads it
    parsed = json.loads(line, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert parsed["evidence"]["loss"] == "inf"
    (back,) = read_events(path)
    assert back["evidence"]["loss"] == math.inf and back["evidence"]["lambda_min"] == -math.inf
    assert math.isnan(back["evidence"]["grad_norm"])
    assert back["evidence"]["loss_window"] == [1.0, 2.5] and back["step"] == 7


def test_append_never_overwrites_an_existing_file(tmp_path):
    path = events_path(tmp_path)
    os.makedirs(os.path.dirname(path))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"kind": "user line"}\n')
    assert append_events(path, [{"kind": "plateau"}, {"kind": "saddle_point"}]) == 2
    append_event(path, {"kind": "local_minimum"})
    assert [r["kind"] for r in read_events(path)] == ["user line", "plateau", "saddle_point", "local_minimum"]


def test_numpy_values_and_tuples_become_plain_json():
    line = to_json_line({"x": np.float64(1.5), "v": np.array([1, 2]), "t": (3, 4.0)})
    assert json.loads(line) == {"x": 1.5, "v": [1, 2], "t": [3, 4.0]}


def test_unencodable_record_leaves_the_file_untouched(tmp_path):
    path = events_path(tmp_path)
    append_event(path, {"kind": "plateau"})
    with pytest.raises(UsageError, match="cannot store a object"):
        append_events(path, [{"kind": "saddle_point"}, {"kind": object()}])
    assert [r["kind"] for r in read_events(path)] == ["plateau"]


def test_a_record_must_be_a_mapping(tmp_path):
    with pytest.raises(UsageError, match="must be a mapping"):
        append_event(events_path(tmp_path), ["not", "a", "dict"])


def test_read_events_names_file_and_line_of_a_bad_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "plateau"}\n\n{broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"events\.jsonl:3: not valid JSON"):
        read_events(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        read_events(path)


def test_read_events_can_skip_a_half_written_line(tmp_path):
    # a live run read while it appends: the last line is cut off, a line in between is not an object
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "plateau"}\n[1, 2]\n{"kind": "saddle_point", "evidence": {"loss": "inf"}}\n{"ki',
                    encoding="utf-8")
    assert read_events(path, skip_invalid=True) == [
        {"kind": "plateau"}, {"kind": "saddle_point", "evidence": {"loss": float("inf")}}]
    with pytest.raises(ValueError, match=r"events\.jsonl:2: expected a JSON object"):
        read_events(path)


def test_a_diagnosis_round_trips_through_the_file(tmp_path):
    from optdiag.diagnosis import Diagnosis, Suggestion

    path = events_path(tmp_path)
    lower = Suggestion("lr", "Lower the learning rate", current=0.01, proposed=0.005,
                       reason="lr * lambda_max = 1.8 is near the threshold 2.")
    first = Diagnosis(120, "oscillation", 0.9, {"lambda_max": 180.0, "loss_window": [0.1, 0.3]}, [lower], "Bounces.")
    second = Diagnosis(150, "divergence", 1.0, {"loss": math.inf, "grad_norm": math.nan}, [], "Loss overflowed.")
    append_events(path, [first.to_dict(), second.to_dict()])
    lines = open(path, encoding="utf-8").read().splitlines()
    assert Diagnosis.from_dict(json.loads(lines[0])) == first  # what a user would do with one line
    back = [Diagnosis.from_dict(r) for r in read_events(path)]
    assert back[0] == first and back[1].kind == "divergence" and back[1].evidence["loss"] == math.inf
    assert math.isnan(back[1].evidence["grad_norm"])
