"""The dataset card (README.md of a release): YAML front matter for the Hub and `datasets`,
prose generated from the build's manifest, its statistics and, when given, the tracker's
calibration against exact ground truth."""

from __future__ import annotations

import json
import re
from datetime import date
from typing import Any

from datagen.summary import human_bytes

CARD = "README.md"
TAGS = ["video", "point-tracking", "diffusion-transformers", "attention", "webdataset"]


def size_category(n: int) -> str:
    for limit, label in ((1000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):  # fmt: skip
        if n < limit:
            return label
    return "1M<n<10M"


def front_matter(
    name: str, version: str, license_id: str, manifest: dict[str, Any]
) -> dict[str, Any]:
    kinds = {s["kind"] for s in manifest["shards"]}
    configs = [
        {
            "config_name": "core",
            "default": True,
            "data_files": [{"split": "train", "path": "data/core-*.tar"}],
        }
    ]
    for kind in ("features", "rejected"):
        if kind in kinds:
            configs.append({
                "config_name": kind,
                "data_files": [{"split": "train", "path": f"data/{kind}-*.tar"}],
            })
    n = manifest["totals"]["samples"]
    ours: dict[str, Any] = {
        "name": name,
        "version": version,
        "config_fingerprint": manifest["config_fingerprint"],
        "samples": n,
        "core_shards": sum(1 for s in manifest["shards"] if s["kind"] == "core"),
        "features": "features" in kinds,
    }
    if manifest.get("parts"):
        ours["parts"] = [
            {k: p[k] for k in ("version", "samples", "config_fingerprint")}
            for p in manifest["parts"]
        ]
    return {
        "license": license_id,
        "pretty_name": name,
        "task_categories": ["other"],
        "size_categories": [size_category(n)],
        "tags": TAGS,
        "configs": configs,
        "datagen": ours,
    }


def _calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    if not calibration:
        return [
            "Not calibrated in this release: `datagen calibrate --tracker NAME --json cal.json`",
            "scores the tracker against exact ground truth; `datagen release --calibration",
            "cal.json` puts the figures here.",
        ]
    sets = calibration.get("sets") or {"synthetic": calibration}
    lines = [
        "Scored by `datagen calibrate` on procedural videos with exact ground truth (TAP-Vid",
        "metrics, %; all tracks, and the tracks quality control keeps):",
        "",
        "| scenes | videos | delta_avg (all / kept) | AJ (all / kept) | OA (all / kept) "
        "| kept tracks |",
        "|---|---|---|---|---|---|",
    ]

    def pair(r: dict[str, Any], key: str) -> str:
        a, k = r["all"].get(key), r["kept"].get(key)
        return " / ".join("-" if v is None else f"{v:.1f}" for v in (a, k))

    for set_name, r in sets.items():
        lines.append(
            f"| {set_name} | {r['videos']} | {pair(r, 'delta_avg')} | "
            f"{pair(r, 'average_jaccard')} | {pair(r, 'occlusion_accuracy')} | "
            f"{100 * r['kept_fraction']:.1f}% |"
        )
    return lines


def _storage_lines(manifest: dict[str, Any]) -> list[str]:
    lines = ["| shards | files | samples | bytes | per sample |", "|---|---|---|---|---|"]
    for kind in ("core", "features", "rejected"):
        shards = [s for s in manifest["shards"] if s["kind"] == kind]
        if not shards:
            continue
        n = sum(s["samples"] for s in shards)
        b = sum(s["bytes"] for s in shards)
        per = human_bytes(b / n) if n else "-"
        lines.append(f"| {kind} | {len(shards)} | {n} | {human_bytes(b)} | {per} |")
    return lines


def _parts_lines(manifest: dict[str, Any]) -> list[str]:
    parts = manifest.get("parts")
    if not parts:
        return []
    lines = ["", "## Versions in this release", ""]
    for p in parts:
        lines.append(
            f"- {p['version']}: {p['samples']} samples in shards {p['shards'][0]}.."
            f"{p['shards'][-1]}, build config `{p['config_fingerprint']}` (preset "
            f"`{p['config']['preset']}`, model `{p['config']['model']['model_id']}`)"
        )
    lines.append("")
    lines.append("Each part keeps its build's config; `data/manifest.json` lists them under "
                 "`parts`.")  # fmt: skip
    return [*lines, ""]


def card_text(
    name: str,
    version: str,
    license_id: str,
    manifest: dict[str, Any],
    stats: list[dict[str, Any]],
    prompts_file: str | None,
    calibration: dict[str, Any] | None = None,
) -> str:
    import yaml

    front = front_matter(name, version, license_id, manifest)
    features = front["datagen"]["features"]
    cfg = manifest["config"]
    totals = manifest["totals"]
    core = [s for s in manifest["shards"] if s["kind"] == "core"]
    m, g, t, cap, qc = cfg["model"], cfg["generation"], cfg["tracker"], cfg["capture"], cfg["qc"]
    verdicts = manifest.get("qc") or {}
    causes = ", ".join(
        f"{c['cause']} {c['samples']} ({c.get('meaning', '')})".replace(" ()", "")
        for c in verdicts.get("top_causes", [])
    )
    table = [
        "| category | samples checked | visible fraction | motion (px, median) | QC verdicts |",
        "|---|---|---|---|---|",
    ]
    for r in stats:
        v = ", ".join(f"{k} {c}" for k, c in sorted(r["qc"].items()))
        vis = "-" if r["visible_fraction"] is None else f"{r['visible_fraction']:.3f}"
        table.append(
            f"| {r['category']} | {r['samples']} | {vis} | "
            f"{r['motion_median'] if r['motion_median'] is not None else '-'} | {v} |"
        )
    bank = manifest["prompt_bank"]
    where = f", in `prompts/{prompts_file}`" if prompts_file else " (not included)"
    hidden = (
        f"and block outputs (hidden states) of layers {cap['hidden_layers']} "
        if cap.get("hidden_layers")
        else ""
    )
    nl = "\n"
    body = f"""
# {name} {version}

{intro(manifest)}

## How it was made

- Model: family `{m["family"]}`, `{m["model_id"]}` ({m["dtype"]}); preset `{cfg["preset"]}`.
- Generation: {g["num_frames"]} frames at {g["height"]}x{g["width"]}, {g["num_inference_steps"]}
  steps, guidance {g["guidance_scale"]}, {g["fps"]} fps, base seed {g["seed"]}.
- Prompt bank: {bank["prompts"]} prompts (digest `{bank["digest"]}`){where}.
- Labels: tracker `{t["name"]}` (settings {json.dumps(t["settings"])}), queries `{t["queries"]}`.
- Quality control: {verdicts.get("checked", 0)} checked, {verdicts.get("accepted", 0)} accepted,
  {verdicts.get("rejected", 0)} rejected (`qc.rejected={qc["rejected"]}`); main causes:
  {causes or "none"}. {totals.get("failed", 0)} samples failed before QC.
- Capture: q/k features of layers {cap["feature_layers"]} at steps {cap["feature_steps"]}
  {hidden}({"included" if features else "not included in this release"}); correspondence of layers
  {cap["corr_layers"]} at steps {cap["corr_steps"]} (in the core shards).
- Software: {", ".join(f"{k} {v}" for k, v in sorted(manifest["software"].items()))}.
- Config fingerprint `{manifest["config_fingerprint"]}`; the full config is `config.json`.
{nl.join(_parts_lines(manifest))}
## Tracker calibration

{nl.join(_calibration_lines(calibration))}

## Statistics per prompt category

{nl.join(table)}

Visible fraction and motion are over the samples this release holds; samples that quality
control rejected and the build dropped (`qc.rejected=drop`) count only in the verdicts.

![samples per category](stats/categories.png)
![visible fraction and motion over samples](stats/samples.png)

## Storage

{nl.join(_storage_lines(manifest))}

Every file's sha256 is in `SHA256SUMS`; `croissant.json` describes the shards in Croissant 1.0
(with their sha256) for `mlcroissant`.

## Load it

```python
import datagen                                    # pip install datagen
ds = datagen.open_dataset("data")                 # this folder's data/, or its URL

import webdataset as wds
it = wds.WebDataset("data/core-{{000000..{len(core) - 1:06d}}}.tar")

import datasets                                   # pip install 'datagen[hf]' (torchcodec)
core = datasets.load_dataset("PATH/OR/HUB/ID", "core", split="train")
# (datasets caches a local folder by its name and config, not its content: after re-making a
#  release in a folder of the same name, pass download_mode="force_redownload")
frames = core[0]["mp4"].get_frames_in_range(0, {g["num_frames"]}).data   # uint8 (T, 3, H, W)
# without torchcodec, keep the video as bytes:
core = core.cast_column("mp4", datasets.Video(decode=False))

import mlcroissant as mlc
records = mlc.Dataset("croissant.json").records("core_json")
```

Arrays (`tracks.npy`, `visible.npy`, ...) are NumPy `.npy` files and q/k features are
safetensors; `datagen` decodes them, `datasets` gives them as arrays or bytes.
Check a copy with `datagen verify .` (every checksum, sample and count).

## Known limitations

- Labels are pseudo ground truth from `{t["name"]}`, not human annotation; QC verdicts and
  per-point confidence are in each sample.
- Generated content reflects the model and the prompt bank, with their biases.

## Citation

```bibtex
{citation(name, version, manifest)}
```
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body


def intro(manifest: dict[str, Any]) -> str:
    """The card's first paragraph (also the Croissant description, on one line)."""
    totals = manifest["totals"]
    core = sum(1 for s in manifest["shards"] if s["kind"] == "core")
    return (
        "Videos generated by a video diffusion transformer, with the attention queries and keys\n"
        "captured while it generated them and pseudo ground-truth point tracks, made by\n"
        f"`datagen` from a prompt bank. {totals['samples']} samples in {core} core shards\n"
        f"({human_bytes(totals['bytes'])} in all)."
    )


def citation(name: str, version: str, manifest: dict[str, Any]) -> str:
    return (
        f"@misc{{{re.sub(r'[^A-Za-z0-9]', '', name)}{version.replace('.', '')},\n"
        f"  title  = {{{name} {version}}},\n"
        f"  note   = {{Generated with datagen, config {manifest['config_fingerprint']}}},\n"
        f"  year   = {{{date.today().year}}}\n"
        "}"
    )
