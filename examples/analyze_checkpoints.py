"""Analyse the checkpoints of a short training run after the fact.

A small tanh network learns a synthetic regression with full-batch SGD; Lightning saves a checkpoint every few steps.
``optdiag.analyze_checkpoint`` then measures the curvature at each one, says what kind of point it is, draws the
loss landscape and writes ``report.html`` and ``report.json``. The same analysis from the shell::

    optdiag analyze runs/ckpts/*.ckpt --model examples.analyze_checkpoints:Regressor --out runs/report

Run it from the repository root: ``python examples/analyze_checkpoints.py [OUT_DIR]`` (about a minute on a laptop CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optdiag


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = torch.sin(x @ torch.tensor([[1.5], [-1.0], [0.5], [2.0]])) + 0.05 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


class Regressor(pl.LightningModule):
    """A 4-16-16-1 tanh network; its hyper-parameters are saved in every checkpoint."""

    def __init__(self, hidden: int = 16, lr: float = 0.2, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_size=self.hparams.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(1))


def train(folder: Path, steps: int = 600, every: int = 200) -> list[Path]:
    """Train and return the checkpoints, oldest first."""
    pl.seed_everything(0, verbose=False)
    saver = ModelCheckpoint(dirpath=folder, filename="step={step}", every_n_train_steps=every, save_top_k=-1,
                            auto_insert_metric_name=False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[saver], logger=False, enable_model_summary=False,
                         enable_progress_bar=False, accelerator="cpu", devices=1, default_root_dir=folder)
    trainer.fit(Regressor())
    return sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def main(out: str = "runs/example") -> None:
    out_dir = Path(out)
    checkpoints = train(out_dir / "ckpts")
    report = optdiag.analyze_checkpoint(checkpoints, model=Regressor, max_batches=4, progress=True)
    print(report.summary())
    html_path, json_path = report.write(out_dir / "report")
    print(f"open {html_path} in a browser; the numbers are in {json_path}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
