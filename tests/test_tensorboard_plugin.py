"""The optdiag tab in TensorBoard, end to end: real Lightning runs, a real ``tensorboard`` server, headless Chromium.

Three runs under one logdir: the demo's saddle scenario (SGD, three verdicts, two of them checked afterwards), a
short Adam run (the preconditioned sharpness) and a run without optdiag. TensorBoard serves them on a free loopback
port; the JSON routes are checked against what the runs wrote, read back without the plugin (the event files with
TensorBoard's ``EventAccumulator``, ``events.jsonl`` line by line), and the tab's own frame
(``/data/plugin_entry.html?name=optdiag``, what TensorBoard puts in the tab) is rendered by headless Chromium,
whose DOM must show the verdicts, the timeline and the threshold chart with those numbers.

Without Chromium the browser test skips, unless ``OPTDIAG_REQUIRE_BROWSER=1`` (CI sets it): then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
from html.parser import HTMLParser
from importlib import resources

import pytest

from optdiag.diagnosis.types import to_jsonable
from optdiag.sinks.events import events_path, read_events
from optdiag.tensorboard_plugin.data import SERIES, SNAPSHOT_REASONS
from optdiag.tensorboard_plugin.local import Page, chromium, find_chromium, get, tensorboard_server

pytestmark = pytest.mark.slow

CHROMIUM = find_chromium()
REQUIRE_BROWSER = os.environ.get("OPTDIAG_REQUIRE_BROWSER") == "1"


def _train_runs(logdir) -> dict:
    """The saddle scenario, an Adam run and a run without optdiag, all with TensorBoard loggers under ``logdir``.

    The Adam run is long enough for its preconditioner to be ready (51 steps at beta2 = 0.999) for the last snapshots.
    """
    import pytorch_lightning as pl

    from optdiag import OptDiag
    from optdiag.demo.runner import quiet_lightning, run_scenario
    from lightning_models import RegressionDataModule, RegressionModule

    saddle = run_scenario("saddle", str(logdir))
    assert saddle.runs[0].diagnoses, "the saddle scenario gave no verdict to show"
    with quiet_lightning():
        for name, callbacks, optimizer in (("adam", [OptDiag(every_n_steps=10, verbose=False)], "adam"),
                                           ("plain", [], "sgd")):
            trainer = pl.Trainer(
                max_steps=80, accelerator="cpu", devices=1, callbacks=callbacks, log_every_n_steps=5,
                logger=pl.loggers.TensorBoardLogger(str(logdir), name=name, version=0),
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(logdir), deterministic=True)
            trainer.fit(RegressionModule(optimizer=optimizer, lr=0.01), RegressionDataModule())
    return {"saddle": "saddle/main", "adam": "adam/version_0", "plain": "plain/version_0"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Train the runs, serve them with ``tensorboard`` on a free loopback port, yield ``(base_url, logdir, runs)``."""
    logdir = tmp_path_factory.mktemp("tb")
    runs = _train_runs(logdir)
    with tensorboard_server(logdir, runs=len(runs)) as base:  # killed when the module's tests are done
        yield base, logdir, runs


def _outcomes(path) -> list[str | None]:
    """Each verdict's checked outcome in an events.jsonl ("confirmed", ...), None while it is open."""
    records = read_events(path)
    done = {(r["verdict_step"], r["kind"]): r["outcome"] for r in records if r.get("record") == "outcome"}
    return [done.get((r["step"], r["kind"])) for r in records if "record" not in r]


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The run's scalars read straight from its event files, without the plugin or the data server."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- the server side ----------------------------------------------------------------------------------------------
def test_the_tab_is_registered_and_serves_its_files(served):
    base, _, _ = served
    listing = get(base + "/data/plugins_listing")["optdiag"]
    assert listing["enabled"] is True
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/optdiag/index.js"}
    for name in ("index.js", "chart.js", "style.css"):
        shipped = resources.files("optdiag.tensorboard_plugin").joinpath("static", name).read_bytes()
        assert get(f"{base}/data/plugin/optdiag/{name}") == shipped
    frame = get(base + "/data/plugin_entry.html?name=optdiag").decode()
    assert '<base href="plugin/optdiag/" />' in frame and 'import("./index.js")' in frame


def test_runs_route_lists_every_run_and_which_have_optdiag_data(served):
    base, _, runs = served
    assert get(base + "/data/plugin/optdiag/runs") == {"runs": [
        {"run": runs["adam"], "optdiag": True}, {"run": runs["plain"], "optdiag": False},
        {"run": runs["saddle"], "optdiag": True}]}


def test_run_route_gives_the_verdicts_with_outcomes_and_the_logged_series(served):
    base, logdir, runs = served
    view = get(f"{base}/data/plugin/optdiag/run?run={runs['saddle']}")
    records = read_events(events_path(logdir / runs["saddle"]))
    diagnoses = [r for r in records if "record" not in r]
    outcomes = {(r["verdict_step"], r["kind"]): r for r in records if r.get("record") == "outcome"}
    assert outcomes  # the saddles' escapes were checked before the run ended
    assert [(v["step"], v["kind"]) for v in view["verdicts"]] == [(d["step"], d["kind"]) for d in diagnoses]
    for verdict, diagnosis in zip(view["verdicts"], diagnoses):
        assert verdict["confidence"] == diagnosis["confidence"]
        assert verdict["suggestions"] == to_jsonable(diagnosis["suggestions"])
        assert verdict["evidence"]["lambda_min"] == diagnosis["evidence"]["lambda_min"]
        outcome = outcomes.get((diagnosis["step"], diagnosis["kind"]))
        assert verdict["outcome"] == (None if outcome is None else to_jsonable(outcome))
    assert view["verdicts"][0]["key_evidence"] == [
        "lambda_min", "lambda_max", "escape_expected_drop", "escape_measured_drop"]
    scalars = _scalars(logdir / runs["saddle"])
    assert view["loss"] == {"tag": "train_loss", "points": [list(p) for p in scalars["train_loss"]]}
    # every curve the tab draws, exactly as logged; the snapshots a stall asked for apart from the scheduled ones
    drawn = {name for name in SERIES if "optdiag/" + name in scalars} | {
        f"{reason}/{name}" for reason in SNAPSHOT_REASONS for name in ("lambda_max", "lambda_min")
        if f"optdiag/{reason}/{name}" in scalars}
    assert {"lambda_max", "lambda_min", "stability_threshold", "stall/lambda_min"} <= drawn == set(view["series"])
    for name in drawn:
        assert view["series"][name] == [list(p) for p in scalars["optdiag/" + name]]
    assert view["snapshots"]["stall"] == [step for step, _ in scalars["optdiag/stall/step"]]
    assert "preconditioned_lambda_max" not in view["series"]  # SGD: the raw sharpness is compared
    assert view["message"] is None and view["has_optdiag"] is True
    findings = [{k: v for k, v in r.items() if k != "record"} for r in records if r.get("record") == "finding"]
    assert view["findings"] == to_jsonable(findings) and view["unreadable"] == 0


def test_run_route_for_adam_has_the_preconditioned_sharpness(served):
    base, logdir, runs = served
    view = get(f"{base}/data/plugin/optdiag/run?run={runs['adam']}")
    scalars = _scalars(logdir / runs["adam"])
    precond = scalars["optdiag/preconditioned_lambda_max"]
    assert view["series"]["preconditioned_lambda_max"] == [list(p) for p in precond]
    assert view["series"]["stability_threshold"] == [list(p) for p in scalars["optdiag/stability_threshold"]]
    assert view["verdicts"] == [] and view["message"].startswith("No verdict so far")


def test_run_route_says_when_a_run_has_no_optdiag_data(served):
    base, _, runs = served
    view = get(f"{base}/data/plugin/optdiag/run?run={runs['plain']}")
    assert view["has_optdiag"] is False and view["verdicts"] == [] and view["series"] == {}
    assert view["message"].startswith("No optdiag data in this run")
    assert view["loss"]["tag"] == "train_loss"


def test_run_route_refuses_an_unknown_run(served):
    base, _, _ = served
    with pytest.raises(urllib.error.HTTPError) as error:
        get(f"{base}/data/plugin/optdiag/run?run=../../etc")
    assert error.value.code == 404


def test_run_route_reads_events_jsonl_afresh_while_a_run_trains(served):
    base, logdir, runs = served
    source = events_path(logdir / runs["saddle"])
    target = events_path(logdir / runs["plain"])
    lines = open(source, encoding="utf-8").read().splitlines(keepends=True)
    os.makedirs(os.path.dirname(target))
    try:
        with open(target, "w", encoding="utf-8") as handle:  # a verdict, then half of the next line
            handle.write(lines[0] + lines[1][:20])
        view = get(f"{base}/data/plugin/optdiag/run?run={runs['plain']}")
        first = json.loads(lines[0])
        assert [(v["step"], v["kind"], v["outcome"]) for v in view["verdicts"]] == [
            (first["step"], first["kind"], None)]
        with open(target, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        view = get(f"{base}/data/plugin/optdiag/run?run={runs['plain']}")
        assert [v["outcome"]["outcome"] if v["outcome"] else None for v in view["verdicts"]] == _outcomes(source)
    finally:
        shutil.rmtree(os.path.dirname(target))


# --- the browser side ---------------------------------------------------------------------------------------------
class _Dom(HTMLParser):
    """Every element's tag, attributes and own text, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.elements.append(element)
        if tag not in ("meta", "link", "input", "br", "hr", "img"):  # HTML's void elements
            self._open.append(element)

    def handle_endtag(self, tag):
        if any(e["tag"] == tag for e in self._open):
            while self._open.pop()["tag"] != tag:
                pass

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag: str, cls: str | None = None, **attrs: str) -> list[dict]:
        """Elements ``tag`` with the class ``cls`` among theirs and the attributes (``data_name`` for data-name)."""
        return [e for e in self.elements if e["tag"] == tag and (cls is None or cls in e.get("class", "").split())
                and all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _browser() -> str:
    """The Chromium executable; without one the test skips, or fails when CI requires the browser."""
    if CHROMIUM is None:
        if REQUIRE_BROWSER:
            pytest.fail("OPTDIAG_REQUIRE_BROWSER=1 but no chromium on PATH (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH: the tab is not rendered (set OPTDIAG_REQUIRE_BROWSER=1 to make this fail)")
    return CHROMIUM


def test_the_tab_renders_verdicts_timeline_and_threshold_chart_in_chromium(served):
    base, logdir, runs = served
    query = "".join(f"&run={runs[k]}" for k in ("saddle", "adam", "plain"))
    dom = _Dom()
    frame = f"{base}/data/plugin_entry.html?name=optdiag{query}"  # what TensorBoard puts in the tab, these runs
    dom.feed(chromium("--virtual-time-budget=10000", "--dump-dom", frame, executable=_browser()))
    records = read_events(events_path(logdir / runs["saddle"]))
    diagnoses = [r for r in records if "record" not in r]
    saddle_scalars, adam_scalars = _scalars(logdir / runs["saddle"]), _scalars(logdir / runs["adam"])
    assert [s["data-run"] for s in dom.find("section", cls="run")] == [runs["adam"], runs["plain"], runs["saddle"]]

    # the verdict cards: kind, step, confidence, outcome, key evidence and suggestions of each verdict in the file
    cards = dom.find("article", cls="verdict")
    assert [(c["data-kind"], int(c["data-step"]), float(c["data-confidence"])) for c in cards] == [
        (d["kind"], d["step"], d["confidence"]) for d in diagnoses]
    assert [c["data-outcome"] for c in cards] == [o or "open" for o in _outcomes(events_path(logdir / runs["saddle"]))]
    assert f"{diagnoses[0]['kind']} at step {diagnoses[0]['step']}" in cards[0]["text"]
    assert diagnoses[0]["summary"] in cards[0]["text"]
    lambda_min_rows = dom.find("tr", data_name="lambda_min")
    assert float(lambda_min_rows[0]["data-value"]) == diagnoses[0]["evidence"]["lambda_min"]
    top = diagnoses[0]["suggestions"][0]  # shown with its numbers: now -> proposed
    row = dom.find("tr", data_target=top["target"])[0]["text"]
    assert top["action"] in row and f"{top['current']:.4g}" in row and f"{top['proposed']:.4g}" in row

    # the timeline: the loss curve with one marker per verdict, at its step
    markers = dom.find("g", cls="verdict")
    assert [(m["data-kind"], int(m["data-step"])) for m in markers if "marker" in m["class"].split()][:3] == [
        (d["kind"], d["step"]) for d in diagnoses]
    timeline = dom.find("figure", cls="timeline")
    assert len(timeline) == 2  # the Adam run's and the saddle run's: the run without optdiag data has none
    assert timeline[1]["text"].startswith("training loss (train_loss) with the verdicts")
    assert all(f"{d['kind']} @{d['step']}" in timeline[1]["text"] for d in diagnoses)

    # the threshold chart: the last lambda_max and threshold the run logged (SGD) / the preconditioned one (Adam)
    readings = {r["data-sharpness"]: r for r in dom.find("p", cls="reading") if "data-sharpness" in r}
    sgd, adam = readings["lambda_max"], readings["preconditioned_lambda_max"]
    step, value = saddle_scalars["optdiag/lambda_max"][-1]
    assert (int(sgd["data-step"]), float(sgd["data-value"])) == (step, value)
    lr = saddle_scalars["optdiag/lr"][-1][1]
    assert float(sgd["data-threshold"]) == saddle_scalars["optdiag/stability_threshold"][-1][1] == pytest.approx(2 / lr)
    assert f"lambda_max = {value:.4g}, threshold = 100" in sgd["text"]
    step, value = adam_scalars["optdiag/preconditioned_lambda_max"][-1]
    assert (int(adam["data-step"]), float(adam["data-value"])) == (step, value)
    assert float(adam["data-threshold"]) == adam_scalars["optdiag/stability_threshold"][-1][1]

    # the triage's findings of both runs, in the order of the sections
    findings = [(r["kind"], r["step"]) for run in ("adam", "saddle")
                for r in read_events(events_path(logdir / runs[run])) if r.get("record") == "finding"]
    assert [(c["data-kind"], int(c["data-step"])) for c in dom.find("article", cls="finding")] == findings

    # a run without optdiag data says so
    plain = [e for e in dom.find("p", cls="no-data")]
    assert len(plain) == 1 and plain[0]["text"].startswith("No optdiag data in this run")


def test_the_open_tab_follows_a_run_while_it_trains(served):
    # the tab polls: verdicts appended to a run's events.jsonl appear in an open tab without reloading it
    base, logdir, runs = served
    source, target = events_path(logdir / runs["saddle"]), events_path(logdir / runs["plain"])
    kinds = "[...document.querySelectorAll('article.verdict')].map((a) => a.dataset.kind + '@' + a.dataset.step)"
    with Page(f"{base}/data/plugin_entry.html?name=optdiag&run={runs['plain']}", executable=_browser()) as page:
        message = page.wait_for("document.querySelector('section.run p.message')?.textContent")
        assert message.startswith("No optdiag data in this run") and page.evaluate(kinds) == []
        os.makedirs(os.path.dirname(target))
        try:
            shutil.copy(source, target)
            expected = [f"{r['kind']}@{r['step']}" for r in read_events(source) if "record" not in r]
            assert page.wait_for(f"({kinds}).length === {len(expected)} && {kinds}", timeout=30) == expected
        finally:
            shutil.rmtree(os.path.dirname(target))
