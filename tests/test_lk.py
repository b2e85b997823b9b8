"""Classical trackers against exact synthetic ground truth.

Videos are rendered from an analytic texture (a sum of sinusoids) evaluated at the exact
raster coordinates of each pixel centre (x + 0.5, y + 0.5), so the true position of every
texture point in every frame is known exactly, with no resampling error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from datagen.track import lk as lk_module
from datagen.track.base import Tracker, TrackResult
from datagen.track.lk import DISTracker, LKTracker, bilinear_sample
from datagen.track.registry import make_tracker, register_tracker

H, W = 96, 128


def texture(seed: int, n: int = 40, min_wl: float = 6.0, max_wl: float = 40.0):
    """f(x, y) -> values in about [-1, 1]: random sinusoids with wavelengths in [min, max] px."""
    rng = np.random.default_rng(seed)
    wl = rng.uniform(min_wl, max_wl, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    u, v = np.cos(ang) / wl, np.sin(ang) / wl
    phase = rng.uniform(0, 2 * np.pi, n)
    amp = rng.uniform(0.5, 1.0, n)
    amp /= amp.sum()

    def f(x, y):
        arg = 2 * np.pi * (x[..., None] * u + y[..., None] * v) + phase
        return (np.cos(arg) * amp).sum(-1)

    return f


def render(f, warp, h: int = H, w: int = W) -> np.ndarray:
    """uint8 (h, w, 3): pixel (i, j) shows f at warp(j + 0.5, i + 0.5) (raster coordinates)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    val = f(*warp(xs, ys))
    img = np.clip(np.rint(128 + 127 * val / 0.6), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1)


def translating_video(seed: int, num_frames: int, d, h: int = H, w: int = W) -> np.ndarray:
    """Texture moving by d = (dx, dy) px per frame: content at raster p in frame 0 is at p + d t."""
    f = texture(seed)
    dx, dy = d
    return np.stack(
        [render(f, lambda x, y, t=t: (x - dx * t, y - dy * t), h, w) for t in range(num_frames)]
    )


def queries_at(t, xy) -> np.ndarray:
    xy = np.asarray(xy, np.float64)
    t = np.broadcast_to(np.asarray(t, np.float64), (len(xy),))
    return np.concatenate([t[:, None], xy], axis=1).astype(np.float32)


def truth(queries: np.ndarray, d, num_frames: int) -> np.ndarray:
    """(N, T, 2) exact raster positions for a translation of d px per frame."""
    dt = np.arange(num_frames)[None, :] - queries[:, 0:1]
    return queries[:, None, 1:3].astype(np.float64) + dt[..., None] * np.asarray(d)


def interior_points(n: int, seed: int, margin: float = 20.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(margin, W - margin, n), rng.uniform(margin, H - margin, n)], 1)


D = (0.37, -0.61)  # sub-pixel translation per frame


@pytest.fixture(scope="module")
def video5():
    return translating_video(seed=0, num_frames=5, d=D)


def check_query_frame(res: TrackResult, q: np.ndarray) -> None:
    rows = np.arange(len(q))
    t = q[:, 0].astype(int)
    np.testing.assert_array_equal(res.tracks[rows, t], q[:, 1:3])
    assert res.visible[rows, t].all()
    np.testing.assert_array_equal(res.confidence[rows, t], 1.0)


def test_lk_recovers_subpixel_translation(video5):
    q = queries_at(0, interior_points(40, seed=1))
    res = LKTracker().track(video5, q)
    res.validate(len(q), 5)
    check_query_frame(res, q)
    assert res.visible.all()
    err = np.abs(res.tracks - truth(q, D, 5))
    assert err.max() < 0.1, err.max()
    assert (res.confidence > np.exp(-1)).all()


def test_lk_tracks_backward_from_mid_video(video5):
    xy = interior_points(30, seed=2)
    q = np.concatenate([queries_at(2, xy[:15]), queries_at(4, xy[15:])])
    res = LKTracker().track(video5, q)
    check_query_frame(res, q)
    assert res.visible.all()
    err = np.abs(res.tracks - truth(q, D, 5))
    assert err.max() < 0.1, err.max()


@pytest.mark.parametrize("tracker", [LKTracker(), DISTracker()], ids=["lk", "dis"])
def test_batched_queries_match_separate_runs(video5, tracker):
    # points starting at different frames share the sweeps (and DIS shares cached flows)
    xy = interior_points(12, seed=3)
    parts = [queries_at(0, xy[:4]), queries_at(2, xy[4:8]), queries_at(4, xy[8:])]
    together = tracker.track(video5, np.concatenate(parts))
    for i, part in enumerate(parts):
        alone = tracker.track(video5, part)
        sl = slice(4 * i, 4 * i + 4)
        np.testing.assert_allclose(together.tracks[sl], alone.tracks, atol=1e-5)
        np.testing.assert_array_equal(together.visible[sl], alone.visible)


def test_lk_uses_raster_coordinates():
    # A radially symmetric blob zooms by 1.3x per frame about the query point c, so the
    # point at c is stationary. Treating raster coordinates as OpenCV pixel-centre ones tracks
    # the texture point 0.5 px away instead, which drifts by 0.5 * (1.3**2 - 1) = 0.35 px.
    c = np.array([30.2, 33.9])
    s = 1.3

    def frame(t):
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        r2 = ((xs - c[0]) ** 2 + (ys - c[1]) ** 2) / s ** (2 * t)
        img = np.rint(40 + 180 * np.exp(-r2 / (2 * 4.0**2))).astype(np.uint8)
        return np.repeat(img[..., None], 3, axis=-1)

    frames = np.stack([frame(t) for t in range(3)])
    res = LKTracker().track(frames, queries_at(0, [c]))
    assert res.visible.all()
    assert np.abs(res.tracks[0] - c).max() < 0.05


def test_dis_uses_raster_coordinates(monkeypatch):
    # Replace DIS by an exact linear flow field (in OpenCV pixel-centre coordinates):
    # forward u(p) = a * p, backward v(q) = -a / (1 + a) * q, so a raster point x moves to
    # (x - 0.5) * (1 + a) + 0.5 and the FB error is 0. Bilinear sampling is exact on it.
    a = 0.1
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    centre = np.stack([xs, ys], axis=-1)

    class FakeDIS:
        def calc(self, prev, nxt, flow):
            forward = int(prev[0, 0]) < int(nxt[0, 0])
            return centre * (a if forward else -a / (1 + a))

    monkeypatch.setattr(lk_module.cv2, "DISOpticalFlow_create", lambda preset: FakeDIS())
    frames = np.stack([np.full((H, W, 3), 10 * (t + 1), np.uint8) for t in range(3)])
    q = queries_at(0, [[40.25, 30.75], [10.5, 50.0]])
    res = DISTracker(min_ncc=None).track(frames, q)
    assert res.visible.all()
    expect = (q[:, None, 1:3] - 0.5) * (1 + a) ** np.arange(3)[None, :, None] + 0.5
    np.testing.assert_allclose(res.tracks, expect, atol=1e-4)


@pytest.mark.parametrize(
    ("back", "visible"), [(-0.6, True), (0.0, True), (0.2, False), (-2.5, False)]
)
def test_dis_fb_check_and_confidence(monkeypatch, back, visible):
    # constant fake flows: forward +1 px in x, backward `back` px; FB error = |1 + back|,
    # tracked while <= fb_threshold (1 px, inclusive)
    class FakeDIS:
        def calc(self, prev, nxt, flow):
            forward = int(prev[0, 0]) < int(nxt[0, 0])
            out = np.zeros((H, W, 2), np.float32)
            out[..., 0] = 1.0 if forward else back
            return out

    monkeypatch.setattr(lk_module.cv2, "DISOpticalFlow_create", lambda preset: FakeDIS())
    frames = np.stack([np.full((H, W, 3), 10 * (t + 1), np.uint8) for t in range(2)])
    res = DISTracker(min_ncc=None).track(frames, queries_at(0, [[40.0, 30.0]]))
    fb_err = abs(1.0 + back)
    assert res.visible[0, 1] == visible
    if visible:
        np.testing.assert_allclose(res.tracks[0, 1], [41.0, 30.0], atol=1e-6)
        np.testing.assert_allclose(res.confidence[0, 1], np.exp(-fb_err), rtol=1e-6)
    else:
        np.testing.assert_array_equal(res.tracks[0, 1], [40.0, 30.0])  # held
        assert res.confidence[0, 1] == 0


def test_lk_loses_points_on_textureless_patches():
    # LK's minimum-eigenvalue test fails on a flat patch (status 0): the point is lost
    frames = translating_video(seed=9, num_frames=3, d=D)
    frames[:, 30:70, 40:90] = 128
    q = queries_at(0, [[65.0, 50.0], [20.0, 20.0]])
    res = LKTracker().track(frames, q)
    assert not res.visible[0, 1:].any()
    assert res.visible[1].all()


def test_bilinear_sample_is_exact_on_linear_fields():
    ys, xs = np.mgrid[0:10, 0:12].astype(np.float64)
    field = np.stack([2 * xs + 3 * ys, xs - ys], axis=-1)
    p = np.array([[0.0, 0.0], [3.25, 4.5], [10.9, 8.1], [11.0, 9.0]])
    expect = np.stack([2 * p[:, 0] + 3 * p[:, 1], p[:, 0] - p[:, 1]], axis=1)
    np.testing.assert_allclose(bilinear_sample(field, p), expect, atol=1e-12)
    # outside the pixel-centre grid the border value is held
    np.testing.assert_allclose(bilinear_sample(field, np.array([[-0.4, 2.0]])), [[6.0, -2.0]])


@pytest.mark.parametrize("tracker", [LKTracker(), DISTracker()], ids=["lk", "dis"])
def test_points_leaving_the_frame_become_invisible(tracker):
    d = (3.0, 0.4)
    frames = translating_video(seed=4, num_frames=12, d=d, h=64, w=96)
    xy = np.stack(np.meshgrid(np.linspace(55, 85, 7), np.linspace(16, 40, 4)), -1).reshape(-1, 2)
    q = queries_at(0, xy)
    res = tracker.track(frames, q)
    gt = truth(q, d, 12)
    x_true = gt[..., 0]
    assert res.visible[x_true < 96 - 10].all()  # well inside: tracked
    assert not res.visible[x_true >= 96].any()  # outside the image: not visible
    # lost for good, position held at the last visible one, which is inside the image
    leaving = np.flatnonzero((x_true >= 96).any(axis=1))
    assert leaving.size >= 10
    for i in leaving:
        lost = np.flatnonzero(~res.visible[i])
        assert (~res.visible[i, lost[0] :]).all()
        held = res.tracks[i, lost[0] :]
        np.testing.assert_array_equal(held, np.broadcast_to(res.tracks[i, lost[0] - 1], held.shape))
        assert (res.confidence[i, lost[0] :] == 0).all()
    assert (res.tracks[..., 0] < 96).all() and (res.tracks >= 0).all()
    interior = res.visible & (x_true < 96 - 10)
    tol = 0.1 if tracker.name == "lk" else 0.5
    assert np.abs(res.tracks - gt)[interior].max() < tol


def occluded_video():
    """6 frames moving by D; from frame 3 on, the box x in [30, 70), y in [40, 80) shows an
    unrelated static texture (an occluder)."""
    frames = translating_video(seed=5, num_frames=6, d=D)
    other = render(texture(105, min_wl=3.0, max_wl=8.0), lambda x, y: (x, y))
    frames[3:, 40:80, 30:70] = other[40:80, 30:70]
    return frames


@pytest.mark.parametrize("tracker", [LKTracker(), DISTracker()], ids=["lk", "dis"])
def test_content_swap_marks_points_invisible(tracker):
    frames = occluded_video()
    rng = np.random.default_rng(6)
    xy = np.stack([rng.uniform(5, W - 5, 600), rng.uniform(5, H - 5, 600)], 1)
    q = queries_at(0, xy)
    gt = truth(q, D, 6)
    x3, y3 = gt[:, 3, 0], gt[:, 3, 1]
    m = 8  # half an LK window: the whole patch is covered
    covered = (x3 > 30 + m) & (x3 < 70 - m) & (y3 > 40 + m) & (y3 < 80 - m)
    gap = np.maximum.reduce([30 - gt[..., 0], gt[..., 0] - 70, 40 - gt[..., 1], gt[..., 1] - 80])
    clear = (gap.min(axis=1) > 24) & (xy[:, 0] > 15) & (xy[:, 0] < W - 15)
    clear &= (xy[:, 1] > 15) & (xy[:, 1] < H - 15)
    assert covered.sum() >= 15 and clear.sum() >= 30

    res = tracker.track(frames, q)
    assert res.visible[covered, :3].all()
    assert not res.visible[covered, 3:].any()
    assert (res.confidence[covered, 3:] == 0).all()
    assert res.visible[clear].all()
    tol = 0.1 if tracker.name == "lk" else 0.5
    assert np.abs(res.tracks[clear] - gt[clear]).max() < tol


def test_fb_check_alone_catches_most_of_the_content_swap():
    # the forward-backward check by itself, without the appearance check
    frames = occluded_video()
    xy = np.stack(np.meshgrid(np.arange(41.0, 60.0, 1.5), np.arange(51.0, 70.0, 1.5)), -1)
    q = queries_at(0, xy.reshape(-1, 2) - 3 * np.asarray(D))  # covered at frame 3
    res = LKTracker(min_ncc=None).track(frames, q)
    assert res.visible[:, :3].all()
    # measured: 75% of them (the appearance check catches the rest, see the test above)
    assert (~res.visible[:, 3]).mean() >= 0.5


@pytest.mark.parametrize("d", [D, (1.6, 0.9)])
def test_dis_tracks_translation(d):
    frames = translating_video(seed=7, num_frames=5, d=d)
    q = queries_at(0, interior_points(40, seed=8))
    res = DISTracker().track(frames, q)
    check_query_frame(res, q)
    assert res.visible.all()
    err = np.linalg.norm(res.tracks - truth(q, d, 5), axis=-1)
    assert err.max() < 0.5, err.max()


def test_input_validation(video5):
    trk = LKTracker()
    with pytest.raises(ValueError, match="inside the image"):
        trk.track(video5, queries_at(0, [[W, 10.0]]))
    with pytest.raises(ValueError, match="integers"):
        trk.track(video5, np.array([[0.5, 10.0, 10.0]], np.float32))
    with pytest.raises(ValueError, match="integers"):
        trk.track(video5, queries_at(5, [[10.0, 10.0]]))
    with pytest.raises(ValueError, match="uint8"):
        trk.track(video5.astype(np.float32), queries_at(0, [[10.0, 10.0]]))
    empty = trk.track(video5, np.zeros((0, 3), np.float32))
    assert empty.tracks.shape == (0, 5, 2) and empty.visible.shape == (0, 5)
    with pytest.raises(ValueError):
        LKTracker(win_size=2)
    with pytest.raises(ValueError):
        LKTracker(fb_threshold=0)
    with pytest.raises(ValueError):
        DISTracker(preset="slow")
    with pytest.raises(ValueError):
        LKTracker(min_ncc=1.5)


def test_track_result_validate():
    ok = TrackResult(
        np.zeros((2, 3, 2), np.float32), np.zeros((2, 3), bool), np.zeros((2, 3), np.float32)
    )
    assert ok.validate(2, 3) is ok
    with pytest.raises(ValueError, match="shape"):
        ok.validate(2, 4)
    with pytest.raises(ValueError, match="dtype"):
        TrackResult(np.zeros((2, 3, 2)), ok.visible, None).validate(2, 3)
    with pytest.raises(ValueError, match="confidence"):
        TrackResult(ok.tracks, ok.visible, np.full((2, 3), 1.5, np.float32)).validate(2, 3)
    with pytest.raises(ValueError, match="non-finite"):
        TrackResult(np.full((2, 3, 2), np.nan, np.float32), ok.visible, None).validate(2, 3)


def test_make_tracker_registry(monkeypatch):
    lk = make_tracker("lk", win_size=21)
    assert isinstance(lk, LKTracker) and isinstance(lk, Tracker)
    assert lk.name == "lk" and lk.settings()["win_size"] == 21
    dis = make_tracker("dis")
    assert isinstance(dis, DISTracker) and dis.name == "dis"
    for trk in (lk, dis, LKTracker(min_ncc=None, fb_threshold=0.5)):
        assert json.loads(json.dumps(trk.settings())) == trk.settings()
        # settings round-trip through the registry (as when re-tracking from metadata)
        assert make_tracker(trk.name, **trk.settings()).settings() == trk.settings()
    names = "cotracker3_offline, cotracker3_online, dis, lk"
    with pytest.raises(ValueError, match=rf"unknown tracker 'cotracker'; choose one of: {names}"):
        make_tracker("cotracker")
    with pytest.raises(ValueError, match="tracker 'lk'"):
        make_tracker("lk", window=3)

    from datagen.track import registry

    monkeypatch.setattr(registry, "TRACKER_FACTORIES", dict(registry.TRACKER_FACTORIES))
    register_tracker("lk7", lambda **kw: LKTracker(win_size=7, **kw))
    assert make_tracker("lk7").settings()["win_size"] == 7


def _moving_occluder_video():
    """Background translating by d; an unrelated 16x16 textured patch sweeps right across the
    queried strip at 12 px/frame during frames 3..7 (it covers each point briefly)."""
    d = (0.6, -0.3)
    frames = translating_video(seed=11, num_frames=12, d=d)
    other = render(texture(111, min_wl=3.0, max_wl=8.0), lambda x, y: (x, y))
    cover = {}
    for t in range(3, 8):
        x0 = 20 + 12 * (t - 3)
        frames[t, 40:56, x0 : x0 + 16] = other[40:56, x0 : x0 + 16]
        cover[t] = (x0, x0 + 16)
    xy = np.stack(np.meshgrid(np.arange(24.0, 84.0, 4.0), np.arange(44.0, 53.0, 4.0)), -1)
    xy = np.concatenate([xy.reshape(-1, 2), [[30.0, 30.0], [60.0, 30.0], [90.0, 70.0]]])
    q = queries_at(0, xy)
    return frames, q, truth(q, d, 12), cover


def test_lk_recover_follows_and_reacquires_points_behind_a_moving_occluder():
    frames, q, gt, cover = _moving_occluder_video()
    res = make_tracker("lk_recover").track(frames, q)
    covered = np.zeros_like(res.visible)
    for t, (x0, x1) in cover.items():
        x, y = gt[:, t, 0], gt[:, t, 1]
        covered[:, t] = (x >= x0 - 2) & (x < x1 + 2) & (y >= 38) & (y < 58)
    assert covered.any(axis=1)[:-3].all()  # every strip point is covered at some frame
    # Covered means not visible (no false positives on the occluder)...
    assert not (res.visible & covered).any()
    # ...followed on their true position while hidden, and visible again (measured: within
    # two frames of the occluder leaving; the step off the occluder fails the NCC check).
    err = np.linalg.norm(res.tracks - gt, axis=-1)
    assert err.max() < 1.0, err.max()
    assert res.visible[:, 10:].all()
    # The default LK loses the covered points for good.
    plain = LKTracker().track(frames, q)
    assert not plain.visible[:-3, 10:].any()


@pytest.mark.xfail(
    strict=True,
    reason="measured: with recover=True many covered points lock onto the static occluder "
    "(no good neighbours within 30 px for the fallback) and are not re-acquired after it leaves",
)
def test_lk_recovers_a_point_after_a_static_occluder():
    # an unrelated textured bar covers the queried points for frames 4..6, then leaves
    d = (0.6, -0.3)
    frames = translating_video(seed=11, num_frames=12, d=d)
    other = render(texture(111, min_wl=3.0, max_wl=8.0), lambda x, y: (x, y))
    for t in (4, 5, 6):
        frames[t, :, 40:90] = other[:, 40:90]
    xy = np.stack(np.meshgrid(np.arange(52.0, 76.0, 4.0), np.arange(30.0, 66.0, 6.0)), -1)
    q = queries_at(0, xy.reshape(-1, 2))
    gt = truth(q, d, 12)
    res = make_tracker("lk_recover").track(frames, q)
    assert res.visible[:, :4].all()
    assert not res.visible[:, 4].any()  # lost as the occluder arrives
    assert res.visible[:, 8:].all()
    err = np.linalg.norm(res.tracks - gt, axis=-1)
    assert err[:, 8:].max() < 1.0, err[:, 8:].max()
