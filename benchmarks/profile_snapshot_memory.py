"""Where a curvature snapshot's memory goes: resident memory at each part of an ``OptDiag()`` ResNet-18 run.

Runs benchmarks/bench_overhead.py's ResNet-18 (generated 3x32x32 images, batch 16, SGD momentum 0.9) for a few
steps with ``OptDiag()`` (or ``--config none``), and records the process's resident memory (``/proc/self/statm``,
every 2 ms, and at the entry and exit of each part) while the Hessian monitor builds its probe operators, takes the
gradient quantities, the critical sharpness, each eigenvalue solve, the trace and the density. Figures are
multiples of the parameters' bytes above the resident memory before ``fit``.

    nice python benchmarks/profile_snapshot_memory.py --steps 4                  # the first estimate, at step 2
    nice python benchmarks/profile_snapshot_memory.py --steps 4 --config none    # the same run without optdiag
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_overhead  # noqa: E402

import optdiag.callbacks.hessian as hessian_module  # noqa: E402


class Recorder:
    """Peak resident memory per labelled part (sampled), and the level at each part's entry and exit."""

    def __init__(self) -> None:
        self.part, self.peaks, self.events = "training", {}, []
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            value, part = self.rss(), self.part
            if value > self.peaks.get(part, 0):
                self.peaks[part] = value

    def start(self) -> None:
        threading.Thread(target=self._sample, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def labelled(self, name: Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer, self.part = self.part, name(*args, **kwargs)
            self.events.append((self.part, "in", self.rss(), ""))
            try:
                result = function(*args, **kwargs)
                extra = f"{result.n_hvp} products, {result.basis_rows} basis rows" if hasattr(result, "basis_rows") \
                    else ""
                self.events.append((self.part, "out", self.rss(), extra))
                return result
            finally:
                self.part = outer

        return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--config", default="OptDiag", choices=["OptDiag", "none"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    recorder = Recorder()
    for function in ("top_eigenvalues", "hessian_trace", "spectral_density", "make_hessian_operator"):
        original = getattr(hessian_module, function)
        label = (lambda *a, _f=function, **k: f"{_f} {k.get('which', '')}".strip())
        setattr(hessian_module, function, recorder.labelled(label, original))
    for method in ("_gradient_quantities", "_critical", "_stability", "_snapshot"):
        original = getattr(hessian_module.HessianMonitor, method)
        label = (lambda *a, _m=method, **k: "snapshot (the rest)" if _m == "_snapshot" else _m)
        setattr(hessian_module.HessianMonitor, method, recorder.labelled(label, original))

    param_bytes = sum(p.numel() * p.element_size() for p in bench_overhead.resnet18().parameters())
    with tempfile.TemporaryDirectory() as root:
        before = recorder.rss()
        recorder.start()
        seconds, _, extra = bench_overhead.run_once("resnet18", args.config, 1, 16, root, steps=args.steps)
    recorder.stop()
    print(f"{args.config}, {args.steps} steps, {seconds:.0f} s: peak {extra / param_bytes:.1f}x the parameters' "
          f"bytes above the start of fit\n")
    print("| part | peak (x parameters' bytes above the memory before fit) |\n|---|---|")
    for part, value in recorder.peaks.items():
        print(f"| {part} | {(value - before) / param_bytes:.1f} |")
    print("\n| part | entry/exit | level | result |\n|---|---|---|---|")
    for part, event, value, extra_text in recorder.events:
        print(f"| {part} | {event} | {(value - before) / param_bytes:.1f} | {extra_text} |")


if __name__ == "__main__":
    main()
