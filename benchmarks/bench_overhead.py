"""Wall-time overhead of the optdiag callbacks at their defaults on CPU Lightning runs, side by side.

Trains small models on scikit-learn's bundled 8x8 digits (nothing is downloaded) for a few epochs, with
no callback, with ``GradientNormMonitor()``, with ``HessianMonitor()`` and with the ``OptDiag()`` bundle, all at
their defaults. Each round runs every configuration once, in a rotated order (interleaved, so that drifting load
on a shared machine hits all of them alike); the tables report medians over rounds. The process is pinned to one
core with one torch thread. The goal (docs/index.md, design rule "Pay for what you measure"): a wall-time ratio <= 1.05.

Two ratios are printed: the ratio of the median wall times, and the median of the per-round ratios (each monitored
run over the baseline run of the same round: robust to slow drifts of the machine's load). The per-step cost less
Hessian seconds is the median over rounds of (run - its curvature seconds - the round's baseline) / steps: the
per-step work (gradient statistics, the stall test, hook calls) without the snapshots, which the budget governs.

    python benchmarks/bench_overhead.py                    # both models, 20 epochs, 5 rounds
    python benchmarks/bench_overhead.py --models mlp --epochs 100 --rounds 3   # long enough for scheduled snapshots
    python benchmarks/bench_overhead.py --models wide-cnn --epochs 5 --rounds 3
    python benchmarks/bench_overhead.py --models mlp670k bn-cnn transformer --configs none OptDiag --profile
    python benchmarks/bench_overhead.py --models resnet18 --configs none OptDiag --steps 40 --rounds 3
    python benchmarks/bench_overhead.py --lockstep 10 --models mlp670k --configs none Callback OptDiag --rounds 3 \
        --epochs 100 --steps 800

``--lockstep N`` races the configurations instead (benchmarks/lockstep.py): one process each, all on one core,
taking turns every ``N`` training batches, each counting only its own turns, so the machine's drift (10-30% between
whole runs here) falls on all of them alike; each round is one race, and the table gives each race's ratio to
the baseline of the same race. Keep a race to a few processes: with more, each turn starts with a colder cache.
``Callback`` (an empty ``pl.Callback``) is what Lightning's dispatch of one callback costs before it does anything.

``--alternate N`` measures the per-step work alone, inside one run: each configuration's per-step hooks run for
``N`` batches and are skipped for the next ``N``, and so on, and the seconds per step of the two kinds of block are
compared (medians over the blocks; the same process, model, memory and cache, blocks a fraction of a second apart).
A block that holds episodic work (a probe read, a measured pair, a snapshot) is an outlier the median leaves out, so
the difference of the medians is the work every step pays; the monitors see only every other block, so nothing
else of a whole run is measured this way. ``Callback`` gives the method's own spread.

Models: ``mlp`` (26k parameters) and ``cnn`` (10k) on the digits, batch 32; ``wide-cnn``; ``mlp670k`` (784-512-512-10,
the digits upsampled to 28x28, batch 128); ``bn-cnn`` (two conv + BatchNorm blocks, 4x the channels of ``cnn``);
``transformer`` (Lightning's demo ``Transformer``, 2 layers of width 128, on 64-token sequences of a 500-token
synthetic language, batch 16, Adam); ``resnet18`` (benchmarks/bench_memory.py's ResNet-18 on generated 3x32x32
images, batch 16, SGD momentum 0.9 with a cosine schedule). ``--steps`` caps the optimizer steps of a run.

Every run's peak resident memory above the process's resident memory at the start of ``fit`` is sampled every 2
ms from ``/proc/self/statm`` (torch's allocations are invisible to tracemalloc); the table gives the median extra
peak over the baseline run's, in multiples of the parameters' bytes. ``--profile`` runs ``OptDiag()`` once more with
every child hook timed (seconds per hook and per child, and per step) and prints cProfile's top optdiag functions.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optdiag.callbacks.bundle import FORWARDED_HOOKS, OptDiag
from optdiag.callbacks.gradient_norm import GradientNormMonitor
from optdiag.callbacks.hessian import HessianMonitor
from optdiag.demo.runner import quiet_lightning

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_memory's ResNet-18
from optdiag_settings import not_the_defaults, setting  # noqa: E402  (--set, shared with verdict_corpus.py)


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy on the digits with SGD + momentum; ``net`` is the MLP or the CNN."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def wide_cnn() -> nn.Module:
    """The CNN with 4x the channels: a step costs ~10x more, so per-step fixed costs weigh less."""
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


def mlp670k() -> nn.Module:
    """784-512-512-10 (669,706 parameters) on the digits upsampled to 28x28."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def bn_cnn() -> nn.Module:
    """Two conv + BatchNorm blocks (the wide CNN's channels): BatchNorm's batch statistics in training mode."""
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


class LanguageModel(pl.LightningModule):
    """Lightning's demo ``Transformer`` (its LightningTransformer example, smaller) on token sequences, Adam."""

    def __init__(self, vocab: int = 500) -> None:
        super().__init__()
        from pytorch_lightning.demos import Transformer

        self.model = Transformer(vocab_size=vocab, ninp=128, nhead=2, nhid=128, nlayers=2, dropout=0.1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x, y)
        loss = nn.functional.nll_loss(out, y.view(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class ImageClassifier(DigitsClassifier):
    """SGD + momentum with a cosine schedule over the run (the ResNet-18 run)."""

    def __init__(self, net: nn.Module, steps: int, lr: float = 0.05) -> None:
        super().__init__(net, lr)
        self.steps = steps

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def resnet18() -> nn.Module:
    from bench_memory import ResNet18

    return ResNet18()


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn, "wide-cnn": wide_cnn, "mlp670k": mlp670k,
                                              "bn-cnn": bn_cnn, "transformer": lambda: LanguageModel().model,
                                              "resnet18": resnet18}
BATCH_SIZES = {"mlp670k": 128, "transformer": 16, "resnet18": 16}  # the others: --batch-size
#: Settings of the ``OptDiag`` configuration that replace its defaults (``--set``; the tables then say so).
OPTDIAG_SETTINGS: dict[str, Any] = {}
CONFIGS: dict[str, Callable[[], list]] = {
    "none": lambda: [],
    # an empty callback: what Lightning's dispatch of one callback's hooks costs before it does anything (the floor)
    "Callback": lambda: [pl.Callback()],
    "GradientNormMonitor": lambda: [GradientNormMonitor()],
    "HessianMonitor": lambda: [HessianMonitor()],
    "OptDiag": lambda: [OptDiag(verbose=False, **OPTDIAG_SETTINGS)],
}


def digits_loader(batch_size: int, size: int = 8) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    if size != 8:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return DataLoader(TensorDataset(images, torch.tensor(y)), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def token_loader(batch_size: int, vocab: int = 500, length: int = 64, n: int = 1024) -> DataLoader:
    """A synthetic language with structure to learn: each token is a fixed function of the previous one, with noise."""
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(vocab, generator=g)
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(length):
        noise = torch.randint(vocab, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.8
        tokens[:, t + 1] = torch.where(keep, successor[tokens[:, t]], noise)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def image_loader(batch_size: int, n: int = 1024) -> DataLoader:
    """Generated 3x32x32 images: class-dependent mean patterns plus noise (learnable, nothing downloaded)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (n,), generator=g)
    patterns = torch.randn(10, 3, 32, 32, generator=g)
    images = 0.5 * patterns[labels] + torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def loader_for(model: str, batch_size: int | None) -> DataLoader:
    """The model's data; ``batch_size`` None: its own (``BATCH_SIZES``, else 32)."""
    batch_size = batch_size or BATCH_SIZES.get(model, 32)
    if model == "mlp670k":
        return digits_loader(batch_size, size=28)
    if model == "transformer":
        return token_loader(batch_size)
    if model == "resnet18":
        return image_loader(batch_size)
    return digits_loader(batch_size)


def module_for(model: str, steps: int) -> pl.LightningModule:
    if model == "transformer":
        return LanguageModel()
    if model == "resnet18":
        return ImageClassifier(resnet18(), steps)
    return DigitsClassifier(MODELS[model]())


class PeakRSS:
    """Peak resident memory of this process above its level at ``start``, sampled every 2 ms by a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: no memory figures
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    snapshots: list[int] = field(default_factory=list)  # curvature snapshots (scheduled + stall) per run
    hessian_seconds: list[float] = field(default_factory=list)
    verdicts: list[int] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)  # peak resident memory above the start of fit


def run_once(model: str, config: str, epochs: int, batch_size: int, root: str, steps: int = -1,
             callbacks: list | None = None) -> tuple[float, list, int]:
    pl.seed_everything(0, verbose=False)
    callbacks = CONFIGS[config]() if callbacks is None else callbacks
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, max_steps=steps, callbacks=callbacks,
                         logger=False, default_root_dir=root, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50)
    loader = loader_for(model, batch_size)
    module = module_for(model, steps if steps > 0 else epochs * len(loader))
    gc.collect()
    with PeakRSS() as memory:
        started = time.perf_counter()
        trainer.fit(module, loader)
        seconds = time.perf_counter() - started
    return seconds, callbacks, memory.extra


def record(runs: Runs, seconds: float, callbacks: list, peak: int = 0) -> None:
    runs.seconds.append(seconds)
    runs.peak_bytes.append(peak)
    for cb in callbacks:
        hessian = getattr(cb, "hessian_monitor", cb)
        if isinstance(hessian, HessianMonitor):
            runs.snapshots.append(len(hessian.history))
            runs.hessian_seconds.append(hessian.monitor_seconds)
        if isinstance(cb, OptDiag):
            runs.verdicts.append(len(cb.diagnoses))


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` rotated by ``r``: round ``r``'s order (each configuration goes first in turn)."""
    return names[r % len(names):] + names[: r % len(names)]


def measure(model: str, epochs: int, batch_size: int, rounds: int, root: str, names: list[str],
            steps: int = -1) -> dict[str, Runs]:
    results = {name: Runs() for name in names}
    run_once(model, names[-1], 1, batch_size, root, steps=min(steps, 5) if steps > 0 else 5)  # warm-up
    for r in range(rounds):
        for name in rotated(names, r):
            seconds, callbacks, peak = run_once(model, name, epochs, batch_size, root, steps)
            record(results[name], seconds, callbacks, peak)
    return results


class HookTimer:
    """Wall seconds spent in each hook of each child of an ``OptDiag`` (instance attributes shadow the methods, so
    the bundle's forwarding, which looks its receivers up once, calls the timed ones)."""

    def __init__(self, bundle: OptDiag) -> None:
        from optdiag.callbacks.bundle import _implements

        self.seconds: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}
        for child in bundle.children:
            for name in FORWARDED_HOOKS:
                if _implements(child, name):
                    setattr(child, name, self._timed(type(child).__name__, name, getattr(child, name)))

    def _timed(self, child: str, hook: str, method: Callable[..., Any]) -> Callable[..., Any]:
        key = (child, hook)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
                self.calls[key] = self.calls.get(key, 0) + 1

        return timed

    def table(self, steps: int, hessian_seconds: float) -> str:
        lines = ["| child | hook | calls | seconds | us per optimizer step |", "|---|---|---|---|---|"]
        for (child, hook), seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            if seconds >= 1e-4:
                lines.append(f"| {child} | {hook} | {self.calls[(child, hook)]} | {seconds:.3f} "
                             f"| {1e6 * seconds / steps:.0f} |")
        total = sum(self.seconds.values())
        lines.append(f"| all | all hooks | | {total:.3f} | {1e6 * total / steps:.0f} |")
        lines.append(f"| all | less the Hessian work charged to the budget ({hessian_seconds:.3f} s) | "
                     f"| {total - hessian_seconds:.3f} | {1e6 * (total - hessian_seconds) / steps:.0f} |")
        return "\n".join(lines)


def profile(model: str, epochs: int, batch_size: int, root: str, steps: int) -> str:
    """One ``OptDiag()`` run with every child hook timed, then one under cProfile (top optdiag functions)."""
    import cProfile
    import io
    import pstats

    bundle = OptDiag(verbose=False)
    timer = HookTimer(bundle)
    seconds, _, _ = run_once(model, "OptDiag", epochs, batch_size, root, steps, callbacks=[bundle])
    n_steps = bundle.stall_diagnoser._steps_run or 1
    out = [f"per-hook seconds of one OptDiag() run ({seconds:.2f} s, {n_steps} steps, "
           f"{len(bundle.hessian_monitor.history)} snapshots, {sum(c['n_hvp'] for c in bundle.hessian_monitor.charges)} products):", "",
           timer.table(n_steps, bundle.hessian_monitor.monitor_seconds), ""]
    profiler = cProfile.Profile()
    bundle = OptDiag(verbose=False)
    profiler.enable()
    run_once(model, "OptDiag", epochs, batch_size, root, steps, callbacks=[bundle])
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats("optdiag", 25)
    out.append("cProfile, the 25 optdiag functions with the most own time:\n" + text.getvalue().split("\n\n", 2)[-1])
    return "\n".join(out)


_PER_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                   "on_before_zero_grad", "on_train_batch_end")


class Alternating(pl.Callback):
    """``inner``'s per-step hooks on for ``every`` batches and off for the next ``every``, alternately (its other hooks
    always run); ``seconds[on]`` holds the seconds per step of each block, from its first batch to the next block's."""

    def __init__(self, inner: pl.Callback, every: int) -> None:
        self.inner, self.every, self.batches, self.on = inner, every, 0, False
        self.seconds: dict[bool, list[float]] = {True: [], False: []}
        self._block_start: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.batches % self.every == 0:
            now = time.perf_counter()
            if self._block_start is not None and self.batches > 2 * self.every:  # the first two blocks warm up
                self.seconds[self.on].append((now - self._block_start) / self.every)
            self._block_start, self.on = now, (self.batches // self.every) % 2 == 1
        self.batches += 1
        if self.on:
            self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)


def _alternating_hook(name: str) -> Callable[..., Any]:
    def hook(self: Alternating, *args: Any, **kwargs: Any) -> Any:
        if name not in _PER_STEP_HOOKS or self.on:
            return getattr(self.inner, name)(*args, **kwargs)
        return None

    hook.__name__ = name
    return hook


for _name in FORWARDED_HOOKS + ("state_dict", "load_state_dict"):
    if _name != "on_train_batch_start":
        setattr(Alternating, _name, _alternating_hook(_name))
del _name


def measure_alternating(model: str, epochs: int, batch_size: int, root: str, names: list[str], steps: int,
                        every: int) -> str:
    """One run per configuration with its per-step hooks alternately on and off (:class:`Alternating`)."""
    lines = [f"**{model}** ({steps} optimizer steps per run, hooks on and off in alternating blocks of {every} "
             "batches)", "",
             "| callbacks | seconds per step, hooks on (median of blocks) | hooks off | per-step cost (us) "
             "| relative | difference of the means (us) | blocks on / off |", "|---|---|---|---|---|---|---|"]
    for name in names:
        if name == "none":
            continue
        (inner,) = CONFIGS[name]()
        alternating = Alternating(inner, every)
        run_once(model, name, epochs, batch_size, root, steps, callbacks=[alternating])
        on, off = alternating.seconds[True], alternating.seconds[False]
        if not on or not off:
            raise SystemExit(f"--alternate {every}: too few blocks in {steps} steps")
        m_on, m_off = statistics.median(on), statistics.median(off)
        lines.append(f"| {name} | {1e3 * m_on:.3f} ms | {1e3 * m_off:.3f} ms | {1e6 * (m_on - m_off):+.0f} "
                     f"| {m_on / m_off:.3f} | {1e6 * (statistics.mean(on) - statistics.mean(off)):+.0f} "
                     f"| {len(on)} / {len(off)} |")
    return "\n".join(lines)


def lockstep_target(name: str, args: tuple, wrap: Callable[[list], list]) -> dict[str, Any]:
    """One run of configuration ``name`` for :func:`lockstep.run` (a spawned process): a warm-up, then the run."""
    model, epochs, batch_size, steps, root, settings = args
    OPTDIAG_SETTINGS.update(settings)  # a spawned process: the parent's --set
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with quiet_lightning():
        run_once(model, "none", 1, batch_size, root, steps=min(steps, 5) if steps > 0 else 5)  # before the baton
        callbacks = CONFIGS[name]()
        for cb in callbacks:  # the budget and the pair pricing see this run's turns only, not the others'
            for monitor in getattr(cb, "children", (cb,)):
                if hasattr(monitor, "clock"):
                    monitor.clock = wrap.clock
        seconds, _, peak = run_once(model, name, epochs, batch_size, root, steps, callbacks=wrap(callbacks))
    runs = Runs()
    record(runs, seconds, callbacks, peak)
    return {"seconds": seconds, "hessian_seconds": sum(runs.hessian_seconds), "verdicts": sum(runs.verdicts),
            "snapshots": sum(runs.snapshots), "has_hessian": bool(runs.hessian_seconds), "peak": peak}


def measure_lockstep(model: str, epochs: int, batch_size: int, rounds: int, root: str, names: list[str],
                     steps: int = -1, every: int = 1) -> list[list[dict]]:
    """``rounds`` lockstep races of every configuration (benchmarks/lockstep.py), the first mover rotated."""
    import lockstep

    races = []
    for r in range(rounds):
        order = rotated(names, r)
        race = lockstep.run(lockstep_target, [(name, (model, epochs, batch_size, steps, root, OPTDIAG_SETTINGS))
                                                     for name in order],
                            every=every)
        for result in race:
            if "error" in result:
                raise RuntimeError(f"lockstep run {result['name']} failed: {result['error']}")
        races.append(sorted(race, key=lambda result: names.index(result["name"])))
    return races


def lockstep_table(model: str, races: list[list[dict]], steps: int, params: int) -> str:
    """Each configuration's baton time over the baseline's in the same race (rounds: one ratio each)."""
    lines = [f"**{model}** ({params:,} parameters, {steps} optimizer steps per run; lockstep, {len(races)} races)", "",
             "| callbacks | baton seconds (each race) | ratio to none (each race) | median ratio "
             "| per-step cost less Hessian seconds (ms) | Hessian seconds | verdicts "
             "| extra peak memory over the baseline's (x params' bytes) |",
             "|---|---|---|---|---|---|---|---|"]
    for i, name in enumerate(result["name"] for result in races[0]):
        rows = [race[i] for race in races]
        base = [race[0]["held"] for race in races]
        ratios = [row["held"] / b for row, b in zip(rows, base)]
        rest = statistics.median(1e3 * (row["held"] - row["hessian_seconds"] - b) / steps for row, b in zip(rows, base))
        hess = "/".join(f"{row['hessian_seconds']:.2f}" for row in rows) if rows[0]["has_hessian"] else "-"
        verdicts = "/".join(str(row["verdicts"]) for row in rows) if name == "OptDiag" else "-"
        memory = statistics.median(row["peak"] - race[0]["peak"] for row, race in zip(rows, races)) / (4 * params)
        held = " / ".join(f"{row['held']:.2f}" for row in rows)
        lines.append(f"| {name} | {held} | {' / '.join(f'{x:.3f}' for x in ratios)} | **{statistics.median(ratios):.3f}** "
                     f"| {rest:+.3f} | {hess} | {verdicts} | {memory:+.1f} |")
    return "\n".join(lines)


def table(model: str, results: dict[str, Runs], steps: int, params: int) -> str:
    base = results["none"].seconds
    param_bytes = 4 * params
    lines = [f"**{model}** ({params:,} parameters, {steps} optimizer steps per run)", "",
             "| callbacks | median wall (s) | ratio of medians | median of per-round ratios | per-step cost (ms) "
             "| per-step cost less Hessian seconds (ms) | Hessian snapshots | Hessian seconds | verdicts "
             "| extra peak memory over the baseline's (x params' bytes) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base_peak = statistics.median(results["none"].peak_bytes)
    for name, runs in results.items():
        med = statistics.median(runs.seconds)
        ratio = med / statistics.median(base)
        paired = statistics.median(s / b for s, b in zip(runs.seconds, base))
        per_step = 1e3 * (med - statistics.median(base)) / steps
        # the per-step work alone: each run's wall time less its curvature seconds, against the paired baseline
        hessian_free = [s - h for s, h in zip(runs.seconds, runs.hessian_seconds)] or runs.seconds
        per_step_rest = 1e3 * statistics.median(r - b for r, b in zip(hessian_free, base)) / steps
        snaps = "/".join(str(n) for n in runs.snapshots) or "-"
        hess = "/".join(f"{s:.2f}" for s in runs.hessian_seconds) or "-"
        verdicts = "/".join(str(n) for n in runs.verdicts) or "-"
        memory = (statistics.median(runs.peak_bytes) - base_peak) / param_bytes
        lines.append(f"| {name} | {med:.2f} | {ratio:.3f} | {paired:.3f} | {per_step:+.2f} | {per_step_rest:+.3f} "
                     f"| {snaps} | {hess} | {verdicts} | {memory:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: the model's own, 128 for mlp670k, 16 for transformer and resnet18, "
                             "else 32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=-1, help="cap on optimizer steps per run (-1: the epochs)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to compare ('none' is always included)")
    parser.add_argument("--profile", action="store_true", help="also time every hook of one OptDiag() run")
    parser.add_argument("--lockstep", type=int, default=0, metavar="N",
                        help="race the configurations on one core, taking turns every N training batches "
                             "(benchmarks/lockstep.py): each round is one race, its ratios immune to the machine's "
                             "drift; 0 (default): whole runs one after the other")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="time the per-step hooks alone: in one run per configuration, on for N batches and off "
                             "for the next N, alternately (medians of the blocks); 0 (default): off")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=setting,
                        help="an OptDiag setting other than its default, e.g. --set budget=0.03 (repeatable)")
    parser.add_argument("--root", default=None, help="Trainer default_root_dir (default: a temporary folder)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core: less interference
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import tempfile

    names = ["none"] + [c for c in args.configs if c != "none"]
    OPTDIAG_SETTINGS.update(args.set)
    print(f"torch {torch.__version__}, 1 thread pinned to one core, {args.rounds} interleaved rounds, medians; "
          f"load average at start {os.getloadavg()[0]:.1f}"
          + ("; " + not_the_defaults(OPTDIAG_SETTINGS) if OPTDIAG_SETTINGS else "") + "\n")
    with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
        for model in args.models:
            loader = loader_for(model, args.batch_size)
            steps = args.epochs * len(loader) if args.steps < 0 else min(args.steps, args.epochs * len(loader))
            params = sum(p.numel() for p in MODELS[model]().parameters())
            if args.alternate:
                print(measure_alternating(model, args.epochs, args.batch_size, args.root or tmp, names, steps,
                                          args.alternate), "\n", flush=True)
            elif args.lockstep:
                races = measure_lockstep(model, args.epochs, args.batch_size, args.rounds, args.root or tmp, names,
                                         args.steps, args.lockstep)
                print(f"batch {loader.batch_size}, load average now {os.getloadavg()[0]:.1f}")
                print(lockstep_table(model, races, steps, params), "\n", flush=True)
            else:
                results = measure(model, args.epochs, args.batch_size, args.rounds, args.root or tmp, names,
                                  args.steps)
                print(f"batch {loader.batch_size}, load average now {os.getloadavg()[0]:.1f}")
                print(table(model, results, steps, params), "\n", flush=True)
            if args.profile:
                print(profile(model, args.epochs, args.batch_size, args.root or tmp, args.steps), "\n", flush=True)


if __name__ == "__main__":
    main()
