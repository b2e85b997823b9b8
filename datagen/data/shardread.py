"""Reading the members of a dataset's shards: local shards through ``mmap`` (arrays are
zero-copy, copy-on-write views of the page cache) and the per-shard member index written at
build time (else a header scan), remote shards with one ranged stream per run of samples
(else one stream through the whole tar), and only the members asked for.

A flipped byte inside a member is caught by the member's xxh3_64 in the index
(``verify="members"``, at memory speed); ``verify="all"`` also checks each shard's sha256
against the manifest before reading it (catches damage in tar headers and shards without an
index). Per-sample errors are :class:`ShardError` values handed to the caller, who raises or
skips them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from datagen.data.locate import Shard, _is_url, _local, _open_stream, _read_small, _short
from datagen.index import TarIndex, index_name, member_checksum, scan_index
from datagen.sampleformat import (
    FEATURE_MEMBER,
    CorruptShardError,
    Reader,
    SampleEntry,
    ShardError,
    TruncatedShardError,
    iter_samples,
)
from datagen.shards import sha256_file

log = logging.getLogger("datagen.data")

Read = tuple[int, str | None, dict[str, Any] | ShardError]
"""(position in the shard, key, members by extension or the error)."""


class _LocalTar:
    """A local tar mapped copy-on-write (arrays view the page cache; writable, private)."""

    def __init__(self, path: str, index: TarIndex, scan_error: ShardError | None, name: str):
        self.path, self.index, self.scan_error, self.name = path, index, scan_error, name
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self.view: memoryview = memoryview(mm)
            else:
                self.view = memoryview(bytearray())

    def entry(self, pos: int) -> SampleEntry:
        if pos < len(self.index.samples):
            return self.index.samples[pos]
        if self.scan_error is not None:
            raise self.scan_error
        raise CorruptShardError(
            self.name, None, f"holds {len(self.index.samples)} samples, wanted position {pos}"
        )

    def members(self, entry: SampleEntry, wanted: set[str] | None, verify: bool) -> dict:
        out = {}
        for ext, m in entry.members.items():
            if wanted is not None and ext not in wanted:
                continue
            if m.offset + m.size > self.size:
                raise TruncatedShardError(
                    self.name,
                    entry.key,
                    f"truncated: shard ends at byte {self.size}, member data runs to "
                    f"{m.offset + m.size}",
                    ext,
                )
            view = self.view[m.offset : m.offset + m.size]
            if verify and m.checksum is not None and member_checksum(view) != m.checksum:
                raise CorruptShardError(
                    self.name, entry.key, "checksum differs from the index (corrupt bytes)", ext
                )
            out[ext] = view
        return out


def _index_ok(idx: TarIndex, loc: str, sha256: str | None) -> bool:
    name = loc.rstrip("/").rsplit("/", 1)[-1]
    foreign = sha256 is not None and idx.sha256 not in (None, sha256)
    if (
        foreign
        and not _is_url(loc)
        and os.path.getsize(_local(loc)) == idx.bytes
        and sha256_file(_local(loc)) != sha256  # (sizes alone often agree: 10 KiB blocks)
    ):
        # The index describes the file on disk, and both are another shard than the one the
        # manifest lists: reading on would return another build's samples.
        raise CorruptShardError(
            name, None, f"is not the shard the manifest lists (its index records sha256 "
            f"{idx.sha256[:12]}..., the manifest {sha256[:12]}...): replaced or swapped in from "
            "another build; run datagen validate"
        )  # fmt: skip
    if idx.tar != name or foreign:
        log.warning("%s: index is stale (does not match the shard); scanning headers", loc)
        return False
    return True


class ShardReader:
    """The shards of one dataset, read by (shard number, position): member indexes (loaded
    once and shared by :meth:`datagen.data.Dataset.with_options`), at most 16 mapped local
    tars, and the shards already checked against the manifest's sha256."""

    def __init__(
        self,
        shards: list[Shard],
        verify: str,
        indexes: dict[tuple[int, str], TarIndex | None] | None = None,
    ):
        self.shards, self.verify = shards, verify
        self.indexes: dict[tuple[int, str], TarIndex | None] = {} if indexes is None else indexes
        self._tars: OrderedDict[str, _LocalTar] = OrderedDict()
        self._verified: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # for spawned DataLoader workers: no mmaps
        state = dict(self.__dict__)
        state["_tars"] = OrderedDict()
        return state

    # -- counts and indexes --

    def counts(self) -> list[int]:
        """Samples per shard (manifest, else index, else a header scan)."""
        out = []
        for i, s in enumerate(self.shards):
            if s.samples is not None:
                out.append(s.samples)
                continue
            idx = self._index(i, "core")
            if idx is None:
                idx = self._remote_scan(i)
            out.append(len(idx.samples))
        return out

    def index(self, i: int, kind: str = "core") -> TarIndex:
        """The member index of shard ``i`` (from its index file, else scanned)."""
        idx = self._index(i, kind)
        return idx if idx is not None else self._remote_scan(i, kind)

    def _loc(self, i: int, kind: str) -> tuple[str, str | None]:
        shard = self.shards[i]
        if kind == "core":
            return shard.core, shard.core_sha256
        if shard.features is None:
            raise ShardError(shard.name, None, "has no features shard")
        return shard.features, shard.features_sha256

    def _index_file(self, i: int, kind: str) -> TarIndex | None:
        """The index written at build time, when there and matching its shard."""
        loc, sha = self._loc(i, kind)
        try:
            data = _read_small(index_name(loc))
        except OSError:
            return None
        if data is None:
            return None
        try:
            idx = TarIndex.from_bytes(data, index_name(_short(loc)))
        except ValueError as exc:
            log.warning("%s; scanning headers instead", exc)
            return None
        return idx if _index_ok(idx, loc, sha) else None

    def _index(self, i: int, kind: str) -> TarIndex | None:
        """The index of a shard: its index file, else (local shards) a header scan; None for
        a remote shard without an index file."""
        if (i, kind) not in self.indexes:
            loc, _ = self._loc(i, kind)
            if _is_url(loc):
                self.indexes[(i, kind)] = self._index_file(i, kind)
            else:
                self._local_tar(i, kind)
        return self.indexes[(i, kind)]

    def _remote_scan(self, i: int, kind: str = "core") -> TarIndex:
        """Index a remote shard that has no index file by streaming its headers."""
        loc, _ = self._loc(i, kind)
        f, seekable = _open_stream(loc)
        with f:
            samples = [e for e, _ in iter_samples(Reader(f, _short(loc), seekable=seekable))]
        idx = TarIndex(_short(loc), 0, None, samples, checksum=None)
        self.indexes[(i, kind)] = idx
        return idx

    def _local_tar(self, i: int, kind: str) -> _LocalTar:
        loc, _ = self._loc(i, kind)
        tar = self._tars.get(loc)
        if tar is not None:
            self._tars.move_to_end(loc)
            return tar
        path, name = _local(loc), _short(loc)
        if not os.path.isfile(path):
            raise ShardError(name, None, "missing (no such file)")
        idx = self.indexes.get((i, kind)) or self._index_file(i, kind)
        error = None
        if idx is None:
            with open(path, "rb") as f:
                idx, error = scan_index(f, name, os.fstat(f.fileno()).st_size)
        if error is None:
            self._check_count(i, idx, name)
        self.indexes[(i, kind)] = idx
        tar = _LocalTar(path, idx, error, name)
        self._tars[loc] = tar
        while len(self._tars) > 16:
            self._tars.popitem(last=False)
        return tar

    def _check_count(self, i: int, idx: TarIndex, name: str) -> None:
        """The shard must hold the samples its manifest lists, first and last key included
        (a lowered count would otherwise hide samples silently)."""
        s = self.shards[i]
        if s.samples is not None and len(idx.samples) != s.samples:
            raise CorruptShardError(
                name, None, f"holds {len(idx.samples)} samples, the manifest lists {s.samples}; "
                "run datagen validate"
            )  # fmt: skip
        if idx.samples and s.first_key is not None:
            ends = (idx.samples[0].key, idx.samples[-1].key)
            if ends != (s.first_key, s.last_key):
                raise CorruptShardError(
                    name, None, f"first/last keys {ends} differ from the manifest's "
                    f"{(s.first_key, s.last_key)}; run datagen validate"
                )  # fmt: skip

    def _verify_shard(self, i: int, kind: str) -> None:
        """sha256 of the whole tar against the manifest (verify="all"), once per process."""
        loc, sha = self._loc(i, kind)
        if sha is None or loc in self._verified:
            return
        h = hashlib.sha256()
        f, _ = _open_stream(loc)
        with f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sha:
            raise CorruptShardError(_short(loc), None, "sha256 differs from the manifest")
        self._verified.add(loc)

    # -- reading --

    def read_run(
        self, i: int, kind: str, positions: list[int], wanted: set[str] | None
    ) -> Iterator[Read]:
        """(position, key, members or the error) for ascending ``positions`` of one shard,
        the members in ``wanted`` (None: all). Per-sample errors are yielded, not raised."""
        verify = self.verify != "none"
        done = 0
        loc = self.shards[i].core if kind == "core" else (self.shards[i].features or "?")
        try:
            loc, _ = self._loc(i, kind)
            if self.verify == "all":
                self._verify_shard(i, kind)
            if not _is_url(loc):
                tar = self._local_tar(i, kind)
                for pos in positions:
                    try:
                        entry = tar.entry(pos)
                        raw = tar.members(entry, wanted, verify)
                        yield pos, entry.key, raw
                    except ShardError as exc:
                        yield pos, exc.key, exc
                    done += 1
                return
            idx = self._index(i, kind)
            if idx is not None:
                yield from self._read_remote_indexed(loc, idx, positions, wanted, verify)
            else:
                yield from self._read_remote_stream(loc, positions, wanted)
        except ShardError as exc:
            for pos in positions[done:]:
                yield pos, exc.key, exc
        except OSError as exc:
            err = ShardError(_short(loc), None, f"cannot be read ({exc})")
            for pos in positions[done:]:
                yield pos, None, err

    def _read_remote_indexed(
        self,
        loc: str,
        idx: TarIndex,
        positions: list[int],
        wanted: set[str] | None,
        verify: bool,
    ) -> Iterator[Read]:
        name = _short(loc)
        good = [p for p in positions if p < len(idx.samples)]
        start = idx.samples[good[0]].start if good else 0
        end = idx.samples[good[-1]].end if good else 0
        f, seekable = _open_stream(loc, start, end) if good else (None, False)
        reader = Reader(f, name, offset=start, seekable=seekable) if f else None
        broken: ShardError | None = None
        try:
            for pos in positions:
                if pos >= len(idx.samples):
                    yield (
                        pos,
                        None,
                        CorruptShardError(
                            name, None, f"holds {len(idx.samples)} samples, wanted position {pos}"
                        ),
                    )
                    continue
                entry = idx.samples[pos]
                if broken is not None:
                    yield pos, entry.key, broken
                    continue
                try:
                    assert reader is not None
                    reader.skip(entry.start - reader.offset, entry.key)
                    buf = reader.read(entry.end - entry.start, entry.key)
                    raw = {}
                    for ext, m in entry.members.items():
                        if wanted is not None and ext not in wanted:
                            continue
                        view = memoryview(buf)[
                            m.offset - entry.start : m.offset - entry.start + m.size
                        ]
                        if (
                            verify
                            and m.checksum is not None
                            and member_checksum(view) != m.checksum
                        ):
                            raise CorruptShardError(
                                name,
                                entry.key,
                                "checksum differs from the index (corrupt bytes)",
                                ext,
                            )
                        raw[ext] = view
                    yield pos, entry.key, raw
                except TruncatedShardError as exc:
                    broken = exc
                    yield pos, entry.key, exc
                except CorruptShardError as exc:
                    yield pos, entry.key, exc
        finally:
            if f is not None:
                f.close()

    def _read_remote_stream(
        self, loc: str, positions: list[int], wanted: set[str] | None
    ) -> Iterator[Read]:
        name = _short(loc)
        want = set(positions)
        last = positions[-1] if positions else -1
        pos = -1
        f, seekable = _open_stream(loc)
        done = 0
        with f:
            try:
                for entry, raw in iter_samples(
                    Reader(f, name, seekable=seekable),
                    (lambda k, e: wanted is None or e in wanted),
                ):
                    pos += 1
                    if pos in want:
                        yield pos, entry.key, raw
                        done += 1
                    if pos >= last:
                        return
            except ShardError as exc:
                for p in positions[done:]:
                    yield p, exc.key, exc
                return
        for p in positions[done:]:
            yield p, None, CorruptShardError(name, None, f"holds {pos + 1} samples, wanted {p}")

    def read_refs(
        self, refs: Sequence[tuple[int, int]], members: set[str] | None, features: bool
    ) -> Iterator[tuple[int, str | None, dict[str, Any] | ShardError, dict[str, Any] | None]]:
        """(number in ``refs``, key, core members or the error, features members), in ``refs``
        order: the core ``members`` (None: all) and, with ``features``, the features shard's.
        Consecutive refs of one shard with ascending positions are read as one run."""
        j = 0
        fwanted = None if members is None else {FEATURE_MEMBER}
        while j < len(refs):
            shard = refs[j][0]
            k = j + 1
            while k < len(refs) and refs[k][0] == shard and refs[k][1] > refs[k - 1][1]:
                k += 1
            positions = [p for _, p in refs[j:k]]
            core = self.read_run(shard, "core", positions, members)
            extra = self.read_run(shard, "features", positions, fwanted) if features else None
            for n, (pos, key, raw) in enumerate(core):
                fraw: dict[str, Any] | None = None
                if extra is not None:
                    _, fkey, fr = next(extra)
                    if isinstance(raw, ShardError):
                        pass
                    elif isinstance(fr, ShardError):
                        raw = fr
                    elif fkey != key:
                        raw = CorruptShardError(
                            _short(self.shards[shard].features or "?"),
                            fkey,
                            f"features key differs from the core key {key} at position {pos}",
                        )
                    else:
                        fraw = fr
                yield j + n, key, raw, fraw
            j = k
