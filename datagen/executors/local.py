"""Run shard tasks in this process, one after another, with a progress bar."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from datagen.config import BuildConfig
from datagen.executors.base import DEFAULT_RETRIES, ShardFailure, fatal, reason_of
from datagen.plan import ShardTask
from datagen.worker import ShardResult, ShardWorker

log = logging.getLogger("datagen.build")


def progress_bar(total: int, progress: bool) -> tqdm:
    """The build's progress bar: samples done, rate and time left."""
    return tqdm(
        total=total,
        unit="sample",
        desc="build",
        disable=not progress,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples "
        "[{elapsed}<{remaining}, {rate_fmt}]",
    )


class LocalExecutor:
    """Shard after shard in this process."""

    def __init__(self, max_retries: int = DEFAULT_RETRIES):
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.max_retries = max_retries

    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult | ShardFailure]:
        if not tasks:
            return []
        bar = progress_bar(sum(len(t.units) for t in tasks), progress)
        worker = ShardWorker(cfg)
        results: list[ShardResult | ShardFailure] = []
        try:
            for task in tasks:
                bar.set_postfix_str(f"shard {task.index}")
                results.append(self._attempts(worker, task, out, bar))
        finally:
            bar.close()
        return results

    def _attempts(
        self, worker: ShardWorker, task: ShardTask, out: Path, bar: tqdm
    ) -> ShardResult | ShardFailure:
        done = [0]

        def counted(n: int) -> None:
            done[0] += n
            bar.update(n)

        for attempt in range(1, self.max_retries + 2):
            done[0] = 0
            try:
                return worker.run(task, out, on_sample=counted)
            except Exception as exc:
                stop = fatal(exc, out)
                if stop is not None:
                    raise stop from None
                bar.update(-done[0])
                reason = reason_of(exc)
                log.warning(
                    "shard %d attempt %d failed after %d samples: %s",
                    task.index,
                    attempt,
                    done[0],
                    reason,
                )
        return ShardFailure(task, reason, attempt)
