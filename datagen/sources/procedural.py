"""`--source synthetic`: procedural videos with exact tracks, visibility and object masks, in
the same sample format as generated videos (plus a ``masks.npy`` member)."""

from __future__ import annotations

from typing import Any

import numpy as np

from datagen.plan import WorkUnit
from datagen.prompts import Prompt
from datagen.sample import npy_bytes
from datagen.sources.base import Produced
from datagen.sources.synthetic import (  # noqa: F401  (synthetic_config re-exported)
    SyntheticConfig,
    exact_tracks,
    render_synthetic_video,
    synthetic_config,
)
from datagen.track.queries import QuerySampler

DESCRIPTION = (
    "procedural video: textured sprites (squares, discs, ellipses) moving, rotating and "
    "scaling over a textured background seen by a panning camera, occluding each other"
)


def synthetic_prompts(num_videos: int) -> list[Prompt]:
    """Work units of a synthetic build: one pseudo-prompt per video, ids synthetic-NNNNN."""
    return [
        Prompt(
            id=f"synthetic-{i:05d}",
            prompt=DESCRIPTION,
            category="synthetic",
            set="object",
            source="synthetic",
        )
        for i in range(num_videos)
    ]


class SyntheticSource:
    kind = "synthetic"

    def __init__(
        self,
        settings: dict[str, Any],
        features: Any | None = None,
        sampler: QuerySampler | None = None,
    ):
        self.config = synthetic_config(settings)
        self.features = features
        """A :class:`datagen.sources.features.FeaturePass`, or None (no capture)."""
        self.sampler = sampler
        """Samples the queries (exact tracks follow them); None: the renderer's own points."""

    @property
    def pipe(self) -> Any:
        return self.features.pipe if self.features is not None else None

    def produce(self, units: tuple[WorkUnit, ...]) -> list[Produced]:
        out = []
        for u in units:
            video = render_synthetic_video(self.config, seed=u.seed)
            if self.sampler is not None:
                c = self.config
                video.queries = self.sampler.sample(
                    c.height,
                    c.width,
                    c.num_frames,
                    u.seed,
                    first_frame=video.frames[0],
                    mask=video.masks[0] > 0,
                )
                video.tracks, video.visible, video.object_ids = exact_tracks(
                    video.scene, video.queries
                )
            capture = None
            prompt = None
            if self.features is not None:
                from datagen.models.tiny_dit import caption

                prompt = caption(self.config, u.seed)
                capture = self.features.run(video.frames, prompt, u.seed, video.queries)
            out.append(
                Produced(
                    frames=video.frames,
                    labels={
                        "tracks": video.tracks.astype(np.float32),
                        "visible": video.visible.astype(bool),
                        "queries": video.queries.astype(np.float32),
                    },
                    extra_members={
                        "masks.npy": npy_bytes(video.masks.astype(np.int16)),
                        "object_ids.npy": npy_bytes(video.object_ids.astype(np.int16)),
                    },
                    meta={
                        "kind": self.kind,
                        "synthetic": _jsonable(video.meta),
                        **({"caption": prompt} if prompt is not None else {}),
                    },
                    capture=capture,
                )
            )
        return out

    def layout_json(self) -> dict[str, Any] | None:
        if self.features is None or self.features.layout is None:
            return None
        return self.features.layout.to_json()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
