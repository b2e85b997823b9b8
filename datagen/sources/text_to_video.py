"""Text-to-video through a model-family plugin, with attention capture."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import BuildConfig
from datagen.layout import TokenLayout
from datagen.models import get_family
from datagen.plan import WorkUnit
from datagen.sources.base import Produced


def capture_spec(cfg: BuildConfig) -> CaptureSpec:
    """The capture a config asks for; a layer list without steps (or the reverse) is off."""
    c = cfg.capture
    return CaptureSpec(
        feature_layers=tuple(c.feature_layers) if c.feature_steps else (),
        feature_steps=tuple(c.feature_steps) if c.feature_layers else (),
        corr_layers=tuple(c.corr_layers) if c.corr_steps else (),
        corr_steps=tuple(c.corr_steps) if c.corr_layers else (),
        step_unit=c.step_unit,
    )


class LazyPipeline:
    """The config's model-family pipeline and token layout, loaded on first use (once per
    worker); shared by generation and the feature pass for existing videos."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.family = get_family(cfg.model.family)
        self._pipe = None
        self.layout: TokenLayout | None = None

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = self.family.load_pipeline(self.cfg.model)
            self.layout = self.family.layout(self._pipe, self.cfg.generation)
        return self._pipe


class TextToVideoSource(LazyPipeline):
    kind = "text-to-video"

    def __init__(self, cfg: BuildConfig, query_points: np.ndarray):
        super().__init__(cfg)
        self.spec = capture_spec(cfg)
        self.query_points = query_points
        """(N, 3) (t, x, y) raster: the tracker's queries, known before generation."""

    def layout_json(self) -> dict[str, Any] | None:
        return self.layout.to_json() if self.layout else None

    def produce(self, units: tuple[WorkUnit, ...]) -> list[Produced]:
        videos, recorder = self.generate(units)
        return [
            Produced(
                frames=video,
                capture=self.capture_products(recorder, b) if recorder else None,
                meta={"kind": self.kind, "model_id": self.cfg.model.model_id},
            )
            for b, video in enumerate(videos)
        ]

    def generate(self, units: tuple[WorkUnit, ...]) -> tuple[np.ndarray, Recorder | None]:
        """Generate a batch of videos, capturing attention when the config asks for it."""
        cfg, pipe = self.cfg, self.pipe
        recorder = None
        remove = None
        if self.spec.enabled:
            layout = self.layout
            rowcol = layout.token_of_pixel(self.query_points[:, 1:])
            _, _, w = layout.token_grid
            recorder = Recorder(
                self.spec,
                batch=len(units),
                query_tokens=torch.from_numpy(rowcol[:, 0] * w + rowcol[:, 1]),
                token_grid=layout.token_grid,
            )
            remove = self.family.install_capture(
                pipe, recorder, guidance=cfg.generation.guidance_scale > 1
            )
        try:
            videos = self.family.generate(
                pipe,
                [u.prompt.prompt for u in units],
                [u.negative_prompt for u in units],
                [u.seed for u in units],
                cfg.generation,
            )
        finally:
            if remove is not None:
                remove()
        return videos, recorder

    def capture_products(
        self, recorder: Recorder, b: int
    ) -> tuple[dict[str, Any], bytes | None, bytes | None]:
        return capture_products(self.spec, recorder, b)


def capture_products(
    spec: CaptureSpec, recorder: Recorder, b: int
) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """Video ``b``'s capture metadata, correspondence safetensors and q/k safetensors."""
    import safetensors.numpy
    import safetensors.torch

    arrays, layers, steps = recorder.stacked_correspondence(b)
    corr = None
    if spec.corr_layers:
        corr = safetensors.numpy.save(
            arrays,
            # One key only: safetensors writes metadata maps in no fixed order.
            metadata={"layers_steps": json.dumps({"layers": layers, "steps": steps})},
        )
    feats = None
    if spec.feature_layers:
        feats = safetensors.torch.save(recorder.features[b])
    meta = {
        "corr_layers": layers,
        "corr_steps": steps,
        "corr_arrays": {k: list(v.shape) for k, v in sorted(arrays.items())},
        "feature_tensors": sorted(recorder.features[b]),
        "step_timesteps": {str(k): v for k, v in sorted(recorder.step_timesteps.items())},
        "query_tokens": "token of each query point in token frame 0, index row*w + col",
        "cfg_branch": "conditional",
        "dtype": "float16",
    }
    return meta, corr, feats
