"""Two-process DDP run on CPU (gloo) with both monitors (the Hessian one at a fixed cadence and adaptive); each rank saves what it saw to OUT/rank<r>.pt.

Run as ``python ddp_monitors.py OUT``; Lightning re-launches it for rank 1 with the same arguments.
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lightning_models import regression_data, stop_after  # noqa: E402

from optdiag.callbacks.gradient_norm import GradientNormMonitor  # noqa: E402
from optdiag.callbacks.hessian import HessianMonitor  # noqa: E402


class LinearRegression(pl.LightningModule):
    """MSE of a linear model: the Hessian 2 [X 1]^T [X 1] / n does not depend on the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.lin(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class RecordingLogger(pl.loggers.Logger):
    """Counts every optdiag metric a rank tries to write (not rank-zero-only on purpose)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out, self.calls = out, 0

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("optdiag/") for k in metrics):
            self.calls += 1


def main(out: str) -> None:
    pl.seed_everything(0)
    data = regression_data(n=128, in_features=4, seed=1)
    loader = DataLoader(data, batch_size=16, shuffle=False)
    hessian = HessianMonitor(every_n_steps=2, probe_batches=2, tol=1e-6, max_hvp=15, trace_hvp=15)
    adaptive = HessianMonitor(budget=1.0, probe_batches=1, trace_hvp=0)  # the bucket and schedule: rank 0's clock
    gradient = GradientNormMonitor()
    logger = RecordingLogger(out)
    trainer = pl.Trainer(
        # planned long and ended after 4 steps: the adaptive monitor is lent its first estimate (a 4-step plan is not)
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1000,
        callbacks=[hessian, adaptive, gradient, stop_after(4)],
        logger=logger,
        default_root_dir=out,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    trainer.fit(LinearRegression(), loader)
    rank = trainer.global_rank
    # a stall snapshot's go-ahead is rank 0's: rank 1, deep in debt on its own clock, must still get rank 0's yes
    adaptive._tokens = adaptive.capacity() if rank == 0 else -1e9
    affordable = adaptive.can_afford_snapshot(trainer)
    save_and_finish(
        {
            "history": hessian.history,
            "adaptive_steps": [h["step"] for h in adaptive.history],
            "adaptive_estimate": adaptive.estimated_seconds,
            "affordable": affordable,
            "probe": hessian._probe_set,
            "grad_norms": [h["grad_norm"] for h in gradient.history],
            "logger_calls": logger.calls,
            "world_size": trainer.world_size,
        },
        out, rank,
    )


def save_and_finish(record: dict, out: str, rank: int, name: str = "rank") -> None:
    """What every multi-process script ends with: this rank's record saved for the test (``<name><rank>.pt``), the
    process group destroyed (gloo can abort at exit otherwise), and a line saying this rank is done."""
    torch.save(record, os.path.join(out, f"{name}{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()
    print(json.dumps({"rank": rank, "done": True}))


if __name__ == "__main__":
    main(sys.argv[1])
