"""Consumer loaders: stream samples out of the core shards.

Built on webdataset's streaming tar reader; decoding is ours and never executes data (no
pickle, ``np.load(allow_pickle=False)``, plain JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.errors import UserError
from datagen.sample import CORE_MEMBERS, CORR_MEMBER, npy_load
from datagen.shards import MANIFEST
from datagen.video import decode_video


def shard_urls(path: Path | str) -> list[str]:
    """Core shard paths of a dataset folder or manifest, in manifest order."""
    p = Path(path)
    manifest = p / MANIFEST if p.is_dir() else p
    if not manifest.is_file():
        raise UserError(f"{p}: no {MANIFEST}; is this a datagen dataset folder?")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{manifest}: cannot be read as JSON ({exc})") from None
    shards = data.get("shards", [])
    return [str(manifest.parent / s["path"]) for s in shards if s.get("kind", "core") == "core"]


def decode_core_sample(raw: dict[str, Any], video: bool = True) -> dict[str, Any]:
    """Turn one sample's raw members into arrays.

    Returns a dict: key (str); frames uint8 (T, H, W, 3) RGB (when ``video``); tracks float32
    (N, T, 2) and queries float32 (N, 3) as (t, x, y), both raster pixel coordinates;
    visible bool (N, T); confidence float32 (N, T); meta (the sample's JSON); and, when the
    build captured it, correspondence (name -> array (layers, steps, ...), see
    ``meta["capture"]``).
    """
    key = raw["__key__"]
    missing = [m for m in CORE_MEMBERS if m not in raw]
    if missing:
        where = raw.get("__url__", "?")
        raise ValueError(f"{where}: sample {key} lacks member(s) {', '.join(missing)}")
    out: dict[str, Any] = {
        "key": key,
        "tracks": npy_load(raw["tracks.npy"]),
        "visible": npy_load(raw["visible.npy"]),
        "queries": npy_load(raw["queries.npy"]),
        "confidence": npy_load(raw["confidence.npy"]),
        "meta": json.loads(raw["json"]),
    }
    if CORR_MEMBER in raw:
        import safetensors.numpy

        out["correspondence"] = safetensors.numpy.load(raw[CORR_MEMBER])
    if video:
        out["frames"] = decode_video(raw["mp4"])
    return out


def open_dataset(path: Path | str, video: bool = True) -> Iterator[dict[str, Any]]:
    """Iterate over the samples of a dataset folder (or its manifest.json), in order."""
    import webdataset as wds

    urls = shard_urls(path)
    if not urls:
        return iter(())
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return (decode_core_sample(raw, video=video) for raw in ds)
