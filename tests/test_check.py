"""Sample validation: the JSON Schema rejects bad metadata; numeric checks catch bad arrays."""

import copy

import numpy as np
import pytest

from datagen.check import check_arrays
from datagen.schemas import schema_errors


def _meta():
    return {
        "format_version": 1,
        "key": "dog-r00",
        "prompt": {
            "id": "dog",
            "text": "a dog",
            "category": "",
            "set": "object",
            "negative": "",
            "replica": 0,
        },
        "seed": 3,
        "config": {
            "preset": "tiny",
            "model": {},
            "generation": {},
            "tracker": {},
            "video": {},
            "shards": {},
        },
        "config_fingerprint": "0123456789abcdef",
        "video": {
            "num_frames": 2,
            "height": 4,
            "width": 6,
            "fps": 8,
            "codec": "libx264",
            "pix_fmt": "yuv420p",
        },
        "source": {"kind": "text-to-video"},
        "tracker": {"name": "lk", "settings": {}},
        "queries": {"method": "grid", "count": 1},
        "labels": {
            "num_points": 1,
            "num_frames": 2,
            "visible_fraction": 1.0,
            "confidence": "tracker",
        },
        "coordinates": "raster",
        "software": {"torch": "2.13.0"},
    }


def test_valid_metadata_passes():
    assert schema_errors("sample", _meta()) == []


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("key",), "dog.r00", "does not match"),
        (("coordinates",), "pixel-centre", "'raster' was expected"),
        (("seed",), -1, "less than the minimum"),
        (("video", "num_frames"), "two", "is not of type 'integer'"),
        (("labels", "visible_fraction"), 1.5, "greater than the maximum"),
        (("prompt", "set"), "both", "is not one of"),
        (("config_fingerprint",), "xyz", "does not match"),
        (("source", "kind"), "camera", "is not one of"),
    ],
)
def test_schema_rejects_bad_fields(path, value, message):
    meta = copy.deepcopy(_meta())
    node = meta
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    errors = schema_errors("sample", meta)
    assert errors and message in errors[0] and errors[0].startswith("/".join(path))


def test_schema_rejects_missing_and_unknown_fields():
    meta = _meta()
    del meta["tracker"]
    meta["colour"] = "red"
    errors = " ".join(schema_errors("sample", meta))
    assert "'tracker' is a required property" in errors
    assert "Additional properties are not allowed ('colour'" in errors


def test_numeric_checks_catch_mismatches():
    meta = _meta()
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    tracks = np.array([[[1.5, 2.5], [2.0, 2.5]]], np.float32)
    visible = np.ones((1, 2), bool)
    queries = np.array([[0, 1.5, 2.5]], np.float32)
    conf = np.ones((1, 2), np.float32)
    assert check_arrays(frames, tracks, visible, queries, conf, meta) == []
    bad = tracks.copy()
    bad[0, 1, 0] = np.nan
    assert "non-finite" in check_arrays(frames, bad, visible, queries, conf, meta)[0]
    assert (
        "decodes to 3 frames"
        in check_arrays(np.zeros((3, 4, 6, 3), np.uint8), tracks, visible, queries, conf, meta)[0]
    )
    assert (
        "visible is"
        in check_arrays(frames, tracks, visible.astype(np.uint8), queries, conf, meta)[0]
    )
    off = queries.copy()
    off[0, 1] = 9.0
    assert "outside the 6x4 frame" in check_arrays(frames, tracks, visible, off, conf, meta)[0]
    moved = queries.copy()
    moved[0, 1] = 1.0
    assert (
        "do not pass through their query"
        in check_arrays(frames, tracks, visible, moved, conf, meta)[0]
    )
