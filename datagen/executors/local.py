"""Run shard tasks in this process, one after another, with a progress bar."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from datagen.config import BuildConfig
from datagen.plan import ShardTask
from datagen.worker import ShardWorker


class LocalExecutor:
    def run(self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True):
        if not tasks:
            return []
        total = sum(len(t.units) for t in tasks)
        bar = tqdm(
            total=total,
            unit="sample",
            desc="build",
            disable=not progress,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples "
            "[{elapsed}<{remaining}, {rate_fmt}]",
        )
        worker = ShardWorker(cfg)
        results = []
        try:
            for task in tasks:
                bar.set_postfix_str(f"shard {task.index}")
                results.append(worker.run(task, out, on_sample=bar.update))
        finally:
            bar.close()
        return results
