"""The lockstep harness of benchmarks/bench_overhead.py (benchmarks/lockstep.py): runs on one core take turns, only
the baton's holder trains, each counts its own turns, and a run that fails does not leave the others waiting."""

from __future__ import annotations

import math
import os
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import lockstep  # noqa: E402

STEPS = 12


class _Tiny(pl.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net, self.fail_at = nn.Linear(4, 1), fail_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise ValueError("a run that fails")
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def target(name: str, args: dict, wrap) -> dict:
    """One tiny run (spawned by lockstep.run): ``args`` may say at which batch it fails."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * STEPS, 4, generator=g), torch.randn(4 * STEPS, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=wrap([]), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=args["root"])
    started = wrap.clock()
    trainer.fit(_Tiny(args.get("fail_at")), DataLoader(data, batch_size=4))
    return {"clock": wrap.clock() - started, "steps": trainer.global_step}


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 5])
def test_runs_take_turns_and_count_their_own_time(tmp_path, every):
    results = lockstep.run(target, [("a", {"root": str(tmp_path)}), ("b", {"root": str(tmp_path)})], every=every,
                           timeout=300)
    assert [r["name"] for r in results] == ["a", "b"]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["steps"] == STEPS
        assert r["turns"] == math.ceil(STEPS / every) + (STEPS % every == 0)  # a turn per `every` batches, the last
        assert len(r["intervals"]) == r["turns"] and r["held"] == pytest.approx(
            sum(end - start for start, end in r["intervals"]))
        # the baton's clock is the run's own time: it stands still while the other run trains
        assert 0 < r["clock"] <= r["held"]
    # only the holder runs: the turns of the two runs never overlap, and they alternate
    turns = sorted((start, end, r["name"]) for r in results for start, end in r["intervals"])
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(turns, turns[1:]))
    names = [name for _, _, name in turns]
    switches = sum(a != b for a, b in zip(names, names[1:]))
    assert switches >= min(len(results[0]["intervals"]), len(results[1]["intervals"]))


@pytest.mark.slow
def test_a_failing_run_does_not_leave_the_others_waiting(tmp_path):
    results = lockstep.run(target, [("fails", {"root": str(tmp_path), "fail_at": 3}), ("ok", {"root": str(tmp_path)})],
                           timeout=300)
    failed, ok = results
    assert "a run that fails" in failed["error"]
    assert "error" not in ok and ok["steps"] == STEPS


def test_the_baton_callbacks_bracket_the_others():
    class _Sem:
        def acquire(self): pass
        def release(self): pass

    baton = lockstep.Baton(0, [_Sem()], [0])
    middle = pl.Callback()
    wrapped = lockstep.bracket(baton, [middle], every=3)
    assert wrapped[1] is middle and len(wrapped) == 3
    baton.take()
    for _ in range(7):
        wrapped[-1].on_train_batch_end()
    wrapped[-1].on_train_end(None, None)
    assert baton.turns == 3 and len(baton.intervals) == 3 and baton.done[0] == 1  # passes at batches 3 and 6, end


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []

    def setup(self, trainer, pl_module, stage):
        self.calls.append(("setup", None))

    def on_train_start(self, trainer, pl_module):
        self.calls.append(("on_train_start", None))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append(("on_train_batch_start", batch_idx))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls.append(("on_before_optimizer_step", trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls.append(("on_train_batch_end", batch_idx))

    def on_train_end(self, trainer, pl_module):
        self.calls.append(("on_train_end", None))


def test_alternating_blocks_run_the_per_step_hooks_every_other_block(tmp_path):
    """``bench_overhead.py --alternate``: the wrapped callback's per-step hooks run in the odd blocks of ``every``
    batches only, its other hooks always; each block after the first two is timed under its kind."""
    import bench_overhead

    recorder = _Recorder()
    alternating = bench_overhead.Alternating(recorder, every=2)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * STEPS, 4, generator=g), torch.randn(4 * STEPS, 1, generator=g))
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[alternating], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(_Tiny(), DataLoader(data, batch_size=4))
    on_batches = [b for b in range(STEPS) if (b // 2) % 2 == 1]
    assert [b for hook, b in recorder.calls if hook == "on_train_batch_start"] == on_batches
    assert [b for hook, b in recorder.calls if hook == "on_train_batch_end"] == on_batches
    assert [s for hook, s in recorder.calls if hook == "on_before_optimizer_step"] == on_batches  # step = batch here
    assert [hook for hook, _ in recorder.calls if not hook.startswith(("on_train_batch", "on_before"))] == [
        "setup", "on_train_start", "on_train_end"]
    # blocks start at batches 0, 2, ..., 10; those from batch 4 on are timed when the next one starts (6, 8, 10)
    assert len(alternating.seconds[False]) == 2 and len(alternating.seconds[True]) == 1
    assert all(s > 0 for kind in (True, False) for s in alternating.seconds[kind])
