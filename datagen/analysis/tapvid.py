"""TAP-Vid point-tracking metrics, computed against exact ground truth.

This is an independent numpy implementation of the metrics defined by the TAP-Vid benchmark
(Doersch et al., 2022): occlusion accuracy, position accuracy ``< delta`` for
``delta in (1, 2, 4, 8, 16)`` and the Jaccard-style metric that combines both.

Conventions used throughout this module:

* Points are ``(x, y)`` in **raster coordinates**: ``(0, 0)`` is the top-left corner of the
  top-left pixel, pixel centres sit at ``+0.5`` and an image of height ``H`` and width ``W``
  spans ``[0, W] x [0, H]``. Thresholds are in pixels of the evaluation resolution, which is
  256x256 for the benchmark; use :func:`rescale_points` (or :func:`evaluate_tracks`) to get
  there.
* Sizes are given as ``(height, width)``.
* ``N`` is the number of tracks (query points), ``T`` the number of frames.

Per video, with ``E`` the evaluation mask (see :func:`evaluation_mask`), ``v`` the ground-truth
visibility, ``v'`` the predicted visibility and ``d`` the Euclidean distance between the
predicted and ground-truth points:

* ``occlusion_accuracy = sum(E * [v' == v]) / sum(E)``
* ``within_delta = sum(E * v * [d < delta]) / sum(E * v)`` (strictly less than)
* ``jaccard_delta = TP / (sum(E * v) + FP)`` with ``TP = sum(E * v * v' * [d < delta])`` and
  ``FP = sum(E * v' * (not v or not d < delta))``
* ``delta_avg`` and ``average_jaccard`` are the means over ``DELTAS`` of ``within_delta`` and
  ``jaccard_delta``.

Benchmark numbers are the means of the per-video values over videos, in percent
(:func:`evaluate_videos`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DELTAS: tuple[int, ...] = (1, 2, 4, 8, 16)
"""Pixel thresholds (at the evaluation resolution) for position accuracy and Jaccard."""

EVAL_MODES: tuple[str, ...] = ("first", "strided")
"""Valid values of the ``mode`` argument."""


def _fraction_keys() -> tuple[str, ...]:
    """Names of the per-video metrics that are fractions in ``[0, 1]``."""
    return (
        ("occlusion_accuracy",)
        + tuple(f"within_{d}" for d in DELTAS)
        + tuple(f"jaccard_{d}" for d in DELTAS)
        + ("delta_avg", "average_jaccard")
    )


def _check_hw(hw: Sequence[int], name: str) -> tuple[int, int]:
    """Validate a ``(height, width)`` pair of positive sizes and return it as a tuple."""
    if len(hw) != 2:
        raise ValueError(f"{name} must be (height, width), got {hw!r}")
    h, w = hw
    if not (h > 0 and w > 0):
        raise ValueError(f"{name} must hold positive sizes, got {hw!r}")
    return h, w


def rescale_points(
    points: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]
) -> np.ndarray:
    """Rescale raster-coordinate points from one image size to another.

    Because raster coordinates put ``(0, 0)`` at the top-left *corner* of the image, rescaling
    is a pure scaling with no half-pixel offset: ``x' = x * W2 / W1`` and ``y' = y * H2 / H1``.
    The image corner ``(W1, H1)`` maps to ``(W2, H2)`` and a pixel centre maps to the centre of
    the corresponding region.

    Args:
      points: array of shape ``(..., 2)``, any real dtype; the last dimension is ``(x, y)`` in
        raster coordinates of an image of size ``from_hw``.
      from_hw: ``(H1, W1)``, the size of the image the points are given in.
      to_hw: ``(H2, W2)``, the size to rescale to.

    Returns:
      Array of the same shape as ``points``, ``(..., 2)``, with ``(x, y)`` in raster
      coordinates of an image of size ``to_hw``. The dtype is that of ``points`` if it is
      float32 or float64, otherwise float64 (float16 gives float32).

    Raises:
      ValueError: if the last dimension of ``points`` is not 2 or a size is not positive.
    """
    points = np.asarray(points)
    if points.ndim < 1 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) with (x, y) last, got {points.shape}")
    h1, w1 = _check_hw(from_hw, "from_hw")
    h2, w2 = _check_hw(to_hw, "to_hw")
    dtype = np.result_type(points.dtype, np.float32)
    if not np.issubdtype(points.dtype, np.floating):
        dtype = np.dtype(np.float64)
    scale = np.array([w2 / w1, h2 / h1], dtype=np.float64)
    return (points.astype(np.float64) * scale).astype(dtype)


def query_frames_first(gt_visible: np.ndarray) -> np.ndarray:
    """Query frame of each track for TAP-Vid "first" mode: its first visible frame.

    Args:
      gt_visible: bool array of shape ``(N, T)``, ground-truth visibility (True = visible).

    Returns:
      int64 array of shape ``(N,)``: the index of the first frame where the track is visible,
      or ``-1`` for a track that is never visible.

    Raises:
      ValueError: if ``gt_visible`` is not 2-D or not boolean / integer.
    """
    vis = _as_bool(gt_visible, "gt_visible")
    if vis.ndim != 2:
        raise ValueError(f"gt_visible must have shape (N, T), got {vis.shape}")
    first = np.argmax(vis, axis=1).astype(np.int64)
    first[~vis.any(axis=1)] = -1
    return first


def evaluation_mask(query_frames: np.ndarray, num_frames: int, mode: str) -> np.ndarray:
    """Frames at which each track is evaluated.

    * ``"first"``: the frames strictly after the query frame.
    * ``"strided"``: every frame except the query frame (before and after it).

    A track whose query frame is ``-1`` (never visible, see :func:`query_frames_first`) gets an
    all-False row in both modes.

    Args:
      query_frames: integer array of shape ``(N,)``, the query frame of each track, each in
        ``[-1, num_frames - 1]``.
      num_frames: ``T``, the number of frames of the video.
      mode: ``"first"`` or ``"strided"``.

    Returns:
      bool array of shape ``(N, T)``; True where the track is evaluated.

    Raises:
      ValueError: for an unknown ``mode``, a ``query_frames`` that is not a 1-D integer array,
        or a query frame outside ``[-1, num_frames - 1]``.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    if int(num_frames) != num_frames or num_frames < 0:
        raise ValueError(f"num_frames must be a non-negative integer, got {num_frames!r}")
    q = np.asarray(query_frames)
    if q.ndim != 1:
        raise ValueError(f"query_frames must have shape (N,), got {q.shape}")
    if q.size and not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"query_frames must be integers, got dtype {q.dtype}")
    q = q.astype(np.int64)
    if q.size and (q.min() < -1 or q.max() >= num_frames):
        raise ValueError(
            f"query_frames must lie in [-1, {int(num_frames) - 1}], "
            f"got values in [{q.min()}, {q.max()}]"
        )
    t = np.arange(int(num_frames), dtype=np.int64)[None, :]
    qc = q[:, None]
    mask = t > qc if mode == "first" else t != qc
    return mask & (qc >= 0)


def _as_bool(x: np.ndarray, name: str) -> np.ndarray:
    """Convert a bool or integer (0/1) array to bool; reject floats (e.g. probabilities)."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1 integers")
        return arr.astype(bool)
    raise ValueError(
        f"{name} must be a boolean array (threshold probabilities first), got dtype {arr.dtype}"
    )


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a Python float, NaN when ``den == 0``."""
    return float(num) / float(den) if den != 0 else float("nan")


def tapvid_metrics(
    pred_tracks: np.ndarray,
    pred_visible: np.ndarray,
    gt_tracks: np.ndarray,
    gt_visible: np.ndarray,
    query_frames: np.ndarray,
    mode: str = "first",
) -> dict[str, float]:
    """TAP-Vid metrics for ONE video.

    All coordinates must already be at the evaluation resolution (256x256 for the benchmark;
    see :func:`rescale_points`), because the thresholds ``DELTAS`` are in pixels.

    Args:
      pred_tracks: float array of shape ``(N, T, 2)``, predicted ``(x, y)`` positions in raster
        coordinates (``(0, 0)`` = top-left corner of the top-left pixel, pixel centres at
        ``+0.5``). Non-finite predictions never count as within any threshold.
      pred_visible: bool array of shape ``(N, T)``, predicted visibility (True = visible).
        Integer 0/1 arrays are accepted; float arrays are rejected.
      gt_tracks: float array of shape ``(N, T, 2)``, ground-truth ``(x, y)`` positions, same
        convention. Only read where ``gt_visible`` is True.
      gt_visible: bool array of shape ``(N, T)``, ground-truth visibility.
      query_frames: integer array of shape ``(N,)``, the query frame of each track in
        ``[-1, T - 1]`` (``-1``: track not evaluated). In "first" mode this is the first
        visible frame, see :func:`query_frames_first`.
      mode: ``"first"`` (evaluate the frames after the query frame) or ``"strided"`` (every
        frame except the query frame); see :func:`evaluation_mask`.

    Returns:
      Dict of Python floats. Fractions in ``[0, 1]`` (not percent):
      ``"occlusion_accuracy"``, ``"within_{d}"`` and ``"jaccard_{d}"`` for each ``d`` in
      ``DELTAS``, ``"delta_avg"`` (mean of the ``within_{d}``) and ``"average_jaccard"`` (mean
      of the ``jaccard_{d}``); and the count ``"num_eval_points"`` (``sum(E * v)``, the number
      of evaluated visible ground-truth points). A ratio whose denominator is zero is NaN:
      occlusion accuracy when no frame is evaluated, ``within_{d}`` / ``delta_avg`` when no
      evaluated ground-truth point is visible, ``jaccard_{d}`` / ``average_jaccard`` when in
      addition no evaluated point is predicted visible.

    Raises:
      ValueError: on inconsistent or malformed shapes, non-boolean visibility, query frames
        out of range or an unknown mode.
    """
    pred_tracks = np.asarray(pred_tracks)
    gt_tracks = np.asarray(gt_tracks)
    pred_vis = _as_bool(pred_visible, "pred_visible")
    gt_vis = _as_bool(gt_visible, "gt_visible")
    query_frames = np.asarray(query_frames)

    if gt_tracks.ndim != 3 or gt_tracks.shape[-1] != 2:
        raise ValueError(f"gt_tracks must have shape (N, T, 2), got {gt_tracks.shape}")
    n, t = gt_tracks.shape[:2]
    if pred_tracks.shape != gt_tracks.shape:
        raise ValueError(
            f"pred_tracks shape {pred_tracks.shape} != gt_tracks shape {gt_tracks.shape} "
            "(expected (N, T, 2))"
        )
    for name, arr in (("pred_visible", pred_vis), ("gt_visible", gt_vis)):
        if arr.shape != (n, t):
            raise ValueError(f"{name} must have shape (N, T) = {(n, t)}, got {arr.shape}")
    if query_frames.shape != (n,):
        raise ValueError(f"query_frames must have shape (N,) = {(n,)}, got {query_frames.shape}")

    evalm = evaluation_mask(query_frames, t, mode)
    diff = pred_tracks.astype(np.float64) - gt_tracks.astype(np.float64)
    sq_dist = np.sum(np.square(diff), axis=-1)  # (N, T); NaN for non-finite input

    eval_vis = evalm & gt_vis
    num_vis = int(np.count_nonzero(eval_vis))
    out: dict[str, float] = {
        "occlusion_accuracy": _ratio(
            np.count_nonzero(evalm & (pred_vis == gt_vis)), np.count_nonzero(evalm)
        )
    }
    jaccards = {}
    for delta in DELTAS:
        # d < delta  <=>  d^2 < delta^2 for d >= 0; NaN compares False (never within).
        within = sq_dist < float(delta) ** 2
        out[f"within_{delta}"] = _ratio(np.count_nonzero(eval_vis & within), num_vis)
        tp = np.count_nonzero(eval_vis & pred_vis & within)
        fp = np.count_nonzero(evalm & pred_vis & ~(gt_vis & within))
        jaccards[f"jaccard_{delta}"] = _ratio(tp, num_vis + fp)
    out.update(jaccards)
    out["delta_avg"] = float(np.mean([out[f"within_{d}"] for d in DELTAS]))
    out["average_jaccard"] = float(np.mean([out[f"jaccard_{d}"] for d in DELTAS]))
    out["num_eval_points"] = float(num_vis)
    return out


def evaluate_videos(per_video: Sequence[dict[str, float]]) -> dict[str, float]:
    """Aggregate per-video :func:`tapvid_metrics` results into benchmark numbers.

    Each fractional metric (``occlusion_accuracy``, ``within_{d}``, ``jaccard_{d}``,
    ``delta_avg``, ``average_jaccard``) is averaged over videos ignoring NaN (a video with no
    evaluable point for that metric does not count) and multiplied by 100, i.e. reported in
    **percent**. A metric that is NaN in every video stays NaN.

    Args:
      per_video: non-empty sequence of dicts as returned by :func:`tapvid_metrics`; keys other
        than the ones listed here are ignored.

    Returns:
      Dict of Python floats: the fractional metrics in percent (``[0, 100]`` or NaN);
      ``"num_eval_points"``, the **total** (sum, not mean) of the per-video counts; and
      ``"num_videos"``, the number of dicts given.

    Raises:
      ValueError: if ``per_video`` is empty or a dict lacks a metric.
    """
    if len(per_video) == 0:
        raise ValueError("per_video is empty: need at least one video's metrics")
    keys = _fraction_keys() + ("num_eval_points",)
    for i, m in enumerate(per_video):
        missing = [k for k in keys if k not in m]
        if missing:
            raise ValueError(f"per_video[{i}] lacks metric(s) {missing}")
    out: dict[str, float] = {}
    for key in _fraction_keys():
        vals = np.array([m[key] for m in per_video], dtype=np.float64)
        finite = vals[~np.isnan(vals)]
        out[key] = float(100.0 * finite.mean()) if finite.size else float("nan")
    out["num_eval_points"] = float(sum(float(m["num_eval_points"]) for m in per_video))
    out["num_videos"] = float(len(per_video))
    return out


def evaluate_tracks(
    pred_tracks: np.ndarray,
    pred_visible: np.ndarray,
    gt_tracks: np.ndarray,
    gt_visible: np.ndarray,
    video_hw: tuple[int, int],
    mode: str = "first",
    query_frames: np.ndarray | None = None,
    eval_hw: tuple[int, int] = (256, 256),
) -> dict[str, float]:
    """TAP-Vid metrics for one video whose tracks are at the video's own resolution.

    Rescales both predicted and ground-truth tracks from ``video_hw`` to ``eval_hw`` (see
    :func:`rescale_points`), derives the query frames with :func:`query_frames_first` when
    ``query_frames`` is None, and returns :func:`tapvid_metrics`.

    Args:
      pred_tracks: float array of shape ``(N, T, 2)``, predicted ``(x, y)`` in raster
        coordinates of a ``video_hw`` image.
      pred_visible: bool array of shape ``(N, T)``, predicted visibility.
      gt_tracks: float array of shape ``(N, T, 2)``, ground-truth ``(x, y)``, same convention.
      gt_visible: bool array of shape ``(N, T)``, ground-truth visibility.
      video_hw: ``(H, W)`` of the video the tracks are given in.
      mode: ``"first"`` or ``"strided"``.
      query_frames: integer array of shape ``(N,)`` or None (first visible frame of each track;
        ``-1``, i.e. not evaluated, for a never-visible track).
      eval_hw: ``(H, W)`` of the evaluation resolution; the thresholds are pixels at it.

    Returns:
      The dict of :func:`tapvid_metrics` (fractions in ``[0, 1]``, ``num_eval_points``).

    Raises:
      ValueError: as :func:`rescale_points` and :func:`tapvid_metrics`.
    """
    pred = rescale_points(pred_tracks, video_hw, eval_hw)
    gt = rescale_points(gt_tracks, video_hw, eval_hw)
    if query_frames is None:
        query_frames = query_frames_first(gt_visible)
    return tapvid_metrics(pred, pred_visible, gt, gt_visible, query_frames, mode=mode)
