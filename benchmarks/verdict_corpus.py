"""The verdict corpus: short real Lightning runs whose truth is checked independently, scored against OptDiag().

A verdict is a claim a user acts on. This script trains 20+ small PyTorch Lightning runs (MLPs with and without
BatchNorm/dropout, a BatchNorm CNN and a small transformer on scikit-learn's bundled digits or on generated
tensors, and small linear/regression nets whose dense Hessian is affordable) with ``optdiag.OptDiag()`` at its
defaults, and scores the verdicts against a truth the script establishes itself, without optdiag: the full-data
loss evaluated during training, dense float64 Hessians of the small nets (``torch.autograd.functional.hessian``),
closed-form least-squares minima, and reruns with a different learning rate. A run whose truth check fails is
reported as "truth not established" and left out of the scores.

Each run has kinds it SHOULD get and kinds it MAY get (the truth check may add some, e.g. ``loss_spike`` on a
healthy run whose full-data loss did spike); any other verdict is wrong (on a run that should get a verdict) or a
false alarm (on a healthy run). Oscillation, plateau, minimum and saddle runs are also rerun with the learning rate
optdiag suggested, to see whether the advice helps (reported beside the verdicts, not part of the truth).

    python benchmarks/verdict_corpus.py                      # the whole corpus (a few minutes on 2 cores)
    python benchmarks/verdict_corpus.py --only osc_sgd_b16,plateau_regression_gd
    python benchmarks/verdict_corpus.py --repeat 2 --json out.json   # train each run twice with OptDiag; JSON
    python benchmarks/verdict_corpus.py --write-docs --repeat 2      # also writes docs/verdict-corpus.md

See docs/verdict-corpus.md for every run and how its truth is established.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optdiag_settings import not_the_defaults, setting  # noqa: E402  (--set, shared with bench_overhead.py)

KINDS = ("local_minimum", "saddle_point", "oscillation", "plateau", "divergence", "loss_spike")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- truth classes: what a run SHOULD and MAY get ------------------------------------------------------------------
#: truth class -> (kinds the run should get, kinds it may get whatever its truth check finds)
EXPECTED: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "healthy": (frozenset(), frozenset()),
    "spike": (frozenset({"loss_spike"}), frozenset()),
    "catapult": (frozenset({"loss_spike"}), frozenset()),
    "divergence": (frozenset({"divergence"}), frozenset()),
    "minimum": (frozenset({"local_minimum"}), frozenset()),
    "saddle": (frozenset({"saddle_point"}), frozenset()),
    "oscillation": (frozenset({"oscillation"}), frozenset()),
    "plateau": (frozenset({"plateau"}), frozenset()),
}


# --- scoring (pure: synthetic verdicts in, counts out; tests/test_verdict_corpus.py) -------------------------------
@dataclass
class Score:
    """One run's verdict kinds held against its truth.

    Attributes:
        right: expected kinds that were given; missed: expected kinds that were not.
        accepted: kinds given that the truth allows (MAY) without requiring them.
        wrong: kinds given on a run that expected other kinds; false_alarms: kinds given on a run that expected none.
    """

    right: frozenset[str]
    missed: frozenset[str]
    accepted: frozenset[str]
    wrong: frozenset[str]
    false_alarms: frozenset[str]

    @property
    def ok(self) -> bool:
        return not (self.missed or self.wrong or self.false_alarms)


def score_run(given: Iterable[str], should: Iterable[str], may: Iterable[str] = ()) -> Score:
    """Score the verdict kinds ``given`` (repeats count once) against the kinds a run ``should`` and ``may`` get.

    Example:
        >>> s = score_run(["saddle_point", "plateau"], should={"saddle_point"}, may={"local_minimum"})
        >>> sorted(s.right), sorted(s.wrong), s.ok
        (['saddle_point'], ['plateau'], False)
    """
    given, should, may = frozenset(given), frozenset(should), frozenset(may)
    extra = given - should
    return Score(
        right=given & should, missed=should - given, accepted=extra & may,
        wrong=(extra - may) if should else frozenset(), false_alarms=(extra - may) if not should else frozenset(),
    )


@dataclass
class KindTally:
    """Runs counted per verdict kind (a kind given several times in one run counts once)."""

    right: int = 0
    accepted: int = 0
    wrong: int = 0
    false_alarms: int = 0
    missed: int = 0

    @property
    def precision(self) -> float | None:
        """Of the runs that got this kind, the fraction where the truth wanted or allowed it; None if none got it."""
        given = self.right + self.accepted + self.wrong + self.false_alarms
        return (self.right + self.accepted) / given if given else None

    @property
    def recall(self) -> float | None:
        """Of the runs that should get this kind, the fraction that did; None if none should."""
        due = self.right + self.missed
        return self.right / due if due else None


def tally(scores: Iterable[Score]) -> dict[str, KindTally]:
    """Per-kind counts over runs, every kind of :data:`KINDS` present (unknown kinds are added after them).

    Example:
        >>> t = tally([score_run(["plateau"], should=()), score_run([], should={"plateau"})])
        >>> t["plateau"].false_alarms, t["plateau"].missed, t["plateau"].precision
        (1, 1, 0.0)
    """
    table = {kind: KindTally() for kind in KINDS}
    for s in scores:
        for attr in ("right", "accepted", "wrong", "false_alarms", "missed"):
            for kind in getattr(s, attr):
                row = table.setdefault(kind, KindTally())
                setattr(row, attr, getattr(row, attr) + 1)
    return table


# --- data ----------------------------------------------------------------------------------------------------------
Data = tuple[torch.Tensor, torch.Tensor]


def digits(images: bool = False) -> Data:
    """scikit-learn's bundled 8x8 digits (1797 images, nothing downloaded), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    if images:
        x = x.view(-1, 1, 8, 8)
    return x, torch.tensor(d.target, dtype=torch.long)


def max_token_sequences(n: int = 1024, length: int = 8, vocab: int = 10, seed: int = 0) -> Data:
    """Random token sequences labelled by their largest token: attention has to look at every position."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=gen)
    return x, x.max(dim=1).values


def ill_conditioned_regression(n: int = 512, d: int = 8, scale: float = 10.0, noise: float = 0.3,
                               seed: int = 0) -> Data:
    """Gaussian features, the first replaced by ``+-scale`` (condition number ~scale^2), noisy linear targets.

    The steep feature's square is the same in every sample, so minibatches share the steep curvature: a step
    set against ``lambda_max`` has the same ``lr * lambda`` on every batch.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, 0] = scale * torch.sign(x[:, 0])
    w = torch.randn(d, 1, generator=gen)
    w[0] /= scale
    return x, x @ w + noise * torch.randn(n, 1, generator=gen)


def wave_regression(n: int = 64, d: int = 4, seed: int = 0) -> Data:
    """A smooth nonlinear target ``sin(x . w)``, standardised, for the small MLPs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.sin(x @ torch.randn(d, 1, generator=gen))
    return x, (y - y.mean()) / y.std()


def whitened_map(n: int = 64, d_in: int = 4, d_out: int = 3, sigmas: Sequence[float] = (3.0, 1.0),
                 noise: float = 0.3, seed: int = 0) -> Data:
    """Inputs with ``X^T X / n = I`` exactly and targets ``X A^T + noise``, ``A`` of singular values ``sigmas``.

    For a deep linear net from a tiny init, ``W = 0`` is then a saddle whose Hessian (2 layers, loss
    ``1/2 |.|^2``) has eigenvalues ``+-sigma_i``; the noise keeps the minimum's loss above zero.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d_in, generator=gen, dtype=torch.float64))
    x = q * math.sqrt(n)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(sigmas), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(sigmas), generator=gen, dtype=torch.float64))
    a = u @ torch.diag(torch.tensor(list(sigmas), dtype=torch.float64)) @ v.T
    y = x @ a.T + noise * torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return x.float(), y.float()


DATA: dict[str, Callable[[], Data]] = {
    "digits": digits,
    "digits_images": lambda: digits(images=True),
    "max_token": max_token_sequences,
    "ill_regression": ill_conditioned_regression,
    "regression": lambda: ill_conditioned_regression(scale=1.0, noise=0.5, seed=1),
    "wave": wave_regression,
    "whitened": whitened_map,
}


# --- models --------------------------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    """Token + position embeddings, two ``nn.TransformerEncoderLayer``, mean pooling, a linear classifier."""

    def __init__(self, vocab: int = 10, length: int = 8, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(0.1 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tokens(x) + self.positions).mean(dim=1))


class DeepLinear(nn.Module):
    """``y = W_L ... W_1 x`` without biases, every matrix initialised at scale ``init``: the origin is a saddle."""

    def __init__(self, sizes: Sequence[int], init: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _mlp(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _bn_dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64),
                         nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


def _bn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": _mlp,
    "bn_dropout_mlp": _bn_dropout_mlp,
    "bn_cnn": _bn_cnn,
    "transformer": TinyTransformer,
    "linear": lambda: nn.Linear(8, 1),
    "tanh_mlp": lambda: nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)),
    "wide2": lambda: nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 1)),
    "linear2": lambda: DeepLinear((4, 4, 3), init=1e-5),
    "linear3": lambda: DeepLinear((4, 4, 4, 3), init=0.1),
}


def half_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1/2 |prediction - target|^2`` summed over outputs, averaged over samples."""
    return 0.5 * (prediction - target).pow(2).sum(dim=-1).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
    "half_se": half_squared_error,
}


# --- run definitions -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One corpus run: what trains, how, and the truth class it is checked against.

    Attributes:
        name: unique, used by ``--only``.
        truth: the truth class (a key of :data:`EXPECTED` and :data:`TRUTH_CHECKS`).
        family / model / data / loss: display family and keys of :data:`MODELS`, :data:`DATA`, :data:`LOSSES`.
        optimizer: ``"sgd"``, ``"sgd_m0.9"`` (heavy ball), ``"adam"``, ``"adamw"``.
        lr: the base learning rate, or with ``lr_lambda0`` set, ``lr = lr_lambda0 / lambda0`` where ``lambda0`` is
            the dense-Hessian top eigenvalue of the full-data loss at initialisation.
        batch: batch size; None is the full batch.
        steps: optimizer steps.
        schedule: ``"constant"``, ``"cosine"`` (to 10% at the end), ``"warmup_cosine"`` (10% linear warmup, then
            cosine to 10%) or ``"burst:START:LEN:FACTOR"`` (lr times FACTOR for LEN steps from START).
        eval_every: the full-data loss is evaluated every this many steps (eval mode, no gradient, after training
            from saved states).
        snapshots: keep the parameters at every step (small nets: dense Hessians at chosen steps afterwards).
        loss_floor: passed to ``OptDiag(loss_floor=...)`` (the only setting a run may pass).
        description: what is set up and why its truth is what it is.
    """

    name: str
    truth: str
    family: str
    model: str
    data: str
    loss: str
    optimizer: str
    lr: float
    batch: int | None
    steps: int
    schedule: str = "constant"
    lr_lambda0: float | None = None
    eval_every: int = 5
    snapshots: bool = False
    seed: int = 0
    loss_floor: float | None = None
    description: str = ""


RUNS: tuple[RunSpec, ...] = (
    # healthy: the full-data loss keeps falling; no verdict is right
    RunSpec("healthy_mlp_sgd_b32", "healthy", "MLP", "mlp", "digits", "ce", "sgd", 0.1, 32, 300,
            description="digits MLP 64-64-64-10, plain SGD lr 0.1, batch 32: textbook minibatch training, "
                        "still learning after 5 epochs."),
    RunSpec("healthy_cnn_bn_adam_b64", "healthy", "CNN+BN", "bn_cnn", "digits_images", "ce", "adam", 1e-3, 64, 300,
            description="digits CNN with BatchNorm, Adam lr 1e-3, batch 64."),
    RunSpec("healthy_bn_dropout_mlp_sgdm_b8", "healthy", "MLP+BN+dropout", "bn_dropout_mlp", "digits", "ce",
            "sgd_m0.9", 0.01, 8, 400,
            description="digits MLP with BatchNorm and dropout 0.2, SGD momentum 0.9 lr 0.01, batch 8: a very "
                        "noisy minibatch loss that still falls."),
    RunSpec("healthy_mlp_adamw_warmcos_b64", "healthy", "MLP", "mlp", "digits", "ce", "adamw", 3e-3, 64, 300,
            "warmup_cosine", description="digits MLP, AdamW lr 3e-3, batch 64, linear warmup + cosine."),
    RunSpec("healthy_transformer_adamw_warmcos_b32", "healthy", "transformer", "transformer", "max_token", "ce",
            "adamw", 3e-3, 32, 300, "warmup_cosine", eval_every=10,
            description="two TransformerEncoderLayers on 8-token sequences labelled by their largest token, AdamW "
                        "lr 3e-3, batch 32, warmup + cosine."),
    RunSpec("healthy_cnn_bn_sgdm_cos_b16", "healthy", "CNN+BN", "bn_cnn", "digits_images", "ce", "sgd_m0.9", 0.02,
            16, 300, "cosine", description="digits BatchNorm CNN, SGD momentum 0.9 lr 0.02, batch 16, cosine."),
    RunSpec("healthy_mlp_adam_full", "healthy", "MLP", "mlp", "digits", "ce", "adam", 1e-3, None, 200,
            description="digits MLP, Adam lr 1e-3 on the full batch of 1797: smooth and still falling."),
    # recovering spikes: the loss jumps, then comes back below where it was
    RunSpec("spike_lr_burst_mlp_sgd_b32", "spike", "MLP", "mlp", "digits", "ce", "sgd", 0.05, 32, 300,
            "burst:150:5:30", eval_every=1,
            description="digits MLP, SGD lr 0.05 batch 32; the lr is multiplied by 30 for steps 150-154, then "
                        "returns: the loss jumps, then recovers."),
    RunSpec("spike_lr_burst_cnn_adam_b64", "spike", "CNN+BN", "bn_cnn", "digits_images", "ce", "adam", 1e-3, 64, 300,
            "burst:150:5:30", eval_every=2,
            description="digits BatchNorm CNN, Adam lr 1e-3 batch 64; lr x30 for steps 150-154."),
    RunSpec("spike_sgdm_large_lr_mlp_b32", "spike", "MLP", "mlp", "digits", "ce", "sgd_m0.9", 0.3, 32, 300,
            eval_every=1,
            description="digits MLP, SGD momentum 0.9 at lr 0.3 (large), batch 32: early spikes that recover."),
    # catapult: full-batch GD at lr = 3 / lambda0 on a wide 2-layer net
    RunSpec("catapult_wide2_gd", "catapult", "wide 2-layer", "wide2", "wave", "mse", "sgd", 0.0, None, 300,
            lr_lambda0=3.0, eval_every=1, snapshots=True,
            description="2-layer ReLU net of width 128 on a 64-point regression, MSE, full-batch GD at "
                        "lr = 3 / lambda0: past the 2 / lambda0 limit of its initial curvature, the loss jumps, the "
                        "net moves to a flatter region and the loss settles below its start (catapult)."),
    RunSpec("catapult_wide2_gd_seed1", "catapult", "wide 2-layer", "wide2", "wave", "mse", "sgd", 0.0, None, 300,
            lr_lambda0=3.0, eval_every=1, snapshots=True, seed=1,
            description="the same catapult from another initialisation."),
    # divergence
    RunSpec("divergence_regression_sgd_b64", "divergence", "linear regression", "linear", "ill_regression", "mse",
            "sgd", 0.0, 64, 150, lr_lambda0=3.0, eval_every=1,
            description="ill-conditioned linear regression, SGD batch 64 at lr*lambda_max = 3 > 2: the steep "
                        "direction grows by |1 - 3| = 2 per step."),
    RunSpec("divergence_transformer_sgdm_b32", "divergence", "transformer", "transformer", "max_token", "ce",
            "sgd_m0.9", 5.0, 32, 60, eval_every=1,
            description="the small transformer with SGD momentum 0.9 at lr 5: far past any stable step."),
    RunSpec("divergence_tanh_mlp_gd", "divergence", "small MLP", "tanh_mlp", "wave", "mse", "sgd", 0.0, None, 150,
            lr_lambda0=12.0, eval_every=1,
            description="small tanh MLP, full-batch GD at lr = 12 / lambda0."),
    # local minimum
    RunSpec("minimum_regression_gd", "minimum", "linear regression", "linear", "regression", "mse", "sgd", 0.0,
            None, 300, lr_lambda0=1.0, snapshots=True,
            description="well-conditioned noisy linear regression (convex), full-batch GD at lr = 1 / lambda_max: "
                        "at the least-squares solution within a few dozen steps, then stays."),
    RunSpec("minimum_regression_sgd_b32", "minimum", "linear regression", "linear", "regression", "mse", "sgd", 0.0,
            32, 600, lr_lambda0=0.3, snapshots=True,
            description="the same regression with SGD batch 32 at lr*lambda_max = 0.3: converges and jitters "
                        "at the minimum (600 steps: the jitter, 2-4% of the loss even on fixed batches, needs a "
                        "few hundred flat steps to prove the stall)."),
    RunSpec("minimum_regression_sgdm_b64", "minimum", "linear regression", "linear", "regression", "mse",
            "sgd_m0.9", 0.0, 64, 600, lr_lambda0=0.1, snapshots=True,
            description="the same regression with heavy ball 0.9 at lr*lambda_max = 0.1, batch 64 (600 steps, as "
                        "the SGD run)."),
    # saddle
    RunSpec("saddle_linear2_gd", "saddle", "linear net", "linear2", "whitened", "half_se", "sgd", 0.05, None, 400,
            snapshots=True,
            description="2-layer linear net 4-4-3 from init scale 1e-5 on whitened inputs, target map with "
                        "singular values 3 and 1, full-batch GD lr 0.05: it sits at the saddle W = 0 (Hessian "
                        "eigenvalues +-3, +-1), escapes along sigma = 3, plateaus at the next saddle, then converges."),
    RunSpec("saddle_linear3_gd", "saddle", "linear net", "linear3", "whitened", "half_se", "sgd", 0.05, None, 400,
            snapshots=True,
            description="3-layer linear net 4-4-4-3 from init scale 0.1, same data, full-batch GD lr 0.05: "
                        "plateaus near the origin and at the saddle between the two modes."),
    RunSpec("saddle_linear2_sgd_b16", "saddle", "linear net", "linear2", "whitened", "half_se", "sgd", 0.05, 16, 400,
            snapshots=True,
            description="the 2-layer linear net of saddle_linear2_gd with SGD batch 16."),
    # oscillation
    RunSpec("osc_sgd_b16", "oscillation", "linear regression", "linear", "ill_regression", "mse", "sgd", 0.0, 16,
            800, lr_lambda0=1.8, snapshots=True, eval_every=1,
            description="ill-conditioned linear regression (one feature +-10), SGD batch 16 at lr*lambda_max = "
                        "1.8: the steep direction flips sign every step and the minibatch noise keeps it "
                        "bouncing above the least-squares loss (800 steps: the model's own loss bounces by "
                        "30%, so a flat trend takes several hundred steps to prove)."),
    RunSpec("osc_momentum_b32", "oscillation", "linear regression", "linear", "ill_regression", "mse", "sgd_m0.9",
            0.0, 32, 400, lr_lambda0=3.4, snapshots=True, eval_every=1,
            description="the same regression, heavy ball 0.9 at lr*lambda_max = 3.4 (limit 2(1+0.9) = 3.8), "
                        "batch 32: the steep mode rings near period 2 and the loss bounces at a floor."),
    # plateau
    RunSpec("plateau_regression_gd", "plateau", "linear regression", "linear", "regression", "mse", "sgd", 0.0,
            None, 300, lr_lambda0=1e-4,
            description="the convex regression with lr = 1e-4 / lambda_max (1e-4 of a good one): the loss crawls."),
    RunSpec("plateau_mlp_sgd_b64", "plateau", "MLP", "mlp", "digits", "ce", "sgd", 1e-5, 64, 300,
            description="digits MLP, SGD lr 1e-5 (1e-4 of the healthy run's 0.1), batch 64: the loss crawls."),
)


# --- training ----------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def make_optimizer(kind: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind.startswith("sgd_m"):
        return torch.optim.SGD(params, lr=lr, momentum=float(kind[len("sgd_m"):]))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}")


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """The multiplier of the base lr at each step, for ``torch.optim.lr_scheduler.LambdaLR``."""
    if schedule == "constant":
        return lambda t: 1.0
    if schedule in ("cosine", "warmup_cosine"):
        warm = max(steps // 10, 1) if schedule == "warmup_cosine" else 0

        def factor(t: int) -> float:
            if t < warm:
                return (t + 1) / warm
            progress = min((t - warm) / max(steps - warm, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return factor
    if schedule.startswith("burst:"):
        start, length, mult = schedule.split(":")[1:]
        start, length, mult = int(start), int(length), float(mult)
        return lambda t: mult if start <= t < start + length else 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def _corpus_module_class():
    import pytorch_lightning as pl

    class CorpusModule(pl.LightningModule):
        """A plain supervised module that records, beside training, what the truth checks need.

        Every ``eval_every`` steps it keeps a copy of the state (parameters and BatchNorm buffers); the full-data
        loss is evaluated from those copies after ``fit``. Evaluating during the run would lengthen the steps the
        Hessian monitor's wall-time budget is a fraction of, and so give optdiag more curvature than a user's run.
        """

        def __init__(self, spec: RunSpec, net: nn.Module, data: Data, lr: float) -> None:
            super().__init__()
            self.spec, self.net, self.lr = spec, net, lr
            self.loss_fn = LOSSES[spec.loss]
            self.losses: list[float] = []
            self.states: list[tuple[int, dict[str, torch.Tensor]]] = []
            self.params: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Data, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return self.loss_fn(self(x), y)

        def _record(self, step: int) -> None:
            if self.spec.snapshots:
                self.params.append(flat_params(self.net))
            if step % self.spec.eval_every == 0 or step == self.spec.steps:
                self.states.append((step, {k: v.detach().clone() for k, v in self.net.state_dict().items()}))

        def on_train_start(self) -> None:
            self._record(0)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss.detach()))
            self._record(self.trainer.global_step)

        def configure_optimizers(self):
            opt = make_optimizer(self.spec.optimizer, self.parameters(), self.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(self.spec.schedule, self.spec.steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return CorpusModule


@torch.no_grad()
def full_losses(net: nn.Module, loss_fn: Callable, data: Data, states: Sequence[tuple[int, dict]]
                ) -> list[tuple[int, float]]:
    """The full-data loss (eval mode, no gradient) at each saved ``(step, state_dict)``, on a copy of ``net``."""
    probe = copy.deepcopy(net).eval()
    out = []
    for step, state in states:
        probe.load_state_dict(state)
        out.append((step, float(loss_fn(probe(data[0]), data[1]))))
    return out


def dense_hessian(net: nn.Module, loss_fn: Callable, data: Data, params: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eigenvalues (ascending) of the full-data Hessian in float64, the gradient, and the loss, at ``params``.

    Computed with ``torch.autograd.functional.hessian`` on a float64 copy: exact up to rounding, independent of
    optdiag's Hessian-vector products. Only for small nets (the Hessian is ``P x P``).
    """
    net = copy.deepcopy(net).double().eval()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    flat = (flat_params(net) if params is None else params).double()
    x, y = data[0].double() if data[0].is_floating_point() else data[0], data[1]
    y = y.double() if y.is_floating_point() else y

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        values = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(torch.func.functional_call(net, values, (x,)), y)

    theta = flat.clone().requires_grad_(True)
    loss = loss_of(theta)
    (grad,) = torch.autograd.grad(loss, theta)
    hess = torch.autograd.functional.hessian(loss_of, flat)
    return torch.linalg.eigvalsh(0.5 * (hess + hess.T)), grad, float(loss.detach())


@dataclass
class Built:
    module: Any
    loader: Any
    data: Data
    lr: float
    lambda0: float | None


def build(spec: RunSpec, lr: float | None = None) -> Built:
    """Fresh seeded model, data and loader for ``spec``; ``lr`` overrides the spec's (reruns)."""
    from torch.utils.data import DataLoader

    from optdiag.demo.scenarios import StepBatches

    seed_everything(spec.seed)
    net = MODELS[spec.model]()
    data = DATA[spec.data]()
    lambda0 = None
    if spec.lr_lambda0 is not None:
        lambda0 = float(dense_hessian(net, LOSSES[spec.loss], data)[0][-1])
    if lr is None:
        lr = spec.lr_lambda0 / lambda0 if spec.lr_lambda0 is not None else spec.lr
    module = _corpus_module_class()(spec, net, data, lr)
    loader = DataLoader(StepBatches(data[0], data[1], spec.steps, spec.batch, seed=spec.seed), batch_size=None)
    return Built(module, loader, data, lr, lambda0)


@dataclass
class Record:
    """What one training run left behind for the truth checks and the scores."""

    spec: RunSpec
    lr: float
    lambda0: float | None
    losses: list[float]
    evals: list[tuple[int, float]]
    params: list[torch.Tensor]
    net: nn.Module
    data: Data
    diagnoses: list = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    snapshots: int = 0  # curvature snapshots the Hessian monitor took (scheduled and at stalls)


#: ``OptDiag`` settings that replace the defaults in every run: empty unless ``--set`` asks (a diagnostic of the
#: corpus itself, e.g. ``--set every_n_steps=25`` to see which misses come from the curvature budget; the report
#: then says so).
OVERRIDES: dict[str, Any] = {}


def train(spec: RunSpec, *, lr: float | None = None, with_optdiag: bool = True, root: str | None = None) -> Record:
    """Train ``spec`` (with ``optdiag.OptDiag()`` at its defaults unless told not to) and record it."""
    import pytorch_lightning as pl

    import optdiag

    built = build(spec, lr)
    callbacks = []
    if with_optdiag:
        settings = dict(OVERRIDES)
        if spec.loss_floor is not None:
            settings["loss_floor"] = spec.loss_floor
        callbacks.append(optdiag.OptDiag(**settings))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        trainer = pl.Trainer(max_steps=spec.steps, accelerator="cpu", devices=1, logger=False,
                             callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp, num_sanity_val_steps=0)
        started = time.perf_counter()
        # OptDiag's end-of-fit summary goes to stdout (the tables show it all); its warnings are kept for the report
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message="optdiag:")
            trainer.fit(built.module, built.loader)
        seconds = time.perf_counter() - started
    m = built.module
    said = [str(w.message) for w in caught if str(w.message).startswith("optdiag:")]
    evals = full_losses(m.net, m.loss_fn, built.data, m.states)
    snapshots = len(callbacks[0].hessian_monitor.history) if with_optdiag else 0
    return Record(spec, built.lr, built.lambda0, m.losses, evals, m.params, m.net, built.data,
                  list(callbacks[0].diagnoses) if with_optdiag else [], seconds, said, snapshots)


# --- truth checks (independent of optdiag) -------------------------------------------------------------------------
@dataclass
class Truth:
    """The verdict of a truth check: established or not, the numbers, and kinds the run may get besides."""

    ok: bool
    detail: str
    may: frozenset[str] = frozenset()


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _eval_values(rec: Record) -> list[float]:
    return [v for _, v in rec.evals]


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


#: A spike has recovered when the loss is back within this factor of its pre-spike low (a loss bouncing at its floor
#: seldom goes below its best value again, yet its spikes recover).
RECOVERED = 1.1


def spikes_in(values: Sequence[float], rise: float = 1.5) -> list[tuple[int, float, float, int]]:
    """Every recovering spike: the loss rose ``rise`` times above its lowest so far, then came back within
    :data:`RECOVERED` of that low.

    Returns ``(index where it rose, pre-spike low, peak, index of the peak)`` for each; a rise that never comes back
    is no spike. After a spike, the low restarts at the value that recovered.

    Example:
        >>> spikes_in([2.0, 1.0, 3.0, 0.8, 0.9, 2.0, 0.5])
        [(2, 1.0, 3.0, 2), (5, 0.8, 2.0, 5)]
    """
    found, low, i = [], math.inf, 0
    while i < len(values):
        if i and values[i] > rise * low:
            back = next((k for k in range(i + 1, len(values)) if values[k] < RECOVERED * low), None)
            if back is not None:
                peak = max(range(i, back), key=lambda k: values[k])
                found.append((i, low, values[peak], peak))
                low, i = values[back], back + 1
                continue
        low = min(low, values[i])
        i += 1
    return found


def spike_in(values: Sequence[float], rise: float = 1.5) -> tuple[int, float, float] | None:
    """The first recovering spike of :func:`spikes_in` as ``(index, pre-spike low, peak)``, or None.

    Example:
        >>> spike_in([2.0, 1.0, 3.0, 0.8])
        (2, 1.0, 3.0)
    """
    found = spikes_in(values, rise)
    return found[0][:3] if found else None


def spike_verdicts_supported(verdict_steps: Sequence[int], peak_steps: Sequence[int], before: int = 100,
                             after: int = 10) -> bool:
    """Whether every ``loss_spike`` verdict follows a full-data spike: a peak at most ``before`` steps earlier (the
    verdict comes once the loss has recovered) or ``after`` steps later (the full-data loss is sampled).

    Example:
        >>> spike_verdicts_supported([176], [10]), spike_verdicts_supported([60], [10, 150])
        (False, True)
    """
    return all(any(t - before <= p <= t + after for p in peak_steps) for t in verdict_steps)


def _quarters_falling(values: Sequence[float], min_drop: float) -> tuple[bool, list[float]]:
    """Whether the loss fell by at least ``min_drop`` (relative) over each quarter of the run; the drops."""
    n = len(values)
    cuts = [round(i * (n - 1) / 4) for i in range(5)]
    drops = [1 - values[b] / values[a] for a, b in zip(cuts[:-1], cuts[1:])]
    return all(d >= min_drop for d in drops), drops


def check_healthy(rec: Record, rerun: Callable) -> Truth:
    """The full-data loss stays finite and falls by >= 2% over each quarter of the run."""
    values = _eval_values(rec)
    if not _finite(values):
        return Truth(False, "full-data loss non-finite")
    ok, drops = _quarters_falling(values, 0.02)
    return Truth(ok, f"full-data loss {values[0]:.3g} -> {values[-1]:.3g}, fall per quarter "
                     + "/".join(f"{100 * d:.0f}%" for d in drops))


def check_spike(rec: Record, rerun: Callable) -> Truth:
    """The full-data loss (every step or two) rises >= 1.5x above its low so far, then ends below that low."""
    values = _eval_values(rec)
    if not _finite(values):
        return Truth(False, "full-data loss non-finite")
    spike = spike_in(values)
    if spike is None:
        return Truth(False, f"no recovering spike in the full-data loss ({values[0]:.3g} -> {values[-1]:.3g}, "
                            f"max {max(values):.3g})")
    i, low, peak = spike
    step = rec.evals[i][0]
    ok = values[-1] < low
    # what the training loss, all optdiag sees, shows of it: its peak near the spike over its median before
    before = sorted(rec.losses[max(step - 21, 0):max(step - 1, 1)])
    seen = max(rec.losses[max(step - 3, 0):step + 5]) / before[len(before) // 2]
    return Truth(ok, f"full-data loss {low:.3g} -> {peak:.3g} at step {step}, ends {values[-1]:.3g}; the training "
                     f"loss peaks at {seen:.2g}x its median of the 20 steps before")


def _at_minimum(rec: Record, params: torch.Tensor | None = None) -> tuple[bool, str]:
    """Dense Hessian PSD (lambda_min >= -1e-4 lambda_max) and a full gradient <= 5% of the one at init.

    5%, not 0: a minibatch run jitters about the minimum, its full gradient is the noise of the last steps.
    """
    eig, grad, _ = dense_hessian(rec.net, LOSSES[rec.spec.loss], rec.data, params)
    _, grad0, _ = dense_hessian(rec.net, LOSSES[rec.spec.loss], rec.data, rec.params[0] if rec.params else None)
    lmin, lmax = float(eig[0]), float(eig[-1])
    gnorm, g0 = float(grad.norm()), float(grad0.norm())
    ok = lmin >= -1e-4 * abs(lmax) and gnorm <= 0.05 * g0
    return ok, f"lambda_min {_g(lmin)}, lambda_max {_g(lmax)}, |g| {_g(gnorm)} (init {_g(g0)})"


def check_catapult(rec: Record, rerun: Callable) -> Truth:
    """lr*lambda0 in (2, 4); the loss jumps >= 2x its start, ends below it, at lambda_max < 2/lr."""
    values = _eval_values(rec)
    if not _finite(values):
        return Truth(False, "full-data loss non-finite")
    eig, _, _ = dense_hessian(rec.net, LOSSES[rec.spec.loss], rec.data)
    ratio, end_ratio = rec.lr * rec.lambda0, rec.lr * float(eig[-1])
    peak = max(values[:100])
    ok = 2 < ratio < 4 and peak >= 2 * values[0] and values[-1] < values[0] and end_ratio < 2
    at_min, min_detail = _at_minimum(rec)
    detail = (f"lr*lambda0 {ratio:.3g}; loss {values[0]:.3g} -> peak {peak:.3g} -> {values[-1]:.3g}; "
              f"lr*lambda_max at the end {end_ratio:.3g}" + ("; ends at a minimum" if at_min else ""))
    return Truth(ok, detail, frozenset({"local_minimum"}) if at_min else frozenset())


def check_divergence(rec: Record, rerun: Callable) -> Truth:
    """The full-data loss goes non-finite, or ends above its start and still rising over the last quarter; where
    the dense Hessian at init is affordable, also lr lambda0 > 2 (past plain gradient descent's limit)."""
    values = _eval_values(rec)
    ratio = f"lr*lambda0 {rec.lr * rec.lambda0:.3g}; " if rec.lambda0 else ""
    unstable = rec.lambda0 is None or rec.lr * rec.lambda0 > 2
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        return Truth(unstable, f"{ratio}full-data loss non-finite from step {rec.evals[bad][0]}")
    tail = values[3 * len(values) // 4:]
    rising = values[-1] > values[0] and tail[-1] > tail[0]
    return Truth(rising and unstable, f"{ratio}full-data loss {values[0]:.3g} -> {values[-1]:.3g}")


def check_minimum(rec: Record, rerun: Callable) -> Truth:
    """At the end: dense Hessian PSD, full gradient <= 5% of the initial one, and the mean full-data loss of the
    last quarter of the run within 2% of the quarter before (flat, up to the minibatch jitter)."""
    values = _eval_values(rec)
    if not _finite(values):
        return Truth(False, "full-data loss non-finite")
    at_min, detail = _at_minimum(rec)
    k = max(len(values) // 4, 1)
    last, before = sum(values[-k:]) / k, sum(values[-2 * k:-k]) / k
    flat = abs(last - before) <= 0.02 * abs(before)
    return Truth(at_min and flat, f"{detail}; mean loss of the last two quarters {before:.4g} -> {last:.4g}")


def linear_net_best_loss(data: Data) -> float:
    """The global minimum of ``1/2 |Y - W_L ... W_1 X|^2 / n`` for a deep linear net wide enough: least squares."""
    x, y = data[0].double(), data[1].double()
    coef = torch.linalg.lstsq(x, y).solution
    return float(half_squared_error(x @ coef, y))


def check_saddle(rec: Record, rerun: Callable) -> Truth:
    """Some step (every 10th) sits near a critical point (|g| <= 5% of its largest) with lambda_min < -1e-3
    |lambda_max| (far beyond rounding), on a plateau (the full-data loss changes < 1% over 50 steps around it, a
    stall by anyone's measure), and the loss later falls >= 10% below its level there (the escape).

    At the end the run may be at the global minimum in value (within 5% of least squares), where a deep linear
    net still has tiny negative curvature along the noise modes it has not learnt (modes of singular value ~0.04
    that take thousands of steps, worth the last few % of the loss): then local_minimum is allowed.
    """
    loss_fn = LOSSES[rec.spec.loss]
    found, gmax = None, 0.0
    stats = []
    for step in range(0, len(rec.params), 10):
        eig, grad, loss = dense_hessian(rec.net, loss_fn, rec.data, rec.params[step])
        stats.append((step, float(eig[0]), float(eig[-1]), float(grad.norm()), loss))
        gmax = max(gmax, float(grad.norm()))
    values = _eval_values(rec)
    at = dict(rec.evals)

    def on_plateau(step: int) -> bool:
        return any(abs(at[a + 50] - at[a]) < 0.01 * abs(at[a]) for a in range(step - 50, step + 1)
                   if a in at and a + 50 in at)

    for step, lmin, lmax, gnorm, loss in stats:
        later = min(v for s, v in rec.evals if s >= step)
        if lmin < -1e-3 * abs(lmax) and gnorm <= 0.05 * gmax and later <= 0.9 * loss and on_plateau(step):
            found = (step, lmin, lmax, gnorm, loss)
            break
    best = linear_net_best_loss(rec.data)
    at_min = math.isfinite(values[-1]) and values[-1] <= 1.05 * best
    may = frozenset({"local_minimum"}) if at_min else frozenset()
    if found is None:
        return Truth(False, f"no near-critical point with negative curvature (max |g| {_g(gmax)})", may)
    step, lmin, lmax, gnorm, loss = found
    return Truth(True, f"step {step}: lambda_min {_g(lmin)}, lambda_max {_g(lmax)}, |g| {_g(gnorm)} "
                       f"(max {_g(gmax)}), loss {_g(loss)}; ends at {_g(values[-1])} (least squares {_g(best)})"
                       + (": at the minimum" if at_min else ""), may)


def _design(data: Data) -> torch.Tensor:
    """``[X 1]`` in float64: ``nn.Linear``'s weight, then its bias, as one linear map."""
    x = data[0].double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def _least_squares_loss(rec: Record) -> float:
    """The mean squared error of the least-squares fit: the minimum of a linear regression's MSE."""
    design, y = _design(rec.data), rec.data[1].double()
    coef = torch.linalg.lstsq(design, y).solution
    return float(((design @ coef - y) ** 2).mean())


def _floor(values: Sequence[float]) -> float:
    tail = values[3 * len(values) // 4:]
    return sum(tail) / len(tail)


def _least_squares_solution(data: Data) -> torch.Tensor:
    return torch.linalg.lstsq(_design(data), data[1].double()).solution.reshape(-1)


def steep_autocorrelation(rec: Record, last: int = 100) -> float:
    """Lag-1 autocorrelation, over the last ``last`` steps, of the error ``u . (theta_t - theta*)`` along the top
    Hessian eigenvector ``u`` of a linear regression (the Hessian is constant; ``theta*`` is least squares).

    Near -1: the steep coordinate flips sign every step (a bounce); near +1: it creeps one way.
    """
    eig_vectors = torch.linalg.eigh(_regression_hessian(rec.data)).eigenvectors
    u, best = eig_vectors[:, -1], _least_squares_solution(rec.data)
    errors = torch.stack([(p.double() - best) @ u for p in rec.params[-last:]])
    errors = errors - errors.mean()
    return float((errors[1:] * errors[:-1]).sum() / (errors * errors).sum())


def _regression_hessian(data: Data) -> torch.Tensor:
    """The MSE's Hessian ``2 [X 1]^T [X 1] / n``, the same at every point."""
    design = _design(data)
    return 2.0 * design.T @ design / design.shape[0]


def momentum_of(spec: RunSpec) -> float:
    return float(spec.optimizer[len("sgd_m"):]) if spec.optimizer.startswith("sgd_m") else 0.0


def check_oscillation(rec: Record, rerun: Callable) -> Truth:
    """Each step overshoots the steep direction (lr lambda_max > 1 + momentum, where the noise-driven error along
    it is anti-correlated from step to step, lag-1 autocorrelation 1 - lr lambda / (1 + momentum)), and it is
    seen: the measured autocorrelation over the last 100 steps is < -0.3; the loss floor (mean of the last quarter)
    sits >= 5% above the least-squares loss, and a rerun at half the lr gets closer to it (the step, not the data,
    sets the floor)."""
    values = _eval_values(rec)
    if not _finite(values):
        return Truth(False, "full-data loss non-finite")
    beta, ratio = momentum_of(rec.spec), rec.lr * rec.lambda0
    rho, predicted = steep_autocorrelation(rec), 1 - ratio / (1 + beta)
    best = _least_squares_loss(rec)
    floor = _floor(values)
    half_floor = _floor(_eval_values(rerun(rec.lr / 2)))
    ok = ratio > 1 + beta and rho < -0.3 and floor >= 1.05 * best and half_floor - best < floor - best
    return Truth(ok, f"lr*lambda_max {ratio:.3g}; steep-error autocorrelation {rho:.2f} (predicted {predicted:.2f}); "
                     f"loss floor {floor:.4g} vs least squares {best:.4g}; at lr/2: {half_floor:.4g}")


def check_plateau(rec: Record, rerun: Callable) -> Truth:
    """The loss fell < 10% while a rerun at 1000x the lr fell > 5x more; lr*lambda0 < 1e-2 where measured."""
    values = _eval_values(rec)
    if not _finite(values):
        return Truth(False, "full-data loss non-finite")
    fell = values[0] - values[-1]
    big = _eval_values(rerun(rec.lr * 1000))
    big_fell = values[0] - min(big) if _finite(big) else math.nan
    ratio_ok = rec.lambda0 is None or rec.lr * rec.lambda0 < 1e-2
    ok = fell < 0.1 * values[0] and big_fell > 5 * fell and ratio_ok
    ratio = f"lr*lambda0 {rec.lr * rec.lambda0:.2g}; " if rec.lambda0 else ""
    return Truth(ok, f"{ratio}loss {values[0]:.4g} -> {values[-1]:.4g} (fell {fell:.3g}); at 1000x lr it fell "
                     f"{big_fell:.3g}")


TRUTH_CHECKS: dict[str, Callable[[Record, Callable], Truth]] = {
    "healthy": check_healthy,
    "spike": check_spike,
    "catapult": check_catapult,
    "divergence": check_divergence,
    "minimum": check_minimum,
    "saddle": check_saddle,
    "oscillation": check_oscillation,
    "plateau": check_plateau,
}


# --- advice check: rerun with the learning rate optdiag proposed ---------------------------------------------------
#: Truth classes whose verdict's lr advice is rerun, and the verdict kind that carries it.
ADVICE_CHECKED = {"oscillation": "oscillation", "plateau": "plateau", "minimum": "local_minimum",
                  "saddle": "saddle_point"}


def suggested_lr(diagnoses: Sequence[Any], kind: str) -> float | None:
    """The proposed lr of the first ``kind`` verdict's first suggestion that proposes one: an ``lr`` suggestion,
    or a ``schedule`` one with both numbers (then both are learning rates: the decay a minimum gets)."""
    for d in diagnoses:
        if d.kind == kind:
            for s in d.suggestions:
                if s.proposed is not None and (s.target == "lr" or (s.target == "schedule" and s.current is not None)):
                    return float(s.proposed)
    return None


def _steps_to_reach(values: Sequence[float], level: float) -> int | None:
    return next((i for i, v in enumerate(values) if v <= level), None)


def check_advice(rec: Record, rerun: Callable) -> str:
    """Rerun with optdiag's proposed lr: oscillation -> a lower loss floor; plateau -> real progress (the loss
    falls >= 5x as much as in the run, and by >= 10% of where it started); minimum -> a floor no higher (a decay
    cannot lower a noise-free floor: "no change" within 0.1%); saddle -> the run's final loss (within 5%) reached
    sooner."""
    lr = suggested_lr(rec.diagnoses, ADVICE_CHECKED[rec.spec.truth])
    if lr is None:
        return "no lr suggestion"
    values, new = _eval_values(rec), _eval_values(rerun(lr))
    head = f"lr {rec.lr:.3g} -> {lr:.3g}: "
    if not _finite(new):
        return head + "BAD (the rerun diverged)"
    if rec.spec.truth in ("oscillation", "minimum"):
        before, after = _floor(values), _floor(new)
        same = rec.spec.truth == "minimum" and abs(after - before) <= 1e-3 * abs(before)
        verdict = "no change" if same else "helped" if after < before else "BAD"
        return head + f"floor {before:.4g} -> {after:.4g} ({verdict})"
    if rec.spec.truth == "saddle":
        level = 1.05 * values[-1]
        before, after = _steps_to_reach(values, level), _steps_to_reach(new, level)
        good = after is not None and (before is None or after < before)
        return head + f"within 5% of the final loss at eval {before} -> {after} " + ("(helped)" if good else "(BAD)")
    before, after = values[0] - values[-1], values[0] - new[-1]
    good = after >= 5 * max(before, 0.0) and after >= 0.1 * abs(values[0])
    return head + f"loss fell {before:.3g} -> {after:.3g} " + ("(helped)" if good else "(BAD)")


# --- the corpus ----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    spec: RunSpec
    record: Record
    truth: Truth
    score: Score | None  # None when the truth was not established
    advice: str = ""
    seconds: float = 0.0
    repeats: list[list[Any]] = field(default_factory=list)  # the verdicts of each further training with OptDiag


def judge(truth_class: str, truth: Truth, verdicts: Sequence[tuple[int, str]],
          evals: Sequence[tuple[int, float]]) -> Score | None:
    """Score ``(step, kind)`` verdicts against a run's truth class, its truth check and its full-data losses.

    None when the truth was not established. A ``loss_spike`` verdict on a run not built to spike is allowed when
    the full-data loss did spike and recover (:func:`spikes_in`) and each such verdict follows a peak
    (:func:`spike_verdicts_supported`); the peaks are added to ``truth.detail``.

    Example:
        >>> evals = [(0, 2.0), (10, 1.0), (20, 3.0), (30, 0.9)]  # a spike peaking at step 20
        >>> s = judge("healthy", Truth(True, "falls"), [(40, "loss_spike")], evals)
        >>> s.ok, sorted(s.accepted)
        (True, ['loss_spike'])
    """
    should, may = EXPECTED[truth_class]
    may |= truth.may
    values = [v for _, v in evals]
    spikes = spikes_in(values) if _finite(values) else []
    if spikes and "loss_spike" not in should:
        # a loss_spike verdict states a fact: acceptable on any run, if each one follows a real full-data spike
        peaks = [evals[p][0] for *_, p in spikes]
        if spike_verdicts_supported([step for step, kind in verdicts if kind == "loss_spike"], peaks):
            may |= {"loss_spike"}
        truth.detail += " (recovering spikes peaking at step " + ", ".join(str(p) for p in peaks) + ")"
    return score_run((kind for _, kind in verdicts), should, may) if truth.ok else None


def run_one(spec: RunSpec, root: str | None = None, repeat: int = 1) -> Outcome:
    """Train ``spec`` with OptDiag (``repeat`` times: the same trajectory, but the Hessian monitor's budget is
    wall time, so its snapshots, and the verdicts resting on them, may differ), establish the truth, score."""
    started = time.perf_counter()
    rec = train(spec, root=root)
    repeats = [train(spec, root=root).diagnoses for _ in range(repeat - 1)]

    def rerun(lr: float) -> Record:
        return train(spec, lr=lr, with_optdiag=False, root=root)

    try:
        truth = TRUTH_CHECKS[spec.truth](rec, rerun)
    except Exception as exc:  # a truth check that cannot run establishes nothing
        truth = Truth(False, f"truth check failed: {type(exc).__name__}: {exc}")
    score = judge(spec.truth, truth, [(d.step, d.kind) for d in rec.diagnoses], rec.evals)
    advice = check_advice(rec, rerun) if spec.truth in ADVICE_CHECKED else ""
    return Outcome(spec, rec, truth, score, advice, time.perf_counter() - started, repeats)


def select(only: str | None) -> list[RunSpec]:
    if not only:
        return list(RUNS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    by_name = {s.name: s for s in RUNS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown run(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def _schedule_text(spec: RunSpec) -> str:
    if spec.schedule.startswith("burst:"):
        start, length, mult = spec.schedule.split(":")[1:]
        return f"lr x{mult} steps {start}-{int(start) + int(length) - 1}"
    return spec.schedule


def _verdicts_text(diagnoses: Sequence[Any]) -> str:
    return ", ".join(f"{d.step} {d.kind} {d.confidence:.2f}" for d in diagnoses) or "none"


def _result_text(o: Outcome) -> str:
    if o.score is None:
        return "truth not established"
    if o.score.ok:
        return "right"
    parts = [f"{name} {', '.join(sorted(getattr(o.score, attr)))}"
             for name, attr in (("missed", "missed"), ("wrong", "wrong"), ("false alarm", "false_alarms"))
             if getattr(o.score, attr)]
    return "WRONG: " + "; ".join(parts)


def _table(rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        return lines
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def run_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    rows = [["run", "family", "optimizer", "lr", "batch", "schedule", "truth", "verdicts (step kind confidence)",
             "result"]]
    for o in outcomes:
        s = o.spec
        rows.append([s.name, s.family, s.optimizer, f"{o.record.lr:.3g}", "full" if s.batch is None else str(s.batch),
                     _schedule_text(s), s.truth, _verdicts_text(o.record.diagnoses), _result_text(o)])
    return rows


def kind_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    table = tally(o.score for o in outcomes if o.score is not None)
    rows = [["kind", "right", "accepted", "wrong", "false alarms", "missed", "precision", "recall"]]
    for kind, t in table.items():
        rows.append([kind, str(t.right), str(t.accepted), str(t.wrong), str(t.false_alarms), str(t.missed),
                     _g(t.precision), _g(t.recall)])
    return rows


def _warnings_text(said: Sequence[str]) -> str:
    """Distinct optdiag warnings, each cut at its first clause, with counts."""
    counts: dict[str, int] = {}
    for message in said:
        key = message.removeprefix("optdiag: ").split(";")[0].split(" (")[0]
        key = key if len(key) <= 80 else key[:80].rsplit(" ", 1)[0] + " ..."
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{n}x {k}" for k, n in counts.items()) or "—"


def _repeats_text(o: Outcome) -> str:
    """'same' when every repeat gave the first run's kinds in order, else each repeat's verdicts."""
    first = [d.kind for d in o.record.diagnoses]
    if all([d.kind for d in r] == first for r in o.repeats):
        return f"same ({len(o.repeats)} repeat{'s' if len(o.repeats) > 1 else ''})"
    return " / ".join(_verdicts_text(r) for r in o.repeats)


def unstable_runs(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.spec.name for o in outcomes if not _repeats_text(o).startswith("same")]


def detail_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    rows = [["run", "truth check", "advice rerun", "curvature snapshots", "optdiag warnings", "seconds"]]
    repeated = any(o.repeats for o in outcomes)
    if repeated:
        rows[0].insert(3, "verdicts of the repeats")
    for o in outcomes:
        rows.append([o.spec.name, ("" if o.truth.ok else "NOT ESTABLISHED: ") + o.truth.detail, o.advice or "—",
                     str(o.record.snapshots), _warnings_text(o.record.warnings), f"{o.seconds:.1f}"])
        if repeated:
            rows[-1].insert(3, _repeats_text(o))
    return rows


def summary_line(outcomes: Sequence[Outcome]) -> str:
    scored = [o for o in outcomes if o.score is not None]
    right = sum(o.score.ok for o in scored)
    line = (not_the_defaults(OVERRIDES) + "; " if OVERRIDES else "") + (
        f"{len(outcomes)} runs: truth established for {len(scored)}, verdicts right on {right}/{len(scored)}, "
        f"truth not established for {len(outcomes) - len(scored)}")
    if any(o.repeats for o in outcomes):
        unstable = unstable_runs(outcomes)
        line += (f"; trained {len(outcomes[0].repeats) + 1}x with OptDiag: verdict kinds changed between repeats on "
                 f"{len(unstable)}" + (f" ({', '.join(unstable)})" if unstable else ""))
    return line


def report(outcomes: Sequence[Outcome], markdown: bool = False) -> str:
    parts = ["Runs:", *_table(run_rows(outcomes), markdown), "",
             "Per kind (runs; a kind repeated in a run counts once):", *_table(kind_rows(outcomes), markdown), "",
             "Truth checks and advice reruns:",
             *_table(detail_rows(outcomes), markdown), "", summary_line(outcomes)]
    return "\n".join(parts)


DOC_INTRO = """\
# The verdict corpus

A verdict is a claim a user acts on: "you are at a saddle, raise the momentum" makes someone change a run. The
verdict corpus is the yardstick for those claims: `benchmarks/verdict_corpus.py` trains {n} short, real PyTorch
Lightning runs with `optdiag.OptDiag()` **at its defaults** (a run may pass `loss_floor`; none does today) and
holds every verdict against a truth the script establishes **without optdiag**. This page is written by
`python benchmarks/verdict_corpus.py --write-docs`; the numbers below are from the commit it names.

```bash
python benchmarks/verdict_corpus.py                              # all runs, ~1-2 min on 2 cores
python benchmarks/verdict_corpus.py --only osc_sgd_b16,plateau_mlp_sgd_b64
python benchmarks/verdict_corpus.py --repeat 2 --json out.json   # each run trained twice with OptDiag; JSON too
python benchmarks/verdict_corpus.py --write-docs --repeat 2      # regenerate this page
```

## What is trained

Model families: MLPs on scikit-learn's bundled 8x8 digits (with and without BatchNorm + dropout), a BatchNorm CNN
on the digits, a small transformer (two `nn.TransformerEncoderLayer` on 8-token sequences labelled by their
largest token), and small nets whose dense Hessian is affordable (linear regression, a 4-16-1 tanh MLP, a width-128
2-layer ReLU net, 2- and 3-layer linear nets). Optimizers: SGD, heavy ball (SGD momentum 0.9), Adam, AdamW.
Batches from 8 to the full batch; schedules constant, cosine, linear warmup + cosine, and an lr burst
(`LambdaLR`). Everything is seeded, runs on one CPU thread, logger off, `default_root_dir` in a temporary folder.
Nothing is downloaded.

## How a run is scored

Each run belongs to a truth class that says which verdict kinds it SHOULD get and which it MAY get; the truth check
can allow more (a run that ends at a minimum may get `local_minimum`). A `loss_spike` verdict states a fact, so it
is allowed on any run whose full-data loss did spike and recover (rose 1.5x above its low so far, then came back
within 10% of that low), whatever its class, when each such verdict comes at most 100 steps after (or 10 before) a spike's peak;
elsewhere it is wrong or a false alarm. A run is **right** when it got every kind it should and nothing else it may
not. A kind given but not allowed is **wrong** on a run that expected other kinds and a **false alarm** on a run
that expected none; an expected kind not given is **missed**. A run whose truth check fails is reported as **truth
not established** and is not scored: the run did not do what it was built to do, so no verdict on it can be judged.

| truth class | should get | may get | truth established by |
|---|---|---|---|
| healthy | nothing | | the full-data loss, evaluated every few steps in eval mode, falls >= 2% over each quarter of the run |
| spike | `loss_spike` | | the full-data loss (every step or two) rises >= 1.5x above its low so far, and ends below that low |
| catapult | `loss_spike` | `local_minimum` if it ends at one | dense Hessian at init: 2 < lr lambda0 < 4; the loss jumps >= 2x its start within 100 steps, ends below its start, at a point where lr lambda_max < 2 (a flatter region) |
| divergence | `divergence` | | the full-data loss turns non-finite, or ends above its start still rising over the last quarter; lr lambda0 > 2 where the dense Hessian at init is affordable |
| minimum | `local_minimum` | | at the end: dense Hessian PSD (lambda_min >= -1e-4 lambda_max), full gradient <= 5% of the initial one, full-data loss flat (the mean of the last quarter within 2% of the quarter before) |
| saddle | `saddle_point` | `local_minimum` if it ends within 5% of the least-squares loss | dense Hessian every 10 steps: a near-critical point (full gradient <= 5% of its largest) with lambda_min < -1e-3 lambda_max, on a plateau (the loss changes < 1% over 50 steps around it), after which the loss falls >= 10% (the escape) |
| oscillation | `oscillation` | | linear regression, where the Hessian is constant and the minimum is least squares: lr lambda_max > 1 + momentum (each step overshoots the steep direction, so the noise-driven error along it has lag-1 autocorrelation 1 - lr lambda / (1 + momentum) < 0), the measured autocorrelation over the last 100 steps is < -0.3 (a bounce), the loss floor is >= 5% above the least-squares loss, and a rerun at half the lr gets closer to it |
| plateau | `plateau` | | the loss falls < 10% over the run, a rerun at 1000x the lr falls > 5x more, and lr lambda0 < 1e-2 where a dense Hessian is affordable |

Advice is checked too, beside the truth: an oscillation, plateau, minimum or saddle run that got an lr
suggestion (for a minimum, the decay: a schedule's proposed lr) is rerun (without optdiag) with the proposed lr;
the suggestion *helped* when the oscillation's or the minimum's loss floor went down (a decay cannot lower a
noise-free floor: *no change* within 0.1%), when the plateau's loss fell at least 5x as much as in the run and by
at least 10% of its start (real progress), or when the saddle run reached its final loss (within 5%) sooner. A
run with no numeric lr suggestion says so.

Training is deterministic and bitwise the same with or without optdiag, but the Hessian monitor's budget is wall
time: on a loaded machine a curvature snapshot may be skipped in one run and taken in the next, and the verdicts
that rest on it change. `--repeat N` trains each run N times with OptDiag (the first is scored) and lists the runs
whose verdict kinds changed.

**Before the rewrite.** The corpus was first run on commit `616f91a`, before the stall detector and classifier were
rewritten (loss spikes, no "uncertain" verdicts): 11 of 25 runs right. 5 of the 7 healthy runs got a false alarm (4
`saddle_point`, 1 `oscillation`) while their full-data loss fell 8-96% per quarter; all 3 recovering spikes and both
catapults were called `saddle_point` or `divergence`; the three saddle runs got `oscillation` or `divergence`
verdicts (confidence 0.00-0.21) and two of them a `saddle_point` of confidence 0.00-0.50; the momentum oscillation
also got `divergence`. Minimum (3/3), plateau (2/2), divergence (3/3) and the SGD oscillation were right.

**Since then.** Spikes of a step or two, which the three-loss median filters out, are nominated by the minibatch
loss and read on the model (the probe batches' loss before the optimizer step and every three steps after, a spike
when it came back by 1.5x on every batch); "looks flat" is judged on the last two windows, so that the probe loss
is read in a stall that follows a descent; repeated spikes are asked first whether they are an oscillation's bounce;
where no eigen-solve was affordable, plain SGD's critical sharpness stands in for the stability ratio. The two noisy
minimum runs were lengthened from 300 to 600 steps and the SGD oscillation from 400 to 800: at 2-4% jitter of the
loss on fixed batches (25-60% on minibatches) a flat trend takes a few hundred steps to prove, and at 300-400 steps
they were missed (no verdict), not wrong. The oscillation runs' full-data loss is evaluated every step (it was every
five): their bounces last three to six steps, and a loss-spike verdict must be checkable against the fact it states.

**Since the one budget** (all measurement charged to the Hessian monitor's bucket: the probe-set losses no longer
have a 5% of their own; refreshes paid from earned credit only; a recovered spike's own snapshot routine unless a
catapult is possible). The noisy minimum runs first lost their verdicts under the shared budget: the starting
credit went to two refreshes at steps 3 and 4, and the probe losses that proved the stall then left too little for
its snapshot; with refreshes paid from earned credit the starting credit waits for a stall, and both are right
again. An undecided stall short of consecutive-gradient pairs has the gradient monitor measure every step and is
looked at again once there are enough. The CNN's Adam burst (lr x30 for five steps) is now a `loss_spike`: its
probe batches rose 2.1x and 1.06x on the way up (a mean of 1.38x, under the spike ratio, so it was not followed);
a rise is now followed when the mean or one batch reached the ratio, and the fall from the top, on every batch,
still decides.

**The batch-16 saddle, found.** The 2-layer linear net at batch 16 was the one miss until `d815a55`, found in about
one try in three: its first plateau (the saddle at the origin) lasts about 55 steps under the 25-60% noise of
batch-16 losses and is proven at step 65, when the escape has begun (its gradient pairs are then no longer
statistically zero: no rule decides, rightly); its second plateau (about 80 steps, 100-180) had to be proven by the
probe loss, whose reads the budget admitted one by one: on this tiny model a read costs a third of a training step,
so about half were refused, a window of ten reads spanned up to 100 steps, and the plateau ended first. Two changes
fixed it (docs/diagnosis-rules.md): the reads are spaced once per episode (every 5 or 10 steps, at what the fit
earns) and the probe detector's window spans the same steps at any spacing, and a retry whose first look measured
the curvature reuses it, so that the looks at steps 74 and 99 no longer spend the budget the second plateau's
snapshot needs. The run has got `saddle_point` in every try since (twelve, at steps 144-179), on the second plateau,
with a measured lambda_min of about -1: minus the second singular value of the map, as for a deep linear net that
has learnt one of its two modes (the truth check's dense Hessian names the first saddle, at the origin). No healthy
run gets a verdict, and no verdict is wrong. The oscillation runs' bounces are reported as the loss spikes they are
(the model's loss rose and came back, checked on the full data every step) beside the oscillation verdict that
explains them; whether a given bounce is reported as a spike or as the oscillation depends on whether the budget
paid for curvature near it, so those kinds can change from one try to the next (`--repeat`), as can a second verdict
(`local_minimum` once a saddle run has reached its minimum).

Per-kind precision = (right + accepted) / runs that got the kind; recall = right / runs that should get it.
Counts are of runs: a kind given three times in one run counts once. The corpus is small and each run has one
seed: read a single wrong verdict as a case to look at, not as a rate.
"""


def to_json(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """One plain dict per run, to compare two commits' corpora line by line."""
    return [{
        "name": o.spec.name, "truth": o.spec.truth, "truth_established": o.truth.ok, "truth_detail": o.truth.detail,
        "verdicts": [{"step": d.step, "kind": d.kind, "confidence": d.confidence} for d in o.record.diagnoses],
        "repeats": [[{"step": d.step, "kind": d.kind} for d in r] for r in o.repeats],
        "result": _result_text(o), "advice": o.advice, "warnings": o.record.warnings, "seconds": o.seconds,
    } for o in outcomes]


def write_docs(outcomes: Sequence[Outcome], seconds: float, path: str, threads: int = 1) -> None:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
                          ).stdout.strip() or "unknown"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "optdiag"], cwd=REPO, capture_output=True,
                           text=True).stdout.rstrip()  # not strip(): each line starts with its two status columns
    where = f"commit `{head}`"
    if dirty:  # the numbers are then of the working tree, not of the commit alone
        files = [f"`{line[3:]}`" for line in dirty.splitlines() if line.strip()]
        where += " plus uncommitted changes to " + (", ".join(files) if len(files) <= 4 else f"{len(files)} files")
    def prose(text: str) -> str:
        return textwrap.fill(text, width=116, break_on_hyphens=False, break_long_words=False)

    lines = [DOC_INTRO.format(n=len(outcomes)).rstrip(), "", "## Results", "",
             prose(f"Measured {today} at {where} ({len(outcomes)} runs, {seconds:.0f} s on {threads} torch "
                   f"thread(s)). {summary_line(outcomes)}."), "",
             "### Per kind", "",
             prose("Counted in runs (a kind given twice in one run counts once); only runs whose truth was "
                   "established. *right*: expected and given; *accepted*: allowed by the truth check and given; "
                   "*wrong*: given on a run that expected other kinds; *false alarms*: given on a run that expected "
                   "none; *missed*: expected, not given. Precision = (right + accepted) / given; recall = right / "
                   "expected."), "",
             *_table(kind_rows(outcomes), True), "", "### Per run", "", *_table(run_rows(outcomes), True), "",
             "### Truth checks and advice reruns", "", *_table(detail_rows(outcomes), True), "",
             "## The runs", ""]
    for s in (o.spec for o in outcomes):
        should, _ = EXPECTED[s.truth]
        item = (f"- **{s.name}** ({s.truth}; should get: {', '.join(sorted(should)) or 'nothing'}; "
                f"{s.steps} steps, {s.optimizer}, batch {'full' if s.batch is None else s.batch}, "
                f"{_schedule_text(s)}): {s.description}")
        lines.append(textwrap.fill(item, width=116, subsequent_indent="  ", break_on_hyphens=False,
                                   break_long_words=False))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--write-docs", action="store_true", help="write docs/verdict-corpus.md")
    parser.add_argument("--json", metavar="PATH", help="also write the per-run results as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=setting,
                        help="diagnostic only: an OptDiag setting for every run instead of its default (a Python "
                             "literal, e.g. every_n_steps=25); the report says so")
    parser.add_argument("--repeat", type=int, default=1,
                        help="train each run this many times with OptDiag and report verdicts that change (the first "
                             "is scored)")
    args = parser.parse_args(argv)
    specs = select(args.only)
    OVERRIDES.update(args.set)
    if OVERRIDES and args.write_docs:
        raise SystemExit("--write-docs records the defaults; drop --set")
    from optdiag.demo.runner import quiet_lightning

    outcomes = []
    started = time.perf_counter()
    with quiet_lightning():
        torch.set_num_threads(args.threads)
        for spec in specs:
            o = run_one(spec, repeat=args.repeat)
            outcomes.append(o)
            print(f"{spec.name}: {_verdicts_text(o.record.diagnoses)} -> {_result_text(o)} "
                  f"[{o.truth.detail}] ({o.seconds:.1f} s)", flush=True)
        seconds = time.perf_counter() - started
    print()
    print(report(outcomes))
    print(f"\n{seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(outcomes), f, indent=1)
    if args.write_docs:
        write_docs(outcomes, seconds, os.path.join(REPO, "docs", "verdict-corpus.md"), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
