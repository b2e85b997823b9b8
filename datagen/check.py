"""Validation of one sample: its metadata against the schema, and numeric checks of its arrays
against each other and against the decoded video."""

from __future__ import annotations

from typing import Any

import numpy as np

from datagen.sampleformat import (
    FEATURE_DTYPE,
    FRAME_DTYPE,
    MEMBER_DTYPES,
    safetensors_arrays,
)
from datagen.schemas import schema_errors

_TRACKS, _VISIBLE, _QUERIES, _CONFIDENCE = (
    MEMBER_DTYPES[m] for m in ("tracks.npy", "visible.npy", "queries.npy", "confidence.npy")
)


def check_arrays(
    frames: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    queries: np.ndarray,
    confidence: np.ndarray,
    meta: dict[str, Any],
) -> list[str]:
    """Numeric problems of one sample, as messages (empty when it is sound).

    frames: uint8 (T, H, W, 3) decoded from the stored video; tracks float32 (N, T, 2);
    visible bool (N, T); queries float32 (N, 3) as (t, x, y); confidence float32 (N, T).
    """
    errs: list[str] = []
    if frames.dtype != FRAME_DTYPE or frames.ndim != 4 or frames.shape[-1] != 3:
        errs.append(
            f"video frames are {frames.dtype} {frames.shape}, expected {FRAME_DTYPE} (T, H, W, 3)"
        )
        return errs
    t, h, w = frames.shape[:3]
    video = meta.get("video", {})
    if video.get("num_frames") != t:
        errs.append(f"video decodes to {t} frames, metadata says {video.get('num_frames')}")
    if (video.get("height"), video.get("width")) != (h, w):
        errs.append(
            f"video decodes to {h}x{w}, metadata says {video.get('height')}x{video.get('width')}"
        )
    if tracks.dtype != _TRACKS or tracks.ndim != 3 or tracks.shape[1:] != (t, 2):
        errs.append(f"tracks are {tracks.dtype} {tracks.shape}, expected {_TRACKS} (N, {t}, 2)")
        return errs
    n = tracks.shape[0]
    if visible.dtype != _VISIBLE or visible.shape != (n, t):
        errs.append(f"visible is {visible.dtype} {visible.shape}, expected {_VISIBLE} ({n}, {t})")
    if queries.dtype != _QUERIES or queries.shape != (n, 3):
        errs.append(f"queries are {queries.dtype} {queries.shape}, expected {_QUERIES} ({n}, 3)")
    if confidence.dtype != _CONFIDENCE or confidence.shape != (n, t):
        errs.append(
            f"confidence is {confidence.dtype} {confidence.shape}, expected {_CONFIDENCE} "
            f"({n}, {t})"
        )
    if errs:
        return errs
    if not np.isfinite(tracks).all():
        errs.append(f"tracks hold {int((~np.isfinite(tracks)).sum())} non-finite values")
    if not np.isfinite(queries).all():
        errs.append("queries hold non-finite values")
    else:
        qt = queries[:, 0]
        if (qt != np.round(qt)).any() or (qt < 0).any() or (qt >= t).any():
            errs.append(f"query frames must be whole numbers in 0..{t - 1}")
        qx, qy = queries[:, 1], queries[:, 2]
        if (qx < 0).any() or (qx > w).any() or (qy < 0).any() or (qy > h).any():
            errs.append(f"query points lie outside the {w}x{h} frame")
        else:
            # A track passes through its query: the label at the query frame is the query.
            idx = qt.astype(np.int64)
            at_query = tracks[np.arange(n), idx]
            if n and np.abs(at_query - queries[:, 1:]).max() > 1e-3:
                errs.append("tracks do not pass through their query points at the query frame")
    finite_conf = confidence[np.isfinite(confidence)]
    if finite_conf.size and ((finite_conf < 0).any() or (finite_conf > 1).any()):
        errs.append("confidence values lie outside [0, 1]")
    labels = meta.get("labels", {})
    if labels.get("num_points") != n:
        errs.append(f"arrays hold {n} points, metadata says {labels.get('num_points')}")
    if labels.get("num_frames") != t:
        errs.append(f"labels span {t} frames, metadata says {labels.get('num_frames')}")
    if meta.get("queries", {}).get("count") != n:
        errs.append(f"{n} queries, metadata says {meta.get('queries', {}).get('count')}")
    return errs


def check_sample(
    frames: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    queries: np.ndarray,
    confidence: np.ndarray,
    meta: dict[str, Any],
) -> list[str]:
    """Schema errors of the metadata, then numeric errors of the arrays."""
    errs = [f"metadata {e}" for e in schema_errors("sample", meta)]
    cap = meta.get("capture")
    if isinstance(cap, dict) and "corr_points" in cap and queries.ndim == 2:
        first = int((queries[:, 0] == 0).sum())
        if cap["corr_points"] != first:
            errs.append(
                f"correspondence covers {cap['corr_points']} points, but {first} queries lie "
                "on frame 0"
            )
    return errs + check_arrays(frames, tracks, visible, queries, confidence, meta)


def check_capture(
    meta: dict[str, Any], corr: bytes | None = None, features: bytes | None = None
) -> list[str]:
    """Check correspondence / feature safetensors against the sample's layout and capture
    (decoded by :func:`datagen.sampleformat.safetensors_arrays`, the readers' decoder)."""
    cap = meta.get("capture")
    if not isinstance(cap, dict):
        return ["capture products present but metadata has no 'capture' section"]
    frames, h, w = meta["layout"]["token_grid"]
    errs: list[str] = []
    try:
        if corr is not None:
            arrays = safetensors_arrays(corr)
            want = {k: tuple(v) for k, v in cap["corr_arrays"].items()}
            got = {k: tuple(v.shape) for k, v in arrays.items()}
            if got != want:
                errs.append(f"correspondence arrays {got} differ from metadata {want}")
            lead = (len(cap["corr_layers"]), len(cap["corr_steps"]))
            n = cap.get("corr_points", meta["labels"]["num_points"])
            for name, arr in arrays.items():
                if arr.shape[:2] != lead:
                    errs.append(f"correspondence {name} leads with {arr.shape[:2]}, not {lead}")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    errs.append(f"correspondence {name} holds non-finite values")
            fwd = arrays.get("match_forward")
            if fwd is not None and (
                fwd.shape[2:] != (n, frames)
                or fwd.min(initial=0) < 0
                or fwd.max(initial=0) >= h * w
            ):
                errs.append("match_forward indices or shape do not fit the token grid")
        if features is not None:
            tensors = safetensors_arrays(features)
            if sorted(tensors) != sorted(cap["feature_tensors"]):
                errs.append(f"feature tensors {sorted(tensors)} differ from metadata")
            for name, t in tensors.items():
                if name.startswith("h."):  # a block's output hidden states
                    ok, want = t.ndim == 3 and t.shape[:2] == (frames, h * w), "model width"
                    want = f"({frames}, {h * w}, {want})"
                else:
                    ok = t.ndim == 4 and t.shape[1:3] == (frames, h * w)
                    want = f"(heads, {frames}, {h * w}, head dim)"
                if t.dtype != FEATURE_DTYPE or not ok:
                    errs.append(f"{name} is {t.dtype} {t.shape}, expected {FEATURE_DTYPE} {want}")
                elif not np.isfinite(t).all():
                    errs.append(f"{name} holds non-finite values")
    except Exception as exc:  # a damaged safetensors blob is a finding, not a crash
        errs.append(f"capture products cannot be decoded ({type(exc).__name__}: {exc})")
    return errs
