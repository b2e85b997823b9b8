"""Tar member offsets: the per-shard index written at build time, and how it is built.

Next to every shard tar ``core-000000.tar`` the build writes ``core-000000.tar.idx.json``:

.. code-block:: json

    {"format": "datagen-tar-index", "version": 1, "tar": "core-000000.tar",
     "bytes": 532480, "sha256": "<sha256 of the tar>", "checksum": "xxh3_64",
     "samples": [{"key": "k-r00", "start": 0, "end": 106496,
                  "members": {"mp4": [46080, 47714, "<16 hex digits>"], ...}}, ...]}

``samples`` are in tar order (keys sorted); ``start`` is the offset of the first header of the
sample, ``end`` the offset just past its last member's padded data, so ``[start, end)`` is one
contiguous read. Each member is ``[data offset, size, xxh3_64 of the data]``. The checksum lets
a reader detect a flipped byte in the one member it reads, at memory speed, without hashing the
whole shard. ``sha256`` ties the index to its tar: an index whose digest differs from the
manifest's is stale and ignored.

The tar itself is read by :mod:`datagen.sampleformat` (the one tar reader); this module
indexes what it finds. ``ShardError`` and the tar reader's names are re-exported here for
older imports.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import xxhash

from datagen.names import key_problem, member_problem
from datagen.sampleformat import (  # noqa: F401  (re-exported: the tar reader's names)
    BLOCK,
    CorruptShardError,
    MemberEntry,
    Reader,
    SampleEntry,
    ShardError,
    TarMember,
    TruncatedShardError,
    iter_members,
    iter_samples,
    json_value,
)

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "datagen-tar-index"
INDEX_VERSION = 1
CHECKSUM = "xxh3_64"


def index_name(tar_name: str) -> str:
    """``core-000000.tar`` -> ``core-000000.tar.idx.json`` (also for URLs)."""
    return tar_name + INDEX_SUFFIX


def member_checksum(data: Any) -> str:
    """xxh3_64 of a bytes-like object, 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


@dataclass
class TarIndex:
    """Where every sample and member of one tar lies."""

    tar: str
    bytes: int
    sha256: str | None
    samples: list[SampleEntry]
    checksum: str | None = CHECKSUM
    _positions: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def position(self, key: str) -> int | None:
        """Position of ``key`` in the tar (None when absent)."""
        if not self._positions:
            self._positions = {s.key: i for i, s in enumerate(self.samples)}
        return self._positions.get(key)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "tar": self.tar,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "checksum": self.checksum,
            "samples": [
                {
                    "key": s.key,
                    "start": s.start,
                    "end": s.end,
                    "members": {
                        ext: [m.offset, m.size, m.checksum] for ext, m in sorted(s.members.items())
                    },
                }
                for s in self.samples
            ],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "index") -> TarIndex:
        """Parse an index file; ValueError naming ``name`` when it is not one."""
        try:
            obj = json_value(data)
            if obj.get("format") != INDEX_FORMAT or obj.get("version") != INDEX_VERSION:
                raise ValueError(f"not a {INDEX_FORMAT} v{INDEX_VERSION}")
            if obj.get("checksum") not in (CHECKSUM, None):
                raise ValueError(f"unknown checksum {obj.get('checksum')!r}")
            samples = [
                SampleEntry(
                    s["key"],
                    int(s["start"]),
                    int(s["end"]),
                    {e: MemberEntry(int(m[0]), int(m[1]), m[2]) for e, m in s["members"].items()},
                )
                for s in obj["samples"]
            ]
            for entry in samples:
                problem = key_problem(entry.key) or next(
                    filter(None, map(member_problem, entry.members)), None
                )
                if problem:
                    # Not a damaged index to scan past: a name that must never reach a path.
                    raise CorruptShardError(name, str(entry.key), problem)
            return cls(obj["tar"], int(obj["bytes"]), obj.get("sha256"), samples, obj["checksum"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{name}: not a valid tar index ({exc})") from None


def build_index(data: bytes, tar: str, sha256: str | None) -> TarIndex:
    """The index of a tar held in memory, with a checksum of every member."""
    view = memoryview(data)
    samples = []
    for entry, _ in iter_samples(Reader(io.BytesIO(data), tar, seekable=True, size=len(data))):
        members = {
            ext: MemberEntry(m.offset, m.size, member_checksum(view[m.offset : m.offset + m.size]))
            for ext, m in entry.members.items()
        }
        samples.append(SampleEntry(entry.key, entry.start, entry.end, members))
    return TarIndex(tar, len(data), sha256, samples)


def scan_index(f: BinaryIO, tar: str, size: int) -> tuple[TarIndex, ShardError | None]:
    """Index a tar file by reading its headers only (no checksums). A damaged tar gives the
    samples before the damage and the error to raise for the first sample after it."""
    samples: list[SampleEntry] = []
    error: ShardError | None = None
    try:
        for entry, _ in iter_samples(Reader(f, tar, seekable=True, size=size)):
            samples.append(entry)
    except ShardError as exc:
        error = exc
        # The sample being read when the damage was found is incomplete: drop it.
        if samples and exc.key == samples[-1].key:
            samples.pop()
    return TarIndex(tar, size, None, samples, checksum=None), error
