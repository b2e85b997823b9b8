"""Procedural videos with exact point-track ground truth.

Used to calibrate point trackers: every pixel of every frame is produced by a closed-form scene
model, so the position, visibility and appearance of every tracked point is known exactly.

Conventions (shared with the rest of ``datagen``)
-------------------------------------------------
* RASTER pixel coordinates: ``(0, 0)`` is the top-left corner of the top-left pixel, pixel
  ``(col, row)`` covers ``[col, col+1) x [row, row+1)`` and its centre is ``(col+0.5, row+0.5)``.
* ``frames`` uint8 ``(T, H, W, 3)`` RGB; ``tracks`` float32 ``(N, T, 2)`` ``(x, y)`` raster;
  ``visible`` bool ``(N, T)``; ``queries`` float32 ``(N, 3)`` ``(t, x, y)``; ``masks`` int16
  ``(T, H, W)`` object id per pixel (0 = background, k = sprite k); ``object_ids`` int16 ``(N,)``.

Scene model
-----------
* **Background**: a continuous texture ``B(w)`` over the infinite world plane (so it is larger
  than any frame), seen through a camera that pans: image point ``p`` at frame ``t`` shows world
  point ``w = p + o_t``.  ``o_t`` (``camera_offsets``) moves by a sub-pixel step per frame whose
  direction does a random walk.
* **Sprites** ``k = 1..K``: flat shapes (square, disc, rect, ellipse) defined in sprite-local
  coordinates ``u`` (``|u_x| <= a, |u_y| <= b`` or ``(u_x/a)^2 + (u_y/b)^2 <= 1``), each with its
  own texture ``S_k(u)`` and a similarity motion
  ``A_kt(u) = c_k(t) + s_k(t) R(theta_k(t)) u`` (image coordinates), with
  ``c_k(t) = c_k + v_k t + acc_k t^2 / 2``, ``theta_k(t) = theta_k + omega_k t`` and
  ``s_k(t) = s_k exp(r_k t)``.
* **Depth**: the object id is the depth rank; a higher id is nearer the camera, so sprite ``K``
  occludes everything and the background (id 0) is behind everything.
* **Textures** are continuous functions evaluated exactly at the sample point (no texture
  image, no interpolation): ``"sinusoid"`` (default) is a base colour plus a sum of random 2-D
  sinusoids per object, with detail down to a 3 px wavelength on the background and 5 local px on
  sprites; ``"smooth"`` is the same with every wavelength 8x longer (detail down to 24 px on the
  background and 40 local px on sprites: little texture inside a tracker's window, as in
  generated videos with soft surfaces); ``"coordinates"`` is a debug texture that encodes the
  coordinate itself
  (``R = round(32 u_x) mod 256``, ``G = round(32 u_y) mod 256``, ``B`` = per-object constant), so
  the sub-pixel position can be decoded back from a frame.  Values are quantised with
  ``clip(floor(f + 0.5), 0, 255)``.

Rendering is by inverse mapping: for each pixel centre ``p`` the frontmost sprite ``k`` with
``A_kt^{-1}(p)`` inside its shape gives ``S_k(A_kt^{-1}(p))``; otherwise the pixel is
``B(p + o_t)``.  ``masks`` is the id of that object.

Ground truth
------------
Queries are pixel centres of frame 0 (``t = 0``), sampled on the visible part of every sprite
(``points_per_sprite``) and on the visible background (``background_points``).  A sprite point
with local coordinate ``u`` is at ``A_kt(u)`` at frame ``t``; a background point with world
coordinate ``w`` is at ``w - o_t`` (computed in float64, stored as float32; at the query frame the
stored position is the query pixel centre exactly).  The point is visible at frame ``t`` iff its
float64 position ``x`` lies in ``[0, W) x [0, H)`` and no object with a higher id contains ``x``
(evaluated on the continuous shapes, not on the rasterised mask).

Edge rule: shapes are CLOSED sets: a point exactly on a shape's edge is inside it (so it is
covered by, and rendered with, that sprite).  Image bounds are half-open: ``x == W`` or ``y == H``
is outside.  The same predicate drives ``masks`` (at pixel centres) and ``visible`` (at track
positions), so they agree exactly wherever a track sits on a pixel centre.

Determinism: the same ``(config, seed)`` gives bit-identical arrays on a given platform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from datagen.sources.textures import SeparableSinusoids, Sinusoids, hsv_to_rgb, quantise

SHAPES = ("square", "disc", "rect", "ellipse")
TEXTURES = ("sinusoid", "coordinates", "smooth")
SMOOTH_WAVELENGTH_SCALE = 8.0
"""How much longer every texture wavelength is with ``texture="smooth"``."""

# Coordinate texture: levels per local/world pixel (so an 8 px period).
COORD_LEVELS_PER_PX = 32


@dataclass(frozen=True)
class SpriteSpec:
    """Explicit parameters of one sprite (image coordinates, frames as time unit).

    ``shape`` is ``"rect"`` or ``"ellipse"`` (``"square"``/``"disc"`` are accepted as aliases);
    ``half_size`` = ``(a, b)`` local half extents at scale 1; ``center`` = image position of the
    local origin at frame 0; ``scale_rate`` is d(log scale)/d(frame).
    """

    shape: str
    half_size: tuple[float, float]
    center: tuple[float, float]
    velocity: tuple[float, float] = (0.0, 0.0)
    acceleration: tuple[float, float] = (0.0, 0.0)
    angle_deg: float = 0.0
    angular_velocity_deg: float = 0.0
    scale: float = 1.0
    scale_rate: float = 0.0


@dataclass
class SyntheticConfig:
    """Parameters of the random scene distribution.

    Ranges given as ``(lo, hi)`` of a magnitude are sampled uniformly with a random sign.
    ``sprites`` replaces the random sprites by explicit ones (``num_sprites`` is then ignored;
    textures stay random); ``camera_velocity`` replaces the random pan by a constant one.
    ``integer_motion`` snaps the scene (random or explicit sprites, and the camera) to pure
    integer translations (no rotation/scale/acceleration, integer per-frame velocities, centres
    on a 0.5 px grid), so every pixel centre maps to a pixel centre.
    """

    num_frames: int = 24
    height: int = 96
    width: int = 128
    num_sprites: int = 4
    shapes: tuple[str, ...] = SHAPES
    sprite_size_range: tuple[float, float] = (9.0, 20.0)  # local half extent, px at scale 1
    max_speed: float = 2.5  # px/frame; initial speed ~ U(0.3, 1) * max_speed
    max_accel: float = 0.06  # px/frame^2
    rotation_range_deg: tuple[float, float] = (0.5, 4.0)  # |deg/frame|
    initial_scale_range: tuple[float, float] = (0.8, 1.25)
    scale_rate_range: tuple[float, float] = (0.005, 0.02)  # |d log(scale) / d frame|
    camera_pan_speed: float = 0.8  # px/frame
    camera_pan_turn_deg: float = 8.0  # max change of pan direction per frame
    points_per_sprite: int = 48
    background_points: int = 96
    texture: str = "sinusoid"
    texture_scale: float = 1.0
    """Every texture wavelength is this many times longer (sinusoid and smooth textures)."""
    integer_motion: bool = False
    sprites: tuple[SpriteSpec, ...] | None = None
    camera_velocity: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError("num_frames, height and width must be positive")
        if not self.texture_scale > 0:
            raise ValueError(f"texture_scale must be positive, got {self.texture_scale!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {self.texture!r}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {self.shapes}")
        if self.sprites is not None:
            self.sprites = tuple(self.sprites)
            for spec in self.sprites:
                if spec.shape not in SHAPES:
                    raise ValueError(f"unknown sprite shape {spec.shape!r}")
        if self.num_sprites < 0 or self.points_per_sprite < 0 or self.background_points < 0:
            raise ValueError("counts must be non-negative")


@dataclass
class SyntheticVideo:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    tracks: np.ndarray  # float32 (N, T, 2) raster (x, y)
    visible: np.ndarray  # bool (N, T)
    queries: np.ndarray  # float32 (N, 3) (t, x, y)
    masks: np.ndarray  # int16 (T, H, W)
    object_ids: np.ndarray  # int16 (N,)
    meta: dict[str, Any]
    scene: SyntheticScene | None = field(default=None, repr=False, compare=False)


class SyntheticScene:
    """The continuous scene behind a :class:`SyntheticVideo` (all maths in float64).

    ``object_id`` 0 is the background (coordinates = world coordinates), ``1..K`` are sprites
    (coordinates = sprite-local coordinates).
    """

    def __init__(
        self,
        config: SyntheticConfig,
        seed: int,
        sprites: list[SpriteSpec],
        camera_offsets: np.ndarray,
        textures: list[Sinusoids],
    ) -> None:
        self.config = config
        self.seed = seed
        self.num_frames = config.num_frames
        self.height = config.height
        self.width = config.width
        self.sprites = sprites
        self.num_sprites = len(sprites)
        self.camera_offsets = np.asarray(camera_offsets, dtype=np.float64)  # (T, 2)
        self.textures = textures
        t = np.arange(self.num_frames, dtype=np.float64)
        k = self.num_sprites
        self.centers = np.zeros((k, self.num_frames, 2))
        self.angles = np.zeros((k, self.num_frames))  # radians
        self.scales = np.ones((k, self.num_frames))
        self.half_sizes = np.zeros((k, 2))
        self.is_ellipse = np.zeros(k, dtype=bool)
        for i, sp in enumerate(sprites):
            for d in range(2):
                self.centers[i, :, d] = (
                    sp.center[d] + sp.velocity[d] * t + 0.5 * sp.acceleration[d] * t * t
                )
            self.angles[i] = math.radians(sp.angle_deg) + math.radians(sp.angular_velocity_deg) * t
            self.scales[i] = sp.scale * np.exp(sp.scale_rate * t)
            self.half_sizes[i] = sp.half_size
            self.is_ellipse[i] = sp.shape in ("disc", "ellipse")
        self._cos = np.cos(self.angles)
        self._sin = np.sin(self.angles)
        self.pixel_centres = np.stack(
            np.meshgrid(
                np.arange(self.width, dtype=np.float64) + 0.5,
                np.arange(self.height, dtype=np.float64) + 0.5,
            ),
            axis=-1,
        )  # (H, W, 2) (x, y)

    # --- geometry ---------------------------------------------------------------------------
    def _check_sprite(self, object_id: int) -> int:
        if not 1 <= object_id <= self.num_sprites:
            raise ValueError(f"sprite object_id must be in 1..{self.num_sprites}, got {object_id}")
        return object_id - 1

    def sprite_to_image(self, object_id: int, t: int, u: np.ndarray) -> np.ndarray:
        """``A_kt(u)``: sprite-local ``(..., 2)`` -> image raster ``(..., 2)`` at frame ``t``."""
        i = self._check_sprite(object_id)
        u = np.asarray(u, dtype=np.float64)
        cx, cy = self.centers[i, t]
        s, co, si = self.scales[i, t], self._cos[i, t], self._sin[i, t]
        ux, uy = u[..., 0], u[..., 1]
        return np.stack([cx + s * (co * ux - si * uy), cy + s * (si * ux + co * uy)], axis=-1)

    def image_to_sprite(self, object_id: int, t: int, x: np.ndarray) -> np.ndarray:
        """``A_kt^{-1}(x)``: image raster ``(..., 2)`` -> sprite-local ``(..., 2)``."""
        i = self._check_sprite(object_id)
        x = np.asarray(x, dtype=np.float64)
        cx, cy = self.centers[i, t]
        s, co, si = self.scales[i, t], self._cos[i, t], self._sin[i, t]
        dx, dy = x[..., 0] - cx, x[..., 1] - cy
        return np.stack([(co * dx + si * dy) / s, (co * dy - si * dx) / s], axis=-1)

    def image_to_world(self, t: int, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) + self.camera_offsets[t]

    def world_to_image(self, t: int, w: np.ndarray) -> np.ndarray:
        return np.asarray(w, dtype=np.float64) - self.camera_offsets[t]

    def contains(self, object_id: int, u: np.ndarray) -> np.ndarray:
        """Whether local points ``u`` lie in the (closed) shape of sprite ``object_id``."""
        i = self._check_sprite(object_id)
        u = np.asarray(u, dtype=np.float64)
        a, b = self.half_sizes[i]
        if self.is_ellipse[i]:
            return (u[..., 0] / a) ** 2 + (u[..., 1] / b) ** 2 <= 1.0
        return (np.abs(u[..., 0]) <= a) & (np.abs(u[..., 1]) <= b)

    def object_at(self, t: int, x: np.ndarray) -> np.ndarray:
        """Id (int16) of the frontmost object containing image points ``x`` ``(..., 2)``."""
        x = np.asarray(x, dtype=np.float64)
        ids = np.zeros(x.shape[:-1], dtype=np.int16)
        for obj in range(1, self.num_sprites + 1):
            ids[self.contains(obj, self.image_to_sprite(obj, t, x))] = obj
        return ids

    def _pixel_box(self, object_id: int, t: int) -> tuple[int, int, int, int]:
        """Pixel range (x0, x1, y0, y1) that contains every pixel centre the sprite can cover."""
        a, b = self.half_sizes[object_id - 1]
        corners = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
        c = self.sprite_to_image(object_id, t, corners)
        lo = np.floor(c.min(axis=0) - 2.0)
        hi = np.ceil(c.max(axis=0) + 2.0)
        x0 = int(np.clip(lo[0], 0, self.width))
        x1 = int(np.clip(hi[0], 0, self.width))
        y0 = int(np.clip(lo[1], 0, self.height))
        y1 = int(np.clip(hi[1], 0, self.height))
        return x0, x1, y0, y1

    # --- appearance ---------------------------------------------------------------------------
    def texture(self, object_id: int, coords: np.ndarray) -> np.ndarray:
        """Quantised texture (uint8 ``(..., 3)``) of an object at its own coordinates.

        ``coords`` are world coordinates for the background (``object_id`` 0) and sprite-local
        coordinates for a sprite.
        """
        if not 0 <= object_id <= self.num_sprites:
            raise ValueError(f"object_id must be in 0..{self.num_sprites}, got {object_id}")
        coords = np.asarray(coords, dtype=np.float64)
        shape = coords.shape[:-1]
        x = coords[..., 0].ravel()
        y = coords[..., 1].ravel()
        if self.config.texture == "coordinates":
            out = np.empty((x.size, 3), dtype=np.uint8)
            out[:, 0] = np.mod(np.floor(COORD_LEVELS_PER_PX * x + 0.5), 256).astype(np.uint8)
            out[:, 1] = np.mod(np.floor(COORD_LEVELS_PER_PX * y + 0.5), 256).astype(np.uint8)
            out[:, 2] = (64 + 40 * object_id) % 256
        else:
            out = quantise(self.textures[object_id](x, y))
        return out.reshape(*shape, 3)

    def _background_frame(self, t: int) -> np.ndarray:
        """``texture(0, image_to_world(t, pixel_centres))``, computed separably (same bits)."""
        o = self.camera_offsets[t]
        if self.config.texture == "coordinates":
            return self.texture(0, self.image_to_world(t, self.pixel_centres))
        xs = self.pixel_centres[0, :, 0] + o[0]
        ys = self.pixel_centres[:, 0, 1] + o[1]
        return quantise(self.textures[0].grid(xs, ys))

    def render_frame(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``t`` (uint8 ``(H, W, 3)``) and its object-id mask (int16 ``(H, W)``)."""
        frame = self._background_frame(t)
        mask = np.zeros((self.height, self.width), dtype=np.int16)
        # Back to front: the last sprite written at a pixel is the frontmost one containing it,
        # which is exactly the front-to-back walk of the inverse mapping.
        for obj in range(1, self.num_sprites + 1):
            x0, x1, y0, y1 = self._pixel_box(obj, t)
            if x0 >= x1 or y0 >= y1:
                continue
            u = self.image_to_sprite(obj, t, self.pixel_centres[y0:y1, x0:x1])
            inside = self.contains(obj, u)
            if not inside.any():
                continue
            frame[y0:y1, x0:x1][inside] = self.texture(obj, u[inside])
            mask[y0:y1, x0:x1][inside] = obj
        return frame, mask


def texture_at(
    video_or_scene: SyntheticVideo | SyntheticScene, object_id: int, coords: np.ndarray
) -> np.ndarray:
    """Quantised texture of ``object_id`` at its own coordinates (world for 0, local for k>0)."""
    scene = video_or_scene.scene if isinstance(video_or_scene, SyntheticVideo) else video_or_scene
    if scene is None:
        raise ValueError("this SyntheticVideo carries no scene")
    return scene.texture(object_id, coords)


def _random_sign(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi) * rng.choice([-1.0, 1.0]))


def _random_sprites(config: SyntheticConfig, rng: np.random.Generator) -> list[SpriteSpec]:
    specs = []
    w, h = config.width, config.height
    for _ in range(config.num_sprites):
        shape = str(rng.choice(config.shapes))
        a = float(rng.uniform(*config.sprite_size_range))
        b = float(rng.uniform(*config.sprite_size_range)) if shape in ("rect", "ellipse") else a
        center = (float(rng.uniform(0.15 * w, 0.85 * w)), float(rng.uniform(0.15 * h, 0.85 * h)))
        speed = float(rng.uniform(0.3, 1.0)) * config.max_speed
        heading = float(rng.uniform(0, 2 * math.pi))
        acc_r = config.max_accel * math.sqrt(float(rng.uniform()))
        acc_a = float(rng.uniform(0, 2 * math.pi))
        specs.append(
            SpriteSpec(
                shape=shape,
                half_size=(a, b),
                center=center,
                velocity=(speed * math.cos(heading), speed * math.sin(heading)),
                acceleration=(acc_r * math.cos(acc_a), acc_r * math.sin(acc_a)),
                angle_deg=float(rng.uniform(0, 360)),
                angular_velocity_deg=_random_sign(rng, config.rotation_range_deg),
                scale=float(rng.uniform(*config.initial_scale_range)),
                scale_rate=_random_sign(rng, config.scale_rate_range),
            )
        )
    return specs


def _snap_integer(spec: SpriteSpec) -> SpriteSpec:
    return SpriteSpec(
        shape=spec.shape,
        half_size=spec.half_size,
        center=(round(2 * spec.center[0]) / 2, round(2 * spec.center[1]) / 2),
        velocity=(float(round(spec.velocity[0])), float(round(spec.velocity[1]))),
    )


def _camera_offsets(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    t_count = config.num_frames
    o0 = rng.uniform(0.0, 512.0, 2)
    if config.camera_velocity is not None:
        vel = np.tile(np.asarray(config.camera_velocity, dtype=np.float64), (t_count, 1))
    else:
        turn = math.radians(config.camera_pan_turn_deg)
        heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.uniform(-turn, turn, t_count))
        speed = config.camera_pan_speed * rng.uniform(0.7, 1.3, t_count)
        vel = np.stack([speed * np.cos(heading), speed * np.sin(heading)], axis=-1)
    if config.integer_motion:
        o0 = np.round(o0)
        vel = np.round(vel)
    offsets = np.zeros((t_count, 2))
    offsets[0] = o0
    for t in range(1, t_count):
        offsets[t] = offsets[t - 1] + vel[t - 1]
    return offsets


def build_scene(config: SyntheticConfig, seed: int | None = None) -> SyntheticScene:
    """The continuous scene for ``(config, seed)`` (``seed`` defaults to ``config.seed``)."""
    seed = config.seed if seed is None else int(seed)
    motion_ss, camera_ss, texture_ss = np.random.SeedSequence(seed).spawn(3)
    motion_rng = np.random.default_rng(motion_ss)
    if config.sprites is not None:
        sprites = list(config.sprites)
    else:
        sprites = _random_sprites(config, motion_rng)
    if config.integer_motion:
        sprites = [_snap_integer(s) for s in sprites]
    camera = _camera_offsets(config, np.random.default_rng(camera_ss))

    trng = np.random.default_rng(texture_ss)
    scale = config.texture_scale * (SMOOTH_WAVELENGTH_SCALE if config.texture == "smooth" else 1.0)
    textures = [
        SeparableSinusoids(
            trng,
            trng.uniform(80, 170, 3),
            24,
            wavelengths=(3.0 * scale, 48.0 * scale),
            amps=(6.0, 16.0),
        )
    ]
    hue0 = float(trng.uniform())
    for k in range(len(sprites)):
        hue = (hue0 + k / max(len(sprites), 1) + trng.uniform(-0.05, 0.05)) % 1.0
        base = hsv_to_rgb(hue, float(trng.uniform(0.55, 0.9)), float(trng.uniform(0.6, 0.85)))
        textures.append(
            Sinusoids(trng, base, 10, wavelengths=(5.0 * scale, 24.0 * scale), amps=(8.0, 18.0))
        )
    return SyntheticScene(config, seed, sprites, camera, textures)


def exact_tracks(
    scene: SyntheticScene, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact tracks of arbitrary queries in a scene.

    ``queries`` (N, 3) (t, x, y) raster. A query belongs to the nearest object covering its
    point on its frame (``object_at``; at a pixel centre, the rendered mask's id); its
    position on every frame follows that object's motion (the camera's for the background),
    exactly (float64, stored as float32; at the query frame the query itself). Visibility as
    in the module docstring. Returns tracks float32 (N, T, 2), visible bool (N, T) and
    object_ids int16 (N,).
    """
    q = np.asarray(queries, np.float64)
    t_count, h, w = scene.config.num_frames, scene.config.height, scene.config.width
    tq = q[:, 0].astype(np.int64)
    p = q[:, 1:]
    object_ids = np.zeros(q.shape[0], np.int16)
    for t0 in np.unique(tq):
        object_ids[tq == t0] = scene.object_at(int(t0), p[tq == t0])
    pos = np.empty((q.shape[0], t_count, 2), dtype=np.float64)
    for obj in np.unique(object_ids):
        for t0 in np.unique(tq[object_ids == obj]):
            sel = (object_ids == obj) & (tq == t0)
            if obj == 0:
                wld = scene.image_to_world(int(t0), p[sel])
                for t in range(t_count):
                    pos[sel, t] = scene.world_to_image(t, wld)
            else:
                u = scene.image_to_sprite(int(obj), int(t0), p[sel])
                for t in range(t_count):
                    pos[sel, t] = scene.sprite_to_image(int(obj), t, u)
            pos[sel, t0] = p[sel]  # exact at the query frame
    visible = np.zeros(pos.shape[:2], dtype=bool)
    for t in range(t_count):
        x = pos[:, t]
        in_bounds = (x[:, 0] >= 0) & (x[:, 0] < w) & (x[:, 1] >= 0) & (x[:, 1] < h)
        visible[:, t] = in_bounds & (scene.object_at(t, x) <= object_ids)
    return pos.astype(np.float32), visible, object_ids


def render_synthetic_video(config: SyntheticConfig, seed: int | None = None) -> SyntheticVideo:
    """Render a procedural video with exact tracks; deterministic in ``(config, seed)``.

    ``seed`` defaults to ``config.seed``.  See the module docstring for the scene model and the
    ground-truth rules.
    """
    scene = build_scene(config, seed)
    t_count, h, w = config.num_frames, config.height, config.width
    frames = np.empty((t_count, h, w, 3), dtype=np.uint8)
    masks = np.empty((t_count, h, w), dtype=np.int16)
    for t in range(t_count):
        frames[t], masks[t] = scene.render_frame(t)

    # Queries: pixel centres of frame 0 where each object is visible.
    rng = np.random.default_rng(np.random.SeedSequence([scene.seed, 1]))
    picked = []
    order = list(range(1, scene.num_sprites + 1)) + [0]
    for obj in order:
        n = config.background_points if obj == 0 else config.points_per_sprite
        rows, cols = np.nonzero(masks[0] == obj)
        if n == 0 or rows.size == 0:
            continue
        pick = np.sort(rng.choice(rows.size, size=min(n, rows.size), replace=False))
        picked.append(np.stack([cols[pick] + 0.5, rows[pick] + 0.5], axis=-1))
    p0 = np.concatenate(picked) if picked else np.zeros((0, 2))
    queries = np.concatenate([np.zeros((p0.shape[0], 1)), p0], axis=1).astype(np.float32)
    tracks, visible, object_ids = exact_tracks(scene, queries)

    meta = {
        "source": "synthetic",
        "seed": scene.seed,
        "config": asdict(config),
        "coordinates": "raster: (0,0) is the top-left corner of the top-left pixel; "
        "pixel centres at (x+0.5, y+0.5)",
        "texture_model": f"{config.texture}: continuous function of object coordinates "
        "(world for the background, sprite-local for sprites), point-sampled at pixel centres",
        "edge_rule": "shapes are closed (a point on an edge is inside/covered); image bounds "
        "are [0,W)x[0,H)",
        "depth_order": "object id = depth rank; higher id is nearer the camera",
        "query_frame": 0,
        "camera_offsets": scene.camera_offsets.tolist(),  # world = image + offset
        "sprites": [
            {
                "object_id": i + 1,
                "shape": sp.shape,
                "half_size": [float(v) for v in sp.half_size],
                "centers": scene.centers[i].tolist(),
                "angles_deg": np.degrees(scene.angles[i]).tolist(),
                "scales": scene.scales[i].tolist(),
            }
            for i, sp in enumerate(scene.sprites)
        ],
    }
    return SyntheticVideo(
        frames=frames,
        tracks=tracks,
        visible=visible,
        queries=queries,
        masks=masks,
        object_ids=object_ids,
        meta=meta,
        scene=scene,
    )


def synthetic_config(settings: dict[str, Any]) -> SyntheticConfig:
    """``source.synthetic`` settings as a :class:`SyntheticConfig` (one UserError line for
    an unknown field or a bad value)."""
    import dataclasses

    from datagen.errors import UserError

    names = {f.name for f in dataclasses.fields(SyntheticConfig)} - {"sprites", "seed"}
    bad = sorted(set(settings) - names)
    if bad:
        raise UserError(
            f"source.synthetic: unknown field(s) {', '.join(bad)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    try:
        return SyntheticConfig(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()}
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"source.synthetic: {exc}") from None
