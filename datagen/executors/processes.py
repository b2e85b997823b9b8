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
from datagen.errors import UserError
from datagen.executors.base import DEFAULT_RETRIES, ShardFailure, reason_of
from datagen.executors.local import progress_bar
from datagen.plan import ShardTask
from datagen.worker import ShardResult, ShardWorker

log = logging.getLogger("datagen.build")
_WORKER: ShardWorker | None = None
_DONE: Any = None


def _start(cfg: BuildConfig, log_path: str, done: Any) -> None:
    """Process initializer: the worker (model loaded on its first shard) and the log."""
    global _WORKER, _DONE
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("datagen").addHandler(handler)
    logging.getLogger("datagen").setLevel(logging.INFO)
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
            bar.update(-counted[task.index])
            counted[task.index] = 0
            log.warning("shard %d attempt %d failed: %s", task.index, attempts[task.index], reason)
            if attempts[task.index] > self.max_retries:
                results[task.index] = ShardFailure(task, reason, attempts[task.index])
            else:
                todo.append(task)

        try:
            while todo:
                drain()
                done = ctx.Queue()
                with ProcessPoolExecutor(
                    max_workers=min(self.workers, len(todo)),
                    mp_context=ctx,
                    initializer=_start,
                    initargs=(cfg, str(out / "build.log"), done),
                ) as pool:
                    pending: dict[Future, ShardTask] = {}
                    for task in todo:
                        attempts[task.index] += 1
                        pending[pool.submit(_run, task, str(out))] = task
                    todo = []
                    while pending:
                        finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        drain()
                        for fut in finished:
                            task = pending.pop(fut)
                            try:
                                results[task.index] = fut.result()
                            except BrokenProcessPool:
                                failed(task, DIED)
                            except UserError:
                                raise
                            except Exception as exc:
                                failed(task, reason_of(exc))
                drain()
        finally:
            bar.close()
        return [results[t.index] for t in tasks]
