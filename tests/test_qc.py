"""Track quality control: flags on hand-built tracks, verdicts, and the cycle check with LK."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datagen.sources.synthetic import SyntheticConfig, render_synthetic_video
from datagen.track.base import TrackResult
from datagen.track.lk import LKTracker
from datagen.track.qc import (
    FLAG_NAMES,
    QCConfig,
    cycle_consistency,
    cycle_frames,
    run_qc,
    track_flags,
    track_jitter,
    track_motion,
    video_verdict,
)

T = 10


def straight(n_frames: int = T, v=(1.0, 0.5), start=(20.0, 30.0)) -> np.ndarray:
    t = np.arange(n_frames, dtype=np.float64)[:, None]
    return (np.asarray(start) + t * np.asarray(v)).astype(np.float32)


def stack(*tracks: np.ndarray) -> np.ndarray:
    return np.stack(tracks).astype(np.float32)


# --- flags on hand-built tracks -----------------------------------------------------------------


def test_jitter_flags_a_5px_jump_only():
    smooth = straight()
    jump = straight()
    jump[6:, 0] += 5.0  # a one-frame 5 px jump, then the same velocity
    tracks = stack(smooth, jump)
    vis = np.ones((2, T), bool)
    jit = track_jitter(tracks, vis)
    assert jit[0] == pytest.approx(0.0, abs=1e-5)  # constant velocity: zero second difference
    assert jit[1] == pytest.approx(5.0, abs=1e-4)
    flags = track_flags(tracks, vis, None, QCConfig())
    assert flags["jitter"].tolist() == [False, True]
    assert flags["kept"].tolist() == [True, False]
    assert not track_flags(tracks, vis, None, QCConfig(max_jitter=None))["jitter"].any()
    assert not track_flags(tracks, vis, None, QCConfig(max_jitter=6.0))["jitter"].any()


def test_jitter_ignores_invisible_frames():
    jump = straight()
    jump[6:, 0] += 5.0
    vis = np.ones((1, T), bool)
    vis[0, 5] = False  # no visible triple spans the jump
    assert track_jitter(jump[None], vis)[0] == pytest.approx(0.0, abs=1e-5)
    assert not track_flags(jump[None], vis, None)["jitter"][0]


def test_visible_fraction_flag():
    tracks = stack(straight(), straight(), straight())
    vis = np.zeros((3, T), bool)
    vis[0, :2] = True  # 2 of 10
    vis[1, :5] = True  # 5 of 10: exactly the threshold, passes
    vis[2] = True
    flags = track_flags(tracks, vis, None, QCConfig(min_visible_fraction=0.5))
    assert flags["visible_fraction"].tolist() == [True, False, False]
    assert flags["kept"].tolist() == [False, True, True]


def test_static_track_gets_motion_flag_only_when_opted_in():
    static = np.tile(np.array([[40.5, 30.5]], np.float32), (T, 1))
    moving = straight()
    tracks = stack(static, moving)
    vis = np.ones((2, T), bool)
    np.testing.assert_allclose(track_motion(tracks, vis), [0.0, np.hypot(9.0, 4.5)], atol=1e-4)
    assert not track_flags(tracks, vis, None, QCConfig())["motion"].any()  # default off
    flags = track_flags(tracks, vis, None, QCConfig(min_motion=2.0))
    assert flags["motion"].tolist() == [True, False]
    assert flags["kept"].tolist() == [False, True]


def test_motion_uses_visible_positions_only():
    tr = np.tile(np.array([[40.5, 30.5]], np.float32), (T, 1))
    tr[7:] += 50.0  # a far position while invisible (a held / garbage position)
    vis = np.ones((1, T), bool)
    vis[0, 7:] = False
    assert track_motion(tr[None], vis)[0] == 0.0
    assert track_motion(tr[None], np.zeros((1, T), bool))[0] == 0.0


def test_cycle_flag_from_given_errors():
    tracks = stack(*[straight()] * 4)
    vis = np.ones((4, T), bool)
    err = np.array([0.1, 2.0, 2.5, np.nan])
    flags = track_flags(tracks, vis, err, QCConfig(cycle_threshold=2.0))
    # <= threshold passes, above fails, NaN (not verifiable) fails
    assert flags["cycle"].tolist() == [False, False, True, True]
    assert flags["kept"].tolist() == [True, True, False, False]
    assert not track_flags(tracks, vis, None)["cycle"].any()
    with pytest.raises(ValueError):
        track_flags(tracks, vis, err[:3])


def test_verdict_rejects_when_too_few_kept():
    n = 10
    flags = {k: np.zeros(n, bool) for k in FLAG_NAMES}
    flags["cycle"][:6] = True
    flags["visible_fraction"][:8] = True  # tracks 0..7 fail; 2 kept
    v = video_verdict(flags, QCConfig(min_kept_fraction=0.3))
    assert v["verdict"] == "rejected"
    assert v["kept_fraction"] == pytest.approx(0.2)
    assert v["num_kept"] == 2 and v["num_tracks"] == n
    assert v["counts"] == {"cycle": 6, "visible_fraction": 8, "motion": 0, "jitter": 0}
    assert "min_kept_fraction" in v["reasons"][0]
    # then one reason per flag that fired, most frequent first
    assert v["reasons"][1].startswith("visible_fraction: 8/10")
    assert v["reasons"][2].startswith("cycle: 6/10")
    assert len(v["reasons"]) == 3
    json.dumps(v, allow_nan=False)

    ok = video_verdict(flags, QCConfig(min_kept_fraction=0.2))
    assert ok["verdict"] == "accepted" and ok["reasons"] == []

    empty = video_verdict({k: np.zeros(0, bool) for k in FLAG_NAMES})
    assert empty["verdict"] == "rejected" and empty["reasons"] == ["no tracks"]


def test_qc_config_validation():
    for bad in (
        {"cycle_threshold": -1.0},
        {"min_visible_fraction": 1.5},
        {"min_kept_fraction": -0.1},
        {"max_jitter": float("nan")},
        {"min_motion": True},
        {"check_cycle": 1},
    ):
        with pytest.raises(ValueError):
            QCConfig(**bad)
    assert QCConfig(**QCConfig().to_dict()) == QCConfig()


# --- cycle consistency ---------------------------------------------------------------------------


def test_cycle_frames():
    vis = np.zeros((4, 8), bool)
    vis[0, [0, 1, 2, 3]] = True  # query 0: last visible after -> 3
    vis[1, [1, 2, 4, 5]] = True  # query 2: last visible after -> 5
    vis[2, [1, 2, 3]] = True  # query 3: nothing after -> first before: 1
    vis[3, [4]] = True  # query 4: only the query frame -> -1
    assert cycle_frames(vis, np.array([0, 2, 3, 4])).tolist() == [3, 5, 1, -1]


class RecordingTracker:
    """Returns a fixed offset from each query's position at every frame; records its calls."""

    name = "recording"

    def __init__(self, offset=(0.0, 0.0), lose=()):
        self.offset = np.asarray(offset, np.float32)
        self.lose = set(lose)
        self.calls = []

    def settings(self):
        return {}

    def track(self, frames, queries):
        self.calls.append((frames.copy(), np.asarray(queries).copy()))
        n, t = len(queries), frames.shape[0]
        tracks = np.repeat(queries[:, None, 1:3] + self.offset, t, axis=1).astype(np.float32)
        vis = np.ones((n, t), bool)
        for i in self.lose:
            vis[i] = False
        return TrackResult(tracks, vis, None)


def test_cycle_consistency_procedure():
    frames = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((8, 4, 6, 3), np.uint8)
    queries = np.array([[2, 1.5, 1.5], [3, 2.5, 2.5], [4, 3.5, 1.5]], np.float32)
    tracks = np.zeros((3, 8, 2), np.float32)
    vis = np.zeros((3, 8), bool)
    tracks[0, 5] = (4.5, 3.5)
    vis[0, [2, 3, 4, 5]] = True  # cycle frame 5
    tracks[1, 1] = (1.0, 1.0)
    vis[1, [1, 3]] = True  # cycle frame 1 (only visible before its query)
    vis[2, 4] = True  # only its query frame: not computable
    result = TrackResult(tracks, vis, None)
    tracker = RecordingTracker(offset=(0.3, -0.4))
    err = cycle_consistency(tracker, frames, result, queries)
    assert len(tracker.calls) == 1
    clip, back_q = tracker.calls[0]
    # clip spans the smallest..largest of the query and cycle frames of computable points: 1..5
    assert clip[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(back_q, [[4, 4.5, 3.5], [0, 1.0, 1.0]])
    # error = |back-tracked position at the query frame - query|
    exp0 = np.hypot(4.5 + 0.3 - 1.5, 3.5 - 0.4 - 1.5)
    exp1 = np.hypot(1.0 + 0.3 - 2.5, 1.0 - 0.4 - 2.5)
    np.testing.assert_allclose(err[:2], [exp0, exp1], rtol=1e-5)
    assert np.isnan(err[2])

    # a back-track that does not reach the query frame (lost) gives NaN
    err = cycle_consistency(RecordingTracker(lose=[0]), frames, result, queries)
    assert np.isnan(err[0]) and np.isfinite(err[1])


def translation_video(num_frames: int = 12, height: int = 96, width: int = 128):
    """Pure translation of a textured plane (no sprites, constant sub-pixel camera pan) and a
    dense grid of frame-0 queries with their exact tracks ``(video, queries, tracks)``."""
    cfg = SyntheticConfig(
        num_frames=num_frames,
        height=height,
        width=width,
        num_sprites=0,
        camera_velocity=(0.37, -0.61),
        background_points=0,
    )
    video = render_synthetic_video(cfg, seed=3)
    xs, ys = np.meshgrid(np.arange(4.5, width - 4.0, 3.0), np.arange(4.5, height - 4.0, 3.0))
    xy = np.stack([xs.ravel(), ys.ravel()], axis=1)
    queries = np.concatenate([np.zeros((len(xy), 1)), xy], axis=1).astype(np.float32)
    offsets = np.asarray(video.meta["camera_offsets"])  # image p at t shows world p + o_t
    tracks = xy[:, None, :] - (offsets - offsets[0])[None]
    return video, queries, tracks.astype(np.float32)


def interior(tracks: np.ndarray, margin: float, h: int = 96, w: int = 128) -> np.ndarray:
    x, y = tracks[..., 0], tracks[..., 1]
    return ((x > margin) & (x < w - margin) & (y > margin) & (y < h - margin)).all(axis=1)


def test_cycle_consistency_lk_translation_is_near_zero():
    video, queries, truth = translation_video()
    tracker = LKTracker()
    result = tracker.track(video.frames, queries)
    assert np.abs(result.tracks - truth)[interior(truth, 12.0)].max() < 0.1  # the scene is right
    err = cycle_consistency(tracker, video.frames, result, queries)
    inner = interior(truth, 12.0)
    assert inner.sum() >= 30
    assert np.isfinite(err[inner]).all()
    assert err[inner].max() < 0.2, err[inner].max()
    # the cycle frame is the last frame for every interior point
    assert (cycle_frames(result.visible, queries[:, 0])[inner] == 11).all()
    qc = run_qc(tracker, video.frames, result, queries, QCConfig())
    assert qc.kept[inner].all()
    assert qc.verdict["verdict"] == "accepted"
    assert set(qc.flags) == set(FLAG_NAMES)


def test_cycle_consistency_detects_a_content_swap():
    """From frame 6 on, a box shows unrelated static texture (the content is swapped). A tracker
    that ignores it (here: the exact positions, all reported visible) is caught by the cycle
    check for the points under the box; LK itself loses them, so its own tracks stay consistent.
    """
    h, w = 128, 192
    video, queries, truth = translation_video(height=h, width=w)
    frames = video.frames.copy()
    other = render_synthetic_video(
        SyntheticConfig(num_frames=1, height=h, width=w, num_sprites=0, background_points=0),
        seed=99,
    ).frames[0]
    y0, y1, x0, x1 = 44, 84, 76, 126
    frames[6:, y0:y1, x0:x1] = other[y0:y1, x0:x1]
    gt = truth.astype(np.float64)
    m = 9.0  # more than half an LK window inside the box at every swapped frame
    x, y = gt[:, 6:, 0], gt[:, 6:, 1]
    covered = ((x > x0 + m) & (x < x1 - m) & (y > y0 + m) & (y < y1 - m)).all(axis=1)
    gap = np.maximum.reduce([x0 - gt[..., 0], gt[..., 0] - x1, y0 - gt[..., 1], gt[..., 1] - y1])
    clear = (gap.min(axis=1) > 24) & interior(truth, 12.0, h, w)
    assert covered.sum() >= 20 and clear.sum() >= 20

    # max_level=2: with the default 3 the coarsest level of this 128x192 video is 16x24 px,
    # nearly one 15 px window, so the swap corrupts LK's coarse estimate far from the box
    # (measured: LK's own forward tracks lost 482 of these 676 clear points at the swap; with
    # max_level <= 2 none). That is LK's behaviour, not the cycle check's.
    tracker = LKTracker(max_level=2)
    oblivious = TrackResult(truth.copy(), np.ones(truth.shape[:2], bool), None)
    err = cycle_consistency(tracker, frames, oblivious, queries)
    bad = ~(err[covered] <= 2.0)  # NaN (lost on the way back) or large
    assert bad.all(), err[covered]
    # far from the box the swap changes nothing: same cycle errors as without it, all small
    ref = cycle_consistency(tracker, video.frames, oblivious, queries)
    assert np.isfinite(err[clear]).all()
    np.testing.assert_allclose(err[clear], ref[clear], atol=0.02)
    assert err[clear].max() < 0.5
    flags = track_flags(oblivious.tracks, oblivious.visible, err, QCConfig())
    assert flags["cycle"][covered].all() and not flags["cycle"][clear].any()

    # LK's own forward tracks: the covered points are lost at the swap, so their cycle frame is
    # 5 (the last frame before it) and their cycle closes.
    result = tracker.track(frames, queries)
    assert not result.visible[covered, 6:].any()
    assert (cycle_frames(result.visible, queries[:, 0])[covered] == 5).all()
    own = cycle_consistency(tracker, frames, result, queries)
    assert np.isfinite(own[covered]).all() and own[covered].max() < 0.2


def test_run_qc_without_cycle_check():
    video, queries, _ = translation_video(num_frames=6)

    class Forbidden(RecordingTracker):
        def track(self, frames, queries):
            raise AssertionError("the cycle check must not run")

    result = LKTracker().track(video.frames, queries)
    qc = run_qc(Forbidden(), video.frames, result, queries, QCConfig(check_cycle=False))
    assert np.isnan(qc.cycle_error).all()
    assert not qc.flags["cycle"].any()
    assert qc.kept.shape == (len(queries),)
    json.dumps(qc.verdict, allow_nan=False)
