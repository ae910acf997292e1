"""The optdiag tab's view of a run (optdiag/tensorboard_plugin/data.py) and when the tab is active, without a server.

The end-to-end test with a real ``tensorboard`` and Chromium is tests/test_tensorboard_plugin.py.
"""

from __future__ import annotations

import json

import pytest

from optdiag.diagnosis import Diagnosis, Suggestion
from optdiag.diagnosis.triage import Finding
from optdiag.sinks.events import append_event, events_path
from optdiag.tensorboard_plugin.data import events_view, loss_tag, run_view

SADDLE = Diagnosis(70, "saddle_point", 0.99, {"lambda_min": -3.0, "lambda_max": 9.0, "loss_window": [5.1, 5.1]},
                   [Suggestion("momentum", "Raise momentum", current=0.0, proposed=0.9, reason="escape faster")],
                   "Near a saddle.")
MINIMUM = Diagnosis(750, "local_minimum", 0.9, {"lambda_min": 0.0, "lambda_max": 9.0, "grad_snr": float("inf")}, [],
                    "At a minimum.")


@pytest.mark.parametrize("tags, expected", [
    (["epoch", "train_loss_step", "loss"], "loss"),  # the usual names in their order
    (["train/loss", "train_loss_step"], "train/loss"),
    (["val_loss", "test_loss", "optdiag/probe_loss", "my_loss"], "my_loss"),  # else any loss but these
    (["val_loss", "optdiag/probe_loss"], None),
])
def test_loss_tag_prefers_the_usual_names_and_never_a_validation_loss(tags, expected):
    assert loss_tag(tags) == expected


def test_events_view_attaches_each_outcome_to_its_own_verdict():
    records = [
        SADDLE.to_dict(),
        {"record": "outcome", "verdict_step": 70, "kind": "saddle_point", "outcome": "confirmed", "detail": "fell"},
        {"record": "outcome", "verdict_step": 70, "kind": "plateau", "outcome": "refuted"},  # another verdict's
        MINIMUM.to_dict(),
        {"record": "finding", **Finding(900, "needs_validation", 1.0, {}, [], "No validation loss.").to_dict()},
        {"record": "something new", "step": 3},
        {"step": 5, "kind": "uncertain", "confidence": 0.5, "summary": "not a kind"},
    ]
    view = events_view(records)
    assert [(v["step"], v["kind"]) for v in view["verdicts"]] == [(70, "saddle_point"), (750, "local_minimum")]
    assert view["verdicts"][0]["outcome"] == records[1] and view["verdicts"][1]["outcome"] is None
    assert view["verdicts"][0]["key_evidence"] == ["lambda_min", "lambda_max"]
    assert view["verdicts"][1]["key_evidence"] == ["lambda_min", "lambda_max", "grad_snr"]
    assert view["verdicts"][0]["suggestions"] == [s.to_dict() for s in SADDLE.suggestions]
    assert [(f["step"], f["kind"]) for f in view["findings"]] == [(900, "needs_validation")]
    assert view["unreadable"] == 2


def test_run_view_is_strict_json_and_says_what_is_missing():
    diverging = {"train_loss": [(0, 1.0), (10, float("inf"))], "optdiag/lambda_max": [(10, float("nan"))]}
    view = run_view("r", diverging, [SADDLE.to_dict()])
    assert view["loss"]["points"] == [[0, 1.0], [10, "inf"]] and view["series"]["lambda_max"] == [[10, "nan"]]
    assert view["verdicts"][0]["evidence"]["lambda_min"] == -3.0 and view["message"] is None
    json.dumps(view, allow_nan=False)  # what the route sends

    plain = run_view("r", {"train_loss": [(0, 1.0)]}, None)
    assert (plain["has_optdiag"], plain["message"].split(":")[0]) == (False, "No optdiag data in this run")
    quiet = run_view("r", {"optdiag/lambda_max": [(5, 2.0)]}, None)
    assert (quiet["has_optdiag"], quiet["message"].split(":")[0]) == (True, "No verdict so far")
    elsewhere = run_view("r", {}, None, text_verdicts=True)
    assert elsewhere["message"].startswith("This run's verdicts are in the Text tab")


def test_run_view_keeps_the_snapshots_a_verdict_asked_for_apart():
    scalars = {"optdiag/lambda_min": [(50, -1.0)], "optdiag/stall/lambda_min": [(70, -3.0)],
               "optdiag/stall/step": [(70, 70.0)], "optdiag/spike/lambda_max": [(120, 40.0)]}
    view = run_view("r", scalars, None)
    assert view["series"] == {"lambda_min": [[50, -1.0]], "stall/lambda_min": [[70, -3.0]],
                              "spike/lambda_max": [[120, 40.0]]}
    assert view["snapshots"] == {"stall": [70], "spike": [120]}


def test_the_tab_is_active_only_when_a_run_has_optdiag_data(tmp_path):
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from torch.utils.tensorboard import SummaryWriter

    from optdiag.tensorboard_plugin import OptDiagPlugin

    def active() -> bool:
        multiplexer = plugin_event_multiplexer.EventMultiplexer()
        multiplexer.AddRunsFromDirectory(str(tmp_path))
        multiplexer.Reload()
        provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
        return OptDiagPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(tmp_path))).is_active()

    with SummaryWriter(str(tmp_path / "plain")) as writer:
        writer.add_scalar("train_loss", 1.0, 0)
    assert not active()
    append_event(events_path(tmp_path / "plain"), SADDLE.to_dict())  # verdicts only
    assert active()
    (tmp_path / "plain" / "optdiag" / "events.jsonl").unlink()
    with SummaryWriter(str(tmp_path / "monitored")) as writer:
        writer.add_scalar("optdiag/lambda_max", 9.0, 0)
    assert active()
