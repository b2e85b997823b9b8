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
from pathlib import Path
from typing import Any

from datagen.config import BuildConfig
from datagen.executors.local import progress_bar
from datagen.plan import ShardTask
from datagen.worker import ShardResult, ShardWorker

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
    return _WORKER.run(task, Path(out), on_sample=_DONE.put)


class ProcessExecutor:
    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers

    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult]:
        if not tasks:
            return []
        ctx = multiprocessing.get_context("spawn")
        done = ctx.Queue()
        bar = progress_bar(sum(len(t.units) for t in tasks), progress)
        results: dict[int, ShardResult] = {}
        try:
            with ProcessPoolExecutor(
                max_workers=min(self.workers, len(tasks)),
                mp_context=ctx,
                initializer=_start,
                initargs=(cfg, str(out / "build.log"), done),
            ) as pool:
                pending: dict[Future, ShardTask] = {
                    pool.submit(_run, task, str(out)): task for task in tasks
                }
                while pending:
                    finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(done, bar)
                    for fut in finished:
                        task = pending.pop(fut)
                        results[task.index] = fut.result()
                _drain(done, bar)
        finally:
            bar.close()
        return [results[t.index] for t in tasks]


def _drain(done: Any, bar: Any) -> None:
    while True:
        try:
            bar.update(done.get_nowait())
        except queue.Empty:
            return
