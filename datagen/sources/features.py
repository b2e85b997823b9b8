"""Features of existing videos: the zero-shot protocol.

A video the model did not generate (a procedural video with exact tracks, or a video file)
gets attention features the way the paper does for zero-shot tracking on real videos: encode
it with the model's VAE, noise the latents to each chosen timestep with seeded Gaussian noise
(``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, the scheduler's ``add_noise``), and run
one forward pass of the DiT per timestep with the capture processors installed, conditioned on
the video's prompt. Nothing is denoised; the output of the forward is not used.

Steps: with ``capture.step_unit = 'index'`` the capture steps index the sampler's schedule of
``generation.num_inference_steps`` steps (step i runs at that schedule's i-th timestep, as it
would during generation); with ``'timestep'`` they are timesteps, run as given.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import BuildConfig
from datagen.errors import UserError
from datagen.sources.text_to_video import (
    LazyPipeline,
    capture_products,
    corr_tokens,
    token_rows,
)


class FeaturePass(LazyPipeline):
    """Loads the model once; captures q/k and correspondence of given videos."""

    def __init__(self, cfg: BuildConfig, spec: CaptureSpec):
        super().__init__(cfg)
        self.spec = spec
        for need in ("encode_video", "encode_text", "denoiser_forward", "install_processors"):
            if not hasattr(self.family, need):
                raise UserError(
                    f"model.family={cfg.model.family} has no feature pass for existing videos "
                    "(cogvideox has); switch capture off for this source"
                )

    def schedule(self) -> list[tuple[int, int]]:
        """(step label, timestep) pairs to run, in order."""
        pipe = self.pipe
        wanted = set(self.spec.feature_steps) | set(self.spec.corr_steps)
        if self.spec.step_unit == "timestep":
            ts = sorted({int(t) for t in wanted}, reverse=True)
            return list(enumerate(ts))
        pipe.scheduler.set_timesteps(self.cfg.generation.num_inference_steps)
        sched = [int(t) for t in pipe.scheduler.timesteps]
        return [(i, sched[i]) for i in sorted(wanted) if 0 <= i < len(sched)]

    def run(
        self, frames: np.ndarray, prompt: str, seed: int, queries: np.ndarray
    ) -> tuple[dict[str, Any], bytes | None, bytes | None]:
        """Capture products of one video: uint8 (T, H, W, 3), its prompt, the noise seed and
        its queries (N, 3) (t, x, y) raster; correspondence covers those on frame 0."""
        pipe, fam = self.pipe, self.family
        layout = self.layout
        assert layout is not None
        g = self.cfg.generation
        if frames.shape[:3] != (g.num_frames, g.height, g.width):
            raise ValueError(
                f"video is {frames.shape[0]}x{frames.shape[1]}x{frames.shape[2]}, the feature "
                f"pass needs {g.num_frames}x{g.height}x{g.width} (generation size)"
            )
        tokens = corr_tokens(layout, [queries])
        rows = token_rows(layout, tokens, queries)
        recorder = Recorder(self.spec, batch=1, query_tokens=tokens, token_grid=layout.token_grid)
        schedule = self.schedule()
        if self.spec.step_unit == "timestep":
            recorder.resolve_steps([t for _, t in schedule])
        else:
            recorder.resolve_steps([int(t) for t in pipe.scheduler.timesteps])
        x0 = fam.encode_video(pipe, frames[None])
        text = fam.encode_text(pipe, [prompt], g)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        restore = fam.install_processors(pipe, recorder)
        try:
            for step, t in schedule:
                xt = pipe.scheduler.add_noise(
                    x0, noise, torch.tensor([t], device=x0.device, dtype=torch.long)
                )
                recorder.begin_forward(step, t, slice(0, 1))
                fam.denoiser_forward(pipe, xt, text, t, clean=x0)
        finally:
            restore()
        meta, corr, feats = capture_products(self.spec, recorder, 0, rows)
        meta["protocol"] = (
            "existing video: VAE latents noised to each step's timestep with seeded Gaussian "
            "noise, one transformer forward per timestep"
        )
        meta["noise_seed"] = int(seed)
        meta["prompt"] = prompt
        return meta, corr, feats
