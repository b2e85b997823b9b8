"""Video encoding gives the same bytes for the same frames, whatever the process did before."""

from __future__ import annotations

import os

import numpy as np

import datagen.video as video
from datagen.config import VideoConfig


def _dirty_heap(seed: int) -> None:
    """Allocate and free thousands of buffers of random bytes, as a model's generation does."""
    rng = np.random.default_rng(seed)
    junk = [bytearray(os.urandom(int(n))) for n in 1 << rng.integers(6, 17, 3000)]
    del junk


def _frames() -> np.ndarray:
    from datagen.sources.synthetic import SyntheticConfig, render_synthetic_video

    scenes = SyntheticConfig(num_frames=9, height=64, width=96, texture="smooth")
    return render_synthetic_video(scenes, seed=1).frames


def test_same_frames_same_bytes_after_the_heap_held_other_data():
    frames = _frames()
    first = video.encode_video(frames, 8, VideoConfig())
    for seed in range(3):
        _dirty_heap(seed)
        assert video.encode_video(frames, 8, VideoConfig()) == first
    np.testing.assert_array_equal(video.decode_video(first).shape, frames.shape)
