"""The model-family plugin seam: how to load a pipeline, lay out its tokens and generate."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from datagen.capture.recorder import Recorder
from datagen.config import GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout


@dataclass(frozen=True)
class Geometry:
    """What a model does to a video's shape, known before its weights load."""

    temporal: int
    """VAE temporal compression."""
    spatial: int
    """VAE spatial compression."""
    patch: int
    """Transformer spatial patch."""
    patch_t: int
    """Transformer temporal patch (1: none)."""
    heads_dim: int
    """Attention heads x head dimension (q/k bytes per token / 2)."""


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

    def check_prompts(self, prompts: list[Any], gen: GenerationConfig, model: ModelConfig) -> None:
        """Raise UserError when the prompts lack what the model needs (before it loads)."""

    def takes_first_frame(self, pipe: Any) -> bool:
        """Whether the loaded pipeline generates from a given first frame (image-to-video)."""

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        gen: GenerationConfig,
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Generate videos: uint8 (B, T, H, W, 3) RGB; ``images`` (uint8 (H, W, 3) each) are
        the first frames when :meth:`takes_first_frame`."""


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: auto = cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"model.device '{name}' is not a device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device '{name}' asked for, but no CUDA device is available")
    return dev


@contextmanager
def offline_hint(model_id: str, example_folder: str) -> Iterator[None]:
    """Turn a failed ``from_pretrained`` into one line that names the offline route."""
    try:
        yield
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(
            f"cannot load model '{model_id}' ({reason}); without internet, download it "
            f"elsewhere and pass its local folder with --set model.model_id={example_folder}"
            + ("" if offline else " (and set HF_HUB_OFFLINE=1)")
        ) from None


def generate_frames(
    pipe: Any, prompts: list[str], seeds: list[int], gen: GenerationConfig, **kwargs: Any
) -> np.ndarray:
    """Run a diffusers video pipeline with one seeded CPU generator per video (so a video does
    not depend on its batch-mates' seeds); uint8 (B, T, H, W, 3) RGB."""
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(
            prompt=prompts,
            height=gen.height,
            width=gen.width,
            num_frames=gen.num_frames,
            num_inference_steps=gen.num_inference_steps,
            guidance_scale=gen.guidance_scale,
            generator=generators,
            output_type="np",
            max_sequence_length=gen.max_sequence_length,
            **kwargs,
        )
    frames = np.asarray(out.frames, dtype=np.float32)
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


def check_video_size(
    gen: GenerationConfig,
    family: str,
    *,
    temporal: int,
    spatial: int,
    patch: int,
    frame_examples: str,
    size_hint: str = "",
) -> None:
    """Refuse sizes a causal-VAE video DiT cannot take as given (pipelines would silently
    round them, and the video would not match the recorded layout): frames must be
    ``temporal*k + 1`` and each side a multiple of ``spatial * patch``."""
    if gen.num_frames < 1 or (gen.num_frames - 1) % temporal:
        raise UserError(
            f"generation.num_frames={gen.num_frames}: {family} needs {temporal}k+1 frames "
            f"(e.g. {frame_examples})"
        )
    step = spatial * patch
    for name, value in (("height", gen.height), ("width", gen.width)):
        if value < step or value % step:
            raise UserError(
                f"generation.{name}={value}: {family} needs a multiple of {step} "
                f"(VAE {spatial}x times patch {patch}){size_hint}"
            )
