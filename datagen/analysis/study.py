"""The paper's layer x step study (DiffTrack, arXiv 2506.17220), as pure functions over arrays.

One video contributes, for every captured (layer, step), sums that pool over videos: the
matching hits, the confidence and the attention split. Definitions (README, "Analyse a build"):

* **Scored pairs.** A frame-0 query point ``n`` and a token frame ``j >= 1`` form a pair when
  the point is visible on the token frame's anchor video frame (the last video frame it encodes,
  :meth:`TokenLayout.anchor_video_frame`) and its label there lies inside the image. The pair's
  label is the track's raster position on that video frame.
* **Forward matching accuracy** (the paper's): the argmax token of frame ``j`` for the point's
  frame-0 token (``match_forward``), mapped to its centre in raster pixels through the layout,
  is correct when its Euclidean distance to the label is strictly below the threshold: the
  paper's 8 px at 480x720, scaled by ``sqrt(H * W / (480 * 720))`` (:func:`threshold_px`).
  ``one token``: correct when within one token width in x and one token height in y (the
  README's earlier definition, about 2 x 2 tokens around the label). ``moved`` restricts the
  one-token accuracy to points that moved at least one token from frame 0 (what ``datagen
  analyse`` printed before the report existed).
* **Reverse matching accuracy**: the label's token on frame ``j``, matched back to frame 0
  (``match_reverse``), against the point's frame-0 position; same thresholds.
* **Confidence**: mean over scored pairs of ``confidence[n, j]``, the largest head-averaged
  full-sequence attention probability the query gives a token of frame ``j``.
* **Attention split**: mean over the video's frame-0 points of the full-sequence attention
  mass on text, on the query's own frame and on the other frames (they sum to 1).
* **Harmonic-mean ranking** (the paper's ``harmonic_mean.py``): accuracy, confidence and
  cross-frame mass are each min-max normalised over the whole layer x step table, and a cell's
  score is their harmonic mean (0 when any is 0). A layer's score is the mean of its cells.

Everything is pooled over points (a video with more points weighs more), as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datagen.layout import TokenLayout

PAPER_HW = (480, 720)
"""(height, width) the paper's threshold is given at."""
PAPER_THRESHOLD_PX = 8.0
"""The paper's matching threshold, pixels at :data:`PAPER_HW`."""

STATS = (
    "pairs",
    "hit_px",
    "hit_token",
    "moved_pairs",
    "hit_token_moved",
    "rev_hit_px",
    "rev_hit_token",
    "conf_sum",
    "points",
    "mass_text_sum",
    "mass_own_sum",
    "mass_other_sum",
)
"""The sums one video adds per (layer, step), in this order along the last axis."""
S = {name: i for i, name in enumerate(STATS)}
_MATCH = STATS[:7]
"""The matching fields; a tracker without attention (a baseline, q/k without text keys) leaves
the others NaN, and a field never computed (reverse matches from q/k) stays NaN when pooled."""


def threshold_px(layout: TokenLayout, reference_px: float = PAPER_THRESHOLD_PX) -> float:
    """The matching threshold in pixels of this layout's video: ``reference_px`` (pixels at
    480x720) scaled by the square root of the pixel-count ratio (exact for the same aspect
    ratio, the geometric mean of the two axis scales otherwise)."""
    if not reference_px > 0:
        raise ValueError(f"the matching threshold must be positive, got {reference_px}")
    scale = np.sqrt(layout.height * layout.width / (PAPER_HW[0] * PAPER_HW[1]))
    return float(reference_px * scale)


@dataclass(frozen=True)
class Pairs:
    """The scored (point, token frame) pairs of one video; K pairs."""

    point: np.ndarray
    """(K,) int64: row among the video's frame-0 queries."""
    frame: np.ndarray
    """(K,) int64: token frame j >= 1."""
    video_frame: np.ndarray
    """(K,) int64: the anchor video frame of ``frame``, where the label is read."""
    label: np.ndarray
    """(K, 2) float64: the track's raster (x, y) there."""
    moved: np.ndarray
    """(K,) bool: the label is at least one token from the point's frame-0 position (x or y)."""


def scored_pairs(tracks: np.ndarray, visible: np.ndarray, layout: TokenLayout) -> Pairs:
    """The pairs of the definitions above, from frame-0 tracks (N, T, 2) raster and visibility
    (N, T) bool on video frames."""
    tracks = np.asarray(tracks, np.float64)
    visible = np.asarray(visible, bool)
    th, tw = layout.token_pixel_size
    cols: list[tuple[np.ndarray, int, int]] = []
    for j in range(1, layout.token_grid[0]):
        vf = layout.anchor_video_frame(j)
        if vf is None or vf >= tracks.shape[1]:
            continue
        xy = tracks[:, vf]
        inside = (
            (xy[:, 0] >= 0)
            & (xy[:, 0] < layout.width)
            & (xy[:, 1] >= 0)
            & (xy[:, 1] < layout.height)
        )
        cols.append((np.flatnonzero(visible[:, vf] & inside), j, vf))
    point = np.concatenate([c[0] for c in cols]) if cols else np.zeros(0, np.int64)
    frame = np.concatenate([np.full(c[0].size, c[1]) for c in cols]) if cols else point.copy()
    vframe = np.concatenate([np.full(c[0].size, c[2]) for c in cols]) if cols else point.copy()
    label = tracks[point, vframe] if point.size else np.zeros((0, 2))
    d = np.abs(label - tracks[point, 0]) if point.size else np.zeros((0, 2))
    moved = (d[:, 0] >= tw) | (d[:, 1] >= th)
    return Pairs(
        point.astype(np.int64), frame.astype(np.int64), vframe.astype(np.int64), label, moved
    )


def hits(
    predicted: np.ndarray, label: np.ndarray, layout: TokenLayout, thr_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """(within the pixel threshold, within one token) of raster predictions vs labels (K, 2):
    Euclidean distance ``< thr_px``; ``|dx| <= token width`` and ``|dy| <= token height``."""
    th, tw = layout.token_pixel_size
    err = np.asarray(predicted, np.float64) - np.asarray(label, np.float64)
    px = np.hypot(err[:, 0], err[:, 1]) < thr_px
    tok = (np.abs(err[:, 0]) <= tw) & (np.abs(err[:, 1]) <= th)
    return px, tok


def match_sums(
    match_forward: np.ndarray,
    pairs: Pairs,
    layout: TokenLayout,
    thr_px: float,
    match_reverse: np.ndarray | None = None,
    query_xy: np.ndarray | None = None,
) -> np.ndarray:
    """One (layer, step)'s matching sums (len(STATS),) float64 for one video; the attention
    fields are NaN (see :func:`attention_sums`), and so are the reverse ones without
    ``match_reverse``.

    ``match_forward`` (N, F) token index (``row * w + col``) on each token frame for each
    frame-0 point; ``match_reverse`` (F, h*w) the frame-0 token each token matches back to,
    with ``query_xy`` (N, 2) the points' frame-0 raster positions (both or neither).
    """
    out = np.full(len(STATS), np.nan)
    out[[S[n] for n in _MATCH if not n.startswith("rev_")]] = 0
    if match_reverse is not None:
        out[[S["rev_hit_px"], S["rev_hit_token"]]] = 0
    out[S["pairs"]] = pairs.point.size
    out[S["moved_pairs"]] = pairs.moved.sum()
    if not pairs.point.size:
        return out
    m = np.asarray(match_forward)[pairs.point, pairs.frame]
    px, tok = hits(layout.centre_of_token_index(m), pairs.label, layout, thr_px)
    out[S["hit_px"]], out[S["hit_token"]] = px.sum(), tok.sum()
    out[S["hit_token_moved"]] = (tok & pairs.moved).sum()
    if match_reverse is not None:
        back = np.asarray(match_reverse)[pairs.frame, layout.token_index_of_pixel(pairs.label)]
        q = np.asarray(query_xy, np.float64)[pairs.point]
        px, tok = hits(layout.centre_of_token_index(back), q, layout, thr_px)
        out[S["rev_hit_px"]], out[S["rev_hit_token"]] = px.sum(), tok.sum()
    return out


def attention_sums(
    confidence: np.ndarray,
    mass_text: np.ndarray,
    mass_own: np.ndarray,
    mass_other: np.ndarray,
    pairs: Pairs,
) -> np.ndarray:
    """One (layer, step)'s confidence and attention-split sums (len(STATS),) for one video:
    ``confidence`` (N, F), masses (N,) of the frame-0 points; the matching fields are NaN."""
    out = np.full(len(STATS), np.nan)
    out[[S[n] for n in STATS if n not in _MATCH]] = 0
    if pairs.point.size:
        out[S["conf_sum"]] = np.asarray(confidence, np.float64)[pairs.point, pairs.frame].sum()
    out[S["points"]] = np.asarray(mass_text).size
    out[S["mass_text_sum"]] = np.asarray(mass_text, np.float64).sum()
    out[S["mass_own_sum"]] = np.asarray(mass_own, np.float64).sum()
    out[S["mass_other_sum"]] = np.asarray(mass_other, np.float64).sum()
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


METRICS = (
    "accuracy_px",
    "accuracy_token",
    "accuracy_token_moved",
    "reverse_accuracy_px",
    "reverse_accuracy_token",
    "confidence",
    "mass_text",
    "mass_own_frame",
    "mass_other_frames",
)
"""What :func:`metrics_of` derives from the sums, fractions in [0, 1] (NaN: nothing counted)."""


def metrics_of(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The study's metrics from pooled sums (..., len(STATS))."""
    g = {name: sums[..., i] for name, i in S.items()}
    return {
        "accuracy_px": _ratio(g["hit_px"], g["pairs"]),
        "accuracy_token": _ratio(g["hit_token"], g["pairs"]),
        "accuracy_token_moved": _ratio(g["hit_token_moved"], g["moved_pairs"]),
        "reverse_accuracy_px": _ratio(g["rev_hit_px"], g["pairs"]),
        "reverse_accuracy_token": _ratio(g["rev_hit_token"], g["pairs"]),
        "confidence": _ratio(g["conf_sum"], g["pairs"]),
        "mass_text": _ratio(g["mass_text_sum"], g["points"]),
        "mass_own_frame": _ratio(g["mass_own_sum"], g["points"]),
        "mass_other_frames": _ratio(g["mass_other_sum"], g["points"]),
    }


def min_max(table: np.ndarray) -> np.ndarray:
    """Min-max normalisation over the whole table, NaN cells ignored and kept; a table whose
    finite cells are all equal normalises to 1 there (no cell is worse than another)."""
    t = np.asarray(table, np.float64)
    finite = np.isfinite(t)
    if not finite.any():
        return t.copy()
    lo, hi = t[finite].min(), t[finite].max()
    if hi == lo:
        return np.where(finite, 1.0, np.nan)
    return (t - lo) / (hi - lo)


def harmonic_scores(
    accuracy: np.ndarray, confidence: np.ndarray, cross_frame: np.ndarray
) -> np.ndarray:
    """Per-cell harmonic mean of the three min-max normalised (layers, steps) tables; 0 where
    any normalised value is 0 (the paper maps its division by zero to 0), NaN where any is NaN."""
    parts = [min_max(accuracy), min_max(confidence), min_max(cross_frame)]
    stack = np.stack(parts)
    nan = np.isnan(stack).any(axis=0)
    zero = (stack <= 0).any(axis=0) & ~nan
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 3.0 / np.sum(1.0 / np.where(stack > 0, stack, 1.0), axis=0)
    return np.where(nan, np.nan, np.where(zero, 0.0, score))


def layer_ranking(scores: np.ndarray, layers: list[int]) -> list[tuple[int, float]]:
    """(layer, mean over its steps of the cell scores) from best to worst; layers with no
    finite cell last. Ties keep layer order."""
    means = [float(np.nanmean(row)) if np.isfinite(row).any() else float("nan") for row in scores]
    order = sorted(
        range(len(layers)), key=lambda i: (np.isnan(means[i]), -np.nan_to_num(means[i]), i)
    )
    return [(layers[i], means[i]) for i in order]
