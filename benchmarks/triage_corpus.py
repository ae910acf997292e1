"""The triage corpus: short real Lightning runs with a validation loop, truth checked without optdiag.

A triage finding tells a user to change the model or the data, so a wrong one costs more than a wrong learning
rate. This script trains small PyTorch Lightning runs with ``optdiag.OptDiag()`` at its defaults and a validation
loop that logs ``val_loss`` (the demo scenarios' runs with the scenario's own settings: a curvature cadence where a
run is too short for the time budget to pay for a snapshot), and scores the findings (``cb.findings``) against a truth each run establishes itself:

* ``model_bias`` (the demo scenario's linear classifier on a circle): a larger model, trained the same way without
  optdiag, reaches a full-data training loss below half the small model's;
* ``optimization`` (an MLP on digits, full-batch gradient descent with lr 1e-3): the same model and data trained
  without optdiag at lr 0.5 with momentum reach a full-data training loss below half of this run's;
* ``overfitting`` (the demo scenario's wide MLP on 50 digits): the validation loss the module recorded ends at least
  10% above its minimum while the training loss falls, and the full-data training loss ends far below the full
  validation loss;
* ``ill_conditioning`` (the demo's regression with feature scales from 0.1 to 10): the same run on standardized
  features, without optdiag, ends below half of its full-data training loss at the same lr;
* ``loss_choice`` (the demo's saturated softmax classifier on the squared error of its probabilities): the same run
  with cross-entropy on the logits, without optdiag, gains at least 0.5 in accuracy and halves the probabilities'
  squared error; the same model then fits the data, so the plateau is an optimization problem too;
* ``train_test_mismatch_check`` (an MLP on digits validated on digits with noisy pixels): digits of the training
  distribution it never saw have a loss below half the validation loss (the check the finding recommends);
  ``overfitting`` is not wrong there (a mismatch whose validation loss rises looks exactly like it);
* healthy runs (MLP and CNN on digits, SGD and Adam, batch 16 to the full batch, the larger circle model, and the
  two input-side scenarios' fixed twins): the full-data training loss ends below 10% of its initial value and the
  validation loss within 10% of its best.

A run whose truth check fails is reported as "truth not established" and left out of the scores. Per kind:
**right** (a finding the run should get), **missed** (one it did not get), **wrong** (a kind it should not get and
that is not among the kinds it *may* get, on a run that should get another) and **false alarm** (any finding on a healthy run). ``needs_validation`` is a note
about the setup and is not scored.

Other findings register their runs by adding :class:`Run` entries to :data:`RUNS`: a ``build`` function returning
a :class:`Built` (module, loaders, Trainer options) and a ``truth`` function returning ``(established, detail)``.

    python benchmarks/triage_corpus.py                  # every run (about 1-2 minutes on 2 cores)
    python benchmarks/triage_corpus.py --only overfitting_digits50,mlp_digits_sgd_b32
    python benchmarks/triage_corpus.py --write-docs     # also writes docs/triage-corpus.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import optdiag  # noqa: E402
from optdiag.demo.runner import quiet_lightning  # noqa: E402
from optdiag.demo.scenarios import ValidatedModule, classifier_metrics, digits_data, scenario  # noqa: E402
from optdiag.diagnosis.triage import FINDING_KINDS  # noqa: E402

DOCS = os.path.join(REPO, "docs", "triage-corpus.md")
#: Kinds scored (``needs_validation`` is a note about the set-up, not a claim about the run).
SCORED = tuple(k for k in FINDING_KINDS if k != "needs_validation")


@dataclass
class Built:
    """What one run trains: the module (recording ``losses`` and ``val_losses``), loaders and Trainer options."""

    module: pl.LightningModule
    train: DataLoader
    val: DataLoader
    trainer: dict[str, Any]
    data: tuple[torch.Tensor, torch.Tensor]  # the full training set
    val_data: tuple[torch.Tensor, torch.Tensor]  # the full validation set
    optdiag: dict[str, Any] = field(default_factory=dict)  # OptDiag settings (a demo scenario's own)


@dataclass(frozen=True)
class Run:
    """A corpus run: how to build it, what it should get, and how its truth is checked without optdiag.

    Attributes:
        name, family: identifiers for the table (family: model, optimizer and batch).
        build: returns a fresh :class:`Built`.
        should: the finding kinds the run should get (empty: a healthy run).
        truth: ``truth(built, result) -> (established, detail)`` from the trained module and the loss curves.
        may: kinds that are not wrong on this run either (a mismatch whose validation loss rises reads as
            overfitting: the signals cannot tell them apart).
    """

    name: str
    family: str
    build: Callable[[], Built]
    should: tuple[str, ...]
    truth: Callable[[Built, "Result"], tuple[bool, str]]
    may: tuple[str, ...] = ()


@dataclass
class Result:
    """What a run produced: findings, the full-data losses at the end, the recorded curves and the wall time."""

    findings: list = field(default_factory=list)
    train_full: float = math.nan
    val_full: float = math.nan
    train_initial: float = math.nan
    seconds: float = 0.0


# --- building blocks ------------------------------------------------------------------------------------------------
def _full_loss(module: nn.Module, loss_fn: Callable, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    was = module.training
    module.eval()
    with torch.no_grad():
        value = float(loss_fn(module(data[0]), data[1]))
    module.train(was)
    return value


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _digits_run(make: Callable[[], nn.Module], *, optimizer: str, lr: float, batch: int, epochs: int,
                n_train: int = 1000, momentum: float = 0.9, every_n_epochs: int = 1,
                settings: dict[str, Any] | None = None) -> Callable[[], Built]:
    def build() -> Built:
        x, y = digits_data()
        train, val = (x[:n_train], y[:n_train]), (x[1000:1500], y[1000:1500])
        module = ValidatedModule(_seeded(0, make), nn.functional.cross_entropy, lr=lr,
                                 momentum=0.0 if optimizer == "adam" else momentum, optimizer=optimizer)
        loader = DataLoader(TensorDataset(*train), batch_size=batch, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        return Built(module, loader, DataLoader(TensorDataset(*val), batch_size=len(val[0])),
                     {"max_epochs": epochs, "check_val_every_n_epoch": every_n_epochs}, train, val,
                     dict(settings or {}))
    return build


def _scenario_run(name: str, index: int) -> Callable[[], Built]:
    def build() -> Built:
        run = scenario(name).build()[index]
        val = run.val_loader.dataset
        return Built(run.module, run.loader, run.val_loader,
                     {"max_steps": run.max_steps, "val_check_interval": run.val_every}, run.data, (val.x, val.y),
                     dict(run.optdiag))
    return build


def _mlp(hidden: int = 64) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class _CNN(nn.Module):
    """``Conv2d(1, 8, 3) -> ReLU -> Conv2d(8, 16, 3) -> ReLU -> Linear(256, 10)`` on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU())
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


# --- truth checks (no optdiag) --------------------------------------------------------------------------------------
def _healthy(built: Built, result: Result) -> tuple[bool, str]:
    """Training worked (full-data loss below 10% of its start) and validation ends within 10% of its best."""
    vals = [v for _, v in built.module.val_losses]
    best = min(vals) if vals else math.nan
    trained = result.train_full < 0.1 * result.train_initial
    ok = trained and bool(vals) and vals[-1] <= 1.1 * best
    return ok, (f"full-data training loss {result.train_initial:.3g} -> {result.train_full:.3g}; validation "
                f"{vals[-1] if vals else math.nan:.3g}, best {best:.3g}")


def _twin(name: str, index: int) -> Built:
    """Run ``index`` of demo scenario ``name`` (the scenario's fixed twin), trained without optdiag."""
    twin = _scenario_run(name, index)()
    _fit(twin, callbacks=[])
    return twin


def _larger_model_is_better(built: Built, result: Result) -> tuple[bool, str]:
    """Rerun the larger model of the scenario without optdiag: its full-data training loss is below half of ours."""
    larger = _twin("model_bias", 1)
    other = _full_loss(larger.module, larger.module.loss_fn, larger.data)
    return other < 0.5 * result.train_full, f"training loss {result.train_full:.3g}; larger model {other:.3g}"


def _a_working_lr_trains(build: Callable[[], Built]) -> Callable[[Built, Result], tuple[bool, str]]:
    """The same model and data trained without optdiag with a working step (``build``) reaches a full-data training
    loss below half of this run's: the model could fit, the optimization did not."""
    def truth(built: Built, result: Result) -> tuple[bool, str]:
        other = build()
        _fit(other, callbacks=[])
        loss = _full_loss(other.module, other.module.loss_fn, other.data)
        return loss < 0.5 * result.train_full, f"training loss {result.train_full:.3g}; with a working lr {loss:.3g}"
    return truth


def _noisy_validation(build: Callable[[], Built], noise: float) -> Callable[[], Built]:
    """``build`` with Gaussian noise of sd ``noise`` on the validation pixels: data unlike the training data."""
    def noisy() -> Built:
        built = build()
        x, y = built.val_data
        x = (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0.0, 1.0)
        built.val, built.val_data = DataLoader(TensorDataset(x, y), batch_size=len(y)), (x, y)
        return built
    return noisy


def _held_out_split_is_near_training(built: Built, result: Result) -> tuple[bool, str]:
    """The check the finding recommends, done here: digits of the training distribution the model never saw
    (1500-1796) have a loss far below the validation loss: the validation data differ, a mismatch."""
    x, y = digits_data()
    held = _full_loss(built.module, built.module.loss_fn, (x[1500:], y[1500:]))
    return held < 0.5 * result.val_full, (f"held-out training-like digits {held:.3g}; validation {result.val_full:.3g}; "
                                          f"training {result.train_full:.3g}")


def _validation_rises(built: Built, result: Result) -> tuple[bool, str]:
    """The recorded validation loss ends 10% above its minimum while the training loss falls past that point."""
    vals, losses = built.module.val_losses, built.module.losses
    best_step, best = min(vals, key=lambda p: p[1])
    at_best = sum(losses[max(0, best_step - 10):best_step + 1]) / len(losses[max(0, best_step - 10):best_step + 1])
    end = sum(losses[-10:]) / len(losses[-10:])
    ok = vals[-1][1] > 1.1 * best and end < at_best and result.train_full < 0.5 * result.val_full
    return ok, (f"validation {best:.3g} at step {best_step} -> {vals[-1][1]:.3g}; training {at_best:.3g} -> "
                f"{end:.3g}; full data: training {result.train_full:.3g}, validation {result.val_full:.3g}")


def _standardized_is_faster(built: Built, result: Result) -> tuple[bool, str]:
    """Rerun the scenario on standardized features without optdiag: below half our full-data loss at the same lr."""
    twin = _twin("unscaled_inputs", 1)
    other = _full_loss(twin.module, twin.module.loss_fn, twin.data)
    return other < 0.5 * result.train_full, (f"full-data loss {result.train_full:.3g}; standardized inputs at the "
                                             f"same lr {other:.3g}")


def _cross_entropy_leaves_the_plateau(built: Built, result: Result) -> tuple[bool, str]:
    """Rerun with cross-entropy on the logits without optdiag: +0.5 accuracy, half the probabilities' error."""
    twin = _twin("mse_softmax", 1)
    ours, theirs = classifier_metrics(built.module, built.data), classifier_metrics(twin.module, twin.data)
    ok = theirs["accuracy"] >= ours["accuracy"] + 0.5 and \
        theirs["probability_squared_error"] < 0.5 * ours["probability_squared_error"]
    return ok, (f"accuracy {ours['accuracy']:.3g}, cross-entropy {theirs['accuracy']:.3g}; squared error of the "
                f"probabilities {ours['probability_squared_error']:.3g}, cross-entropy "
                f"{theirs['probability_squared_error']:.3g}")


#: The corpus. Add runs here (a build function, the kinds it should get, a truth check).
RUNS: tuple[Run, ...] = (
    Run("model_bias_ring_linear", "linear classifier, GD momentum, full batch", _scenario_run("model_bias", 0),
        ("model_bias",), _larger_model_is_better),
    Run("overfitting_digits50", "MLP 64-256-256-10, Adam, batch 10, 50 digits", _scenario_run("overfitting", 0),
        ("overfitting",), _validation_rises),
    Run("unscaled_inputs_mlp", "MLP 8-32-1, SGD, batch 64, feature stds 0.1-10", _scenario_run("unscaled_inputs", 0),
        ("ill_conditioning",), _standardized_is_faster),
    Run("mse_softmax_linear", "softmax classifier, saturated init, SGD, batch 64, MSE on probabilities",
        _scenario_run("mse_softmax", 0), ("loss_choice", "optimization"), _cross_entropy_leaves_the_plateau),
    Run("plateau_digits_gd_lr1e-3", "MLP 64-64-10, GD lr 1e-3, full batch (1000)",
        _digits_run(_mlp(), optimizer="sgd", lr=1e-3, momentum=0.0, batch=1000, epochs=200, every_n_epochs=20,
                    settings={"every_n_steps": 25}), ("optimization",),
        _a_working_lr_trains(_digits_run(_mlp(), optimizer="sgd", lr=0.5, batch=1000, epochs=200))),
    Run("mismatch_digits_noisy_val", "MLP 64-64-10, SGD momentum, batch 32, validation pixels + noise 0.8",
        _noisy_validation(_digits_run(_mlp(), optimizer="sgd", lr=0.05, batch=32, epochs=10), 0.8),
        ("train_test_mismatch_check",), _held_out_split_is_near_training, may=("overfitting",)),
    Run("ring_mlp_gd", "MLP 2-32-32-2, GD momentum, full batch", _scenario_run("model_bias", 1), (), _healthy),
    Run("standardized_inputs_mlp", "MLP 8-32-1, SGD, batch 64, standardized features",
        _scenario_run("unscaled_inputs", 1), (), _healthy),
    Run("cross_entropy_linear", "softmax classifier, saturated init, SGD, batch 64, cross-entropy",
        _scenario_run("mse_softmax", 1), (), _healthy),
    Run("mlp_digits_sgd_b32", "MLP 64-64-10, SGD momentum, batch 32",
        _digits_run(_mlp(), optimizer="sgd", lr=0.05, batch=32, epochs=8), (), _healthy),
    Run("mlp_digits_adam_b16", "MLP 64-128-10, Adam, batch 16",
        _digits_run(_mlp(128), optimizer="adam", lr=3e-3, batch=16, epochs=6), (), _healthy),
    Run("cnn_digits_sgd_b64", "CNN 8-16 channels, SGD momentum, batch 64",
        _digits_run(_CNN, optimizer="sgd", lr=0.05, batch=64, epochs=10), (), _healthy),
    Run("mlp_digits_gd_full", "MLP 64-64-10, GD momentum, full batch (1000)",
        _digits_run(_mlp(), optimizer="sgd", lr=0.5, batch=1000, epochs=200, every_n_epochs=10), (), _healthy),
)


# --- running and scoring --------------------------------------------------------------------------------------------
def _fit(built: Built, callbacks: list) -> None:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                   default_root_dir=tempfile.mkdtemp(prefix="triage-corpus-"))
    options.update(built.trainer)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(callbacks=callbacks, **options).fit(built.module, built.train, built.val)


def run_one(run: Run) -> tuple[Result, bool, str]:
    """Train ``run`` with ``OptDiag()``; return its result and its truth check."""
    built = run.build()
    loss_fn = built.module.loss_fn
    result = Result(train_initial=_full_loss(built.module, loss_fn, built.data))
    cb = optdiag.OptDiag(verbose=False, **built.optdiag)
    started = time.perf_counter()
    _fit(built, [cb])
    result.seconds = time.perf_counter() - started
    result.findings = [f for f in cb.findings if f.kind != "needs_validation"]
    result.train_full = _full_loss(built.module, loss_fn, built.data)
    result.val_full = _full_loss(built.module, loss_fn, built.val_data)
    established, detail = run.truth(built, result)
    return result, established, detail


def score(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per kind: right, wrong, false alarms, missed, over the runs whose truth was established."""
    table = {k: {"right": 0, "wrong": 0, "false_alarm": 0, "missed": 0} for k in SCORED}
    for row in rows:
        if not row["truth_established"]:
            continue
        found, should, may = set(row["found"]), set(row["should"]), set(row.get("may", ()))
        for kind in SCORED:
            if kind in should:
                table[kind]["right" if kind in found else "missed"] += 1
            elif kind in found and kind not in may:
                table[kind]["wrong" if should else "false_alarm"] += 1
    return table


def _format(rows: Sequence[dict[str, Any]], table: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| run | family | should (may) | found | truth | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        truth = ("" if r["truth_established"] else "NOT ESTABLISHED: ") + r["truth"]
        found = ", ".join(f"{k} ({c:.2f})" for k, c in zip(r["found"], r["confidence"])) or "none"
        may = f" ({', '.join(r['may'])})" if r.get("may") else ""
        lines.append(f"| {r['name']} | {r['family']} | {', '.join(r['should']) or 'none (healthy)'}{may} | {found} | "
                     f"{truth} | {r['seconds']:.1f} |")
    lines += ["", "| kind | right | wrong | false alarms | missed |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['right']} | {v['wrong']} | {v['false_alarm']} | {v['missed']} |" for k, v in table.items()]
    return lines


def write_docs(lines: list[str], seconds: float, path: str = DOCS) -> None:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
                          ).stdout.strip() or "unknown"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "# Triage corpus",
        "",
        f"Generated by `python benchmarks/triage_corpus.py --write-docs` on {today} at commit `{head}` "
        f"({seconds:.0f} s on CPU). Each run is a real PyTorch Lightning fit with `optdiag.OptDiag()` at its "
        "defaults and a validation loop logging `val_loss`; the truth comes from the run itself without optdiag "
        "(see the script's docstring and [Triage](triage.md)). A finding on a healthy run is a false alarm; a "
        "run whose truth could not be established is not scored.",
        "",
        *lines,
        "",
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--write-docs", action="store_true", help=f"write {os.path.relpath(DOCS, REPO)}")
    parser.add_argument("--json", default=None, help="write the rows and scores to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wanted = None if args.only is None else set(args.only.split(","))
    unknown = (wanted or set()) - {r.name for r in RUNS}
    if unknown:
        parser.error(f"unknown runs: {', '.join(sorted(unknown))}")
    rows, started = [], time.perf_counter()
    for run in RUNS:
        if wanted is not None and run.name not in wanted:
            continue
        result, established, detail = run_one(run)
        rows.append({"name": run.name, "family": run.family, "should": list(run.should), "may": list(run.may),
                     "found": [f.kind for f in result.findings], "confidence": [f.confidence for f in result.findings],
                     "truth_established": established, "truth": detail, "seconds": result.seconds})
        print(f"{run.name}: found {rows[-1]['found'] or 'nothing'} (should {list(run.should) or 'nothing'}); "
              f"truth {'ok' if established else 'NOT established'}: {detail}", flush=True)
    seconds = time.perf_counter() - started
    table = score(rows)
    lines = _format(rows, table)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "scores": table, "seconds": seconds}, handle, indent=2)
    if args.write_docs:
        write_docs(lines, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
