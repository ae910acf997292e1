"""Wall-time overhead of GradientNormMonitor + HessianMonitor at their defaults on a CPU Lightning run.

Trains the same MLP on scikit-learn's bundled digits (no download) with and without the monitors, alternating
the order, and prints the ratio of median wall times. Goal: <= 1.05 (HessianMonitor's default budget is 5%).

    python benchmarks/bench_overhead.py --steps 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor


class DigitsMLP(pl.LightningModule):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digits_loader(batch_size: int) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def run(steps: int, batch_size: int, monitors: bool) -> tuple[float, dict]:
    pl.seed_everything(0, verbose=False)
    callbacks = [GradientNormMonitor(), HessianMonitor()] if monitors else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.fit(DigitsMLP(), digits_loader(batch_size))
    seconds = time.perf_counter() - started
    info = {"cpu_seconds": time.process_time() - cpu_started}
    if monitors:
        info.update(snapshots=len(callbacks[1].history), hessian_seconds=callbacks[1].monitor_seconds)
    return seconds, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, monitored, infos, cpu = [], [], [], {False: [], True: []}
    for i in range(args.repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for monitors in order:
            seconds, info = run(args.steps, args.batch_size, monitors)
            (monitored if monitors else base).append(seconds)
            cpu[monitors].append(info["cpu_seconds"])
            if monitors:
                infos.append(info)
    ratio = statistics.median(monitored) / statistics.median(base)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, batch {args.batch_size}")
    print(f"without monitors: median {statistics.median(base):.2f} s  {[round(s, 2) for s in base]}")
    print(f"with monitors:    median {statistics.median(monitored):.2f} s  {[round(s, 2) for s in monitored]}")
    print(f"Hessian snapshots per run: {[i['snapshots'] for i in infos]}, "
          f"Hessian seconds: {[round(i['hessian_seconds'], 2) for i in infos]}")
    print(f"overhead ratio (wall): {ratio:.3f} (goal <= 1.05)")
    # process CPU time is less disturbed by other load on a shared machine
    print(f"overhead ratio (process CPU time): {statistics.median(cpu[True]) / statistics.median(cpu[False]):.3f}")


if __name__ == "__main__":
    main()
