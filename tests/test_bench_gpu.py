"""The prepared GPU benchmark (benchmarks/bench_gpu.py) runs to the end: a lent GPU machine gets one short call, so
the script must not fail there for a reason a CPU run would have shown. Its small mode on the CPU, as a subprocess
(the way it is run), with its JSON checked against what the tables claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_gpu.py")


@pytest.mark.slow
def test_the_prepared_gpu_benchmark_runs_on_a_cpu_in_its_small_mode(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, _SCRIPT, "--small", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["small"] and report["device"] == "CPU"
    assert [r["model"] for r in report["hvp"]] == ["ResNet-18", "transformer"]
    for row in report["hvp"]:
        assert row["gradient_s"] > 0 and row["hvp_s"] > 0 and row["engine"] in ("graph", "recompute", "func",
                                                                                   "linearize", "finite_difference")
    assert [(r["model"], r["k"]) for r in report["top_k"]] == [("ResNet-18", 1), ("ResNet-18", 5),
                                                               ("transformer", 1), ("transformer", 5)]
    for row in report["top_k"]:
        values = row["eigenvalues"]
        assert len(values) == row["k"] and values == sorted(values, reverse=True) and row["n_hvp"] > 0
    # the top eigenvalue of the k=5 solve is the k=1 one (same operator, tol 1e-3)
    for model in ("ResNet-18", "transformer"):
        one, five = (r["eigenvalues"] for r in report["top_k"] if r["model"] == model)
        assert abs(five[0] - one[0]) <= 2e-3 * abs(one[0])
    training = report["training"]
    assert training["none_s"] > 0 and training["optdiag_s"] > 0 and training["rounds"] == 2
    assert "| model | parameters | HVP engine |" in done.stdout and "ResNet-18 training" in done.stdout
    # the synchronisation count exists on CUDA only: on the CPU its runs go through and the report says so
    sync = report["synchronisations"]
    assert sync["counted"] is False and sync["steps"] == 10
    assert set(sync["OptDiag"]) == {"all", "optdiag", "optdiag_lines"}
    assert "device synchronisations: not counted (CUDA only)" in done.stdout
