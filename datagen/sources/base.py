"""Where videos come from. A source turns work units into frames, plus what it knows exactly
(ground-truth labels for procedural videos) or captured (attention products)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from datagen.plan import WorkUnit

if TYPE_CHECKING:  # the capture module imports torch; a source without capture needs none
    from datagen.capture.products import CaptureProducts


@dataclass
class Produced:
    """One video as a source made it, before encoding."""

    frames: np.ndarray
    """uint8 (T, H, W, 3) RGB."""
    capture: CaptureProducts | None = None
    """What the capture made of this video (metadata, correspondence, q/k), when captured."""
    labels: dict[str, np.ndarray] | None = None
    """Exact labels when the source knows them: tracks (N,T,2), visible (N,T), queries (N,3),
    raster coordinates; the tracker is then not run."""
    queries: np.ndarray | None = None
    """(N, 3) (t, x, y) raster queries the tracker labels (set when ``labels`` is None)."""
    extra_members: dict[str, bytes] = field(default_factory=dict)
    """Further core members (e.g. 'masks.npy' of a procedural source)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source description recorded in the sample's metadata under 'source'."""


class Source(Protocol):
    kind: str

    def produce(self, units: tuple[WorkUnit, ...]) -> list[Produced]:
        """Frames for each unit, in order (raises when the batch as a whole fails)."""

    def layout_json(self) -> dict[str, Any] | None:
        """The token layout of the model that made or read the videos, if any."""
