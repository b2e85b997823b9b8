"""The report's tables, as plain rows derived from a :class:`~datagen.analysis.collect.Study`.

Units: matching accuracies and TAP-Vid metrics in percent (as the paper and the benchmark
report them); confidence and attention masses as probabilities in [0, 1]. A value that could
not be computed (nothing counted, or not available from that source) is None (JSON null,
an empty CSV cell, "n/a" in the HTML).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from datagen.analysis import study as st
from datagen.analysis.collect import GROUP_ALL, HIDDEN, SOURCES, Study
from datagen.analysis.tapvid import DELTAS, evaluate_videos

FORMAT = "datagen-analysis-report/1"
RANK_BY = ("px", "token")
"""Which matching accuracy enters the harmonic-mean ranking: the paper's pixel threshold, or
one token (useful where every pixel-threshold accuracy is 0, e.g. at 32x32)."""
PERCENT = {m for m in st.METRICS if "accuracy" in m}
TRACK_METRICS = (
    ("delta_avg", "delta_avg"),
    ("average_jaccard", "AJ"),
    ("occlusion_accuracy", "OA"),
) + tuple((f"within_{d}", f"within_{d}") for d in DELTAS)


def clean(x: Any) -> Any:
    """A JSON-safe number: Python float/int, None for NaN or inf."""
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _metric_row(sums: np.ndarray) -> dict[str, Any]:
    m = st.metrics_of(np.asarray(sums, np.float64))
    out: dict[str, Any] = {
        "pairs": clean(int(np.nan_to_num(sums[st.S["pairs"]]))),
        "moved_pairs": clean(int(np.nan_to_num(sums[st.S["moved_pairs"]]))),
    }
    for name in st.METRICS:
        v = float(m[name])
        out[name] = clean(100 * v if name in PERCENT else v)
    return out


def matching_rows(study: Study) -> list[dict[str, Any]]:
    """One row per group x source x (layer, step) (correspondence, q/k, block-output features
    by cosine), then the baselines (layer and step None)."""
    rows = []
    for g in study.groups:
        for li, layer in enumerate(study.layers):
            for si, step in enumerate(study.steps):
                head = {"group": g, "source": SOURCES[0], "method": "attention", "layer": layer}
                head |= {"step": step, "timestep": study.timesteps[si]}
                rows.append(head | _metric_row(study.corr[g][li, si]))
        for (layer, step), sums in sorted(study.qk.get(g, {}).items()):
            head = {"group": g, "source": SOURCES[1], "method": "attention", "layer": layer}
            head |= {"step": step, "timestep": _timestep(study, step)}
            rows.append(head | _metric_row(sums))
        for (layer, step), sums in sorted(study.hidden.get(g, {}).items()):
            head = {"group": g, "source": HIDDEN, "method": "cosine", "layer": layer}
            head |= {"step": step, "timestep": _timestep(study, step)}
            rows.append(head | _metric_row(sums))
        for name, sums in sorted(study.baselines.get(g, {}).items()):
            head = {"group": g, "source": "baseline", "method": name, "layer": None}
            head |= {"step": None, "timestep": None}
            rows.append(head | _metric_row(sums))
    return rows


def _timestep(study: Study, step: int) -> int | None:
    return study.timestep_of(step) if step in study.steps else None


def ranking(study: Study, group: str = GROUP_ALL, rank_by: str = "px") -> dict[str, Any]:
    """The harmonic-mean ranking of one group: cells (layer, step) and layers, best first."""
    m = st.metrics_of(study.corr[group])
    acc = m["accuracy_px" if rank_by == "px" else "accuracy_token"]
    scores = st.harmonic_scores(acc, m["confidence"], m["mass_other_frames"])
    cells = []
    for li, layer in enumerate(study.layers):
        for si, step in enumerate(study.steps):
            cells.append(
                {
                    "layer": layer,
                    "step": step,
                    "timestep": study.timesteps[si],
                    "score": clean(scores[li, si]),
                    "accuracy": clean(100 * acc[li, si]),
                    "confidence": clean(m["confidence"][li, si]),
                    "cross_frame": clean(m["mass_other_frames"][li, si]),
                }
            )
    cells.sort(key=lambda c: (c["score"] is None, -(c["score"] or 0.0)))
    layers = [
        {"rank": i + 1, "layer": layer, "score": clean(score)}
        for i, (layer, score) in enumerate(st.layer_ranking(scores, study.layers))
    ]
    return {"group": group, "rank_by": f"accuracy_{rank_by}", "cells": cells, "layers": layers}


def tracking_rows(study: Study) -> list[dict[str, Any]]:
    """One row per group x tracker x labels: TAP-Vid metrics in percent, means over videos.
    ``labels`` is "own" (the build's labels: exact for a synthetic source, the tracker's
    otherwise) or "re-tracked" (pseudo labels the analysis made for exact-labelled videos with
    the build's configured tracker)."""
    gt = sorted({v["ground_truth"] for v in study.videos})
    own = gt[0] if len(gt) == 1 else "mixed: " + ", ".join(gt)
    rows = []
    tables = [("own", own, study.tracking)]
    if study.tracking_pseudo:
        tables.append(("re-tracked", study.pseudo_tracker or "pseudo", study.tracking_pseudo))
    for (labels, truth, table), g in ((t, g) for t in tables for g in study.groups):
        for (method, source, layer, step), per_video in table.get(g, {}).items():
            agg = evaluate_videos(per_video)
            row = {
                "group": g,
                "method": method,
                "source": source or "baseline",
                "layer": layer if layer >= 0 else None,
                "step": step if step >= 0 else None,
                "timestep": _timestep(study, step) if step >= 0 else None,
                "labels": labels,
                "ground_truth": truth,
                "videos": int(agg["num_videos"]),
                "points": int(agg["num_eval_points"]),
            }
            rows.append(row | {name: clean(agg[key]) for key, name in TRACK_METRICS})
    return rows


def best_tracker(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The attention tracker with the highest delta_avg over all videos."""
    att = [
        r
        for r in rows
        if r["group"] == GROUP_ALL
        and r["source"] not in ("baseline", HIDDEN)
        and r["labels"] == "own"
    ]
    att = [r for r in att if r["delta_avg"] is not None]
    return max(att, key=lambda r: r["delta_avg"]) if att else None


def report_data(
    study: Study, manifest: dict[str, Any], source: str, rank_by: str = "px"
) -> dict[str, Any]:
    """Everything the report shows, JSON-ready (figures are added by the writer)."""
    rows = matching_rows(study)
    ranks = {g: ranking(study, g, rank_by) for g in study.groups}
    tracks = tracking_rows(study)
    best_cell = ranks[GROUP_ALL]["cells"][0]
    corr_all = [r for r in rows if r["group"] == GROUP_ALL and r["source"] == SOURCES[0]]
    top = next(
        r for r in corr_all if (r["layer"], r["step"]) == (best_cell["layer"], best_cell["step"])
    )
    bt = best_tracker(tracks)
    ground = {}
    for v in study.videos:
        ground[v["ground_truth"]] = ground.get(v["ground_truth"], 0) + 1
    assert study.layout is not None
    notes = []
    if rank_by == "px" and not any(r["accuracy_px"] for r in corr_all):
        notes.append(
            f"no match lands within {study.threshold_px:.3g} px here (a token is "
            f"{study.layout.token_pixel_size} px): the ranking's accuracy term is flat; "
            "--rank-by token ranks with the one-token accuracy"
        )
    if study.options.qk and not study.feature_pairs:
        notes.append("no q/k stored (capture.feature_layers): no q/k rows, no attention map")
    if study.pseudo_note:
        notes.append(f"no pseudo labels made ({study.pseudo_note}): tracking is scored against "
                     "the exact labels only")  # fmt: skip
    elif study.tracking_pseudo:
        notes.append(
            f"the videos have exact tracks; tracking is scored against them (labels 'own') and "
            f"against labels the build's tracker makes of the same videos ({study.pseudo_tracker}"
            ", labels 're-tracked'), as a text-to-video build would be scored"
        )
    return {
        "notes": notes,
        "format": FORMAT,
        "build": {
            "source": source,
            "config_fingerprint": manifest.get("config_fingerprint"),
            "config": manifest.get("config"),
            "totals": manifest.get("totals"),
            "software": manifest.get("software"),
        },
        "settings": {
            "threshold_px_at_480x720": study.options.reference_px,
            "threshold_px": clean(study.threshold_px),
            "one_token_px": list(study.layout.token_pixel_size),
            "kept_only": study.options.kept_only,
            "qk": study.options.qk,
            "refine_radius_tokens": study.options.radius,
            "rank_by": f"accuracy_{rank_by}",
            "units": "accuracies and TAP-Vid metrics in percent; confidence and masses in [0, 1]",
        },
        "layout": study.layout.to_json(),
        "layers": study.layers,
        "steps": study.steps,
        "timesteps": study.timesteps,
        "feature_pairs": [list(p) for p in study.feature_pairs],
        "hidden_pairs": [list(p) for p in study.hidden_pairs],
        "counts": {
            "videos_used": len(study.videos),
            "videos_excluded": len(study.excluded),
            "points_used": sum(v["points"] for v in study.videos),
            "pairs_scored": sum(v["pairs"] for v in study.videos),
            "points_left_out": dict(sorted(study.points_left_out.items())),
            "ground_truth": ground,
            "groups": {g: sum(g in v["groups"] for v in study.videos) for g in study.groups},
        },
        "excluded": study.excluded,
        "matching": rows,
        "ranking": ranks,
        "tracking": tracks,
        "summary": {
            "videos_used": len(study.videos),
            "points_used": sum(v["points"] for v in study.videos),
            "best_layer": ranks[GROUP_ALL]["layers"][0]["layer"],
            "best_cell_layer": best_cell["layer"],
            "best_cell_step": best_cell["step"],
            "best_cell_timestep": best_cell["timestep"],
            "best_cell_accuracy_px": top["accuracy_px"],
            "best_cell_accuracy_token": top["accuracy_token"],
            "best_tracker": None
            if bt is None
            else {k: bt[k] for k in ("method", "source", "layer", "step", "delta_avg", "AJ", "OA")},
        },
    }
