"""Wan 2.1 capture: exact q/k of the video self-attention (attn1), capture leaves the output
bit-identical, token layout through the model's own patch embedding and RoPE, and the CFG step
accounting (two forwards per step, conditional first) on a bare transformer and through the
real ``WanPipeline``.

Everything runs on a tiny random-weight transformer. Where a pipeline is needed it is a real
``WanPipeline`` built from that transformer, a tiny ``AutoencoderKLWan`` (default compression
config: 4x time, 8x space) and a flow-matching scheduler, with no tokenizer or text encoder:
text comes in as ``prompt_embeds`` (or a stubbed ``encode_prompt``).
"""

import contextlib

import numpy as np
import pytest
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.models.wan import (
    TINY_CONFIG,
    WanCaptureProcessor,
    WanFamily,
    build_tiny_wan_transformer,
)

# Latent (B, C, F, H, W) of 9 frames at 64x96 pixels: 3 x 8 x 12 -> 3 x 4 x 6 tokens.
GEN = GenerationConfig(num_frames=9, height=64, width=96, num_inference_steps=3)
LATENT_SHAPE = (2, TINY_CONFIG["in_channels"], 3, 8, 12)
GRID = (3, 4, 6)
TEXT_LEN = 5


class KeepAll(Recorder):
    """Keeps copies of everything the processor hands over, and logs every forward."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kept: dict[tuple[int, int], dict[str, torch.Tensor | None]] = {}
        self.forwards: list[tuple[int, int, slice | None]] = []
        self.records: list[tuple[int, int]] = []

    def begin_forward(self, step, timestep, cond):
        super().begin_forward(step, timestep, cond)
        self.forwards.append((step, int(timestep), cond))

    def record(self, layer, q_video, k_video, k_text, **extra):
        self.records.append((layer, self.step))
        got = {"q_video": q_video, "k_video": k_video, "k_text": k_text, **extra}
        self.kept[(layer, self.step)] = {
            k: None if v is None else v.detach().clone() for k, v in got.items()
        }


MODEL = ModelConfig(family="wan", model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(LATENT_SHAPE, generator=g).to(dtype)
    text = torch.randn(LATENT_SHAPE[0], TEXT_LEN, TINY_CONFIG["text_dim"], generator=g).to(dtype)
    return latent, text


def _forward(transformer, latent, text, t=999.0, **extra):
    timestep = torch.full((latent.shape[0],), t)
    with torch.no_grad():
        return transformer(
            hidden_states=latent,
            timestep=timestep,
            encoder_hidden_states=text,
            return_dict=False,
            **extra,
        )[0]


def _tiny_pipeline(transformer=None):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=TINY_CONFIG["in_channels"],
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            latents_mean=[0.0] * TINY_CONFIG["in_channels"],
            latents_std=[1.0] * TINY_CONFIG["in_channels"],
        )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer if transformer is not None else build_tiny_wan_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_recomputed_attention_matches_layer_output():
    transformer = build_tiny_wan_transformer()
    rec = KeepAll(CaptureSpec((0, 1), (0,), (), ()), batch=2, token_grid=GRID)
    remove = WanFamily().capture_transformer(transformer, rec, [999], guidance=True)
    outputs = {}

    def hook(layer):
        def fn(module, args, out):
            outputs[layer] = out.detach().clone()

        return fn

    handles = [transformer.blocks[i].attn1.register_forward_hook(hook(i)) for i in (0, 1)]
    latent, text = _inputs()
    try:
        _forward(transformer, latent, text)  # call 0 of step 0: the conditional pass
    finally:
        for h in handles:
            h.remove()
        remove()
    assert sorted(rec.kept) == [(0, 0), (1, 0)]
    f, h, w = GRID
    heads, d = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["attention_head_dim"]
    for layer in (0, 1):
        got = rec.kept[(layer, 0)]
        assert got["k_text"] is None, "text is cross-attention: no text keys in attn1's softmax"
        for name in ("q_video", "k_video", "v_video"):
            assert got[name].shape == (2, heads, f, h * w, d), name

        def flat(t):
            return t.reshape(2, heads, f * h * w, d).double()

        q, k, v = flat(got["q_video"]), flat(got["k_video"]), flat(got["v_video"])
        probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        mixed = (probs @ v).transpose(1, 2).reshape(2, f * h * w, heads * d)
        proj = transformer.blocks[layer].attn1.to_out[0]
        out = mixed @ proj.weight.double().T + proj.bias.double()
        # Only q/k after RMSNorm and RoPE reproduce the output (q/k taken before fail here).
        assert (out - outputs[layer].double()).abs().max() <= 1e-5, layer


@pytest.mark.parametrize("variant", ["float32", "bfloat16", "float32-fused-qkv", "float32-i2v"])
def test_capture_leaves_the_output_bit_identical(variant):
    dtype = getattr(torch, variant.split("-")[0])
    i2v = variant.endswith("i2v")
    # I2V: image embeddings enter through added k/v projections, which exist on attn2 only;
    # attn1 stays plain self-attention and is captured the same way.
    overrides = {"image_dim": 8, "added_kv_proj_dim": 32} if i2v else {}
    transformer = build_tiny_wan_transformer(**overrides).to(dtype)
    if variant.endswith("fused-qkv"):
        transformer.fuse_qkv_projections()
    latent, text = _inputs(dtype)
    extra = {}
    if i2v:
        for block in transformer.blocks:
            assert block.attn1.add_k_proj is None and block.attn2.add_k_proj is not None
        # The I2V processor takes the last 512 context tokens as text (hard-coded).
        text = text.repeat(1, 512 // TEXT_LEN + 1, 1)[:, :512]
        extra["encoder_hidden_states_image"] = torch.randn(2, 3, 8, dtype=dtype)
    plain = _forward(transformer, latent, text, **extra)
    originals = [b.attn1.processor for b in transformer.blocks]
    rec = Recorder(
        CaptureSpec((0, 1), (0,), (0, 1), (0,)),
        batch=2,
        query_tokens=torch.tensor([0, 5, 11]),
        token_grid=GRID,
    )
    remove = WanFamily().capture_transformer(transformer, rec, [999], guidance=True)
    assert all(isinstance(b.attn1.processor, WanCaptureProcessor) for b in transformer.blocks)
    assert not any(isinstance(b.attn2.processor, WanCaptureProcessor) for b in transformer.blocks)
    captured = _forward(transformer, latent, text, **extra)
    remove()
    assert torch.equal(plain, captured)
    assert len(rec.features[0]) == 4 and len(rec.correspondence[1]) == 2
    assert rec.features[0]["q.layer001.step000"].dtype == torch.float16
    assert [b.attn1.processor for b in transformer.blocks] == originals, "remove() restores"
    assert all(type(p).__name__ == "WanAttnProcessor" for p in originals)
    assert torch.equal(plain, _forward(transformer, latent, text, **extra))


def test_layout_predicts_token_index_through_patch_embedding_and_rope():
    transformer = build_tiny_wan_transformer()
    layout = WanFamily().layout(_tiny_pipeline(transformer), GEN)
    assert layout.token_grid == GRID and layout.latent_shape == LATENT_SHAPE[2:]
    _, channels, frames, lh, lw = LATENT_SHAPE
    pt, ph, pw = layout.patch_size
    # Latent channels 0, 1, 2 hold their own frame index, row and column.
    f_idx, y_idx, x_idx = torch.meshgrid(
        torch.arange(frames), torch.arange(lh), torch.arange(lw), indexing="ij"
    )
    latent = torch.zeros(1, channels, frames, lh, lw)
    latent[0, 0], latent[0, 1], latent[0, 2] = f_idx, y_idx, x_idx
    with torch.no_grad():
        conv = transformer.patch_embedding
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(3):
            conv.weight[c, c] = 1.0 / (pt * ph * pw)  # average channel c over the patch
    seen = {}

    def grab(module, args):
        # WanTransformerBlock(hidden_states, encoder_hidden_states, temb, rotary_emb): the
        # video tokens exactly as the model flattened them, and the RoPE it pairs with them.
        seen["tokens"], seen["rope"] = args[0].clone(), args[3]

    handle = transformer.blocks[0].register_forward_pre_hook(grab)
    try:
        _forward(transformer, latent, torch.zeros(1, TEXT_LEN, TINY_CONFIG["text_dim"]))
    finally:
        handle.remove()
    tokens, (cos, _) = seen["tokens"][0], seen["rope"]
    assert tokens.shape[0] == layout.num_video_tokens and cos.shape[1] == layout.num_video_tokens
    assert tokens[:, 3:].abs().max() == 0
    rope = transformer.rope
    t_dim, h_dim = rope.t_dim, rope.h_dim
    table = rope.freqs_cos
    hit = torch.zeros(layout.num_video_tokens, dtype=torch.bool)
    tf, th, tw = layout.token_grid
    for j in range(tf):
        for r in range(th):
            for c in range(tw):
                i = layout.video_token_index(j, r, c)
                hit[i] = True
                expect = [pt * j + (pt - 1) / 2, ph * r + (ph - 1) / 2, pw * c + (pw - 1) / 2]
                assert torch.allclose(tokens[i, :3], torch.tensor(expect), atol=1e-6), (j, r, c)
                # The model's own RoPE gives token i the position (j, r, c) too.
                want = torch.cat(
                    [table[j, :t_dim], table[r, t_dim : t_dim + h_dim], table[c, t_dim + h_dim :]]
                )
                assert torch.equal(cos[0, i, 0], want), (j, r, c)
    assert hit.all()
    assert layout.video_frames_of_token_frame(0) == [0]
    assert layout.video_frames_of_token_frame(1) == [1, 2, 3, 4]
    assert layout.sequence_index(1, 0, 0) == GRID[1] * GRID[2], "no text in the sequence"


@pytest.mark.parametrize("passes", [("cond", "uncond"), ("cond",), (None,)])
def test_step_accounting_records_only_the_conditional_pass(passes):
    """Passes labelled as WanPipeline labels them (``cache_context``): "cond" then "uncond"
    with CFG, "cond" alone without; an unlabelled forward is a step of its own."""
    transformer = build_tiny_wan_transformer()
    schedule = [999, 600, 200]
    rec = KeepAll(CaptureSpec((1,), (1,), (), ()), batch=2, token_grid=GRID)
    remove = WanFamily().capture_transformer(transformer, rec, schedule, guidance=True)
    latent, text = _inputs()
    try:
        for t in schedule:
            for label in passes:
                context = transformer.cache_context(label) if label else contextlib.nullcontext()
                with context:
                    _forward(transformer, latent, text, t=float(t))
    finally:
        remove()
    all_rows = slice(0, 2)
    expect = [
        (s, t, None if label == "uncond" else all_rows)
        for s, t in enumerate(schedule)
        for label in passes
    ]
    assert rec.forwards == expect
    assert rec.records == [(1, 1)], "only layer 1 at step 1, once, on the conditional call"
    assert rec.step_timesteps == {0: 999, 1: 600, 2: 200}
    assert "cache_context" not in transformer.__dict__, "remove() restores the method"


def test_pipeline_calls_the_conditional_pass_first():
    """Through the real WanPipeline loop: what is recorded at step 0 is the q of the forward
    with the positive prompt embeddings, not the negative ones."""
    pipe = _tiny_pipeline()
    latent, text = _inputs()
    negative = -text.flip(1)
    rec = KeepAll(CaptureSpec((1,), (0,), (), ()), batch=2, token_grid=GRID)
    remove = WanFamily().install_capture(pipe, rec, guidance=True)
    try:
        with torch.no_grad():
            pipe(
                prompt_embeds=text,
                negative_prompt_embeds=negative,
                latents=latent,
                height=GEN.height,
                width=GEN.width,
                num_frames=GEN.num_frames,
                num_inference_steps=2,
                guidance_scale=5.0,
                output_type="latent",
            )
    finally:
        remove()
    schedule = [int(t) for t in pipe.scheduler.timesteps]
    assert [f[:2] for f in rec.forwards] == [(0, schedule[0])] * 2 + [(1, schedule[1])] * 2
    assert rec.records == [(1, 0)]

    def reference(embeds):
        ref = KeepAll(CaptureSpec((1,), (0,), (), ()), batch=2, token_grid=GRID)
        undo = WanFamily().capture_transformer(pipe.transformer, ref, schedule, guidance=False)
        _forward(pipe.transformer, latent, embeds, t=float(pipe.scheduler.timesteps[0]))
        undo()
        return ref.kept[(1, 0)]["q_video"]

    got = rec.kept[(1, 0)]["q_video"]
    assert torch.equal(got, reference(text))
    assert not torch.allclose(got, reference(negative)), "layer 1 must depend on the text"


def test_generate_with_capture_gives_the_same_video():
    """The family's generate() end to end (text encoding stubbed: no tokenizer offline)."""
    pipe = _tiny_pipeline()

    def encode_prompt(prompt, negative_prompt=None, **kwargs):
        def embed(texts):
            rows = []
            for s in texts:
                g = torch.Generator().manual_seed(sum(map(ord, s)) + len(s))
                rows.append(torch.randn(TEXT_LEN, TINY_CONFIG["text_dim"], generator=g))
            return torch.stack(rows)

        return embed(prompt), embed(negative_prompt)

    pipe.encode_prompt = encode_prompt
    gen = GenerationConfig(
        num_frames=5, height=32, width=48, num_inference_steps=2, guidance_scale=5.0
    )
    fam = WanFamily()
    fam.check_generation(gen, MODEL)
    args = (pipe, ["a dog runs", "a car turns"], ["", "blurry"], [1, 2], gen)
    plain = fam.generate(*args)
    layout = fam.layout(pipe, gen)
    rec = Recorder(CaptureSpec((0, 1), (1,), (), ()), batch=2, token_grid=layout.token_grid)
    remove = fam.install_capture(pipe, rec, guidance=True)
    try:
        captured = fam.generate(*args)
    finally:
        remove()
    assert plain.dtype == np.uint8 and plain.shape == (2, 5, 32, 48, 3)
    assert (plain == captured).all()
    assert sorted(rec.features[1]) == [
        "k.layer000.step001",
        "k.layer001.step001",
        "q.layer000.step001",
        "q.layer001.step001",
    ]
    # 5 frames of 32x48: 2 x 4 x 6 latent -> 2 x 2 x 3 tokens; (heads, F, h*w, d) per video.
    assert layout.token_grid == (2, 2, 3)
    assert rec.features[0]["q.layer000.step001"].shape == (2, 2, 6, 16)


def test_check_generation_and_layout_of_the_real_size():
    fam = WanFamily()
    fam.check_generation(GenerationConfig(num_frames=81, height=480, width=832), MODEL)
    with pytest.raises(UserError, match=r"num_frames=80: Wan needs 4k\+1 frames"):
        fam.check_generation(GenerationConfig(num_frames=80, height=480, width=832), MODEL)
    with pytest.raises(UserError, match=r"height=472: Wan needs a multiple of 16"):
        fam.check_generation(GenerationConfig(num_frames=81, height=472, width=832), MODEL)
    with pytest.raises(UserError, match=r"width=840: Wan needs a multiple of 16"):
        fam.check_generation(GenerationConfig(num_frames=81, height=480, width=840), MODEL)
    # A real WanPipeline whose tiny VAE keeps the default (Wan 2.1) compression config.
    layout = fam.layout(_tiny_pipeline(), GenerationConfig(num_frames=81, height=480, width=832))
    assert layout.token_grid == (21, 30, 52)
    assert layout.latent_shape == (21, 60, 104)
    assert (layout.text_tokens, layout.text_position) == (0, "cross-attention")
    assert layout.token_pixel_size == (16, 16)
    assert layout.video_frames_of_token_frame(20) == [77, 78, 79, 80]


def test_capture_of_missing_layer_is_a_user_error():
    rec = Recorder(CaptureSpec((2,), (0,), (), ()), batch=1)
    with pytest.raises(UserError, match=r"capture layers \[2\] do not exist"):
        WanFamily().install_capture(_tiny_pipeline(), rec, True)


def test_tiny_transformer_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_wan_transformer(), build_tiny_wan_transformer()
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    c = build_tiny_wan_transformer(seed=1)
    assert not torch.equal(a.blocks[0].attn1.to_q.weight, c.blocks[0].attn1.to_q.weight)


def test_hidden_states_are_the_conditional_pass_block_outputs():
    """``capture.hidden_layers`` on Wan: the block output (video tokens only; text enters by
    cross-attention) of the "cond" pass of the feature step, fp16 (token frames, h*w, width);
    the "uncond" pass and other steps are not kept; the output is unchanged."""
    transformer = build_tiny_wan_transformer()
    schedule = [999, 600]
    latent, text = _inputs()
    _, negative = _inputs(seed=1)
    rec = Recorder(CaptureSpec((), (1,), (), (), hidden_layers=(0, 1)), batch=2, token_grid=GRID)
    seen: list[dict[int, torch.Tensor]] = []

    def keep(layer):
        def fn(module, args, out):
            seen[-1][layer] = out.detach().clone()

        return fn

    handles = [transformer.blocks[i].register_forward_hook(keep(i)) for i in (0, 1)]
    outputs = []
    remove = WanFamily().capture_transformer(transformer, rec, schedule, guidance=True)
    try:
        for t in schedule:
            for label, emb in (("cond", text), ("uncond", negative)):
                seen.append({})
                with transformer.cache_context(label):
                    outputs.append(_forward(transformer, latent, emb, t=float(t)))
    finally:
        remove()
        for h in handles:
            h.remove()
    assert all(not b._forward_hooks for b in transformer.blocks)
    f, h, w = GRID
    width = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]
    cond, uncond = seen[2], seen[3]  # step 1: "cond" then "uncond"
    for b in range(2):
        assert sorted(rec.features[b]) == ["h.layer000.step001", "h.layer001.step001"]
        for layer in (0, 1):
            got = rec.features[b][f"h.layer{layer:03d}.step001"]
            assert cond[layer].shape == (2, f * h * w, width)
            assert torch.equal(got, cond[layer][b].reshape(f, h * w, width).half())
            assert not torch.equal(got, uncond[layer][b].reshape(f, h * w, width).half())
            assert not torch.equal(got, seen[0][layer][b].reshape(f, h * w, width).half())
    assert torch.equal(outputs[2], _forward(transformer, latent, text, t=600.0))
