"""Quality control of point tracks: per-track flags and a per-video verdict.

Everything here is pure numpy except :func:`cycle_consistency`, which calls a tracker. Conventions
as in :mod:`datagen.track.base`: raster pixel coordinates, ``tracks`` float32 ``(N, T, 2)``,
``visible`` bool ``(N, T)``, ``queries`` ``(N, 3)`` of ``(t, x, y)``. All distances are in pixels
of the video the tracks are given in (not rescaled to 256x256 as TAP-Vid does).

Per-track statistics (definitions)
----------------------------------
* **cycle error** (:func:`cycle_consistency`): track forward (the given result), take the point
  at its *cycle frame* (the last frame after its query frame where it is visible), track it back
  from there to the query frame with the same tracker, and measure how far it lands from the
  original query. NaN when it cannot be computed (see the function).
* **visible fraction**: ``visible[i].sum() / T``, the fraction of ALL frames of the video in which
  the tracker reports the point visible.
* **motion**: the diagonal ``sqrt(dx^2 + dy^2)`` of the bounding box of the point's visible
  positions (0 for a point visible in fewer than 2 frames). It is at least the largest
  distance between two visible positions and at most ``sqrt(2)`` times it.
* **jitter**: the largest Euclidean norm of the second difference
  ``p[t-1] - 2 p[t] + p[t+1]`` over frames ``t`` where ``t-1``, ``t`` and ``t+1`` are all visible
  (0 when there is no such triple). Units px/frame^2. Smooth motion has a small second
  difference (constant velocity: exactly 0), a one-frame glitch of size ``d`` gives ``d``
  (the jump ``0, 0, d, d`` gives ``d`` twice, a spike ``0, d, 0`` gives ``2 d``).

Flags (True = the track FAILS the check), see :class:`QCConfig` for the thresholds:

* ``"cycle"``: cycle error ``> cycle_threshold`` or NaN (a track that cannot be verified is not
  kept). Absent checks (``cycle_error=None``) flag nothing.
* ``"visible_fraction"``: visible fraction ``< min_visible_fraction``.
* ``"motion"``: motion ``< min_motion`` (never fires at the default ``min_motion = 0``).
* ``"jitter"``: jitter ``> max_jitter`` (None disables it).

A track is KEPT when no flag fires. The video is ``"accepted"`` when the kept fraction is at
least ``min_kept_fraction`` (and it has at least one track), otherwise ``"rejected"``.

Defaults were chosen on the procedural videos of :mod:`datagen.sources.synthetic` with the LK
tracker (see :mod:`datagen.calibrate`); they have not been tuned on real footage. Measured on
held-out seeds 100..107 with default LK (delta_avg of the kept tracks, pooled, / kept share):
all tracks 43.9 / 100%; cycle check alone (2 px) 63.1 / 59%; with ``min_visible_fraction``
0.25 / 0.5 / 0.75: 72.0 / 47%, 76.9 / 38%, 78.5 / 31%; with the cycle threshold at 0.5 / 1 / 2 /
4 px (visible fraction 0.5): 81.8 / 32%, 78.6 / 36%, 76.9 / 38%, 76.6 / 39%.

Limits of the checks: most of the cycle check's effect on LK comes from back-tracks that are
lost (NaN), not from the threshold. A bias that reverses with time (translation-only LK on a
rotating or scaling surface drifts by ~0.08 px/frame, and the back-track drifts back) closes
the cycle and is not detected. LK's smooth motion never comes near ``max_jitter`` on the
synthetic set (largest jitter 1.95 px/frame^2), so the jitter check is for trackers that
jump (e.g. swap to another object for one frame).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from datagen.track.base import Tracker, TrackResult

__all__ = [
    "FLAG_NAMES",
    "QCConfig",
    "QCResult",
    "cycle_consistency",
    "cycle_frames",
    "visible_fraction",
    "track_motion",
    "track_jitter",
    "track_flags",
    "video_verdict",
    "run_qc",
]

FLAG_NAMES: tuple[str, ...] = ("cycle", "visible_fraction", "motion", "jitter")
"""Flag names in the order used by :func:`track_flags` and in verdict reasons (ties)."""


@dataclass
class QCConfig:
    """Thresholds of the track checks (distances in pixels of the tracked video).

    Attributes:
        cycle_threshold: px. A track fails ``"cycle"`` when its forward-then-backward cycle
            error exceeds this (or is NaN). Default 2.0 px.
        check_cycle: run the cycle check at all (it tracks every point a second time, so it
            roughly doubles the cost of tracking). When False, ``"cycle"`` never fires and the
            cycle errors are NaN.
        min_visible_fraction: in ``[0, 1]``. A track fails ``"visible_fraction"`` when it is
            visible in fewer than this fraction of the video's frames. Default 0.5: a frame-to-
            frame tracker loses a point for good when its window meets an occlusion boundary,
            and such short tracks are the least reliable (see :mod:`datagen.calibrate`).
        min_motion: px. A track fails ``"motion"`` when the bounding box of its visible
            positions has a diagonal below this. Default 0.0 = off: static content (a fixed
            camera on a still background) is legitimate ground truth, so filtering it out is a
            choice users opt into (e.g. to keep only moving points for a motion study).
        max_jitter: px/frame^2, or None to disable. A track fails ``"jitter"`` when the largest
            second difference of its visible positions exceeds this. Default 4.0 px: far above
            the smooth motion of the synthetic scenes (< 1 px/frame^2) and below a 5 px
            one-frame jump; real fast motion (shaking cameras, waving hands) can exceed it.
        min_kept_fraction: in ``[0, 1]``. The video is rejected when fewer than this fraction
            of its tracks are kept. Default 0.3.
    """

    cycle_threshold: float = 2.0
    check_cycle: bool = True
    min_visible_fraction: float = 0.5
    min_motion: float = 0.0
    max_jitter: float | None = 4.0
    min_kept_fraction: float = 0.3

    def __post_init__(self) -> None:
        _check_nonneg("cycle_threshold", self.cycle_threshold)
        _check_nonneg("min_motion", self.min_motion)
        if self.max_jitter is not None:
            _check_nonneg("max_jitter", self.max_jitter)
        for name in ("min_visible_fraction", "min_kept_fraction"):
            v = getattr(self, name)
            _check_nonneg(name, v)
            if v > 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
        if not isinstance(self.check_cycle, bool):
            raise ValueError(f"check_cycle must be a bool, got {self.check_cycle!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (``QCConfig(**cfg.to_dict())`` rebuilds it)."""
        return asdict(self)


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@dataclass
class QCResult:
    """Output of :func:`run_qc` for one video."""

    kept: np.ndarray  # bool (N,): no flag fired
    flags: dict[str, np.ndarray]  # name -> bool (N,), True = fails
    cycle_error: np.ndarray  # float64 (N,) px, NaN where not computed
    verdict: dict[str, Any]  # see video_verdict


# --- cycle consistency ------------------------------------------------------------------------


def cycle_frames(visible: np.ndarray, query_frames: np.ndarray) -> np.ndarray:
    """The frame each point is tracked back from in :func:`cycle_consistency`.

    For point ``i`` with query frame ``q``: the LAST frame ``t > q`` with ``visible[i, t]``; if
    there is none, the FIRST frame ``t < q`` with ``visible[i, t]`` (a point that is only seen
    before its query frame is checked backward-then-forward); if there is none either, ``-1``.

    Returns int64 ``(N,)``.
    """
    vis = np.asarray(visible, dtype=bool)
    n, t = vis.shape
    q = np.asarray(query_frames).astype(np.int64)
    frames = np.arange(t)[None, :]
    after = vis & (frames > q[:, None])
    before = vis & (frames < q[:, None])
    last_after = np.where(after.any(1), t - 1 - np.argmax(after[:, ::-1], axis=1), -1)
    first_before = np.where(before.any(1), np.argmax(before, axis=1), -1)
    return np.where(last_after >= 0, last_after, first_before).astype(np.int64)


def cycle_consistency(
    tracker: Tracker, frames: np.ndarray, result: TrackResult, queries: np.ndarray
) -> np.ndarray:
    """Forward-backward cycle error of each track, in pixels; float64 ``(N,)``.

    Procedure, for point ``i`` with query ``(q, x, y)``:

    1. ``c`` = its cycle frame (:func:`cycle_frames`): the last frame after ``q`` where
       ``result.visible`` is True (else the first visible frame before ``q``).
    2. A new query ``(c, result.tracks[i, c])`` is tracked by ``tracker`` on the clip
       ``frames[lo : hi + 1]``, where ``lo``/``hi`` are the smallest/largest of all ``q`` and
       ``c`` (one batched call for all points; query frames are shifted by ``-lo``). A tracker
       is deterministic, so the clip gives the same answer as the full video would for a
       frame-to-frame tracker; a global tracker sees only the frames it needs.
    3. The error is ``|p_back(q) - (x, y)|``, the Euclidean distance at the query frame between
       the back-tracked position and the original query point.

    The error is NaN when it cannot be computed: the point is visible in no frame other than
    its query frame, its position at ``c`` lies outside the image (a tracker may report that),
    or the back-track does not reach the query frame (it reports the point not visible at
    ``q``, e.g. lost on the way back). :func:`track_flags` treats NaN as a failure.
    """
    q = np.asarray(queries, dtype=np.float64)
    n = q.shape[0]
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"queries must have shape (N, 3) as (t, x, y), got {q.shape}")
    num_frames, height, width = frames.shape[:3]
    if result.tracks.shape != (n, num_frames, 2) or result.visible.shape != (n, num_frames):
        raise ValueError(
            f"result has shape {result.tracks.shape} / {result.visible.shape}, expected "
            f"{(n, num_frames, 2)} / {(n, num_frames)} for {n} queries and {num_frames} frames"
        )
    err = np.full(n, np.nan)
    if n == 0:
        return err
    tq = q[:, 0].astype(np.int64)
    tc = cycle_frames(result.visible, tq)
    rows = np.arange(n)
    start = result.tracks[rows, np.maximum(tc, 0)].astype(np.float32)
    inside = (start[:, 0] >= 0) & (start[:, 0] < width) & (start[:, 1] >= 0)
    inside &= start[:, 1] < height
    ok = (tc >= 0) & inside & np.all(np.isfinite(start), axis=1)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return err
    lo = int(min(tq[idx].min(), tc[idx].min()))
    hi = int(max(tq[idx].max(), tc[idx].max()))
    back_q = np.empty((idx.size, 3), np.float32)
    back_q[:, 0] = tc[idx] - lo
    back_q[:, 1:] = start[idx]
    back = tracker.track(frames[lo : hi + 1], back_q)
    r = np.arange(idx.size)
    at_q = tq[idx] - lo
    reached = np.asarray(back.visible)[r, at_q]
    p = np.asarray(back.tracks, dtype=np.float64)[r, at_q]
    d = np.linalg.norm(p - q[idx, 1:3], axis=1)
    err[idx] = np.where(reached & np.isfinite(d), d, np.nan)
    return err


# --- per-track statistics ---------------------------------------------------------------------


def _check_tracks(tracks: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(tracks, dtype=np.float64)
    v = np.asarray(visible)
    if p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"tracks must have shape (N, T, 2), got {p.shape}")
    if v.dtype != np.bool_ or v.shape != p.shape[:2]:
        raise ValueError(f"visible must be bool of shape {p.shape[:2]}, got {v.dtype} {v.shape}")
    return p, v


def visible_fraction(visible: np.ndarray) -> np.ndarray:
    """Fraction of all frames in which each track is visible; float64 ``(N,)``."""
    v = np.asarray(visible, dtype=bool)
    if v.ndim != 2:
        raise ValueError(f"visible must have shape (N, T), got {v.shape}")
    if v.shape[1] == 0:
        return np.zeros(v.shape[0])
    return v.mean(axis=1)


def track_motion(tracks: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Bounding-box diagonal of each track's visible positions, px; float64 ``(N,)``."""
    p, v = _check_tracks(tracks, visible)
    lo = np.where(v[..., None], p, np.inf).min(axis=1)
    hi = np.where(v[..., None], p, -np.inf).max(axis=1)
    ext = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
    return np.hypot(ext[:, 0], ext[:, 1])


def track_jitter(tracks: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Largest second-difference norm over visible triples, px/frame^2; float64 ``(N,)``."""
    p, v = _check_tracks(tracks, visible)
    if p.shape[1] < 3:
        return np.zeros(p.shape[0])
    acc = p[:, :-2] - 2.0 * p[:, 1:-1] + p[:, 2:]
    norm = np.linalg.norm(acc, axis=-1)
    triple = v[:, :-2] & v[:, 1:-1] & v[:, 2:]
    norm = np.where(triple, norm, 0.0)
    return norm.max(axis=1)


def track_flags(
    tracks: np.ndarray,
    visible: np.ndarray,
    cycle_error: np.ndarray | None,
    cfg: QCConfig | None = None,
) -> dict[str, np.ndarray]:
    """Per-track failure flags (True = fails), see the module docstring.

    Returns a dict with a bool ``(N,)`` array for each name in :data:`FLAG_NAMES` and
    ``"kept"`` (no flag fired). ``cycle_error`` None means the cycle check was not run (the
    ``"cycle"`` flag is then all False).
    """
    cfg = QCConfig() if cfg is None else cfg
    p, v = _check_tracks(tracks, visible)
    n = p.shape[0]
    if cycle_error is None:
        cycle = np.zeros(n, bool)
    else:
        ce = np.asarray(cycle_error, dtype=np.float64)
        if ce.shape != (n,):
            raise ValueError(f"cycle_error must have shape ({n},), got {ce.shape}")
        cycle = ~(ce <= cfg.cycle_threshold)  # NaN fails
    flags = {
        "cycle": cycle,
        "visible_fraction": visible_fraction(v) < cfg.min_visible_fraction,
        "motion": track_motion(p, v) < cfg.min_motion,
        "jitter": (
            track_jitter(p, v) > cfg.max_jitter if cfg.max_jitter is not None else np.zeros(n, bool)
        ),
    }
    failed = np.zeros(n, bool)
    for name in FLAG_NAMES:
        failed |= flags[name]
    flags["kept"] = ~failed
    return flags


_FLAG_TEXT = {
    "cycle": "cycle error > {cycle_threshold} px or not verifiable",
    "visible_fraction": "visible in < {min_visible_fraction} of the frames",
    "motion": "moves < {min_motion} px",
    "jitter": "jitter > {max_jitter} px/frame^2",
}


def video_verdict(flags: dict[str, np.ndarray], cfg: QCConfig | None = None) -> dict[str, Any]:
    """Accept or reject a video from its track flags; a JSON-serialisable dict.

    Keys: ``"verdict"`` (``"accepted"`` or ``"rejected"``), ``"reasons"`` (list of sentences;
    empty when accepted; when rejected the first one states the kept fraction, then one per flag
    that fired, most frequent first), ``"kept_fraction"`` (float; 0.0 for a video without
    tracks), ``"num_tracks"``, ``"num_kept"`` and ``"counts"`` (``{flag: number of tracks
    failing it}`` for every name in :data:`FLAG_NAMES`; a track can fail several).
    """
    cfg = QCConfig() if cfg is None else cfg
    missing = [k for k in FLAG_NAMES if k not in flags]
    if missing:
        raise ValueError(f"flags lacks {missing}")
    n = int(np.asarray(flags[FLAG_NAMES[0]]).shape[0])
    counts = {k: int(np.count_nonzero(flags[k])) for k in FLAG_NAMES}
    if "kept" in flags:
        kept = np.asarray(flags["kept"], dtype=bool)
    else:
        kept = ~np.any([np.asarray(flags[k], dtype=bool) for k in FLAG_NAMES], axis=0)
    num_kept = int(np.count_nonzero(kept)) if n else 0
    frac = num_kept / n if n else 0.0
    reasons: list[str] = []
    if n == 0:
        reasons.append("no tracks")
    elif frac < cfg.min_kept_fraction:
        reasons.append(
            f"kept {num_kept}/{n} tracks ({frac:.1%}) < min_kept_fraction "
            f"{cfg.min_kept_fraction:.1%}"
        )
        params = cfg.to_dict()
        order = sorted((k for k in FLAG_NAMES if counts[k]), key=lambda k: -counts[k])
        for k in order:
            reasons.append(f"{k}: {counts[k]}/{n} tracks {_FLAG_TEXT[k].format(**params)}")
    return {
        "verdict": "rejected" if reasons else "accepted",
        "reasons": reasons,
        "kept_fraction": float(frac),
        "num_tracks": n,
        "num_kept": num_kept,
        "counts": counts,
    }


def run_qc(
    tracker: Tracker,
    frames: np.ndarray,
    result: TrackResult,
    queries: np.ndarray,
    cfg: QCConfig | None = None,
) -> QCResult:
    """All checks on one video: cycle consistency (unless ``cfg.check_cycle`` is False),
    flags and verdict. ``result`` is ``tracker.track(frames, queries)``."""
    cfg = QCConfig() if cfg is None else cfg
    n = int(np.asarray(queries).shape[0])
    if cfg.check_cycle:
        cycle_error = cycle_consistency(tracker, frames, result, queries)
        flags = track_flags(result.tracks, result.visible, cycle_error, cfg)
    else:
        cycle_error = np.full(n, np.nan)
        flags = track_flags(result.tracks, result.visible, None, cfg)
    kept = flags.pop("kept")
    verdict = video_verdict({**flags, "kept": kept}, cfg)
    return QCResult(kept=kept, flags=flags, cycle_error=cycle_error, verdict=verdict)
