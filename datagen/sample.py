"""The record one video carries through the pipeline, and its tar members."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CORE_MEMBERS = ("confidence.npy", "json", "mp4", "queries.npy", "tracks.npy", "visible.npy")
"""Member extensions every core sample carries."""
CORR_MEMBER = "corr.safetensors"
"""Core member with the online correspondence arrays (when correspondence is captured)."""
FEATURE_MEMBER = "qk.safetensors"
"""Features-shard member with the captured q/k (when features are captured)."""


QC_MEMBER = "qc_flags.npy"
"""Core member: uint8 (N,) quality-control flag bits per track (0 = kept), when QC runs."""
QC_FLAG_BITS = {"cycle": 1, "visible_fraction": 2, "motion": 4, "jitter": 8}


def members_for(corr: bool, features: bool, qc: bool = False) -> dict[str, list[str]]:
    """Member extensions per shard kind for a build that captures ``corr``/``features`` and
    runs quality control (``qc``)."""
    extra = ((CORR_MEMBER,) if corr else ()) + ((QC_MEMBER,) if qc else ())
    out = {"core": sorted(CORE_MEMBERS + extra)}
    if features:
        out["features"] = [FEATURE_MEMBER]
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """Load .npy bytes; object arrays are refused (loading never executes data)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


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
