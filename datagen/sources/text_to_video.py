"""Text-to-video through a model-family plugin, with attention capture."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import BuildConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout
from datagen.models import get_family
from datagen.plan import WorkUnit
from datagen.sources.base import Produced
from datagen.track.queries import QuerySampler, first_frame_rows

TOKEN_ARRAYS = frozenset({"match_reverse"})
"""Correspondence arrays indexed by token rather than by query point."""


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


class TextToVideoSource(LazyPipeline):
    kind = "text-to-video"

    def __init__(self, cfg: BuildConfig, sampler: QuerySampler):
        super().__init__(cfg)
        self.spec = capture_spec(cfg)
        self.sampler = sampler
        """Samples each video's tracker queries: before generation when it can (the online
        correspondence then runs on just their tokens), else from the generated frames."""

    def layout_json(self) -> dict[str, Any] | None:
        return self.layout.to_json() if self.layout else None

    def queries_of(self, unit: WorkUnit, frames: np.ndarray | None) -> np.ndarray:
        g = self.cfg.generation
        first = None if frames is None else frames[0]
        return self.sampler.sample(g.height, g.width, g.num_frames, unit.seed, first_frame=first)

    def first_frames(
        self, units: tuple[WorkUnit, ...]
    ) -> tuple[list[np.ndarray] | None, list[dict[str, Any] | None]]:
        """First frames for an image-to-video model (None for text-to-video), and what each
        came from (recorded in the sample's ``source.first_frame``)."""
        if not self.family.takes_first_frame(self.pipe):
            return None, [None] * len(units)
        g = self.cfg.generation
        images, origins = [], []
        for u in units:
            if g.first_frame == "procedural":
                image, scene_seed = procedural_first_frame(self.cfg, u.prompt.prompt, u.seed)
                origin = {"kind": "procedural", "scene_seed": scene_seed}
            else:
                if u.prompt.image is None:
                    from datagen.models.cogvideox import no_image_message

                    raise UserError(no_image_message(u.prompt.source, self.cfg.model.model_id))
                image = read_first_frame(u.prompt.image, g.height, g.width)
                origin = {"kind": "image", "path": u.prompt.image, "sha256": u.prompt.image_sha256}
            images.append(image)
            origins.append(origin)
        return images, origins

    def produce(self, units: tuple[WorkUnit, ...]) -> list[Produced]:
        early = [None if self.sampler.needs_video else self.queries_of(u, None) for u in units]
        images, origins = self.first_frames(units)
        videos, recorder = self.generate(units, early, images)
        out = []
        for b, (unit, video) in enumerate(zip(units, videos, strict=True)):
            queries = early[b] if early[b] is not None else self.queries_of(unit, video)
            capture = None
            if recorder is not None:
                assert self.layout is not None
                rows = token_rows(self.layout, recorder.query_tokens, queries)
                capture = capture_products(self.spec, recorder, b, rows)
            out.append(
                Produced(
                    frames=video,
                    capture=capture,
                    queries=queries,
                    meta={"kind": self.kind, "model_id": self.cfg.model.model_id}
                    | ({"first_frame": origins[b]} if origins[b] is not None else {}),
                )
            )
        return out

    def generate(
        self,
        units: tuple[WorkUnit, ...],
        queries: list[np.ndarray | None],
        images: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, Recorder | None]:
        """Generate a batch of videos, capturing attention when the config asks for it;
        ``queries[b]`` are video b's queries when known before generation (else None);
        ``images`` the first frames of an image-to-video model."""
        cfg, pipe = self.cfg, self.pipe
        recorder = None
        remove = None
        if self.spec.enabled:
            layout = self.layout
            assert layout is not None
            tokens = corr_tokens(layout, queries)
            recorder = Recorder(
                self.spec,
                batch=len(units),
                query_tokens=tokens,
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
                images=images,
            )
        finally:
            if remove is not None:
                remove()
        return videos, recorder


def procedural_first_frame(cfg: BuildConfig, prompt: str, seed: int) -> tuple[np.ndarray, int]:
    """The procedural source's first frame for a prompt at the generation size (the scene
    distribution of ``source.synthetic``) and the scene seed it came from."""
    from datagen.models.tiny_dit import first_frame_for_prompt
    from datagen.sources.procedural import synthetic_config

    g = cfg.generation
    settings = {**cfg.source.synthetic, "num_frames": 1, "height": g.height, "width": g.width}
    return first_frame_for_prompt(prompt, seed, synthetic_config(settings))


def read_first_frame(path: str, height: int, width: int) -> np.ndarray:
    """An image file as uint8 (height, width, 3) RGB, resized to the generation size."""
    import cv2

    from datagen.sources.videos import fit_size

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"{path}: not a readable image; re-save it as PNG or JPEG")
    return fit_size(img[None, :, :, ::-1], height, width)[0]


def capture_products(
    spec: CaptureSpec, recorder: Recorder, b: int, rows: np.ndarray
) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """Video ``b``'s capture metadata, correspondence safetensors and q/k safetensors.

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
    if spec.feature_layers:
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
    return meta, corr, feats
