"""The procedural textures of the synthetic source: sums of random plane waves, quantised
to uint8 the same way everywhere (so a texture looked up at exact coordinates equals the
rendered pixel)."""

from __future__ import annotations

import math

import numpy as np


def quantise(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


class Sinusoids:
    """Sum of random plane waves per channel (sprite textures, in sprite-local coordinates).

    ``f_c(x, y) = base_c + sum_i amp_ic * sin(kx_i x + ky_i y + phase_i)``.
    """

    def __init__(self, rng: np.random.Generator, base, n: int, wavelengths, amps) -> None:
        lo, hi = wavelengths
        lam = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        ang = rng.uniform(0.0, 2.0 * math.pi, n)
        self.kx = 2.0 * math.pi * np.cos(ang) / lam  # radians per px
        self.ky = 2.0 * math.pi * np.sin(ang) / lam
        self.phase = rng.uniform(0.0, 2.0 * math.pi, n)
        a = rng.uniform(amps[0], amps[1], n)
        self.amp = a[:, None] * rng.uniform(0.4, 1.3, (n, 3))  # per-channel weights: colour
        self.base = np.asarray(base, dtype=np.float64)

    def _accumulate(self, waves, shape) -> np.ndarray:
        # Channel-first accumulation in a fixed order: every element goes through exactly the
        # same float64 operations however many points are evaluated at once, so a texture
        # value is bit-identical between rendering and a test's point query.
        out = np.empty((3, *shape), dtype=np.float64)
        for c in range(3):
            out[c] = self.base[c]
        for i, v in enumerate(waves):
            for c in range(3):
                out[c] += self.amp[i, c] * v
        return np.moveaxis(out, 0, -1)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Float64 ``(P, 3)`` values at points ``(x, y)`` (1-D arrays)."""
        x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        waves = (
            np.sin(self.kx[i] * x + self.ky[i] * y + self.phase[i]) for i in range(self.kx.size)
        )
        return self._accumulate(waves, x.shape)


class SeparableSinusoids(Sinusoids):
    """Same distribution, written as ``sin(a) cos(b) + cos(a) sin(b)`` with ``a = kx x`` and
    ``b = ky y + phase`` so that a full frame on a pixel grid needs trigonometry only per row and
    column (background texture, in world coordinates).
    """

    def _waves(self, x: np.ndarray, y: np.ndarray, outer: bool):
        for i in range(self.kx.size):
            a = self.kx[i] * x
            b = self.ky[i] * y + self.phase[i]
            sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
            if outer:
                yield sa[None, :] * cb[:, None] + ca[None, :] * sb[:, None]
            else:
                yield sa * cb + ca * sb

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        return self._accumulate(self._waves(x, y, outer=False), x.shape)

    def grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Float64 ``(len(ys), len(xs), 3)`` values at all points ``(xs[j], ys[i])``."""
        xs = np.ascontiguousarray(xs, dtype=np.float64)
        ys = np.ascontiguousarray(ys, dtype=np.float64)
        return self._accumulate(self._waves(xs, ys, outer=True), (ys.size, xs.size))


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, r = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, r, p), (q, v, p), (p, v, r), (p, q, v), (r, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0
