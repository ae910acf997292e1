"""Wall-time overhead of the optdiag callbacks at their defaults on CPU Lightning runs, side by side.

Trains an MLP and a small CNN on scikit-learn's bundled 8x8 digits (nothing is downloaded) for a few epochs, with
no callback, with ``GradientNormMonitor()``, with ``HessianMonitor()`` and with the ``OptDiag()`` bundle, all at
their defaults. Each round runs every configuration once, in a rotated order (interleaved, so that drifting load
on a shared machine hits all of them alike); the tables report medians over rounds. The process is pinned to one
core with one torch thread. The goal (docs/index.md, design rule "Pay for what you measure"): a wall-time ratio <= 1.05.

Two ratios are printed: the ratio of the median wall times, and the median of the per-round ratios (each monitored
run over the baseline run of the same round: robust to slow drifts of the machine's load). The per-step cost less
Hessian seconds is the median over rounds of (run - its curvature seconds - the round's baseline) / steps: the
per-step work (gradient statistics, the stall test, hook calls) without the snapshots, which the budget governs.

    python benchmarks/bench_overhead.py                    # both models, 20 epochs, 5 rounds
    python benchmarks/bench_overhead.py --models mlp --epochs 100 --rounds 3   # long enough for scheduled snapshots
    python benchmarks/bench_overhead.py --models wide-cnn --epochs 5 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optdiag.callbacks.bundle import OptDiag
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.demo.runner import quiet_lightning


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy on the digits with SGD + momentum; ``net`` is the MLP or the CNN."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def wide_cnn() -> nn.Module:
    """The CNN with 4x the channels: a step costs ~10x more, so per-step fixed costs weigh less."""
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn, "wide-cnn": wide_cnn}
CONFIGS: dict[str, Callable[[], list]] = {
    "none": lambda: [],
    "GradientNormMonitor": lambda: [GradientNormMonitor()],
    "HessianMonitor": lambda: [HessianMonitor()],
    "OptDiag": lambda: [OptDiag(verbose=False)],
}


def digits_loader(batch_size: int) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(images, torch.tensor(y)), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    snapshots: list[int] = field(default_factory=list)  # curvature snapshots (scheduled + stall) per run
    hessian_seconds: list[float] = field(default_factory=list)
    verdicts: list[int] = field(default_factory=list)


def run_once(model: str, config: str, epochs: int, batch_size: int, root: str) -> tuple[float, list]:
    pl.seed_everything(0, verbose=False)
    callbacks = CONFIGS[config]()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
                         default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=50)
    module, loader = DigitsClassifier(MODELS[model]()), digits_loader(batch_size)
    started = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - started, callbacks


def record(runs: Runs, seconds: float, callbacks: list) -> None:
    runs.seconds.append(seconds)
    for cb in callbacks:
        hessian = getattr(cb, "hessian_monitor", cb)
        if isinstance(hessian, HessianMonitor):
            runs.snapshots.append(len(hessian.history))
            runs.hessian_seconds.append(hessian.monitor_seconds)
        if isinstance(cb, OptDiag):
            runs.verdicts.append(len(cb.diagnoses))


def measure(model: str, epochs: int, batch_size: int, rounds: int, root: str) -> dict[str, Runs]:
    results = {name: Runs() for name in CONFIGS}
    names = list(CONFIGS)
    run_once(model, names[-1], 1, batch_size, root)  # warm-up: imports, allocator, first-call costs
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            seconds, callbacks = run_once(model, name, epochs, batch_size, root)
            record(results[name], seconds, callbacks)
    return results


def table(model: str, results: dict[str, Runs], steps: int, params: int) -> str:
    base = results["none"].seconds
    lines = [f"**{model}** ({params:,} parameters, {steps} optimizer steps per run)", "",
             "| callbacks | median wall (s) | ratio of medians | median of per-round ratios | per-step cost (ms) "
             "| per-step cost less Hessian seconds (ms) | Hessian snapshots | Hessian seconds | verdicts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        med = statistics.median(runs.seconds)
        ratio = med / statistics.median(base)
        paired = statistics.median(s / b for s, b in zip(runs.seconds, base))
        per_step = 1e3 * (med - statistics.median(base)) / steps
        # the per-step work alone: each run's wall time less its curvature seconds, against the paired baseline
        hessian_free = [s - h for s, h in zip(runs.seconds, runs.hessian_seconds)] or runs.seconds
        per_step_rest = 1e3 * statistics.median(r - b for r, b in zip(hessian_free, base)) / steps
        snaps = "/".join(str(n) for n in runs.snapshots) or "-"
        hess = "/".join(f"{s:.2f}" for s in runs.hessian_seconds) or "-"
        verdicts = "/".join(str(n) for n in runs.verdicts) or "-"
        lines.append(f"| {name} | {med:.2f} | {ratio:.3f} | {paired:.3f} | {per_step:+.2f} | {per_step_rest:+.3f} "
                     f"| {snaps} | {hess} | {verdicts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--root", default=None, help="Trainer default_root_dir (default: a temporary folder)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core: less interference
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import tempfile

    loader = digits_loader(args.batch_size)
    steps = args.epochs * len(loader)
    print(f"torch {torch.__version__}, 1 thread pinned to one core, {args.epochs} epochs x {len(loader)} steps "
          f"(batch {args.batch_size}), {args.rounds} interleaved rounds, medians\n")
    with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
        for model in args.models:
            params = sum(p.numel() for p in MODELS[model]().parameters())
            results = measure(model, args.epochs, args.batch_size, args.rounds, args.root or tmp)
            print(table(model, results, steps, params), "\n", flush=True)


if __name__ == "__main__":
    main()
