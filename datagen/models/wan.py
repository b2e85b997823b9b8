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

from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import Recorder
from datagen.config import TINY_WAN_ID, GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.layout import TokenLayout
from datagen.models.base import (
    CaptureProcessor,
    Geometry,
    ModelFamily,
    component_config,
    from_built,
    offline_hint,
    vae_posterior_mode,
)

PATCH_SIZE = (1, 2, 2)
TINY_WAN_MODEL_ID = TINY_WAN_ID
"""``model.model_id`` that builds the tiny random-weight Wan pipeline locally (offline runs)."""
WEIGHT_SEED = 20250619

KNOWN_GEOMETRY = {
    TINY_WAN_MODEL_ID: Geometry(4, 8, 2, 1, 2 * 16, 2),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": Geometry(4, 8, 2, 1, 12 * 128, 30),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": Geometry(4, 8, 2, 1, 40 * 128, 40),
}
"""Geometry of the public Wan 2.1 text-to-video checkpoints (their transformer and VAE
configs), for size estimates and checks before the weights are on this machine."""


class WanFamily(ModelFamily):
    """Wan 2.1 text-to-video through diffusers' ``WanPipeline``."""

    name = "wan"
    title = "Wan"
    size_hint = ", e.g. 480x832"
    folder_example = "/path/to/Wan2.1-T2V-Diffusers"
    builtin_ids = (TINY_WAN_MODEL_ID,)

    def geometry(self, model: ModelConfig) -> Geometry:
        """From the checkpoint's configs when they are on this machine, else from
        :data:`KNOWN_GEOMETRY` (else Wan2.1-T2V-1.3B's, with the layer count unknown)."""
        if model.model_id in KNOWN_GEOMETRY:
            return KNOWN_GEOMETRY[model.model_id]
        t = component_config(model, "transformer")
        v = component_config(model, "vae")
        if t and v:
            patch = t.get("patch_size", PATCH_SIZE)
            return Geometry(
                int(v.get("scale_factor_temporal", 4)),
                int(v.get("scale_factor_spatial", 8)),
                int(patch[1]),
                int(patch[0]),
                int(t.get("num_attention_heads", 12)) * int(t.get("attention_head_dim", 128)),
                int(t.get("num_layers", 30)),
            )
        return Geometry(4, 8, 2, 1, 12 * 128, None)

    def load(self, cfg: ModelConfig, dtype: torch.dtype) -> Any:
        """``WanPipeline`` from a hub id or a local diffusers folder (or the tiny random-weight
        one, :data:`TINY_WAN_MODEL_ID`).

        The VAE is loaded in float32 whatever ``model.dtype`` says, as the Wan model cards do:
        the pipeline casts latents to the VAE's dtype before decoding, and the Wan VAE in half
        precision visibly degrades the decoded video.
        """
        from diffusers import AutoencoderKLWan, WanPipeline

        def load(source: str, revision: str | None) -> Any:
            with offline_hint(cfg.model_id, self.folder_example):
                vae = AutoencoderKLWan.from_pretrained(
                    source, subfolder="vae", revision=revision, dtype=torch.float32
                )
                return WanPipeline.from_pretrained(source, vae=vae, revision=revision, dtype=dtype)

        if cfg.model_id == TINY_WAN_MODEL_ID:
            pipe = from_built(build_tiny_wan_pipeline, load, revision=None)
        else:
            pipe = load(cfg.model_id, cfg.revision)
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps"):
            raise UserError(
                f"model '{cfg.model_id}' is a Wan 2.2 checkpoint (two experts or per-token "
                "timesteps); model.family=wan supports Wan 2.1 text-to-video only"
            )
        return pipe

    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        """Token layout of one video; reads the compression the pipeline itself uses.

        ``pipe`` needs ``vae_scale_factor_temporal``, ``vae_scale_factor_spatial`` (set by
        ``WanPipeline.__init__`` from the VAE config) and ``transformer.config.patch_size``.
        """
        patch = tuple(int(p) for p in pipe.transformer.config.patch_size)
        vae_t = int(pipe.vae_scale_factor_temporal)
        vae_s = int(pipe.vae_scale_factor_spatial)
        return self.token_layout(
            gen,
            (vae_t, vae_s),
            patch,  # type: ignore[arg-type]
            0,
            "cross-attention",
            pad_front=0,
            rope=True,
        )

    def attention_layers(self, transformer: Any) -> list[Any]:
        """``blocks[i].attn1``, the video self-attention of each block."""
        return [block.attn1 for block in transformer.blocks]

    def check_layer(self, layer: int, attn: Any) -> None:
        if attn.is_cross_attention or attn.add_k_proj is not None:
            # Not the case in any Wan 2.1 checkpoint (I2V adds its image k/v to attn2 only);
            # refuse rather than capture something that is not plain self-attention.
            raise UserError(
                f"layer {layer}: attn1 is not plain self-attention in this checkpoint; "
                "model.family=wan cannot capture it"
            )

    def blocks(self, transformer: Any) -> list[Any]:
        """``blocks[i]``; each returns the video tokens alone."""
        return list(transformer.blocks)

    def capture_processor(self, recorder: Recorder, layer: int, replaced: Any) -> Any:
        return WanCaptureProcessor(recorder, layer, like=replaced)

    def install_capture(self, pipe: Any, recorder: Recorder, guidance: bool) -> Any:
        """Capture on ``pipe.transformer``. WanPipeline runs CFG as two forwards a step,
        labelled "cond" (first) and "uncond"; only the conditional one is recorded."""
        if getattr(pipe, "transformer_2", None) is not None:
            raise UserError("Wan 2.2 two-expert pipelines are not supported by model.family=wan")
        return super().install_capture(pipe, recorder, guidance)

    def encode_video(self, pipe: Any, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> (B, C, F', h, w), normalised by the VAE's per-channel
        ``latents_mean``/``latents_std`` (what WanPipeline undoes before decoding)."""
        vae = pipe.vae
        z = vae_posterior_mode(vae, frames).float()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=z.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=z.device).view(shape)
        return ((z - mean) / std).to(pipe.transformer.dtype)


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


class WanCaptureProcessor(CaptureProcessor):
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

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
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

        hidden_states = self.attend(query, key, value, attention_mask)

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


def build_tiny_wan_pipeline() -> Any:
    """A ``WanPipeline`` with tiny random weights: :func:`build_tiny_wan_transformer`, a
    UMT5 text encoder of 8 dims over the tiny CogVideoX tokenizer's vocabulary, a 4-channel
    Wan VAE (8x space, 4x time) and the UniPC flow-matching scheduler of the Wan 2.1
    checkpoints. Offline and seeded (global RNG restored)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from datagen.models.tiny_cogvideox import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    transformer = build_tiny_wan_transformer(WEIGHT_SEED)
    channels = TINY_CONFIG["in_channels"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED + 1)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=TINY_CONFIG["text_dim"],
                d_kv=4,
                d_ff=16,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
            )
        )
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=channels,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            latents_mean=[0.0] * channels,
            latents_std=[1.0] * channels,
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        transformer=transformer,
    )
