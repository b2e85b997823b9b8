"""Classical point trackers: pyramidal Lucas-Kanade and DIS optical flow, both frame to frame.

Both trackers share one sweep scheme (``_FrameToFrameTracker``):

* A query ``(t_q, x, y)`` is visible at its own frame, at exactly ``(x, y)``, with confidence 1.
* Forward sweep: for t = min(t_q) .. T-2, every live point with ``t_q <= t`` is moved from frame
  t to t+1 in one batched call. Backward sweep: for t = max(t_q) .. 1, every live point with
  ``t_q >= t`` is moved from frame t to t-1. Points that start at different frames share calls.
* Each step has a forward-backward (FB) check: p_t -> p_{t+1} -> p'_t; the FB error is
  ``|p'_t - p_t|`` in pixels. The step fails when the FB error exceeds ``fb_threshold``, when
  the method reports failure (LK status 0, or a non-finite result), or when the new position
  leaves the image (raster ``x < 0 or x >= W or y < 0 or y >= H``).
* Appearance check (``min_ncc``, default 0.9; None disables it): the step also fails when the
  zero-mean normalised cross-correlation between the point's patch before the step (frame t at
  p_t) and after it (frame t+1 at p_{t+1}) is below ``min_ncc``. Patches are squares of the LK
  window size (DIS: ``ncc_win_size``) sampled bilinearly; a nearly flat patch before the step
  (std < 1 gray level) carries no appearance information and passes. Why: the FB check alone
  does not catch occlusion by content of similar texture when the motion is small, because LK
  then converges to a nearby, self-consistent false match (FB is not an appearance test).
  Measured on the occlusion of tests/test_lk.py (a 40x40 box replaced by an unrelated
  texture) over 30 random videos, 686 fully covered points: with the FB check alone (1 px) LK
  kept 15% of them visible (11% with a finer-grained occluder) and DIS 36% (84%); with
  NCC >= 0.9 added, none stayed visible and none of 1556 unoccluded interior points was lost.
  The threshold favours label precision over recall and has not been tuned on real footage.
* After a failed step the point is LOST for the rest of that sweep (it is never re-acquired):
  its position is held at the last good location, ``visible`` is False and confidence is 0.
  The two sweeps are independent: a point lost going forward can still be tracked backward.
* Recovery (LK ``recover=True``; the ``lk_recover`` tracker): a lost point is not dropped but
  followed. Its position keeps moving: by its own LK step, or, with ``fallback_neighbours=k``,
  by the median step of its k nearest visible points (within 30 px) whose previous step was
  within 1 px of its own (points that moved together, e.g. on the same object). A point that
  would leave the image is held at its last position inside. It is visible again when a step
  passes the FB and NCC checks against the previous frame AND its patch matches its last good
  (anchor) patch with NCC >= 0.8. Why: on the synthetic calibration set most points are lost
  briefly (occlusion, fast rotation), and holding them costs most of delta_avg. Measured with
  ``datagen calibrate`` on seeds 1000..1007 (held out from development): delta_avg 41.5 ->
  77.0 over all tracks, 75.5 -> 88.5 over kept tracks (``lk_recover``: win 5, k = 3).
  Known failure: a point behind a *static* textured occluder with no visible neighbours can
  lock onto the occluder and stay there (tests/test_lk.py, strict xfail).
* Confidence of a successful step: ``exp(-fb_err / fb_threshold)``, so in ``[exp(-1), 1]``
  (~0.37..1) for visible points; it scores that step's FB error only (it does not accumulate
  over time and ignores the appearance score).

Known limitation, image border: within half a window of the border LK's window reaches into
OpenCV's reflected padding, which moves the wrong way, and the estimate is biased while FB and
NCC still agree. Measured on the leaving-the-frame test video (3 px/frame): within 8 px of
the border the median error grows from 0.04 to 0.7 px towards the edge, with a maximum of
1.8 px, against ~0.02 px further inside. Such points stay visible (they are in the image);
the confidence does not reflect this.

Coordinates: the public API is raster (TAP-Vid: pixel centres at +0.5). OpenCV's LK points and
DIS flow arrays use pixel-centre coordinates (0 = centre of the first pixel), so we subtract
0.5 on the way in and add 0.5 on the way out.

Pyramid reuse (LK): building each frame's pyramid once with ``cv2.buildOpticalFlowPyramid``
and passing it to both the forward and the backward call would save three of the four pyramid
builds per step, but OpenCV's Python binding does not accept a pyramid for
``calcOpticalFlowPyrLK`` (opencv/opencv#4777; in OpenCV 5.0 it raises "prevImg is not a
numerical tuple"). So images are passed and OpenCV builds the pyramids per call (4 builds
per step instead of 1); ``scripts/bench_track.py`` measures what one build costs (~0.6-0.9 ms
at 480x720, i.e. reuse would save ~2 ms of ~10-15 ms per frame).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import cv2
import numpy as np

from datagen.track.base import TrackResult, check_frames, check_queries

__all__ = ["LKTracker", "DISTracker", "to_gray"]


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, H, W) grayscale (OpenCV's RGB2GRAY weights)."""
    t, h, w, _ = frames.shape
    flat = np.ascontiguousarray(frames).reshape(t * h, w, 3)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2GRAY).reshape(t, h, w)


def _inside(p: np.ndarray, width: int, height: int) -> np.ndarray:
    """Raster (K, 2) points -> bool (K,) inside the image."""
    x, y = p[:, 0], p[:, 1]
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


_REMAP_MAX_ROWS = 32000  # cv2.remap needs output sizes below SHRT_MAX
_FLAT_STD = 1.0  # gray levels: a template flatter than this carries no appearance information


def sample_patches(img: np.ndarray, p: np.ndarray, win: int) -> np.ndarray:
    """Bilinear ``win x win`` patches of a uint8 image around pixel-centre points p (K, 2).

    Border pixels are replicated. Returns float32 (K, win * win), row-major patches.
    """
    k = p.shape[0]
    out = np.empty((k, win * win), np.float32)
    off = np.arange(win, dtype=np.float32) - (win - 1) / 2.0
    ox, oy = np.tile(off, win), np.repeat(off, win)
    for s in range(0, k, _REMAP_MAX_ROWS):
        q = p[s : s + _REMAP_MAX_ROWS].astype(np.float32)
        mx = np.ascontiguousarray(q[:, 0:1] + ox)
        my = np.ascontiguousarray(q[:, 1:2] + oy)
        out[s : s + q.shape[0]] = cv2.remap(
            img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
    return out


def centre_patches(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise zero-mean patches (K, P) and their L2 norms (K,), for ``patch_ncc``."""
    c = patches - patches.mean(axis=1, keepdims=True)
    return c, np.sqrt(np.einsum("ij,ij->i", c, c))


def patch_ncc(a: np.ndarray, a_norm: np.ndarray, b: np.ndarray, b_norm: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of centred patches (from ``centre_patches``) -> (K,).

    In [-1, 1]; 0 where either patch is constant.
    """
    denom = a_norm * b_norm
    num = np.einsum("ij,ij->i", a, b)
    return np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), 0.0)


def _check_ncc(value: Any) -> float | None:
    if value is None:
        return None
    ok_type = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not ok_type or not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"min_ncc must be None or a number within [-1, 1], got {value!r}")
    return float(value)


class _FrameToFrameTracker:
    """Shared sweep logic; subclasses implement ``_prepare`` and ``_step``."""

    name = "base"
    _recover = False
    _neighbours = 0
    fb_threshold: float
    min_ncc: float | None
    _ncc_win_size: int

    def settings(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _prepare(self, gray: np.ndarray, queries: np.ndarray) -> Any:
        """Per-video state handed to ``_step`` (e.g. a flow cache)."""
        return None

    def _step(
        self, state: Any, gray: np.ndarray, a: int, b: int, p_a: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move pixel-centre points ``p_a`` (K, 2) float32 from frame a to frame b.

        Returns ``(p_b, fb_err, ok)``: new pixel-centre positions (K, 2), FB error (K,) and
        the method's own success flag (K,) bool (bounds and threshold are applied by caller).
        """
        raise NotImplementedError

    def track(self, frames: np.ndarray, queries: np.ndarray) -> TrackResult:
        frames = check_frames(frames)
        num_frames, height, width = frames.shape[:3]
        q = check_queries(queries, num_frames, height, width)
        n = q.shape[0]

        tracks = np.zeros((n, num_frames, 2), np.float32)
        visible = np.zeros((n, num_frames), bool)
        confidence = np.zeros((n, num_frames), np.float32)
        if n == 0:
            return TrackResult(tracks, visible, confidence)

        tq = q[:, 0].astype(np.int64)
        xy = q[:, 1:3].copy()
        rows = np.arange(n)
        tracks[rows, tq] = xy
        visible[rows, tq] = True
        confidence[rows, tq] = 1.0

        gray = to_gray(frames)
        state = self._prepare(gray, q)
        for direction in (+1, -1):
            self._sweep(state, gray, tq, xy, direction, tracks, visible, confidence)
        return TrackResult(tracks, visible, confidence).validate(n, num_frames)

    def _sweep(
        self,
        state: Any,
        gray: np.ndarray,
        tq: np.ndarray,
        xy: np.ndarray,
        direction: int,
        tracks: np.ndarray,
        visible: np.ndarray,
        confidence: np.ndarray,
    ) -> None:
        num_frames, height, width = gray.shape
        n = tq.shape[0]
        if direction > 0:
            steps = range(int(tq.min()), num_frames - 1)
        else:
            steps = range(int(tq.max()), 0, -1)
        use_ncc = self.min_ncc is not None
        win = self._ncc_win_size
        flat_norm = _FLAT_STD * win  # L2 norm of a centred win*win patch with std _FLAT_STD
        # appearance template per point: its centred patch in the frame it was last tracked to
        templates = np.zeros((n, win * win), np.float32) if use_ncc else None
        template_norms = np.zeros(n, np.float32)
        anchors = np.zeros((n, win * win), np.float32) if use_ncc else None
        anchor_norms = np.zeros(n, np.float32)
        cur = xy.copy()  # raster positions; lost points keep their last good one
        started = np.zeros(n, bool)
        alive = np.zeros(n, bool)
        recover = self._recover
        lost_now = np.zeros(n, bool)
        # recovery mode: lost_now = not visible at the current frame but still followed;
        # last_d = each point's previous step (neighbours must have moved alike)
        last_d = np.zeros((n, 2), np.float32)
        for t in steps:
            joining = tq == t
            if use_ncc and joining.any():
                c, c_norm = centre_patches(sample_patches(gray[t], xy[joining] - 0.5, win))
                templates[joining], template_norms[joining] = c, c_norm
                anchors[joining], anchor_norms[joining] = c, c_norm
            started |= joining
            alive |= joining
            nxt = t + direction
            idx = np.flatnonzero(alive)
            if idx.size:
                p_a = np.ascontiguousarray(cur[idx] - 0.5, dtype=np.float32)
                p_b, fb_err, ok = self._step(state, gray, t, nxt, p_a)
                new = (p_b + 0.5).astype(np.float32)
                finite = np.all(np.isfinite(new), axis=1) & _inside(new, width, height)
                moved = ok & finite
                ok = moved & np.isfinite(fb_err) & (fb_err <= self.fb_threshold)
                if use_ncc and recover:
                    cand = np.flatnonzero(moved)
                    ids = idx[cand]
                    c, c_norm = centre_patches(sample_patches(gray[nxt], p_b[cand], win))
                    ncc = patch_ncc(templates[ids], template_norms[ids], c, c_norm)
                    match = (template_norms[ids] < flat_norm) | (ncc >= self.min_ncc)
                    # re-acquiring a lost point also needs its last good appearance
                    ancc = patch_ncc(anchors[ids], anchor_norms[ids], c, c_norm)
                    amatch = (anchor_norms[ids] < flat_norm) | (ancc >= _ANCHOR_NCC)
                    match &= amatch | ~lost_now[ids]
                    ok[cand[~match]] = False
                    templates[ids], template_norms[ids] = c, c_norm
                    g = ok[cand]
                    anchors[ids[g]], anchor_norms[ids[g]] = c[g], c_norm[g]
                elif use_ncc:
                    # appearance check; a flat template (std < _FLAT_STD) always passes
                    cand = np.flatnonzero(ok)
                    ids = idx[cand]
                    c, c_norm = centre_patches(sample_patches(gray[nxt], p_b[cand], win))
                    ncc = patch_ncc(templates[ids], template_norms[ids], c, c_norm)
                    match = (template_norms[ids] < flat_norm) | (ncc >= self.min_ncc)
                    ok[cand[~match]] = False
                    templates[ids[match]], template_norms[ids[match]] = c[match], c_norm[match]
                good, lost = idx[ok], idx[~ok]
                if recover:
                    step = np.where(np.isfinite(new), new, cur[idx]) - cur[idx]
                    step[~moved] = 0.0
                    if self._neighbours and ok.any() and (~ok).any():
                        step[~ok] = _neighbour_flow(
                            cur[idx], step, ok, last_d[idx], self._neighbours, step[~ok]
                        )
                    out = ~_inside(cur[idx] + step, width, height) | ~np.isfinite(step).all(1)
                    step[out] = 0.0  # a point that leaves the image is held there
                    last_d[idx] = step
                    cur[idx] = cur[idx] + step
                    lost_now[good] = False
                    lost_now[lost] = True
                else:
                    cur[good] = new[ok]
                    alive[lost] = False
                visible[good, nxt] = True
                confidence[good, nxt] = np.exp(-fb_err[ok] / self.fb_threshold)
            sel = np.flatnonzero(started)
            tracks[sel, nxt] = cur[sel]


_ANCHOR_NCC = 0.8
"""Recovery: minimum NCC between a lost point's patch and its last good (anchor) patch."""
_NEIGHBOUR_RADIUS = 30.0
"""Recovery fallback: neighbours further than this (pixels) do not vouch for a lost point."""


def _neighbour_flow(pos, step, ok, prev, k, fallback):
    """Median step of the k nearest good points that moved like each failed point before."""
    bad = np.flatnonzero(~ok)
    gi = np.flatnonzero(ok)
    d = np.linalg.norm(pos[bad, None] - pos[None, gi], axis=2)
    dm = np.linalg.norm(prev[bad, None] - prev[None, gi], axis=2)
    d = np.where(dm <= 1.0, d, np.inf)
    kk = min(k, gi.size)
    nn = np.argpartition(d, kk - 1, axis=1)[:, :kk]
    dn = np.take_along_axis(d, nn, axis=1)
    valid = np.isfinite(dn) & (dn <= _NEIGHBOUR_RADIUS)
    s = step[gi][nn]  # (B, kk, 2)
    s = np.where(valid[..., None], s, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows fall back below
        med = np.nanmedian(s, axis=1)
    has = valid.any(axis=1)
    return np.where(has[:, None], med, fallback)


class LKTracker(_FrameToFrameTracker):
    """Pyramidal Lucas-Kanade (``cv2.calcOpticalFlowPyrLK``) with a forward-backward check.

    Args:
        win_size: LK window side in pixels (square window), at every pyramid level.
        max_level: highest pyramid level (0 = no pyramid); OpenCV may use fewer on small images.
        fb_threshold: maximum forward-backward error in pixels for a step to count as tracked.
        max_iters, eps: LK termination criteria per level (iterations, update size in pixels).
        min_eig_threshold: OpenCV's minimum-eigenvalue test (normalised by window area); points
            on texture-less patches get status 0 and are lost.
        min_ncc: appearance check (see the module docstring): minimum normalised cross-correlation
            between the point's ``win_size`` patch before and after a step; None disables it.
        recover: follow lost points and re-acquire them (module docstring, "Recovery").
        fallback_neighbours: with ``recover``, move a lost point by the median step of this
            many visible neighbours that moved alike (0: by its own LK step).
    """

    name = "lk"

    def __init__(
        self,
        win_size: int = 15,
        max_level: int = 3,
        fb_threshold: float = 1.0,
        max_iters: int = 30,
        eps: float = 0.01,
        min_eig_threshold: float = 1e-4,
        min_ncc: float | None = 0.9,
        recover: bool = False,
        fallback_neighbours: int = 0,
    ) -> None:
        if not isinstance(recover, (bool, np.bool_)):
            raise ValueError(f"recover must be a bool, got {recover!r}")
        self.recover = self._recover = bool(recover)
        self.fallback_neighbours = self._neighbours = _check_int(
            "fallback_neighbours", fallback_neighbours, 0
        )
        self.win_size = _check_int("win_size", win_size, 3)
        self.max_level = _check_int("max_level", max_level, 0)
        self.fb_threshold = _check_float("fb_threshold", fb_threshold, positive=True)
        self.max_iters = _check_int("max_iters", max_iters, 1)
        self.eps = _check_float("eps", eps, positive=True)
        self.min_eig_threshold = _check_float("min_eig_threshold", min_eig_threshold, False)
        self.min_ncc = _check_ncc(min_ncc)
        self._ncc_win_size = self.win_size

    def settings(self) -> dict[str, Any]:
        return {
            "win_size": self.win_size,
            "max_level": self.max_level,
            "fb_threshold": self.fb_threshold,
            "max_iters": self.max_iters,
            "eps": self.eps,
            "min_eig_threshold": self.min_eig_threshold,
            "min_ncc": self.min_ncc,
            "recover": self.recover,
            "fallback_neighbours": self.fallback_neighbours,
        }

    def _lk(self, img_a: np.ndarray, img_b: np.ndarray, p: np.ndarray):
        return cv2.calcOpticalFlowPyrLK(
            img_a,
            img_b,
            p,
            None,
            winSize=(self.win_size, self.win_size),
            maxLevel=self.max_level,
            criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, self.max_iters, self.eps),
            flags=0,
            minEigThreshold=self.min_eig_threshold,
        )

    def _step(self, state, gray, a, b, p_a):
        p_b, st_f, _ = self._lk(gray[a], gray[b], p_a)
        p_b = p_b.reshape(-1, 2)
        p_back, st_b, _ = self._lk(gray[b], gray[a], np.ascontiguousarray(p_b))
        fb_err = np.linalg.norm(p_back.reshape(-1, 2) - p_a, axis=1)
        ok = (st_f.reshape(-1) == 1) & (st_b.reshape(-1) == 1)
        return p_b, fb_err, ok


_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def bilinear_sample(field: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Sample an (H, W, C) array at pixel-centre points p (K, 2) bilinearly, border-clamped.

    Exact float64 weights (``cv2.remap`` would quantise them to 1/32 pixel). Returns (K, C).
    """
    h, w = field.shape[:2]
    x = np.clip(p[:, 0].astype(np.float64), 0.0, w - 1.0)
    y = np.clip(p[:, 1].astype(np.float64), 0.0, h - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    top = field[y0, x0] * (1 - fx) + field[y0, x1] * fx
    bottom = field[y1, x0] * (1 - fx) + field[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


class DISTracker(_FrameToFrameTracker):
    """Dense DIS optical flow (``cv2.DISOpticalFlow``) chained frame to frame.

    A point moves by the flow sampled bilinearly at its current position; the FB check samples
    the reverse flow (frame b -> a) at the new position. Flow fields needed by both sweeps (the
    frame pairs between the earliest and the latest query frame) are computed once and kept until
    their second use; others are computed when needed and dropped.

    Args:
        preset: "ultrafast", "fast" or "medium" (OpenCV's DIS presets).
        fb_threshold: maximum forward-backward error in pixels, as for LK.
        min_ncc: appearance check as for LK; None disables it.
        ncc_win_size: side of the patch used by the appearance check.
    """

    name = "dis"

    def __init__(
        self,
        preset: str = "medium",
        fb_threshold: float = 1.0,
        min_ncc: float | None = 0.9,
        ncc_win_size: int = 15,
    ) -> None:
        if preset not in _DIS_PRESETS:
            raise ValueError(f"preset must be one of {sorted(_DIS_PRESETS)}, got {preset!r}")
        self.preset = preset
        self.fb_threshold = _check_float("fb_threshold", fb_threshold, positive=True)
        self.min_ncc = _check_ncc(min_ncc)
        self._ncc_win_size = _check_int("ncc_win_size", ncc_win_size, 3)

    def settings(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "fb_threshold": self.fb_threshold,
            "min_ncc": self.min_ncc,
            "ncc_win_size": self._ncc_win_size,
        }

    def _prepare(self, gray: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
        t = queries[:, 0]
        return {
            "dis": cv2.DISOpticalFlow_create(_DIS_PRESETS[self.preset]),
            "cache": {},
            # pairs (s, s+1) with lo <= s < hi are used by both sweeps
            "shared": (int(t.min()), int(t.max())),
        }

    def _flow(self, state: dict[str, Any], gray: np.ndarray, a: int, b: int) -> np.ndarray:
        key = (a, b)
        flow = state["cache"].pop(key, None)  # each cached flow is reused exactly once
        if flow is None:
            try:
                flow = state["dis"].calc(gray[a], gray[b], None)
            except cv2.error as e:
                h, w = gray.shape[1:]
                raise ValueError(f"DIS optical flow failed on {w}x{h} frames: {e}") from e
            lo, hi = state["shared"]
            if lo <= min(a, b) < hi:
                state["cache"][key] = flow
        return flow

    def _step(self, state, gray, a, b, p_a):
        fwd = self._flow(state, gray, a, b)
        bwd = self._flow(state, gray, b, a)
        p_b = p_a + bilinear_sample(fwd, p_a)
        p_back = p_b + bilinear_sample(bwd, p_b)
        fb_err = np.linalg.norm(p_back - p_a, axis=1)
        ok = np.ones(p_a.shape[0], bool)
        return p_b.astype(np.float32), fb_err, ok
