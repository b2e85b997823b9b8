"""A pixel-space stand-in for a video VAE, so a DiT trained on pixels runs in CogVideoXPipeline.

The embedded trained model works directly on 32x32 RGB frames (no latent compression): its
"latents" are the frames scaled to [-1, 1]. CogVideoXPipeline reads exactly four things from its
VAE: ``config.block_out_channels`` (spatial factor ``2 ** (len - 1)``, here 1),
``config.temporal_compression_ratio`` (here 1), ``config.scaling_factor`` (here 1) and
``decode(latents).sample``; CogVideoXImageToVideoPipeline also ``encode(image).latent_dist``
and ``config.invert_scale_latents``. This class provides them (``encode`` also serves the
features-of-existing-videos path), as a real diffusers ``ModelMixin`` so ``from_pretrained``
loads it from a pipeline folder like any other component. It has no weights to train: decode
is the identity (clamped to the valid range), encode the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class PixelDecoderOutput(BaseOutput):
    sample: torch.Tensor


class _PointDistribution:
    """``latent_dist`` of an encoder without noise: mode() and sample() are the input."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def mode(self) -> torch.Tensor:
        return self.value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.value


@dataclass
class PixelEncoderOutput(BaseOutput):
    latent_dist: _PointDistribution


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """Identity autoencoder over (B, C, F, H, W) videos in [-1, 1]."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),
        temporal_compression_ratio: int = 1,
        scaling_factor: float = 1.0,
        invert_scale_latents: bool = False,
    ):
        super().__init__()
        if len(block_out_channels) != 1 or temporal_compression_ratio != 1:
            raise ValueError("PixelSpaceVAE does not compress: one block, temporal ratio 1")
        # One buffer so the module has a dtype/device and a (tiny) weights file.
        self.register_buffer("unit", torch.ones(1), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        dist = _PointDistribution(x * self.config.scaling_factor)
        return PixelEncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        out = z.clamp(-1.0, 1.0) * self.unit.to(z.dtype)
        return PixelDecoderOutput(sample=out) if return_dict else (out,)
