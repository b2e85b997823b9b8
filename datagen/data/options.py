"""What a read gives: the fields, how frames are decoded, which q/k tensors, checks, errors."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from datagen.errors import UserError
from datagen.sampleformat import FIELDS, field_member

DEFAULT_FIELDS = ("tracks", "visible", "queries", "confidence", "correspondence", "meta")
"""Fields read unless ``fields`` says otherwise (``frames`` and ``features`` have their own
switches, ``video`` and ``features``)."""
VERIFY = ("none", "members", "all")
ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class VideoSpec:
    """How ``frames`` are decoded (PyAV, only for samples that are yielded).

    Gives ``frames`` of shape (T', H', W', 3) (or (T', 3, H', W') with ``channels_first``),
    ``T' = ceil(T / stride)``: frame ``i`` is stored frame ``i * stride``. Labels are never
    resampled: they stay at every stored frame in the stored video's pixel raster (scale x by
    W'/W and y by H'/H to match a resized video).
    """

    stride: int = 1
    size: tuple[int, int] | None = None
    """(height, width) to resize to (swscale, bilinear); None keeps the stored size."""
    dtype: str = "uint8"
    """'uint8' (0..255) or 'float32' / 'float16' (0..1)."""
    channels_first: bool = False
    threads: int = 1
    """Decoder threads per sample (0: FFmpeg's choice); 1 suits DataLoader workers."""

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"VideoSpec.stride must be >= 1, got {self.stride}")
        if self.dtype not in ("uint8", "float32", "float16"):
            raise ValueError(f"VideoSpec.dtype must be uint8, float32 or float16: {self.dtype}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"VideoSpec.size must be (height, width), got {self.size}")


FEATURE_KINDS = ("q", "k", "h")
"""Tensor kinds of the features shard: attention queries, keys, block output hidden states."""
_NAME = re.compile(r"^([a-z]+)\.layer(\d+)\.step(\d+)$")


@dataclass(frozen=True)
class FeatureSpec:
    """Which tensors to read from the features shard (None: all). Tensor names are
    ``{kind}.layer{LLL}.step{SSS}``; kinds ``q`` and ``k`` are fp16 (heads, token frames, h*w,
    head dim), ``h`` (block output hidden states, ``capture.hidden_layers``) fp16 (token
    frames, h*w, model width)."""

    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    kinds: tuple[str, ...] = FEATURE_KINDS

    def __post_init__(self) -> None:
        for name in ("layers", "steps", "kinds"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        bad = [k for k in self.kinds if k not in FEATURE_KINDS]
        if bad:
            raise ValueError(f"FeatureSpec.kinds {bad} are not among {', '.join(FEATURE_KINDS)}")

    def wants(self, name: str) -> bool:
        m = _NAME.match(name)
        if not m:
            return self.layers is None and self.steps is None
        kind, layer, step = m.group(1), int(m.group(2)), int(m.group(3))
        return (
            kind in self.kinds
            and (self.layers is None or layer in self.layers)
            and (self.steps is None or step in self.steps)
        )


@dataclass(frozen=True)
class Options:
    """The checked options of one :class:`~datagen.data.Dataset`."""

    fields: frozenset[str]
    video: VideoSpec
    features: FeatureSpec | None
    verify: str
    on_error: str

    def members(self) -> set[str]:
        """The core members the fields are read from."""
        return {field_member(f) for f in self.fields if f != "features"}


def make_options(
    video: bool | VideoSpec,
    fields: Iterable[str] | None,
    features: bool | FeatureSpec,
    verify: str | bool,
    on_error: str,
    has_frames: bool | None = None,
) -> Options:
    """Check the arguments of :func:`~datagen.data.open_dataset` (UserError) into Options."""
    chosen = set(DEFAULT_FIELDS if fields is None else fields)
    if "video" in chosen:
        chosen.discard("video")
        chosen.add("frames")
    unknown = [f for f in chosen if f not in FIELDS and not re.fullmatch(r"[A-Za-z0-9_]+", f)]
    if unknown:
        raise UserError(f"unknown field(s) {unknown}; choose from {', '.join(FIELDS)}")
    spec = video if isinstance(video, VideoSpec) else VideoSpec()
    if has_frames if has_frames is not None else bool(video):
        chosen.add("frames")
    if features:
        chosen.add("features")
    fspec = (
        features
        if isinstance(features, FeatureSpec)
        else (FeatureSpec() if "features" in chosen else None)
    )
    if verify is True:
        verify = "all"
    elif verify is False:
        verify = "none"
    if verify not in VERIFY:
        raise UserError(f"verify={verify!r}: choose one of {', '.join(VERIFY)}")
    if on_error not in ON_ERROR:
        raise UserError(f"on_error={on_error!r}: choose one of {', '.join(ON_ERROR)}")
    return Options(frozenset(chosen), spec, fspec, str(verify), on_error)
