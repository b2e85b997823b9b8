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
                     fraction, motion, QC verdicts
  data/manifest.json the build's manifest (features shards left out with --no-features)
  data/core-NNNNNN.tar (+ .idx.json), data/features-*, data/rejected-*, and the shards'
                     stats markers (data/shard-NNNNNN.stats.json)
```

The build must validate first; the release is written under ``REL.partial`` and renamed, so
a folder named REL is always complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from datetime import date
from pathlib import Path
from typing import Any

from datagen.errors import UserError
from datagen.index import index_name
from datagen.prompts import bank_digest, load_prompts
from datagen.sampleformat import json_bytes, json_value, npy_array, read_tar
from datagen.shards import MANIFEST, atomic_write, sha256_file, stats_name
from datagen.summary import human_bytes

SUMS = "SHA256SUMS"
CARD = "README.md"
VERSION = re.compile(r"^\d+\.\d+\.\d+$")
LICENSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def write_sums(folder: Path) -> None:
    lines = [
        f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SUMS
    ]
    (folder / SUMS).write_text("\n".join(lines) + "\n")


def release_manifest(manifest: dict[str, Any], features: bool) -> dict[str, Any]:
    """The build's manifest as the release ships it: without the features shards when the
    release leaves them out (totals recomputed)."""
    out = json.loads(json.dumps(manifest))
    if not features:
        out["shards"] = [s for s in out["shards"] if s["kind"] != "features"]
        out["members"].pop("features", None)
        out["totals"]["bytes"] = sum(s["bytes"] for s in out["shards"])
    return out


def category_stats(data: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prompt category: samples written, mean visible fraction, median track motion
    (px over the video), QC accepted / rejected among the written samples."""
    rows: dict[str, dict[str, Any]] = {}
    for entry in manifest["shards"]:
        if entry["kind"] != "core":
            continue
        for _key, raw in read_tar(data / entry["path"]):
            meta = json_value(raw["json"])
            cat = meta["prompt"].get("category") or "(none)"
            r = rows.setdefault(cat, {"category": cat, "samples": 0, "visible": [], "qc": {}})
            r["samples"] += 1
            r["visible"].append(meta["labels"]["visible_fraction"])
            verdict = (meta.get("qc") or {}).get("verdict", "none")
            r["qc"][verdict] = r["qc"].get(verdict, 0) + 1
            r.setdefault("motion", []).append(_motion(raw))
    out = []
    for cat in sorted(rows):
        r = rows[cat]
        vis = r.pop("visible")
        motion = [m for m in r.pop("motion", []) if m is not None]
        r["visible_fraction"] = round(sum(vis) / len(vis), 4)
        r["motion_median"] = round(sorted(motion)[len(motion) // 2], 3) if motion else None
        out.append(r)
    return out


def _motion(raw: dict[str, bytes]) -> float | None:
    """Median over a sample's tracks of the farthest a visible point gets from where it
    was first seen (px)."""
    import numpy as np

    tracks, visible = npy_array(raw["tracks.npy"]), npy_array(raw["visible.npy"])
    moves = []
    for xy, vis in zip(tracks, visible, strict=True):
        seen = xy[vis.astype(bool)]
        if len(seen) > 1:
            moves.append(float(np.linalg.norm(seen - seen[0], axis=1).max()))
    return float(np.median(moves)) if moves else None


def card_text(
    name: str,
    version: str,
    license_id: str,
    manifest: dict[str, Any],
    stats: list[dict[str, Any]],
    features: bool,
    prompts_file: str | None,
) -> str:
    import yaml

    cfg = manifest["config"]
    totals = manifest["totals"]
    core = [s for s in manifest["shards"] if s["kind"] == "core"]
    n = totals["samples"]
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10000 else "10K<n<100K"
    configs = [
        {
            "config_name": "core",
            "default": True,
            "data_files": [{"split": "train", "path": "data/core-*.tar"}],
        }
    ]
    if features:
        configs.append(
            {
                "config_name": "features",
                "data_files": [{"split": "train", "path": "data/features-*.tar"}],
            }
        )
    front = {
        "license": license_id,
        "pretty_name": name,
        "task_categories": ["other"],
        "size_categories": [size],
        "tags": ["video", "point-tracking", "diffusion-transformers", "attention", "webdataset"],
        "configs": configs,
        "datagen": {
            "name": name,
            "version": version,
            "config_fingerprint": manifest["config_fingerprint"],
            "samples": n,
            "core_shards": len(core),
            "features": features,
        },
    }
    m, g, t, cap, qc = cfg["model"], cfg["generation"], cfg["tracker"], cfg["capture"], cfg["qc"]
    verdicts = manifest.get("qc") or {}
    causes = ", ".join(f"{c['cause']} {c['samples']}" for c in verdicts.get("top_causes", []))
    table = ["| category | samples | visible fraction | motion (px, median) | QC verdicts |"]
    table.append("|---|---|---|---|---|")
    for r in stats:
        v = ", ".join(f"{k} {c}" for k, c in sorted(r["qc"].items()))
        table.append(
            f"| {r['category']} | {r['samples']} | {r['visible_fraction']:.3f} | "
            f"{r['motion_median'] if r['motion_median'] is not None else '-'} | {v} |"
        )
    body = f"""
# {name} {version}

Videos generated by a video diffusion transformer, with the attention queries and keys
captured while it generated them and pseudo ground-truth point tracks, made by
`datagen` from a prompt bank. {n} samples in {len(core)} core shards
({human_bytes(totals["bytes"])} in all).

## How it was made

- Model: family `{m["family"]}`, `{m["model_id"]}` ({m["dtype"]}); preset `{cfg["preset"]}`.
- Generation: {g["num_frames"]} frames at {g["height"]}x{g["width"]}, {g["num_inference_steps"]}
  steps, guidance {g["guidance_scale"]}, {g["fps"]} fps, base seed {g["seed"]}.
- Prompt bank: {manifest["prompt_bank"]["prompts"]} prompts (digest
  `{manifest["prompt_bank"]["digest"]}`){
        f", in `prompts/{prompts_file}`" if prompts_file else " (not included in this release)"
    }.
- Labels: tracker `{t["name"]}` (settings {json.dumps(t["settings"])}), queries `{t["queries"]}`.
  Calibrate it against exact ground truth with `datagen calibrate`.
- Quality control: {verdicts.get("checked", 0)} checked, {verdicts.get("accepted", 0)} accepted,
  {verdicts.get("rejected", 0)} rejected (`qc.rejected={qc["rejected"]}`); main causes:
  {causes or "none"}. {totals["failed"]} samples failed before QC.
- Capture: q/k features of layers {cap["feature_layers"]} at steps {cap["feature_steps"]}
  ({"included" if features else "not included in this release"}); correspondence of layers
  {cap["corr_layers"]} at steps {cap["corr_steps"]} (in the core shards).
- Software: {", ".join(f"{k} {v}" for k, v in sorted(manifest["software"].items()))}.
- Config fingerprint `{manifest["config_fingerprint"]}`; the full config is `config.json`.

## Statistics per prompt category

{chr(10).join(table)}

## Load it

```python
import datagen
ds = datagen.open_dataset("data")                 # this folder's data/, or its URL

import webdataset as wds
it = wds.WebDataset("data/core-{{000000..{len(core) - 1:06d}}}.tar")

import datasets
core = datasets.load_dataset("PATH/TO/THIS/FOLDER", "core")   # needs torchcodec to decode mp4
```

Check it with `datagen verify .` (every checksum, sample and count).

## Known limitations

- Labels are pseudo ground truth from `{t["name"]}`, not human annotation; QC verdicts and
  per-point confidence are in each sample.
- Generated content reflects the model and the prompt bank, with their biases.

## Citation

```bibtex
@misc{{{re.sub(r"[^A-Za-z0-9]", "", name)}{version.replace(".", "")},
  title  = {{{name} {version}}},
  note   = {{Generated with datagen, config {manifest["config_fingerprint"]}}},
  year   = {{{date.today().year}}}
}}
```
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body


def make_release(
    build: Path,
    out: Path,
    name: str,
    version: str,
    license_id: str,
    features: bool = True,
    prompts: Path | None = None,
) -> dict[str, Any]:
    from datagen.validate import validate_dataset

    if not NAME.match(name):
        raise UserError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    if not VERSION.match(version):
        raise UserError(f"--version {version!r}: give X.Y.Z, e.g. 1.0.0")
    if not LICENSE.match(license_id):
        raise UserError(f"--license {license_id!r}: give an SPDX id, e.g. cc-by-4.0")
    if out.exists():
        raise UserError(f"{out} exists; releases are never overwritten: choose another --out")
    problems, _ = validate_dataset(build)
    if problems:
        raise UserError(
            f"{build} does not validate ({len(problems)} problems, first: {problems[0]}); "
            f"run datagen validate {build}"
        )
    manifest = json_value((build / MANIFEST).read_bytes())
    bank = None
    if prompts is not None:
        bank = load_prompts(prompts)
        if bank_digest(bank) != manifest["prompt_bank"]["digest"]:
            raise UserError(
                f"--prompts {prompts}: not the bank this build used (digest "
                f"{bank_digest(bank)}, the manifest has {manifest['prompt_bank']['digest']})"
            )
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    data = tmp / "data"
    data.mkdir(parents=True)
    rel = release_manifest(manifest, features)
    for s in rel["shards"]:
        for name_ in (s["path"], index_name(s["path"]), stats_name(s["index"])):
            shutil.copy2(build / name_, data / name_)
    atomic_write(data / MANIFEST, json_bytes(rel))
    atomic_write(tmp / "config.json", json_bytes(manifest["config"]))
    (tmp / "schemas").mkdir()
    for schema in sorted((Path(__file__).parent / "schemas").glob("*.json")):
        shutil.copy2(schema, tmp / "schemas" / schema.name)
    prompts_file = None
    if prompts is not None:
        (tmp / "prompts").mkdir()
        files = (
            [prompts] if prompts.is_file() else sorted(p for p in prompts.iterdir() if p.is_file())
        )
        for f in files:
            shutil.copy2(f, tmp / "prompts" / f.name)
        prompts_file = prompts.name if prompts.is_file() else ""
    stats = category_stats(data, rel)
    (tmp / "stats").mkdir()
    atomic_write(tmp / "stats" / "categories.json", json_bytes(stats))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["category", "samples", "visible_fraction", "motion_median", "qc"])
    for r in stats:
        w.writerow([r["category"], r["samples"], r["visible_fraction"], r["motion_median"],
                    json.dumps(r["qc"], sort_keys=True)])  # fmt: skip
    (tmp / "stats" / "categories.csv").write_text(buf.getvalue())
    (tmp / "CHANGELOG.md").write_text(
        f"# Changelog\n\n## {version} ({date.today().isoformat()})\n\nFirst release: "
        f"{rel['totals']['samples']} samples in {rel['totals']['shards']} core shards from the "
        f"build with config fingerprint `{manifest['config_fingerprint']}`"
        f"{'' if features else ' (q/k features left out)'}.\n"
    )
    card = card_text(name, version, license_id, rel, stats, features, prompts_file)
    (tmp / CARD).write_text(card)
    write_sums(tmp)
    os.replace(tmp, out)
    return {"out": out, "samples": rel["totals"]["samples"], "shards": rel["totals"]["shards"]}
