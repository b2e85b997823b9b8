"""Consumer loaders: read a datagen dataset from a folder, a manifest, a glob or URLs.

Quick start::

    ds = open_dataset("shards/")                     # frames + labels + correspondence + meta
    for s in ds: s["frames"], s["tracks"]            # manifest order
    ds["brown-horse-r00"]                            # one sample through the tar index
    ds = open_dataset("http://host/d/", video=VideoSpec(stride=2, size=(128, 192)),
                      features=FeatureSpec(layers=[17], steps=[49]))
    loader = DataLoader(ds.torch(batch_size=8, shuffle=True, seed=0), batch_size=None,
                        num_workers=4)

Reading is ours, not webdataset's: the sample format's lean tar reader
(datagen.sampleformat, which also decodes every member) with the per-shard member index
written at build time (datagen.index), ``mmap`` for local shards (arrays are zero-copy,
copy-on-write views of the page cache), one ranged stream per run of samples for remote
shards, and only the members the chosen fields need. Nothing executes data: ``.npy`` headers
are parsed with ``ast.literal_eval`` and object arrays refused, safetensors and JSON are
plain, mp4 goes to PyAV. No pickle, no ``torch.load``.

Split rule (DDP and DataLoader workers), see :func:`epoch_order` and :func:`rank_range`:
the epoch's global sample order is the shards in manifest order (shuffle: in a seeded
permutation of ``(seed, epoch)``) with each shard's samples in tar order. Rank ``r`` of ``R``
takes the contiguous slice ``[r * n, (r + 1) * n)`` of it, with ``n = ceil(N / R)`` under
``rule="repeat"`` (the order is read cyclically, so the last ranks repeat the first samples of
the epoch) or ``n = floor(N / R)`` under ``rule="drop"`` (the last ``N mod R`` samples of the
epoch order are left out). Every rank therefore gets the same number of samples however the
shards are sized, also with fewer shards than ranks or workers. Inside a rank, worker ``w`` of
``W`` takes the ``w``-th of ``W`` contiguous parts (sizes differ by at most one, larger first;
a worker may get none, which a DataLoader handles). Shuffling then permutes each worker's part
with a seeded buffer of ``buffer`` samples (seed ``(seed, epoch, rank, worker)``); reading
stays sequential. Each item carries ``position = {"epoch", "offset"}`` (the rank's samples
consumed in DataLoader order); resuming from it deals the rest of the rank's sequence out to
the workers again, so the resumed stream is exactly the rest of the interrupted one.

Errors: a truncated or corrupt shard raises :class:`ShardError` (``TruncatedShardError`` /
``CorruptShardError``) whose message starts with the shard and the key. A flipped byte inside a
member is caught by the member's xxh3_64 in the index (``verify="members"``, the default, at
memory speed); ``verify="all"`` also checks each shard's sha256 against the manifest before
reading it (catches damage in tar headers and shards without an index). ``on_error="skip"``
logs and counts each failing sample and goes on; in the PyTorch dataset the skipped samples
are made up at the end of the worker's part by repeating its first good samples (or, if it
has none, the next readable samples of the epoch order), so ranks keep equal counts.
"""

from __future__ import annotations

import bisect
import functools
import glob as globlib
import hashlib
import io
import json
import logging
import mmap
import os
import re
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from datagen.errors import UserError
from datagen.index import TarIndex, index_name, member_checksum, scan_index
from datagen.names import key_problem, shard_file_problem
from datagen.sampleformat import (
    FEATURE_MEMBER,
    FIELD_MEMBERS,
    FIELDS,
    OPTIONAL_FIELDS,
    CorruptShardError,
    Reader,
    SampleEntry,
    ShardError,
    TruncatedShardError,
    decode_video,
    field_member,
    iter_samples,
    json_value,
    npy_array,
    safetensors_arrays,
)
from datagen.shards import MANIFEST

__all__ = [
    "CorruptShardError",
    "Dataset",
    "FeatureSpec",
    "Shard",
    "ShardError",
    "TorchDataset",
    "TruncatedShardError",
    "VideoSpec",
    "collate_samples",
    "epoch_order",
    "hf_data_files",
    "open_dataset",
    "rank_range",
    "shard_urls",
    "worker_range",
]

log = logging.getLogger("datagen.data")

DEFAULT_FIELDS = ("tracks", "visible", "queries", "confidence", "correspondence", "meta")
"""Fields read unless ``fields`` says otherwise (``frames`` and ``features`` have their own
switches, ``video`` and ``features``)."""
VERIFY = ("none", "members", "all")
ON_ERROR = ("raise", "skip")
SPLIT_RULES = ("repeat", "drop")


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoSpec:
    """How ``frames`` are decoded (PyAV, only for samples that are yielded).

    Gives ``frames`` of shape (T', H', W', 3) (or (T', 3, H', W') with ``channels_first``),
    ``T' = ceil(T / stride)``: frame ``i`` is stored frame ``i * stride``. Labels are never
    resampled: they stay at every stored frame in the stored video's pixel raster (scale x by
    W'/W and y by H'/H to match a resized video).
    """

    stride: int = 1
    size: tuple[int, int] | None = None
    """(height, width) to resize to (swscale, bilinear); None keeps the stored size."""
    dtype: str = "uint8"
    """'uint8' (0..255) or 'float32' / 'float16' (0..1)."""
    channels_first: bool = False
    threads: int = 1
    """Decoder threads per sample (0: FFmpeg's choice); 1 suits DataLoader workers."""

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"VideoSpec.stride must be >= 1, got {self.stride}")
        if self.dtype not in ("uint8", "float32", "float16"):
            raise ValueError(f"VideoSpec.dtype must be uint8, float32 or float16: {self.dtype}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"VideoSpec.size must be (height, width), got {self.size}")


_NAME = re.compile(r"^([a-z]+)\.layer(\d+)\.step(\d+)$")


@dataclass(frozen=True)
class FeatureSpec:
    """Which q/k tensors to read from the features shard (None: all). Tensor names are
    ``{kind}.layer{LLL}.step{SSS}``; each is fp16 (heads, token frames, h*w, head dim)."""

    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    kinds: tuple[str, ...] = ("q", "k")

    def __post_init__(self) -> None:
        for name in ("layers", "steps", "kinds"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def wants(self, name: str) -> bool:
        m = _NAME.match(name)
        if not m:
            return self.layers is None and self.steps is None
        kind, layer, step = m.group(1), int(m.group(2)), int(m.group(3))
        return (
            kind in self.kinds
            and (self.layers is None or layer in self.layers)
            and (self.steps is None or step in self.steps)
        )


@dataclass(frozen=True)
class _Options:
    fields: frozenset[str]
    video: VideoSpec
    features: FeatureSpec | None
    verify: str
    on_error: str

    def members(self) -> set[str]:
        return {field_member(f) for f in self.fields if f != "features"}


# --- where the shards are ---------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One shard number: its core tar, its features tar (if any) and what the manifest says."""

    core: str
    """Local path or URL."""
    features: str | None = None
    samples: int | None = None
    """From the manifest (None: ask the index, or scan)."""
    core_bytes: int | None = None
    core_sha256: str | None = None
    features_bytes: int | None = None
    features_sha256: str | None = None
    first_key: str | None = None
    last_key: str | None = None

    @property
    def name(self) -> str:
        return self.core.rstrip("/").rsplit("/", 1)[-1]


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _is_http(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _local(s: str) -> str:
    return s[len("file://") :] if s.startswith("file://") else s


def _join(base: str, name: str) -> str:
    if _is_url(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def _parent(loc: str) -> str:
    if _is_url(loc):
        return loc.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(loc))


def _read_small(loc: str) -> bytes | None:
    """A small file (manifest, index) in full; None when it does not exist."""
    try:
        if _is_http(loc):
            with urllib.request.urlopen(loc, timeout=60) as r:
                return r.read()
        if _is_url(loc):
            import fsspec

            with fsspec.open(loc, "rb") as f:
                return f.read()
        with open(_local(loc), "rb") as f:
            return f.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            return None
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class _HttpStream(io.RawIOBase):
    """Sequential reads of an HTTP(S) body from ``start`` (a Range request; when the server
    ignores Range, the bytes before ``start`` are read and dropped)."""

    def __init__(self, url: str, start: int = 0, end: int | None = None):
        super().__init__()
        req = urllib.request.Request(url)
        if start or end is not None:
            req.add_header("Range", f"bytes={start}-{'' if end is None else end - 1}")
        self._r = urllib.request.urlopen(req, timeout=60)
        if start and self._r.status != 206:
            left = start
            while left:
                chunk = self._r.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._r.readinto(b)

    def close(self) -> None:
        self._r.close()
        super().close()


def _open_stream(loc: str, start: int = 0, end: int | None = None) -> tuple[BinaryIO, bool]:
    """(file object positioned at ``start``, seekable)."""
    if _is_http(loc):
        return _HttpStream(loc, start, end), False  # type: ignore[return-value]
    if _is_url(loc):
        import fsspec

        f = fsspec.open(loc, "rb").open()
        if start:
            f.seek(start)
        return f, bool(getattr(f, "seekable", lambda: False)())
    f = open(_local(loc), "rb")  # noqa: SIM115 - the caller closes it
    f.seek(start)
    return f, True


def _expand(pattern: str) -> list[str]:
    """Brace expansion (``core-{000000..000009}.tar``) then globbing (local or fsspec)."""
    from braceexpand import braceexpand

    out: list[str] = []
    for item in braceexpand(pattern):
        if not any(c in item for c in "*?["):
            out.append(item)
        elif _is_http(item):
            raise UserError(f"{item}: cannot glob over HTTP; list the shard URLs or the manifest")
        elif _is_url(item):
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(item)
            proto = item.split("://", 1)[0]
            out += sorted(f"{proto}://{p}" for p in paths)
        else:
            out += sorted(globlib.glob(_local(item)))
    return out


SPLITS = ("core", "rejected")
"""Sample sets of a dataset folder: ``core`` (what the build kept) and ``rejected`` (the
samples quality control rejected, in a ``qc.rejected=separate`` build)."""


def _manifest_shards(
    data: bytes, where: str, base: str, split: str = "core"
) -> tuple[list[Shard], dict[str, Any]]:
    try:
        manifest = json.loads(data)
        entries = manifest["shards"]
        by_index: dict[int, dict[str, dict[str, Any]]] = {}
        for e in entries:
            by_index.setdefault(int(e["index"]), {})[e.get("kind", "core")] = e
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: not a datagen manifest ({exc}); pass a dataset folder") from None
    for e in entries:
        keys = [e.get(k) for k in ("first_key", "last_key") if e.get(k) is not None]
        problem = shard_file_problem(e.get("path")) or next(
            filter(None, map(key_problem, keys)), None
        )
        if problem:
            raise UserError(f"{where}: shard {e.get('index')}: {problem}")
    for r in manifest.get("rejected") or []:
        problem = key_problem(r.get("key") if isinstance(r, dict) else r)
        if problem:
            raise UserError(f"{where}: rejected sample: {problem}")
    if split == "rejected" and not any(e.get("kind") == "rejected" for e in entries):
        mode = (manifest.get("qc") or {}).get("mode", "keep")
        raise UserError(
            f"{where}: no rejected shards (this build's qc.rejected={mode}; only "
            "qc.rejected=separate writes them)"
        )
    shards = []
    for e in entries:
        if e.get("kind", "core") != split:
            continue
        # A rejected shard carries its samples' q/k itself: it is its own features shard.
        feat = by_index[int(e["index"])].get("features") if split == "core" else None
        if split == "rejected" and FEATURE_MEMBER in manifest.get("members", {}).get(split, []):
            feat = e
        shards.append(
            Shard(
                core=_join(base, e["path"]),
                features=_join(base, feat["path"]) if feat else None,
                samples=int(e["samples"]),
                core_bytes=e.get("bytes"),
                core_sha256=e.get("sha256"),
                features_bytes=feat.get("bytes") if feat else None,
                features_sha256=feat.get("sha256") if feat else None,
                first_key=e.get("first_key"),
                last_key=e.get("last_key"),
            )
        )
    return shards, manifest


def _shards_from_tars(tars: list[str]) -> tuple[list[Shard], dict[str, Any] | None]:
    """Shards from tar paths/URLs; features tars pair with the core tar of the same number;
    a manifest next to them (if any) gives counts and checksums."""
    core = [t for t in tars if not t.rstrip("/").rsplit("/", 1)[-1].startswith("features-")]
    feats = {t.rstrip("/").rsplit("/", 1)[-1]: t for t in tars if t not in core}
    manifests: dict[str, tuple[dict[str, Shard], dict[str, Any]] | None] = {}
    shards = []
    manifest = None
    for t in core:
        parent = _parent(t)
        if parent not in manifests:
            data = _read_small(_join(parent, MANIFEST))
            if data is None:
                manifests[parent] = None
            else:
                try:
                    listed, m = _manifest_shards(data, _join(parent, MANIFEST), parent)
                    manifests[parent] = ({s.name: s for s in listed}, m)
                except UserError:
                    manifests[parent] = None
        found = manifests[parent]
        name = t.rstrip("/").rsplit("/", 1)[-1]
        if found and name in found[0]:
            shards.append(replace(found[0][name], core=t))
            manifest = manifest or found[1]
            continue
        fname = "features-" + name[len("core-") :] if name.startswith("core-") else None
        feature = feats.get(fname or "") or (_join(parent, fname) if fname else None)
        if feature and not _is_url(feature) and not os.path.exists(_local(feature)):
            feature = None
        shards.append(Shard(core=t, features=feature))
    return shards, manifest


def _resolve(source: Any, split: str = "core") -> tuple[list[Shard], dict[str, Any] | None, str]:
    """(shards, manifest or None, a name for messages) of what the user passed; ``split``
    picks the manifest's core or rejected shards (tars named directly are read as given)."""
    if isinstance(source, (list, tuple)):
        tars: list[str] = []
        for item in source:
            tars += _expand(str(item)) if any(c in str(item) for c in "*?[{") else [str(item)]
        if not tars:
            raise UserError(f"{list(source)}: matches no shard; check the paths")
        shards, manifest = _shards_from_tars(tars)
        return shards, manifest, str(source[0]) if len(source) == 1 else f"{len(tars)} tars"
    loc = str(source)
    if any(c in loc for c in "*?[{"):
        tars = _expand(loc)
        if not tars:
            raise UserError(f"{loc}: matches no shard; check the pattern")
        shards, manifest = _shards_from_tars(tars)
        return shards, manifest, loc
    if loc.endswith(".tar"):
        if not _is_url(loc) and not os.path.isfile(_local(loc)):
            raise UserError(f"{loc}: no such shard; check the path")
        shards, manifest = _shards_from_tars([loc])
        return shards, manifest, loc
    if not _is_url(loc) and os.path.isdir(_local(loc)):
        mpath = os.path.join(_local(loc), MANIFEST)
    elif loc.endswith(".json"):
        mpath = loc
    elif _is_url(loc):
        mpath = _join(loc, MANIFEST)
    else:
        raise UserError(
            f"{loc}: no such folder or file; pass a dataset folder made by datagen build"
        )
    try:
        data = _read_small(mpath)
    except OSError as exc:
        raise UserError(f"{mpath}: cannot be read ({exc})") from None
    if data is None:
        raise UserError(f"{loc}: no {MANIFEST}; is this a datagen dataset folder?")
    shards, manifest = _manifest_shards(data, mpath, _parent(mpath), split)
    return shards, manifest, loc


def shard_urls(path: Path | str) -> list[str]:
    """Core shard paths (or URLs) of a dataset folder, manifest, glob or URL, in order."""
    return [s.core for s in _resolve(path)[0]]


def hf_data_files(path: Path | str) -> list[str]:
    """The core shards, for ``datasets.load_dataset("webdataset", data_files=...)``.

    Each row then holds the members by extension (``mp4``, ``json``, ``tracks.npy`` ...)."""
    return shard_urls(path)


# --- decoding members (datagen.sampleformat's decoders; never executes data) -------------------


def decode_frames(data: Any, spec: VideoSpec = VideoSpec()) -> np.ndarray:
    """Decode mp4 bytes to frames, see :class:`VideoSpec` for shape and dtype."""
    return decode_video(
        data,
        spec.stride,
        size=spec.size,
        dtype=spec.dtype,
        channels_first=spec.channels_first,
        threads=spec.threads,
    )


def _decode(
    raw: dict[str, Any],
    feats: dict[str, Any] | None,
    key: str,
    shard: str,
    opts: _Options,
) -> dict[str, Any]:
    """Members -> sample dict (see :class:`Dataset` for the fields)."""
    out: dict[str, Any] = {"key": key}
    member = None
    try:
        for name in sorted(opts.fields):
            if name == "features":
                continue
            member = field_member(name)
            if member not in raw:
                if name in OPTIONAL_FIELDS or name not in FIELD_MEMBERS:
                    continue
                raise CorruptShardError(shard, key, f"lacks member {member}")
            data = raw[member]
            if name == "frames":
                out["frames"] = decode_frames(data, opts.video)
            elif name == "mp4":
                out["mp4"] = bytes(data)
            elif name == "meta":
                out["meta"] = json_value(data)
            elif name == "correspondence":
                out["correspondence"] = safetensors_arrays(data)
            else:
                out[name] = npy_array(data)
        if opts.features is not None:
            member = FEATURE_MEMBER
            if feats is None or FEATURE_MEMBER not in feats:
                raise CorruptShardError(shard, key, f"has no features ({FEATURE_MEMBER})")
            out["features"] = safetensors_arrays(feats[FEATURE_MEMBER], opts.features.wants)
    except ShardError:
        raise
    except Exception as exc:  # any decode failure is a finding about this member
        raise CorruptShardError(
            shard, key, f"cannot be decoded ({type(exc).__name__}: {exc})", member
        ) from exc
    return out


# --- reading shards --------------------------------------------------------------------------


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
    if idx.tar != name or (sha256 is not None and idx.sha256 not in (None, sha256)):
        log.warning("%s: index is stale (does not match the shard); scanning headers", loc)
        return False
    return True


class Dataset:
    """A datagen dataset opened for reading. Iterate for samples in manifest order, index by
    key (or position) for random access, or wrap with :meth:`torch` for training.

    A sample is a dict: ``key`` (str); ``frames`` (see :class:`VideoSpec`; uint8 (T, H, W, 3)
    by default); ``tracks`` float32 (N, T, 2) (x, y) raster pixels; ``visible`` bool (N, T);
    ``queries`` float32 (N, 3) (t, x, y); ``confidence`` float32 (N, T); ``correspondence``
    name -> array (layers, steps, ...) (builds that capture it); ``meta`` (the sample's JSON);
    ``features`` name -> fp16 (heads, token frames, h*w, head dim); ``mp4`` bytes; any other
    ``NAME.npy`` member of the build as ``NAME`` when asked for in ``fields``.
    """

    def __init__(
        self,
        shards: list[Shard],
        manifest: dict[str, Any] | None,
        name: str,
        opts: _Options,
    ):
        self.shards, self.manifest, self.name, self.opts = shards, manifest, name, opts
        self.errors = ErrorLog()
        self._indexes: dict[tuple[int, str], TarIndex | None] = {}
        self._tars: OrderedDict[str, _LocalTar] = OrderedDict()
        self._verified: set[str] = set()
        self._keymap: dict[str, tuple[int, int]] | None = None
        if opts.features is not None:
            lacking = [s.name for s in shards if s.features is None]
            if lacking:
                raise UserError(
                    f"{name}: features asked for, but {lacking[0]} has no features shard "
                    "(build with capture.feature_layers set, or pass features=False)"
                )

    def __getstate__(self) -> dict[str, Any]:  # for spawned DataLoader workers: no mmaps
        state = dict(self.__dict__)
        state["_tars"] = OrderedDict()
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
        opts = _options(
            o.video if video is None else video,
            (o.fields - {"frames", "features"}) if fields is None else fields,
            o.features if features is None else features,
            o.verify if verify is None else verify,
            o.on_error if on_error is None else on_error,
            has_frames=("frames" in o.fields) if video is None else None,
        )
        ds = Dataset(self.shards, self.manifest, self.name, opts)
        ds._indexes = self._indexes
        return ds

    # -- counts, keys, indexes --

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

    def __len__(self) -> int:
        return sum(self.counts())

    def index(self, i: int, kind: str = "core") -> TarIndex:
        """The member index of shard ``i`` (from its index file, else scanned)."""
        idx = self._index(i, kind)
        return idx if idx is not None else self._remote_scan(i, kind)

    def keys(self) -> list[str]:
        """All keys, in order (reads every shard's index)."""
        return [s.key for i in range(len(self.shards)) for s in self.index(i).samples]

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
        if (i, kind) not in self._indexes:
            loc, _ = self._loc(i, kind)
            if _is_url(loc):
                self._indexes[(i, kind)] = self._index_file(i, kind)
            else:
                self._local_tar(i, kind)
        return self._indexes[(i, kind)]

    def _remote_scan(self, i: int, kind: str = "core") -> TarIndex:
        """Index a remote shard that has no index file by streaming its headers."""
        loc, _ = self._loc(i, kind)
        f, seekable = _open_stream(loc)
        with f:
            samples = [e for e, _ in iter_samples(Reader(f, _short(loc), seekable=seekable))]
        idx = TarIndex(_short(loc), 0, None, samples, checksum=None)
        self._indexes[(i, kind)] = idx
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
        idx = self._indexes.get((i, kind)) or self._index_file(i, kind)
        error = None
        if idx is None:
            with open(path, "rb") as f:
                idx, error = scan_index(f, name, os.fstat(f.fileno()).st_size)
        self._indexes[(i, kind)] = idx
        tar = _LocalTar(path, idx, error, name)
        self._tars[loc] = tar
        while len(self._tars) > 16:
            self._tars.popitem(last=False)
        return tar

    # -- verification --

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

    def _members_wanted(self, kind: str) -> set[str] | None:
        if kind == "features":
            return {FEATURE_MEMBER}
        return self.opts.members()

    def _read_run(
        self, i: int, kind: str, positions: list[int], every_member: bool = False
    ) -> Iterator[tuple[int, str | None, dict[str, Any] | ShardError]]:
        """(position, key, members or the error) for ascending ``positions`` of one shard.
        Per-sample errors are yielded, not raised."""
        wanted = None if every_member else self._members_wanted(kind)
        verify = self.opts.verify != "none"
        done = 0
        loc = self.shards[i].core if kind == "core" else (self.shards[i].features or "?")
        try:
            loc, _ = self._loc(i, kind)
            if self.opts.verify == "all":
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
    ) -> Iterator[tuple[int, str | None, dict[str, Any] | ShardError]]:
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
    ) -> Iterator[tuple[int, str | None, dict[str, Any] | ShardError]]:
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

    def _read_refs(
        self, refs: Sequence[tuple[int, int]], every_member: bool = False
    ) -> Iterator[tuple[int, str | None, dict[str, Any] | ShardError, dict[str, Any] | None]]:
        """(number in ``refs``, key, core members or the error, features members), in ``refs``
        order. Consecutive refs of one shard with ascending positions are read as one run."""
        j = 0
        feats = self.opts.features is not None
        while j < len(refs):
            shard = refs[j][0]
            k = j + 1
            while k < len(refs) and refs[k][0] == shard and refs[k][1] > refs[k - 1][1]:
                k += 1
            positions = [p for _, p in refs[j:k]]
            core = self._read_run(shard, "core", positions, every_member)
            extra = self._read_run(shard, "features", positions, every_member) if feats else None
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
            return _decode(raw, fraw, key, _short(self.shards[shard].core), self.opts)
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
        return _torch_dataset_class()(self, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, shards={len(self.shards)}, fields={sorted(self.opts.fields)})"
        )


def _short(loc: str) -> str:
    """The shard's file name, as errors name it."""
    return loc.rstrip("/").rsplit("/", 1)[-1]


def _options(
    video: bool | VideoSpec,
    fields: Iterable[str] | None,
    features: bool | FeatureSpec,
    verify: str | bool,
    on_error: str,
    has_frames: bool | None = None,
) -> _Options:
    chosen = set(DEFAULT_FIELDS if fields is None else fields)
    if "video" in chosen:
        chosen.discard("video")
        chosen.add("frames")
    unknown = [f for f in chosen if f not in FIELDS and not re.fullmatch(r"[A-Za-z0-9_]+", f)]
    if unknown:
        raise UserError(f"unknown field(s) {unknown}; choose from {', '.join(FIELDS)}")
    spec = video if isinstance(video, VideoSpec) else VideoSpec()
    if has_frames if has_frames is not None else bool(video):
        chosen.add("frames")
    if features:
        chosen.add("features")
    fspec = (
        features
        if isinstance(features, FeatureSpec)
        else (FeatureSpec() if "features" in chosen else None)
    )
    if verify is True:
        verify = "all"
    elif verify is False:
        verify = "none"
    if verify not in VERIFY:
        raise UserError(f"verify={verify!r}: choose one of {', '.join(VERIFY)}")
    if on_error not in ON_ERROR:
        raise UserError(f"on_error={on_error!r}: choose one of {', '.join(ON_ERROR)}")
    return _Options(frozenset(chosen), spec, fspec, str(verify), on_error)


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
    return Dataset(shards, manifest, name, _options(video, fields, features, verify, on_error))


# --- the split rule --------------------------------------------------------------------------


def epoch_order(
    counts: Sequence[int], epoch: int = 0, seed: int = 0, shuffle: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's global sample order as (shard numbers, positions), int64 (N,) each.

    Shards in order (``shuffle``: permuted with ``default_rng([seed, epoch])``), each shard's
    samples in tar order."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    shard_order = np.arange(len(counts_arr))
    if shuffle:
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(counts_arr))
    c = counts_arr[shard_order]
    shards = np.repeat(shard_order, c)
    positions = np.arange(int(c.sum()), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
    return shards, positions


def rank_range(total: int, rank: int, world: int, rule: str = "repeat") -> np.ndarray:
    """Indices into the epoch order for ``rank`` of ``world``: ``n = ceil(total / world)``
    (repeat: cyclic, so the tail ranks repeat the first samples) or ``floor`` (drop)."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"rule={rule!r}: choose one of {', '.join(SPLIT_RULES)}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    n = -(-total // world) if rule == "repeat" else total // world
    return np.arange(rank * n, (rank + 1) * n, dtype=np.int64) % total


def worker_range(n: int, worker: int, workers: int) -> tuple[int, int]:
    """[start, stop) of worker ``worker``'s contiguous part of ``n`` samples (sizes differ
    by at most one, larger parts first)."""
    base, extra = divmod(n, workers)
    start = worker * base + min(worker, extra)
    return start, start + base + (1 if worker < extra else 0)


def buffer_order(n: int, buffer: int, seed: Any) -> list[int]:
    """The order a shuffle buffer of ``buffer`` items gives a stream of ``n`` items:
    fill to ``buffer``, then yield a random one for each new item, then drain at random.
    Item ``i`` comes out no earlier than ``i - buffer``, so reading stays sequential."""
    if buffer <= 1 or n <= 1:
        return list(range(n))
    rng = np.random.default_rng(seed)
    picks = rng.random(n)
    buf: list[int] = []
    out: list[int] = []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            j = int(picks[len(out)] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = int(picks[len(out)] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


def _offset_after(parts: Sequence[int], batch: int, worker: int, delivered: int) -> int:
    """Rank samples consumed, in DataLoader order, once worker ``worker`` has delivered
    ``delivered`` samples (a batch boundary of its own)."""
    j = -(-delivered // batch) - 1  # round of the batch just delivered
    total = sum(min(j * batch, n) for n in parts)
    total += sum(min((j + 1) * batch, n) - min(j * batch, n) for n in parts[: worker + 1])
    return total


# --- PyTorch ---------------------------------------------------------------------------------


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _TorchDatasetImpl:
    """An IterableDataset over a :class:`Dataset`, split by the rule in this module's
    docstring. Use it with ``DataLoader(ds, batch_size=None, num_workers=W)`` when it batches
    (``batch_size``), or as a plain sample stream otherwise.

    Every item (a sample, or a batch from ``collate``) carries ``position``:
    ``{"epoch": e, "offset": o}`` where ``o`` counts this rank's samples consumed so far in
    DataLoader order. Resume with ``load_state_dict(item["position"])`` (same world size,
    workers, batch size and seed). Call ``set_epoch(e)`` before each epoch (workers are
    copies: not with ``persistent_workers``), or pass ``resampled=True`` for an endless
    stream of epochs ``epoch, epoch + 1, ...``, each reshuffled.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        buffer: int = 64,
        rule: str = "repeat",
        resampled: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        tensors: bool = True,
        epoch: int = 0,
    ):
        if rule not in SPLIT_RULES:
            raise UserError(f"rule={rule!r}: choose one of {', '.join(SPLIT_RULES)}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed, self.buffer = batch_size, shuffle, seed, buffer
        self.rule, self.resampled = rule, resampled
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.collate = collate or collate_samples
        self.tensors = tensors
        self.epoch, self.offset = epoch, 0
        self._counts: list[int] | None = None
        self.worker: tuple[int, int] | None = None
        """(worker id, workers) to simulate a DataLoader worker; None: ask torch."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from an item's ``position``: the next item is the one after it."""
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = self.dataset.counts()
        return self._counts

    def samples_per_rank(self) -> int:
        """Samples every rank gets per epoch (the same for all ranks)."""
        return len(rank_range(sum(self.counts()), self.rank, self.world_size, self.rule))

    def __len__(self) -> int:
        """Items per epoch for this rank without workers: samples, or batches when batching
        (with W DataLoader workers each worker's last batch may be short, so there can be
        more batches; see ``batches_per_rank``)."""
        n = self.samples_per_rank()
        return n if self.batch_size is None else -(-n // self.batch_size)

    def batches_per_rank(self, workers: int) -> int:
        """Batches this rank yields per epoch with ``workers`` DataLoader workers."""
        n = self.samples_per_rank()
        b = self.batch_size or 1
        return sum(
            -(-(e - s) // b)
            for s, e in (worker_range(n, w, workers) for w in range(max(1, workers)))
        )

    def plan(self, epoch: int, workers: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(shard numbers, positions) of the epoch order, and for each worker the indices
        into it that the worker yields, in order (its part, buffer-shuffled)."""
        shards, positions = epoch_order(self.counts(), epoch, self.seed, self.shuffle)
        idx = rank_range(len(shards), self.rank, self.world_size, self.rule)
        plans = []
        for w in range(workers):
            start, stop = worker_range(len(idx), w, workers)
            part = idx[start:stop]
            if self.shuffle:
                part = part[buffer_order(len(part), self.buffer, [self.seed, epoch, self.rank, w])]
            plans.append(part)
        return shards, positions, plans

    def _worker(self) -> tuple[int, int]:
        if self.worker is not None:
            return self.worker
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _assignment(
        self, plans: list[np.ndarray], worker: int, offset: int
    ) -> tuple[np.ndarray, list[int]]:
        """What ``worker`` yields (indices into the epoch order) and the rank offset after
        each of its batches. From the start of an epoch a worker yields its own part; after
        a resume, the rest of the rank's sequence (in DataLoader order) is dealt out again in
        batches, worker ``w`` taking batches ``w, w + W, ...``, so that the resumed stream is
        exactly the rest of the interrupted one."""
        b, workers = self.batch_size or 1, len(plans)
        if not offset:
            mine = plans[worker]
            parts = [len(p) for p in plans]
            ends = [
                _offset_after(parts, b, worker, min(n + b, len(mine)))
                for n in range(0, len(mine), b)
            ]
            return mine, ends
        chunks = [p[j : j + b] for j in range(0, max(map(len, plans), default=0), b) for p in plans]
        chunks = [c for c in chunks if len(c)]
        bounds = np.cumsum([len(c) for c in chunks]).tolist()
        if offset not in bounds:
            raise ValueError(
                f"offset {offset} is not a batch boundary of this epoch "
                f"(same world size, workers and batch size as when it was saved?)"
            )
        rest = chunks[bounds.index(offset) + 1 :]
        picked = rest[worker::workers]
        total = offset
        ends = []
        for c in range(len(picked)):
            n = c * workers + worker
            ends.append(total + sum(len(x) for x in rest[: n + 1]))
        mine = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        return mine, ends

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        epoch, offset = self.epoch, self.offset
        b = self.batch_size or 1
        while True:
            shards, positions, plans = self.plan(epoch, workers)
            mine, ends = self._assignment(plans, worker, offset)
            # Read in epoch order (sequential within shards), yield in ``mine`` order.
            read = np.argsort(mine, kind="stable")
            order = np.empty(len(mine), dtype=np.int64)
            order[read] = np.arange(len(mine))
            refs = list(
                zip(shards[mine[read]].tolist(), positions[mine[read]].tolist(), strict=True)
            )
            after = int(mine.max()) + 1 if len(mine) else 0
            spare = functools.partial(_cyclic_refs, shards, positions, after)
            samples = self.dataset._samples(refs, order.tolist(), keep_count=True, spare=spare)
            for c, batch in enumerate(_chunks(samples, b)):
                pos = {"epoch": epoch, "offset": ends[min(c, len(ends) - 1)]}
                if self.batch_size is None:
                    item = _to_tensors(batch[0]) if self.tensors else batch[0]
                else:
                    item = self.collate(batch)
                    if self.tensors:
                        item = _to_tensors(item)
                item["position"] = pos
                yield item
            if not self.resampled:
                return
            epoch, offset = epoch + 1, 0


def _cyclic_refs(
    shards: np.ndarray, positions: np.ndarray, start: int
) -> Iterator[tuple[int, int]]:
    """The epoch order from ``start`` on, cyclically, once round."""
    for g in range(start, start + len(shards)):
        g %= len(shards)
        yield int(shards[g]), int(positions[g])


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


_PAD = {"visible": False, "confidence": float("nan")}


def _pad_stack(arrays: list[np.ndarray], fill: Any) -> np.ndarray:
    shape = tuple(max(s) for s in zip(*(a.shape for a in arrays), strict=True))
    if all(a.shape == shape for a in arrays):
        return np.stack(arrays)
    out = np.full((len(arrays), *shape), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, d) for d in a.shape))] = a
    return out


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples with varying numbers of points N.

    Arrays are stacked; where shapes differ they are padded to the largest (``visible`` with
    False, ``confidence`` with NaN, the rest with 0), so ``tracks`` is (B, Nmax, T, 2),
    ``visible`` / ``confidence`` (B, Nmax, T), ``queries`` (B, Nmax, 3). ``point_mask`` bool
    (B, Nmax) marks real points. ``frames`` (B, T, H, W, 3) (videos of one dataset share
    T, H, W; differing ones are padded with 0). ``correspondence`` / ``features``: name ->
    stacked (padded) array. ``key``, ``meta``, ``mp4``: lists.
    """
    out: dict[str, Any] = {}
    first = samples[0]
    for name in first:
        values = [s[name] for s in samples]
        if name == "position":
            continue
        if isinstance(first[name], np.ndarray):
            out[name] = _pad_stack(values, _PAD.get(name, 0))
        elif isinstance(first[name], dict) and name in ("correspondence", "features"):
            out[name] = {k: _pad_stack([v[k] for v in values], 0) for k in first[name]}
        else:
            out[name] = values
    if "tracks" in first or "visible" in first:
        counts = [s["tracks" if "tracks" in first else "visible"].shape[0] for s in samples]
        mask = np.zeros((len(samples), max(counts)), dtype=bool)
        for i, c in enumerate(counts):
            mask[i, :c] = True
        out["point_mask"] = mask
    return out


def _to_tensors(obj: Any) -> Any:
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: (v if k == "meta" else _to_tensors(v)) for k, v in obj.items()}
    return obj


_TORCH_CLASS: type | None = None


def _torch_dataset_class() -> type:
    """``TorchDataset``: built on first use so that ``import datagen`` does not import torch."""
    global _TORCH_CLASS
    if _TORCH_CLASS is None:
        from torch.utils.data import IterableDataset

        cls = type("TorchDataset", (_TorchDatasetImpl, IterableDataset), {})
        cls.__module__, cls.__qualname__ = __name__, "TorchDataset"
        cls.__doc__ = _TorchDatasetImpl.__doc__
        _TORCH_CLASS = cls
    return _TORCH_CLASS


def __getattr__(name: str) -> Any:
    if name == "TorchDataset":
        return _torch_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    TorchDataset = _TorchDatasetImpl
