"""`datagen release D2 --extends REL1 --version 1.1.0`: a release that adds a build's shards
to an earlier release.

The earlier release's files are copied unchanged (same names, same bytes); the build's shards
are renumbered after the earlier ones (their member index and stats marker rewritten to the
new number; the tars themselves are byte-identical). The manifest lists every shard and, under
``parts``, which shards came from which version and build config, so `validate` checks each
shard against its own build's fingerprint. Keys never collide: a build whose keys the earlier
release already holds is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from datagen.errors import UserError
from datagen.index import build_index, index_name
from datagen.sampleformat import json_bytes, json_value
from datagen.shards import MANIFEST, atomic_write, stats_name


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def shard_keys(folder: Path, shards: list[dict[str, Any]]) -> set[str]:
    """Keys of the core and rejected shards, from their member indexes."""
    keys: set[str] = set()
    for s in shards:
        if s["kind"] in ("core", "rejected"):
            idx = json.loads((folder / index_name(s["path"])).read_text())
            keys.update(e["key"] for e in idx["samples"])
    return keys


def read_earlier(rel: Path, version: str) -> dict[str, Any]:
    """The release to extend, verified, with what the new one needs of it."""
    from datagen.card import CARD
    from datagen.verify import card_front, require_verified

    require_verified(rel, "--extends")
    front = card_front((rel / CARD).read_text(encoding="utf-8"))
    ours = front["datagen"]
    if _version(version) <= _version(ours["version"]):
        raise UserError(
            f"--version {version}: must be later than the extended release's {ours['version']}"
        )
    manifest = json_value((rel / "data" / MANIFEST).read_bytes())
    return {
        "path": rel,
        "name": ours["name"],
        "version": ours["version"],
        "license": front["license"],
        "samples": manifest["totals"]["samples"],
        "manifest": manifest,
        "changelog": (rel / "CHANGELOG.md").read_text(),
        "keys": shard_keys(rel / "data", manifest["shards"]),
    }


def _part(manifest: dict[str, Any], version: str) -> dict[str, Any]:
    return {
        "version": version,
        "config_fingerprint": manifest["config_fingerprint"],
        "config": manifest["config"],
        "prompt_bank": manifest["prompt_bank"],
        "software": manifest["software"],
        "samples": manifest["totals"]["samples"],
        "shards": sorted({s["index"] for s in manifest["shards"]}),
    }


def _merge_qc(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a or not b:
        return a or b
    out = dict(b)
    for k in ("checked", "accepted", "rejected"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    causes: dict[str, dict[str, Any]] = {}
    for c in a.get("top_causes", []) + b.get("top_causes", []):
        got = causes.setdefault(c["cause"], {**c, "samples": 0})
        got["samples"] += c["samples"]
    out["top_causes"] = sorted(causes.values(), key=lambda c: (-c["samples"], c["cause"]))
    return out


def merge_manifests(
    earlier: dict[str, Any], new: dict[str, Any], build: Path, version: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The extended release's manifest, and the new name of each of the build's shards."""
    old, rel = earlier["manifest"], earlier["path"]
    if old["format_version"] != new["format_version"]:
        raise UserError(f"--extends {rel}: format version {old['format_version']}, {build} has "
                        f"{new['format_version']}; rebuild with this datagen")  # fmt: skip
    if old["members"] != new["members"]:
        raise UserError(
            f"--extends {rel}: its samples hold {json.dumps(old['members'])}, those of {build} "
            f"{json.dumps(new['members'])}; extend with a build of the same capture settings "
            "(and --features/--no-features as the earlier release)"
        )
    modes = [(m.get("qc") or {}).get("mode") for m in (old, new)]
    if modes[0] != modes[1]:
        raise UserError(f"--extends {rel}: built with qc.rejected={modes[0]}, {build} with "
                        f"qc.rejected={modes[1]}; rebuild with qc.rejected={modes[0]}")  # fmt: skip
    clash = sorted(earlier["keys"] & shard_keys(build, new["shards"]))
    if clash:
        raise UserError(
            f"--extends {rel}: {len(clash)} keys of {build} are already in the release (first "
            f"{clash[0]}); keys are prompt id + replica, so extend with a build of other prompts"
        )
    offset = max(s["index"] for s in old["shards"]) + 1
    renames, shards = {}, [dict(s) for s in old["shards"]]
    for s in new["shards"]:
        i = s["index"] + offset
        moved = {**s, "index": i, "path": f"{s['kind']}-{i:06d}.tar"}
        renames[s["path"]] = moved["path"]
        shards.append(moved)
    parts = old.get("parts") or [_part(old, earlier["version"])]
    part = _part(new, version)
    part["shards"] = [i + offset for i in part["shards"]]
    totals = {k: old["totals"].get(k, 0) + v for k, v in new["totals"].items()}
    rejected = old["rejected"] + [{**r, "shard": r["shard"] + offset} for r in new["rejected"]]
    merged = {
        **new,
        "shards": shards,
        "totals": totals,
        "rejected": rejected,
        "qc": _merge_qc(old.get("qc"), new.get("qc")),
        "parts": [*parts, part],
    }
    if merged["qc"] is None:
        merged.pop("qc")
    return merged, renames


def copy_earlier(earlier: dict[str, Any], tmp: Path) -> None:
    """The earlier release's data files (not its manifest) and prompts, unchanged."""
    src = earlier["path"]
    shutil.copytree(src / "data", tmp / "data", ignore=shutil.ignore_patterns(MANIFEST))
    if (src / "prompts").is_dir():
        shutil.copytree(src / "prompts", tmp / "prompts")


def copy_shard(build: Path, data: Path, entry: dict[str, Any], new_path: str) -> None:
    """Copies a build's shard with its member index and stats marker, renumbered to
    ``new_path`` (the tar's bytes stay the same)."""
    shutil.copy2(build / entry["path"], data / new_path)
    if new_path == entry["path"]:
        shutil.copy2(build / index_name(entry["path"]), data / index_name(new_path))
        shutil.copy2(build / stats_name(entry["index"]), data / stats_name(entry["index"]))
        return
    raw = (data / new_path).read_bytes()
    idx = build_index(raw, new_path, entry["sha256"])
    atomic_write(data / index_name(new_path), idx.to_bytes())
    index = int(new_path.rsplit("-", 1)[1].split(".")[0])
    marker = json_value((build / stats_name(entry["index"])).read_bytes())
    marker["index"] = index
    for kind, f in marker["files"].items():
        f["path"] = f"{kind}-{index:06d}.tar"
    for r in marker.get("rejected", []):
        r["shard"] = index
    atomic_write(data / stats_name(index), json_bytes(marker))
