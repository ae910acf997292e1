"""``optdiag demo`` prints no raw warnings: optdiag's become lines of its report, Lightning's harmless advice is
dropped, and only inside the demo runner (the caller's warning filters are untouched)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from optdiag.demo.runner import format_result, run_scenario

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_cli_writes_no_raw_warning_to_stderr(tmp_path):
    # the divergence scenario overflows: optdiag warns about the non-finite gradient norm, matplotlib would warn
    # about a legend without lines; real stderr, so a subprocess (pytest would swallow the warnings itself)
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning shown, as a user's shell would
    done = subprocess.run([sys.executable, "-m", "optdiag", "demo", "--scenario", "divergence", "--out",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode in (0, 1), done.stderr  # 1: a finding differs from the truth (said on stderr)
    assert "Warning" not in done.stderr and "warn" not in done.stderr.lower(), done.stderr
    assert all(line.startswith("optdiag demo: ") for line in done.stderr.splitlines()), done.stderr
    assert "    note: non-finite gradient norm at step " in done.stdout


def test_warnings_become_notes_and_the_filters_stay_the_callers(tmp_path):
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_scenario("divergence", str(tmp_path))
    assert [str(w.message) for w in caught] == []  # nothing escaped the runner
    assert warnings.filters == before
    (run,) = result.runs
    assert any(n.startswith("optdiag: non-finite gradient norm at step ") for n in run.notes), run.notes
    assert not any("workers" in n or "logging interval" in n for n in run.notes)  # Lightning's advice dropped
    text = format_result(result)
    assert "note: non-finite gradient norm at step" in text and "UserWarning" not in text
