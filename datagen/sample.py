"""The record one video carries through the pipeline, and its tar members (encoded as
:mod:`datagen.sampleformat` says)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The member names and encoders live in datagen.sampleformat; they are re-exported here for
# the writer (datagen.build, datagen.sources) and older imports.
from datagen.sampleformat import (  # noqa: F401
    CORE_MEMBERS,
    CORR_MEMBER,
    FEATURE_MEMBER,
    QC_FLAG_BITS,
    QC_MEMBER,
    json_bytes,
    members_for,
    npy_bytes,
)


@dataclass
class Sample:
    """One labelled video.

    ``frames`` are the frames decoded from ``video`` (what a consumer sees), never the raw
    generator output, so that labels match the stored video exactly.
    """

    key: str
    video: bytes
    """MP4 bytes."""
    frames: np.ndarray
    """uint8 (T, H, W, 3) RGB, decoded from ``video``."""
    tracks: np.ndarray
    """float32 (N, T, 2) (x, y) raster pixel coordinates."""
    visible: np.ndarray
    """bool (N, T)."""
    queries: np.ndarray
    """float32 (N, 3) (t, x, y) raster pixel coordinates."""
    confidence: np.ndarray
    """float32 (N, T) in [0, 1]; NaN where the tracker gives none."""
    meta: dict[str, Any]
    correspondence: bytes | None = None
    """safetensors bytes of the online correspondence arrays, (layers, steps, ...)."""
    features: bytes | None = None
    """safetensors bytes of the captured q/k, fp16 (heads, token frames, h*w, head dim)."""
    extra_members: dict[str, bytes] = field(default_factory=dict)
    """Source-specific core members (e.g. masks.npy of procedural videos)."""

    def members(self) -> dict[str, bytes]:
        """Core tar members by extension (the part of the name after the key and its dot)."""
        out = {
            "mp4": self.video,
            "json": json_bytes(self.meta),
            "tracks.npy": npy_bytes(self.tracks),
            "visible.npy": npy_bytes(self.visible),
            "queries.npy": npy_bytes(self.queries),
            "confidence.npy": npy_bytes(self.confidence),
        }
        if self.correspondence is not None:
            out[CORR_MEMBER] = self.correspondence
        out.update(self.extra_members)
        return out
