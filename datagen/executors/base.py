"""What every executor does with shard tasks: run each through a ShardWorker, retry a shard
whose attempt failed (an exception, or the worker process dying), and give up on it after
``max_retries`` retries, reporting it as a :class:`ShardFailure` rather than stopping the
build. A :class:`~datagen.errors.UserError` (a bad config the worker found) is not retried:
it stops the build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from datagen.config import BuildConfig
from datagen.plan import ShardTask
from datagen.worker import ShardResult

DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class ShardFailure:
    task: ShardTask
    reason: str
    """The last attempt's error, one line."""
    attempts: int


class Executor(Protocol):
    max_retries: int

    def run(
        self, cfg: BuildConfig, tasks: list[ShardTask], out: Path, progress: bool = True
    ) -> list[ShardResult | ShardFailure]:
        """One result a task, in the tasks' order."""


def reason_of(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
