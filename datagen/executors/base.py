"""What every executor does with shard tasks: run each through a ShardWorker, retry a shard
whose attempt failed (an exception, or the worker process dying), and give up on it after
``max_retries`` retries, reporting it as a :class:`ShardFailure` rather than stopping the
build. A :class:`~datagen.errors.UserError` (a bad config the worker found) is not retried:
it stops the build."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from datagen.config import BuildConfig
from datagen.errors import UserError
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


def fatal(exc: BaseException, out: Path) -> UserError | None:
    """The error that stops the whole build instead of a retry: a bad config the worker
    found (UserError), or a full disk (every shard would fail the same way)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"disk full while writing under {out} ({exc.strerror}); free space and run the same "
            "command again: committed shards are kept and the build resumes"
        )
    return None


def torch_threads() -> int:
    """The torch CPU thread count of this (driver) process. Workers and actors run with the
    same count: CPU kernels split reductions by thread, so the float results, and with them
    the shard bytes, depend on it (Ray would otherwise give each 1-CPU actor one thread)."""
    import torch

    return torch.get_num_threads()


def reason_of(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
