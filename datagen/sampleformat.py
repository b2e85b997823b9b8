"""The sample file format: what a shard tar holds and how each member is encoded and decoded.

This module is the one place that knows the bytes. The writer (:mod:`datagen.sample`,
:mod:`datagen.shards`) encodes with it; every reader (:mod:`datagen.data`,
:mod:`datagen.validate`, :mod:`datagen.export`, :mod:`datagen.inspection`) decodes with it.
It imports numpy and the standard library only (PyAV when a video is decoded), and nothing of
datagen but :mod:`datagen.names`, so the writer side imports it without the reader.

A shard is a POSIX tar (PAX headers, as ``tarfile`` writes it; see
:func:`datagen.shards.tar_bytes`) of members named ``KEY.MEMBER``; a sample is the run of
members that share a key. Core members (:data:`CORE_MEMBERS` and what
:func:`members_for` adds):

==================  ===========================================================================
``mp4``             H.264 video; :func:`decode_video` gives uint8 RGB (T, H, W, 3)
``json``            the sample's metadata, UTF-8 JSON (:func:`json_bytes`)
``tracks.npy``      float32 (N, T, 2), (x, y) raster pixel coordinates
``visible.npy``     bool (N, T)
``queries.npy``     float32 (N, 3), (t, x, y)
``confidence.npy``  float32 (N, T), NaN where the tracker gives none
``qc_flags.npy``    uint8 (N,), :data:`QC_FLAG_BITS` (builds that run quality control)
``corr.safetensors``  correspondence arrays, (layers, steps, ...) (builds that capture it)
``NAME.npy``        source-specific arrays (e.g. ``masks.npy`` of procedural videos)
==================  ===========================================================================

The features shard of the same number holds ``qk.safetensors`` per key: float16 tensors
(heads, token frames, h*w, head dim) named ``{q|k}.layer{LLL}.step{SSS}``, and with
``capture.hidden_layers`` the blocks' output hidden states (token frames, h*w, model width)
named ``h.layer{LLL}.step{SSS}``.

Decoding never executes data: ``.npy`` headers are parsed with ``ast.literal_eval`` and object
arrays refused, safetensors headers are JSON, tar headers are parsed here (no ``tarfile``
extraction), and no pickle is ever loaded. Decoders of npy and safetensors return arrays that
view the buffer they are given (no copy) and check it as strictly as numpy's and the
safetensors library's own loaders do.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from datagen.names import tar_name_problem

# --- members ---------------------------------------------------------------------------------

CORE_MEMBERS = ("confidence.npy", "json", "mp4", "queries.npy", "tracks.npy", "visible.npy")
"""Member extensions every core sample carries."""
CORR_MEMBER = "corr.safetensors"
"""Core member with the online correspondence arrays (when correspondence is captured)."""
FEATURE_MEMBER = "qk.safetensors"
"""Features-shard member with the captured q/k (when features are captured)."""
QC_MEMBER = "qc_flags.npy"
"""Core member: uint8 (N,) quality-control flag bits per track (0 = kept), when QC runs."""
QC_FLAG_BITS = {"cycle": 1, "visible_fraction": 2, "motion": 4, "jitter": 8}

MEMBER_DTYPES: dict[str, np.dtype] = {
    "tracks.npy": np.dtype(np.float32),
    "visible.npy": np.dtype(np.bool_),
    "queries.npy": np.dtype(np.float32),
    "confidence.npy": np.dtype(np.float32),
    QC_MEMBER: np.dtype(np.uint8),
}
"""The dtype of each label array member."""
FRAME_DTYPE = np.dtype(np.uint8)
"""Decoded video frames (RGB)."""
FEATURE_DTYPE = np.dtype(np.float16)
"""The q/k tensors of ``qk.safetensors``."""


def members_for(corr: bool, features: bool, qc: bool = False) -> dict[str, list[str]]:
    """Member extensions per shard kind for a build that captures ``corr``/``features`` and
    runs quality control (``qc``)."""
    extra = ((CORR_MEMBER,) if corr else ()) + ((QC_MEMBER,) if qc else ())
    out = {"core": sorted(CORE_MEMBERS + extra)}
    if features:
        out["features"] = [FEATURE_MEMBER]
    return out


FIELDS = (
    "frames",
    "mp4",
    "tracks",
    "visible",
    "queries",
    "confidence",
    "correspondence",
    "meta",
    "features",
)
"""Sample fields. ``frames`` is the decoded video, ``mp4`` its raw bytes, ``features`` the q/k
tensors of the features shard; the rest come from the core members of the same name."""
FIELD_MEMBERS = {
    "frames": "mp4",
    "mp4": "mp4",
    "tracks": "tracks.npy",
    "visible": "visible.npy",
    "queries": "queries.npy",
    "confidence": "confidence.npy",
    "correspondence": CORR_MEMBER,
    "meta": "json",
}
"""The core member each field is read from (``features``: :data:`FEATURE_MEMBER` of the
features shard; any other field ``NAME``: the member ``NAME.npy``)."""
OPTIONAL_FIELDS = frozenset({"correspondence"})
"""Fields whose member a build may lack (no correspondence captured): absent, not an error."""


def field_member(name: str) -> str:
    """The core member of field ``name`` (not ``features``)."""
    return FIELD_MEMBERS.get(name, name + ".npy")


# --- npy -------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array``: C order, at least 1-d (``np.ascontiguousarray``), object
    arrays refused."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_KEYS = {"descr", "fortran_order", "shape"}
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def _npy_header(header: bytes, encoding: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    d = ast.literal_eval(header.decode(encoding))
    if not isinstance(d, dict) or set(d) != _NPY_KEYS:
        raise ValueError("bad .npy header")
    shape, fortran = d["shape"], d["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and x >= 0 for x in shape):
        raise ValueError(f"bad .npy shape {shape!r}")
    if not isinstance(fortran, bool):
        raise ValueError(f"bad .npy fortran_order {fortran!r}")
    dtype = np.lib.format.descr_to_dtype(d["descr"])
    if dtype.hasobject:
        raise ValueError("object arrays are refused (loading never executes data)")
    return dtype, shape, fortran


def npy_array(buf: Any) -> np.ndarray:
    """A ``.npy`` member as an array viewing ``buf`` (no copy; read-only when ``buf`` is).
    The header is parsed with ``ast.literal_eval``; object dtypes are refused. ValueError on
    anything malformed, also when the data is longer or shorter than the shape says."""
    mv = memoryview(buf).cast("B")
    if len(mv) < 10 or bytes(mv[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy array (bad magic)")
    major = mv[6]
    if major == 1:
        hlen, start = int.from_bytes(mv[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(mv[8:12], "little"), 12
    else:
        raise ValueError(f"unsupported .npy version {major}")
    header = bytes(mv[start : start + hlen])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        parsed = _npy_header(header, "utf8" if major == 3 else "latin1")
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    offset = start + hlen
    if len(mv) - offset != count * dtype.itemsize:
        raise ValueError(
            f".npy holds {len(mv) - offset} data bytes, shape {shape} needs "
            f"{count * dtype.itemsize}"
        )
    arr = np.frombuffer(mv, dtype, count, offset)
    return arr.reshape(shape, order="F" if fortran else "C")


# --- json ------------------------------------------------------------------------------------


def json_bytes(obj: Any) -> bytes:
    """The ``json`` member (and every JSON file of a build): sorted keys, indent 1, UTF-8."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


def json_value(buf: Any) -> Any:
    """The value of JSON bytes or text read from a dataset, a prompt file or a lock file:
    ValueError when it is not JSON, including JSON nested too deeply to parse (which
    ``json.loads`` reports as a RecursionError)."""
    try:
        return json.loads(buf if isinstance(buf, str) else bytes(buf))
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


# --- safetensors -----------------------------------------------------------------------------

ST_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
"""safetensors dtype names that decode to numpy arrays."""


def safetensors_arrays(
    buf: Any, wants: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Tensors of a safetensors blob as arrays viewing ``buf`` (no copy), name -> array in
    name order, only those ``wants(name)``. ValueError on anything malformed: the header is
    checked whole (every tensor's dtype and size, and that the tensors tile the data exactly,
    as the safetensors library requires) before any tensor is taken."""
    mv = memoryview(buf).cast("B")
    if len(mv) < 8:
        raise ValueError("not a safetensors blob (too short)")
    n = int.from_bytes(mv[:8], "little")
    if n > len(mv) - 8:
        raise ValueError("safetensors header runs past the data")
    header = json_value(mv[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    base = 8 + n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {info['dtype']} is not supported")
        dtype = np.dtype(ST_DTYPES[info["dtype"]])
        shape = tuple(int(x) for x in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        count = math.prod(shape)
        if min(shape, default=0) < 0 or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name}: data offsets do not match its shape")
        tensors.append((begin, end, name, dtype, shape, count))
    at = 0
    for begin, end, name, *_ in sorted(tensors):
        if begin != at:
            raise ValueError(f"tensor {name}: data offsets leave a gap or overlap")
        at = end
    if base + at != len(mv):
        raise ValueError(f"safetensors data is {len(mv) - base} bytes, tensors cover {at}")
    out = {}
    for begin, _, name, dtype, shape, count in sorted(tensors, key=lambda t: t[2]):
        if wants is None or wants(name):
            out[name] = np.frombuffer(mv, dtype, count, base + begin).reshape(shape)
    return out


# --- mp4 -------------------------------------------------------------------------------------


def decode_video(
    data: Any,
    stride: int = 1,
    *,
    size: tuple[int, int] | None = None,
    dtype: str = "uint8",
    channels_first: bool = False,
    threads: int = 1,
) -> np.ndarray:
    """Decode mp4 bytes (PyAV) to RGB frames (T', H', W', 3), frame ``i`` being stored frame
    ``i * stride``; ``size`` (height, width) resizes (swscale, bilinear); ``dtype`` 'uint8'
    (0..255) or 'float32' / 'float16' (0..1); ``channels_first`` gives (T', 3, H', W');
    ``threads`` decoder threads (1: none, the same frames on every machine; 0: FFmpeg's
    choice). The defaults give the uint8 frames the build labels."""
    import av

    frames = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        if threads == 1:
            stream.thread_type = "NONE"
        else:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
        for i, frame in enumerate(container.decode(stream)):
            if i % stride:
                continue
            if size is not None:
                h, w = size
                frame = frame.reformat(width=w, height=h, format="rgb24")
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise ValueError("video has no frames")
    out = np.stack(frames)
    if dtype != "uint8":
        out = out.astype(dtype) * np.asarray(1 / 255, dtype=dtype)
    if channels_first:
        out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    return out


# --- reading a tar ---------------------------------------------------------------------------

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
    (else the data is skipped and None is given). Parses ustar/PAX/GNU headers (what
    ``tarfile.open(mode="w", format=PAX_FORMAT)`` writes) and checks each header's checksum;
    a name that is not a safe ``KEY.MEMBER`` (:mod:`datagen.names`) is refused.

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


def read_tar(source: bytes | str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member: bytes}) of every sample of a tar file (a path) or of tar bytes, in tar
    order, every member read; ShardError (naming the file and key) when it is damaged."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        reader = Reader(io.BytesIO(data), "tar", seekable=True, size=len(data))
        for entry, members in iter_samples(reader, lambda k, e: True):
            yield entry.key, {e: bytes(v) for e, v in members.items()}
        return
    path = Path(source)
    with open(path, "rb") as f:
        reader = Reader(f, path.name, seekable=True, size=os.fstat(f.fileno()).st_size)
        for entry, members in iter_samples(reader, lambda k, e: True):
            yield entry.key, {e: bytes(v) for e, v in members.items()}
