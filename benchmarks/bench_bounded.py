"""What the memory bounds of the analysis cost in accuracy, on a small network whose Hessian is known exactly.

A tanh MLP (``--width``, default 2,818 parameters) trained for a few hundred full-batch steps on generated data;
its dense Hessian (``HessianOperator.to_dense``) gives the exact trace and spectrum. For each bound the analysis
applies on large models, the bounded computation is compared with the unbounded one at the same product count:

* the trace: Hutch++ with a sketch of ``--sketch`` vectors (what 256 MiB holds of an 11M-parameter model) against
  the unbounded third of the budget, error against the exact trace over ``--seeds`` seeds;
* the density: stochastic Lanczos quadrature reorthogonalised against the last ``--window`` vectors against full
  reorthogonalisation, L1 distance of each smoothed density to the exact spectrum smoothed with the same width;
* epsilon-sharpness: the corner ascent against scipy's L-BFGS-B (10 iterations each), at the trained point and at
  a point part-way through training.

    nice python benchmarks/bench_bounded.py            # about a minute on one core
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import nn

from optdiag.curvature import HessianOperator, MatrixOperator, hessian_trace, spectral_density
from optdiag.curvature.density import _gaussian_mixture
from optdiag.curvature.sharpness import epsilon_sharpness


def problem(width: int, steps: int, seed: int = 0) -> tuple[nn.Module, tuple, nn.Module]:
    """The MLP after ``steps`` of full-batch SGD on generated data, and the data (two-class, 256 samples)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 20, generator=gen, dtype=torch.float64)
    labels = (inputs[:, :2].sum(1) + 0.3 * torch.randn(256, generator=gen, dtype=torch.float64) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(model(inputs), labels).backward()
        optimizer.step()
    return model, (inputs, labels), criterion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--sketch", type=int, default=6)
    parser.add_argument("--window", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, batch, criterion = problem(args.width, args.steps)
    loss_fn = lambda m, b: criterion(m(b[0]), b[1])  # noqa: E731
    hessian = HessianOperator(model, loss_fn, batch).to_dense()
    eigenvalues = torch.linalg.eigvalsh(hessian).numpy()
    exact_trace, n = float(eigenvalues.sum()), eigenvalues.size
    op = MatrixOperator(hessian)
    print(f"{n} parameters, lambda_max {eigenvalues[-1]:.4g}, lambda_min {eigenvalues[0]:.4g}, "
          f"trace {exact_trace:.5g}\n")

    print("| trace, 60 products | sketch vectors | RMS relative error | mean stderr / trace |")
    print("|---|---|---|---|")
    for method, sketch in (("hutch++", 20), ("hutch++", args.sketch), ("hutch++", 1), ("hutchinson", 0)):
        errors, stderrs = [], []
        for seed in range(args.seeds):
            result = hessian_trace(op, 60, seed=seed, method=method, max_sketch=max(sketch, 1))
            errors.append((result.estimate - exact_trace) / exact_trace)
            stderrs.append(result.stderr / abs(exact_trace))
        print(f"| {method} | {sketch} | {math.sqrt(np.mean(np.square(errors))):.2e} | {np.mean(stderrs):.2e} |")

    print("\n| density, 2 runs x 40 steps | vectors held | L1 distance to the exact density (mean over seeds) "
          "| mean of the nodes vs tr(H)/n |")
    print("|---|---|---|---|")
    for window in (41, args.window, 3):
        distances, means = [], []
        for seed in range(args.seeds):
            density = spectral_density(op, n_runs=2, n_steps=40, seed=seed, max_basis=window)
            exact = _gaussian_mixture(density.grid, eigenvalues[None, :], np.full((1, n), 1.0 / n), density.sigma)
            distances.append(float(np.trapezoid(np.abs(density.density - exact), density.grid)))
            means.append(float((density.weights * density.nodes).sum(axis=1).mean()))
        print(f"| SLQ | {window} | {np.mean(distances):.3f} | {np.mean(means):.4g} vs {exact_trace / n:.4g} |")

    print("\n| epsilon-sharpness (10 iterations) | eps | L-BFGS-B: value, evaluations | corners: value, evaluations |")
    print("|---|---|---|---|")
    for label, steps in (("trained", args.steps), ("part-way", args.steps // 10)):
        model, batch, criterion = problem(args.width, steps)
        for eps in (1e-3, 5e-4, 1e-2):
            reference = epsilon_sharpness(model, loss_fn, batch, eps=eps, method="l-bfgs-b")
            corners = epsilon_sharpness(model, loss_fn, batch, eps=eps, method="corners")
            print(f"| {label} | {eps:g} | {reference.value:.5g}, {reference.n_evals} | {corners.value:.5g}, "
                  f"{corners.n_evals} |")


if __name__ == "__main__":
    main()
