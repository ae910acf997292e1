"""``optdiag demo [--scenario NAME|all] [--out DIR]``: run scenarios whose verdict is known and show the diagnosis.

This module is imported whenever the ``optdiag`` parser is built, so it imports nothing heavy at module level:
torch, Lightning and matplotlib load only in :func:`run`.

Example:
    $ optdiag demo                       # the quick subset, under a minute on a laptop CPU
    $ optdiag demo --scenario saddle --out /tmp/demo
    $ optdiag demo --scenario all
    $ optdiag demo --list
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

from optdiag.errors import UsageError

__all__ = ["add_arguments", "run", "resolve_scenarios", "new_run_dir"]

DEFAULT_OUT = "optdiag_demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to ``parser``."""
    parser.add_argument(
        "name", nargs="?", default=None, metavar="NAME",
        help="a scenario to run, the same as --scenario NAME (optdiag demo overfitting)",
    )
    parser.add_argument(
        "--scenario", default=None, metavar="NAME|all",
        help="a scenario name, several separated by commas, or 'all' (default: a quick representative subset)",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR",
        help=f"folder for TensorBoard logs, events.jsonl and figures; each demo run gets a new subfolder "
             f"(default: ./{DEFAULT_OUT}; nothing there is ever deleted)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--no-figures", action="store_true", help="do not write a PNG figure per scenario")


def resolve_scenarios(value: str | None) -> list[str]:
    """The scenario names ``--scenario`` asks for, in presentation order.

    Raises:
        UsageError: for an unknown or empty name.

    Example:
        >>> resolve_scenarios("minimum,saddle")
        ['saddle', 'minimum']
    """
    from optdiag.demo.scenarios import DEFAULT_SCENARIOS, SCENARIOS, scenario

    if value is None:
        return list(DEFAULT_SCENARIOS)
    if value.strip() == "all":
        return list(SCENARIOS)
    names = [part.strip() for part in value.split(",")]
    if not all(names):
        raise UsageError(f"empty scenario name in {value!r}; choose from: {', '.join(SCENARIOS)}, or 'all'")
    wanted = {scenario(name).name for name in names}
    return [name for name in SCENARIOS if name in wanted]


def new_run_dir(root: str) -> str:
    """A fresh ``run-YYYYmmdd-HHMMSS[-n]`` folder under ``root`` (created; existing folders are left alone).

    Raises:
        UsageError: when ``root`` exists and is not a folder, or cannot be created.
    """
    if os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"--out {root!r} exists and is not a folder")
    stamp = datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    try:
        os.makedirs(root, exist_ok=True)
        for n in range(1, 1000):
            path = os.path.join(root, stamp if n == 1 else f"{stamp}-{n}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise UsageError(f"cannot create the output folder under {root!r}: {error.strerror}") from None
    raise UsageError(f"could not find a free run folder name under {root!r}")


def _list_scenarios() -> str:
    from optdiag.demo.scenarios import SCENARIOS

    lines = []
    for s in SCENARIOS.values():
        expected = "not checked" if s.expected is None else ", ".join(s.expected) or "no verdict"
        default = " (default)" if s.in_default else ""
        lines.append(f"{s.name:<18} {s.title}{default}\n{'':<18} expected: {expected}")
    return "\n".join(lines)


def _summary_record(result: Any) -> dict[str, Any]:
    return {
        "scenario": result.scenario.name,
        "expected": None if result.scenario.expected is None else list(result.scenario.expected),
        "found": list(result.found),
        "as_expected": result.passed,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in result.checks],
        "runs": [
            {
                "label": run.label, "steps": len(run.losses), "seconds": run.seconds, "log_dir": run.log_dir,
                "events_file": run.events_file, "final_curvature": run.final, "truth": run.truth,
                "diagnoses": [d.to_dict() for d in run.diagnoses],
            }
            for run in result.runs
        ],
    }


def run(args: argparse.Namespace) -> int:
    """Run the chosen scenarios; 0 when every finding matches the known truth, 1 otherwise."""
    if getattr(args, "list", False):
        print(_list_scenarios())
        return 0
    name, option = getattr(args, "name", None), getattr(args, "scenario", None)
    if name is not None and option is not None and name != option:
        raise UsageError(f"two scenarios asked for: {name!r} and --scenario {option!r}; give one")
    names = resolve_scenarios(option if option is not None else name)
    run_dir = new_run_dir(args.out)
    from optdiag.demo.runner import format_result, run_scenario
    from optdiag.demo.scenarios import scenario
    from optdiag.diagnosis.types import to_jsonable

    print(f"optdiag demo: {len(names)} scenario{'s' if len(names) != 1 else ''} ({', '.join(names)}) -> {run_dir}")
    started = time.perf_counter()
    results, records = [], []
    for name in names:
        print(f"\n-- {name}: {scenario(name).story}", flush=True)
        result = run_scenario(name, run_dir)
        results.append(result)
        records.append(_summary_record(result))
        print(format_result(result), flush=True)
        if not args.no_figures:
            from optdiag.demo.figures import figure_to_png, scenario_figure

            with open(os.path.join(run_dir, f"{name}.png"), "wb") as handle:
                handle.write(figure_to_png(scenario_figure(result), dpi=90))
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(to_jsonable(records), handle, indent=2, allow_nan=False)
    passed = sum(r.passed for r in results)
    print(f"\n{passed}/{len(results)} scenarios as expected in {time.perf_counter() - started:.0f} s. "
          f"Logs, events.jsonl and figures: {run_dir}\nTensorBoard: tensorboard --logdir {run_dir}")
    if passed < len(results):
        print("optdiag demo: some findings differ from the known truth (see the [!!] lines above)", file=sys.stderr)
        return 1
    return 0
