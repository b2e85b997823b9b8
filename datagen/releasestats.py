"""Statistics of a release per prompt category: a table (JSON, CSV) and PNG plots.

Per category: samples, mean visible fraction of the tracks and median track motion (px) over
the samples the release ships, and quality-control verdicts of every sample checked (those a
``qc.rejected=drop`` build dropped counted as "rejected (dropped)", by the prompt bank's
categories when the release includes it). Plots (matplotlib, Agg):
``stats/categories.png`` (samples by verdict, visible fraction, motion per category) and
``stats/samples.png`` (histograms over samples of visible fraction and motion).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from datagen.sampleformat import json_bytes, json_value, npy_array, read_tar
from datagen.shards import atomic_write

DROPPED = "rejected (dropped)"
UNKNOWN = "(unknown: prompt bank not included)"


def sample_rows(
    data: Path, manifest: dict[str, Any], categories: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per written sample (core and rejected shards): key, category, visible
    fraction, motion, QC verdict; and one
    per sample quality control rejected that the build dropped (``qc.rejected=drop``: listed
    in the manifest, not in the shards), its category from ``categories`` (prompt id ->
    category, from the prompt bank) and no label figures."""
    rows = []
    for entry in manifest["shards"]:  # core, and rejected (a qc.rejected=separate build's)
        if entry["kind"] == "features":
            continue
        for key, raw in read_tar(data / entry["path"]):
            meta = json_value(raw["json"])
            rows.append({
                "key": key,
                "category": meta["prompt"].get("category") or "(none)",
                "visible_fraction": float(meta["labels"]["visible_fraction"]),
                "motion": motion(raw),
                "verdict": (meta.get("qc") or {}).get("verdict", "none"),
            })
    written = {r["key"] for r in rows}
    for r in manifest["rejected"]:
        if r["stage"] == "qc" and r["key"] not in written:
            prompt_id = r["key"].rsplit("-r", 1)[0]
            cat = (categories or {}).get(prompt_id, UNKNOWN) or "(none)"
            rows.append({"key": r["key"], "category": cat, "visible_fraction": None,
                         "motion": None, "verdict": DROPPED})  # fmt: skip
    return rows


def motion(raw: dict[str, bytes]) -> float | None:
    """Median over a sample's tracks of the farthest a visible point gets from where it
    was first seen (px); None when no track is seen twice."""
    import numpy as np

    tracks, visible = npy_array(raw["tracks.npy"]), npy_array(raw["visible.npy"])
    moves = []
    for xy, vis in zip(tracks, visible, strict=True):
        seen = xy[vis.astype(bool)]
        if len(seen) > 1:
            moves.append(float(np.linalg.norm(seen - seen[0], axis=1).max()))
    return float(np.median(moves)) if moves else None


def category_stats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per category: samples, mean visible fraction, median motion, QC verdict counts."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r)
    out = []
    for cat in sorted(by):
        rs = by[cat]
        qc: dict[str, int] = {}
        for r in rs:
            qc[r["verdict"]] = qc.get(r["verdict"], 0) + 1
        moves = sorted(r["motion"] for r in rs if r["motion"] is not None)
        vis = [r["visible_fraction"] for r in rs if r["visible_fraction"] is not None]
        out.append({
            "category": cat,
            "samples": len(rs),
            "qc": qc,
            "visible_fraction": round(sum(vis) / len(vis), 4) if vis else None,
            "motion_median": round(moves[len(moves) // 2], 3) if moves else None,
        })
    return out


def stats_csv(stats: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["category", "samples", "visible_fraction", "motion_median", "qc"])
    for r in stats:
        w.writerow([r["category"], r["samples"], r["visible_fraction"], r["motion_median"],
                    json.dumps(r["qc"], sort_keys=True)])  # fmt: skip
    return buf.getvalue()


PLOTS = ("categories.png", "samples.png")


def write_stats(folder: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Writes categories.json, categories.csv and the PNG plots into ``folder``."""
    stats = category_stats(rows)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "categories.json", json_bytes(stats))
    (folder / "categories.csv").write_text(stats_csv(stats))
    _plot_categories(folder / PLOTS[0], stats)
    _plot_samples(folder / PLOTS[1], rows)
    return stats


def _figure(ncols: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(width, 3.2), dpi=100)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    # no software/date metadata: the same data gives the same bytes
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _plot_categories(path: Path, stats: list[dict[str, Any]]) -> None:
    plt, fig, axes = _figure(3, 12)
    cats = [r["category"] for r in stats]
    y = list(range(len(cats)))
    left = [0] * len(cats)
    verdicts = sorted({v for r in stats for v in r["qc"]})
    colours = {"accepted": "#2a9d55", "rejected": "#d1495b", DROPPED: "#f4a6a6",
               "none": "#8d99ae"}  # fmt: skip
    for v in verdicts:
        counts = [r["qc"].get(v, 0) for r in stats]
        axes[0].barh(y, counts, left=left, label=v, color=colours.get(v, "#edae49"))
        left = [a + b for a, b in zip(left, counts, strict=True)]
    axes[0].set_title("samples by QC verdict")
    axes[0].legend(fontsize=7)
    axes[1].barh(y, [r["visible_fraction"] or 0 for r in stats], color="#00798c")
    axes[1].set_xlim(0, 1)
    axes[1].set_title("mean visible fraction (written samples)")
    axes[2].barh(y, [r["motion_median"] or 0 for r in stats], color="#edae49")
    axes[2].set_title("median motion, px (written samples)")
    for ax in axes:
        ax.set_yticks(y, cats if ax is axes[0] else [""] * len(cats), fontsize=7)
        ax.invert_yaxis()
    _save(plt, fig, path)


def _plot_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    plt, fig, axes = _figure(2, 8)
    vis = [r["visible_fraction"] for r in rows if r["visible_fraction"] is not None]
    axes[0].hist(vis, bins=20, range=(0, 1), color="#00798c")
    axes[0].set_title(f"visible fraction ({len(vis)} written samples)")
    moves = [r["motion"] for r in rows if r["motion"] is not None]
    axes[1].hist(moves, bins=20, color="#edae49")
    axes[1].set_title(f"median motion, px ({len(moves)} samples)")
    for ax in axes:
        ax.set_ylabel("samples")
    _save(plt, fig, path)
