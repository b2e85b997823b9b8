"""CogVideoX (1.0: 2B and 5B) as a model-family plugin.

Joint self-attention over [text tokens FIRST, then video tokens]. Video tokens are
frame-major: index = text_len + f * (h * w) + y * w + x for latent frame f and patch (y, x).
The VAE compresses 4x in time (latent frame 0 holds video frame 0 alone, latent frame f >= 1
holds video frames 4f-3 .. 4f) and 8x in space; the transformer patches 2x2.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datagen.capture.recorder import Recorder
from datagen.config import TINY_MODEL_ID, TRAINED_TINY_ID, GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout
from datagen.models.base import (
    Geometry,
    check_video_size,
    generate_frames,
    offline_hint,
    resolve_device,
)

TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
PIPELINE_CLASSES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")


def is_image_to_video(pipe: Any) -> bool:
    """Whether a loaded CogVideoX pipeline generates from a first frame (CogVideoX-I2V)."""
    return type(pipe).__name__ == "CogVideoXImageToVideoPipeline"


def is_image_to_video_checkpoint(model_id: str) -> bool | None:
    """Whether a checkpoint is CogVideoX-I2V, from its local ``model_index.json`` (None when
    it cannot be told before loading: a hub id not on this machine)."""
    if model_id == TINY_MODEL_ID:
        return False
    folder = _local_folder(model_id)
    if folder is None:
        return True if model_id.endswith("-I2V") else None
    index = _read_json(folder / "model_index.json") or {}
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


def _local_folder(model_id: str) -> Path | None:
    """The folder a model id names on this machine: the shipped trained tiny model, or an
    existing local directory; None for hub ids."""
    if model_id == TRAINED_TINY_ID:
        from datagen.models.tiny_dit import SHIPPED_DIR

        return SHIPPED_DIR
    path = Path(model_id).expanduser()
    return path if path.is_dir() else None


# heads x head dim of the public checkpoints, for size estimates before loading.
_KNOWN_HEADS_DIM = {
    "THUDM/CogVideoX-2b": 30 * 64,
    "THUDM/CogVideoX-5b": 48 * 64,
    "THUDM/CogVideoX-5b-I2V": 48 * 64,
    "THUDM/CogVideoX1.5-5B": 48 * 64,
}


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class CogVideoXFamily:
    name = "cogvideox"

    def geometry(self, cfg: ModelConfig | None = None) -> Geometry:
        """Compressions, patches and attention width of ``cfg``'s model, read from the local
        folder's configs when there is one (the shipped trained tiny model works on pixels
        with patch 4), else the public CogVideoX layout."""
        model_id = cfg.model_id if cfg is not None else TINY_MODEL_ID
        if model_id == TINY_MODEL_ID:
            return Geometry(TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION, 2, 1, 2 * 16)
        folder = _local_folder(model_id)
        if folder is not None:
            t = _read_json(folder / "transformer" / "config.json")
            v = _read_json(folder / "vae" / "config.json")
            if t and v:
                return Geometry(
                    int(v.get("temporal_compression_ratio", TEMPORAL_COMPRESSION)),
                    2 ** (len(v.get("block_out_channels", [0] * 4)) - 1),
                    int(t.get("patch_size", 2)),
                    int(t.get("patch_size_t") or 1),
                    int(t.get("num_attention_heads", 30)) * int(t.get("attention_head_dim", 64)),
                )
        patch_t = 2 if "1.5" in model_id else 1
        heads_dim = _KNOWN_HEADS_DIM.get(model_id, 30 * 64)
        return Geometry(TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION, 2, patch_t, heads_dim)

    def check_prompts(self, prompts: list[Any], gen: GenerationConfig, model: ModelConfig) -> None:
        """An image-to-video checkpoint taking first frames from the prompts needs an image
        in every prompt (checked before the model loads when the checkpoint is local)."""
        if gen.first_frame != "prompt" or not is_image_to_video_checkpoint(model.model_id):
            return
        for p in prompts:
            if p.image is None:
                raise UserError(no_image_message(p.source, model.model_id))

    def check_generation(self, gen: GenerationConfig, model: ModelConfig | None = None) -> None:
        geo = self.geometry(model)
        check_video_size(
            gen,
            "CogVideoX",
            temporal=geo.temporal,
            spatial=geo.spatial,
            patch=geo.patch,
            frame_examples="9, 17, 49" if geo.temporal == 4 else "8, 16",
        )

    def load_pipeline(self, cfg: ModelConfig) -> Any:
        """Text-to-video (``CogVideoXPipeline``) or image-to-video
        (``CogVideoXImageToVideoPipeline``), whichever the checkpoint's ``model_index.json``
        names; any other pipeline class is refused."""
        from diffusers import CogVideoXPipeline, DiffusionPipeline

        # The shipped trained tiny model's folder names this module for its pixel-space VAE;
        # diffusers loads only from modules already imported.
        import datagen.models.pixel_vae  # noqa: F401

        dtype = getattr(torch, cfg.dtype)
        device = resolve_device(cfg.device)
        if cfg.model_id == TINY_MODEL_ID:
            from datagen.models.tiny_cogvideox import save_tiny_pipeline

            # Through a folder and from_pretrained, so the tiny model takes the same loading
            # path as a real checkpoint.
            with tempfile.TemporaryDirectory(prefix="datagen-tiny-") as tmp:
                folder = save_tiny_pipeline(Path(tmp) / "pipe")
                pipe = CogVideoXPipeline.from_pretrained(str(folder), dtype=dtype)
        else:
            folder = _local_folder(cfg.model_id)
            source = str(folder) if folder is not None else cfg.model_id
            with offline_hint(cfg.model_id, "/path/to/CogVideoX"):
                pipe = DiffusionPipeline.from_pretrained(source, revision=cfg.revision, dtype=dtype)
            if type(pipe).__name__ not in PIPELINE_CLASSES:
                raise UserError(
                    f"model '{cfg.model_id}' is a {type(pipe).__name__}; model.family=cogvideox "
                    f"takes {' or '.join(PIPELINE_CLASSES)} (set model.family to match the model)"
                )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        tcfg = pipe.transformer.config
        patch = int(tcfg.patch_size)
        patch_t = int(tcfg.patch_size_t or 1)
        vae_s = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        vae_t = int(pipe.vae.config.temporal_compression_ratio)
        latent_frames = (gen.num_frames - 1) // vae_t + 1
        # CogVideoX 1.5 prepends padding latent frames up to a multiple of patch_size_t.
        pad = (-latent_frames) % patch_t
        return TokenLayout(
            family=self.name,
            num_frames=gen.num_frames,
            height=gen.height,
            width=gen.width,
            vae_compression=(vae_t, vae_s, vae_s),
            patch_size=(patch_t, patch, patch),
            text_tokens=int(gen.max_sequence_length),
            text_position="first",
            pad_front=pad,
            rope=bool(tcfg.use_rotary_positional_embeddings),
        )

    def install_capture(self, pipe: Any, recorder: Recorder, guidance: bool) -> Callable[[], None]:
        """Put capture processors on the recorder's layers and count denoising steps.

        CogVideoX runs both CFG branches in one batched forward per step, negative first, so
        the conditional rows are the second half. Returns a function that undoes it all.
        """
        transformer = pipe.transformer
        restore = self.install_processors(pipe, recorder)
        calls = {"n": 0}

        def before_forward(module, args, kwargs):
            if calls["n"] == 0:
                recorder.resolve_steps([int(t) for t in pipe.scheduler.timesteps])
            batch = kwargs["hidden_states"].shape[0]
            cond = slice(batch // 2, batch) if guidance else slice(0, batch)
            timestep = kwargs["timestep"]
            recorder.begin_forward(calls["n"], int(timestep.reshape(-1)[0]), cond)
            calls["n"] += 1

        handle = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)

        def remove() -> None:
            handle.remove()
            restore()

        return remove

    def install_processors(self, pipe: Any, recorder: Recorder) -> Callable[[], None]:
        """Capture processors on the recorder's layers (no step counting); returns the undo."""
        blocks = pipe.transformer.transformer_blocks
        bad = [i for i in recorder.spec.layers if not 0 <= i < len(blocks)]
        if bad:
            raise UserError(
                f"capture layers {bad} do not exist: the transformer has {len(blocks)} layers "
                f"(0..{len(blocks) - 1}); fix capture.*_layers"
            )
        originals = {}
        for i in recorder.spec.layers:
            originals[i] = blocks[i].attn1.processor
            blocks[i].attn1.set_processor(CogVideoXCaptureProcessor(recorder, i))

        def restore() -> None:
            for i, proc in originals.items():
                blocks[i].attn1.set_processor(proc)

        return restore

    def encode_video(self, pipe: Any, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> the latents the transformer denoises, (B, F', C, h, w):
        the VAE posterior mode times the VAE scaling factor."""
        vae = pipe.vae
        x = torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 4, 1, 2, 3)
        x = (x.float() / 127.5 - 1.0).to(device=vae.device, dtype=vae.dtype)
        with torch.inference_mode():
            z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        return z.permute(0, 2, 1, 3, 4).contiguous()

    def encode_text(self, pipe: Any, prompts: list[str], gen: GenerationConfig) -> torch.Tensor:
        with torch.inference_mode():
            emb, _ = pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=gen.max_sequence_length,
                device=pipe.transformer.device,
            )
        return emb

    def denoiser_forward(
        self,
        pipe: Any,
        latents: torch.Tensor,
        text_emb: torch.Tensor,
        timestep: int,
        clean: torch.Tensor | None = None,
    ) -> None:
        """One transformer forward at ``timestep`` (its output is not needed: the capture
        processors take what they record on the way). An image-to-video model also gets the
        first frame of ``clean`` (the un-noised latents) as its image latents."""
        transformer = pipe.transformer
        rope = None
        if transformer.config.use_rotary_positional_embeddings:
            s = pipe.vae_scale_factor_spatial
            rope = pipe._prepare_rotary_positional_embeddings(
                latents.shape[3] * s, latents.shape[4] * s, latents.shape[1], latents.device
            )
        if is_image_to_video(pipe):
            if clean is None:
                raise ValueError("an image-to-video model's forward needs the clean latents")
            latents = torch.cat([latents, first_frame_latents(clean).to(latents.dtype)], dim=2)
        t = torch.full((latents.shape[0],), int(timestep), device=latents.device)
        with torch.inference_mode():
            transformer(
                hidden_states=latents.to(transformer.dtype),
                encoder_hidden_states=text_emb.to(transformer.dtype),
                timestep=t,
                image_rotary_emb=rope,
                return_dict=False,
            )

    def takes_first_frame(self, pipe: Any) -> bool:
        return is_image_to_video(pipe)

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        gen: GenerationConfig,
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Text-to-video, or image-to-video from ``images`` (one uint8 (H, W, 3) first frame
        per prompt, at the generation size) when the pipeline is CogVideoX-I2V."""
        if not is_image_to_video(pipe):
            if images is not None:
                raise ValueError("first frames given to a text-to-video CogVideoX pipeline")
            return generate_frames(pipe, prompts, seeds, gen, negative_prompt=negative_prompts)
        if images is None or len(images) != len(prompts):
            raise ValueError("an image-to-video CogVideoX pipeline needs one first frame a prompt")
        image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return generate_frames(
            pipe, prompts, seeds, gen, negative_prompt=negative_prompts, image=image
        )


class CogVideoXCaptureProcessor:
    """CogVideoX joint attention that also hands its q/k to a recorder.

    The computation is the one diffusers' CogVideoXAttnProcessor2_0 performs, in the same
    order, so the output is bit-identical; every argument is named because diffusers passes
    only the keyword arguments a processor's signature names (``image_rotary_emb`` would
    silently be lost behind ``**kwargs``).
    """

    def __init__(self, recorder: Recorder, layer: int):
        self.recorder = recorder
        self.layer = layer

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

    def __init__(self, token_grid: tuple[int, int, int]):
        self.token_grid = token_grid
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
    collector = _QKCollector(grid)
    blocks = transformer.transformer_blocks
    layers = list(range(len(blocks))) if layers is None else layers
    originals = {i: blocks[i].attn1.processor for i in layers}
    try:
        for i in layers:
            blocks[i].attn1.set_processor(CogVideoXCaptureProcessor(collector, i))
        with torch.inference_mode():
            transformer(
                hidden_states=latents,
                encoder_hidden_states=text_emb,
                timestep=timestep,
                return_dict=False,
            )
    finally:
        for i, proc in originals.items():
            blocks[i].attn1.set_processor(proc)
    return collector.qk
