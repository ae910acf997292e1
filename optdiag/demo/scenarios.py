"""Built-in training scenarios whose diagnosis is known before they run.

Each scenario is a small, deterministic PyTorch Lightning run on CPU, built so that the truth can be checked
independently of optdiag (from the data's own spectrum, a dense Hessian or the closed-form dynamics):

- ``saddle``: a 2-layer linear net ``y = W2 W1 x + k b`` on whitened inputs from a tiny init. The offset ``b`` is
  learnt in a few steps; then ``W = 0`` is a saddle whose Hessian eigenvalues are ``+-sigma_i`` of the target map
  (docs/theory.md section 3): the loss plateaus there, drops when the ``sigma_1`` mode is learnt, plateaus again at the
  next saddle (``lambda_min = -sigma_2``), then reaches a minimum.
- ``oscillation``: linear regression with one feature scaled x10, SGD (batch 64) at ``lr * lambda_max = 1.8``: the
  step bounces across the steep valley at a loss floor while the gradient stays large and consecutive gradients
  point against each other (section 1 and 4).
- ``minimum``: a well-conditioned noisy linear regression (convex) with a modest step; it converges to the least
  squares solution and stays there: every eigenvalue is positive and the true gradient is statistically zero.
- ``plateau``: the convex regression of ``minimum`` trained full-batch with ``lr`` ten thousand times too small:
  the loss creeps down, the gradient is as large as at the start, and ``lr * lambda_max`` is tiny.
- ``divergence``: the regression of ``oscillation`` at ``lr * lambda_max = 3 > 2``: the steep direction grows by
  ``|1 - 3| = 2`` per step until the loss overflows.
- ``edge_of_stability``: a tanh MLP, full-batch gradient descent with ``lr = 0.2``: ``lambda_max`` climbs to
  ``2 / lr = 10`` and hovers there while the loss keeps falling (Cohen et al. 2021). Not a stall.
- ``batch_size``: the same MLP and ``lr`` with batch 8 and with the full batch (128): the large batch ends in a
  sharper minimum (larger ``lambda_max`` and trace, close to ``2 / lr``); the small batch's noise keeps it flatter.

The triage scenarios have a validation loop, and their truth is a comparison that needs no optdiag:

- ``model_bias``: a linear classifier on points inside or outside a circle (no line separates them) stalls at a
  true minimum near ``ln 2``; an MLP on the same data (the second run) reaches a far lower training loss.
- ``overfitting``: a wide MLP on 50 digits (Adam): the training loss goes to ~0 while the validation loss on 500
  other digits passes its minimum and rises.

The input-side scenarios compare a run with the same run after the advice (docs/conditioning.md):

- ``unscaled_inputs``: a tanh MLP regression whose 8 features have standard deviations from 0.1 to 10; the same
  run on the standardized features (the second run) ends at a far lower loss at the same ``lr``.
- ``mse_softmax``: a softmax classifier started with saturated (large) logits and trained on the squared error of
  its probabilities sits on a plateau; the same run with cross-entropy on the logits leaves it.

Example:
    >>> from optdiag.demo.scenarios import SCENARIOS, scenario
    >>> sorted(SCENARIOS)[:3]
    ['batch_size', 'divergence', 'edge_of_stability']
    >>> runs = scenario("saddle").build()
    >>> runs[0].max_steps > 0
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from optdiag.errors import UsageError

__all__ = [
    "Scenario",
    "ScenarioRun",
    "TwoLayerLinear",
    "ScenarioModule",
    "StepBatches",
    "SCENARIOS",
    "DEFAULT_SCENARIOS",
    "scenario",
    "scenario_names",
    "half_squared_error",
    "whitened_linear_map_data",
    "scaled_regression_data",
    "wave_data",
    "regression_lambda_max",
    "ValidatedModule",
    "ring_data",
    "digits_data",
    "unscaled_regression_data",
    "blob_classes",
    "mse_on_softmax",
    "classifier_metrics",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- losses and data ---------------------------------------------------------------------------------------------
def half_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1/2 |prediction - target|^2`` summed over outputs, averaged over samples.

    With this normalisation the Hessian of a 2-layer linear net at ``W = 0`` on whitened inputs has eigenvalues
    exactly ``+-sigma_i`` of the target map (no factor 2 or 1/d_out).

    Example:
        >>> float(half_squared_error(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)))
        2.5
    """
    return 0.5 * (prediction - target).pow(2).sum(dim=-1).mean()


def whitened_linear_map_data(
    n: int = 64,
    in_features: int = 4,
    out_features: int = 3,
    sigmas: tuple[float, ...] = (3.0, 1.0),
    noise: float = 0.3,
    seed: int = 0,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred inputs with ``X^T X / n = I`` exactly, targets ``Y = X A^T + offset + Z``, ``A`` of singular values ``sigmas``.

    The columns of ``X`` are orthogonal to the constant vector (zero mean), so the offset and the map are learnt
    independently. The noise ``Z`` is projected out of the span of ``X`` and the constant vector, so the best affine
    fit is exactly ``(A, offset)`` and the loss at the minimum is ``1/2 |Z|^2 / n > 0``.

    Returns:
        ``(X, Y, A)`` in float32.
    """
    if n <= in_features:
        raise UsageError(f"whitened_linear_map_data needs n > in_features, got n={n}, in_features={in_features}")
    if len(sigmas) > min(in_features, out_features):
        raise UsageError(f"{len(sigmas)} singular values do not fit a {out_features}x{in_features} map")
    gen = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.ones(n, 1, dtype=torch.float64),
                       torch.randn(n, in_features, generator=gen, dtype=torch.float64)], dim=1)
    q, _ = torch.linalg.qr(basis)
    x = q[:, 1:] * math.sqrt(n)  # orthonormal columns, each orthogonal to the constant vector
    u, _ = torch.linalg.qr(torch.randn(out_features, len(sigmas), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(sigmas), generator=gen, dtype=torch.float64))
    a = u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T
    z = noise * torch.randn(n, out_features, generator=gen, dtype=torch.float64)
    z = z - q @ (q.T @ z)
    y = x @ a.T + z
    if offset is not None:
        y = y + offset.to(torch.float64)
    return x.float(), y.float(), a.float()


def scaled_regression_data(
    n: int = 512, in_features: int = 8, scale: float = 10.0, noise: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features with the first one multiplied by ``scale``; a noisy linear target of comparable size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    x[:, 0] *= scale
    w = torch.randn(in_features, 1, generator=gen)
    w[0] /= scale
    y = x @ w + noise * torch.randn(n, 1, generator=gen)
    return x, y


def wave_data(n: int = 128, in_features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth nonlinear regression target ``sin(x . w) + cos(2 x_0) / 2`` for the MLP scenarios."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    w = torch.randn(in_features, 1, generator=gen)
    y = torch.sin(x @ w) + 0.5 * torch.cos(2 * x[:, :1])
    return x, y


def regression_lambda_max(x: torch.Tensor) -> float:
    """Exact largest Hessian eigenvalue of the MSE of ``nn.Linear(d, 1)`` (weights and bias) on inputs ``x``.

    The loss is quadratic, so the Hessian is ``2 [x 1]^T [x 1] / n`` everywhere.

    Example:
        >>> round(regression_lambda_max(torch.tensor([[1.0], [-1.0]])), 6)
        2.0
    """
    design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return float(torch.linalg.eigvalsh(2.0 * design.T @ design / x.shape[0])[-1])


class StepBatches(Dataset):
    """One item per optimizer step: the full data set, or seeded minibatches drawn epoch by epoch.

    Used with ``DataLoader(..., batch_size=None)`` so that one Lightning epoch is the whole run and the batches
    are fixed in advance (deterministic, and independent of any global RNG).
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int | None = None, seed: int = 0
    ) -> None:
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        self.x, self.y, self.steps = x, y, int(steps)
        n = x.shape[0]
        self.batch_size = n if batch_size is None else int(batch_size)
        if not 1 <= self.batch_size <= n:
            raise UsageError(f"batch_size must be in [1, {n}], got {batch_size}")
        self.indices: torch.Tensor | None = None
        if self.batch_size < n:
            gen = torch.Generator().manual_seed(seed)
            per_epoch = n // self.batch_size
            epochs = -(-self.steps // per_epoch)
            perms = [torch.randperm(n, generator=gen)[: per_epoch * self.batch_size] for _ in range(epochs)]
            self.indices = torch.cat(perms).view(-1, self.batch_size)[: self.steps]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.indices is None:
            return self.x, self.y
        idx = self.indices[step]
        return self.x[idx], self.y[idx]


def ring_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian points in 2-d, labelled by whether they lie outside the circle of median radius (balanced classes).

    No line separates the classes: a linear classifier's best cross-entropy is about ``ln 2``.

    Example:
        >>> x, y = ring_data(8)
        >>> tuple(x.shape), y.dtype
        ((8, 2), torch.int64)
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    return x, (x.square().sum(dim=1) > 2.0 * math.log(2.0)).long()  # chi2(2) median: 2 ln 2


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (no download), pixels scaled to [0, 1], in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)[order]
    return x, torch.tensor(digits.target)[order]


# --- the LightningModule -----------------------------------------------------------------------------------------
class ScenarioModule(pl.LightningModule):
    """A plain supervised LightningModule: ``net``, a loss, and SGD with a fixed ``lr`` and ``momentum``.

    Attributes:
        losses: the training loss of every optimizer step, recorded by the Trainer's ``on_train_batch_end`` (not by
            ``training_step``, which monitors may call again on a probe batch).

    Example:
        >>> module = ScenarioModule(nn.Linear(2, 1), nn.functional.mse_loss, lr=0.1)
        >>> type(module.configure_optimizers()).__name__
        'SGD'
    """

    def __init__(self, net: nn.Module, loss_fn: LossFn, lr: float, momentum: float = 0.0) -> None:
        super().__init__()
        if not lr > 0:
            raise UsageError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise UsageError(f"momentum must be in [0, 1), got {momentum}")
        self.net = net
        self.loss_fn = loss_fn
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        # Straight to the loggers every 10 steps: ``self.log`` costs more than these tiny models' whole step.
        if self.trainer.global_step % 10 == 0:
            for logger in self.trainer.loggers:
                logger.log_metrics({"train_loss": self.losses[-1]}, step=self.trainer.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ValidatedModule(ScenarioModule):
    """A :class:`ScenarioModule` with a validation loop that logs ``val_loss``, and a choice of SGD or Adam.

    Attributes:
        val_losses: ``(step, validation loss)`` at each validation, recorded by the module itself (the truth).

    Example:
        >>> module = ValidatedModule(nn.Linear(2, 2), nn.functional.cross_entropy, lr=1e-3, optimizer="adam")
        >>> type(module.configure_optimizers()).__name__
        'Adam'
    """

    def __init__(self, net: nn.Module, loss_fn: LossFn, lr: float, momentum: float = 0.0,
                 optimizer: str = "sgd") -> None:
        super().__init__(net, loss_fn, lr, momentum)
        if optimizer not in ("sgd", "adam"):
            raise UsageError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.optimizer = optimizer
        self.val_losses: list[tuple[int, float]] = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("val_loss", loss, prog_bar=False)
        if not self.trainer.sanity_checking:
            self.val_losses.append((int(self.trainer.global_step), float(loss)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return super().configure_optimizers()


def _built(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a network from a fixed seed without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --- scenario descriptions ---------------------------------------------------------------------------------------
@dataclass
class ScenarioRun:
    """One training run of a scenario: what to train, on what, for how long, and the ground truth to compare with.

    Attributes:
        label: names the run inside its scenario (``"main"``, ``"batch 8"``, ...).
        module: the LightningModule to train.
        loader: the training DataLoader (one item per step).
        max_steps: optimizer steps to train.
        data: the full ``(inputs, targets)`` set, for exact end-of-run curvature.
        truth: numbers known without optdiag (``"two_over_lr"``, ``"sigmas"``, ``"lr_lambda_max"``, ...).
        optdiag: keyword arguments for :class:`optdiag.OptDiag` that this scenario needs.
        val_loader: the validation DataLoader (one batch), or None for a run without validation.
        val_every: validate every this many steps (an epoch is the whole run).
        findings: the triage finding kinds expected (``needs_validation`` aside); None when not checked.
        evaluate: ``evaluate(module, data) -> {name: number}`` at the end of the run, for truth checks that compare
            runs with different losses (accuracy, ...); None when ``full_loss`` suffices.
    """

    label: str
    module: ScenarioModule
    loader: DataLoader
    max_steps: int
    data: tuple[torch.Tensor, torch.Tensor]
    truth: dict[str, Any] = field(default_factory=dict)
    optdiag: dict[str, Any] = field(default_factory=dict)
    val_loader: DataLoader | None = None
    val_every: int | None = None
    findings: tuple[str, ...] | None = None
    evaluate: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], dict[str, float]] | None = None


@dataclass(frozen=True)
class Scenario:
    """A named scenario whose verdicts are known in advance.

    Attributes:
        name: the ``--scenario`` name.
        title: one line for the printed table.
        expected: the verdict kinds expected, oldest first; empty when the run must give no stall verdict; None
            when verdicts are not what the scenario is about (they are shown, not checked).
        story: what is set up and why the truth is known (printed by the CLI, used in the docs).
        build: returns the runs (fresh modules and loaders every call).
        in_default: part of the quick subset that plain ``optdiag demo`` runs.
    """

    name: str
    title: str
    expected: tuple[str, ...] | None
    story: str
    build: Callable[[], list[ScenarioRun]]
    in_default: bool = True


def _loader(x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int | None = None, seed: int = 0) -> DataLoader:
    return DataLoader(StepBatches(x, y, steps, batch_size, seed), batch_size=None, shuffle=False)


SADDLE_SIGMAS = (3.0, 1.0)
SADDLE_OFFSET = (1.0, -1.0, 0.5)
SADDLE_OFFSET_SCALE = 3.0


class TwoLayerLinear(nn.Module):
    """``y = W2 W1 x + k b``: a 2-layer linear net plus an output offset ``b`` on an input of constant size ``k``.

    The offset has curvature ``k^2`` and no saddle, so it is learnt in the first few steps (the run's early
    gradient scale); ``W`` then sits at the saddle ``W = 0``, whose Hessian has eigenvalues ``+-sigma_i``.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, init_scale: float, offset_scale: float):
        super().__init__()
        self.first = nn.Linear(in_features, hidden, bias=False)
        self.second = nn.Linear(hidden, out_features, bias=False)
        self.offset = nn.Parameter(torch.zeros(out_features))
        self.offset_scale = float(offset_scale)
        for layer in (self.first, self.second):
            nn.init.normal_(layer.weight, std=init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) + self.offset_scale * self.offset


def _saddle() -> list[ScenarioRun]:
    offset = torch.tensor(SADDLE_OFFSET) * SADDLE_OFFSET_SCALE
    x, y, _ = whitened_linear_map_data(sigmas=SADDLE_SIGMAS, offset=offset)
    init_scale = 1e-4
    lr, steps = 0.02, 900
    net = _built(0, lambda: TwoLayerLinear(4, 2, 3, init_scale, SADDLE_OFFSET_SCALE))
    module = ScenarioModule(net, half_squared_error, lr=lr)
    truth = {"sigmas": SADDLE_SIGMAS, "lr": lr, "init_scale": init_scale,
             "offset_curvature": SADDLE_OFFSET_SCALE**2}
    # lambda_min over time shows the two saddles: measure on a fixed cadence as well as at the stalls
    return [ScenarioRun("main", module, _loader(x, y, steps), steps, (x, y), truth, {"every_n_steps": 50})]


# These runs take a fraction of a second: within the default 5% budget the Hessian monitor would take no scheduled
# snapshot at all (only the verdict's own), so the scenarios whose figures show curvature over time set a cadence.
CURVE_CADENCE = {"every_n_steps": 25}


def _scaled_regression(lr_lambda_max: float, batch_size: int, steps: int, optdiag: dict | None = None
                       ) -> list[ScenarioRun]:
    x, y = scaled_regression_data()
    lam = regression_lambda_max(x)
    lr = lr_lambda_max / lam
    module = ScenarioModule(_built(0, lambda: nn.Linear(x.shape[1], 1)), nn.functional.mse_loss, lr=lr)
    truth = {"lambda_max": lam, "lr": lr, "lr_lambda_max": lr_lambda_max, "batch_size": batch_size}
    return [ScenarioRun("main", module, _loader(x, y, steps, batch_size), steps, (x, y), truth, dict(optdiag or {}))]


def _oscillation() -> list[ScenarioRun]:
    return _scaled_regression(lr_lambda_max=1.8, batch_size=64, steps=1000, optdiag=CURVE_CADENCE)


def _divergence() -> list[ScenarioRun]:
    # a cadence, as the curve scenarios: at the defaults the verdict's evidence of lr * lambda_max > 2 would rest on
    # whether the time budget of this sub-second run paid for its snapshot (it may not on a loaded machine)
    return _scaled_regression(lr_lambda_max=3.0, batch_size=64, steps=150, optdiag=CURVE_CADENCE)


def _minimum() -> list[ScenarioRun]:
    x, y = _minimum_data()
    lam = regression_lambda_max(x)
    lr, steps, batch = 0.3 / lam, 800, 32
    module = ScenarioModule(_built(0, lambda: nn.Linear(x.shape[1], 1)), nn.functional.mse_loss, lr=lr)
    truth = {"lambda_max": lam, "lr": lr, "lr_lambda_max": 0.3}
    return [ScenarioRun("main", module, _loader(x, y, steps, batch), steps, (x, y), truth, dict(CURVE_CADENCE))]


def _tanh_mlp(in_features: int = 4, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


def _minimum_data() -> tuple[torch.Tensor, torch.Tensor]:
    return scaled_regression_data(scale=1.0, noise=0.5, seed=1)


def _plateau() -> list[ScenarioRun]:
    x, y = _minimum_data()
    lam = regression_lambda_max(x)
    lr, steps = 2e-5, 300
    module = ScenarioModule(_built(0, lambda: nn.Linear(x.shape[1], 1)), nn.functional.mse_loss, lr=lr)
    truth = {"lambda_max": lam, "lr": lr, "lr_lambda_max": lr * lam, "stable_lr": 2.0 / lam}
    return [ScenarioRun("main", module, _loader(x, y, steps), steps, (x, y), truth, dict(CURVE_CADENCE))]


EOS_LR = 0.2


def _edge_of_stability() -> list[ScenarioRun]:
    x, y = wave_data()
    steps = 600
    module = ScenarioModule(_built(0, _tanh_mlp), nn.functional.mse_loss, lr=EOS_LR)
    truth = {"lr": EOS_LR, "two_over_lr": 2.0 / EOS_LR}
    # Sharpness over time is the point of this scenario: measure on a fixed cadence, on the full batch.
    settings = {"every_n_steps": 25}
    return [ScenarioRun("main", module, _loader(x, y, steps), steps, (x, y), truth, settings)]


def _batch_size() -> list[ScenarioRun]:
    x, y = wave_data()
    steps = 600
    runs = []
    for batch in (8, x.shape[0]):
        module = ScenarioModule(_built(0, _tanh_mlp), nn.functional.mse_loss, lr=EOS_LR)
        truth = {"lr": EOS_LR, "two_over_lr": 2.0 / EOS_LR, "batch_size": batch}
        loader = _loader(x, y, steps, batch)
        # the same cadence for both runs, so their sharpness curves compare step by step
        runs.append(ScenarioRun(f"batch {batch}", module, loader, steps, (x, y), truth, {"every_n_steps": 50}))
    return runs


def _val_loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(StepBatches(x, y, 1), batch_size=None, shuffle=False)


def _ring_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))


def _model_bias() -> list[ScenarioRun]:
    x, y = ring_data(2048, seed=0)  # enough points that the larger model does not overfit them
    xv, yv = ring_data(512, seed=1)
    steps, every = 600, 25
    runs = []
    for label, make, expected in (("linear", lambda: nn.Linear(2, 2), ("model_bias",)),
                                  ("larger model", lambda: _ring_net(32), ())):
        # full-batch gradient descent with momentum: the same optimizer for both, and no minibatch noise floor
        module = ValidatedModule(_built(0, make), nn.functional.cross_entropy, lr=0.5, momentum=0.9)
        # a curvature cadence: a run this short earns too little of the time budget to pay for the stall's snapshot
        runs.append(ScenarioRun(label, module, _loader(x, y, steps), steps, (x, y), {"lr": 0.5}, dict(CURVE_CADENCE),
                                _val_loader(xv, yv), every, expected))
    return runs


def _overfitting() -> list[ScenarioRun]:
    x, y = digits_data()
    train, val = slice(0, 50), slice(1000, 1500)
    steps, batch, every = 300, 10, 5
    net = _built(0, lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                          nn.Linear(256, 10)))
    module = ValidatedModule(net, nn.functional.cross_entropy, lr=1e-3, optimizer="adam")
    return [ScenarioRun("50 digits", module, _loader(x[train], y[train], steps, batch), steps, (x[train], y[train]),
                        {"train_size": 50, "val_size": 500}, {}, _val_loader(x[val], y[val]), every,
                        ("overfitting",))]


#: The unscaled features' standard deviations: 0.1 to 10 (a spread of 100, curvatures 10^4 apart).
UNSCALED_SCALES = tuple(float(v) for v in torch.logspace(-1, 1, 8))
#: The saturating classifier's initial weights are this many times PyTorch's default: most outputs start saturated.
SATURATING_INIT = 20.0


def unscaled_regression_data(n: int = 512, in_features: int = 8, seed: int = 0, sample_seed: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal features and a smooth target of all of them alike, ``2 tanh(x . w / sqrt(d))`` plus noise 0.1.

    ``seed`` draws the target's ``w``, ``sample_seed`` (default: ``seed``) the samples: a validation set of the same
    task takes another ``sample_seed``.

    Example:
        >>> x, y = unscaled_regression_data(16)
        >>> tuple(x.shape), tuple(y.shape)
        ((16, 8), (16, 1))
    """
    w = torch.randn(in_features, 1, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1 if sample_seed is None else 1000 + sample_seed)
    x = torch.randn(n, in_features, generator=gen)
    return x, 2.0 * torch.tanh(x @ w / math.sqrt(in_features)) + 0.1 * torch.randn(n, 1, generator=gen)


def blob_classes(n: int = 512, in_features: int = 16, classes: int = 10, seed: int = 0,
                 sample_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clouds of unit variance around ``classes`` standard normal centres, balanced labels.

    ``seed`` draws the centres, ``sample_seed`` (default: ``seed``) the samples around them.

    Example:
        >>> x, y = blob_classes(20)
        >>> tuple(x.shape), y[:3].tolist()
        ((20, 16), [0, 1, 2])
    """
    centres = torch.randn(classes, in_features, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1 if sample_seed is None else 1000 + sample_seed)
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, in_features, generator=gen), labels


def mse_on_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean squared error between the softmax probabilities and the one-hot labels (the loss not to use).

    Example:
        >>> round(float(mse_on_softmax(torch.zeros(1, 2), torch.tensor([0]))), 4)
        0.25
    """
    probabilities = torch.softmax(logits, dim=-1)
    return nn.functional.mse_loss(probabilities, nn.functional.one_hot(labels, logits.shape[-1]).to(logits.dtype))


def _unscaled_inputs() -> list[ScenarioRun]:
    x, y = unscaled_regression_data()
    xv, yv = unscaled_regression_data(256, sample_seed=1)
    scales = torch.tensor(UNSCALED_SCALES)
    lr, steps, batch, every = 0.003, 600, 64, 100
    runs = []
    for label, scale, expected in (("unscaled", scales, ("ill_conditioning",)), ("standardized", 1.0, ())):
        net = _built(0, lambda: nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, 1)))
        module = ValidatedModule(net, nn.functional.mse_loss, lr=lr)
        truth = {"lr": lr, "feature_stds": UNSCALED_SCALES if label == "unscaled" else None}
        # a fixed cadence, so that the per-layer trace is measured in these short runs
        runs.append(ScenarioRun(label, module, _loader(x * scale, y, steps, batch), steps, (x * scale, y), truth,
                                {"every_n_steps": 50}, _val_loader(xv * scale, yv), every, expected))
    return runs


def _saturating_classifier(in_features: int, classes: int) -> nn.Module:
    net = nn.Linear(in_features, classes)
    with torch.no_grad():
        net.weight.mul_(SATURATING_INIT)
    return net


def _mse_softmax() -> list[ScenarioRun]:
    x, y = blob_classes()
    xv, yv = blob_classes(256, sample_seed=1)
    lr, steps, batch, every = 0.5, 300, 64, 50
    runs = []
    # the squared error's run is checked for loss_choice alone (runner._check_mse_softmax): whether its plateau also
    # gets a stall verdict in time (and so the triage's "optimization" finding) depends on the curvature budget
    for label, loss_fn, expected in (("mse on softmax", mse_on_softmax, None),
                                     ("cross-entropy", nn.functional.cross_entropy, ())):
        module = ValidatedModule(_built(0, lambda: _saturating_classifier(x.shape[1], 10)), loss_fn, lr=lr)
        runs.append(ScenarioRun(label, module, _loader(x, y, steps, batch), steps, (x, y),
                                {"lr": lr, "init_scale": SATURATING_INIT}, {}, _val_loader(xv, yv), every, expected,
                                evaluate=classifier_metrics))
    return runs


def classifier_metrics(module: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Accuracy and the squared error of the probabilities on the full data: comparable across losses."""
    with torch.no_grad():
        logits = module(data[0])
        return {"accuracy": float((logits.argmax(dim=-1) == data[1]).float().mean()),
                "probability_squared_error": float(mse_on_softmax(logits, data[1]))}


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "saddle",
            "2-layer linear net from a tiny init: saddle, saddle, minimum",
            ("saddle_point", "saddle_point", "local_minimum"),
            "y = W2 W1 x + 3 b on whitened inputs, target map with singular values 3 and 1, init scale 1e-4, "
            "full-batch GD (lr 0.02). The offset b is learnt first; W = 0 is a saddle with Hessian eigenvalues "
            "+-3 and +-1; after the sigma=3 mode is learnt the next saddle has lambda_min = -1; then a minimum.",
            _saddle,
        ),
        Scenario(
            "oscillation",
            "badly scaled regression, SGD at lr*lambda_max = 1.8",
            ("oscillation",),
            "Linear regression with one feature scaled x10 (lambda_max ~ 180), SGD batch 64 at lr*lambda_max = "
            "1.8: the step overshoots the steep direction and bounces at a loss floor with a large gradient.",
            _oscillation,
        ),
        Scenario(
            "minimum",
            "convex regression, modest step: a true minimum",
            ("local_minimum",),
            "Well-conditioned noisy linear regression, SGD batch 32 at lr*lambda_max = 0.3: it converges to the "
            "least-squares solution; every Hessian eigenvalue is positive and the gradient is only noise.",
            _minimum,
        ),
        Scenario(
            "plateau",
            "convex regression with lr far too small",
            ("plateau",),
            "The regression of 'minimum' trained full-batch with lr = 2e-5 (stable up to 2/lambda_max ~ 0.7): "
            "the loss creeps down while the gradient stays as large as at the start and lr*lambda_max ~ 6e-5.",
            _plateau,
        ),
        Scenario(
            "divergence",
            "regression at lr*lambda_max = 3 (> 2)",
            ("divergence",),
            "The regression of 'oscillation' at lr*lambda_max = 3: the steep direction is multiplied by "
            "1 - 3 = -2 every step until the loss overflows.",
            _divergence,
            in_default=False,
        ),
        Scenario(
            "edge_of_stability",
            "full-batch GD on a tanh MLP: lambda_max rises to 2/lr and stays",
            (),
            "A tanh MLP, full-batch GD with lr = 0.2: lambda_max climbs to 2/lr = 10 and hovers there while the "
            "loss keeps falling, non-monotonically (Cohen et al. 2021). This is not a stall: no verdict.",
            _edge_of_stability,
        ),
        Scenario(
            "batch_size",
            "the same MLP with batch 8 and batch 128",
            None,
            "The tanh MLP at lr = 0.2 with batch 8 and with the full batch of 128: the full batch ends at "
            "lambda_max ~ 2/lr, the small batch's noise keeps it in a flatter region (smaller lambda_max and trace).",
            _batch_size,
            in_default=False,
        ),
        Scenario(
            "model_bias",
            "a linear classifier on a circle: a true minimum at a high loss",
            None,
            "Points inside or outside a circle; a linear classifier (full-batch GD, momentum 0.9) stalls at a minimum near "
            "ln 2 that no step size can lower: model bias. An MLP on the same data reaches a far lower training "
            "loss (the truth), and gets no model-bias finding.",
            _model_bias,
            in_default=False,
        ),
        Scenario(
            "overfitting",
            "a wide MLP on 50 digits: validation rises while training falls",
            None,
            "A 64-256-256-10 ReLU MLP trained with Adam on 50 digits, validated on 500 others every 5 steps: the "
            "training loss goes to ~0 while the validation loss passes its minimum and rises (the truth, from "
            "the recorded losses): overfitting.",
            _overfitting,
            in_default=False,
        ),
        Scenario(
            "unscaled_inputs",
            "a regression whose features' scales span 0.1 to 10",
            None,
            "A tanh MLP (8-32-1, SGD lr 0.003, batch 64) on 8 features with standard deviations from 0.1 to 10: the "
            "first layer's curvatures span 10^4, the stable step is set by the largest, and the small features' "
            "weights crawl: ill-conditioning. The same run on standardized features (the second run) ends below "
            "half of its loss at the same lr (the truth; both validated on 256 other samples).",
            _unscaled_inputs,
            in_default=False,
        ),
        Scenario(
            "mse_softmax",
            "a saturated softmax classifier trained on the squared error of its probabilities",
            None,
            "A linear softmax classifier on 10 Gaussian classes, initial weights 20x the default (most outputs "
            "saturated at a wrong class), SGD lr 0.5: the squared error of the probabilities keeps ~2% of "
            "cross-entropy's gradient there and sits on a plateau (loss choice). The same run with cross-entropy on "
            "the logits leaves it (the truth: its accuracy and probability error).",
            _mse_softmax,
            in_default=False,
        ),
    )
}
DEFAULT_SCENARIOS = tuple(name for name, s in SCENARIOS.items() if s.in_default)


def scenario_names() -> list[str]:
    """All scenario names, in presentation order."""
    return list(SCENARIOS)


def scenario(name: str) -> Scenario:
    """The scenario called ``name``.

    Raises:
        UsageError: for an unknown name, listing the known ones.
    """
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UsageError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}, or 'all'") from None
