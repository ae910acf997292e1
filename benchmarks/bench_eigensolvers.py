"""Eigensolver benchmark: HVPs and seconds to reach 1e-3 relative accuracy on extreme Hessian eigenvalues.

Problems: (a) docs/theory.md section 7's synthetic spectrum {100, 95, 998 values uniform in [-5, 20]}, randomly rotated
(n = 1000, float64 matrix); (b) a tanh MLP and (c) a small tanh CNN on sklearn's 8x8 digits, briefly trained, whose
reference spectra come from their dense float64 Hessians. Targets: the top eigenvalue, the top 5, and lambda_min.

Every method runs at the loosest setting of a fixed ladder (its tolerance, or its number of Lanczos steps) whose
result is accurate: each wanted eigenvalue within ``1e-3 * |lambda_i|`` of the reference. Seconds include building
each library's own Hessian operator (its HVP engine) and are medians over ``--repeats`` runs, side by side in one
process. Optional competitors are used when importable: PyHessian (power iteration with deflation),
hessian-eigenthings (fixed-step Lanczos) and curvlinops (HessianLinearOperator) + ``scipy.sparse.linalg.eigsh``.

Usage: ``python benchmarks/bench_eigensolvers.py [--quick] [--repeats N]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

from optdiag.curvature.base import MatrixOperator
from optdiag.curvature.lanczos import power_iteration, top_eigenvalues
from optdiag.curvature.operator import HessianOperator, supervised_loss

ACCURACY = 1e-3
TOL_LADDER = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7, 1e-8)
STEP_LADDER = (10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640)
TARGETS = {"top-1": ("LA", 1), "top-5": ("LA", 5), "lambda_min": ("SA", 1)}


@dataclass
class Problem:
    name: str
    exact: np.ndarray  # ascending reference eigenvalues
    optdiag_operator: Callable[[], object]  # builds a fresh optdiag CurvatureOperator
    model: Optional[nn.Module] = None
    batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    matrix: Optional[torch.Tensor] = None

    def reference(self, which: str, k: int) -> np.ndarray:
        return self.exact[::-1][:k] if which == "LA" else self.exact[:k]


@dataclass
class Outcome:
    n_hvp: int
    seconds: float
    setting: str


# ------------------------------------------------------------------------------------------------------------
# Problems


def synthetic_problem() -> Problem:
    generator = torch.Generator().manual_seed(0)
    eigenvalues = torch.cat([torch.tensor([100.0, 95.0]), -5.0 + 25.0 * torch.rand(998, generator=generator)]).double()
    q, _ = torch.linalg.qr(torch.randn(1000, 1000, generator=generator, dtype=torch.float64))
    matrix = (q * eigenvalues) @ q.T
    matrix = 0.5 * (matrix + matrix.T)
    exact = np.sort(eigenvalues.numpy())
    return Problem("synthetic (docs/theory.md s7, n=1000)", exact, lambda: MatrixOperator(matrix), matrix=matrix)


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n] / 16.0, dtype=torch.float32)
    return x, torch.tensor(data.target[:n], dtype=torch.long)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x.view(-1, 1, 8, 8)))
        x = nn.functional.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def trained(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def network_problem(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Problem:
    loss_fn = supervised_loss(nn.CrossEntropyLoss())
    dense = HessianOperator(model, loss_fn, batch, dtype=torch.float64).to_dense()
    exact = np.sort(np.linalg.eigvalsh(dense.numpy()))
    n = sum(p.numel() for p in model.parameters())
    return Problem(f"{name} (n={n})", exact, lambda: HessianOperator(model, loss_fn, batch), model=model, batch=batch)


def problems(quick: bool) -> list[Problem]:
    torch.manual_seed(0)
    batch = digits(512)
    out = [synthetic_problem()]
    mlp = trained(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), batch, 100)
    out.append(network_problem("MLP 64-32-10, digits", mlp, batch))
    if not quick:
        out.append(network_problem("CNN 2xconv8, digits", trained(DigitsCNN(), batch, 100), batch))
    return out


# ------------------------------------------------------------------------------------------------------------
# Methods: each returns (eigenvalues in the target's order, HVPs) for one setting, or None if not applicable


def run_optdiag_lanczos(problem: Problem, which: str, k: int, tol: float):
    op = problem.optdiag_operator()
    result = top_eigenvalues(op, k=k, which=which, tol=tol, max_hvp=5000)
    return result.eigenvalues.double().numpy(), result.n_hvp


def run_optdiag_power(problem: Problem, which: str, k: int, tol: float):
    if k != 1 or which != "LA" or abs(problem.exact[-1]) < abs(problem.exact[0]):
        return None  # power iteration finds the largest magnitude only
    op = problem.optdiag_operator()
    result = power_iteration(op, tol=tol, max_hvp=5000)
    return result.eigenvalues.double().numpy(), result.n_hvp


def counting(matvec: Callable, n: int, dtype) -> tuple[scipy.sparse.linalg.LinearOperator, list[int]]:
    count = [0]

    def counted(v):
        count[0] += 1
        return matvec(v)

    return scipy.sparse.linalg.LinearOperator((n, n), matvec=counted, dtype=dtype), count


def start_vector(n: int) -> np.ndarray:
    """The start vector ``top_eigenvalues(seed=0)`` draws, so that Krylov methods start from the same vector."""
    return torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()


def scipy_order(values: np.ndarray, which: str) -> np.ndarray:
    return np.sort(values)[::-1] if which == "LA" else np.sort(values)


def run_curvlinops_eigsh(problem: Problem, which: str, k: int, tol: float):
    if problem.matrix is not None:
        dense = problem.matrix.numpy()
        linear, count = counting(lambda v: dense @ v, dense.shape[0], np.float64)
    else:
        from curvlinops import HessianLinearOperator

        model = problem.model
        params = [p for p in model.parameters() if p.requires_grad]
        hessian = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), params, [problem.batch], check_deterministic=False
        ).to_scipy()
        linear, count = counting(hessian.matvec, hessian.shape[0], hessian.dtype)
    values = scipy.sparse.linalg.eigsh(
        linear, k=k, which=which, tol=tol, return_eigenvectors=False, v0=np.ones(linear.shape[0]), maxiter=5000
    )
    return scipy_order(values, which), count[0]


def run_eigenthings(problem: Problem, which: str, k: int, steps: int):
    import hessian_eigenthings as he

    if problem.matrix is not None:
        matrix = problem.matrix
        operator = he.LambdaOperator(lambda v: matrix @ v, matrix.shape[0], dtype=matrix.dtype)
    else:
        operator = he.HessianOperator(
            problem.model, [problem.batch], he.supervised_loss(nn.functional.cross_entropy), full_dataset=True
        )
    calls = [0]
    matvec = operator.matvec

    def counted(v):
        calls[0] += 1
        return matvec(v)

    operator.matvec = counted
    result = he.lanczos(operator, k=k, which=which, max_iter=min(steps, operator.size - 1), tol=1e-12,
                        reorthogonalize=True, seed=0)
    return result.eigenvalues.double().cpu().numpy(), calls[0]


def run_pyhessian(problem: Problem, which: str, k: int, tol: float):
    if problem.model is None or which != "LA":
        return None  # PyHessian needs a model and finds the top eigenvalues only
    import sys

    import pyhessian.hessian  # noqa: F401  (the package re-exports the class under the module's name)

    ph = sys.modules["pyhessian.hessian"]

    calls = [0]
    original = ph.hessian_vector_product

    def counted(*args):
        calls[0] += 1
        return original(*args)

    model = copy.deepcopy(problem.model)
    ph.hessian_vector_product = counted
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its loss.backward(create_graph=True) warns about cycles
            torch.manual_seed(0)
            computer = ph.hessian(model, nn.CrossEntropyLoss(), data=problem.batch, cuda=False)
            values, _ = computer.eigenvalues(maxIter=5000, tol=tol, top_n=k)
    finally:
        ph.hessian_vector_product = original
    return np.asarray(values, dtype=np.float64), calls[0]


def available_methods() -> dict[str, tuple[Callable, tuple, str]]:
    methods = {
        "optdiag top_eigenvalues": (run_optdiag_lanczos, TOL_LADDER, "tol"),
        "optdiag power_iteration": (run_optdiag_power, TOL_LADDER, "tol"),
    }
    for module, label, entry in (
        ("curvlinops", "curvlinops + scipy eigsh", (run_curvlinops_eigsh, TOL_LADDER, "tol")),
        ("hessian_eigenthings", "hessian-eigenthings lanczos", (run_eigenthings, STEP_LADDER, "max_iter")),
        ("pyhessian", "PyHessian", (run_pyhessian, TOL_LADDER, "tol")),
    ):
        try:
            __import__(module)
        except Exception as error:  # an optional competitor that does not import is reported, not fatal
            print(f"<!-- {label}: not importable ({type(error).__name__}: {error}) -->")
            continue
        methods[label] = entry
    return methods


def accurate(values: np.ndarray, reference: np.ndarray) -> bool:
    return values.shape == reference.shape and bool(np.all(np.abs(values - reference) <= ACCURACY * np.abs(reference)))


def measure(method: Callable, ladder: tuple, knob: str, problem: Problem, which: str, k: int,
            repeats: int) -> Optional[Outcome] | str:
    reference = problem.reference(which, k)
    for setting in ladder:
        answer = method(problem, which, k, setting)  # also the warm-up run of the timed setting
        if answer is None:
            return "n/a"
        values, n_hvp = answer
        if not accurate(values, reference):
            continue
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            method(problem, which, k, setting)
            seconds.append(time.perf_counter() - start)
        return Outcome(n_hvp, statistics.median(seconds), f"{knob}={setting:g}")
    return "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="synthetic spectrum and the MLP only, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median)")
    args = parser.parse_args()
    repeats = 1 if args.quick else max(1, args.repeats)
    torch.set_num_threads(1)  # comparable timings on a shared machine

    methods = available_methods()
    print(f"Reaching |theta_i - lambda_i| <= {ACCURACY:g} |lambda_i| for every wanted eigenvalue; "
          f"cells: HVPs / seconds (median of {repeats}) / loosest accurate setting.\n")
    print("| problem | target | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for problem in problems(args.quick):
        for target, (which, k) in TARGETS.items():
            cells = []
            for method, ladder, knob in methods.values():
                outcome = measure(method, ladder, knob, problem, which, k, repeats)
                cells.append(outcome if isinstance(outcome, str) else
                             f"{outcome.n_hvp} / {outcome.seconds:.3f}s / {outcome.setting}")
            print(f"| {problem.name} | {target} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
