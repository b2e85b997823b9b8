"""Text-to-video through a model-family plugin, with attention capture."""

from __future__ import annotations

from typing import Any

import numpy as np

from datagen.capture.products import capture_products, capture_spec, corr_tokens, token_rows
from datagen.capture.recorder import Recorder
from datagen.config import BuildConfig
from datagen.errors import UserError
from datagen.models.loader import LazyPipeline
from datagen.plan import WorkUnit
from datagen.sources.base import Produced
from datagen.track.queries import QuerySampler


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


