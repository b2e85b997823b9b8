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
and the pipeline runs ONE forward per step. True CFG (``true_cfg_scale > 1`` with a negative
prompt) runs two separate forwards per step, the conditional one first, each inside
``transformer.cache_context("cond"/"uncond")``; capture reads that label (see
:func:`install_capture_on_transformer`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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
PATCH = 2
TINY_HUNYUAN_MODEL_ID = "datagen/tiny-random-hunyuanvideo"
"""``model.model_id`` that builds the tiny random-weight pipeline locally (offline runs)."""
WEIGHT_SEED = 20250618


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


class HunyuanCaptureProcessor:
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

    # Attention backend settings diffusers' ``set_attention_backend`` puts on processors;
    # install copies the replaced processor's values so the same kernel runs.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, recorder: Recorder, layer: int):
        self.recorder = recorder
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # Single-stream: join [video, text] so one set of projections handles both.
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections; tensors are (B, S, heads, d) from here on.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # 2. QK normalization
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. RoPE on the video tokens only (in single-stream blocks the text tail is skipped)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [
                        apply_rotary_emb(
                            query[:, : -encoder_hidden_states.shape[1]],
                            image_rotary_emb,
                            sequence_dim=1,
                        ),
                        query[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(
                            key[:, : -encoder_hidden_states.shape[1]],
                            image_rotary_emb,
                            sequence_dim=1,
                        ),
                        key[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Dual-stream: the text's own projections and norms, appended AFTER the video.
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # Capture: q/k/v are now exactly what the attention below consumes.
        if self.recorder.wants(self.layer):
            text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            self._record(query, key, value, text_len, attention_mask)

        # 5. Attention
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
        hidden_states = hidden_states.to(query.dtype)

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
# Installing capture


def install_capture_on_transformer(
    transformer: Any,
    recorder: Recorder,
    schedule: Sequence[int] | Callable[[], Sequence[int]],
) -> Callable[[], None]:
    """Put capture processors on the recorder's layers of a bare transformer and keep the
    recorder's step, timestep and conditional rows current; return a function undoing it.

    ``schedule``: the scheduler's timesteps, or a function returning them, read at the first
    forward (a pipeline sets its timesteps only just before the denoising loop) and handed to
    ``recorder.resolve_steps``.

    Steps: each transformer forward starts a new step unless it is the second pass of a true-CFG
    step. ``HunyuanVideoPipeline`` wraps each forward in ``transformer.cache_context(name)``
    with name ``"cond"`` (first) or ``"uncond"`` (only with true CFG); this wraps
    ``cache_context`` to read the name. A forward labelled ``"uncond"`` records nothing
    (``cond=None``); any other forward is conditional in all its rows (each pass holds one
    branch, never a CFG batch). A label already seen in the current step, or no label (a bare
    forward), starts the next step.

    Raises UserError for layers outside ``0 .. n_dual+n_single-1``.
    """
    layers = attention_layers(transformer)
    bad = [i for i in recorder.spec.layers if not 0 <= i < len(layers)]
    if bad:
        n_dual = len(transformer.transformer_blocks)
        raise UserError(
            f"capture layers {bad} do not exist: HunyuanVideo has {len(layers)} attention layers "
            f"(0..{n_dual - 1} dual-stream, {n_dual}..{len(layers) - 1} single-stream); fix "
            "capture.*_layers"
        )
    originals: dict[int, Any] = {}
    for i in recorder.spec.layers:
        attn = layers[i]
        originals[i] = attn.processor
        proc = HunyuanCaptureProcessor(recorder, i)
        proc._attention_backend = getattr(attn.processor, "_attention_backend", None)
        proc._parallel_config = getattr(attn.processor, "_parallel_config", None)
        attn.set_processor(proc)

    state: dict[str, Any] = {"step": -1, "seen": set(), "label": None}

    # Read the pipeline's pass label: wrap the bound method with an instance attribute, so
    # ``del`` restores the class's method.
    shadowed = transformer.__dict__.get("cache_context")
    original_context = transformer.cache_context

    @contextlib.contextmanager
    def labelled_context(name: str, **kwargs: Any) -> Iterator[None]:
        previous = state["label"]
        state["label"] = name
        try:
            with original_context(name, **kwargs):
                yield
        finally:
            state["label"] = previous

    transformer.cache_context = labelled_context

    def before_forward(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        label = state["label"]
        if state["step"] < 0:
            steps = schedule() if callable(schedule) else schedule
            recorder.resolve_steps([int(t) for t in steps])
        if state["step"] < 0 or label is None or label in state["seen"]:
            state["step"] += 1
            state["seen"] = set()
        state["seen"].add(label)
        cond = None if label == "uncond" else slice(0, hidden.shape[0])
        recorder.begin_forward(state["step"], int(timestep.reshape(-1)[0]), cond)

    handle = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)

    def remove() -> None:
        handle.remove()
        if shadowed is None:
            del transformer.cache_context
        else:
            transformer.cache_context = shadowed
        for i, proc in originals.items():
            layers[i].set_processor(proc)

    return remove


# --------------------------------------------------------------------------------------------
# The family


class HunyuanVideoFamily:
    """HunyuanVideo text-to-video (diffusers ``HunyuanVideoPipeline``)."""

    name = "hunyuanvideo"

    def check_generation(self, gen: GenerationConfig) -> None:
        check_video_size(
            gen,
            "HunyuanVideo",
            temporal=TEMPORAL_COMPRESSION,
            spatial=SPATIAL_COMPRESSION,
            patch=PATCH,
            frame_examples="9, 33, 129",
        )

    def load_pipeline(self, cfg: ModelConfig) -> Any:
        from diffusers import HunyuanVideoPipeline

        dtype = getattr(torch, cfg.dtype)
        device = resolve_device(cfg.device)
        if cfg.model_id == TINY_MODEL_ID:
            raise UserError(
                f"model.model_id '{TINY_MODEL_ID}' is a CogVideoX model; for model.family="
                f"hunyuanvideo pass --set model.model_id=/path/to/HunyuanVideo (or "
                f"{TINY_HUNYUAN_MODEL_ID} for the tiny random-weight model)"
            )
        if cfg.model_id == TINY_HUNYUAN_MODEL_ID:
            # Through a folder and from_pretrained, so the tiny model takes the same loading
            # path as a real checkpoint.
            with tempfile.TemporaryDirectory(prefix="datagen-tiny-") as tmp:
                folder = Path(tmp) / "pipe"
                build_tiny_hunyuan_pipeline().save_pretrained(str(folder))
                pipe = HunyuanVideoPipeline.from_pretrained(str(folder), dtype=dtype)
        else:
            hint = "/path/to/HunyuanVideo (e.g. hunyuanvideo-community/HunyuanVideo)"
            with offline_hint(cfg.model_id, hint):
                pipe = HunyuanVideoPipeline.from_pretrained(
                    cfg.model_id, revision=cfg.revision, dtype=dtype
                )
            # Decoding 129x720x1280 in one piece needs far more memory than the DiT; tiled
            # decoding is what the model card uses. (It changes pixels slightly, deterministically.)
            pipe.vae.enable_tiling()
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

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
        return TokenLayout(
            family=self.name,
            num_frames=gen.num_frames,
            height=gen.height,
            width=gen.width,
            vae_compression=(vae_t, vae_s, vae_s),
            patch_size=(patch_t, patch, patch),
            # The pipeline crops the prompt template and pads to exactly this many tokens.
            text_tokens=int(gen.max_sequence_length),
            text_position="last",
            rope=True,
        )

    def install_capture(self, pipe: Any, recorder: Recorder, guidance: bool) -> Callable[[], None]:
        """Put capture processors on the recorder's layers and count denoising steps.

        ``guidance`` is accepted for the protocol but not used: callers derive it from
        ``guidance_scale > 1``, which for HunyuanVideo is the distilled, embedded guidance
        (still one forward per step). Which forward is the conditional one comes from the
        pipeline's own ``cache_context`` label instead (see
        :func:`install_capture_on_transformer`), so true CFG is handled too.
        """
        del guidance
        return install_capture_on_transformer(
            pipe.transformer, recorder, lambda: [int(t) for t in pipe.scheduler.timesteps]
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
        """Generate videos: uint8 ``(B, T, H, W, 3)`` RGB.

        ``gen.guidance_scale`` is the embedded (distilled) guidance. Negative prompts only
        matter with true CFG, which runs when ``gen`` has a ``true_cfg_scale`` above 1 (two
        forwards per step, conditional first).
        """
        true_cfg = float(getattr(gen, "true_cfg_scale", 1.0) or 1.0)
        cfg_kwargs: dict[str, Any] = {}
        if true_cfg > 1:
            cfg_kwargs = {"negative_prompt": negative_prompts, "true_cfg_scale": true_cfg}
        return generate_frames(pipe, prompts, seeds, gen, **cfg_kwargs)


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
