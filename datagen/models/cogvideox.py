"""CogVideoX (1.0: 2B and 5B) as a model-family plugin.

Joint self-attention over [text tokens FIRST, then video tokens]. Video tokens are
frame-major: index = text_len + f * (h * w) + y * w + x for latent frame f and patch (y, x).
The VAE compresses 4x in time (latent frame 0 holds video frame 0 alone, latent frame f >= 1
holds video frames 4f-3 .. 4f) and 8x in space; the transformer patches 2x2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import TINY_MODEL_ID, TRAINED_TINY_ID, GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout
from datagen.models.base import (
    CaptureProcessor,
    Geometry,
    ModelFamily,
    component_config,
    from_built,
    local_folder,
    offline_hint,
    vae_posterior_mode,
)
from datagen.models.tiny_spec import SHIPPED_DIR

PIPELINE_CLASSES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")

KNOWN_GEOMETRY = {
    TINY_MODEL_ID: Geometry(4, 8, 2, 1, 2 * 16, 2),
    "THUDM/CogVideoX-2b": Geometry(4, 8, 2, 1, 30 * 64, 30),
    "THUDM/CogVideoX-5b": Geometry(4, 8, 2, 1, 48 * 64, 42),
    "THUDM/CogVideoX-5b-I2V": Geometry(4, 8, 2, 1, 48 * 64, 42),
    "THUDM/CogVideoX1.5-5B": Geometry(4, 8, 2, 2, 48 * 64, 42),
    "THUDM/CogVideoX1.5-5B-I2V": Geometry(4, 8, 2, 2, 48 * 64, 42),
}
"""Geometry of the public checkpoints (their transformer and VAE configs), for size estimates
and checks before the weights are on this machine."""
UNKNOWN_GEOMETRY = Geometry(4, 8, 2, 1, 30 * 64, None)
"""A checkpoint whose configs are not here and not in the table: CogVideoX-2B's layout."""


def is_image_to_video(pipe: Any) -> bool:
    """Whether a loaded CogVideoX pipeline generates from a first frame (CogVideoX-I2V)."""
    return type(pipe).__name__ == "CogVideoXImageToVideoPipeline"


def _checkpoint(model: ModelConfig) -> ModelConfig:
    """Where a model's files are: the shipped trained tiny model lives in the package."""
    if model.model_id == TRAINED_TINY_ID:
        return ModelConfig(model_id=str(SHIPPED_DIR))
    return model


def is_image_to_video_checkpoint(model_id: str) -> bool | None:
    """Whether a checkpoint is CogVideoX-I2V, from its ``model_index.json`` when it is on this
    machine (None when it cannot be told before loading: a hub id not on this machine)."""
    if model_id == TINY_MODEL_ID:
        return False
    index = component_config(_checkpoint(ModelConfig(model_id=model_id)), "", "model_index.json")
    if index is None:
        return True if model_id.endswith("-I2V") else None
    return index.get("_class_name") == "CogVideoXImageToVideoPipeline"


def no_image_message(where: str, model_id: str) -> str:
    return (
        f"{where}: model '{model_id}' is image-to-video and this prompt has no 'image' field; "
        "add one (a path relative to the prompt file) or --set generation.first_frame=procedural"
    )


def first_frame_latents(clean: torch.Tensor) -> torch.Tensor:
    """The image latents CogVideoXImageToVideoPipeline concatenates to the noisy latents:
    latent frame 0 of ``clean`` (B, F, C, h, w) (the causal VAE encodes video frame 0 alone
    into it), zeros for the later latent frames."""
    image = torch.zeros_like(clean)
    image[:, :1] = clean[:, :1]
    return image


class CogVideoXFamily(ModelFamily):
    name = "cogvideox"
    title = "CogVideoX"
    folder_example = "/path/to/CogVideoX"
    builtin_ids = (TRAINED_TINY_ID, TINY_MODEL_ID)

    def geometry(self, model: ModelConfig) -> Geometry:
        """From the checkpoint's transformer and VAE configs when they are on this machine
        (the shipped trained tiny model works on pixels with patch 4), else from
        :data:`KNOWN_GEOMETRY`."""
        if model.model_id in KNOWN_GEOMETRY:
            return KNOWN_GEOMETRY[model.model_id]
        where = _checkpoint(model)
        t = component_config(where, "transformer")
        v = component_config(where, "vae")
        if t and v:
            return Geometry(
                int(v.get("temporal_compression_ratio", 4)),
                2 ** (len(v.get("block_out_channels", [0] * 4)) - 1),
                int(t.get("patch_size", 2)),
                int(t.get("patch_size_t") or 1),
                int(t.get("num_attention_heads", 30)) * int(t.get("attention_head_dim", 64)),
                int(t.get("num_layers", 30)),
            )
        return UNKNOWN_GEOMETRY

    def check_prompts(self, prompts: list[Any], gen: GenerationConfig, model: ModelConfig) -> None:
        """An image-to-video checkpoint taking first frames from the prompts needs an image
        in every prompt (checked before the model loads when the checkpoint is local)."""
        if gen.first_frame != "prompt" or not is_image_to_video_checkpoint(model.model_id):
            return
        for p in prompts:
            if p.image is None:
                raise UserError(no_image_message(p.source, model.model_id))

    def load(self, cfg: ModelConfig, dtype: torch.dtype) -> Any:
        """Text-to-video (``CogVideoXPipeline``) or image-to-video
        (``CogVideoXImageToVideoPipeline``), whichever the checkpoint's ``model_index.json``
        names; any other pipeline class is refused."""
        from diffusers import CogVideoXPipeline, DiffusionPipeline

        # The shipped trained tiny model's folder names this module for its pixel-space VAE;
        # diffusers loads only from modules already imported.
        import datagen.models.pixel_vae  # noqa: F401

        if cfg.model_id == TINY_MODEL_ID:
            from datagen.models.tiny_cogvideox import build_tiny_pipeline

            return from_built(build_tiny_pipeline, CogVideoXPipeline.from_pretrained, dtype=dtype)
        folder = local_folder(_checkpoint(cfg).model_id)
        source = str(folder) if folder is not None else cfg.model_id
        with offline_hint(cfg.model_id, self.folder_example):
            pipe = DiffusionPipeline.from_pretrained(source, revision=cfg.revision, dtype=dtype)
        if type(pipe).__name__ not in PIPELINE_CLASSES:
            raise UserError(
                f"model '{cfg.model_id}' is a {type(pipe).__name__}; model.family=cogvideox "
                f"takes {' or '.join(PIPELINE_CLASSES)} (set model.family to match the model)"
            )
        return pipe

    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        tcfg = pipe.transformer.config
        patch = int(tcfg.patch_size)
        patch_t = int(tcfg.patch_size_t or 1)
        vae_s = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        vae_t = int(pipe.vae.config.temporal_compression_ratio)
        latent_frames = (gen.num_frames - 1) // vae_t + 1
        # CogVideoX 1.5 prepends padding latent frames up to a multiple of patch_size_t.
        pad = (-latent_frames) % patch_t
        return self.token_layout(
            gen,
            (vae_t, vae_s),
            (patch_t, patch, patch),
            int(gen.max_sequence_length),
            "first",
            pad_front=pad,
            rope=bool(tcfg.use_rotary_positional_embeddings),
        )

    def attention_layers(self, transformer: Any) -> list[Any]:
        return [block.attn1 for block in transformer.transformer_blocks]

    def blocks(self, transformer: Any) -> list[Any]:
        return list(transformer.transformer_blocks)

    def capture_processor(self, recorder: Recorder, layer: int, replaced: Any) -> Any:
        return CogVideoXCaptureProcessor(recorder, layer)

    def conditional_rows(self, label: str | None, batch: int, guidance: bool) -> slice | None:
        """Both CFG branches run in one batched forward per step, negative first: the
        conditional rows are the second half."""
        return slice(batch // 2, batch) if guidance else slice(0, batch)

    def encode_video(self, pipe: Any, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> (B, F', C, h, w): the VAE posterior mode times the VAE
        scaling factor, frames before channels as the transformer takes them."""
        z = vae_posterior_mode(pipe.vae, frames) * pipe.vae.config.scaling_factor
        return z.permute(0, 2, 1, 3, 4).contiguous()

    timestep_dtype = torch.long

    def add_noise(self, pipe: Any, clean: Tensor, noise: Tensor, timestep: float) -> Tensor:
        """The DDPM forward process of the model's scheduler (its ``add_noise``)."""
        t = torch.tensor([int(timestep)], device=clean.device, dtype=torch.long)
        return pipe.scheduler.add_noise(clean, noise, t)

    def forward_inputs(self, pipe: Any, latents: Tensor, clean: Tensor | None) -> dict[str, Any]:
        """RoPE tables (5B, 1.5) and, for an image-to-video model, the first frame of
        ``clean`` as its image latents, concatenated along channels."""
        rope = None
        if pipe.transformer.config.use_rotary_positional_embeddings:
            s = pipe.vae_scale_factor_spatial
            rope = pipe._prepare_rotary_positional_embeddings(
                latents.shape[3] * s, latents.shape[4] * s, latents.shape[1], latents.device
            )
        if is_image_to_video(pipe):
            if clean is None:
                raise ValueError("an image-to-video model's forward needs the clean latents")
            latents = torch.cat([latents, first_frame_latents(clean).to(latents.dtype)], dim=2)
        return {"hidden_states": latents, "image_rotary_emb": rope}

    def takes_first_frame(self, pipe: Any) -> bool:
        return is_image_to_video(pipe)

    def pipeline_kwargs(
        self, pipe: Any, negs: list[str], gen: GenerationConfig, images: list[np.ndarray] | None
    ) -> dict[str, Any]:
        """Image-to-video takes ``images`` (one uint8 (H, W, 3) first frame per prompt, at
        the generation size) when the pipeline is CogVideoX-I2V."""
        if not is_image_to_video(pipe):
            return super().pipeline_kwargs(pipe, negs, gen, images)
        if images is None or len(images) != len(negs):
            raise ValueError("an image-to-video CogVideoX pipeline needs one first frame a prompt")
        image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return {"negative_prompt": negs, "image": image}


class CogVideoXCaptureProcessor(CaptureProcessor):
    """CogVideoX joint attention that also hands its q/k to a recorder.

    The computation is the one diffusers' CogVideoXAttnProcessor2_0 performs, in the same
    order, so the output is bit-identical; every argument is named because diffusers passes
    only the keyword arguments a processor's signature names (``image_rotary_emb`` would
    silently be lost behind ``**kwargs``).
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        rec = self.recorder
        if rec.wants(self.layer):
            f, h, w = rec.token_grid
            c = rec.cond
            shape = (-1, attn.heads, f, h * w, head_dim)
            rec.record(
                self.layer,
                query[c, :, text_len:].reshape(shape),
                key[c, :, text_len:].reshape(shape),
                key[c, :, :text_len],
                q_text=query[c, :, :text_len],
                v_video=value[c, :, text_len:].reshape(shape),
                v_text=value[c, :, :text_len],
            )
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_len, hidden_states.size(1) - text_len], dim=1
        )
        return hidden_states, encoder_hidden_states


class _QKCollector:
    """The recorder interface of :class:`CogVideoXCaptureProcessor`, keeping float q/k of every
    row (one forward, no CFG split): for analysis and training-time evaluation."""

    def __init__(self, token_grid: tuple[int, int, int], layers: list[int]):
        self.token_grid = token_grid
        # Only which layers get a processor matters here (``wants`` takes every call).
        self.spec = CaptureSpec(tuple(layers), (0,), (), ())
        self.cond = slice(None)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def wants(self, layer: int) -> bool:
        return True

    def record(self, layer, q_video, k_video, k_text, **extra) -> None:
        self.qk[layer] = (q_video.detach().float().clone(), k_video.detach().float().clone())


def capture_qk(
    transformer: Any,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    timestep: torch.Tensor,
    layers: list[int] | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One forward of a CogVideoX transformer on ``latents`` (B, F, C, H, W); returns, per layer,
    the video q and k (B, heads, F', h*w, d) exactly as its attention uses them."""
    cfg = transformer.config
    pt = int(cfg.patch_size_t or 1)
    grid = (
        latents.shape[1] // pt,
        latents.shape[3] // int(cfg.patch_size),
        latents.shape[4] // int(cfg.patch_size),
    )
    layers = list(range(len(transformer.transformer_blocks))) if layers is None else layers
    collector = _QKCollector(grid, layers)
    restore = CogVideoXFamily().install_processors(transformer, collector)  # type: ignore[arg-type]
    try:
        with torch.inference_mode():
            transformer(
                hidden_states=latents,
                encoder_hidden_states=text_emb,
                timestep=timestep,
                return_dict=False,
            )
    finally:
        restore()
    return collector.qk
