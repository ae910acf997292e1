"""Small LightningModules, data and Trainer factories for callback tests (either Lightning namespace).

A LightningModule must come from the same package as the Trainer that runs it, so the classes are built per
namespace by :func:`models_for`; the module-level names are the ``pytorch_lightning`` ones.

Example:
    >>> m = models_for("lightning.pytorch")
    >>> trainer = make_trainer(tmp_path, namespace="lightning.pytorch", max_steps=3)  # doctest: +SKIP
    >>> trainer.fit(m.RegressionModule(), m.RegressionDataModule())  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def regression_data(n: int = 256, in_features: int = 8, out_features: int = 1, seed: int = 0) -> TensorDataset:
    """A noisy random linear regression problem, generated (no download), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    w = torch.randn(in_features, out_features, generator=gen)
    y = x @ w + 0.1 * torch.randn(n, out_features, generator=gen)
    return TensorDataset(x, y)


class _NoDoubleBackward(torch.autograd.Function):
    """``tanh`` whose backward is not differentiable: a model built on it has gradients but no HVPs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class NoDoubleBackwardTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoDoubleBackward.apply(x)


def build_mlp(
    in_features: int = 8,
    hidden: int = 16,
    out_features: int = 1,
    *,
    dropout: float = 0.0,
    batchnorm: bool = False,
    activation: str = "tanh",
) -> nn.Sequential:
    """``Linear -> [BatchNorm] -> act -> [Dropout] -> Linear``; ``activation="no_double_backward"`` breaks HVPs."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "no_double_backward": NoDoubleBackwardTanh}[activation]
    layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(act())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_features))
    return nn.Sequential(*layers)


def make_optimizer(params: Any, name: str, lr: float, momentum: float = 0.0, nesterov: bool = False):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


@functools.lru_cache(maxsize=None)
def models_for(namespace: str = "pytorch_lightning") -> SimpleNamespace:
    """The test modules built on ``namespace`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``)."""
    L = importlib.import_module(namespace)

    class RegressionModule(L.LightningModule):
        """MLP regression with MSE; every knob the do-no-harm tests need.

        ``optdiag_loss`` is deliberately absent, so HessianMonitor's default path (``training_step`` with
        ``self.log`` silenced) is what runs; ``training_step`` logs ``train_loss`` like user code does.
        """

        def __init__(
            self,
            optimizer: str = "sgd",
            lr: float = 0.05,
            momentum: float = 0.0,
            nesterov: bool = False,
            dropout: float = 0.0,
            batchnorm: bool = False,
            activation: str = "tanh",
            in_features: int = 8,
            hidden: int = 16,
            return_dict: bool = False,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = build_mlp(in_features, hidden, 1, dropout=dropout, batchnorm=batchnorm, activation=activation)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss)
            return {"loss": loss} if self.hparams.return_dict else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            h = self.hparams
            return make_optimizer(self.parameters(), h.optimizer, h.lr, h.momentum, h.nesterov)

    class ManualRegressionModule(RegressionModule):
        """The same model trained with manual optimization (``automatic_optimization = False``)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.log("train_loss", loss)
            return loss

    class RegressionDataModule(L.LightningDataModule):
        def __init__(self, n: int = 256, in_features: int = 8, batch_size: int = 32, seed: int = 0) -> None:
            super().__init__()
            self.n, self.in_features, self.batch_size, self.seed = n, in_features, batch_size, seed

        def setup(self, stage: str) -> None:
            self.dataset = regression_data(self.n, self.in_features, 1, self.seed)

        def train_dataloader(self) -> DataLoader:
            # shuffle with a generator: the sampler's RNG is part of what the monitors must not disturb
            return DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(self.seed),
            )

    return SimpleNamespace(
        L=L,
        RegressionModule=RegressionModule,
        ManualRegressionModule=ManualRegressionModule,
        RegressionDataModule=RegressionDataModule,
    )


def stop_after(step: int, namespace: str = "pytorch_lightning") -> Any:
    """A callback that ends the fit after ``step`` optimizer steps, as early stopping ends a fit planned to be longer.

    HessianMonitor lends its first estimate only to a fit whose planned length pays for it at its budget
    (docs/callbacks/hessian-monitor.md); tests of what happens with that estimate plan a long fit and end it early.
    """

    class StopAfter(models_for(namespace).L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= step:
                trainer.should_stop = True

    return StopAfter()


def make_trainer(tmp_path: Any, callbacks: list | None = None, *, namespace: str = "pytorch_lightning", **kwargs: Any):
    """A quiet CPU Trainer logging CSV to ``tmp_path`` (pass ``logger=`` to override), no checkpoints by default.

    ``default_root_dir`` is ``tmp_path`` too: without a logger, files (checkpoints, ``optdiag/events.jsonl``) would
    otherwise land in the current working directory.
    """
    L = models_for(namespace).L
    options: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=L.loggers.CSVLogger(str(tmp_path), name="csv"),
        log_every_n_steps=1,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks or []), **options)


RegressionModule = models_for().RegressionModule
ManualRegressionModule = models_for().ManualRegressionModule
RegressionDataModule = models_for().RegressionDataModule
