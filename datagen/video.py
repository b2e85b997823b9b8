"""Video bytes out (PyAV). Encoding is single-threaded and bit-exact so that the same frames
always give the same bytes; labels are computed on ``decode_video(encode_video(...))``, the
frames a consumer actually sees. Decoding is the sample format's
(:func:`datagen.sampleformat.decode_video`, re-exported here), the one mp4 decoder that the
build and every reader share."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache
from typing import Any

import av
import numpy as np

from datagen.config import VideoConfig
from datagen.sampleformat import decode_video  # noqa: F401  (re-exported for the build)

_M_PERTURB = -6
"""glibc's mallopt parameter that fills every new allocation with a fixed byte."""


@contextmanager
def _deterministic_heap() -> Iterator[None]:
    """Make heap memory that the encoder reads before writing hold fixed bytes.

    libx264 (through libavcodec) reads some memory it never wrote: in a fresh process that is
    zero pages, but after other work in the same process (a model's generation) it is
    whatever was freed there, and the same frames gave different H.264 bytes from run to run.
    glibc's M_PERTURB fills each allocation made meanwhile with a fixed byte. Elsewhere than
    glibc this does nothing.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_PERTURB, 0x5A)
    try:
        yield
    finally:
        libc.mallopt(_M_PERTURB, 0)


@lru_cache(maxsize=1)
def _glibc() -> Any:
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def encode_video(frames: np.ndarray, fps: int, cfg: VideoConfig) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) as an MP4 (H.264) in memory; the same frames give
    the same bytes whatever the process did before (see :func:`_deterministic_heap`)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    with _deterministic_heap():
        return _encode(frames, fps, cfg)


def _encode(frames: np.ndarray, fps: int, cfg: VideoConfig) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(cfg.codec, rate=Fraction(fps, 1))
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = cfg.pix_fmt
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.options = {"crf": str(cfg.crf), "preset": "medium", "threads": "1"}
        stream.codec_context.thread_count = 1
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
