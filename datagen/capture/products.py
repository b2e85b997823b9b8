"""What a capture yields for one video, and the capture plumbing every source shares: the
capture a config asks for, which frame-0 tokens the online correspondence runs on, and the
per-video products (metadata, correspondence safetensors, q/k safetensors) cut from a
recorder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import BuildConfig
from datagen.layout import TokenLayout
from datagen.track.queries import first_frame_rows

TOKEN_ARRAYS = frozenset({"match_reverse"})
"""Correspondence arrays indexed by token rather than by query point."""


def capture_spec(cfg: BuildConfig) -> CaptureSpec:
    """The capture a config asks for; a layer list without steps (or the reverse) is off."""
    c = cfg.capture
    return CaptureSpec(
        feature_layers=tuple(c.feature_layers) if c.feature_steps else (),
        feature_steps=tuple(c.feature_steps) if c.feature_layers or c.hidden_layers else (),
        corr_layers=tuple(c.corr_layers) if c.corr_steps else (),
        corr_steps=tuple(c.corr_steps) if c.corr_layers else (),
        step_unit=c.step_unit,
        hidden_layers=tuple(c.hidden_layers) if c.feature_steps else (),
    )



@dataclass(frozen=True)
class CaptureProducts:
    """One video's capture, as stored."""

    meta: dict[str, Any]
    """The sample metadata's ``capture`` entry."""
    correspondence: bytes | None
    """The core member ``corr.safetensors`` (None: no correspondence asked for)."""
    features: bytes | None
    """The features member, q/k (and hidden-state) safetensors (None: no features asked
    for)."""


def frame0_tokens(layout: TokenLayout, queries: np.ndarray) -> np.ndarray:
    """Token (index within latent frame 0) of each query on frame 0 (t == 0), in order."""
    return layout.token_index_of_pixel(queries[first_frame_rows(queries), 1:])


def corr_tokens(layout: TokenLayout, queries: list[np.ndarray | None]) -> torch.Tensor:
    """Sorted distinct frame-0 tokens the online correspondence of a batch runs on.

    ``queries[b]``: video b's (N, 3) queries, or None when they are not known yet (sampled
    from the generated frames): then every token of latent frame 0 is computed. Points in one
    token share its query, so each distinct token is computed once.
    """
    _, h, w = layout.token_grid
    if not queries or any(q is None for q in queries):
        return torch.arange(h * w if queries else 0, dtype=torch.long)
    return torch.from_numpy(np.unique(np.concatenate([frame0_tokens(layout, q) for q in queries])))


def token_rows(layout: TokenLayout, tokens: torch.Tensor, queries: np.ndarray) -> np.ndarray:
    """Index into ``tokens`` of each frame-0 query of ``queries`` (tokens must hold them)."""
    tok = frame0_tokens(layout, queries)
    t = tokens.numpy()
    rows = np.searchsorted(t, tok)
    if rows.size and (rows.max() >= t.size or not np.array_equal(t[rows], tok)):
        raise ValueError("a query's token was not among the computed correspondence tokens")
    return rows


def capture_products(
    spec: CaptureSpec, recorder: Recorder, b: int, rows: np.ndarray
) -> CaptureProducts:
    """Video ``b``'s capture metadata, correspondence safetensors and features safetensors
    (q/k, and block outputs ``h.layerLLL.stepSSS`` of ``spec.hidden_layers``).

    ``rows``: for each of the video's frame-0 queries, in order, its index among
    ``recorder.query_tokens`` (the arrays are stored per query point).
    """
    import safetensors.numpy
    import safetensors.torch

    arrays, layers, steps = recorder.stacked_correspondence(b)
    rows = np.asarray(rows, np.int64)
    arrays = {
        name: a if name in TOKEN_ARRAYS else np.ascontiguousarray(a[:, :, rows])
        for name, a in arrays.items()
    }
    corr = None
    if spec.corr_layers:
        corr = safetensors.numpy.save(
            arrays,
            # One key only: safetensors writes metadata maps in no fixed order.
            metadata={"layers_steps": json.dumps({"layers": layers, "steps": steps})},
        )
    feats = None
    if spec.has_features:
        feats = safetensors.torch.save(recorder.features[b])
    meta = {
        "corr_layers": layers,
        "corr_steps": steps,
        "corr_arrays": {k: list(v.shape) for k, v in sorted(arrays.items())},
        "feature_tensors": sorted(recorder.features[b]),
        "step_timesteps": {str(k): v for k, v in sorted(recorder.step_timesteps.items())},
        "corr_points": int(rows.size),
        "corr_rows": "the queries on frame 0 (t == 0), in order",
        "cfg_branch": "conditional",
        "dtype": "float16",
    }
    return CaptureProducts(meta, corr, feats)
