"""Wan 2.1 (text-to-video, 1.3B and 14B) as a model-family plugin.

Attention in each block ``blocks[i]``:
- ``attn1``: self-attention over the video tokens only (this is what we capture);
- ``attn2``: cross-attention from video tokens to the text (and, for I2V, image) tokens.
Text therefore never shares the self-attention softmax: the layout has ``text_tokens = 0`` and
``text_position = "cross-attention"``, and ``k_text`` handed to the recorder is None.

Token conventions: patch (1, 2, 2), so token frames are latent frames. The causal VAE
compresses 4x in time (latent frame 0 holds video frame 0 alone, latent frame f >= 1 holds
video frames 4f-3 .. 4f) and 8x in space; 81 frames of 480x832 give 21 x 30 x 52 tokens. The
transformer flattens the patch-embedded latent ``(B, C, F, h, w)`` with ``flatten(2)``, so
video tokens are frame-major: index = f * (h * w) + y * w + x.

Wan's attention processor (diffusers ``WanAttnProcessor``), self-attention path:
project q, k, v (B, S, heads*d) -> RMSNorm of q and k over ALL heads at once (one
``torch.nn.RMSNorm(heads*d)``, before the head split) -> unflatten to (B, S, heads, d) ->
RoPE (3-D: the head dim is split t/h/w, adjacent-pair rotation) on q and k -> attention in
(B, S, heads, d) layout through ``dispatch_attention_fn`` -> flatten -> ``to_out``.

Classifier-free guidance runs as TWO transformer forwards per denoising step, conditional
first and unconditional second (not one batched forward as in CogVideoX), so the capture
counts forward calls to know the step and whether the current call is the conditional one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import Recorder
from datagen.config import TINY_MODEL_ID, GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout
from datagen.models.base import (
    check_video_size,
    generate_frames,
    offline_hint,
    resolve_device,
)

TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
PATCH_SIZE = (1, 2, 2)


class WanFamily:
    """Wan 2.1 text-to-video through diffusers' ``WanPipeline``."""

    name = "wan"

    def check_generation(self, gen: GenerationConfig) -> None:
        """Refuse sizes WanPipeline would silently round (frames to 4k+1, sides down to a
        multiple of 16): the video would not have the size the config and layout record."""
        check_video_size(
            gen,
            "Wan",
            temporal=TEMPORAL_COMPRESSION,
            spatial=SPATIAL_COMPRESSION,
            patch=PATCH_SIZE[1],
            frame_examples="9, 33, 81",
            size_hint=", e.g. 480x832",
        )

    def load_pipeline(self, cfg: ModelConfig) -> Any:
        """Load ``WanPipeline`` from a hub id or a local diffusers folder.

        The VAE is loaded in float32 whatever ``model.dtype`` says, as the Wan model cards do:
        the pipeline casts latents to the VAE's dtype before decoding, and the Wan VAE in half
        precision visibly degrades the decoded video.
        """
        from diffusers import AutoencoderKLWan, WanPipeline

        if cfg.model_id == TINY_MODEL_ID:
            raise UserError(
                "model.family=wan has no built-in tiny model; pass a Wan 2.1 diffusers checkpoint "
                "with --set model.model_id=Wan-AI/Wan2.1-T2V-1.3B-Diffusers (or a local folder)"
            )
        dtype = getattr(torch, cfg.dtype)
        device = resolve_device(cfg.device)
        with offline_hint(cfg.model_id, "/path/to/Wan2.1-T2V-Diffusers"):
            vae = AutoencoderKLWan.from_pretrained(
                cfg.model_id, subfolder="vae", revision=cfg.revision, dtype=torch.float32
            )
            pipe = WanPipeline.from_pretrained(
                cfg.model_id, vae=vae, revision=cfg.revision, dtype=dtype
            )
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps"):
            raise UserError(
                f"model '{cfg.model_id}' is a Wan 2.2 checkpoint (two experts or per-token "
                "timesteps); model.family=wan supports Wan 2.1 text-to-video only"
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        """Token layout of one video; reads the compression the pipeline itself uses.

        ``pipe`` needs ``vae_scale_factor_temporal``, ``vae_scale_factor_spatial`` (set by
        ``WanPipeline.__init__`` from the VAE config) and ``transformer.config.patch_size``.
        """
        patch = tuple(int(p) for p in pipe.transformer.config.patch_size)
        vae_t = int(pipe.vae_scale_factor_temporal)
        vae_s = int(pipe.vae_scale_factor_spatial)
        return TokenLayout(
            family=self.name,
            num_frames=gen.num_frames,
            height=gen.height,
            width=gen.width,
            vae_compression=(vae_t, vae_s, vae_s),
            patch_size=patch,  # type: ignore[arg-type]
            text_tokens=0,
            text_position="cross-attention",
            pad_front=0,
            rope=True,
        )

    def install_capture(self, pipe: Any, recorder: Recorder, guidance: bool) -> Callable[[], None]:
        """Capture on ``pipe.transformer``; ``guidance`` must match the pipeline's own CFG switch
        (``guidance_scale > 1``), since it decides whether a step takes one forward or two."""
        if getattr(pipe, "transformer_2", None) is not None:
            raise UserError("Wan 2.2 two-expert pipelines are not supported by model.family=wan")
        return install_capture_on_transformer(
            pipe.transformer,
            recorder,
            cfg_passes=2 if guidance else 1,
            schedule_fn=lambda: [int(t) for t in pipe.scheduler.timesteps],
        )

    def check_prompts(self, prompts: list[Any], gen: GenerationConfig, model: ModelConfig) -> None:
        """Text-to-video only: nothing to check in the prompts."""

    def takes_first_frame(self, pipe: Any) -> bool:
        """Text-to-video only (image-to-video variants are not supported by this plugin)."""
        return False

    def generate(
        self,
        pipe: Any,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        gen: GenerationConfig,
        images: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Generate videos: uint8 (B, T, H, W, 3) RGB, one seeded CPU generator per video."""
        return generate_frames(pipe, prompts, seeds, gen, negative_prompt=negative_prompts)


def install_capture_on_transformer(
    transformer: Any,
    recorder: Recorder,
    cfg_passes: int,
    schedule_fn: Callable[[], Sequence[int]],
) -> Callable[[], None]:
    """Put capture processors on ``blocks[i].attn1`` for the recorder's layers and count steps.

    transformer: a ``WanTransformer3DModel``. cfg_passes: forwards per denoising step, 2 with
    classifier-free guidance (WanPipeline calls the conditional forward first, then the
    unconditional one), 1 without. schedule_fn: returns the scheduler's timesteps; it is called
    once, on the first forward (when the pipeline has set them), for
    ``recorder.resolve_steps``.

    Before every forward the recorder learns ``step = calls // cfg_passes``, the timestep, and
    ``cond``: all rows ``slice(0, B)`` on the first call of a step, None (record nothing) on the
    unconditional call. Returns a function that restores the processors and removes the hook.
    """
    if cfg_passes not in (1, 2):
        raise ValueError(f"cfg_passes must be 1 or 2, got {cfg_passes}")
    blocks = transformer.blocks
    bad = [i for i in recorder.spec.layers if not 0 <= i < len(blocks)]
    if bad:
        raise UserError(
            f"capture layers {bad} do not exist: the transformer has {len(blocks)} layers "
            f"(0..{len(blocks) - 1}); fix capture.*_layers"
        )
    for i in recorder.spec.layers:
        attn = blocks[i].attn1
        if attn.is_cross_attention or attn.add_k_proj is not None:
            # Not the case in any Wan 2.1 checkpoint (I2V adds its image k/v to attn2 only);
            # refuse rather than capture something that is not plain self-attention.
            raise UserError(
                f"layer {i}: attn1 is not plain self-attention in this checkpoint; "
                "model.family=wan cannot capture it"
            )
    originals: dict[int, Any] = {}
    for i in recorder.spec.layers:
        attn = blocks[i].attn1
        originals[i] = attn.processor
        attn.set_processor(WanCaptureProcessor(recorder, i, like=attn.processor))
    calls = {"n": 0}

    def before_forward(module: Any, args: tuple, kwargs: dict) -> None:
        n = calls["n"]
        if n == 0:
            recorder.resolve_steps([int(t) for t in schedule_fn()])
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        conditional = n % cfg_passes == 0
        cond = slice(0, hidden.shape[0]) if conditional else None
        recorder.begin_forward(n // cfg_passes, int(timestep.reshape(-1)[0]), cond)
        calls["n"] = n + 1

    handle = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)

    def remove() -> None:
        handle.remove()
        for i, proc in originals.items():
            blocks[i].attn1.set_processor(proc)

    return remove


def _apply_wan_rope(
    hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    """Wan's RoPE, op for op as the closure inside diffusers' ``WanAttnProcessor.__call__``.

    hidden_states: (B, S, heads, d); freqs: float32 (1, S, 1, d), each value repeated for the
    pair (2i, 2i+1). The products are computed in float32 (type promotion) and rounded to the
    input dtype when written into ``out``.
    """
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanCaptureProcessor:
    """Wan self-attention (``attn1``) that also hands its q/k/v to a recorder.

    Reproduces the self-attention path of diffusers' ``WanAttnProcessor`` in the same ops and
    order, so the output is bit-identical. Only plain self-attention: the cross-attention path
    and the I2V added image k/v (which live on ``attn2``) are refused. ``WanAttention.forward``
    passes ``(hidden_states, encoder_hidden_states, attention_mask, rotary_emb)`` positionally;
    every argument is still named so that no caller's keyword (``rotary_emb``) can vanish
    into ``**kwargs``.

    Recorded, for the rows ``recorder.cond``: q_video, k_video, v_video of shape
    (B, heads, F, h*w, d), q/k after RMSNorm and RoPE, exactly as the attention uses them,
    in the attention's dtype; ``k_text`` is None (text is cross-attention).
    """

    # diffusers' set_attention_backend / context-parallel setup write these on processors.
    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, recorder: Recorder, layer: int, like: Any = None):
        self.recorder = recorder
        self.layer = layer
        if like is not None:
            # Keep the attention backend the replaced processor was set to use.
            self._attention_backend = getattr(like, "_attention_backend", None)
            self._parallel_config = getattr(like, "_parallel_config", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise RuntimeError(
                "WanCaptureProcessor handles self-attention (attn1) only; it was called as "
                "cross-attention"
            )
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        # RMSNorm over all heads together (dim heads*d), before the head split.
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = _apply_wan_rope(query, *rotary_emb)
            key = _apply_wan_rope(key, *rotary_emb)

        rec = self.recorder
        if rec.wants(self.layer):
            f, h, w = rec.token_grid
            c = rec.cond
            seq, heads, dim = query.shape[1:]
            if seq != f * h * w:
                raise RuntimeError(
                    f"layer {self.layer}: {seq} video tokens, but the token grid {rec.token_grid} "
                    f"has {f * h * w}; the layout does not match the generation"
                )

            def video(t: torch.Tensor) -> torch.Tensor:
                # (B, S, heads, d) -> (B, heads, F, h*w, d); S is frame-major.
                t = t[c].transpose(1, 2)
                return t.reshape(t.shape[0], heads, f, h * w, dim)

            rec.record(self.layer, video(query), video(key), None, v_video=video(value))

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


TINY_CONFIG: dict[str, Any] = dict(
    patch_size=PATCH_SIZE,
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
"""A tiny Wan 2.1 T2V transformer: 2 layers, 2 heads x 16 dims (RoPE splits 16 = t 8 + h 4 +
w 4), 4 latent channels, 8-dim text."""


def build_tiny_wan_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A random-weight ``WanTransformer3DModel`` built from ``TINY_CONFIG`` (float32, eval).

    The weights depend only on ``seed``; the global torch RNG state is left as it was. The
    norm weights (all ones at init) are randomised too, so a capture that skipped the q/k
    RMSNorm scale or the cross-attention norm would show.
    """
    from diffusers import WanTransformer3DModel

    config = {**TINY_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.normal_(1.0, 0.3)
    return model.eval()
