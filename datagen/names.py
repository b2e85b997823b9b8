"""The one place that says which sample keys, member names and shard file names are safe.

A dataset is data from elsewhere: its tar headers, member indexes and manifest may name
anything. Every reader checks the names it takes from them here before they reach a path, and
every writer joins names under its target with :func:`safe_join`. The rules are the data
contract's: a key is letters, digits, '-' and '_' (no dot, so webdataset's split at the first
dot gives it back), a member name is dot-separated words of letters, digits and '_', a shard
file is ``core|features|rejected-NNNNNN.tar``. None of them can hold a path separator, '..',
an absolute path or a NUL.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

KEY_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
MEMBER_RULE = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+){0,3}")
SHARD_FILE_RULE = re.compile(r"(?:core|features|rejected)-[0-9]{6}\.tar")


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a safe sample key (None when it is)."""
    if not isinstance(key, str) or not KEY_RULE.fullmatch(key):
        return (
            f"unsafe sample key {key!r}: keys are 1-128 letters, digits, '-' or '_' "
            "(no dot, path separator or '..')"
        )
    return None


def member_problem(ext: object) -> str | None:
    """Why ``ext`` (a member name after the key's dot) is not safe (None when it is)."""
    if not isinstance(ext, str) or not MEMBER_RULE.fullmatch(ext):
        return (
            f"unsafe member name {ext!r}: member names are dot-separated words of letters, "
            "digits and '_' (no path separator or '..')"
        )
    return None


def tar_name_problem(name: object) -> str | None:
    """Why a tar member's full name is not ``KEY.MEMBER`` with safe parts (None when it is)."""
    if not isinstance(name, str):
        return f"unsafe tar member name {name!r}"
    key, dot, ext = name.partition(".")
    if not dot:
        return f"tar member {name!r} has no '.': not KEY.MEMBER"
    return key_problem(key) or member_problem(ext)


def shard_file_problem(path: object) -> str | None:
    """Why a manifest's shard path is not a plain shard file name (None when it is)."""
    if not isinstance(path, str) or not SHARD_FILE_RULE.fullmatch(path):
        return (
            f"unsafe shard path {path!r}: a manifest lists plain file names like "
            "core-000000.tar (no folder, '..' or absolute path)"
        )
    return None


def safe_join(target: Path, *names: str) -> Path:
    """``target / names...`` for names already checked by the rules above, refusing anything
    that would leave ``target`` and any existing symlink on the way (ValueError)."""
    path = Path(target)
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"refusing to write {name!r} under {target}: not a plain name")
        path = path / name
        if path.is_symlink():
            raise ValueError(f"refusing to write through the symlink {path}")
    root = os.path.realpath(target)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(f"refusing to write {path}: outside {target}")
    return path


def open_new(path: Path) -> int:
    """Open ``path`` for writing as a new file, never through a symlink (O_NOFOLLOW); returns
    the file descriptor. An existing regular file is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags, 0o644)
