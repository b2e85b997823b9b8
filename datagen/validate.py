"""`datagen validate`: every shard against the manifest, every sample against the schema and
the numeric checks, feature shards against their core shards.

Shards are read and members decoded with :mod:`datagen.sampleformat`, the same tar reader and
decoders that :func:`datagen.open_dataset` uses, not an independent copy: a dataset that
validates is one the loader reads. Those decoders are strict (a header checksum per tar
header, the end-of-archive marker, ``.npy`` data exactly as long as its shape, safetensors
tensors that tile their data), and validate adds what the loader takes on trust: the sha256
of every shard, the member lists, the schema and the numeric checks of :mod:`datagen.check`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datagen.check import check_capture, check_sample
from datagen.config import fingerprint_of
from datagen.errors import UserError
from datagen.index import build_index, index_name
from datagen.sampleformat import (
    CORR_MEMBER,
    FEATURE_MEMBER,
    ShardError,
    decode_video,
    json_value,
    npy_array,
    read_tar,
)
from datagen.schemas import schema_errors
from datagen.shards import MANIFEST, read_stats, stats_name


def validate_dataset(
    folder: Path, on_shard: Callable[[str], None] | None = None
) -> tuple[list[str], int]:
    """Problems found (one line each, naming shard and key) and the core samples checked."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a dataset folder made by datagen build")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}; is it a datagen dataset folder?")
    try:
        manifest = json_value(manifest_path.read_bytes())
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST}: not valid JSON ({exc})"], 0
    problems = [f"{MANIFEST}: {e}" for e in schema_errors("manifest", manifest)]
    if problems:
        return problems, 0
    members = manifest["members"]
    fp = manifest["config_fingerprint"]
    failed: dict[int, str] = {}
    for r in manifest["rejected"]:
        if r["stage"] == "shard":
            failed.setdefault(r["shard"], r["reason"])
    for index, reason in sorted(failed.items()):
        problems.append(
            f"{MANIFEST}: shard {index} failed during the build ({reason}); the dataset is "
            "incomplete: run the build again to build it"
        )
    if fingerprint_of(manifest["config"]) != fp:
        problems.append(
            f"{MANIFEST}: config_fingerprint {fp} is not the fingerprint of its config "
            f"({fingerprint_of(manifest['config'])}): edited"
        )
    # an extended release (datagen.extend): each part's shards carry their own build's config
    fp_of: dict[int, str] = {}
    for part in manifest.get("parts") or []:
        if fingerprint_of(part["config"]) != part["config_fingerprint"]:
            problems.append(f"{MANIFEST}: part {part['version']}'s config_fingerprint is not the "
                            "fingerprint of its config: edited")  # fmt: skip
        fp_of.update(dict.fromkeys(part["shards"], part["config_fingerprint"]))
    listed = {s["path"] for s in manifest["shards"]}
    for pattern in ("core-*.tar", "features-*.tar", "rejected-*.tar"):
        for extra in sorted(p.name for p in folder.glob(pattern)):
            if extra not in listed:
                problems.append(f"{extra}: shard file not listed in {MANIFEST}")
    checked = 0
    seen_keys: dict[str, str] = {}
    core_meta: dict[str, dict[str, Any]] = {}
    qc_mode = (manifest.get("qc") or {}).get("mode", "keep")
    qc_listed = {r["key"] for r in manifest["rejected"] if r["stage"] == "qc"}
    for entry in manifest["shards"]:
        name, kind = entry["path"], entry["kind"]
        fp = fp_of.get(entry["index"], manifest["config_fingerprint"])
        if on_shard:
            on_shard(name)
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, {MANIFEST} says {entry['bytes']}")
        data = path.read_bytes()  # once, for its sha256 and its member index
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from {MANIFEST} (corrupt or replaced)")
        if kind not in members:
            problems.append(f"{name}: kind {kind} has no member list in {MANIFEST}")
            continue
        expected = tuple(sorted(members[kind]))
        keys = []
        try:
            for key, raw in read_tar(path):
                keys.append(key)
                if kind in ("core", "rejected"):
                    found, meta = _check_core(key, raw, expected)
                    if meta is not None and meta.get("config_fingerprint") != fp:
                        found.append(f"config_fingerprint {meta.get('config_fingerprint')} is "
                                     f"not the build's {fp}")  # fmt: skip
                    found += _check_verdict(key, kind, meta, qc_mode, qc_listed)
                    if kind == "core":
                        checked += 1
                        core_meta[key] = meta
                    elif FEATURE_MEMBER in raw and meta is not None:
                        found += check_capture(meta, features=raw[FEATURE_MEMBER])
                    if key in seen_keys:
                        problems.append(f"{name}: {key}: key also in {seen_keys[key]}")
                    seen_keys[key] = name
                else:
                    found = _check_features(key, raw, expected, core_meta.get(key))
                problems += [f"{name}: {key}: {p}" for p in found]
        except ShardError as exc:  # truncated, a bad header, an unsafe name (datagen.names)
            problems.append(f"{exc} (unreadable tar)")  # names the shard and the key
            continue
        except OSError as exc:
            problems.append(f"{name}: unreadable tar ({exc})")
            continue
        problems += _check_index(path, data, entry)
        problems += _check_marker(folder, entry, keys, fp)
        if len(keys) != entry["samples"]:
            problems.append(f"{name}: {len(keys)} samples, {MANIFEST} says {entry['samples']}")
        if keys and (keys[0], keys[-1]) != (entry["first_key"], entry["last_key"]):
            problems.append(f"{name}: first/last key differ from {MANIFEST}")
    if qc_mode == "separate":
        separated = {k for k, where in seen_keys.items() if where.startswith("rejected-")}
        for key in sorted(qc_listed - separated):
            problems.append(f"{MANIFEST}: {key} is listed as QC-rejected but in no rejected shard")
    total = manifest["totals"]["samples"]
    if checked != total and not any("unreadable" in p or "missing" in p for p in problems):
        problems.append(f"{MANIFEST}: totals.samples is {total}, core shards hold {checked}")
    return problems, checked


def _check_index(path: Path, data: bytes, entry: dict[str, Any]) -> list[str]:
    """The member index beside a shard must be the one its bytes give (the loader trusts
    offsets and checksums it finds there)."""
    idx = path.with_name(index_name(path.name))
    if not idx.is_file():
        return [f"{idx.name}: missing (every committed shard has its member index)"]
    want = build_index(data, path.name, entry["sha256"]).to_bytes()
    if idx.read_bytes() != want:
        return [
            f"{idx.name}: differs from the index of {path.name} (edited, or from another "
            "build); delete it and the loader scans the tar instead"
        ]
    return []


def _check_marker(folder: Path, entry: dict[str, Any], keys: list[str], fp: str) -> list[str]:
    """The shard's stats marker (what resume trusts) must agree with the shard and manifest."""
    name = stats_name(entry["index"])
    stats = read_stats(folder, entry["index"])
    if stats is None:
        return [f"{name}: missing or unreadable (a rerun would rebuild shard {entry['index']})"]
    out = []
    if stats.config_fingerprint != fp:
        out.append(f"{name}: config_fingerprint {stats.config_fingerprint}, {MANIFEST} has {fp}")
    f = stats.files.get(entry["kind"]) or {}
    if f.get("sha256") != entry["sha256"] or f.get("bytes") != entry["bytes"]:
        out.append(f"{name}: sha256 or size of {entry['path']} differs from {MANIFEST}")
    want = stats.separated_keys if entry["kind"] == "rejected" else stats.keys
    if want != keys:
        out.append(f"{name}: its key list differs from the keys in {entry['path']}")
    return out


def _check_verdict(
    key: str, kind: str, meta: dict[str, Any] | None, mode: str, qc_listed: set[str]
) -> list[str]:
    """Where a sample lies must agree with its QC verdict and the build's qc.rejected mode."""
    verdict = ((meta or {}).get("qc") or {}).get("verdict")
    if kind == "rejected":
        out = [] if verdict == "rejected" else [f"in a rejected shard with QC verdict {verdict}"]
        if key not in qc_listed:
            out.append(f"in a rejected shard but not listed under rejected in {MANIFEST}")
        return out
    if verdict == "rejected" and mode != "keep":
        return [f"QC verdict rejected, in a core shard of a qc.rejected={mode} build"]
    return []


def _check_core(
    key: str, raw: dict[str, bytes], expected: tuple[str, ...]
) -> tuple[list[str], dict[str, Any] | None]:
    have = tuple(sorted(raw))
    if have != expected:
        return [f"members {list(have)}, expected {list(expected)}"], None
    try:
        meta = json_value(raw["json"])
        frames = decode_video(raw["mp4"])
        arrays = {m: npy_array(raw[m]) for m in expected if m.endswith(".npy")}
    except Exception as exc:  # any decode failure is a finding about this sample
        return [f"cannot be decoded ({type(exc).__name__}: {exc})"], None
    problems = check_sample(
        frames,
        arrays["tracks.npy"],
        arrays["visible.npy"],
        arrays["queries.npy"],
        arrays["confidence.npy"],
        meta,
    )
    if isinstance(meta, dict) and meta.get("key") != key:
        problems.append(f"metadata key {meta.get('key')!r} differs from the member key")
    if CORR_MEMBER in raw:
        problems += check_capture(meta, corr=raw[CORR_MEMBER])
    return problems, meta if isinstance(meta, dict) else None


def _check_features(
    key: str, raw: dict[str, bytes], expected: tuple[str, ...], meta: dict[str, Any] | None
) -> list[str]:
    have = tuple(sorted(raw))
    if have != expected:
        return [f"members {list(have)}, expected {list(expected)}"]
    if meta is None:
        return ["no valid core sample with this key in the core shard of the same number"]
    return check_capture(meta, features=raw[FEATURE_MEMBER])
