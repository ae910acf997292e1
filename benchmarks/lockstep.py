"""Runs that take turns step by step on one core: overhead ratios that a shared machine's drift cannot move.

Timing whole runs one after the other (``bench_overhead.py``'s rounds) compares seconds taken minutes apart, and on
a shared machine the same run's wall time moves by 10-30% between tries: more than the few percent being measured.
Here every configuration trains in its own process, all pinned to the same core, and a baton passes round them
every ``every`` training batches: only the holder runs, so the runs' turns are milliseconds to a second apart and
whatever slows the core slows them all alike. Each process counts only the time it holds the baton (from its
``setup`` to its ``on_train_end``: data loading, forward, backward, optimizer step and every callback hook of every
step), so the ratio of two processes' counts is the overhead, with the machine's drift cancelled turn by turn.

The first callback of each run takes the baton at ``setup``; the last passes it at every ``every``-th
``on_train_batch_end`` and at ``on_train_end``, after every other callback's hooks (:func:`bracket` asserts the
order). The first turn waits behind a barrier until every run is built. What the ratio does not see: the
turn-taking itself (between the counted intervals). What every run sees alike: the cache another run's step left
behind.

    from lockstep import run
    results = run(target, [("none", args_a), ("OptDiag", args_b)], every=10)  # target(name, args, wrap) -> dict
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Callable

import pytorch_lightning as pl

__all__ = ["Baton", "bracket", "run"]


class Baton:
    """A token passed round a ring of processes; ``held`` counts the seconds this process held it, ``turns`` its
    turns (``intervals``: their ``perf_counter`` start and end, a clock shared by the processes of one machine).

    Only the holder reads or writes ``done``, so choosing the next holder needs no lock.
    """

    def __init__(self, index: int, semaphores: list[Any], done: Any, barrier: Any = None) -> None:
        self.index, self.semaphores, self.done, self.barrier = index, semaphores, done, barrier
        self.held, self.turns = 0.0, 0
        self.intervals: list[tuple[float, float]] = []
        self._since: float | None = None

    def clock(self) -> float:
        """Seconds this run has held the baton: its own time, which a budget measured on it should see (the wall
        clock also runs while the other runs take their turns)."""
        return self.held + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def take(self) -> None:
        if self.barrier is not None:  # the first turn: every run is built and waiting (none is still starting up)
            self.barrier, barrier = None, self.barrier
            barrier.wait()
        self.semaphores[self.index].acquire()
        self._since = time.perf_counter()

    def pass_on(self, final: bool = False) -> None:
        """Stop counting, hand the baton to the next run still training, and (unless ``final``) wait for it back."""
        if self._since is None:
            return
        now = time.perf_counter()
        self.held += now - self._since
        self.intervals.append((self._since, now))
        self.turns += 1
        self._since = None
        if final:
            self.done[self.index] = 1
        n = len(self.semaphores)
        following = [(self.index + k) % n for k in range(1, n)]
        waiting = [j for j in following if not self.done[j]]
        if not waiting:  # the last run still training: keep the baton
            if not final:
                self._since = time.perf_counter()  # a new turn at once (counted as one)
            return
        self.semaphores[waiting[0]].release()
        if not final:
            self.take()


class _Take(pl.Callback):
    def __init__(self, baton: Baton) -> None:
        self.baton = baton

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.callbacks[0] is not self or not isinstance(trainer.callbacks[-1], _Pass):
            raise RuntimeError("lockstep: the baton's callbacks must come first and last")
        self.baton.take()


class _Pass(pl.Callback):
    def __init__(self, baton: Baton, every: int) -> None:
        self.baton, self.every, self.batches = baton, every, 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1
        if self.batches % self.every == 0:
            self.baton.pass_on()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.baton.pass_on(final=True)


def bracket(baton: Baton, callbacks: list, every: int = 1) -> list:
    """``callbacks`` between the callback that takes the baton and the one that passes it on every ``every``
    batches."""
    return [_Take(baton), *callbacks, _Pass(baton, every)]


class _Wrap:
    """What ``target`` gets: call it on the run's callbacks to bracket them; ``clock`` is the baton's."""

    def __init__(self, baton: Baton, every: int) -> None:
        self.baton, self.every, self.clock = baton, every, baton.clock

    def __call__(self, callbacks: list) -> list:
        return bracket(self.baton, callbacks, self.every)


def _child(target: Callable[..., dict], index: int, name: str, args: Any, semaphores: list, done: Any,
           barrier: Any, core: int | None, every: int, queue: Any) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    baton = Baton(index, semaphores, done, barrier)
    try:
        result = target(name, args, _Wrap(baton, every))
        queue.put((index, dict(result, held=baton.held, turns=baton.turns, intervals=baton.intervals)))
    except BaseException as error:  # a failed run must not leave the others waiting for the baton
        if baton.barrier is not None:
            baton.barrier.abort()  # failed before its first turn: the others stop waiting at the barrier
        elif not done[index]:
            done[index] = 1
            later = [j for j in range(len(semaphores)) if j != index and not done[j]]
            if later:
                semaphores[later[0]].release()
        queue.put((index, {"error": f"{type(error).__name__}: {error}"}))


def run(target: Callable[..., dict], runs: list[tuple[str, Any]], every: int = 1, core: int | None = None,
        timeout: float = 3600.0) -> list[dict]:
    """Train ``runs`` in lockstep, one process each, all on ``core`` (default: this process's last allowed core),
    each holding the baton for ``every`` training batches at a time.

    ``target(name, args, wrap)`` trains one run, passing ``wrap(callbacks)`` as the Trainer's callbacks (and
    ``wrap.clock`` to whatever times the run itself, such as a budget), and returns a dict of results; each returned dict gains ``held`` (seconds this run held the baton), ``turns`` and
    ``intervals`` (see :class:`Baton`), and ``name``; a run that raised returns ``{"error": ..., "name": ...}``.
    ``target`` must be importable (a module-level function): the processes are spawned.
    """
    if core is None and hasattr(os, "sched_getaffinity"):
        core = sorted(os.sched_getaffinity(0))[-1]
    context = multiprocessing.get_context("spawn")
    n = len(runs)
    semaphores = [context.Semaphore(1 if i == 0 else 0) for i in range(n)]
    done = context.Array("b", n)
    barrier, queue = context.Barrier(n), context.Queue()
    processes = [context.Process(target=_child, args=(target, i, name, args, semaphores, done, barrier, core, every, queue))
                 for i, (name, args) in enumerate(runs)]
    for p in processes:
        p.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < n:
            index, result = queue.get(timeout=max(deadline - time.monotonic(), 1.0))
            results[index] = result
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [dict(results[i], name=runs[i][0]) for i in range(n)]
