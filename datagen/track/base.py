"""Common types for point trackers: the result container and the tracker protocol (the
registry of trackers by name is :mod:`datagen.track.registry`).

Conventions (dataset-wide):

* frames: ``uint8`` array ``(T, H, W, 3)``, RGB.
* queries: ``float32`` array ``(N, 3)`` of ``(t, x, y)``; ``t`` is an integer frame index stored
  as a float, ``(x, y)`` are RASTER pixel coordinates (TAP-Vid convention): ``(0, 0)`` is the
  top-left corner of the top-left pixel, pixel centres sit at ``+0.5``. A point is inside the
  image when ``0 <= x < W`` and ``0 <= y < H``.
* tracks: ``float32`` ``(N, T, 2)`` of ``(x, y)`` in raster coordinates.
* visible: ``bool`` ``(N, T)``.
* confidence: ``float32`` ``(N, T)`` in ``[0, 1]``, or ``None`` when a tracker has none.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TrackResult",
    "Tracker",
    "check_frames",
    "check_queries",
]


@dataclass
class TrackResult:
    """Output of a tracker for N query points over T frames (see the module docstring)."""

    tracks: np.ndarray  # float32 (N, T, 2), raster (x, y)
    visible: np.ndarray  # bool (N, T)
    confidence: np.ndarray | None  # float32 (N, T) in [0, 1], or None

    @property
    def num_points(self) -> int:
        return int(self.tracks.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.tracks.shape[1])

    def validate(self, num_points: int, num_frames: int) -> TrackResult:
        """Check shapes, dtypes and value ranges; raise ``ValueError`` on the first problem.

        Returns ``self`` so that it can be chained (``return result.validate(n, t)``).
        """
        n, t = int(num_points), int(num_frames)
        _check_array("tracks", self.tracks, np.float32, (n, t, 2))
        _check_array("visible", self.visible, np.bool_, (n, t))
        if not np.all(np.isfinite(self.tracks)):
            raise ValueError("tracks contains non-finite values")
        if self.confidence is not None:
            _check_array("confidence", self.confidence, np.float32, (n, t))
            c = self.confidence
            if not np.all(np.isfinite(c)) or (c.size and (c.min() < 0.0 or c.max() > 1.0)):
                raise ValueError("confidence must be finite and within [0, 1]")
        return self


def _check_array(name: str, a: Any, dtype: type, shape: tuple[int, ...]) -> None:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


@runtime_checkable
class Tracker(Protocol):
    """A point tracker. Implementations must be deterministic for identical inputs."""

    name: str

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings, recorded in sample metadata next to ``name``.

        Exactly the constructor keywords: ``make_tracker(t.name, **t.settings())`` rebuilds an
        equivalent tracker (library versions are recorded elsewhere).
        """
        ...

    def track(self, frames: np.ndarray, queries: np.ndarray) -> TrackResult:
        """Track ``queries`` (N, 3) through ``frames`` (T, H, W, 3) uint8 RGB."""
        ...


def check_frames(frames: Any) -> np.ndarray:
    """Validate a video array: uint8 (T, H, W, 3), T >= 1. Returns it unchanged."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3) RGB, got {frames.dtype} {tuple(frames.shape)}"
        )
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    return frames


def check_queries(queries: Any, num_frames: int, height: int, width: int) -> np.ndarray:
    """Validate queries against a video; return them as float32 (N, 3).

    Requires integer-valued ``t`` in ``[0, num_frames)`` and raster ``(x, y)`` inside the image
    (``0 <= x < width``, ``0 <= y < height``).
    """
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"queries must have shape (N, 3) as (t, x, y), got {q.shape}")
    if not np.issubdtype(q.dtype, np.number):
        raise ValueError(f"queries must be numeric, got dtype {q.dtype}")
    q = q.astype(np.float32, copy=False)
    if not np.all(np.isfinite(q)):
        raise ValueError("queries contain non-finite values")
    t = q[:, 0]
    if np.any(t != np.round(t)) or np.any(t < 0) or np.any(t >= num_frames):
        raise ValueError(f"query frame indices must be integers in [0, {num_frames})")
    x, y = q[:, 1], q[:, 2]
    if np.any(x < 0) or np.any(x >= width) or np.any(y < 0) or np.any(y >= height):
        raise ValueError(
            f"query points must lie inside the image in raster coordinates "
            f"(0 <= x < {width}, 0 <= y < {height})"
        )
    return q
