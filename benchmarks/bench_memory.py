"""Memory benchmark: peak memory of the top-5 (LA) Hessian eigenvalues of a ResNet-18, beyond one forward+backward.

Model: a ResNet-18 written out below (torchvision's layout: 7x7 stem, max-pool, four stages of two basic blocks,
10 classes: 11,181,642 parameters), in eval mode (PyHessian forces it), on a batch of 16 random 32x32
images with random labels, CPU float32. torchvision itself is not needed (its wheels are built against a specific
torch; this file has the same architecture in ~40 lines).

Each configuration runs in a fresh subprocess, which builds the model and the batch, runs one forward+backward and
reads the process's peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; tracemalloc does not see
torch's allocations), then runs the method and reads the peak again. The difference is the peak memory the method
needs beyond a training step, reported as a multiple of the parameters' bytes (44.7 MB here). Configurations:

* optdiag ``top_eigenvalues(k=5, which="LA", tol=1e-3)`` at its default basis, and with ``max_basis=60`` (the
  size the basis had by default before it was bounded) or another ``max_basis`` (``optdiag:max_basis=12``);
* ``optdiag-sa`` (``optdiag-sa:max_basis=20``): lambda_min (``which="SA"``, k=1, tol 1e-3, at most 300 products),
  its products and memory at the default basis or another size (its accuracy is not compared: the reference is
  the top 5);
* ``hvp``: the ``HessianOperator`` alone and three products (what any solver on it pays before its own vectors);
* PyHessian's ``eigenvalues(top_n=5)`` and ``top_n=1`` (power iteration with deflation, at most 10 products per
  eigenvalue: enough to measure its memory, not to converge), when importable (``pip install --no-deps
  pyhessian``). hessian-eigenthings is not on PyPI.

Products and accuracy are compared against a tight reference (``tol=1e-4``, 60-vector basis: an eigenvalue's error
is about its residual squared over the gap) in the parent process, and the share of a Lanczos step spent
orthogonalising is timed there: one HVP against one block Gram-Schmidt orthogonalisation of its product against 16
and 60 basis vectors.

Usage: ``nice python benchmarks/bench_memory.py [--batch 16] [--skip-reference] [--configs hvp,optdiag,...]``;
prints markdown tables (the rows of docs/performance.md, section 5).
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

PARAM_COUNT_NOTE = "ResNet-18 (torchvision layout, 10 classes)"
# PyHessian's power iterations per eigenvalue (its default is 100; 10 keeps a run on a shared 2-core CPU to minutes
# and does not change its memory, which is its graph plus one vector per eigenvalue found; its accuracy suffers).
PYHESSIAN_MAX_ITER = 10


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout; ``width`` is the first stage's channels (64: the real one)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], width
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def setup(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = ResNet18().eval()  # eval mode: PyHessian forces it, so every method sees the same Hessian
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return model, (x, y)


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def optdiag_operator(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]):
    from optdiag.curvature.operator import HessianOperator, supervised_loss

    return HessianOperator(model, supervised_loss(nn.CrossEntropyLoss()), [data])


def run_config(config: str, batch: int) -> dict:
    """One configuration in this (fresh) process: peak beyond one forward+backward, products, eigenvalues."""
    model, (x, y) = setup(batch)
    nn.CrossEntropyLoss()(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    baseline = peak_bytes()
    start = time.perf_counter()
    if config == "hvp":  # the operator alone: its graph, gradient and the transients of three products
        op = optdiag_operator(model, (x, y))
        v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2))
        values = [float(v @ op.matvec(v)) for _ in range(3)][:1]
        n_hvp, extra = op.n_hvp, {}
    elif config.startswith("optdiag-sa"):  # lambda_min: the smallest eigenvalue, from the range start
        from optdiag.curvature.lanczos import top_eigenvalues

        max_basis = int(config.split("=")[1]) if "=" in config else None
        op = optdiag_operator(model, (x, y))
        result = top_eigenvalues(op, k=1, which="SA", tol=1e-3, max_basis=max_basis, max_hvp=300)
        values, n_hvp = result.eigenvalues.tolist(), result.n_hvp
        extra = {"basis_rows": result.basis_rows, "converged": result.converged, "which": "SA"}
    elif config.startswith("optdiag"):
        from optdiag.curvature.lanczos import top_eigenvalues

        max_basis = int(config.split("=")[1]) if "=" in config else None
        op = optdiag_operator(model, (x, y))
        result = top_eigenvalues(op, k=5, which="LA", tol=1e-3, max_basis=max_basis)
        values, n_hvp, extra = result.eigenvalues.tolist(), result.n_hvp, {"basis_rows": result.basis_rows}
    elif config.startswith("pyhessian"):
        from pyhessian import hessian

        top_n = int(config.split("top")[1])
        counter = {"n": 0}
        module = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)

        product = module.hessian_vector_product  # what its single-batch power iteration calls once per product

        def counted(*args, **kwargs):
            counter["n"] += 1
            return product(*args, **kwargs)

        module.hessian_vector_product = counted
        solver = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        values, _ = solver.eigenvalues(top_n=top_n, maxIter=PYHESSIAN_MAX_ITER)
        n_hvp, extra = counter["n"], {}
    else:
        raise SystemExit(f"unknown configuration {config}")
    seconds = time.perf_counter() - start
    return {"config": config, "extra_bytes": peak_bytes() - baseline, "baseline_bytes": baseline,
            "eigenvalues": sorted(values, reverse=True), "n_hvp": n_hvp, "seconds": seconds, **extra}


def reorthogonalisation_share(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], rows: int,
                               repeats: int = 3) -> dict:
    """Seconds of one HVP and of one block Gram-Schmidt orthogonalisation (a second pass only when the first
    cancels) against a basis of ``rows`` vectors, and the share of
    a Lanczos step (one product plus its orthogonalisation) spent orthogonalising. Medians over ``repeats``."""
    from optdiag.curvature import lanczos

    op = optdiag_operator(model, data)
    generator = torch.Generator().manual_seed(3)
    basis = lanczos._KrylovBasis(op, rows + 1, generator, refill=False)
    for _ in range(rows):
        w = basis.random_vector()
        basis.V.append(w, float(torch.linalg.vector_norm(w)))  # random directions: orthogonal to ~1/sqrt(n)
    hvp, orthogonalise = [], []
    for _ in range(repeats):
        v = basis.random_vector()
        t = time.perf_counter()
        product = op.matvec(v)
        hvp.append(time.perf_counter() - t)
        norm = float(torch.linalg.vector_norm(product))
        t = time.perf_counter()
        basis._orthogonalise(product, norm, norm)
        orthogonalise.append(time.perf_counter() - t)
    h, o = float(np.median(hvp)), float(np.median(orthogonalise))
    return {"rows": rows, "hvp": h, "orthogonalise": o, "share": o / (h + o)}


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001 - an optional competitor that does not import is simply skipped
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--configs", default="hvp,optdiag,optdiag:max_basis=16,optdiag:max_basis=60,pyhessian:top1,"
                                             "pyhessian:top5",
                        help="comma-separated configurations (pyhessian ones are skipped when it is not importable)")
    args = parser.parse_args()
    if args.config:
        print(json.dumps(run_config(args.config, args.batch)))
        return

    model, data = setup(args.batch)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    configs = [c for c in args.configs.split(",") if not c.startswith("pyhessian") or available("pyhessian")]
    rows = []
    for config in configs:
        out = subprocess.run([sys.executable, __file__, "--config", config, "--batch", str(args.batch)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            rows.append({"config": config, "error": out.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    reference = ref = None
    if not args.skip_reference:
        from optdiag.curvature.lanczos import top_eigenvalues

        ref = top_eigenvalues(optdiag_operator(model, data), k=5, which="LA", tol=1e-4, max_basis=60, max_hvp=400)
        reference = np.array(ref.eigenvalues.tolist())
        print(json.dumps({"reference": reference.tolist(), "n_hvp": ref.n_hvp, "converged": ref.converged}),
              file=sys.stderr, flush=True)

    print(f"torch {torch.__version__}, {PARAM_COUNT_NOTE}: {n_params:,} parameters ({param_bytes / 1e6:.1f} MB), "
          f"batch {args.batch} of 3x32x32, CPU float32, {torch.get_num_threads()} threads")
    if reference is not None:
        print(f"reference top 5 (tol 1e-4, {ref.n_hvp} HVPs): {', '.join(f'{v:.6g}' for v in reference)}")
    print()
    print("| method | peak beyond one forward+backward | x parameters' bytes | basis vectors | HVPs | seconds "
          "| max relative error vs reference |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['config']} | failed: {row['error']} | | | | | |")
            continue
        k = len(row["eigenvalues"])
        error = "n/a"
        if reference is not None and row["config"] != "hvp" and row.get("which") != "SA":
            error = f"{np.max(np.abs(np.array(row['eigenvalues']) - reference[:k]) / np.abs(reference[:k])):.1e}"
        extra = row["extra_bytes"]
        label = "lambda_min" if row.get("which") == "SA" else f"top-{k}"
        print(f"| {row['config']} ({label}) | {extra / 1e9:.2f} GB | {extra / param_bytes:.1f} "
              f"| {row.get('basis_rows', '-')} | {row['n_hvp']} | {row['seconds']:.0f} | {error} |")
    print()
    print("| basis vectors | one HVP (s) | orthogonalisation of one product (s) | share of a Lanczos step |")
    print("|---|---|---|---|")
    for rows in (16, 60):
        share = reorthogonalisation_share(model, data, rows)
        print(f"| {rows} | {share['hvp']:.2f} | {share['orthogonalise']:.2f} | {share['share']:.0%} |")


if __name__ == "__main__":
    main()
