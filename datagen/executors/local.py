"""Run shard tasks in this process, one after another, with a progress bar."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from datagen.config import BuildConfig
from datagen.plan import ShardTask
from datagen.worker import ShardResult, ShardWorker


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
    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult]:
        if not tasks:
            return []
        bar = progress_bar(sum(len(t.units) for t in tasks), progress)
        worker = ShardWorker(cfg)
        results = []
        try:
            for task in tasks:
                bar.set_postfix_str(f"shard {task.index}")
                results.append(worker.run(task, out, on_sample=bar.update))
        finally:
            bar.close()
        return results
