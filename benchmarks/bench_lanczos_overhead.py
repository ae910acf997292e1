"""What does the Lanczos eigensolver cost per product beyond the product itself? Before/after, interleaved.

On the 670k-parameter MLP of bench_overhead.py (784-512-512-10, after 3 and after 100 SGD steps) and on its digits
CNN, with two probe batches of 128 in float32 on one thread, it times a Hessian-vector product (``op @ v``, the
median of several) and the solves ``top_eigenvalues(op, k=1, tol=1e-3, max_hvp=40)`` and
``top_eigenvalues(op, k=5, tol=1e-3)`` (the median of a few), and prints the milliseconds per product of each solve
(its wall time over its products), the time per product spent outside the products (the solver's own work,
timed around the operator's ``_matvec``, so that the products' own noise drops out), the products to convergence
and how many Gram-Schmidt passes over the basis each orthogonalisation ran on average (the start vector's, against
an empty basis, counts as none).

With ``--compare TREE`` (a directory holding another version's ``optdiag`` package, e.g.
``git archive <commit> optdiag | tar -x -C TREE``) each round runs one worker process per version, in alternating
order, so that the machine's load hits both alike; the table gives medians over rounds.

    python benchmarks/bench_lanczos_overhead.py                             # this tree, 3 rounds
    python benchmarks/bench_lanczos_overhead.py --compare /tmp/base --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [("mlp670k", 3, 1), ("mlp670k", 3, 5), ("mlp670k", 100, 1), ("cnn", 3, 1), ("cnn", 3, 5)]


def worker(repeats: int) -> None:
    """Measure every case in this process (optdiag comes from the first package on ``sys.path``)."""
    import torch
    from torch import nn

    sys.path.insert(0, HERE)
    from bench_overhead import cnn, digits_loader, mlp670k

    import optdiag.curvature.lanczos as lanczos
    from optdiag.curvature import HessianOperator, top_eigenvalues, supervised_loss

    torch.set_num_threads(1)
    calls = {"orthogonalise": 0, "project": 0}
    orthogonalise, project = lanczos._KrylovBasis._orthogonalise, lanczos._Rows.project

    def counted_orthogonalise(self, *args, **kwargs):
        calls["orthogonalise"] += 1
        return orthogonalise(self, *args, **kwargs)

    def counted_project(self, *args, **kwargs):
        calls["project"] += 1
        return project(self, *args, **kwargs)

    lanczos._KrylovBasis._orthogonalise = counted_orthogonalise
    lanczos._Rows.project = counted_project

    results = []
    for name, steps, k in CASES:
        torch.manual_seed(0)
        net = {"mlp670k": mlp670k, "cnn": cnn}[name]()
        loader = digits_loader(128, size=28 if name == "mlp670k" else 8)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        batches, step = [], 0
        while step < steps:  # epochs of 14 batches
            for x, y in loader:
                if len(batches) < 2:
                    batches.append((x, y))
                if step == steps:
                    break
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                optimizer.step()
                step += 1
        with HessianOperator(net, supervised_loss(nn.CrossEntropyLoss()), batches) as op:
            v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1))
            product_times = []
            for _ in range(7):
                start = time.perf_counter()
                op @ v
                product_times.append(time.perf_counter() - start)
            inside = [0.0]  # seconds spent in the products during a solve
            matvec = op._matvec

            def timed_matvec(vector):
                start = time.perf_counter()
                out = matvec(vector)
                inside[0] += time.perf_counter() - start
                return out

            op._matvec = timed_matvec
            solve_times, overheads, passes = [], [], 0.0
            for _ in range(repeats):
                calls.update(orthogonalise=0, project=0)
                inside[0] = 0.0
                start = time.perf_counter()
                result = top_eigenvalues(op, k=k, tol=1e-3, max_hvp=40 if k == 1 else None)
                solve_times.append(time.perf_counter() - start)
                overheads.append(solve_times[-1] - inside[0])
                passes = calls["project"] / max(calls["orthogonalise"], 1)
        results.append({
            "case": f"{name} ({sum(p.numel() for p in net.parameters())} params, {steps} steps), k={k}",
            "product_ms": 1e3 * statistics.median(product_times),
            "solve_ms": 1e3 * statistics.median(solve_times),
            "overhead_ms": 1e3 * statistics.median(overheads),
            "n_hvp": result.n_hvp, "converged": result.converged, "passes": passes,
            "lambda": [round(float(x), 4) for x in result.eigenvalues],
        })
    print(json.dumps(results))


def run_worker(tree: str | None, repeats: int) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as cwd:  # not the repository: its optdiag would shadow TREE's
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(repeats)],
                             env=env, cwd=cwd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", help="a directory holding the other version's optdiag package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="solves per case and worker (their median)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    trees = {"this tree": os.path.dirname(HERE)}
    if args.compare:
        trees = {"before": os.path.abspath(args.compare), "after": os.path.dirname(HERE)}
    rounds: dict[str, list[list[dict]]] = {label: [] for label in trees}
    for r in range(args.rounds):
        order = list(trees.items())
        for label, tree in order if r % 2 == 0 else order[::-1]:
            rounds[label].append(run_worker(tree, args.repeats))
    print("| case | version | one product alone (ms) | solve per product (ms) | outside the products, per product "
          "(ms) | products | passes over the basis per orthogonalisation | converged |")
    print("|---|---|---|---|---|---|---|---|")
    for i in range(len(CASES)):
        for label, runs in rounds.items():
            cells = [run[i] for run in runs]
            product = statistics.median(c["product_ms"] for c in cells)
            per = statistics.median(c["solve_ms"] / c["n_hvp"] for c in cells)
            overhead = statistics.median(c["overhead_ms"] / c["n_hvp"] for c in cells)
            print(f"| {cells[0]['case']} | {label} | {product:.1f} | {per:.1f} | {overhead:.1f} "
                  f"| {cells[0]['n_hvp']} | {cells[0]['passes']:.2f} | {cells[0]['converged']} |")


if __name__ == "__main__":
    main()
