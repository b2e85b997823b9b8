"""Query sampling: exact values, raster convention, determinism."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datagen.track.queries import (
    _inside_float32,
    grid_queries,
    random_queries,
    restrict_to_mask,
    sift_queries,
    strided_queries,
)


def test_grid_at_cotracker_resolution():
    g = 5
    q = grid_queries(g, 384, 512, frame=3)
    assert q.dtype == np.float32 and q.shape == (g * g, 3)
    assert (q[:, 0] == 3).all()
    # pixel-centre (8, 8) .. (504, 376), margin 512 / 64 = 8, plus 0.5 for raster
    np.testing.assert_array_equal(q[0, 1:], [8.5, 8.5])
    np.testing.assert_array_equal(q[-1, 1:], [504.5, 376.5])
    # row-major: x runs fastest, step (512 - 16) / 4 = 124 in x and (384 - 16) / 4 = 92 in y
    np.testing.assert_array_equal(q[1, 1:], [132.5, 8.5])
    np.testing.assert_array_equal(q[g, 1:], [8.5, 100.5])
    xs = q[:, 1].reshape(g, g)
    ys = q[:, 2].reshape(g, g)
    assert (xs == xs[0]).all() and (ys == ys[:, :1]).all()


def test_grid_rescaled_to_video_size():
    q = grid_queries(5, 480, 720)
    # point (row 1, col 3): model coords x = 8 + 496 * 3/4 = 380, y = 8 + 368/4 = 100, scaled
    # with align_corners: x * 719/511, y * 479/383, then +0.5 for raster
    np.testing.assert_allclose(q[1 * 5 + 3, 1:], [535.17710372, 125.56527415], rtol=1e-6)
    np.testing.assert_allclose(q[0, 1:], [8 * 719 / 511 + 0.5, 8 * 479 / 383 + 0.5], rtol=1e-6)
    np.testing.assert_allclose(q[-1, 1:], [504 * 719 / 511 + 0.5, 376 * 479 / 383 + 0.5])
    assert (q[:, 1] < 720).all() and (q[:, 2] < 480).all()


def test_grid_single_point_and_errors():
    q = grid_queries(1, 480, 720)
    np.testing.assert_allclose(q, [[0, 256 * 719 / 511 + 0.5, 192 * 479 / 383 + 0.5]])
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError):
            grid_queries(bad, 480, 720)


def test_random_queries_deterministic_and_in_bounds():
    a = random_queries(5000, 480, 720, num_frames=8, seed=11)
    b = random_queries(5000, 480, 720, num_frames=8, seed=11)
    c = random_queries(5000, 480, 720, num_frames=8, seed=12)
    assert a.dtype == np.float32 and a.shape == (5000, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    t, x, y = a.T
    assert (t == np.round(t)).all() and set(np.unique(t)) == set(range(8))
    assert (x >= 0).all() and (x < 720).all() and (y >= 0).all() and (y < 480).all()
    # uniform: the mean is near the middle (5000 samples: std of the mean ~3 px in x)
    assert abs(x.mean() - 360) < 15 and abs(y.mean() - 240) < 10


def test_random_queries_frames_and_float32_edge():
    q = random_queries(1000, 4, 6, num_frames=10, seed=0, frames=[2, 7])
    assert set(np.unique(q[:, 0])) == {2.0, 7.0}
    # a float64 sample just below the width would round up to it in float32: it is clamped
    assert np.float32(719.99999999) == 720
    edge = _inside_float32(np.array([719.99999999, 0.0, 12.25]), 720)
    assert edge.dtype == np.float32 and edge[0] < 720 and edge[1] == 0 and edge[2] == 12.25
    with pytest.raises(ValueError):
        random_queries(3, 4, 6, num_frames=10, seed=0, frames=[10])


def _textured_frame(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 2.0)
    img = np.clip((img - img.mean()) / img.std() * 50 + 128, 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1)


def test_sift_queries_are_strongest_keypoints_in_raster():
    frame = _textured_frame()
    q = sift_queries(frame, 20, frame=4, seed=0)
    assert q.dtype == np.float32 and q.shape == (20, 3)
    assert (q[:, 0] == 4).all()
    assert (q[:, 1] >= 0).all() and (q[:, 1] < 128).all()
    assert (q[:, 2] >= 0).all() and (q[:, 2] < 96).all()
    assert len(np.unique(q[:, 1:], axis=0)) == 20
    kps = cv2.SIFT_create().detect(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), None)
    assert len(kps) >= 20
    best = max(kps, key=lambda k: k.response)
    np.testing.assert_allclose(q[0, 1:], np.array(best.pt) + 0.5, rtol=1e-6)
    np.testing.assert_array_equal(sift_queries(frame, 20, frame=4, seed=0), q)


def test_sift_queries_fill_with_random_points():
    flat = np.full((40, 50, 3), 90, np.uint8)
    q = sift_queries(flat, 7, frame=2, seed=3)
    np.testing.assert_array_equal(q, random_queries(7, 40, 50, 3, seed=3, frames=[2]))
    # one blob gives a few keypoints; the rest is random, appended after them
    blob = flat.copy()
    cv2.circle(blob, (25, 20), 5, (250, 250, 250), -1)
    kps = cv2.SIFT_create().detect(cv2.cvtColor(blob, cv2.COLOR_RGB2GRAY), None)
    found = np.unique(np.array([k.pt for k in kps], np.float32) + 0.5, axis=0)
    assert 0 < len(found) < 50
    q = sift_queries(blob, 50, seed=3)
    k = len(found)
    np.testing.assert_array_equal(np.unique(q[:k, 1:], axis=0), found)
    np.testing.assert_array_equal(q[k:], random_queries(50 - k, 40, 50, 1, seed=3))


def test_strided_queries():
    base = np.array([[1.5, 2.5], [10.0, 20.0]], np.float32)
    q = strided_queries(base, num_frames=10, stride=4)
    expect = [
        [0, 1.5, 2.5],
        [0, 10.0, 20.0],
        [4, 1.5, 2.5],
        [4, 10.0, 20.0],
        [8, 1.5, 2.5],
        [8, 10.0, 20.0],
    ]
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q, expect)
    assert strided_queries(base, num_frames=1, stride=5).shape == (2, 3)
    with pytest.raises(ValueError):
        strided_queries(base, num_frames=10, stride=0)


def test_restrict_to_mask_uses_floor_of_raster_coordinates():
    mask = np.zeros((4, 6), bool)
    mask[2, 3] = True
    mask[0, 0] = True
    q = np.array(
        [
            [0, 3.99, 2.0],  # pixel (row 2, col 3): in
            [1, 4.0, 2.5],  # col 4: out
            [2, 3.5, 1.999],  # row 1: out
            [3, 0.0, 0.0],  # corner of pixel (0, 0): in
            [4, -0.01, 0.5],  # outside the image
            [5, 6.0, 3.0],  # outside the image
        ],
        np.float32,
    )
    np.testing.assert_array_equal(restrict_to_mask(q, mask)[:, 0], [0, 3])
    with pytest.raises(ValueError):
        restrict_to_mask(q, mask.astype(np.uint8))


# --- the build's sampler ----------------------------------------------------------------------

from datagen.track.queries import QuerySampler, first_frame_rows  # noqa: E402


def test_sampler_methods_equal_the_functions_they_name():
    h, w, t = 48, 64, 20
    np.testing.assert_array_equal(QuerySampler("grid", grid_size=7).sample(h, w, t, 1),
                                  grid_queries(7, h, w))  # fmt: skip
    s = QuerySampler("strided", grid_size=3, stride=8)
    expect = strided_queries(grid_queries(3, h, w)[:, 1:], t, 8)
    np.testing.assert_array_equal(s.sample(h, w, t, 1), expect)
    assert s.max_points(t) == 9 * 3 == len(expect)
    np.testing.assert_array_equal(first_frame_rows(expect), np.arange(9))
    from datagen.sources.synthetic import SyntheticConfig, render_synthetic_video

    frame = render_synthetic_video(SyntheticConfig(num_frames=1), 0).frames[0]
    sift = QuerySampler("sift", num_queries=30).sample(96, 128, 1, 5, first_frame=frame)
    # a textured frame has more than 30 keypoints: no random top-up, the seed plays no part
    np.testing.assert_array_equal(sift, sift_queries(frame, 30, seed=12345))


def test_random_sampler_differs_per_video_and_repeats_per_seed():
    s = QuerySampler("random", num_queries=50)
    a, b, a2 = s.sample(30, 40, 8, 7), s.sample(30, 40, 8, 8), s.sample(30, 40, 8, 7)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)
    assert (a[:, 0] == 0).all() and (a[:, 1] < 40).all() and (a[:, 2] < 30).all()
    assert a.min() >= 0


def test_mask_keeps_exactly_the_queries_on_the_object():
    h, w = 40, 60
    mask = np.zeros((h, w), bool)
    mask[5:20, 10:35] = True
    q = QuerySampler("grid", grid_size=12, mask="objects").sample(h, w, 4, 0, mask=mask)
    full = grid_queries(12, h, w)
    naive = [p for p in full if mask[int(p[2]), int(p[1])]]
    np.testing.assert_array_equal(q, np.array(naive, np.float32))
    assert 0 < len(q) < len(full)
    with pytest.raises(ValueError, match="keeps none"):
        QuerySampler("grid", mask="objects").sample(h, w, 4, 0, mask=np.zeros((h, w), bool))
    with pytest.raises(ValueError, match="needs the first frame's object mask"):
        QuerySampler("grid", mask="objects").sample(h, w, 4, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "harris"}, "not one of grid, random, sift, strided"),
        ({"num_queries": 0}, "num_queries must be a positive integer"),
        ({"stride": 0}, "stride must be a positive integer"),
        ({"mask": "people"}, "query mask 'people'"),
        ({"method": "strided", "mask": "objects"}, "cannot restrict strided"),
    ],
)
def test_sampler_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuerySampler(**kwargs)


def test_sift_sampler_needs_the_frame():
    with pytest.raises(ValueError, match="first frame"):
        QuerySampler("sift").sample(10, 10, 2, 0)
