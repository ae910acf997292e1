"""The GPU figures of docs/performance.md in one short run: made to be run as is when a GPU machine is lent.

Three tables, each model and configuration timed with the device synchronised around it:

1. **One HVP against one gradient** on a ResNet-18 (batch 64, 3x32x32) and a language transformer of about 110M
   parameters (12 pre-norm layers of width 768, a 16k vocabulary, sequences of 128 at batch 8): the median of a
   forward and backward (``torch.autograd.grad``), and of one product of ``HessianOperator`` (``hvp="auto"``: the
   engine it picks is printed; a model without double backward, such as a fused attention kernel, gets finite
   differences).
2. **Top-1 and top-5 eigenvalues** (``top_eigenvalues``, ``tol=1e-3``) of the same two: seconds, products, and the
   peak device memory above the operator's construction, in multiples of the parameters' bytes.
3. **The overhead of ``OptDiag()``** on a Lightning training run of the ResNet-18 (SGD with momentum and a cosine
   schedule, generated images, batch 64): wall time against the same run without callbacks, alternating, and the
   extra peak device memory; then the device synchronisations of 50 steps of each (CUDA's sync debug mode), and
   which lines of optdiag made them (a synchronisation per step idles the device while Python catches up).

Nothing is downloaded: the data are generated. ``--small`` shrinks every model and run (a ResNet-18 of width 8, a two-layer
transformer of width 64) so the script can be checked on a CPU in seconds (the test suite does); the figures then
mean nothing.

Usage:
    python benchmarks/bench_gpu.py                    # on the first CUDA device (the CPU when there is none)
    python benchmarks/bench_gpu.py --out gpu.json     # also write the numbers as JSON
    python benchmarks/bench_gpu.py --small --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory import ResNet18  # noqa: E402  (the benchmarks' own ResNet-18, torchvision's layout)
from bench_overhead import ImageClassifier, image_loader  # noqa: E402

from optdiag import OptDiag  # noqa: E402
from optdiag.curvature.lanczos import top_eigenvalues  # noqa: E402
from optdiag.curvature.operator import HessianOperator  # noqa: E402
from optdiag.demo.runner import quiet_lightning  # noqa: E402


class LanguageTransformer(nn.Module):
    """A GPT-sized encoder (pre-norm layers, causal mask) with untied embedding and head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.body(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)))


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, targets = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def image_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def problems(small: bool, device: torch.device) -> dict[str, tuple[nn.Module, Callable, tuple]]:
    """name -> (model on the device, loss_fn(model, batch), one batch on the device)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images = 8 if small else 64
    vocab, width, layers, heads, length, batch = (500, 64, 2, 4, 16, 4) if small else (16000, 768, 12, 12, 128, 8)
    tokens = torch.randint(vocab, (batch, length + 1), generator=g)
    return {
        "ResNet-18": (ResNet18(width=8 if small else 64).to(device), image_loss,
                      (torch.randn(images, 3, 32, 32, generator=g).to(device),
                       torch.randint(10, (images,), generator=g).to(device))),
        "transformer": (LanguageTransformer(vocab, width, layers, heads, length).to(device), next_token_loss,
                        (tokens[:, :-1].to(device), tokens[:, 1:].to(device))),
    }


def synchronised(device: torch.device, fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()`` with the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def peak_above(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``fn()``'s result and the peak device memory it allocated above what was allocated before (None on a CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def hvp_against_gradient(name: str, model: nn.Module, loss_fn: Callable, batch: tuple, device: torch.device,
                         repeats: int) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    gradient = [synchronised(device, lambda: torch.autograd.grad(loss_fn(model, batch), params))
                for _ in range(repeats + 1)][1:]  # the first: allocations and kernel selection
    op = HessianOperator(model, loss_fn, [batch])
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1)).to(device, op.dtype)
    products = [synchronised(device, lambda: op.matvec(v)) for _ in range(repeats + 1)][1:]
    row = {"model": name, "parameters": op.num_params, "engine": op.method, "gradient_s": statistics.median(gradient),
           "hvp_s": statistics.median(products)}
    row["hvp_per_gradient"] = row["hvp_s"] / row["gradient_s"]
    op.close()
    return row


def top_k(name: str, model: nn.Module, loss_fn: Callable, batch: tuple, device: torch.device, k: int) -> dict[str, Any]:
    op = HessianOperator(model, loss_fn, [batch])
    param_bytes = op.num_params * torch.finfo(op.dtype).bits // 8
    seconds: dict[str, float] = {}

    def solve() -> Any:
        out: list[Any] = []
        seconds["solve"] = synchronised(device, lambda: out.append(top_eigenvalues(op, k=k, tol=1e-3)))
        return out[0]

    result, peak = peak_above(device, solve)
    op.close()
    return {"model": name, "k": k, "seconds": seconds["solve"], "n_hvp": result.n_hvp, "converged": result.converged,
            "eigenvalues": [round(float(x), 6) for x in result.eigenvalues.tolist()],
            "peak_x_param_bytes": None if peak is None else peak / param_bytes}


def _trainer(device: torch.device, steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
                      callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, log_every_n_steps=50)


def training_overhead(device: torch.device, steps: int, rounds: int, batch: int, width: int) -> dict[str, Any]:
    """``OptDiag()`` against no callbacks on the ResNet-18 Lightning run, alternating (the order rotates)."""
    runs: dict[str, list[tuple[float, int | None]]] = {"none": [], "OptDiag": []}
    param_bytes = 0
    for r in range(rounds):
        for config in (("none", "OptDiag") if r % 2 == 0 else ("OptDiag", "none")):
            pl.seed_everything(0, verbose=False)
            trainer = _trainer(device, steps, [OptDiag(verbose=False)] if config == "OptDiag" else [])
            module, loader = ImageClassifier(ResNet18(width=width), steps), image_loader(batch)
            param_bytes = 4 * sum(p.numel() for p in module.parameters())
            seconds, peak = peak_above(device, lambda: synchronised(device, lambda: trainer.fit(module, loader)))
            runs[config].append((seconds, peak))
    base = statistics.median(s for s, _ in runs["none"])
    with_optdiag = statistics.median(s for s, _ in runs["OptDiag"])
    peaks = {c: [p for _, p in v if p is not None] for c, v in runs.items()}
    extra = (statistics.median(peaks["OptDiag"]) - statistics.median(peaks["none"])) / param_bytes \
        if peaks["none"] and peaks["OptDiag"] else None
    return {"steps": steps, "rounds": rounds, "none_s": base, "optdiag_s": with_optdiag, "ratio": with_optdiag / base,
            "extra_peak_x_param_bytes": extra}


def synchronisations(device: torch.device, steps: int, batch: int, width: int) -> dict[str, Any]:
    """The device synchronisations of the ResNet-18 run, with and without ``OptDiag()`` (CUDA's sync debug mode:
    a warning at each synchronising call, attributed to the Python line that made it), and those made from optdiag's
    own code, with the lines that made the most. Off CUDA the runs go through the same code without the mode
    (``counted`` False: the counts are zeros that mean nothing)."""
    import collections

    import optdiag

    root = os.path.dirname(os.path.abspath(optdiag.__file__))
    counted = device.type == "cuda"
    counts: dict[str, Any] = {"steps": steps, "counted": counted}
    for config in ("none", "OptDiag"):
        pl.seed_everything(0, verbose=False)
        trainer = _trainer(device, steps, [OptDiag(verbose=False)] if config == "OptDiag" else [])
        module, loader = ImageClassifier(ResNet18(width=width), steps), image_loader(batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if counted:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.fit(module, loader)
            finally:
                if counted:
                    torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        ours = collections.Counter(f"{os.path.relpath(w.filename, os.path.dirname(root))}:{w.lineno}"
                                   for w in syncs if os.path.abspath(w.filename).startswith(root))
        counts[config] = {"all": len(syncs), "optdiag": sum(ours.values()), "optdiag_lines": ours.most_common(6)}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when there is one)")
    parser.add_argument("--small", action="store_true", help="tiny models and runs: a check that the script works")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warnings.filterwarnings("ignore")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {'small' if args.small else 'full'} run\n")
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "small": args.small}
    cases = problems(args.small, device)

    report["hvp"] = [hvp_against_gradient(n, m, f, b, device, 3 if args.small else 10) for n, (m, f, b) in cases.items()]
    print("| model | parameters | HVP engine | gradient (ms) | HVP (ms) | HVP / gradient |\n|---|---|---|---|---|---|")
    for r in report["hvp"]:
        print(f"| {r['model']} | {r['parameters']:,} | {r['engine']} | {1e3 * r['gradient_s']:.1f} | "
              f"{1e3 * r['hvp_s']:.1f} | {r['hvp_per_gradient']:.2f} |")

    report["top_k"] = [top_k(n, m, f, b, device, k) for n, (m, f, b) in cases.items() for k in (1, 5)]
    print("\n| model | k | seconds | products | converged | peak memory (x params' bytes) | eigenvalues |\n"
          "|---|---|---|---|---|---|---|")
    for r in report["top_k"]:
        peak = "-" if r["peak_x_param_bytes"] is None else f"{r['peak_x_param_bytes']:.1f}"
        print(f"| {r['model']} | {r['k']} | {r['seconds']:.2f} | {r['n_hvp']} | {r['converged']} | {peak} | "
              f"{', '.join(f'{x:.4g}' for x in r['eigenvalues'])} |")

    del cases
    with quiet_lightning():
        report["training"] = training_overhead(device, 20 if args.small else 300, 2 if args.small else 4,
                                               8 if args.small else 64, 8 if args.small else 64)
        report["synchronisations"] = synchronisations(device, 10 if args.small else 50, 8 if args.small else 64,
                                                      8 if args.small else 64)
    t = report["training"]
    extra = "-" if t["extra_peak_x_param_bytes"] is None else f"{t['extra_peak_x_param_bytes']:+.1f}"
    print(f"\nResNet-18 training, {t['steps']} steps, {t['rounds']} alternating rounds: without {t['none_s']:.2f} s, "
          f"OptDiag() {t['optdiag_s']:.2f} s, ratio {t['ratio']:.3f}, extra peak memory {extra} x params' bytes")
    sync = report["synchronisations"]
    if not sync["counted"]:
        print("device synchronisations: not counted (CUDA only)")
    else:
        print(f"device synchronisations in {sync['steps']} steps: without optdiag {sync['none']['all']}, with "
              f"OptDiag() {sync['OptDiag']['all']}, of which from optdiag's code {sync['OptDiag']['optdiag']}: "
              + ", ".join(f"{line} x{n}" for line, n in sync["OptDiag"]["optdiag_lines"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
