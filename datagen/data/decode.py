"""One sample's members to the fields asked for, with the sample format's decoders
(:mod:`datagen.sampleformat`); a member that does not decode is a CorruptShardError naming
the shard, the key and the member."""

from __future__ import annotations

from typing import Any

import numpy as np

from datagen.data.options import Options, VideoSpec
from datagen.sampleformat import (
    FEATURE_MEMBER,
    FIELD_MEMBERS,
    OPTIONAL_FIELDS,
    CorruptShardError,
    ShardError,
    decode_video,
    field_member,
    json_value,
    npy_array,
    safetensors_arrays,
)

_STORED = VideoSpec()
"""Every stored frame, uint8, at the stored size."""


def decode_frames(data: Any, spec: VideoSpec = _STORED) -> np.ndarray:
    """Decode mp4 bytes to frames, see :class:`VideoSpec` for shape and dtype."""
    return decode_video(
        data,
        spec.stride,
        size=spec.size,
        dtype=spec.dtype,
        channels_first=spec.channels_first,
        threads=spec.threads,
    )


def decode_sample(
    raw: dict[str, Any],
    feats: dict[str, Any] | None,
    key: str,
    shard: str,
    opts: Options,
) -> dict[str, Any]:
    """Members -> sample dict (see :class:`datagen.data.Dataset` for the fields)."""
    out: dict[str, Any] = {"key": key}
    member = None
    try:
        for name in sorted(opts.fields):
            if name == "features":
                continue
            member = field_member(name)
            if member not in raw:
                if name in OPTIONAL_FIELDS or name not in FIELD_MEMBERS:
                    continue
                raise CorruptShardError(shard, key, f"lacks member {member}")
            data = raw[member]
            if name == "frames":
                out["frames"] = decode_frames(data, opts.video)
            elif name == "mp4":
                out["mp4"] = bytes(data)
            elif name == "meta":
                out["meta"] = json_value(data)
            elif name == "correspondence":
                out["correspondence"] = safetensors_arrays(data)
            else:
                out[name] = npy_array(data)
        if opts.features is not None:
            member = FEATURE_MEMBER
            if feats is None or FEATURE_MEMBER not in feats:
                raise CorruptShardError(shard, key, f"has no features ({FEATURE_MEMBER})")
            out["features"] = safetensors_arrays(feats[FEATURE_MEMBER], opts.features.wants)
    except ShardError:
        raise
    except Exception as exc:  # any decode failure is a finding about this member
        raise CorruptShardError(
            shard, key, f"cannot be decoded ({type(exc).__name__}: {exc})", member
        ) from exc
    return out
