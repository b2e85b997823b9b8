"""Calibrate a point tracker and the track QC against exact ground truth.

:func:`calibrate` renders procedural videos (:mod:`datagen.sources.synthetic`, seeds
``seed .. seed + num_videos - 1``), tracks each video's ground-truth queries (pixel centres on
frame 0) with the tracker, runs :func:`datagen.track.qc.run_qc`, and scores the tracks with the
TAP-Vid metrics (:mod:`datagen.analysis.tapvid`, evaluated at 256x256) twice: over ALL tracks
and over the tracks QC KEEPS. The difference says how much QC improves pseudo-labels, and the
kept fraction what it costs.

The report is JSON-serialisable (``json.dumps(report, allow_nan=False)`` works): metrics are in
percent as returned by :func:`~datagen.analysis.tapvid.evaluate_videos`, and a metric that is
undefined (e.g. no track kept in any video) is ``None``.

Measured with the defaults (24 frames of 128x96, default trackers and
:class:`~datagen.track.qc.QCConfig`; TAP-Vid "first" mode; percent; all tracks -> kept tracks):

=========================  ===========  ===========  ===========  =============
tracker, seeds             delta_avg    AJ           OA           kept fraction
=========================  ===========  ===========  ===========  =============
LK, 0..7                   46.4 -> 78.9 38.1 -> 67.4 63.4 -> 92.6 41.6%
LK, 100..107 (held out)    43.9 -> 78.0 35.9 -> 66.3 59.2 -> 94.0 37.9%
DIS, 0..7                  35.3 -> 60.9 27.3 -> 49.1 60.4 -> 92.6 34.5%
DIS, 100..107 (held out)   35.1 -> 63.2 27.1 -> 51.4 56.4 -> 93.6 34.3%
=========================  ===========  ===========  ===========  =============

Why default LK stays far below 70 over all tracks (seeds 0..7, 2304 tracks):

* Not occlusion or points leaving the frame: an oracle that is exact until a point first
  disappears and then holds it (no re-acquisition, like LK) scores delta_avg 93.
* ~60% of the tracks (1374) are lost for good while the point is still visible; >99% of those
  losses happen while the tracker's 15x15 window straddles an object boundary or the image
  border (sprites are 18-50 px wide and move differently from the background, and 48 points
  are sampled on each). After a loss LK holds the last position, which TAP-Vid's position
  accuracy counts as wrong on every later visible frame. Smaller windows help (win_size 7:
  59.1 all / 85.9 kept; win_size 5 without the appearance check: 64.9 / 84.3); none of the
  settings tried reached 70 over all tracks.
* Tracks that stay visible drift on rotating and scaling sprites even with the window inside
  the sprite: median 0.084 px/frame (0.001 without rotation and scaling), the bias of a
  translation-only model. This drift is time-reversible, so the cycle check cannot see it;
  it is what keeps the kept tracks' within_1 at ~60%.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from datagen.analysis.tapvid import DELTAS, EVAL_MODES, evaluate_tracks, evaluate_videos
from datagen.sources.synthetic import SyntheticConfig, render_synthetic_video
from datagen.track.qc import QCConfig, run_qc
from datagen.track.registry import make_tracker

__all__ = ["calibrate", "format_report", "EVAL_HW"]

EVAL_HW = (256, 256)
"""TAP-Vid evaluation resolution (height, width); thresholds are pixels at it."""


def _clean(x: Any) -> Any:
    """Recursively turn numpy scalars into Python ones and NaN/inf floats into None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _metrics(pred_tracks, pred_visible, video, rows, mode) -> dict[str, float]:
    q = video.queries[rows, 0].astype(np.int64)
    return evaluate_tracks(
        pred_tracks[rows],
        pred_visible[rows],
        video.tracks[rows],
        video.visible[rows],
        video_hw=video.frames.shape[1:3],
        mode=mode,
        query_frames=q,
        eval_hw=EVAL_HW,
    )


def calibrate(
    tracker_name: str,
    tracker_settings: dict[str, Any] | None = None,
    num_videos: int = 8,
    synthetic: SyntheticConfig | None = None,
    qc: QCConfig | None = None,
    seed: int = 0,
    mode: str = "first",
) -> dict[str, Any]:
    """Score ``tracker_name`` and the QC on ``num_videos`` procedural videos.

    Args:
        tracker_name, tracker_settings: passed to :func:`~datagen.track.registry.make_tracker`.
        num_videos: how many videos; video ``k`` is ``render_synthetic_video(synthetic,
            seed + k)``. Use seeds that were not used to tune the tracker or the QC (held out).
        synthetic: scene distribution; None = ``SyntheticConfig()`` (24 frames of 128x96, 4
            rotating, scaling, occluding sprites over a panning background; points leave the
            frame).
        qc: QC thresholds; None = ``QCConfig()``.
        seed: the first video's seed.
        mode: TAP-Vid evaluation mode, ``"first"`` or ``"strided"``; the query frames are the
            ground-truth queries' frames (0 for the synthetic source).

    Returns:
        A JSON-serialisable dict::

            {"tracker": name, "settings": tracker.settings() (all settings, defaults included),
             "synthetic": asdict(synthetic), "qc": qc.to_dict(), "mode": mode,
             "seeds": [...], "videos": n,
             "all": metrics over all tracks, "kept": metrics over the kept tracks,
             "kept_fraction": kept tracks / all tracks, pooled over the videos,
             "accepted_videos": number of videos with verdict "accepted",
             "seconds_per_video": {"render", "track", "qc"} (means, wall time),
             "per_video": [{"seed", "num_tracks", "num_kept", "kept_fraction", "verdict",
                            "reasons", "counts", "cycle_error_median", "all", "kept",
                            "seconds": {"render", "track", "qc"}}, ...]}

        ``"all"``/``"kept"`` are :func:`~datagen.analysis.tapvid.evaluate_videos` outputs
        (percent; ``num_eval_points`` summed over videos); per-video metrics are fractions as
        returned by ``tapvid_metrics``. Undefined values are None.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    if isinstance(num_videos, bool) or int(num_videos) != num_videos or num_videos < 1:
        raise ValueError(f"num_videos must be a positive integer, got {num_videos!r}")
    synthetic = SyntheticConfig() if synthetic is None else synthetic
    qc = QCConfig() if qc is None else qc
    tracker = make_tracker(tracker_name, **(tracker_settings or {}))
    seeds = [int(seed) + k for k in range(int(num_videos))]

    per_video: list[dict[str, Any]] = []
    all_metrics: list[dict[str, float]] = []
    kept_metrics: list[dict[str, float]] = []
    total = kept_total = accepted = 0
    for s in seeds:
        t0 = time.perf_counter()
        video = render_synthetic_video(synthetic, seed=s)
        t1 = time.perf_counter()
        result = tracker.track(video.frames, video.queries)
        t2 = time.perf_counter()
        res = run_qc(tracker, video.frames, result, video.queries, qc)
        t3 = time.perf_counter()

        n = video.queries.shape[0]
        kept_rows = np.flatnonzero(res.kept)
        m_all = _metrics(result.tracks, result.visible, video, np.arange(n), mode)
        m_kept = _metrics(result.tracks, result.visible, video, kept_rows, mode)
        all_metrics.append(m_all)
        kept_metrics.append(m_kept)
        total += n
        kept_total += kept_rows.size
        accepted += res.verdict["verdict"] == "accepted"
        finite = res.cycle_error[np.isfinite(res.cycle_error)]
        per_video.append(
            {
                "seed": s,
                "num_tracks": n,
                "num_kept": int(kept_rows.size),
                "kept_fraction": res.verdict["kept_fraction"],
                "verdict": res.verdict["verdict"],
                "reasons": res.verdict["reasons"],
                "counts": res.verdict["counts"],
                "cycle_error_median": float(np.median(finite)) if finite.size else None,
                "all": m_all,
                "kept": m_kept,
                "seconds": {"render": t1 - t0, "track": t2 - t1, "qc": t3 - t2},
            }
        )

    def mean_seconds(key: str) -> float:
        return float(np.mean([v["seconds"][key] for v in per_video]))

    report = {
        "tracker": tracker.name,
        "settings": tracker.settings(),
        "synthetic": asdict(synthetic),
        "qc": qc.to_dict(),
        "mode": mode,
        "seeds": seeds,
        "videos": len(seeds),
        "all": evaluate_videos(all_metrics),
        "kept": evaluate_videos(kept_metrics),
        "kept_fraction": kept_total / total if total else 0.0,
        "accepted_videos": int(accepted),
        "seconds_per_video": {k: mean_seconds(k) for k in ("render", "track", "qc")},
        "per_video": per_video,
    }
    return _clean(report)


_ROWS = (
    ("delta_avg", "delta_avg"),
    ("AJ", "average_jaccard"),
    ("OA", "occlusion_accuracy"),
    *((f"within_{d}", f"within_{d}") for d in DELTAS),
)


def format_report(report: dict[str, Any]) -> str:
    """A small human-readable table of a :func:`calibrate` report: all tracks vs kept tracks."""

    def cell(v: Any) -> str:
        return "     n/a" if v is None else f"{float(v):8.1f}"

    settings = ", ".join(f"{k}={v}" for k, v in report.get("settings", {}).items())
    secs = report.get("seconds_per_video", {})
    lines = [
        f"tracker {report['tracker']} ({settings})",
        f"{report['videos']} synthetic videos, seeds {report['seeds'][0]}..{report['seeds'][-1]}"
        f", mode {report.get('mode', 'first')}; kept {100.0 * report['kept_fraction']:.1f}% "
        f"of tracks; {report.get('accepted_videos', 0)}/{report['videos']} videos accepted",
        f"seconds per video: track {secs.get('track', float('nan')):.2f}, "
        f"qc {secs.get('qc', float('nan')):.2f}, render {secs.get('render', float('nan')):.2f}",
        f"{'metric (%)':<12}{'all':>8}{'kept':>8}",
    ]
    for label, key in _ROWS:
        lines.append(f"{label:<12}{cell(report['all'].get(key))}{cell(report['kept'].get(key))}")
    n_all = report["all"].get("num_eval_points")
    n_kept = report["kept"].get("num_eval_points")
    lines.append(f"{'eval points':<12}{int(n_all or 0):>8}{int(n_kept or 0):>8}")
    return "\n".join(lines)
