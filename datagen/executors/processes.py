"""Run shard tasks in N local worker processes (``--workers N``), started with spawn.

Each process loads the model and tracker once (a :class:`datagen.worker.ShardWorker`) and takes
whole shards; every shard is written by the worker exactly as the in-process executor writes
it, so the shards and the manifest are byte-identical to a local build (the manifest is
written by the driver from the shards' results, in shard order). Progress counts samples as
the workers finish them; worker log lines go to the build's ``build.log``.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
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
_WORKER: ShardWorker | None = None
_DONE: Any = None


def _start(cfg: BuildConfig, log_path: str, done: Any, threads: int) -> None:
    """Process initializer: the worker (model loaded on its first shard), the log, and the
    driver's torch thread count (CPU float results depend on it: same count, same bytes)."""
    global _WORKER, _DONE
    import torch

    torch.set_num_threads(threads)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("datagen").addHandler(handler)
    logging.getLogger("datagen").setLevel(logging.INFO)
    quiet_libraries()
    _WORKER = ShardWorker(cfg)
    _DONE = done


def _run(task: ShardTask, out: str) -> ShardResult:
    assert _WORKER is not None
    return _WORKER.run(task, Path(out), on_sample=lambda n: _DONE.put((task.index, n)))


DIED = "worker process died (killed, out of memory or crashed)"


class ProcessExecutor:
    """Shards in ``workers`` spawned processes. A shard whose attempt raises is resubmitted;
    when a worker process dies the pool is broken, so every shard in flight gets another
    attempt in a fresh pool; after ``max_retries`` retries a shard is a failure."""

    def __init__(self, workers: int, max_retries: int = DEFAULT_RETRIES):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.max_retries = max_retries

    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult | ShardFailure]:
        if not tasks:
            return []
        ctx = multiprocessing.get_context("spawn")
        threads = torch_threads()
        bar = progress_bar(sum(len(t.units) for t in tasks), progress)
        counted: dict[int, int] = {t.index: 0 for t in tasks}
        attempts: dict[int, int] = {t.index: 0 for t in tasks}
        results: dict[int, ShardResult | ShardFailure] = {}
        todo = list(tasks)

        # A queue per pool: a worker killed while writing to a queue leaves its lock held,
        # and every later writer would block on it.
        done = ctx.Queue()

        def drain() -> None:
            while True:
                try:
                    index, n = done.get_nowait()
                except queue.Empty:
                    return
                counted[index] += n
                bar.update(n)

        def failed(task: ShardTask, reason: str) -> None:
            drain()
            lost = counted[task.index]
            bar.update(-lost)
            counted[task.index] = 0
            log.warning(
                "shard %d attempt %d failed after %d samples: %s",
                task.index,
                attempts[task.index],
                lost,
                reason,
            )
            if attempts[task.index] > self.max_retries:
                results[task.index] = ShardFailure(task, reason, attempts[task.index])
            else:
                todo.append(task)

        try:
            while todo:
                drain()
                done = ctx.Queue()
                with ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=ctx,
                    initializer=_start,
                    initargs=(cfg, str(out / "build.log"), done, threads),
                ) as pool:
                    # At most one shard a worker in flight, so a dying worker costs only the
                    # shards that were running, not the queued ones.
                    pending: dict[Future, ShardTask] = {}
                    broken = False
                    while True:
                        while todo and not broken and len(pending) < self.workers:
                            task = todo.pop(0)
                            attempts[task.index] += 1
                            pending[pool.submit(_run, task, str(out))] = task
                        if not pending:
                            break
                        finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        drain()
                        for fut in finished:
                            task = pending.pop(fut)
                            try:
                                results[task.index] = fut.result()
                            except BrokenProcessPool:
                                broken = True  # this pool is done; the rest go to a new one
                                failed(task, DIED)
                            except Exception as exc:
                                stop = fatal(exc, out)
                                if stop is not None:
                                    raise stop from None
                                failed(task, reason_of(exc))
                drain()
        finally:
            bar.close()
        return [results[t.index] for t in tasks]
