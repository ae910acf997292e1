"""Forward-only critical sharpness against lambda_max, on real training runs (digits, CPU).

For each run (an MLP and a small CNN on scikit-learn's bundled 8x8 digits, trained with SGD, heavy ball and Adam on
minibatches of 64), every ``--every`` steps: the parameters before the optimizer step are kept, the step is taken,
and at the parameters before it, on a fixed probe batch of 256 digits,

* ``lambda_max`` of the Hessian (Lanczos to tol 1e-3, cold) and, for Adam, the preconditioned ``lambda_max(P^-1 H)``
  (the sharpness Adam's threshold 38/lr applies to);
* along the step ``u`` just taken, with forwards only (``optdiag.critical_sharpness``): on the probe batch, the
  directional curvature ``u^T H u / |u|^2`` with its error estimate (a Rayleigh quotient of the Hessian whose
  lambda_max is measured); on the minibatch the step was computed from (as ``HessianMonitor`` does), the critical
  sharpness ``2 / eta_c``; and for contrast the critical sharpness on the probe batch, where the slope along a
  minibatch step is another batch's;
* the wall time of each, and the forwards and Hessian-vector products they took.

Prints one markdown table per run, then a summary (medians over each run's measurements). docs/critical-sharpness.md
has the table measured at a given commit.

Usage:
    python benchmarks/bench_critical_sharpness.py            # 300 steps per run, measured every 50
    python benchmarks/bench_critical_sharpness.py --quick    # 60 steps, every 20 (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import subprocess
import time

import torch
from torch import nn

from optdiag.curvature.critical import critical_sharpness
from optdiag.curvature.lanczos import top_eigenvalues
from optdiag.curvature.operator import HessianOperator, supervised_loss
from optdiag.curvature.preconditioned import PreconditionedOperator
from optdiag.demo.scenarios import digits_data
from optdiag.diagnosis.stability import OptimizerSpec, stability_threshold

LOSS = supervised_loss(nn.CrossEntropyLoss())
PROBE, BATCH = 256, 64


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


RUNS = {
    "MLP, SGD lr 0.5": (mlp, lambda p: torch.optim.SGD(p, lr=0.5)),
    "MLP, momentum 0.9 lr 0.05": (mlp, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "MLP, Adam lr 1e-3": (mlp, lambda p: torch.optim.Adam(p, lr=1e-3)),
    "CNN, SGD lr 0.2": (CNN, lambda p: torch.optim.SGD(p, lr=0.2)),
    "CNN, momentum 0.9 lr 0.02": (CNN, lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9)),
    "CNN, Adam lr 3e-3": (CNN, lambda p: torch.optim.Adam(p, lr=3e-3)),
}


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def run(name: str, steps: int, every: int) -> list[dict]:
    build, make_optimizer = RUNS[name]
    torch.manual_seed(0)
    x, y = digits_data()
    probe = (x[:PROBE], y[:PROBE])
    train_x, train_y = x[PROBE:], y[PROBE:]
    model = build()
    optimizer = make_optimizer(model.parameters())
    spec = OptimizerSpec.from_torch(optimizer)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(train_x), (BATCH,), generator=gen)
        measure = step % every == 0 or step == 1
        before = copy.deepcopy(model) if measure else None
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        if not measure:
            continue
        update = [(a.detach() - b.detach()) for a, b in zip(model.parameters(), before.parameters())]
        critical = critical_sharpness(before, LOSS, probe, update, lr=spec.lr)
        started = time.perf_counter()
        own = critical_sharpness(before, LOSS, (train_x[index], train_y[index]), update, lr=spec.lr)
        critical_seconds = time.perf_counter() - started
        started = time.perf_counter()
        op = HessianOperator(before, LOSS, probe)
        eig = top_eigenvalues(op, k=1, which="LA", tol=1e-3, max_hvp=80, seed=0)
        lambda_seconds = time.perf_counter() - started
        lambda_max, n_hvp = float(eig.eigenvalues[0]), eig.n_hvp
        sharpness = lambda_max
        if spec.preconditioned:
            pre = PreconditionedOperator.from_optimizer(op, optimizer, params=list(model.parameters()))
            sharpness = float(top_eigenvalues(pre, k=1, which="LA", tol=1e-3, max_hvp=80, seed=0).eigenvalues[0])
        op.close()
        threshold = stability_threshold(spec)
        kappa, lam_c = critical.directional_curvature, own.critical_sharpness
        rows.append({
            "step": step, "loss": float(loss.detach()), "lambda_max": lambda_max, "sharpness": sharpness,
            "threshold": threshold, "kappa": kappa, "kappa_err": critical.directional_curvature_stderr,
            "critical": lam_c, "critical_probe": critical.critical_sharpness,
            "kappa_ratio": None if kappa is None else kappa / lambda_max,
            "critical_ratio": None if lam_c is None else lam_c / sharpness,
            "critical_threshold": None if lam_c is None or not threshold else lam_c / threshold,
            "stability_ratio": sharpness / threshold if threshold else None,
            "forwards": own.n_evals, "hvp": n_hvp,
            "critical_ms": 1e3 * critical_seconds, "lambda_ms": 1e3 * lambda_seconds,
        })
    return rows


def print_run(name: str, rows: list[dict], preconditioned: bool) -> None:
    sharp = "lambda_max(P^-1 H)" if preconditioned else "lambda_max"
    print(f"\n### {name}\n")
    print(f"| step | loss | lambda_max | {sharp} / threshold | kappa_u (+- err) | kappa_u / lambda_max | lambda_c | "
          f"lambda_c / {sharp} | lambda_c / threshold | lambda_c (probe) | forwards / ms | HVPs / ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['loss']:.3f} | {_fmt(r['lambda_max'])} | {_fmt(r['stability_ratio'], 3)} | "
              f"{_fmt(r['kappa'])} (+- {_fmt(r['kappa_err'], 2)}) | {_fmt(r['kappa_ratio'], 3)} | "
              f"{_fmt(r['critical'])} | "
              f"{_fmt(r['critical_ratio'], 3)} | {_fmt(r['critical_threshold'], 3)} | {_fmt(r['critical_probe'])} | "
              f"{r['forwards']} / {r['critical_ms']:.0f} | {r['hvp']} / {r['lambda_ms']:.0f} |")


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 steps, measured every 20")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="run names (default: all)")
    args = parser.parse_args()
    steps, every = (60, 20) if args.quick else (args.steps, args.every)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"critical sharpness vs lambda_max, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"commit {commit or '?'}, torch {torch.__version__}, 1 CPU thread, {steps} steps, measured every {every} "
          f"(and at step 1), probe batch {PROBE}, minibatch {BATCH}")
    summary = []
    for name in args.runs:
        rows = run(name, steps, every)
        preconditioned = "Adam" in name
        print_run(name, rows, preconditioned)
        summary.append((name, rows))
    print("\n### Summary (medians over each run's measurements)\n")
    print("| run | kappa_u / lambda_max | lambda_c / sharpness | lambda_c / threshold | sharpness / threshold | "
          "forwards | ms (critical) | HVPs | ms (lambda_max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in summary:
        med = {k: _median([r[k] for r in rows]) for k in rows[0]}
        print(f"| {name} | {_fmt(med['kappa_ratio'], 3)} | {_fmt(med['critical_ratio'], 3)} | "
              f"{_fmt(med['critical_threshold'], 3)} | {_fmt(med['stability_ratio'], 3)} | {med['forwards']:.0f} | "
              f"{med['critical_ms']:.0f} | {med['hvp']:.0f} | {med['lambda_ms']:.0f} |")


if __name__ == "__main__":
    main()
