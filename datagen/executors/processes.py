"""Run shard tasks in N local worker processes (``--workers N``), started with spawn.

Each process loads the model and tracker once (a :class:`datagen.worker.ShardWorker`, made on
its first shard so that a failure to make it is that shard's error, with its reason) and takes
whole shards; every shard is written by the worker exactly as the in-process executor writes
it, so the shards and the manifest are byte-identical to a local build (the manifest is
written by the driver from the shards' results, in shard order). Progress counts samples as
the workers finish them; worker log lines go to the build's ``build.log``.

When a worker process dies, Python's pool breaks and stops every other worker too, so which
shard killed it is unknown: the shards that were in flight are not charged an attempt but
re-run one at a time, alone in a fresh one-process pool, where a death is that shard's own.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from datagen.config import BuildConfig
from datagen.executors.base import DEFAULT_RETRIES, ShardFailure, fatal, reason_of, torch_threads
from datagen.executors.local import progress_bar
from datagen.plan import ShardTask
from datagen.quiet import quiet_libraries
from datagen.worker import ShardResult, ShardWorker

log = logging.getLogger("datagen.build")
_CFG: BuildConfig | None = None
_WORKER: ShardWorker | None = None
_DONE: Any = None


def _start(cfg: BuildConfig, log_path: str, done: Any, threads: int) -> None:
    """Process initializer: the log, quiet libraries, and the driver's torch thread count
    (CPU float results depend on it: same count, same bytes). Nothing here can fail on the
    model: the worker is made by the first shard."""
    global _CFG, _DONE
    import torch

    torch.set_num_threads(threads)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("datagen").addHandler(handler)
    logging.getLogger("datagen").setLevel(logging.INFO)
    quiet_libraries()
    _CFG, _DONE = cfg, done


def _run(task: ShardTask, out: str) -> ShardResult:
    global _WORKER
    if _WORKER is None:
        assert _CFG is not None
        _WORKER = ShardWorker(_CFG)
    return _WORKER.run(task, Path(out), on_sample=lambda n: _DONE.put((task.index, n)))


DIED = "worker process died (killed, out of memory or crashed)"


class ProcessExecutor:
    """Shards in ``workers`` spawned processes, one shard a worker in flight. A shard whose
    attempt raises is resubmitted; the shards in flight when a worker dies are re-run alone
    (see the module docstring); after ``max_retries`` retries a shard is a failure."""

    def __init__(self, workers: int, max_retries: int = DEFAULT_RETRIES):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.workers = workers
        self.max_retries = max_retries

    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult | ShardFailure]:
        if not tasks:
            return []
        self.cfg, self.out, self.ctx = cfg, out, multiprocessing.get_context("spawn")
        self.bar = progress_bar(sum(len(t.units) for t in tasks), progress)
        self.counted = {t.index: 0 for t in tasks}
        self.attempts = {t.index: 0 for t in tasks}
        self.results: dict[int, ShardResult | ShardFailure] = {}
        todo, suspects = list(tasks), []
        try:
            while todo or suspects:
                if suspects:  # alone, so that a death is this shard's own
                    suspects += self._pool([suspects.pop(0)], 1, todo, alone=True)
                else:
                    suspects += self._pool(todo, self.workers, todo, alone=False)
        finally:
            self.bar.close()
        return [self.results[t.index] for t in tasks]

    def _pool(
        self, queue_: list[ShardTask], size: int, retry: list[ShardTask], alone: bool
    ) -> list[ShardTask]:
        """Run ``queue_`` (taken from) in one pool of ``size`` processes; failed attempts go
        back to ``retry``. Returns the shards that were in flight when the pool broke."""
        done = self.ctx.Queue()  # a queue a pool: a killed writer can leave its lock held
        pool = ProcessPoolExecutor(
            max_workers=size,
            mp_context=self.ctx,
            initializer=_start,
            initargs=(self.cfg, str(self.out / "build.log"), done, torch_threads()),
        )
        pending: dict[Future, ShardTask] = {}
        broken: list[ShardTask] = []
        stop: BaseException | None = None
        try:
            while stop is None:
                while queue_ and not broken and len(pending) < size:
                    task = queue_.pop(0)
                    self.attempts[task.index] += 1
                    pending[pool.submit(_run, task, str(self.out))] = task
                if not pending:
                    break
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                self._drain(done)
                for fut in finished:
                    task = pending.pop(fut)
                    try:
                        self.results[task.index] = fut.result()
                    except BrokenProcessPool:
                        if alone:
                            self._failed(task, DIED, retry_to=broken)
                        else:  # not known to be this shard's fault: not charged
                            if not broken:
                                log.warning(
                                    "a worker process died (killed, out of memory or crashed) "
                                    "with shards in flight; re-running each of them alone"
                                )
                            self.attempts[task.index] -= 1
                            self._undo(task)
                            broken.append(task)
                    except Exception as exc:
                        stop = fatal(exc, self.out)
                        if stop is None:
                            self._failed(task, reason_of(exc), retry_to=retry)
        finally:
            # After a fatal error the shards in flight end on their own (a full disk fails
            # them fast); the queue is drained meanwhile, so no worker blocks on a full pipe.
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            while any(p.is_alive() for p in procs):
                self._drain(done)
                time.sleep(0.05)
            self._drain(done)
            done.close()
            done.join_thread()
        if stop is not None:
            raise stop from None
        return broken

    def _drain(self, done: Any) -> None:
        while True:
            try:
                index, n = done.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self.counted[index] += n
            self.bar.update(n)

    def _undo(self, task: ShardTask) -> int:
        """Take a failed attempt's samples off the progress bar; how many it had done."""
        self.bar.update(-self.counted[task.index])
        lost, self.counted[task.index] = self.counted[task.index], 0
        return lost

    def _failed(self, task: ShardTask, reason: str, retry_to: list[ShardTask]) -> None:
        lost = self._undo(task)
        n = self.attempts[task.index]
        log.warning("shard %d attempt %d failed after %s samples: %s", task.index, n, lost, reason)
        if n > self.max_retries:
            self.results[task.index] = ShardFailure(task, reason, n)
        else:
            retry_to.append(task)
