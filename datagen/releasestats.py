"""Statistics of a release per prompt category: a table (JSON, CSV) and PNG plots.

Per category, over the core samples the release ships: samples, mean visible fraction of the
tracks, median track motion (px), and quality-control verdicts. Plots (matplotlib, Agg):
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


def sample_rows(data: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per core sample: key, category, visible fraction, motion, QC verdict."""
    rows = []
    for entry in manifest["shards"]:
        if entry["kind"] != "core":
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
        out.append({
            "category": cat,
            "samples": len(rs),
            "qc": qc,
            "visible_fraction": round(sum(r["visible_fraction"] for r in rs) / len(rs), 4),
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
    colours = {"accepted": "#2a9d55", "rejected": "#d1495b", "none": "#8d99ae"}
    for v in verdicts:
        counts = [r["qc"].get(v, 0) for r in stats]
        axes[0].barh(y, counts, left=left, label=v, color=colours.get(v, "#edae49"))
        left = [a + b for a, b in zip(left, counts, strict=True)]
    axes[0].set_title("samples by QC verdict")
    axes[0].legend(fontsize=7)
    axes[1].barh(y, [r["visible_fraction"] for r in stats], color="#00798c")
    axes[1].set_xlim(0, 1)
    axes[1].set_title("mean visible fraction")
    axes[2].barh(y, [r["motion_median"] or 0 for r in stats], color="#edae49")
    axes[2].set_title("median motion (px)")
    for ax in axes:
        ax.set_yticks(y, cats if ax is axes[0] else [""] * len(cats), fontsize=7)
        ax.invert_yaxis()
    _save(plt, fig, path)


def _plot_samples(path: Path, rows: list[dict[str, Any]]) -> None:
    plt, fig, axes = _figure(2, 8)
    axes[0].hist([r["visible_fraction"] for r in rows], bins=20, range=(0, 1), color="#00798c")
    axes[0].set_title(f"visible fraction ({len(rows)} samples)")
    moves = [r["motion"] for r in rows if r["motion"] is not None]
    axes[1].hist(moves, bins=20, color="#edae49")
    axes[1].set_title(f"median motion, px ({len(moves)} samples)")
    for ax in axes:
        ax.set_ylabel("samples")
    _save(plt, fig, path)
