"""Shard files: reproducible tar writing, atomic commit, per-shard stats and the manifest.

A shard is either absent or complete: its tar is written under a temporary name, fsynced,
read back and checked, then renamed; its stats file, written last (also atomically), is the
commit marker. Tar members are sorted and carry fixed mtime/uid/gid/mode, so the same samples
give the same bytes. Shards are read back with the sample format's one tar reader
(:func:`datagen.sampleformat.read_tar`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datagen.faults import failpoint
from datagen.index import build_index, index_name
from datagen.names import key_problem, member_problem
from datagen.sampleformat import json_bytes, json_value

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("core", "features", "rejected")
"""Shard sets: ``core`` (video, labels, correspondence) and ``features`` (captured q/k), with
the same keys under the same shard numbers; ``rejected`` (a ``qc.rejected=separate`` build's
samples that quality control rejected, all their members, q/k included)."""


def shard_file(kind: str, index: int) -> str:
    return f"{kind}-{index:06d}.tar"


def stats_name(index: int) -> str:
    return f"shard-{index:06d}.stats.json"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    """A reproducible tar of ``{key: {ext: bytes}}``: keys sorted, members sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in sorted(samples):
            # Names the readers would refuse (datagen.names) are never written.
            problem = key_problem(key) or next(
                filter(None, map(member_problem, samples[key])), None
            )
            if problem:
                raise ValueError(problem)
            for ext in sorted(samples[key]):
                data = samples[key][ext]
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Rejected:
    key: str
    shard: int
    stage: str
    """Where it failed: generate, encode, decode, track, validate; or qc (quality control
    rejected its labels: the sample is in the shard's rejected tar when the build separates
    rejected samples, else not written)."""
    reason: str


@dataclass
class ShardStats:
    index: int
    config_fingerprint: str
    keys: list[str]
    files: dict[str, dict[str, Any]]
    """kind -> {"path", "bytes", "sha256"} of each tar of the shard."""
    rejected: list[Rejected] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)
    """Quality-control outcome of the shard's samples (verdict counts and reasons)."""

    @property
    def samples(self) -> int:
        return len(self.keys)

    @property
    def separated_keys(self) -> list[str]:
        """Keys of the shard's rejected tar (QC-rejected samples of a separating build)."""
        if "rejected" not in self.files:
            return []
        return sorted(r.key for r in self.rejected if r.stage == "qc")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardStats:
        obj = dict(obj)
        obj["rejected"] = [Rejected(**r) for r in obj.get("rejected", [])]
        return cls(**obj)


def write_shard(
    out: Path,
    index: int,
    tars: dict[str, dict[str, dict[str, bytes]]],
    fingerprint: str,
    rejected: list[Rejected],
    qc: dict[str, Any] | None = None,
) -> ShardStats:
    """Write, verify and commit one shard (one tar per kind, same keys); return its stats.

    Next to each tar goes its member-offset index (``<tar>.idx.json``, see datagen.index). The
    stats file, written last, is the commit marker: a crash before it leaves a shard that the
    next run rebuilds.
    """
    keys = sorted(tars.get("core", {}))
    files = {}
    for kind, samples in tars.items():
        if kind != "rejected" and sorted(samples) != keys:
            raise ValueError(f"shard {index}: {kind} keys differ from core keys")
        data = tar_bytes(samples)
        digest = hashlib.sha256(data).hexdigest()
        final = out / shard_file(kind, index)
        failpoint("shard-tar", index)  # mid-shard: the tar is about to be written
        atomic_write(final, data)
        # Read the committed file back: bytes on disk must be the bytes we meant.
        if sha256_file(final) != digest:
            final.unlink(missing_ok=True)
            raise OSError(f"{final}: bytes on disk differ from what was written")
        files[kind] = {"path": final.name, "bytes": len(data), "sha256": digest}
        # Member offsets and checksums for random access (datagen.index); before the commit
        # marker, so a committed shard has its index.
        atomic_write(out / index_name(final.name), build_index(data, final.name, digest).to_bytes())
    failpoint("shard-renamed", index)  # tars and indexes in place, no commit marker yet
    stats = ShardStats(index, fingerprint, keys, files, rejected, qc or {})
    atomic_write(out / stats_name(index), json_bytes(stats.to_json()))
    return stats


def read_stats(out: Path, index: int) -> ShardStats | None:
    path = out / stats_name(index)
    if not path.is_file():
        return None
    try:
        return ShardStats.from_json(json_value(path.read_bytes()))
    except (ValueError, TypeError, KeyError):
        return None


def committed_stats(
    out: Path, index: int, fingerprint: str, kinds: tuple[str, ...], hashed: bool = True
) -> ShardStats | None:
    """The shard's stats when it is committed, matches ``fingerprint``, holds exactly
    ``kinds`` and every tar still has its size and (``hashed``) its checksum."""
    stats = read_stats(out, index)
    if stats is None or stats.config_fingerprint != fingerprint:
        return None
    if tuple(sorted(stats.files)) != tuple(sorted(kinds)):
        return None
    for entry in stats.files.values():
        tar = out / entry["path"]
        if not tar.is_file() or tar.stat().st_size != entry["bytes"]:
            return None
        if hashed and sha256_file(tar) != entry["sha256"]:
            return None
    return stats


def build_manifest(
    stats: list[ShardStats],
    config: dict[str, Any],
    fingerprint: str,
    bank: dict[str, Any],
    software: dict[str, str],
    members: dict[str, list[str]],
    limit: int | None,
) -> dict[str, Any]:
    shards = []
    rejected = []
    for s in sorted(stats, key=lambda s: s.index):
        for kind in sorted(s.files, key=KINDS.index):
            f = s.files[kind]
            keys = s.separated_keys if kind == "rejected" else s.keys
            shards.append(
                {
                    "path": f["path"],
                    "kind": kind,
                    "index": s.index,
                    "samples": len(keys),
                    "bytes": f["bytes"],
                    "sha256": f["sha256"],
                    "first_key": keys[0] if keys else None,
                    "last_key": keys[-1] if keys else None,
                }
            )
        rejected += [asdict(r) for r in s.rejected]
    core = [e for e in shards if e["kind"] == "core"]
    return {
        "format_version": FORMAT_VERSION,
        "config": config,
        "config_fingerprint": fingerprint,
        "prompt_bank": bank,
        "limit": limit,
        "software": software,
        "members": members,
        "shards": shards,
        "totals": {
            "shards": len(core),
            "samples": sum(e["samples"] for e in core),
            "bytes": sum(e["bytes"] for e in shards),
            "rejected": len(rejected),
            "failed": sum(1 for r in rejected if r["stage"] != "qc"),
        },
        "rejected": rejected,
        "qc": qc_totals(stats, config.get("qc", {}).get("rejected", "keep")),
    }


QC_CAUSE_TEXT = {
    "visible_fraction": "tracks visible in too few frames (qc.min_visible_fraction)",
    "cycle": "forward-backward cycle error above qc.cycle_threshold",
    "jitter": "tracks jump between frames (qc.max_jitter)",
    "motion": "tracks move less than qc.min_motion",
    "no tracks": "no query points to track",
}
QC_CAUSE_FIX = {
    "visible_fraction": "look at the videos (datagen inspect --png): content that does not "
    "stay trackable loses points; try another tracker (tracker.name) or lower "
    "qc.min_visible_fraction",
    "cycle": "try another tracker (tracker.name) or raise qc.cycle_threshold",
    "jitter": "look at the tracks (datagen inspect --png); raise qc.max_jitter for fast motion",
    "motion": "lower qc.min_motion (static content is valid ground truth)",
    "no tracks": "check tracker.queries and tracker.grid_size",
}


def qc_totals(stats: list[ShardStats], mode: str) -> dict[str, Any] | None:
    """Quality-control verdicts over the shards (None when QC did not run): counts, where
    rejected samples went, and the main causes, most frequent first."""
    checked = [s.qc for s in stats if s.qc]
    if not checked:
        return None
    causes: dict[str, int] = {}
    for q in checked:
        for cause, n in q.get("causes", {}).items():
            causes[cause] = causes.get(cause, 0) + n
    accepted = sum(q["accepted"] for q in checked)
    rejected = sum(q["rejected"] for q in checked)
    return {
        "accepted": accepted,
        "rejected": rejected,
        "checked": accepted + rejected,
        "rejected_samples": {
            "drop": "not written; listed under rejected with stage qc",
            "keep": "in the core shards, verdict in KEY.json",
            "separate": "in the rejected-NNNNNN.tar shards; listed under rejected with stage qc",
        }.get(mode, mode),
        "mode": mode,
        "top_causes": [
            {"cause": c, "samples": n, "meaning": QC_CAUSE_TEXT.get(c, c)}
            for c, n in sorted(causes.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }
