"""Tar member offsets: a lean tar reader, and the per-shard index written at build time.

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

The reader here parses ustar/PAX/GNU headers itself (what ``tarfile.open(mode="w",
format=PAX_FORMAT)`` writes); it checks each header's checksum, and a short read raises
:class:`TruncatedShardError` naming the shard and the key being read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import xxhash

from datagen.names import key_problem, member_problem, tar_name_problem

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "datagen-tar-index"
INDEX_VERSION = 1
CHECKSUM = "xxh3_64"
BLOCK = 512


class ShardError(Exception):
    """A shard cannot be read: the message starts with the shard, then the key (if known)."""

    def __init__(self, shard: str, key: str | None, problem: str, member: str | None = None):
        self.shard, self.key, self.member, self.problem = shard, key, member, problem
        where = shard if key is None else f"{shard}: {key}" + (f".{member}" if member else "")
        super().__init__(f"{where}: {problem}")


class TruncatedShardError(ShardError):
    """The shard ends before the data of ``key``."""


class CorruptShardError(ShardError):
    """Bytes that are there but wrong: a checksum, a tar header or a member's format."""


def index_name(tar_name: str) -> str:
    """``core-000000.tar`` -> ``core-000000.tar.idx.json`` (also for URLs)."""
    return tar_name + INDEX_SUFFIX


def member_checksum(data: Any) -> str:
    """xxh3_64 of a bytes-like object, 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class MemberEntry:
    offset: int
    """Offset of the member's data in the tar."""
    size: int
    checksum: str | None
    """xxh3_64 of the data; None in an index scanned from headers (nothing to check against)."""


@dataclass
class SampleEntry:
    key: str
    start: int
    end: int
    members: dict[str, MemberEntry]
    """Extension (the name after the key and its first dot) -> entry."""


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
            obj = json.loads(data)
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


# --- the lean tar reader ---------------------------------------------------------------------


class Reader:
    """A forward-only view of a byte stream that knows its offset and names the shard in
    errors. ``skip`` seeks when the stream can, else reads and drops."""

    def __init__(
        self,
        f: BinaryIO,
        shard: str,
        offset: int = 0,
        seekable: bool | None = None,
        size: int | None = None,
    ):
        self.f, self.shard, self.offset, self.size = f, shard, offset, size
        if seekable is None:
            try:
                seekable = bool(f.seekable())
            except (AttributeError, OSError):
                seekable = False
        self.seekable = seekable

    def read(self, n: int, key: str | None, member: str | None = None) -> bytearray:
        """Exactly ``n`` bytes into a fresh (writable) buffer, or TruncatedShardError."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.f.readinto(view[got:])  # type: ignore[attr-defined]
            except AttributeError:
                chunk = self.f.read(n - got)
                k = len(chunk)
                view[got : got + k] = chunk
            if not k:
                self.offset += got
                raise TruncatedShardError(
                    self.shard,
                    key,
                    f"truncated: shard ends at byte {self.offset}, {n - got} bytes short",
                    member,
                )
            got += k
        self.offset += n
        return buf

    def skip(self, n: int, key: str | None, member: str | None = None) -> None:
        if n <= 0:
            return
        if self.size is not None and self.offset + n > self.size:
            raise TruncatedShardError(
                self.shard,
                key,
                f"truncated: shard ends at byte {self.size}, data runs to {self.offset + n}",
                member,
            )
        if self.seekable:
            self.f.seek(self.offset + n)
            self.offset += n
            return
        while n > 0:
            k = min(n, 1 << 20)
            self.read(k, key)
            n -= k


@dataclass(frozen=True)
class TarMember:
    name: str
    header: int
    """Offset of the first header block of this member (PAX/GNU extension headers included)."""
    offset: int
    """Offset of the data."""
    size: int

    @property
    def key_ext(self) -> tuple[str, str]:
        """(key, member) of ``KEY.MEMBER``; the reader refuses names with a folder part
        (:func:`datagen.names.tar_name_problem`)."""
        key, _, ext = self.name.partition(".")
        return key, ext


def _octal(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:  # base-256 (GNU) for large values
        value = int.from_bytes(field_[1:], "big")
        return value
    text = field_.split(b"\0", 1)[0].strip(b" \0")
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum((b - 256 if b > 127 else b) for b in block[:148] + block[156:]) + 8 * 32
    return stored in (unsigned, signed)


def _pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def iter_members(
    reader: Reader,
    wanted: Callable[[str, str], bool] | None = None,
    last_key: list[str | None] | None = None,
) -> Iterator[tuple[TarMember, bytearray | None]]:
    """Regular-file members of a tar, in order, with their data when ``wanted(key, ext)``
    (else the data is skipped and None is given).

    ``last_key`` (a one-item list) is updated with the key being read, so that a caller can
    name it when the stream fails. Raises TruncatedShardError / CorruptShardError.
    """
    pending_name: str | None = None
    pending_size: int | None = None
    header_start: int | None = None
    key: str | None = None
    while True:
        start = reader.offset
        try:
            block = reader.read(BLOCK, key)
        except TruncatedShardError:
            if start == reader.offset and header_start is None:
                # Ends cleanly at a member boundary but without the end-of-archive blocks.
                raise TruncatedShardError(
                    reader.shard,
                    key,
                    f"truncated: shard ends at byte {start} with no end-of-archive marker "
                    "after this sample",
                ) from None
            raise
        if block.count(0) == BLOCK:
            return
        if not _header_ok(block):
            raise CorruptShardError(
                reader.shard,
                key,
                f"bad tar header checksum at byte {start} (after this key)",
            )
        if header_start is None:
            header_start = start
        type_ = block[156:157]
        size = _octal(block[124:136])
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if type_ in (b"x", b"L", b"g"):
            data = reader.read(padded, key)[:size] if size else bytearray()
            if type_ == b"x":
                pax = _pax(bytes(data))
                pending_name = pax.get("path", pending_name)
                if "size" in pax:
                    pending_size = int(pax["size"])
            elif type_ == b"L":
                pending_name = bytes(data).split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if pending_name is not None:
            name = pending_name
        if pending_size is not None:
            size = pending_size
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        member = TarMember(name, header_start, reader.offset, size)
        pending_name = pending_size = header_start = None
        if type_ not in (b"0", b"\0", b"7"):
            reader.skip(padded, key)
            continue
        k, ext = member.key_ext
        problem = tar_name_problem(member.name)
        if problem:
            raise CorruptShardError(reader.shard, k, f"{problem} (header at byte {member.header})")
        if k != key:
            key = k
            if last_key is not None:
                last_key[0] = key
        if wanted is not None and wanted(k, ext):
            data = reader.read(size, key, ext)
            reader.skip(padded - size, key)
            yield member, data
        else:
            reader.skip(padded, key, ext)
            yield member, None


def iter_samples(
    reader: Reader, wanted: Callable[[str, str], bool] | None = None
) -> Iterator[tuple[SampleEntry, dict[str, bytearray]]]:
    """Members grouped into samples (key = name up to the first dot): (entry, {ext: data}).

    Only ``wanted`` members carry data; the entry lists every member (checksum None)."""
    current: SampleEntry | None = None
    data: dict[str, bytearray] = {}
    for member, payload in iter_members(reader, wanted):
        key, ext = member.key_ext
        if not ext:
            continue
        end = member.offset + (member.size + BLOCK - 1) // BLOCK * BLOCK
        if current is None or key != current.key:
            if current is not None:
                yield current, data
            current, data = SampleEntry(key, member.header, end, {}), {}
        current.members[ext] = MemberEntry(member.offset, member.size, None)
        current.end = end
        if payload is not None:
            data[ext] = payload
    if current is not None:
        yield current, data


def build_index(data: bytes, tar: str, sha256: str | None) -> TarIndex:
    """The index of a tar held in memory, with a checksum of every member."""
    import io

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
