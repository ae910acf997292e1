"""Peak memory and time of ``optdiag analyze`` on a ResNet-18 checkpoint, stage by stage.

Saves the ResNet-18 of benchmarks/bench_memory.py (11,181,642 parameters, 44.7 MB) as a plain ``state_dict``
checkpoint, then runs :func:`optdiag.analyze_checkpoint` on it at its defaults (4 analysis batches) over generated
3x32x32 images (batches of ``--batch``, ``--batches`` of them), in this process. The resident memory is sampled
every 5 ms from ``/proc/self/statm`` (torch's allocations are invisible to tracemalloc); each analysis stage is
timed and its peak recorded, against the resident memory after the model was loaded and one forward+backward ran
(what any user of the model already pays). The goal (docs/performance.md): at most 30x the parameters' bytes.

    nice python benchmarks/bench_analyze.py                 # defaults: 4 batches of 64 (minutes on 2 cores)
    nice python benchmarks/bench_analyze.py --batch 16 --set density_steps=40   # an AnalysisSettings field
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import threading
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import ResNet18  # noqa: E402

from optdiag.analysis import analyze as analyze_module  # noqa: E402


class Sampler:
    """The process's resident memory every ``interval`` seconds, with the peak per named stage."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.stage = interval, "start"
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def enter(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self._since
        self.stage, self._since = stage, now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self.rss()
            if value > self.peaks.get(self.stage, 0):
                self.peaks[self.stage] = value

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.enter("end")
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="batches in the data (the loss pass reads them all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an AnalysisSettings field (a Python literal), e.g. density_steps=20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {}
    for item in args.set:
        key, value = item.split("=", 1)
        options[key] = ast.literal_eval(value)

    torch.manual_seed(0)
    model = ResNet18()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches
    labels = torch.randint(10, (n,), generator=g)
    images = 0.5 * torch.randn(10, 3, 32, 32, generator=g)[labels] + torch.randn(n, 3, 32, 32, generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch)

    sampler = Sampler()
    stage = analyze_module._Progress.stage

    def tracked(self: object, name: str) -> None:
        sampler.enter(name)
        stage(self, name)

    analyze_module._Progress.stage = tracked  # the analysis names its stages; the sampler follows them
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet18.pt")
        torch.save(model.state_dict(), path)
        nn.CrossEntropyLoss()(model(images[: args.batch]), labels[: args.batch]).backward()
        model.zero_grad(set_to_none=True)
        with sampler:
            base = sampler.rss()
            started = time.perf_counter()
            sampler.enter("load + loss pass")
            report = analyze_module.analyze_checkpoint(path, model=ResNet18, data=loader, loss=nn.CrossEntropyLoss(),
                                                       **options)
            seconds = time.perf_counter() - started
    result = report[0]
    peak = max(sampler.peaks.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-18 {param_bytes / 1e6:.1f} MB of "
          f"parameters, {args.batches} batches of {args.batch} 3x32x32 images, settings {options or 'defaults'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"analyze: {seconds:.0f} s, peak resident memory {(peak - base) / 1e9:.2f} GB above the loaded model "
          f"after a forward+backward = {(peak - base) / param_bytes:.1f}x the parameters' bytes")
    print(f"lambda_max {result.lambda_max:.4g}, lambda_min {result.lambda_min:.4g}, verdict "
          f"{result.point_type}\n")
    print("| stage | seconds | peak above the base (GB) | x parameters' bytes |")
    print("|---|---|---|---|")
    for name, value in sampler.peaks.items():
        print(f"| {name} | {sampler.seconds.get(name, 0.0):.1f} | {(value - base) / 1e9:.2f} "
              f"| {(value - base) / param_bytes:.1f} |")


if __name__ == "__main__":
    main()
