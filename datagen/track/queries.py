"""Query-point sampling. All functions return float32 (N, 3) arrays of (t, x, y).

Coordinates are RASTER (TAP-Vid): (0, 0) is the top-left corner of the top-left pixel, pixel
centres sit at +0.5, and a point is inside an H x W image when 0 <= x < W and 0 <= y < H.
``t`` is an integer frame index stored as a float. Random choices use
``numpy.random.default_rng(seed)``, so equal arguments give equal outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "COTRACKER_RESOLUTION",
    "grid_queries",
    "random_queries",
    "sift_queries",
    "strided_queries",
    "restrict_to_mask",
    "first_frame_rows",
    "QuerySampler",
    "QUERY_METHODS",
]

# (height, width) at which CoTracker (v2/v3 predictor) builds its query grid.
COTRACKER_RESOLUTION = (384, 512)


def _check_size(height: int, width: int) -> tuple[int, int]:
    h, w = int(height), int(width)
    if h < 1 or w < 1 or h != height or w != width:
        raise ValueError(f"height and width must be positive integers, got {height}x{width}")
    return h, w


def _inside_float32(x: np.ndarray, limit: int) -> np.ndarray:
    """Clamp float values into [0, limit) so that they stay inside after the float32 cast."""
    top = np.nextafter(np.float32(limit), np.float32(0))
    return np.clip(x.astype(np.float32), np.float32(0), top)


def grid_queries(grid_size: int, height: int, width: int, frame: int = 0) -> np.ndarray:
    """A ``grid_size x grid_size`` grid of queries at ``frame``, identical to CoTracker's grid.

    CoTracker (``CoTrackerPredictor(..., grid_size=g)``) builds the grid at its model resolution
    (Hm, Wm) = (384, 512) with a margin m = Wm / 64 = 8 px, in pixel-centre coordinates::

        x_j = m + (Wm - 2m) * j / (g - 1),   y_i = m + (Hm - 2m) * i / (g - 1)

    (so 8 .. 504 in x and 8 .. 376 in y), and maps model coordinates back to the video with the
    ``align_corners=True`` scale ``(W - 1) / (Wm - 1)``, ``(H - 1) / (Hm - 1)``. Here, in
    raster coordinates::

        x = x_j * (W - 1) / 511 + 0.5,   y = y_i * (H - 1) / 383 + 0.5

    For g = 1 CoTracker uses the single point (Wm / 2, Hm / 2) = (256, 192). Order is row-major:
    y outer, x inner (point k = i * g + j).
    """
    g = int(grid_size)
    if g < 1 or g != grid_size:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    if int(frame) != frame or frame < 0:
        raise ValueError(f"frame must be a non-negative integer, got {frame!r}")
    h, w = _check_size(height, width)
    hm, wm = COTRACKER_RESOLUTION
    if g == 1:
        xs_m, ys_m = np.array([wm / 2.0]), np.array([hm / 2.0])
    else:
        margin = wm / 64.0
        xs_m = np.linspace(margin, wm - margin, g)
        ys_m = np.linspace(margin, hm - margin, g)
    xs = xs_m * ((w - 1) / (wm - 1)) + 0.5
    ys = ys_m * ((h - 1) / (hm - 1)) + 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out = np.empty((g * g, 3), np.float32)
    out[:, 0] = frame
    out[:, 1] = xx.ravel()
    out[:, 2] = yy.ravel()
    return out


def random_queries(
    n: int,
    height: int,
    width: int,
    num_frames: int,
    seed: int,
    frames: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """``n`` queries uniform in space (raster ``[0, W) x [0, H)``) and over frames.

    ``frames``: the frame indices to draw ``t`` from uniformly (with repetition); None means all
    of ``0 .. num_frames - 1``.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    h, w = _check_size(height, width)
    if int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if frames is None:
        choices = np.arange(int(num_frames))
    else:
        choices = np.asarray(frames, dtype=np.int64).reshape(-1)
        if choices.size == 0 or choices.min() < 0 or choices.max() >= num_frames:
            raise ValueError(f"frames must be a non-empty set of indices in [0, {num_frames})")
    rng = np.random.default_rng(seed)
    t = choices[rng.integers(0, choices.size, size=int(n))]
    x = rng.uniform(0.0, w, size=int(n))
    y = rng.uniform(0.0, h, size=int(n))
    out = np.empty((int(n), 3), np.float32)
    out[:, 0] = t
    out[:, 1] = _inside_float32(x, w)
    out[:, 2] = _inside_float32(y, h)
    return out


def sift_queries(frame_rgb: np.ndarray, n: int, frame: int = 0, seed: int = 0) -> np.ndarray:
    """Up to ``n`` SIFT keypoints of one uint8 (H, W, 3) RGB frame as queries at ``frame``.

    Keypoints (``cv2.SIFT_create`` on the grayscale frame) are ranked by response, strongest
    first (ties broken by position, so the order is deterministic); keypoints at the same
    location (SIFT repeats a location for each dominant orientation) count once. OpenCV's
    keypoint coordinates are pixel-centre based and are converted to raster (+0.5). If fewer than
    ``n`` distinct keypoints are found, the rest is filled with ``random_queries(seed=seed)``
    points at the same frame, appended after the keypoints; the result always has ``n`` rows.
    """
    img = np.asarray(frame_rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"frame_rgb must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    n = int(n)
    h, w = img.shape[:2]
    gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    keypoints = cv2.SIFT_create().detect(gray, None) if n else ()
    if keypoints:
        pts = np.array([(kp.response, kp.pt[0], kp.pt[1]) for kp in keypoints], np.float64)
        pts[:, 1:] += 0.5  # pixel-centre -> raster
        _, first = np.unique(pts[:, 1:], axis=0, return_index=True)
        pts = pts[np.sort(first)]
        order = np.lexsort((pts[:, 2], pts[:, 1], -pts[:, 0]))  # response desc, then x, y
        pts = pts[order[:n]]
        xy = np.stack([_inside_float32(pts[:, 1], w), _inside_float32(pts[:, 2], h)], axis=1)
    else:
        xy = np.zeros((0, 2), np.float32)
    out = np.empty((n, 3), np.float32)
    out[:, 0] = frame
    out[: len(xy), 1:] = xy
    missing = n - len(xy)
    if missing:
        fill = random_queries(missing, h, w, num_frames=int(frame) + 1, seed=seed, frames=[frame])
        out[len(xy) :, 1:] = fill[:, 1:]
    return out


def strided_queries(base: np.ndarray, num_frames: int, stride: int) -> np.ndarray:
    """Repeat the point set ``base`` (M, 2) of (x, y) at frames 0, stride, 2*stride, ... .

    Frame-major order: all M points at frame 0, then all at frame ``stride``, and so on
    (frames ``< num_frames``), so the result has M * ceil(num_frames / stride) rows.
    """
    xy = np.asarray(base, dtype=np.float32)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"base must have shape (M, 2) as (x, y), got {xy.shape}")
    if int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    starts = np.arange(0, int(num_frames), int(stride))
    out = np.empty((starts.size * xy.shape[0], 3), np.float32)
    out[:, 0] = np.repeat(starts, xy.shape[0])
    out[:, 1:] = np.tile(xy, (starts.size, 1))
    return out


def restrict_to_mask(queries: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keep the queries whose pixel lies in ``mask`` (H, W) bool; order is preserved.

    A query's pixel is (row, col) = (floor(y), floor(x)) of its raster coordinates; queries
    outside the image are dropped.
    """
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"queries must have shape (N, 3) as (t, x, y), got {q.shape}")
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != np.bool_:
        raise ValueError(f"mask must be a bool (H, W) array, got {m.dtype} {m.shape}")
    h, w = m.shape
    col = np.floor(q[:, 1])
    row = np.floor(q[:, 2])
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    keep = np.zeros(q.shape[0], bool)
    keep[ok] = m[row[ok].astype(np.int64), col[ok].astype(np.int64)]
    return q[keep]


QUERY_METHODS = ("grid", "random", "sift", "strided")
MASK_MODES = ("", "objects")


def first_frame_rows(queries: np.ndarray) -> np.ndarray:
    """Indices of the queries on frame 0 (``t == 0``), in order: the points the online
    correspondence is computed for."""
    return np.flatnonzero(np.asarray(queries)[:, 0] == 0)


@dataclass(frozen=True)
class QuerySampler:
    """Which points the tracker labels in each video.

    ``method``:
      * ``grid``: CoTracker's ``grid_size`` x ``grid_size`` grid on frame 0 (the paper's sets:
        20 x 20 restricted to a first-frame object mask, and 10 x 10 over the whole frame);
      * ``random``: ``num_queries`` points uniform over frame 0, drawn from the video's seed;
      * ``sift``: the ``num_queries`` strongest SIFT keypoints of frame 0 (topped up with
        random points when the frame has fewer), so it needs the video;
      * ``strided``: the grid repeated every ``stride`` frames (TAP-Vid's strided mode; the
        tracker follows later-frame queries both ways).

    ``mask = 'objects'`` keeps the frame-0 queries on the first frame's object mask (the
    paper's object-centric set); it needs a mask (synthetic videos carry one, video files one
    beside them).
    """

    method: str = "grid"
    grid_size: int = 10
    num_queries: int = 400
    stride: int = 8
    mask: str = ""

    def __post_init__(self) -> None:
        if self.method not in QUERY_METHODS:
            known = ", ".join(QUERY_METHODS)
            raise ValueError(f"query method '{self.method}' is not one of {known}")
        if self.mask not in MASK_MODES:
            raise ValueError(f"query mask '{self.mask}' is not one of '', 'objects'")
        for name in ("grid_size", "num_queries", "stride"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.mask and self.method == "strided":
            raise ValueError("a first-frame object mask cannot restrict strided queries")

    @property
    def needs_video(self) -> bool:
        """True when the points depend on the frames (known only after generation)."""
        return self.method == "sift"

    def max_points(self, num_frames: int) -> int:
        """Upper bound on the query count of one video (for size estimates)."""
        if self.method in ("random", "sift"):
            return self.num_queries
        if self.method == "strided":
            return self.grid_size**2 * -(-int(num_frames) // self.stride)
        return self.grid_size**2

    def sample(
        self,
        height: int,
        width: int,
        num_frames: int,
        seed: int,
        first_frame: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """The (N, 3) (t, x, y) raster queries of one video.

        ``seed``: the video's seed (random points differ per video, reproducibly);
        ``first_frame``: uint8 (H, W, 3), required by ``sift``; ``mask``: bool (H, W) object
        mask of frame 0, required when ``self.mask`` is set. Raises ValueError when a needed
        input is missing or the mask keeps no point.
        """
        if self.method == "grid":
            q = grid_queries(self.grid_size, height, width, frame=0)
        elif self.method == "random":
            sub = int(np.random.SeedSequence([int(seed), 2]).generate_state(1)[0])
            q = random_queries(self.num_queries, height, width, 1, seed=sub)
        elif self.method == "sift":
            if first_frame is None:
                raise ValueError("sift queries need the video's first frame")
            sub = int(np.random.SeedSequence([int(seed), 3]).generate_state(1)[0])
            q = sift_queries(first_frame, self.num_queries, frame=0, seed=sub)
        else:
            base = grid_queries(self.grid_size, height, width, frame=0)[:, 1:]
            q = strided_queries(base, num_frames, self.stride)
        if self.mask:
            if mask is None:
                raise ValueError("query mask 'objects' needs the first frame's object mask")
            m = np.asarray(mask, bool)
            if m.shape != (height, width):
                raise ValueError(
                    f"object mask is {m.shape[0]}x{m.shape[1]}, the video {height}x{width}"
                )
            q = restrict_to_mask(q, m)
            if q.shape[0] == 0:
                raise ValueError("the object mask keeps none of the query points")
        return q

    def describe(self) -> dict[str, Any]:
        """What the sample metadata records under 'queries'."""
        out: dict[str, Any] = {"method": self.method, "frame": 0}
        if self.method in ("grid", "strided"):
            out["grid_size"] = self.grid_size
        if self.method in ("random", "sift"):
            out["num_queries"] = self.num_queries
        if self.method == "strided":
            out["stride"] = self.stride
            del out["frame"]
        if self.mask:
            out["mask"] = self.mask
        return out
