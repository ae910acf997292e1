"""Importable models, data and losses for the checkpoint-analysis tests and the ``optdiag analyze`` CLI tests.

The CLI names these as ``tests.fixtures_analysis:LinearNet``, ``tests.fixtures_analysis:make_loader`` and so on.

The data are built so the Hessians are known exactly: inputs ``x`` with second moment ``E[x x^T] = diag(scales)``
(whitened when the scales are all 1) and targets ``y = A x``; the loss is ``0.5 * E|y - f(x)|^2``.

* One linear layer (``hidden=0``): the Hessian is ``diag(scales)`` repeated for every output, whatever the weights,
  and the minimum sits at ``W = A`` (local minimum, eigenvalues = the scales).
* Two linear layers ``W2 W1`` at the origin with whitened inputs: gradient 0 and Hessian eigenvalues
  ``+- sigma_i(A)`` (docs/theory.md section 3), a saddle point.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES = 12
D_IN = 3
D_OUT = 2
# The target map; its singular values are 3 and 1 (A = U diag(3, 1) V^T with orthonormal U, V).
TARGET_MAP = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0]])
TARGET_SINGULAR_VALUES = (3.0, 1.0)


def make_dataset(scales: tuple[float, ...] = (1.0, 1.0, 1.0)) -> TensorDataset:
    """Inputs with ``X^T X / n = diag(scales)`` exactly, and targets ``A x``."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N_SAMPLES, D_IN, generator=generator))
    x = q * (N_SAMPLES**0.5) * torch.tensor(scales).sqrt()
    return TensorDataset(x, x @ TARGET_MAP.T)


def half_squared_error(model: nn.Module, batch) -> torch.Tensor:
    """``0.5 * mean over samples of |y - f(x)|^2`` (a ``loss_fn(model, batch)`` for ``--loss``)."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()


class LinearNet(pl.LightningModule):
    """``y = W x`` (``hidden=0``) or ``y = W2 W1 x``, no biases, with its own data and training step."""

    def __init__(self, hidden: int = 0, lr: float = 0.05, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        if hidden:
            self.net = nn.Sequential(nn.Linear(D_IN, hidden, bias=False), nn.Linear(hidden, D_OUT, bias=False))
        else:
            self.net = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = half_squared_error(self, batch)
        self.log("train_loss", loss)  # outside a Trainer this only warns; the analysis must cope
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(), batch_size=self.hparams.batch_size, shuffle=False)


class NoDataNet(pl.LightningModule):
    """A module without a ``train_dataloader``: the analysis needs ``--data``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return half_squared_error(self, batch)


class PlainNet(nn.Module):
    """A plain ``nn.Module`` (for state-dict files); needs ``--loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))

    def forward(self, x):
        return self.net(x)


def make_plain_net() -> nn.Module:
    """A factory for ``--model``."""
    return PlainNet()


def make_loader() -> DataLoader:
    """A ``--data`` callable returning a DataLoader of 3 batches of 4."""
    return DataLoader(make_dataset(), batch_size=4, shuffle=False)


def make_uneven_loader() -> DataLoader:
    """Batches of 5, 5 and 2 samples: means over the data must weight them by size."""
    return DataLoader(make_dataset(), batch_size=5, shuffle=False)


class TinyDataModule(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.dataset = None

    def setup(self, stage: str) -> None:
        self.dataset = make_dataset()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=6)


def make_datamodule() -> pl.LightningDataModule:
    """A ``--data`` callable returning a LightningDataModule."""
    return TinyDataModule()


def raising_data():
    raise RuntimeError("the dataset server is down")


def empty_data() -> list:
    return []


def not_data() -> int:
    return 42


def not_a_callable_loss(x):
    """A ``--loss`` whose signature is wrong (one argument)."""
    return x


def target_weights() -> dict[str, torch.Tensor]:
    """The single-layer net's weights at its minimum ``W = A``."""
    return {"net.0.weight": TARGET_MAP.clone()}


def write_lightning_checkpoint(path, hidden: int = 0, weights: dict[str, torch.Tensor] | None = None,
                               steps: int = 1) -> str:
    """Train ``LinearNet(hidden)`` for ``steps`` steps with a real Trainer and save a real ``.ckpt``, after
    replacing the weights by ``weights`` when given (so the point is known exactly)."""
    module = LinearNet(hidden=hidden)
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(path) + ".trainer",
    )
    trainer.fit(module)
    if weights is not None:
        with torch.no_grad():
            for name, value in weights.items():
                module.get_parameter(name).copy_(value)
    trainer.save_checkpoint(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# A BatchNorm net whose train-mode and eval-mode losses differ


class _HalfSquaredErrorSGD(pl.LightningModule):
    """``self.net`` trained on the half squared error with plain SGD at ``hparams.lr`` (the fixtures' modules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return half_squared_error(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class BatchNormNet(_HalfSquaredErrorSGD):
    """``Linear -> BatchNorm1d -> Dropout -> Linear``: train mode (batch statistics) and eval mode (running
    statistics) compute different functions; dropout makes the train-mode loss random unless it is switched off."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(D_IN, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, D_OUT))

    def train_dataloader(self) -> DataLoader:
        return make_loader()


def write_batchnorm_checkpoint(path, steps: int = 3) -> str:
    """Train :class:`BatchNormNet` for ``steps`` steps with a real Trainer and save it after setting its running
    statistics far from any batch's (mean 2, variance 0.05), as early in training or after a batch-size change."""
    torch.manual_seed(0)
    module = BatchNormNet()
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(path) + ".trainer",
    )
    trainer.fit(module)
    with torch.no_grad():
        module.net[1].running_mean.fill_(2.0)
        module.net[1].running_var.fill_(0.05)
    trainer.save_checkpoint(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# A real run that descends and then converges: full-batch gradient descent on noisy linear regression


N_NOISY = 64


def make_noisy_dataset() -> TensorDataset:
    """Whitened inputs (``X^T X / n = I``, so the Hessian of the half squared error is the identity and gradient
    descent at ``lr`` shrinks the distance to the least-squares solution by ``1 - lr`` per step) and targets
    ``A x`` plus noise, so the loss at the minimum is well above 0."""
    generator = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(N_NOISY, D_IN, generator=generator))
    x = q * N_NOISY**0.5
    return TensorDataset(x, x @ TARGET_MAP.T + torch.randn(N_NOISY, D_OUT, generator=generator))


def make_noisy_loader() -> DataLoader:
    """The whole noisy dataset as one batch (the run is full-batch gradient descent)."""
    return DataLoader(make_noisy_dataset(), batch_size=N_NOISY, shuffle=False)


class NoisyRegression(_HalfSquaredErrorSGD):
    """``y = W x + b`` trained by full-batch gradient descent on :func:`make_noisy_dataset`."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))

    def train_dataloader(self) -> DataLoader:
        return make_noisy_loader()


class SaveAtSteps(pl.Callback):
    """Save a checkpoint ``step=<n>.ckpt`` before training (step 0) and after each optimizer step in ``steps``."""

    def __init__(self, folder, steps) -> None:
        self.folder, self.steps, self.paths = folder, set(steps), []

    def _save(self, trainer) -> None:
        path = str(self.folder / f"step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        self.paths.append(path)

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 in self.steps:
            self._save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self._save(trainer)


def write_noisy_run(folder, steps=(0, 1, 2, 4, 30, 40, 50)) -> list[str]:
    """Train :class:`NoisyRegression` with a real Trainer and save checkpoints at ``steps``; their paths."""
    torch.manual_seed(0)
    module = NoisyRegression()
    saver = SaveAtSteps(folder, steps)
    trainer = pl.Trainer(
        max_steps=max(steps), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(folder / "trainer"),
        callbacks=[saver],
    )
    trainer.fit(module)
    return saver.paths


def make_one_sample_loader() -> DataLoader:
    """The 12 samples one at a time: batches of one sample cannot be split, so no gradient noise is measured."""
    return DataLoader(make_dataset(), batch_size=1, shuffle=False)


# ---------------------------------------------------------------------------------------------------------------
# The unified ``lightning`` package's LightningModule (a different class from pytorch_lightning's)


def _unified_module_class():
    import lightning.pytorch as lp

    class UnifiedNet(lp.LightningModule):
        """``y = W x`` as a ``lightning.pytorch`` module: analyze must take its loss and data like any other."""

        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return half_squared_error(self, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

        def train_dataloader(self) -> DataLoader:
            return make_loader()

    return UnifiedNet


UnifiedNet = _unified_module_class()


def write_unified_checkpoint(path, steps: int = 3) -> str:
    """Train :class:`UnifiedNet` with a ``lightning.pytorch`` Trainer and save a Lightning checkpoint."""
    import lightning.pytorch as lp

    torch.manual_seed(0)
    module = UnifiedNet()
    trainer = lp.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=str(path) + ".trainer")
    trainer.fit(module)
    trainer.save_checkpoint(str(path))
    return str(path)
