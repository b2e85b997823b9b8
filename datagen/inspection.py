"""`datagen inspect`: a sample's summary, and a PNG with its tracks drawn over frames."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datagen.data import open_dataset
from datagen.errors import UserError
from datagen.names import open_new, safe_join
from datagen.sampleformat import ShardError


def find_sample(folder: Path, key: str | None) -> dict[str, Any]:
    """The sample with ``key`` (the first sample when None), read through the member index."""
    try:
        ds = open_dataset(folder)
        if key is None:
            try:
                return ds[0]
            except IndexError:
                raise UserError(f"{folder} holds no samples") from None
        if key not in ds:
            first = ", ".join(ds.keys()[:3])
            raise UserError(f"no sample with key '{key}' in {folder}; keys look like: {first}")
        return ds[key]
    except ShardError as exc:
        raise UserError(f"{exc}; run datagen validate {folder}") from None


def summary(sample: dict[str, Any]) -> str:
    meta = sample["meta"]
    t, h, w = sample["frames"].shape[:3]
    vis = sample["visible"]
    moved = np.linalg.norm(sample["tracks"][:, -1] - sample["tracks"][:, 0], axis=-1)
    lines = [
        f"key:        {sample['key']}",
        f"prompt:     [{meta['prompt']['id']}] {meta['prompt']['text']}",
        f"seed:       {meta['seed']}",
        f"source:     {meta['source']['kind']}"
        + (f", model {meta['source']['model_id']}" if "model_id" in meta["source"] else ""),
        f"video:      {t} frames, {w}x{h}, {meta['video']['fps']} fps",
        f"tracker:    {meta['tracker']['name']} {meta['tracker']['settings']}",
        f"points:     {vis.shape[0]} ({meta['queries']['method']}), visible "
        f"{vis.mean():.1%} of point-frames, {vis.all(axis=1).mean():.1%} visible throughout",
        f"motion:     median first-to-last displacement {np.median(moved):.2f} px",
    ]
    if "layout" in meta:
        lay = meta["layout"]
        lines.insert(
            5,
            f"layout:     latent {lay['latent_shape']}, tokens {lay['token_grid']}, text "
            f"{lay['text_tokens']} ({lay['text_position']})",
        )
    if "capture" in meta:
        cap = meta["capture"]
        lines.append(
            f"capture:    correspondence layers {cap['corr_layers']} x steps {cap['corr_steps']}; "
            f"q/k tensors {len(cap['feature_tensors'])}"
        )
    return "\n".join(lines)


def _colour(i: int, n: int) -> tuple[int, int, int]:
    hsv = np.uint8([[[int(180 * i / max(n, 1)), 220, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def render_tracks(sample: dict[str, Any], num_panels: int = 4, min_width: int = 320) -> np.ndarray:
    """BGR image: ``num_panels`` frames side by side with each track's path so far drawn.

    Visible positions are filled dots, hidden ones hollow circles; coordinates are raster,
    so pixel (x, y) in raster units maps to (x * s, y * s) in the upscaled panel.
    """
    frames = sample["frames"]
    tracks, visible = sample["tracks"], sample["visible"]
    t, h, w = frames.shape[:3]
    scale = max(1, int(np.ceil(min_width / w)))
    picks = np.unique(np.linspace(0, t - 1, min(num_panels, t)).round().astype(int))
    panels = []
    n = tracks.shape[0]
    for f in picks:
        img = cv2.resize(
            frames[f][:, :, ::-1], (w * scale, h * scale), interpolation=cv2.INTER_NEAREST
        )
        for i in range(n):
            c = _colour(i, n)
            pts = (tracks[i, : f + 1] * scale).round().astype(np.int32)
            if f > 0:
                cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, c, 1, cv2.LINE_AA)
            x, y = pts[-1]
            cv2.circle(img, (int(x), int(y)), 3, c, -1 if visible[i, f] else 1, cv2.LINE_AA)
        cv2.putText(
            img,
            f"frame {f}",
            (4, 14),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        panels.append(img)
    sep = np.full((h * scale, 4, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [sep, p]
    return np.concatenate(row, axis=1)


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode ``image`` as PNG and write it to ``path``, never through a symlink."""
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise UserError(f"cannot encode the PNG for {path}")
    if path.is_symlink():
        raise UserError(f"{path} is a symlink; not writing through it (--png)")
    try:
        fd = open_new(path)
    except OSError as exc:
        raise UserError(
            f"cannot write {path} ({exc.strerror}); check the folder exists and is writable (--png)"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data.tobytes())


def default_png(key: str) -> Path:
    """``KEY.png`` in the working folder, for a key checked by the rules of datagen.names."""
    try:
        return safe_join(Path("."), f"{key}.png")
    except ValueError as exc:
        raise UserError(f"{exc}; pass --png PATH") from None
