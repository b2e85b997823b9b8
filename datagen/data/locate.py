"""Where the shards are: a dataset folder, a manifest, a core shard, a glob or brace pattern,
a list of those, or URLs of any of them (``http(s)://`` read with ranged requests, other
schemes through fsspec) become a list of :class:`Shard`; and the byte streams to read them."""

from __future__ import annotations

import glob as globlib
import io
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from datagen.errors import UserError
from datagen.names import key_problem, shard_file_problem
from datagen.sampleformat import FEATURE_MEMBER, json_value
from datagen.shards import MANIFEST


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
        manifest = json_value(data)
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


def _short(loc: str) -> str:
    """The shard's file name, as errors name it."""
    return loc.rstrip("/").rsplit("/", 1)[-1]
