"""How much does one Hessian-vector product cost, in gradients? Every HessianOperator engine, side by side.

For each model (an MLP on 8x8 digits-size inputs, a small CNN with BatchNorm, a small transformer block) and each
method, in one process and interleaved so that machine load hits all alike:

* ``grad``: one forward + backward (``torch.autograd.grad`` of the mean loss), the unit of cost;
* ``HVP (amortised)``: (operator construction + 30 products at one point) / 30, graph build included, the way a
  Lanczos run pays for it;
* ``HVP (marginal)``: the median single product once the operator exists;
* ``HVP (matmat 30)``: per product when the 30 vectors go in one vectorised ``op @ V``.

Medians over repeats. Prints a markdown table.

Usage:
    python benchmarks/bench_hvp.py            # full
    python benchmarks/bench_hvp.py --quick    # a smoke run (fewer repeats)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from optdiag.curvature.operator import HessianOperator, supervised_loss

N_HVP = 30


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def _digits_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:  # the 8x8 digits ship inside scikit-learn: nothing is downloaded
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data[:n], dtype=torch.float32) / 16.0
        return x, torch.tensor(data.target[:n], dtype=torch.long)
    except ImportError:
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _problems(batch: int) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "MLP 64-128-128-10 (digits)": (DigitsMLP(), _digits_batch(batch)),
        "CNN 2 conv + BN, 3x16x16": (
            SmallCNN().train(),
            (torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)),
        ),
        "Transformer block d=64, 16 tokens": (
            TransformerBlock(),
            (torch.randn(batch, 16, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)),
        ),
    }


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gradient(model: nn.Module, loss_fn, batch) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(loss_fn(model, batch), params)


def _amortised(model, loss_fn, batch, method: str, vectors: torch.Tensor) -> tuple[float, float, float]:
    """(construction + N_HVP products) / N_HVP, the median single product, and the per-product time of one
    ``matmat`` of N_HVP vectors."""
    construction = _timed(lambda: ops.append(HessianOperator(model, loss_fn, batch, method=method)))
    op = ops.pop()
    products = [_timed(lambda: op.matvec(vectors[:, j])) for j in range(N_HVP)]
    batched = _timed(lambda: op.matmat(vectors)) / N_HVP
    op.close()
    return (construction + sum(products)) / N_HVP, statistics.median(products), batched


ops: list = []  # hands the operator out of the timed lambda


def run(quick: bool) -> str:
    repeats = 3 if quick else 7
    batch = 64
    loss_fn = supervised_loss(nn.CrossEntropyLoss())
    methods = ["graph", "recompute", "func", "linearize"]
    rows = []
    for name, (model, data) in _problems(batch).items():
        n = sum(p.numel() for p in model.parameters())
        vectors = torch.randn(n, N_HVP, generator=torch.Generator().manual_seed(1))
        for method in ["auto"] + methods:  # warm-up (lazy initialisation, linearize's tracing machinery)
            _amortised(model, loss_fn, data, method, vectors[:, :2].repeat(1, N_HVP // 2))
        times: dict[str, list] = {"grad": [], **{m: [] for m in methods}}
        for _ in range(repeats):  # interleaved: load on the machine affects every column alike
            times["grad"].append(statistics.median(_timed(lambda: _gradient(model, loss_fn, data)) for _ in range(5)))
            for method in methods:
                times[method].append(_amortised(model, loss_fn, data, method, vectors))
        grad = statistics.median(times["grad"])
        auto = HessianOperator(model, loss_fn, data).method
        for method in methods:
            amortised, marginal, batched = (statistics.median(t[i] for t in times[method]) for i in range(3))
            rows.append(
                f"| {name} | {n} | {method}{' (auto)' if method == auto else ''} | {grad * 1e3:.2f} | "
                f"{amortised * 1e3:.2f} | {amortised / grad:.2f} | {marginal * 1e3:.2f} | {marginal / grad:.2f} | "
                f"{batched * 1e3:.2f} | {batched / grad:.2f} |"
            )
    header = (
        f"HVP cost on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {batch}, float32, load average "
        f"{os.getloadavg()[0]:.1f}; medians of {repeats} repeats\n\n"
        "| model | params | method | grad ms | HVP amortised ms | ratio | HVP marginal ms | ratio | "
        "HVP in matmat(30) ms | ratio |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(run(args.quick))


if __name__ == "__main__":
    main()
