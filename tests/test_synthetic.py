"""Tests for the procedural video generator with exact ground truth (datagen.sources.synthetic)."""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pytest

from datagen.sources.synthetic import (
    COORD_LEVELS_PER_PX,
    SpriteSpec,
    SyntheticConfig,
    SyntheticVideo,
    build_scene,
    render_synthetic_video,
    texture_at,
)

SEEDS = (0, 1, 2)


@functools.cache
def _default_video(seed: int) -> SyntheticVideo:
    return render_synthetic_video(SyntheticConfig(), seed)


@functools.cache
def _coords_video(seed: int) -> SyntheticVideo:
    return render_synthetic_video(SyntheticConfig(texture="coordinates"), seed)


def _in_bounds(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    return (xy[..., 0] >= 0) & (xy[..., 0] < width) & (xy[..., 1] >= 0) & (xy[..., 1] < height)


def _window_ok(video: SyntheticVideo, t: int, col: int, row: int, obj: int, r: int) -> bool:
    """The (2r+1)^2 pixel window around (col, row) is in the image and entirely object obj."""
    _, h, w = video.masks.shape
    if col - r < 0 or row - r < 0 or col + r >= w or row + r >= h:
        return False
    return bool(np.all(video.masks[t, row - r : row + r + 1, col - r : col + r + 1] == obj))


# --------------------------------------------------------------------------------------------
# 1. Exactness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_integer_translation_patch_equals_query_patch(seed: int) -> None:
    """Pure integer motion: each track stays on pixel centres and the 5x5 patch around it is
    pixel-for-pixel the query patch of frame 0 (fails for a track off by 0.5 px or 1 px)."""
    cfg = SyntheticConfig(integer_motion=True)
    video = render_synthetic_video(cfg, seed)
    tracks, vis = video.tracks.astype(np.float64), video.visible
    inb = _in_bounds(tracks, cfg.width, cfg.height)
    # every in-bounds position is a pixel centre
    frac = tracks[inb] - np.floor(tracks[inb])
    assert np.all(frac == 0.5)

    r = 2
    checked = {0: 0, 1: 0}  # background / sprite checks with a non-zero displacement
    shifted_differs = shift_checked = 0
    total = 0
    for i in range(tracks.shape[0]):
        obj = int(video.object_ids[i])
        c0, r0 = (int(v) for v in np.floor(tracks[i, 0]))
        if not _window_ok(video, 0, c0, r0, obj, r):
            continue
        ref = video.frames[0, r0 - r : r0 + r + 1, c0 - r : c0 + r + 1]
        for t in range(1, cfg.num_frames):
            if not vis[i, t]:
                continue
            c, rr = (int(v) for v in np.floor(tracks[i, t]))
            if not _window_ok(video, t, c, rr, obj, r):
                continue
            patch = video.frames[t, rr - r : rr + r + 1, c - r : c + r + 1]
            np.testing.assert_array_equal(patch, ref, err_msg=f"track {i} frame {t}")
            total += 1
            if (c, rr) != (c0, r0):
                checked[int(obj > 0)] += 1
            if _window_ok(video, t, c + 1, rr, obj, r):
                neighbour = video.frames[t, rr - r : rr + r + 1, c + 1 - r : c + 2 + r]
                shifted_differs += int(not np.array_equal(neighbour, ref))
                shift_checked += 1
    assert total > 500 and shift_checked > 0.5 * total
    assert checked[0] > 100 and checked[1] > 100  # both kinds actually moved
    assert shifted_differs == shift_checked  # a one-pixel error would have been caught


def _interior(mask: np.ndarray, obj: int, r: int) -> np.ndarray:
    """(H, W) bool: the (2r+1)^2 window around the pixel lies in the image and is all obj."""
    h, w = mask.shape
    eq = mask == obj
    out = np.zeros_like(eq)
    core = np.ones((h - 2 * r, w - 2 * r), dtype=bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            core &= eq[r + dy : h - r + dy, r + dx : w - r + dx]
    out[r : h - r, r : w - r] = core
    return out


def _pixel_of(xy: np.ndarray, width: int, height: int):
    """Column/row of the pixel containing each point, clipped to the image (with in-bounds flag)."""
    cols = np.floor(xy[:, 0]).astype(int)
    rows = np.floor(xy[:, 1]).astype(int)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    return np.clip(cols, 0, width - 1), np.clip(rows, 0, height - 1), inside


@pytest.mark.parametrize("seed", SEEDS)
def test_frames_equal_texture_at_gt_coordinates(seed: int) -> None:
    """Rotating/scaling sprites, panning background: the pixel containing each tracked point
    shows the object's texture at the GT coordinate of that pixel centre, the GT position maps
    back to the query's local coordinate, and the texture has enough detail that a 0.5 px error
    in the mapping changes the value."""
    video = _default_video(seed)
    scene = video.scene
    cfg = scene.config
    offsets = np.asarray(video.meta["camera_offsets"])
    queries = video.queries[:, 1:].astype(np.float64)
    checked = {"sprite": 0, "background": 0}
    differs_half_px = 0
    for obj in range(scene.num_sprites + 1):
        sel = np.nonzero(video.object_ids == obj)[0]
        if obj > 0:
            u = scene.image_to_sprite(obj, 0, queries[sel])
        else:
            world = queries[sel] + offsets[0]
        for t in range(cfg.num_frames):
            if obj > 0:
                x64 = scene.sprite_to_image(obj, t, u)
                np.testing.assert_allclose(scene.image_to_sprite(obj, t, x64), u, atol=1e-6, rtol=0)
                # the stored float32 track round-trips to u up to float32 precision
                back = scene.image_to_sprite(obj, t, video.tracks[sel, t].astype(np.float64))
                np.testing.assert_allclose(back, u, atol=1e-4, rtol=0)
            else:
                x64 = world - offsets[t]
            expected = queries[sel] if t == 0 else x64
            assert np.array_equal(video.tracks[sel, t], expected.astype(np.float32))

            cols, rows, inside = _pixel_of(x64, cfg.width, cfg.height)
            # visible, and at least ~1 px away from its own edge and from any occluder edge
            ok = video.visible[sel, t] & inside & _interior(video.masks[t], obj, 1)[rows, cols]
            cols, rows = cols[ok], rows[ok]
            centres = np.stack([cols + 0.5, rows + 0.5], axis=-1)
            assert np.all(video.masks[t, rows, cols] == obj)
            half = centres + [0.5, 0.0]
            if obj > 0:
                coord = scene.image_to_sprite(obj, t, centres)
                coord_half = scene.image_to_sprite(obj, t, half)
            else:
                coord, coord_half = centres + offsets[t], half + offsets[t]
            pix = video.frames[t, rows, cols]
            np.testing.assert_array_equal(pix, texture_at(video, obj, coord))
            shifted = texture_at(video, obj, coord_half).astype(int)
            differs_half_px += int(np.sum(np.abs(shifted - pix).max(axis=-1) >= 2))
            checked["sprite" if obj else "background"] += int(ok.sum())
    assert checked["sprite"] > 1000 and checked["background"] > 1000
    assert differs_half_px > 0.75 * sum(checked.values())


def _wrap(d: np.ndarray) -> np.ndarray:
    return np.mod(d + 128.0, 256.0) - 128.0


def _decode_coordinates(frame, cols, rows, at, r: int = 2):
    """Decode the coordinate texture around pixels (cols, rows): unwrap the R/G levels of the
    (2r+1)^2 window (path unwrapping from the centre), fit an affine map pixel -> levels by least
    squares and evaluate it at the points `at`. Returns (levels (P, 2), Jacobian (P, 2, 2))."""
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    win = frame[rows[:, None, None] + dy, cols[:, None, None] + dx, :2].astype(np.float64)
    n = 2 * r + 1
    for j in list(range(r + 1, n)) + list(range(r - 1, -1, -1)):  # centre row
        ref = win[:, r, j - 1] if j > r else win[:, r, j + 1]
        win[:, r, j] = ref + _wrap(win[:, r, j] - ref)
    for i in list(range(r + 1, n)) + list(range(r - 1, -1, -1)):  # then each column
        ref = win[:, i - 1] if i > r else win[:, i + 1]
        win[:, i] = ref + _wrap(win[:, i] - ref)
    design = np.stack([np.ones(n * n), dx.ravel(), dy.ravel()], axis=1)
    coef = np.einsum("kn,pnc->pkc", np.linalg.pinv(design), win.reshape(-1, n * n, 2))
    off = at - np.stack([cols + 0.5, rows + 0.5], axis=-1)
    levels = coef[:, 0] + off[:, :1] * coef[:, 1] + off[:, 1:] * coef[:, 2]
    return levels, np.stack([coef[:, 1], coef[:, 2]], axis=-1)


@pytest.mark.parametrize("seed", SEEDS)
def test_tracks_match_decoded_image_content(seed: int) -> None:
    """Independent of the scene object: decode the sub-pixel coordinate that the frame shows at
    each tracked position (coordinate texture, 1/32 px levels) and compare it with the one shown
    at the query. Tracks agree to < 0.06 px; tracks shifted by 0.25 or 0.5 px are all rejected."""
    video = _coords_video(seed)
    cfg = video.scene.config
    assert COORD_LEVELS_PER_PX == 32
    frames, tracks, ids = video.frames, video.tracks.astype(np.float64), video.object_ids
    queries = video.queries[:, 1:].astype(np.float64)
    r = 2
    qc, qr, _ = _pixel_of(queries, cfg.width, cfg.height)
    errors, shifted_errors, moved = [], [], 0
    for obj in range(video.scene.num_sprites + 1):
        sel = np.nonzero((ids == obj) & _interior(video.masks[0], obj, r)[qr, qc])[0]
        ref, _ = _decode_coordinates(frames[0], qc[sel], qr[sel], queries[sel], r)
        for t in range(1, cfg.num_frames):
            x = tracks[sel, t]
            cols, rows, inside = _pixel_of(x, cfg.width, cfg.height)
            ok = video.visible[sel, t] & inside & _interior(video.masks[t], obj, r)[rows, cols]
            if not ok.any():
                continue
            for shift, sink in (
                ((0.0, 0.0), errors),
                ((0.5, 0.0), shifted_errors),
                ((0.0, -0.5), shifted_errors),
                ((0.2, 0.15), shifted_errors),  # a 0.25 px error is caught too
            ):
                levels, jac = _decode_coordinates(frames[t], cols[ok], rows[ok], x[ok] + shift, r)
                diff = _wrap(levels - ref[ok])
                err_px = np.linalg.solve(jac, diff[..., None])[..., 0]  # levels -> image px
                sink.append(np.linalg.norm(err_px, axis=-1))
            moved += int(np.sum(np.linalg.norm(x[ok] - queries[sel][ok], axis=-1) > 1.0))
    errors, shifted_errors = np.concatenate(errors), np.concatenate(shifted_errors)
    assert errors.size > 1000 and moved > 500
    assert errors.max() < 0.06, errors.max()
    assert shifted_errors.min() > 0.15, shifted_errors.min()


# --------------------------------------------------------------------------------------------
# 2. Determinism
# --------------------------------------------------------------------------------------------


def _arrays(v: SyntheticVideo):
    return (v.frames, v.tracks, v.visible, v.queries, v.masks, v.object_ids)


def test_determinism() -> None:
    a = render_synthetic_video(SyntheticConfig(), 7)
    b = render_synthetic_video(SyntheticConfig(), 7)
    c = render_synthetic_video(SyntheticConfig(seed=7))  # seed defaults to config.seed
    for x, y, z in zip(_arrays(a), _arrays(b), _arrays(c), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y) and np.array_equal(x, z)
    assert json.dumps(a.meta) == json.dumps(b.meta)
    d = render_synthetic_video(SyntheticConfig(), 8)
    assert not np.array_equal(a.frames, d.frames)
    assert a.tracks.shape != d.tracks.shape or not np.array_equal(a.tracks, d.tracks)
    assert not np.array_equal(a.masks, d.masks)


# --------------------------------------------------------------------------------------------
# 3. Occlusion
# --------------------------------------------------------------------------------------------


def test_crossing_sprites_occlude_and_reveal() -> None:
    back = SpriteSpec("square", (12.0, 12.0), center=(20.5, 48.5), velocity=(4.0, 0.0))
    front = SpriteSpec("disc", (14.0, 14.0), center=(107.5, 46.5), velocity=(-4.0, 0.0))
    cfg = SyntheticConfig(sprites=(back, front), camera_velocity=(1.0, 0.0), num_frames=24)
    video = render_synthetic_video(cfg, 3)
    tracks, vis, ids = video.tracks.astype(np.float64), video.visible, video.object_ids
    inb = _in_bounds(tracks, cfg.width, cfg.height)

    # the front sprite is never occluded
    assert np.array_equal(vis[ids == 2], inb[ids == 2])
    # back-sprite points disappear behind the disc while in the image and come back afterwards
    reappear = 0
    for i in np.nonzero(ids == 1)[0]:
        hidden = np.nonzero(inb[i] & ~vis[i])[0]
        if hidden.size and vis[i, : hidden[0]].any() and vis[i, hidden[-1] + 1 :].any():
            assert inb[i, hidden[0] : hidden[-1] + 1].all()
            reappear += 1
    assert reappear >= 10
    # background points are hidden by both sprites at some time
    assert (inb & ~vis)[ids == 0].any()

    # tracks sit on pixel centres here, so the mask at the track's pixel decides visibility
    n_checked = 0
    for i, t in zip(*np.nonzero(inb), strict=True):
        x = tracks[i, t]
        assert np.all(x - np.floor(x) == 0.5)
        m = video.masks[t, int(x[1]), int(x[0])]
        assert vis[i, t] == (m == ids[i]), (i, t, m)
        assert m >= ids[i]  # a point is never in front of what the mask shows
        n_checked += 1
    assert n_checked > 3000


@pytest.mark.parametrize("seed", SEEDS)
def test_visibility_agrees_with_masks_away_from_edges(seed: int) -> None:
    """Default scenes: where the 3x3 mask window around a track is uniform (so, shapes being
    convex, the continuous point lies in that region) visibility equals mask == own id."""
    video = _default_video(seed)
    _, h, w = video.masks.shape
    tracks = video.tracks.astype(np.float64)
    n_vis = n_hidden = 0
    for i, t in zip(*np.nonzero(_in_bounds(tracks, w, h)), strict=True):
        col, row = (int(v) for v in np.floor(tracks[i, t]))
        if col < 1 or row < 1 or col >= w - 1 or row >= h - 1:
            continue
        win = video.masks[t, row - 1 : row + 2, col - 1 : col + 2]
        if not np.all(win == win[0, 0]):
            continue
        own = video.object_ids[i]
        assert video.visible[i, t] == (win[0, 0] == own), (i, t)
        n_vis += int(video.visible[i, t])
        n_hidden += int(not video.visible[i, t])
    assert n_vis > 1000 and n_hidden > 50


# --------------------------------------------------------------------------------------------
# 4. Points leave the frame
# --------------------------------------------------------------------------------------------


def test_points_leave_the_frame() -> None:
    leaving = SpriteSpec(
        "rect", (10.0, 6.0), center=(100.5, 40.5), velocity=(3.5, 0.25), angular_velocity_deg=2.0
    )
    cfg = SyntheticConfig(sprites=(leaving,), camera_velocity=(-2.0, 0.0), num_frames=24)
    video = render_synthetic_video(cfg, 0)
    tracks, vis, ids = video.tracks.astype(np.float64), video.visible, video.object_ids
    inb = _in_bounds(tracks, cfg.width, cfg.height)
    assert not np.any(vis & ~inb)
    sprite = ids == 1
    assert sprite.sum() == cfg.points_per_sprite
    # no occluder in front of the only sprite: visible exactly while inside [0, W) x [0, H)
    assert np.array_equal(vis[sprite], inb[sprite])
    assert np.all(tracks[sprite, -1, 0] >= cfg.width) and not vis[sprite, -1].any()
    for i in np.nonzero(sprite)[0]:
        out = np.nonzero(~vis[i])[0]
        assert out.size and np.all(~vis[i, out[0] :])  # once out, stays out
    # background points pan out on the right too (camera moves left)
    bg = ids == 0
    assert np.any(tracks[bg][~inb[bg]][:, 0] >= cfg.width)


def test_edge_rules() -> None:
    """Image bounds are half-open ([0, W)); shapes are closed (an edge point is inside)."""
    # u = p - c is exact and x_t = c + 0.5 t + u: the query at x = 127.5 lands exactly on x = W.
    spec = SpriteSpec("square", (8.0, 8.0), center=(120.5, 48.5), velocity=(0.5, 0.0))
    cfg = SyntheticConfig(sprites=(spec,), num_frames=3, points_per_sprite=10_000)
    video = render_synthetic_video(cfg, 0)
    sprite = video.object_ids == 1
    x = video.tracks[sprite]
    on_edge = x[:, 1, 0] == cfg.width
    assert on_edge.any()
    assert not video.visible[sprite][on_edge, 1].any()
    assert video.visible[sprite][x[:, 1, 0] == cfg.width - 0.5, 1].all()
    scene = video.scene
    assert scene.contains(1, np.array([8.0, -8.0])) and scene.contains(1, np.array([0.0, 8.0]))
    assert not scene.contains(1, np.array([8.0 + 1e-9, 0.0]))
    disc = build_scene(SyntheticConfig(sprites=(SpriteSpec("disc", (4.0, 4.0), (50.0, 50.0)),)))
    assert disc.contains(1, np.array([4.0, 0.0])) and not disc.contains(1, np.array([3.0, 3.0]))


# --------------------------------------------------------------------------------------------
# 5. Shapes, dtypes, queries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg", [SyntheticConfig(), SyntheticConfig(num_frames=10, height=64, width=80, num_sprites=2)]
)
def test_shapes_dtypes_and_queries(cfg: SyntheticConfig) -> None:
    video = render_synthetic_video(cfg, 1)
    t, h, w = cfg.num_frames, cfg.height, cfg.width
    n = video.tracks.shape[0]
    assert video.frames.shape == (t, h, w, 3) and video.frames.dtype == np.uint8
    assert video.masks.shape == (t, h, w) and video.masks.dtype == np.int16
    assert video.tracks.shape == (n, t, 2) and video.tracks.dtype == np.float32
    assert video.visible.shape == (n, t) and video.visible.dtype == np.bool_
    assert video.queries.shape == (n, 3) and video.queries.dtype == np.float32
    assert video.object_ids.shape == (n,) and video.object_ids.dtype == np.int16
    counts = np.bincount(video.object_ids, minlength=cfg.num_sprites + 1)
    assert counts[0] == cfg.background_points
    assert np.all(counts[1:] <= cfg.points_per_sprite) and counts[1:].sum() > 0
    assert set(np.unique(video.masks)) <= set(range(cfg.num_sprites + 1))
    # queries are the tracks at their query frame (frame 0), at pixel centres, visible there
    assert np.all(video.queries[:, 0] == 0)
    assert np.array_equal(video.queries[:, 1:], video.tracks[:, 0])
    assert np.all(video.queries[:, 1:] - np.floor(video.queries[:, 1:]) == 0.5)
    assert video.visible[:, 0].all()
    cols, rows = (np.floor(video.queries[:, k]).astype(int) for k in (1, 2))
    assert np.array_equal(video.masks[0, rows, cols], video.object_ids)
    assert np.array_equal(video.tracks, video.tracks.astype(np.float64).astype(np.float32))
    json.dumps(video.meta)  # serialisable
    assert len(video.meta["camera_offsets"]) == t and len(video.meta["sprites"]) == cfg.num_sprites


def test_default_render_is_fast() -> None:
    render_synthetic_video(SyntheticConfig(), 11)
    start = time.perf_counter()
    render_synthetic_video(SyntheticConfig(), 12)
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------------
# 6. The default configuration is not easy
# --------------------------------------------------------------------------------------------


def test_default_config_is_not_easy() -> None:
    sprite_left = False
    for seed in (0, 1, 2, 3):
        video = (
            _default_video(seed)
            if seed in SEEDS
            else render_synthetic_video(SyntheticConfig(), seed)
        )
        cfg = video.scene.config
        assert cfg.num_frames >= 24 and video.frames.shape[0] >= 24
        sprites = video.meta["sprites"]
        assert max(abs(s["angles_deg"][-1] - s["angles_deg"][0]) for s in sprites) > 20.0
        assert max(max(s["scales"]) / min(s["scales"]) for s in sprites) > 1.2
        cam = np.asarray(video.meta["camera_offsets"])
        step = np.diff(cam, axis=0)
        assert np.linalg.norm(cam[-1] - cam[0]) > 5.0
        assert np.any(step != np.round(step))  # sub-pixel pan
        assert np.ptp(np.arctan2(step[:, 1], step[:, 0])) > 0.1  # direction changes
        tracks = video.tracks.astype(np.float64)
        inb = _in_bounds(tracks, cfg.width, cfg.height)
        ids = video.object_ids
        occluded = inb & ~video.visible
        assert occluded[ids > 0].any(axis=1).sum() >= 5  # sprite points hidden by sprites
        assert occluded[ids == 0].any(axis=1).sum() >= 5  # background hidden by sprites
        assert (~inb[ids == 0]).any(axis=1).sum() >= 5  # background leaves with the pan
        sprite_left |= bool((~inb[ids > 0]).any())
        # every sprite gets tracked points and the frame has every object visible at t=0
        assert set(np.unique(ids)) == set(range(cfg.num_sprites + 1))
    assert sprite_left


def test_exact_tracks_of_other_queries_agree_with_the_renderer_and_run_both_ways() -> None:
    from datagen.sources.synthetic import exact_tracks

    video = _default_video(0)
    scene = video.scene
    # The renderer's own queries give back its tracks bit for bit.
    tracks, visible, ids = exact_tracks(scene, video.queries)
    assert np.array_equal(tracks, video.tracks) and np.array_equal(visible, video.visible)
    assert np.array_equal(ids, video.object_ids)
    # A point tracked from frame 0 to frame 10, queried there, is tracked back to where it
    # started (later-frame queries, as the strided mode makes them).
    t0 = 10
    ok = visible[:, t0]
    later = np.concatenate([np.full((ok.sum(), 1), t0), tracks[ok, t0]], axis=1)
    back, vis_back, ids_back = exact_tracks(scene, later.astype(np.float32))
    assert np.array_equal(ids_back, ids[ok])
    np.testing.assert_allclose(back[:, 0], video.queries[ok, 1:], atol=2e-3)
    assert np.array_equal(back[:, t0], later[:, 1:].astype(np.float32))
    assert vis_back[:, t0].all()
    assert ok.sum() > 100


def test_smooth_texture_has_less_detail_and_the_same_scene():
    """texture="smooth" stretches every wavelength 8x: same scene (sprites, motion, colours),
    and the mean absolute horizontal gradient of the background drops by several times."""
    import dataclasses

    busy_cfg = SyntheticConfig(num_sprites=0)
    smooth_cfg = dataclasses.replace(busy_cfg, texture="smooth")

    def grad(cfg):
        frames = render_synthetic_video(cfg, seed=3).frames.astype(np.float64)
        return np.abs(np.diff(frames, axis=2)).mean()

    assert grad(busy_cfg) > 4 * grad(smooth_cfg)
    busy = render_synthetic_video(SyntheticConfig(), seed=5)
    smooth = render_synthetic_video(dataclasses.replace(SyntheticConfig(), texture="smooth"), 5)
    np.testing.assert_array_equal(busy.tracks, smooth.tracks)
    np.testing.assert_array_equal(busy.visible, smooth.visible)
    np.testing.assert_array_equal(busy.masks, smooth.masks)
