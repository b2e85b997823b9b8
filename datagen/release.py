"""`datagen release`: a versioned, carded, checksummed dataset folder in the Hub layout.

```
REL/
  README.md          dataset card: YAML front matter (license, size, configs core/features,
                     tags, datagen: name/version/counts) and prose generated from the build
  SHA256SUMS         sha256 of every other file ("<hex>  <path>", sorted)
  CHANGELOG.md
  config.json        the resolved build config
  prompts/FILE       the prompt bank used (checked against the manifest's bank digest)
  schemas/           the JSON schemas of the sample metadata and the manifest
  stats/categories.json, stats/categories.csv   per prompt category: samples, visible
                     fraction, motion, QC verdicts; stats/categories.png, stats/samples.png;
                     stats/calibration.json (the tracker's `datagen calibrate` report, when
                     given with --calibration)
  croissant.json     Croissant 1.0 metadata (datagen.croissant)
  data/manifest.json the build's manifest (features shards left out with --no-features; with
                     --extends, every version's shards and their builds under ``parts``)
  data/core-NNNNNN.tar (+ .idx.json), data/features-*, data/rejected-*, and the shards'
                     stats markers (data/shard-NNNNNN.stats.json)
```

The build must validate first; the release is written under ``REL.partial`` and renamed, so
a folder named REL is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import date
from pathlib import Path
from typing import Any

from datagen.card import CARD, card_text, citation, intro
from datagen.croissant import CROISSANT, croissant_doc
from datagen.errors import UserError
from datagen.extend import copy_earlier, copy_shard, merge_manifests, read_earlier
from datagen.prompts import bank_digest, load_prompts
from datagen.releasestats import sample_rows, write_stats
from datagen.sampleformat import json_bytes, json_value
from datagen.shards import MANIFEST, atomic_write
from datagen.verify import write_sums

VERSION = re.compile(r"^\d+\.\d+\.\d+$")
LICENSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def release_manifest(manifest: dict[str, Any], features: bool) -> dict[str, Any]:
    """The build's manifest as the release ships it: without the features shards when the
    release leaves them out (totals recomputed)."""
    out = json.loads(json.dumps(manifest))
    if not features:
        out["shards"] = [s for s in out["shards"] if s["kind"] != "features"]
        out["members"].pop("features", None)
        out["totals"]["bytes"] = sum(s["bytes"] for s in out["shards"])
    return out


def _check_args(name: str, version: str, license_id: str, out: Path) -> None:
    if not NAME.match(name):
        raise UserError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    if not VERSION.match(version):
        raise UserError(f"--version {version!r}: give X.Y.Z, e.g. 1.0.0")
    if not LICENSE.match(license_id):
        raise UserError(f"--license {license_id!r}: give an SPDX id, e.g. cc-by-4.0")
    if out.exists():
        raise UserError(f"{out} exists; releases are never overwritten: choose another --out")


def _used_tracker(build: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The tracker name and full settings (defaults included) the build's samples record."""
    from datagen.sampleformat import read_tar

    for s in manifest["shards"]:
        if s["kind"] == "core":
            for _key, raw in read_tar(build / s["path"]):
                return json_value(raw["json"])["tracker"]
    return manifest["config"]["tracker"]


def _calibration(path: Path | None, build: Path, manifest: dict[str, Any]) -> dict | None:
    """A `datagen calibrate --json` report of the build's tracker (its name and settings)."""
    if path is None:
        return None
    tracker = _used_tracker(build, manifest)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--calibration {path}: not a readable JSON report ({exc})") from None
    sets = report.get("sets") if isinstance(report, dict) else None
    sets = sets if isinstance(sets, dict) else {"synthetic": report}
    for set_name, r in sets.items():
        if not isinstance(r, dict) or not {"tracker", "settings", "all", "kept"} <= set(r):
            raise UserError(f"--calibration {path}: not a datagen calibrate --json report")
        ours, theirs = tracker["settings"], r["settings"]
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if r["tracker"] != tracker["name"] or differ:
            what = ", ".join(f"{k} {theirs.get(k)} (the build: {ours.get(k)})" for k in differ)
            raise UserError(
                f"--calibration {path}: set {set_name} scored tracker {r['tracker']}"
                f"{' with ' + what if differ else ''}, the build used {tracker['name']}; "
                "calibrate the build's tracker and settings (datagen calibrate --tracker NAME "
                "--set tracker.KEY=VALUE --json FILE)"
            )
    return report


def _categories(prompts: Path) -> dict[str, str]:
    """Prompt id -> category of the banks in the release's prompts folder (any of them)."""
    if not prompts.is_dir():
        return {}
    out: dict[str, str] = {}
    for folder in [prompts, *sorted(p for p in prompts.iterdir() if p.is_dir())]:
        try:
            out.update({p.id: p.category for p in load_prompts(folder)})
        except UserError:
            continue  # a folder holding only sub-folders
    return out


def _copy_prompts(prompts: Path, dst: Path, version: str) -> str:
    """Copies the bank into ``dst``; returns its name there (a clash gets a version prefix)."""
    dst.mkdir(exist_ok=True)
    if prompts.is_file():
        target = prompts.name if not (dst / prompts.name).exists() else f"{version}-{prompts.name}"
        shutil.copy2(prompts, dst / target)
        return target
    target = "" if not any(dst.iterdir()) else version
    (dst / target).mkdir(exist_ok=True)
    for f in sorted(p for p in prompts.iterdir() if p.is_file()):
        shutil.copy2(f, dst / target / f.name)
    return target


def make_release(
    build: Path,
    out: Path,
    name: str | None,
    version: str,
    license_id: str | None,
    features: bool = True,
    prompts: Path | None = None,
    calibration: Path | None = None,
    extends: Path | None = None,
) -> dict[str, Any]:
    """Writes the release folder ``out`` (via ``out.partial``); with ``extends``, a release
    holding the earlier release's shards and the build's, renumbered after them."""
    from datagen.validate import validate_dataset

    earlier = None
    if extends is not None:
        earlier = read_earlier(extends, version)
        name = name or earlier["name"]
        license_id = license_id or earlier["license"]
    if name is None or license_id is None:
        raise UserError("--name and --license are required (or --extends an earlier release)")
    _check_args(name, version, license_id, out)
    problems, _ = validate_dataset(build)
    if problems:
        raise UserError(
            f"{build} does not validate ({len(problems)} problems, first: {problems[0]}); "
            f"run datagen validate {build}"
        )
    manifest = json_value((build / MANIFEST).read_bytes())
    if manifest["totals"]["samples"] == 0:
        checked = (manifest.get("qc") or {}).get("checked", 0)
        raise UserError(
            f"{build} holds no samples in its core shards (quality control rejected "
            f"{checked} of {checked}): nothing to release; look at the build's warning line "
            "and its videos (datagen inspect --png)"
        )
    bank = None
    if prompts is not None:
        bank = load_prompts(prompts)
        if bank_digest(bank) != manifest["prompt_bank"]["digest"]:
            raise UserError(
                f"--prompts {prompts}: not the bank this build used (digest "
                f"{bank_digest(bank)}, the manifest has {manifest['prompt_bank']['digest']})"
            )
    cal = _calibration(calibration, build, manifest)
    own = release_manifest(manifest, features)  # the build's shards this release ships
    rel, renames = own, {s["path"]: s["path"] for s in own["shards"]}
    if earlier is not None:
        rel, renames = merge_manifests(earlier, own, build, version)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write(tmp, build, manifest, own, rel, renames, earlier, name, version, license_id,
               features, prompts, cal)  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    os.replace(tmp, out)
    return {"out": out, "samples": rel["totals"]["samples"], "shards": rel["totals"]["shards"],
            "name": name, "version": version}  # fmt: skip


def _write(tmp, build, manifest, own, rel, renames, earlier, name, version, license_id,
           features, prompts, cal) -> None:  # fmt: skip
    data = tmp / "data"
    prompts_file = None
    if earlier is not None:
        copy_earlier(earlier, tmp)
    data.mkdir(parents=True, exist_ok=True)
    for s in own["shards"]:
        copy_shard(build, data, s, renames[s["path"]])
    atomic_write(data / MANIFEST, json_bytes(rel))
    atomic_write(tmp / "config.json", json_bytes(manifest["config"]))
    (tmp / "schemas").mkdir(exist_ok=True)
    for schema in sorted((Path(__file__).parent / "schemas").glob("*.json")):
        shutil.copy2(schema, tmp / "schemas" / schema.name)
    if prompts is not None:
        prompts_file = _copy_prompts(prompts, tmp / "prompts", version)
    if cal is not None:
        (tmp / "stats").mkdir()
        atomic_write(tmp / "stats" / "calibration.json", json_bytes(cal))
    stats = write_stats(tmp / "stats", sample_rows(data, rel, _categories(tmp / "prompts")))
    today = date.today().isoformat()
    what = (
        f"{manifest['totals']['samples']} samples in {manifest['totals']['shards']} core shards "
        f"from the build with config fingerprint `{manifest['config_fingerprint']}`"
        f"{'' if features else ' (q/k features left out)'}"
    )
    if earlier is None:
        log = f"# Changelog\n\n## {version} ({today})\n\nFirst release: {what}.\n"
    else:
        old = earlier["changelog"].split("\n", 2)[-1].lstrip("\n")
        log = (
            f"# Changelog\n\n## {version} ({today})\n\nExtends {earlier['version']} "
            f"({earlier['samples']} samples) with {what}; {rel['totals']['samples']} samples "
            f"in all. The earlier shards are unchanged.\n\n{old}"
        )
    (tmp / "CHANGELOG.md").write_text(log)
    card = card_text(name, version, license_id, rel, stats, prompts_file, cal)
    (tmp / CARD).write_text(card)
    doc = croissant_doc(
        name, version, license_id, rel,
        description=intro(rel).replace("\n", " "),
        cite=citation(name, version, rel),
        published=today,
    )  # fmt: skip
    (tmp / CROISSANT).write_text(json.dumps(doc, indent=1) + "\n")
    write_sums(tmp)
