"""One build at a time in an output folder.

A build holds an exclusive ``flock`` on ``OUT/build.lock`` for its whole run; the file names
the holder (pid, host) for the message a second build gets. The kernel drops the lock when
the holding process ends, however it ends, so a lock left by a killed build is stale by
construction and the next build simply takes it over. (``flock`` is reliable on local file
systems; on NFS it depends on the server.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from datagen.errors import UserError

LOCK = "build.lock"


class BuildLock:
    """``with BuildLock(out):`` holds the folder for one build; refuses in one line when a
    live process holds it."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                raise UserError(
                    f"{self.path.parent} is being built by another datagen build ({who}); wait "
                    "for it to finish, or stop it, then run this build again (it resumes)"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # The previous holder removed the file between our open and our lock: retry.
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname()}
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)  # and with it the lock: nothing is held when this raises
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        # Remove the file while still holding the lock, so no one locks a file being removed.
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
