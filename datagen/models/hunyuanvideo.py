"""HunyuanVideo (tencent/HunyuanVideo, diffusers ``HunyuanVideoPipeline``) as a model-family plugin.

Architecture, as diffusers' ``HunyuanVideoTransformer3DModel`` runs it:

- ``transformer_blocks`` (20 in the released model): dual-stream blocks; video and text have
  their own projections (``to_q``/``add_q_proj`` ...) but share one joint softmax.
- ``single_transformer_blocks`` (40): single-stream blocks; the block splits its joint
  ``[video, text]`` sequence and the attention processor concatenates it again, projecting both
  with the same ``to_q``/``to_k``/``to_v``; there is no output projection inside the attention
  (the block's ``proj_out`` mixes attention and MLP outputs).
- In every joint attention the text comes LAST: sequence = ``[video tokens, text tokens]``.
- Padded text keys are MASKED: the transformer turns the prompt mask into a bool key mask
  ``(B, 1, 1, N)`` (True = attend). It rebuilds that mask from the COUNT of real text tokens
  (``encoder_attention_mask.sum``), so it assumes right padding; video keys are never masked.
- RoPE (3D, axes time/rows/columns) is applied to the video queries and keys only.
- The VAE compresses 4x in time (causal: latent frame 0 = video frame 0, latent frame f >= 1 =
  video frames 4f-3 .. 4f) and 8x in space; the transformer patches (1, 2, 2). 129x720x1280
  video frames give 33x45x80 tokens. Video tokens are frame-major: sequence index
  ``f * (h * w) + y * w + x`` (no offset, the text follows).

Layer numbering (``capture.*_layers``): one global index over all joint attentions in the order
the forward runs them: dual-stream blocks first, ``0 .. n_dual-1`` (``transformer_blocks[i]``),
then single-stream blocks, ``n_dual .. n_dual+n_single-1`` (``single_transformer_blocks[i -
n_dual]``). For the released model: 0..19 dual, 20..59 single.

Guidance: the released model is guidance-DISTILLED; ``guidance_scale`` is an input embedding,
and the pipeline runs ONE forward per step, inside ``transformer.cache_context("cond")``. This
plugin does not offer diffusers' optional true CFG (``true_cfg_scale`` with negative prompts,
a second "uncond" forward per step); the shared step clock
(:meth:`datagen.models.base.ModelFamily.capture_transformer`) would still record only the
"cond" pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datagen.capture.recorder import Recorder
from datagen.config import TINY_HUNYUAN_ID, GenerationConfig, ModelConfig
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

TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
PATCH = 2
TINY_HUNYUAN_MODEL_ID = TINY_HUNYUAN_ID
"""``model.model_id`` that builds the tiny random-weight pipeline locally (offline runs)."""
WEIGHT_SEED = 20250618

KNOWN_GEOMETRY = {
    TINY_HUNYUAN_MODEL_ID: Geometry(4, 8, 2, 1, 2 * 16, 2),
    "hunyuanvideo-community/HunyuanVideo": Geometry(4, 8, 2, 1, 24 * 128, 60),
}
"""Geometry of the public checkpoint (20 dual- and 40 single-stream blocks, 24 heads x 128),
for size estimates and checks before the weights are on this machine."""


# --------------------------------------------------------------------------------------------
# Layer numbering


def attention_layers(transformer: Any) -> list[Any]:
    """The joint attention modules in global layer order: dual-stream, then single-stream.

    ``attention_layers(t)[i]`` is ``t.transformer_blocks[i].attn`` for ``i < n_dual`` and
    ``t.single_transformer_blocks[i - n_dual].attn`` after.
    """
    return [b.attn for b in transformer.transformer_blocks] + [
        b.attn for b in transformer.single_transformer_blocks
    ]


# --------------------------------------------------------------------------------------------
# The capture processor


def _key_mask(
    attention_mask: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """The attention's key mask as bool ``(B, seq_len)``, True = the key takes part.

    HunyuanVideo hands the processor a bool ``(B, 1, 1, N)`` mask (one row shared by all heads
    and queries); a ``(B, N)`` mask is what the native backend would also accept. Anything else
    (per-query masks, additive float masks) cannot be summarised per key, so it is refused
    rather than recorded wrongly.
    """
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    m = attention_mask
    if m.ndim == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    if m.ndim != 2 or m.shape[-1] != seq_len or m.dtype != torch.bool:
        raise ValueError(
            f"HunyuanCaptureProcessor: cannot read a per-key mask from attention_mask of shape "
            f"{tuple(attention_mask.shape)} and dtype {attention_mask.dtype}"
        )
    return m.expand(batch, seq_len)


def _project(
    attn: Any, x: torch.Tensor, projections: tuple[str, str, str], norms: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``x`` through ``attn``'s three named projections, split into heads
    (B, S, heads, d), q and k through ``attn.<norms>q`` / ``<norms>k`` when present: the ops of
    diffusers' processor, in its order."""
    q, k, v = (getattr(attn, name)(x).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = getattr(attn, norms + "q"), getattr(attn, norms + "k")
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class HunyuanCaptureProcessor(CaptureProcessor):
    """HunyuanVideo joint attention that also hands its q/k/v to a recorder.

    The computation is the one diffusers' ``HunyuanVideoAttnProcessor2_0`` performs (diffusers
    0.42), the same ops in the same order, so the output is bit-identical; it serves both block
    kinds (dual-stream: ``attn.add_q_proj`` projects the text; single-stream: the text goes
    through ``to_q``/``to_k``/``to_v`` with the video). Every argument is named because
    diffusers passes only the keyword arguments a processor's signature names
    (``image_rotary_emb`` would silently be lost behind ``**kwargs``).

    When ``recorder.wants(layer)``, it calls, for the rows ``recorder.cond`` only::

        recorder.record(layer, q_video, k_video, k_text,
                        q_text=..., v_video=..., v_text=..., text_mask=...)

    with q/k after the q/k RMS norm and RoPE (exactly what the softmax sees), heads first:
    ``q_video, k_video, v_video``: ``(B, heads, F, h*w, d)`` (``recorder.token_grid`` =
    ``(F, h, w)``, tokens frame-major); ``q_text, k_text, v_text``: ``(B, heads, L, d)``, ALL
    ``L`` text tokens including padding; ``text_mask``: bool ``(B, L)``, True = a real text key
    the attention uses. Padded text keys are excluded from the softmax by the model: a
    consumer must drop (or set to -inf the logits of) keys where ``text_mask`` is False to
    reproduce the attention. The softmax scale is the default ``1/sqrt(d)``.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Single-stream: join [video, text] so one set of projections handles both.
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1-2. QKV projections and QK normalisation; (B, S, heads, d) from here on.
        query, key, value = _project(attn, hidden_states, ("to_q", "to_k", "to_v"), "norm_")

        # 3. RoPE on the video tokens only (in single-stream blocks the text tail is skipped)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            n_text = 0
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                n_text = encoder_hidden_states.shape[1]

            def rope(t: torch.Tensor) -> torch.Tensor:
                if not n_text:
                    return apply_rotary_emb(t, image_rotary_emb, sequence_dim=1)
                video = apply_rotary_emb(t[:, :-n_text], image_rotary_emb, sequence_dim=1)
                return torch.cat([video, t[:, -n_text:]], dim=1)

            query, key = rope(query), rope(key)

        # 4. Dual-stream: the text's own projections and norms, appended AFTER the video.
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            text = _project(
                attn,
                encoder_hidden_states,
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                "norm_added_",
            )
            query = torch.cat([query, text[0]], dim=1)
            key = torch.cat([key, text[1]], dim=1)
            value = torch.cat([value, text[2]], dim=1)

        # Capture: q/k/v are now exactly what the attention below consumes.
        if self.recorder.wants(self.layer):
            text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            self._record(query, key, value, text_len, attention_mask)

        # 5. Attention
        hidden_states = self.attend(query, key, value, attention_mask)

        # 6. Output projection (dual-stream only; single-stream attention has neither)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states

    def _record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        text_len: int,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """Split the joint ``(B, S, heads, d)`` q/k/v into video and text and record them."""
        rec = self.recorder
        c = rec.cond
        batch, seq_len, heads, d = query.shape
        n_video = seq_len - text_len
        f, h, w = rec.token_grid
        if n_video != f * h * w:
            raise RuntimeError(
                f"layer {self.layer}: {n_video} video tokens, but the recorder's token grid "
                f"{rec.token_grid} has {f * h * w}; the layout does not match the generation"
            )
        keys_on = _key_mask(attention_mask, batch, seq_len, query.device)
        if not bool(keys_on[:, :n_video].all()):
            # The layout promises every video key takes part; diffusers never masks one.
            raise RuntimeError(f"layer {self.layer}: the attention mask masks video keys")
        q, k, v = (t[c].transpose(1, 2) for t in (query, key, value))  # (B, heads, S, d)
        shape = (q.shape[0], heads, f, h * w, d)
        has_text = text_len > 0
        rec.record(
            self.layer,
            q[:, :, :n_video].reshape(shape),
            k[:, :, :n_video].reshape(shape),
            k[:, :, n_video:] if has_text else None,
            q_text=q[:, :, n_video:] if has_text else None,
            v_video=v[:, :, :n_video].reshape(shape),
            v_text=v[:, :, n_video:] if has_text else None,
            text_mask=keys_on[c, n_video:].clone() if has_text else None,
        )


# --------------------------------------------------------------------------------------------
# The family


class HunyuanVideoFamily(ModelFamily):
    """HunyuanVideo text-to-video (diffusers ``HunyuanVideoPipeline``).

    Guidance is the distilled, embedded kind (``guidance_scale``, one forward per step); true
    classifier-free guidance with negative prompts is not offered (the model card samples
    without it), so prompts with a negative prompt are refused rather than silently ignored.
    The step clock still reads the pipeline's "cond"/"uncond" pass labels, so a true-CFG
    forward would never be recorded as the conditional branch.
    """

    name = "hunyuanvideo"
    title = "HunyuanVideo"
    folder_example = "/path/to/HunyuanVideo (e.g. hunyuanvideo-community/HunyuanVideo)"
    builtin_ids = (TINY_HUNYUAN_MODEL_ID,)

    def geometry(self, model: ModelConfig) -> Geometry:
        """From the checkpoint's configs when they are on this machine, else from
        :data:`KNOWN_GEOMETRY` (else the public checkpoint's, with the layer count unknown)."""
        if model.model_id in KNOWN_GEOMETRY:
            return KNOWN_GEOMETRY[model.model_id]
        t = component_config(model, "transformer")
        v = component_config(model, "vae")
        if t and v:
            return Geometry(
                int(v.get("temporal_compression_ratio", TEMPORAL_COMPRESSION)),
                int(v.get("spatial_compression_ratio", SPATIAL_COMPRESSION)),
                int(t.get("patch_size", PATCH)),
                int(t.get("patch_size_t") or 1),
                int(t.get("num_attention_heads", 24)) * int(t.get("attention_head_dim", 128)),
                int(t.get("num_layers", 20)) + int(t.get("num_single_layers", 40)),
            )
        return Geometry(TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION, PATCH, 1, 24 * 128, None)

    def check_prompts(self, prompts: list[Any], gen: GenerationConfig, model: ModelConfig) -> None:
        """Refuse negative prompts: guidance is distilled, nothing would use them."""
        if gen.negative_prompt:
            raise UserError(
                "generation.negative_prompt is set, but HunyuanVideo's guidance is distilled and "
                "uses no negative prompt; --set generation.negative_prompt="
            )
        for p in prompts:
            if p.negative_prompt:
                raise UserError(
                    f"{p.source}: a negative prompt, but HunyuanVideo's guidance is distilled "
                    "and uses none; remove it from the prompt bank for this model"
                )

    def load(self, cfg: ModelConfig, dtype: torch.dtype) -> Any:
        from diffusers import HunyuanVideoPipeline

        if cfg.model_id == TINY_HUNYUAN_MODEL_ID:
            load = HunyuanVideoPipeline.from_pretrained
            return from_built(build_tiny_hunyuan_pipeline, load, dtype=dtype)
        with offline_hint(cfg.model_id, self.folder_example):
            pipe = HunyuanVideoPipeline.from_pretrained(
                cfg.model_id, revision=cfg.revision, dtype=dtype
            )
        # Decoding 129x720x1280 in one piece needs far more memory than the DiT; tiled
        # decoding is what the model card uses. (It changes pixels slightly, deterministically.)
        pipe.vae.enable_tiling()
        return pipe

    def layout(self, pipe: Any, gen: GenerationConfig) -> TokenLayout:
        """Token layout: text LAST, ``max_sequence_length`` text tokens (padding included).

        Reads ``pipe.transformer.config.patch_size``/``patch_size_t`` and
        ``pipe.vae.config.temporal_compression_ratio``/``spatial_compression_ratio``.
        """
        tcfg = pipe.transformer.config
        patch = int(tcfg.patch_size)
        patch_t = int(getattr(tcfg, "patch_size_t", 1) or 1)
        vae_t = int(pipe.vae.config.temporal_compression_ratio)
        vae_s = int(pipe.vae.config.spatial_compression_ratio)
        latent_frames = (gen.num_frames - 1) // vae_t + 1
        if latent_frames % patch_t:
            # The patch embedding would silently drop the trailing latent frames.
            raise UserError(
                f"generation.num_frames={gen.num_frames} gives {latent_frames} latent frames, "
                f"not a multiple of the transformer's temporal patch {patch_t}"
            )
        return self.token_layout(
            gen,
            (vae_t, vae_s),
            (patch_t, patch, patch),
            int(gen.max_sequence_length),  # the template cropped, padded to exactly this
            "last",
            rope=True,
        )

    def attention_layers(self, transformer: Any) -> list[Any]:
        """The joint attentions in global layer order: dual-stream, then single-stream."""
        return attention_layers(transformer)

    def layer_description(self, count: int, transformer: Any | None) -> str:
        if transformer is None:
            return f"HunyuanVideo has {count} attention layers (0..{count - 1})"
        n_dual = len(transformer.transformer_blocks)
        return (
            f"HunyuanVideo has {count} attention layers (0..{n_dual - 1} dual-stream, "
            f"{n_dual}..{count - 1} single-stream)"
        )

    def blocks(self, transformer: Any) -> list[Any]:
        """Dual-stream, then single-stream blocks; both return (video, text)."""
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def capture_processor(self, recorder: Recorder, layer: int, replaced: Any) -> Any:
        return HunyuanCaptureProcessor(recorder, layer, like=replaced)

    def pipeline_kwargs(
        self, pipe: Any, negs: list[str], gen: GenerationConfig, images: list[np.ndarray] | None
    ) -> dict[str, Any]:
        """Nothing beyond the common arguments: ``guidance_scale`` is the embedded guidance."""
        if images is not None:
            raise ValueError("first frames given to a text-to-video HunyuanVideo pipeline")
        return {}

    def inference_timesteps(self, pipe: Any, num_steps: int) -> list[float]:
        """HunyuanVideoPipeline's schedule: sigmas ``linspace(1, 0, n + 1)[:-1]``, shifted by
        the scheduler."""
        pipe.scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 0.0, num_steps + 1)[:-1]))
        return [float(t) for t in pipe.scheduler.timesteps]

    def encode_video(self, pipe: Any, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> (B, C, F', h, w): the posterior mode times the VAE
        scaling factor (what the pipeline divides by before decoding)."""
        z = vae_posterior_mode(pipe.vae, frames) * pipe.vae.config.scaling_factor
        return z.to(pipe.transformer.dtype)

    def encode_text(self, pipe: Any, prompts: list[str], gen: GenerationConfig) -> dict[str, Any]:
        """Llama embeddings and mask, CLIP pooled embedding, and the embedded guidance."""
        dtype = pipe.transformer.dtype
        with torch.inference_mode():
            emb, pooled, mask = pipe.encode_prompt(
                prompt=prompts,
                device=pipe.transformer.device,
                max_sequence_length=gen.max_sequence_length,
            )
        guidance = torch.full((len(prompts),), float(gen.guidance_scale) * 1000.0)
        return {
            "encoder_hidden_states": emb.to(dtype),
            "encoder_attention_mask": mask.to(dtype),
            "pooled_projections": pooled.to(dtype),
            "guidance": guidance.to(device=emb.device, dtype=dtype),
        }


# --------------------------------------------------------------------------------------------
# Tiny random-weight models (tests, offline smoke runs)


def build_tiny_hunyuan_transformer(**overrides: Any) -> Any:
    """A tiny random-weight ``HunyuanVideoTransformer3DModel``, built from its config.

    Default: 1 dual-stream + 1 single-stream block (global layers 0 and 1), 2 heads x 16 dims
    (RoPE axes 4 + 6 + 6 = 16), 4 latent channels, patch (1, 2, 2), text embeddings of 16
    dims, pooled text of 8. ``overrides`` replace config entries. Weights come from a fixed
    seed; the global torch RNG state is restored afterwards.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    config: dict[str, Any] = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=PATCH,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_theta=256.0,
        rope_axes_dim=(4, 6, 6),
    )
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        return HunyuanVideoTransformer3DModel(**config).eval()


def _tiny_tokenizer() -> Any:
    """A word-level tokenizer holding the words of the pipeline's prompt template.

    The pipeline drops the first ``crop_start`` = 95 tokens (the template's system part for the
    real Llama tokenizer); here the template is ~100 tokens, so the text the transformer sees
    keeps a few template words, then the prompt, then padding up to ``max_sequence_length``.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from datagen.models.tiny_cogvideox import _WORDS

    split = pre_tokenizers.Whitespace()
    template = DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", " ")
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for word in [w for w, _ in split.pre_tokenize_str(template)] + _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def build_tiny_hunyuan_pipeline(**transformer_overrides: Any) -> Any:
    """A ``HunyuanVideoPipeline`` with tiny random weights: Llama (16 dims) and CLIP (8 dims)
    text encoders, a 4-channel 8x/4x VAE, :func:`build_tiny_hunyuan_transformer`. Offline,
    seeded (global RNG restored); a 9x32x48 video with 3 steps takes about a second on CPU.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    transformer = build_tiny_hunyuan_transformer(**transformer_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED + 1)
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=transformer.config.text_embed_dim,
                intermediate_size=32,
                num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=1024,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=transformer.config.pooled_projection_dim,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                projection_dim=8,
                max_position_embeddings=77,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=transformer.config.in_channels,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            mid_block_add_attention=False,
            temporal_compression_ratio=TEMPORAL_COMPRESSION,
            spatial_compression_ratio=SPATIAL_COMPRESSION,
        )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer,
    )
