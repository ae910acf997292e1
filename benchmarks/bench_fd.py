"""Exact (double backward) against finite-difference Hessian-vector products: time per product and accuracy.

On the models of ``bench_hvp.py`` (an MLP with tanh on 8x8 digits-size inputs, a small CNN with BatchNorm and ReLU,
a transformer block with GELU) in float32 and float64, one process, interleaved so that machine load hits both
alike:

* ``grad``: one forward + backward, the unit of cost;
* ``exact`` / ``FD``: the median single product once the operator exists (``HessianOperator``, its default engine;
  ``FiniteDifferenceOperator``: two gradients, its error check left out);
* ``rel. error Hv``: the median over random unit directions of ``|Hv_fd - Hv_exact| / |Hv_exact|``;
* ``rel. error lambda_max``: ``|lambda_fd - lambda_exact| / lambda_exact`` from ``top_eigenvalues`` (tol 1e-6) on
  each operator; ``FD estimate``: the operator's own error estimate (first product against twice the step).

Prints a markdown table.

Usage:
    python benchmarks/bench_fd.py            # full
    python benchmarks/bench_fd.py --quick    # a smoke run (fewer repeats)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hvp import _problems  # noqa: E402  (the same models as the engine benchmark)

from optdiag.curvature import top_eigenvalues  # noqa: E402
from optdiag.curvature.operator import FiniteDifferenceOperator, HessianOperator, supervised_loss  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(name: str, model, batch, dtype: torch.dtype, repeats: int) -> str:
    model = copy.deepcopy(model).to(dtype)
    x, y = batch
    batch = (x.to(dtype), y)
    loss_fn = supervised_loss(torch.nn.CrossEntropyLoss())
    params = [p for p in model.parameters() if p.requires_grad]
    exact = HessianOperator(model, loss_fn, batch)
    fd = FiniteDifferenceOperator(model, loss_fn, batch, error_checks=1)
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(exact.num_params, repeats, generator=g, dtype=torch.float64).to(dtype)
    directions /= directions.norm(dim=0)
    fd.matvec(directions[:, 0])  # the error check (two more gradients) is spent here, outside the timing
    t_grad = _median_seconds(lambda: torch.autograd.grad(loss_fn(model, batch), params), repeats)
    t_exact, t_fd, errors = [], [], []
    for j in range(repeats):
        v = directions[:, j]
        start = time.perf_counter()
        hv = exact.matvec(v)
        t_exact.append(time.perf_counter() - start)
        start = time.perf_counter()
        hv_fd = fd.matvec(v)
        t_fd.append(time.perf_counter() - start)
        errors.append(float((hv_fd - hv).norm() / hv.norm()))
    top_exact = float(top_eigenvalues(exact, k=1, tol=1e-6, max_hvp=150).eigenvalues[0])
    top_fd = float(top_eigenvalues(fd, k=1, tol=1e-6, max_hvp=150).eigenvalues[0])
    exact.close()
    dtype_name = str(dtype).removeprefix("torch.")
    t_exact_ms, t_fd_ms = statistics.median(t_exact) * 1e3, statistics.median(t_fd) * 1e3
    return (f"| {name} | {dtype_name} | {exact.num_params} | {t_grad * 1e3:.2f} | {t_exact_ms:.2f} "
            f"({t_exact_ms / (t_grad * 1e3):.1f}) | {t_fd_ms:.2f} ({t_fd_ms / (t_grad * 1e3):.1f}) | "
            f"{statistics.median(errors):.1e} | {abs(top_fd - top_exact) / abs(top_exact):.1e} | "
            f"{fd.relative_error:.1e} |")


def run(quick: bool) -> str:
    repeats = 5 if quick else 15
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64, medians of {repeats}",
        "",
        "| model | dtype | params | grad ms | exact ms (grads) | FD ms (grads) | rel. error Hv | "
        "rel. error lambda_max | FD estimate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (model, batch) in _problems(64).items():
        for dtype in (torch.float32, torch.float64):
            lines.append(_row(name, model, batch, dtype, repeats))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.quick))


if __name__ == "__main__":
    main()
