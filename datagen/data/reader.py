"""Reading a dataset: :func:`open_dataset` and the :class:`Dataset` it gives.

Reading is ours, not webdataset's: the sample format's lean tar reader
(:mod:`datagen.sampleformat`) with the per-shard member index written at build time (see
:mod:`datagen.data.shardread` for local, remote and indexed reads), and only the members the
chosen fields need. Nothing executes data (see :mod:`datagen.sampleformat`): no pickle, no
``torch.load``.

Errors: a truncated or corrupt shard raises :class:`ShardError` (``TruncatedShardError`` /
``CorruptShardError``) whose message starts with the shard and the key. ``verify="members"``
(the default) checks each member against its xxh3_64 in the index, ``verify="all"`` also each
shard's sha256 against the manifest. ``on_error="skip"`` logs and counts each failing sample
and goes on; in the PyTorch dataset the skipped samples are made up at the end of the
worker's part by repeating its first good samples (or, if it has none, the next readable
samples of the epoch order), so ranks keep equal counts.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datagen.data.decode import decode_sample
from datagen.data.locate import SPLITS, Shard, _resolve, _short
from datagen.data.options import FeatureSpec, Options, VideoSpec, make_options
from datagen.data.shardread import ShardReader
from datagen.data.split import buffer_order, epoch_order
from datagen.data.torch_dataset import torch_dataset_class
from datagen.errors import UserError
from datagen.index import TarIndex
from datagen.sampleformat import ShardError

if TYPE_CHECKING:  # pragma: no cover
    from datagen.data.torch_dataset import _TorchDatasetImpl as TorchDataset

log = logging.getLogger("datagen.data")


@dataclass
class ErrorLog:
    """Samples skipped under ``on_error="skip"`` in this process (DataLoader workers keep
    their own; every skip is also logged on the ``datagen.data`` logger)."""

    count: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, exc: Exception) -> None:
        self.count += 1
        if len(self.messages) < 100:
            self.messages.append(str(exc))
        log.warning("skipped: %s", exc)


class Dataset:
    """A datagen dataset opened for reading. Iterate for samples in manifest order, index by
    key (or position) for random access, or wrap with :meth:`torch` for training.

    A sample is a dict: ``key`` (str); ``frames`` (see :class:`VideoSpec`; uint8 (T, H, W, 3)
    by default); ``tracks`` float32 (N, T, 2) (x, y) raster pixels; ``visible`` bool (N, T);
    ``queries`` float32 (N, 3) (t, x, y); ``confidence`` float32 (N, T); ``correspondence``
    name -> array (layers, steps, ...) (builds that capture it); ``meta`` (the sample's JSON);
    ``features`` name -> fp16 q/k (heads, token frames, h*w, head dim) and hidden states
    (token frames, h*w, width) (see :class:`FeatureSpec`); ``mp4`` bytes; any other
    ``NAME.npy`` member of the build as ``NAME`` when asked for in ``fields``.
    """

    def __init__(
        self,
        shards: list[Shard],
        manifest: dict[str, Any] | None,
        name: str,
        opts: Options,
        indexes: dict[tuple[int, str], TarIndex | None] | None = None,
    ):
        self.shards, self.manifest, self.name, self.opts = shards, manifest, name, opts
        self.errors = ErrorLog()
        self.shard_reader = ShardReader(shards, opts.verify, indexes)
        self._keymap: dict[str, tuple[int, int]] | None = None
        if opts.features is not None:
            lacking = [s.name for s in shards if s.features is None]
            if lacking:
                raise UserError(
                    f"{name}: features asked for, but {lacking[0]} has no features shard "
                    "(build with capture.feature_layers or hidden_layers set, or pass "
                    "features=False)"
                )

    def __getstate__(self) -> dict[str, Any]:  # for spawned DataLoader workers
        state = dict(self.__dict__)
        state["errors"] = ErrorLog()
        return state

    def with_options(
        self,
        *,
        video: bool | VideoSpec | None = None,
        fields: Iterable[str] | None = None,
        features: bool | FeatureSpec | None = None,
        verify: str | bool | None = None,
        on_error: str | None = None,
    ) -> Dataset:
        """The same shards with other fields or options (indexes are shared)."""
        o = self.opts
        opts = make_options(
            o.video if video is None else video,
            (o.fields - {"frames", "features"}) if fields is None else fields,
            o.features if features is None else features,
            o.verify if verify is None else verify,
            o.on_error if on_error is None else on_error,
            has_frames=("frames" in o.fields) if video is None else None,
        )
        return Dataset(self.shards, self.manifest, self.name, opts, self.shard_reader.indexes)

    # -- counts, keys, indexes --

    def counts(self) -> list[int]:
        """Samples per shard (manifest, else index, else a header scan)."""
        return self.shard_reader.counts()

    def __len__(self) -> int:
        return sum(self.counts())

    def index(self, i: int, kind: str = "core") -> TarIndex:
        """The member index of shard ``i`` (from its index file, else scanned)."""
        return self.shard_reader.index(i, kind)

    def keys(self) -> list[str]:
        """All keys, in order (reads every shard's index)."""
        return [s.key for i in range(len(self.shards)) for s in self.index(i).samples]

    # -- reading --

    def _read_refs(
        self, refs: Sequence[tuple[int, int]], every_member: bool = False
    ) -> Iterator[tuple[int, str | None, dict[str, Any] | ShardError, dict[str, Any] | None]]:
        """(number in ``refs``, key, core members or the error, features members), in ``refs``
        order: the members the fields need, or ``every_member``."""
        members = None if every_member else self.opts.members()
        return self.shard_reader.read_refs(refs, members, self.opts.features is not None)

    def _samples(
        self,
        refs: Sequence[tuple[int, int]],
        order: Sequence[int] | None = None,
        keep_count: bool = False,
        on_error: str | None = None,
        spare: Callable[[], Iterable[tuple[int, int]]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Decoded samples of ``refs`` in ``order`` (indices into refs; default: refs order),
        read in refs order (only those in ``order``) with a look-ahead of what ``order`` has
        not reached yet.

        Errors raise, or with on_error="skip" are logged and counted; with ``keep_count`` the
        skipped samples are made up at the end by repeating the first good ones, or when
        there are none, by reading on through ``spare()`` (other refs of the epoch)."""
        order = range(len(refs)) if order is None else order
        on_error = on_error or self.opts.on_error
        needed = sorted(set(order))
        source = self._read_refs([refs[n] for n in needed])
        pending: dict[int, tuple[str | None, Any, Any]] = {}
        good: list[int] = []
        short = 0
        for want in order:
            while want not in pending:
                n, key, raw, fraw = next(source)
                pending[needed[n]] = (key, raw, fraw)
            key, raw, fraw = pending.pop(want)
            sample = self._decode_or_skip(refs[want][0], key, raw, fraw, on_error)
            if sample is None:
                short += 1
                continue
            good.append(want)
            yield sample
        if not (keep_count and short):
            return
        if good:
            again = [refs[good[n % len(good)]] for n in range(short)]
        else:
            again = list(spare()) if spare is not None else []
        for n, key, raw, fraw in self._read_refs(again):
            sample = self._decode_or_skip(again[n][0], key, raw, fraw, on_error)
            if sample is not None:
                yield sample
                short -= 1
                if not short:
                    return
        log.error(
            "%s: %d samples short in this part: no readable sample to repeat", self.name, short
        )

    def _decode_or_skip(
        self, shard: int, key: str | None, raw: Any, fraw: Any, on_error: str
    ) -> dict[str, Any] | None:
        try:
            if isinstance(raw, ShardError):
                raise raw
            assert key is not None
            return decode_sample(raw, fraw, key, _short(self.shards[shard].core), self.opts)
        except ShardError as exc:
            if on_error == "raise":
                raise
            self.errors.add(exc)
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter()

    def iter_raw(
        self, keys: Iterable[str] | None = None
    ) -> Iterator[tuple[str, dict[str, memoryview], dict[str, memoryview] | None]]:
        """(key, every core member's bytes, features members or None) in order, checked like
        any read (errors raise or skip as ``on_error`` says); ``keys`` picks samples."""
        if keys is None:
            shards, positions = epoch_order(self.counts())
            refs = list(zip(shards.tolist(), positions.tolist(), strict=True))
        else:
            refs = []
            for key in keys:
                found = self.locate(key)
                if found is None:
                    raise KeyError(f"{self.name}: no sample with key {key!r}")
                refs.append(found)
        for _, key, raw, fraw in self._read_refs(refs, every_member=True):
            if isinstance(raw, ShardError):
                if self.opts.on_error == "raise":
                    raise raw
                self.errors.add(raw)
                continue
            assert key is not None
            yield key, raw, fraw

    def iter(
        self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, buffer: int = 64
    ) -> Iterator[dict[str, Any]]:
        """Every sample once: manifest order, or with ``shuffle`` the seeded shard order and
        buffer shuffle of the split rule (one rank, one worker)."""
        shards, positions = epoch_order(self.counts(), epoch, seed, shuffle)
        refs = list(zip(shards.tolist(), positions.tolist(), strict=True))
        order = buffer_order(len(refs), buffer, [seed, epoch, 0, 0]) if shuffle else None
        return self._samples(refs, order)

    def locate(self, key: str) -> tuple[int, int] | None:
        """(shard number in this dataset, position in its tar) of ``key``, or None."""
        if self._keymap is not None:
            return self._keymap.get(key)
        candidates = [
            i
            for i, s in enumerate(self.shards)
            if s.first_key is not None
            and s.last_key is not None
            and s.first_key <= key <= s.last_key
        ]
        for i in candidates:
            pos = self.index(i).position(key)
            if pos is not None:
                return i, pos
        if all(s.first_key is not None for s in self.shards):
            return None
        self._keymap = {
            s.key: (i, p)
            for i in range(len(self.shards))
            for p, s in enumerate(self.index(i).samples)
        }
        return self._keymap.get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.locate(key) is not None

    def __getitem__(self, key: str | int) -> dict[str, Any]:
        """One sample by key, or by position in manifest order; reads only that sample."""
        if isinstance(key, (int, np.integer)):
            counts = self.counts()
            total = sum(counts)
            g = int(key) + total if key < 0 else int(key)
            if not 0 <= g < total:
                raise IndexError(f"{self.name}: position {key} out of range ({total} samples)")
            ends = np.cumsum(counts)
            i = int(bisect.bisect_right(ends.tolist(), g))
            ref = (i, g - int(ends[i] - counts[i]))
        else:
            found = self.locate(key)
            if found is None:
                raise KeyError(f"{self.name}: no sample with key {key!r}")
            ref = found
        return next(self._samples([ref], on_error="raise"))

    def torch(self, **kwargs: Any) -> TorchDataset:
        """A PyTorch IterableDataset over this dataset; see :class:`TorchDataset`."""
        return torch_dataset_class()(self, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, shards={len(self.shards)}, fields={sorted(self.opts.fields)})"
        )


def open_dataset(
    source: Path | str | Sequence[Path | str],
    video: bool | VideoSpec = True,
    *,
    fields: Iterable[str] | None = None,
    features: bool | FeatureSpec = False,
    verify: str | bool = "members",
    on_error: str = "raise",
    split: str = "core",
) -> Dataset:
    """Open a dataset for reading.

    ``source``: a dataset folder, its ``manifest.json``, a core shard, a glob or brace
    pattern (``d/core-*.tar``, ``d/core-{000000..000009}.tar``), a list of those, or URLs of
    any of them (``http(s)://`` read with ranged requests; other schemes through fsspec).
    ``video``: decode frames (True, or a :class:`VideoSpec`), or not (False). ``fields``:
    other fields (default :data:`DEFAULT_FIELDS`). ``features``: also read the features shard
    (True for every tensor, or a :class:`FeatureSpec`). ``verify``: "members" (per-member
    checksum from the index; default), "all" (also each shard's sha256 against the manifest,
    before reading it), "none". ``on_error``: "raise" or "skip". ``split``: "core" (default)
    or "rejected" (a ``qc.rejected=separate`` build's QC-rejected samples, with their q/k;
    a ``qc.rejected=keep`` build has them in core, each with ``meta["qc"]["verdict"]``).
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    shards, manifest, name = _resolve(source, split)
    return Dataset(shards, manifest, name, make_options(video, fields, features, verify, on_error))
