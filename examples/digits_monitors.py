"""Train an MLP on scikit-learn's bundled digits with optdiag's monitors and TensorBoard.

    python examples/digits_monitors.py --out runs/digits --steps 600
    tensorboard --logdir runs/digits      # Custom Scalars tab: the optdiag panels

Nothing is downloaded: ``load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import optdiag


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def digits_loader(batch_size: int = 32) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(data, batch_size=batch_size, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=50, help="Hessian snapshot every N steps (0: adaptive budget)")
    args = parser.parse_args()

    pl.seed_everything(0)
    hessian = optdiag.HessianMonitor(every_n_steps=args.every or None, density_every=4)
    gradient = optdiag.GradientNormMonitor(histogram_every_n_steps=100)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", callbacks=[gradient, hessian], log_every_n_steps=10,
        logger=pl.loggers.TensorBoardLogger(args.out, name="digits"), enable_checkpointing=False,
    )
    trainer.fit(DigitsMLP(lr=args.lr), digits_loader())

    print(f"{'step':>6} {'lambda_max':>11} {'lambda_min':>11} {'threshold':>10} {'ratio':>7} {'trace':>9}")
    for h in hessian.history:
        print(f"{h['step']:>6} {h['lambda_max']:>11.4g} {h['lambda_min']:>11.4g} {h['stability_threshold']:>10.4g} "
              f"{h['stability_ratio']:>7.3f} {h['hessian_trace']:>9.4g}")
    print(f"last gradient norm {gradient.latest['grad_norm']:.4g}, update ratio {gradient.latest['update_ratio']:.3g}")
    print(f"TensorBoard logs in {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
