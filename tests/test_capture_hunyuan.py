"""HunyuanVideo capture: exact attention recompute with the text key mask (dual- and
single-stream layers), capture leaves outputs bit-identical, token layout through the model's
own patch embedding and joint sequence, step accounting (distilled guidance and true CFG),
size checks.

Everything runs on tiny random-weight models built from configs (no download)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.config import TINY_MODEL_ID, GenerationConfig, ModelConfig
from datagen.errors import UserError
from datagen.models.hunyuanvideo import (
    HunyuanVideoFamily,
    attention_layers,
    build_tiny_hunyuan_pipeline,
    build_tiny_hunyuan_transformer,
)

# Latent of the bare-transformer tests: 3 latent frames of 8x12 -> token grid (3, 4, 6).
LATENT = (3, 8, 12)
GRID = (3, 4, 6)
TEXT_LEN = 8


class KeepAll(Recorder):
    """Keeps copies of everything the processor hands over, per (layer, step)."""

    def record(self, layer, q_video, k_video, k_text, **extra):
        got = {"q_video": q_video, "k_video": k_video, "k_text": k_text, **extra}
        self.kept[(layer, self.step)] = {
            k: None if v is None else v.detach().clone() for k, v in got.items()
        }


MODEL = ModelConfig(family="hunyuanvideo", model_id="hunyuanvideo-community/HunyuanVideo")


def _keep_all(layers, steps, batch, grid=GRID):
    rec = KeepAll(CaptureSpec(tuple(layers), tuple(steps), (), ()), batch=batch, token_grid=grid)
    rec.kept = {}
    return rec


def _inputs(transformer, text_mask: torch.Tensor, seed: int = 0) -> dict:
    """Keyword inputs of one transformer forward; batch = rows of ``text_mask`` (B, L)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    b = text_mask.shape[0]
    return dict(
        hidden_states=torch.randn(b, cfg.in_channels, *LATENT, generator=g),
        timestep=torch.full((b,), 700.0),
        encoder_hidden_states=torch.randn(b, text_mask.shape[1], cfg.text_embed_dim, generator=g),
        encoder_attention_mask=text_mask,
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
        guidance=torch.full((b,), 6000.0),
        return_dict=False,
    )


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _recompute(attn, got: dict, use_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention module's (video, text) outputs from captured q/k/v, in float64.

    Softmax per head over the joint keys [video, text] with masked text keys at -inf (when
    ``use_mask``), then the output projections the processor applies: ``to_out`` on the video
    part and ``to_add_out`` on the text part in dual-stream layers, none in single-stream ones.
    """
    b, heads, f, hw, d = got["q_video"].shape
    n_video = f * hw

    def joint(kind: str) -> torch.Tensor:
        video = got[f"{kind}_video"].reshape(b, heads, n_video, d)
        return torch.cat([video, got[f"{kind}_text"]], dim=2).double()

    q, k, v = joint("q"), joint("k"), joint("v")
    logits = q @ k.transpose(-1, -2) / d**0.5
    if use_mask:
        keep = torch.cat([torch.ones(b, n_video, dtype=torch.bool), got["text_mask"]], dim=1)
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    mixed = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(b, -1, heads * d)
    video, text = mixed[:, :n_video], mixed[:, n_video:]
    if attn.to_out is not None:
        video = video @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
    if attn.to_add_out is not None:
        text = text @ attn.to_add_out.weight.double().T + attn.to_add_out.bias.double()
    return video, text


def _project(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
    """Joint [video, text] q, k, v (B, heads, S, d) computed from an attention's inputs:
    projections, per-head RMS norms, RoPE (diffusers' apply_rotary_emb) on video only."""
    from diffusers.models.embeddings import apply_rotary_emb

    dual = attn.add_q_proj is not None
    out = {}
    for kind in ("q", "k", "v"):
        proj = getattr(attn, f"to_{kind}")
        if dual:
            video = proj(hidden_states).unflatten(2, (attn.heads, -1))
            text = getattr(attn, f"add_{kind}_proj")(encoder_hidden_states)
            text = text.unflatten(2, (attn.heads, -1))
        else:
            joint = proj(torch.cat([hidden_states, encoder_hidden_states], dim=1))
            joint = joint.unflatten(2, (attn.heads, -1))
            video, text = joint[:, : hidden_states.shape[1]], joint[:, hidden_states.shape[1] :]
        if kind != "v":
            video = getattr(attn, f"norm_{kind}")(video)
            video = apply_rotary_emb(video, image_rotary_emb, sequence_dim=1)
            text = getattr(attn, f"norm_added_{kind}" if dual else f"norm_{kind}")(text)
        out[kind] = torch.cat([video, text], dim=1).transpose(1, 2)
    return out


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_hunyuan_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _gen(**kw) -> GenerationConfig:
    base = dict(num_frames=9, height=32, width=48, num_inference_steps=3, max_sequence_length=16)
    base.update(kw)
    return GenerationConfig(**base)


PROMPTS = ["a dog runs", "a red car turns left across the bridge"]


# 1. Exact recompute with the text key mask --------------------------------------------------

MASKS = {
    # Right padding, a different amount per prompt (what the pipeline produces).
    "right-padded": ([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5], None),
    # A hole inside the text: diffusers rebuilds the key mask from the COUNT of real tokens
    # (right padding assumed), so the attention uses the first 3 keys; text_mask must say so.
    "hole (count-based)": (
        [[1, 0, 1, 1, 0, 0, 0, 0], [1] * 6 + [0] * 2],
        [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 6 + [0] * 2],
    ),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_recomputed_masked_attention_matches_layer_output(case):
    rows, expect_rows = MASKS[case]
    transformer = build_tiny_hunyuan_transformer()
    layers = attention_layers(transformer)
    assert [layers[0].add_q_proj is not None, layers[1].add_q_proj is not None] == [True, False]
    rec = _keep_all((0, 1), (0,), batch=2)
    outputs, inputs = {}, {}

    def hook(layer):
        def fn(module, args, kwargs, out):
            inputs[layer] = kwargs
            outputs[layer] = tuple(t.detach().clone() for t in out)

        return fn

    handles = [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in (0, 1)]
    remove = HunyuanVideoFamily().capture_transformer(transformer, rec, [700], guidance=False)
    try:
        with torch.no_grad():
            transformer(**_inputs(transformer, _mask(rows)))
    finally:
        remove()
        for h in handles:
            h.remove()
    assert sorted(rec.kept) == [(0, 0), (1, 0)]
    expected_mask = torch.tensor(expect_rows or rows, dtype=torch.bool)
    f, h, w = GRID
    for layer in (0, 1):
        got = rec.kept[(layer, 0)]
        attn = layers[layer]
        assert got["q_video"].shape == (2, attn.heads, f, h * w, 16)
        assert got["k_text"].shape == got["q_text"].shape == (2, attn.heads, TEXT_LEN, 16)
        assert torch.equal(got["text_mask"], expected_mask), layer
        # q/k/v from the module's inputs: video token n of the capture is token n of the
        # model's video sequence, with the RoPE of its position; text after, without RoPE.
        for kind, tensor in _project(attn, **inputs[layer]).items():
            video = got[f"{kind}_video"].reshape(2, attn.heads, f * h * w, 16)
            assert torch.allclose(video, tensor[:, :, : f * h * w], atol=1e-6), (layer, kind)
            assert torch.allclose(got[f"{kind}_text"], tensor[:, :, f * h * w :], atol=1e-6)
        video_out, text_out = outputs[layer]
        video, text = _recompute(attn, got, use_mask=True)
        assert (video - video_out.double()).abs().max() <= 1e-5, layer
        assert (text - text_out.double()).abs().max() <= 1e-5, layer
        # Without the mask the result is clearly different: the mask is needed, and passed.
        video_nm, text_nm = _recompute(attn, got, use_mask=False)
        assert (video_nm - video_out.double()).abs().max() > 1e-3, layer
        assert (text_nm - text_out.double()).abs().max() > 1e-3, layer


# 2. Capture never changes the output --------------------------------------------------------


def test_capture_leaves_transformer_output_bit_identical_and_remove_restores():
    transformer = build_tiny_hunyuan_transformer(num_layers=2, num_single_layers=2)
    inputs = _inputs(transformer, _mask([[1] * 6 + [0] * 2, [1] * 2 + [0] * 6]))
    before = {id(a): a.processor for a in attention_layers(transformer)}
    with torch.no_grad():
        plain = transformer(**inputs)[0]
        rec = _keep_all((0, 1, 2, 3), (0,), batch=2)
        remove = HunyuanVideoFamily().capture_transformer(transformer, rec, [700], guidance=False)
        try:
            captured = transformer(**inputs)[0]
        finally:
            remove()
        again = transformer(**inputs)[0]
    assert len(rec.kept) == 4
    assert torch.equal(plain, captured) and torch.equal(plain, again)
    assert {id(a): a.processor for a in attention_layers(transformer)} == before
    assert "cache_context" not in transformer.__dict__


def test_capture_leaves_the_video_bit_identical(pipe):
    fam = HunyuanVideoFamily()
    gen = _gen()
    layout = fam.layout(pipe, gen)
    plain = fam.generate(pipe, PROMPTS, ["", ""], [1, 2], gen)
    spec = CaptureSpec((0, 1), (0, 2), (0, 1), (1, 2))
    rec = Recorder(
        spec, batch=2, query_tokens=torch.tensor([0, 3, 5]), token_grid=layout.token_grid
    )
    remove = fam.install_capture(pipe, rec, guidance=True)
    try:
        captured = fam.generate(pipe, PROMPTS, ["", ""], [1, 2], gen)
    finally:
        remove()
    assert plain.shape == (2, 9, 32, 48, 3) and plain.dtype == np.uint8
    assert np.array_equal(plain, captured)
    assert len(rec.features[0]) == 8 and len(rec.correspondence[1]) == 4
    procs = {type(a.processor).__name__ for a in attention_layers(pipe.transformer)}
    assert procs == {"HunyuanVideoAttnProcessor2_0"}, "remove() must restore the processors"


# 3. Layout proof through the model's own patch embedding and joint sequence -----------------


def test_layout_predicts_token_index_through_patch_embedding_and_joint_sequence(pipe):
    # No dual-stream block, so the first single-stream block sees the patch embedding's
    # output unchanged and shows how the forward joins video and text.
    transformer = build_tiny_hunyuan_transformer(num_layers=0)
    lf, lh, lw = LATENT
    gen = _gen(num_frames=4 * (lf - 1) + 1, height=8 * lh, width=8 * lw)
    layout = HunyuanVideoFamily().layout(
        SimpleNamespace(transformer=transformer, vae=pipe.vae), gen
    )
    assert layout.latent_shape == LATENT and layout.token_grid == GRID
    pt, ph, pw = layout.patch_size
    # Latent channels 0, 1, 2 hold their own frame, row and column; the patch embedding's
    # output channels 0..2 average input channels 0..2 over the patch.
    inputs = _inputs(transformer, _mask([[1] * 5 + [0] * 3]))
    latent = inputs["hidden_states"]
    f_idx, y_idx, x_idx = torch.meshgrid(
        torch.arange(lf), torch.arange(lh), torch.arange(lw), indexing="ij"
    )
    latent[0, 0], latent[0, 1], latent[0, 2] = f_idx, y_idx, x_idx
    joint = {}

    def grab(module, args):
        joint["seq"] = args[0].detach().clone()  # the block's torch.cat([video, text])

    block = transformer.single_transformer_blocks[0]
    handles = [
        block.norm.register_forward_pre_hook(grab),
        block.register_forward_pre_hook(
            lambda m, args: joint.update(video=args[0].clone(), text=args[1].clone())
        ),
    ]
    with torch.no_grad():
        proj = transformer.x_embedder.proj
        proj.weight.zero_()
        proj.bias.zero_()
        for c in range(3):
            proj.weight[c, c] = 1.0 / (pt * ph * pw)
        embedded = transformer.x_embedder(latent)  # the forward's own flatten: (B, F*h*w, D)
        try:
            transformer(**inputs)
        finally:
            for hd in handles:
                hd.remove()
    n_video = layout.num_video_tokens
    seq = joint["seq"]
    assert seq.shape[1] == n_video + TEXT_LEN
    assert torch.equal(seq[:, :n_video], embedded) and torch.equal(joint["video"], embedded)
    assert torch.equal(seq[:, n_video:], joint["text"])  # text LAST
    tf, th, tw = layout.token_grid
    for j in range(tf):
        for r in range(th):
            for c in range(tw):
                assert layout.sequence_index(j, r, c) == layout.video_token_index(j, r, c)
                expect = torch.tensor(
                    [pt * j + (pt - 1) / 2, ph * r + (ph - 1) / 2, pw * c + (pw - 1) / 2]
                )
                for tokens in (embedded, seq):
                    token = tokens[0, layout.sequence_index(j, r, c), :3]
                    assert torch.allclose(token, expect, atol=1e-5), (j, r, c)
    assert layout.video_frames_of_token_frame(0) == [0]
    assert layout.video_frames_of_token_frame(1) == [1, 2, 3, 4]


# 4. Step accounting --------------------------------------------------------------------------


def _run_counting(pipe, rec, call):
    """Run ``call()`` with capture installed; return the latent shapes of each forward."""
    shapes = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["hidden_states"].shape)), with_kwargs=True
    )
    remove = HunyuanVideoFamily().install_capture(pipe, rec, guidance=True)
    try:
        call()
    finally:
        remove()
        handle.remove()
    return shapes


def test_one_forward_per_step_and_only_asked_pairs_are_recorded(pipe):
    fam = HunyuanVideoFamily()
    gen = _gen()
    layout = fam.layout(pipe, gen)
    rec = _keep_all((1,), (1,), batch=2, grid=layout.token_grid)
    shapes = _run_counting(pipe, rec, lambda: fam.generate(pipe, PROMPTS, ["", ""], [1, 2], gen))
    # guidance_scale=6 is embedded (distilled): one forward per step, despite guidance=True.
    assert len(shapes) == gen.num_inference_steps
    assert shapes[0] == (2, pipe.transformer.config.in_channels, *layout.latent_shape)
    schedule = [int(t) for t in pipe.scheduler.timesteps]
    assert rec.step_timesteps == dict(enumerate(schedule))
    assert list(rec.kept) == [(1, 1)]  # layer 0 and steps 0, 2 were not asked for
    got = rec.kept[(1, 1)]
    f, h, w = layout.token_grid
    assert got["q_video"].shape[0] == 2 and got["q_video"].shape[2:4] == (f, h * w)
    assert got["k_text"].shape[2] == layout.text_tokens
    # Different prompt lengths: different numbers of real text keys, padding at the end.
    n_real = got["text_mask"].sum(1)
    assert n_real[0] < n_real[1] < layout.text_tokens
    for b in range(2):
        assert got["text_mask"][b, : n_real[b]].all()


def test_true_cfg_records_the_conditional_pass_only(pipe):
    """The plugin offers no true CFG, but the shared step clock must still record only the
    "cond" pass when the pipeline runs one (diffusers' ``true_cfg_scale``, called directly)."""
    fam = HunyuanVideoFamily()
    gen = _gen(num_inference_steps=2)
    grid = fam.layout(pipe, gen).token_grid
    plain = _keep_all((0, 1), (0,), batch=2, grid=grid)
    _run_counting(pipe, plain, lambda: fam.generate(pipe, PROMPTS, ["", ""], [1, 2], gen))
    rec = _keep_all((0, 1), (0, 1), batch=2, grid=grid)

    def true_cfg():
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        with torch.inference_mode():
            pipe(
                prompt=PROMPTS,
                negative_prompt=["blurry", "ugly"],
                true_cfg_scale=3.0,
                height=gen.height,
                width=gen.width,
                num_frames=gen.num_frames,
                num_inference_steps=gen.num_inference_steps,
                guidance_scale=gen.guidance_scale,
                generator=generators,
                output_type="np",
                max_sequence_length=gen.max_sequence_length,
            )

    shapes = _run_counting(pipe, rec, true_cfg)
    assert len(shapes) == 2 * gen.num_inference_steps
    assert sorted(rec.kept) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(rec.step_timesteps) == [0, 1]
    # Step 0 starts from the same noise: the conditional pass equals the plain run's forward;
    # a recorded unconditional pass (other text, other pooled embedding) would not.
    for layer in (0, 1):
        for name, t in plain.kept[(layer, 0)].items():
            assert torch.equal(rec.kept[(layer, 0)][name], t), (layer, name)


def test_negative_prompts_are_refused_before_loading():
    from datagen.prompts import Prompt

    fam = HunyuanVideoFamily()
    fam.check_prompts([Prompt(id="a", prompt="a dog", source="p.txt:1")], _gen(), MODEL)
    with pytest.raises(UserError, match=r"p.txt:2: a negative prompt.*distilled"):
        fam.check_prompts(
            [Prompt(id="b", prompt="a cat", negative_prompt="blurry", source="p.txt:2")],
            _gen(),
            MODEL,
        )
    with pytest.raises(UserError, match=r"generation.negative_prompt is set"):
        fam.check_prompts([], _gen(negative_prompt="blurry"), MODEL)


# 5. Size checks, layout of the released model, errors --------------------------------------


def test_check_generation_rejects_bad_sizes():
    fam = HunyuanVideoFamily()
    fam.check_generation(_gen(num_frames=129, height=720, width=1280), MODEL)
    for bad, match in (
        (dict(num_frames=10), "num_frames=10.*4k\\+1"),
        (dict(num_frames=128), "num_frames=128"),
        (dict(height=40), "height=40.*multiple of 16"),
        (dict(width=1272), "width=1272.*multiple of 16"),
    ):
        with pytest.raises(UserError, match=match):
            fam.check_generation(_gen(**bad), MODEL)


def test_layout_of_the_released_size():
    # A stand-in pipe with only the config attributes layout() reads; the values are those
    # of hunyuanvideo-community/HunyuanVideo (transformer and vae config.json).
    stub = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=1)),
        vae=SimpleNamespace(
            config=SimpleNamespace(temporal_compression_ratio=4, spatial_compression_ratio=8)
        ),
    )
    gen = _gen(num_frames=129, height=720, width=1280, max_sequence_length=256)
    layout = HunyuanVideoFamily().layout(stub, gen)
    assert layout.latent_shape == (33, 90, 160)
    assert layout.token_grid == (33, 45, 80)
    assert layout.text_position == "last" and layout.text_tokens == 256 and layout.rope
    assert layout.sequence_index(1, 0, 0) == 45 * 80  # no text offset: text comes last
    assert layout.video_frames_of_token_frame(32) == [125, 126, 127, 128]


def test_missing_layer_and_unloadable_model_are_user_errors(pipe, monkeypatch):
    fam = HunyuanVideoFamily()
    rec = Recorder(CaptureSpec((2,), (0,), (), ()), batch=1)
    with pytest.raises(UserError, match=r"capture layers \[2\] do not exist.*0\.\.0 dual"):
        fam.install_capture(pipe, rec, False)
    assert {type(a.processor).__name__ for a in attention_layers(pipe.transformer)} == {
        "HunyuanVideoAttnProcessor2_0"
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model_id in ("/nonexistent/HunyuanVideo", TINY_MODEL_ID):
        cfg = ModelConfig(family="hunyuanvideo", model_id=model_id, device="cpu")
        with pytest.raises(UserError, match=r"--set model\.model_id=/path"):
            fam.load_pipeline(cfg)


def test_hidden_states_are_the_video_tokens_of_dual_and_single_stream_blocks():
    """``capture.hidden_layers`` numbers blocks like the attention layers (dual-stream first,
    then single-stream); each keeps its block's output video tokens (the text, which comes
    last in the joint sequence, is left out), fp16 (token frames, h*w, width)."""
    transformer = build_tiny_hunyuan_transformer(num_layers=2, num_single_layers=2)
    inputs = _inputs(transformer, _mask([[1] * 6 + [0] * 2, [1] * 2 + [0] * 6]))
    seen = {}

    def keep(name):
        def fn(module, args, out):
            video, text = out
            seen[name] = (video.detach().clone(), text.detach().clone())

        return fn

    handles = [
        transformer.transformer_blocks[1].register_forward_hook(keep("dual1")),
        transformer.single_transformer_blocks[0].register_forward_hook(keep("single0")),
    ]
    rec = Recorder(CaptureSpec((), (0,), (), (), hidden_layers=(1, 2)), batch=2, token_grid=GRID)
    with torch.no_grad():
        plain = transformer(**inputs)[0]
        remove = HunyuanVideoFamily().capture_transformer(transformer, rec, [700], guidance=False)
        try:
            captured = transformer(**inputs)[0]
        finally:
            remove()
            for h in handles:
                h.remove()
    assert torch.equal(plain, captured)
    assert all(not b._forward_hooks for b in HunyuanVideoFamily().blocks(transformer))
    f, h, w = GRID
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for b in range(2):
        assert sorted(rec.features[b]) == ["h.layer001.step000", "h.layer002.step000"]
        for layer, name in ((1, "dual1"), (2, "single0")):
            video, text = seen[name]
            assert video.shape == (2, f * h * w, width) and text.shape[1] == TEXT_LEN
            got = rec.features[b][f"h.layer{layer:03d}.step000"]
            assert got.dtype == torch.float16
            assert torch.equal(got, video[b].reshape(f, h * w, width).half())
