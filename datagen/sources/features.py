"""Features of existing videos: the zero-shot protocol.

A video the model did not generate (a procedural video with exact tracks, or a video file)
gets attention features the way the paper does for zero-shot tracking on real videos: encode
it with the model's VAE, noise the latents to each chosen timestep with seeded Gaussian noise
as the model was trained (CogVideoX: the DDPM forward process, ``x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps``; Wan and HunyuanVideo: the rectified flow, ``x_t = (1 - s) x_0 + s eps``
with ``s = t / 1000``), and run
one forward pass of the DiT per timestep with the capture processors installed, conditioned on
the video's prompt. Nothing is denoised; the output of the forward is not used.

Steps: with ``capture.step_unit = 'index'`` the capture steps index the sampler's schedule of
``generation.num_inference_steps`` steps (step i runs at that schedule's i-th timestep, as it
would during generation); with ``'timestep'`` they are timesteps, run as given.
"""

from __future__ import annotations

import numpy as np
import torch

from datagen.capture.products import CaptureProducts, capture_products, corr_tokens, token_rows
from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import BuildConfig
from datagen.models.loader import LazyPipeline


class FeaturePass(LazyPipeline):
    """Loads the model once; captures q/k and correspondence of given videos, for every model
    family (through :class:`datagen.models.base.ModelFamily`'s feature-pass methods)."""

    def __init__(self, cfg: BuildConfig, spec: CaptureSpec):
        super().__init__(cfg)
        self.spec = spec

    def schedule(self) -> list[tuple[int, float]]:
        """(step label, timestep) pairs to run, in order, and the schedule the steps index."""
        wanted = set(self.spec.feature_steps) | set(self.spec.corr_steps)
        if self.spec.step_unit == "timestep":
            ts = sorted({int(t) for t in wanted}, reverse=True)
            return [(i, float(t)) for i, t in enumerate(ts)]
        sched = self.family.inference_timesteps(self.pipe, self.cfg.generation.num_inference_steps)
        return [(i, sched[i]) for i in sorted(wanted) if 0 <= i < len(sched)]

    def run(
        self, frames: np.ndarray, prompt: str, seed: int, queries: np.ndarray
    ) -> CaptureProducts:
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
            recorder.resolve_steps([int(t) for _, t in schedule])
        else:
            recorder.resolve_steps(
                [int(t) for t in fam.inference_timesteps(pipe, g.num_inference_steps)]
            )
        x0 = fam.encode_video(pipe, frames[None])
        text = fam.encode_text(pipe, [prompt], g)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        restore = fam.install_processors(pipe.transformer, recorder)
        try:
            for step, t in schedule:
                recorder.begin_forward(step, int(t), slice(0, 1))
                fam.denoiser_forward(pipe, fam.add_noise(pipe, x0, noise, t), text, t, clean=x0)
        finally:
            restore()
        made = capture_products(self.spec, recorder, 0, rows)
        made.meta["protocol"] = (
            "existing video: VAE latents noised to each step's timestep with seeded Gaussian "
            "noise, one transformer forward per timestep"
        )
        made.meta["noise_seed"] = int(seed)
        made.meta["prompt"] = prompt
        return made
