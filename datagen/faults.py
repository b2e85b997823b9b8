"""Failpoints: named places in a build where a fault trial can make a worker die or raise.

Off unless ``DATAGEN_FAILPOINTS`` is set (worker processes and Ray actors inherit it), as
``NAME:SHARD:ACTION[:ONCE_FILE]`` items separated by ``;``: at failpoint NAME of shard SHARD,
ACTION ``kill`` (SIGKILL this process: a crash or preemption), ``raise`` (an exception) or
``enospc`` (the OSError a full disk gives).
With ONCE_FILE the fault fires only for the process that creates that file first, so a retry
goes through. Failpoints, in the order a shard meets them: ``shard-start`` (before its first
sample), ``shard-sample`` (after each sample: during generation), ``shard-tar`` (before each
tar is written), ``shard-renamed`` (tars in place, before the stats marker that commits the
shard); ``manifest`` (shard 0: every shard committed, before the manifest is written); and
``worker-start`` (shard 0: a Ray actor making its worker); ``publish-file`` (the Nth
file a publish has sent; SHARD is N).
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "DATAGEN_FAILPOINTS"


class FailpointError(RuntimeError):
    """The exception a ``raise`` failpoint throws."""


def failpoint(name: str, shard: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in filter(None, spec.split(";")):
        point, index, action, *once = item.split(":", 3)
        if point != name or int(index) != shard:
            continue
        if once:
            try:
                os.close(os.open(once[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise FailpointError(f"failpoint {name} of shard {shard}")
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"failpoint {name}")
