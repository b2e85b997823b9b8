"""The model-family plugin seam: how to load a pipeline, lay out its tokens and generate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from datagen.capture.recorder import Recorder
from datagen.config import GenerationConfig, ModelConfig
from datagen.layout import TokenLayout


class ModelFamily(Protocol):
    name: str

    def check_generation(self, gen: GenerationConfig) -> None:
        """Raise UserError when the sizes do not fit the family (before any model loads)."""

    def load_pipeline(self, cfg: ModelConfig) -> Any:
        """Load a diffusers pipeline (from_pretrained of a hub id or a local folder)."""

    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        """The token layout of one video (recorded in each sample)."""

    def install_capture(self, pipe: Any, recorder: Recorder, guidance: bool) -> Callable[[], None]:
        """Route the recorder's layers through capture processors and keep the recorder's
        step, timestep and conditional rows current; return a function that undoes it."""

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        gen: GenerationConfig,
    ) -> np.ndarray:
        """Generate videos: uint8 (B, T, H, W, 3) RGB."""
