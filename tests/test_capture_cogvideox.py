"""CogVideoX capture: exact q/k (1.0 without and with RoPE, 1.5 with temporal patching),
token layout through the model's own patch embedding, capture leaves the video unchanged."""

import numpy as np
import pytest
import torch

from datagen.capture.recorder import CaptureSpec, Recorder
from datagen.models.cogvideox import CogVideoXFamily
from datagen.models.tiny_cogvideox import build_tiny_pipeline
from datagen.presets import resolve_config

VARIANTS = {
    "1.0-2b (sin-cos, no RoPE)": {},
    "1.0-5b (RoPE)": {"use_rotary_positional_embeddings": True},
    "1.5 (RoPE, patch_t=2)": {"use_rotary_positional_embeddings": True, "patch_size_t": 2},
}


class KeepAll(Recorder):
    """Keeps copies of everything the processor hands over, per (layer, step)."""

    def record(self, layer, q_video, k_video, k_text, **extra):
        got = {"q_video": q_video, "k_video": k_video, "k_text": k_text, **extra}
        self.kept[(layer, self.step)] = {k: v.detach().clone() for k, v in got.items()}


def _gen(num_frames=9):
    cfg = resolve_config("tiny-random", None, [f"generation.num_frames={num_frames}"])
    return cfg.generation


def _setup(variant, num_frames=9):
    """A tiny pipeline of the variant, its generation settings and layout (progress bar off)."""
    pipe = build_tiny_pipeline(num_frames=num_frames, **VARIANTS[variant])
    pipe.set_progress_bar_config(disable=True)
    gen = _gen(num_frames)
    return pipe, gen, CogVideoXFamily().layout(pipe, gen)


def _run(pipe, gen, recorder=None, guidance=True):
    fam = CogVideoXFamily()
    remove = fam.install_capture(pipe, recorder, guidance) if recorder else None
    try:
        return fam.generate(pipe, ["a dog runs", "a car turns"], ["", "blurry"], [1, 2], gen)
    finally:
        if remove:
            remove()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recomputed_attention_matches_layer_output(variant):
    num_frames = 9
    pipe = build_tiny_pipeline(num_frames=num_frames, **VARIANTS[variant])
    pipe.set_progress_bar_config(disable=True)
    gen = _gen(num_frames)
    fam = CogVideoXFamily()
    layout = fam.layout(pipe, gen)
    spec = CaptureSpec((0, 1), (1, 3), (), ())
    rec = KeepAll(spec, batch=2, token_grid=layout.token_grid)
    rec.kept = {}
    outputs = {}

    def hook(layer):
        def fn(module, args, out):
            if rec.wants(layer):
                video, text = out
                outputs[(layer, rec.step)] = (video[rec.cond].clone(), text[rec.cond].clone())

        return fn

    blocks = pipe.transformer.transformer_blocks
    handles = [blocks[i].attn1.register_forward_hook(hook(i)) for i in (0, 1)]
    try:
        _run(pipe, gen, rec)
    finally:
        for h in handles:
            h.remove()
    assert sorted(rec.kept) == [(0, 1), (0, 3), (1, 1), (1, 3)] == sorted(outputs)
    f, h, w = layout.token_grid
    for (layer, step), got in rec.kept.items():
        attn = blocks[layer].attn1
        b, heads = got["q_video"].shape[:2]
        assert got["q_video"].shape == (b, heads, f, h * w, attn.inner_dim // heads)
        q, k, v = (
            torch.cat(
                [got[f"{n}_text"].double(), got[f"{n}_video"].reshape(b, heads, f * h * w, -1)],
                dim=2,
            ).double()
            for n in "qkv"
        )
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        mixed = (probs @ v).transpose(1, 2).reshape(b, -1, attn.inner_dim)
        proj = attn.to_out[0]
        out = mixed @ proj.weight.double().T + proj.bias.double()
        text_len = got["k_text"].shape[2]
        video_out, text_out = outputs[(layer, step)]
        assert (out[:, text_len:] - video_out.double()).abs().max() <= 1e-5
        assert (out[:, :text_len] - text_out.double()).abs().max() <= 1e-5
        # The conditional rows were copied: the kept tensors own their storage.
        assert got["q_video"].is_contiguous() or got["q_video"].untyped_storage().size() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_capture_leaves_the_video_bit_identical(variant):
    num_frames = 9
    pipe, gen, layout = _setup(variant, num_frames)
    plain = _run(pipe, gen)
    spec = CaptureSpec((0, 1), (0, 3), (0, 1), (1, 2, 3))
    rec = Recorder(
        spec, batch=2, query_tokens=torch.tensor([0, 3, 5]), token_grid=layout.token_grid
    )
    captured = _run(pipe, gen, rec)
    assert np.array_equal(plain, captured)
    assert len(rec.features[0]) == 8 and len(rec.correspondence[1]) == 6
    procs = {type(b.attn1.processor).__name__ for b in pipe.transformer.transformer_blocks}
    assert procs == {"CogVideoXAttnProcessor2_0"}, "remove() must restore the processors"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_predicts_token_index_through_patch_embedding(variant):
    num_frames = 9
    pipe = build_tiny_pipeline(num_frames=num_frames, **VARIANTS[variant])
    gen = _gen(num_frames)
    layout = CogVideoXFamily().layout(pipe, gen)
    embed = pipe.transformer.patch_embed
    lf, lh, lw = layout.latent_shape
    frames = lf + layout.pad_front
    channels = pipe.transformer.config.in_channels
    pt, ph, pw = layout.patch_size
    # Latent channels 0, 1, 2 hold their own padded frame index, row and column.
    f_idx, y_idx, x_idx = torch.meshgrid(
        torch.arange(frames), torch.arange(lh), torch.arange(lw), indexing="ij"
    )
    latent = torch.zeros(1, frames, channels, lh, lw)
    latent[0, :, 0], latent[0, :, 1], latent[0, :, 2] = f_idx, y_idx, x_idx
    with torch.no_grad():
        proj = embed.proj
        proj.weight.zero_()
        proj.bias.zero_()
        if isinstance(proj, torch.nn.Conv2d):
            for c in range(3):
                proj.weight[c, c] = 1.0 / (ph * pw)
        else:  # 1.5: a Linear over patches flattened as (channel, t, y, x)
            per = pt * ph * pw
            for c in range(3):
                proj.weight[c, c * per : (c + 1) * per] = 1.0 / per
        n_text = pipe.transformer.config.max_text_seq_length
        text = torch.zeros(1, n_text, pipe.transformer.config.text_embed_dim)
        zero = embed(text, torch.zeros_like(latent))
        seq = embed(text, latent) - zero  # removes bias-free positional embeddings
    tf, th, tw = layout.token_grid
    assert (
        seq.shape[1]
        == n_text + layout.num_video_tokens
        == layout.text_tokens + layout.num_video_tokens
    )
    for j in range(tf):
        for r in range(th):
            for c in range(tw):
                token = seq[0, layout.sequence_index(j, r, c), :3]
                expect = [pt * j + (pt - 1) / 2, ph * r + (ph - 1) / 2, pw * c + (pw - 1) / 2]
                assert torch.allclose(token, torch.tensor(expect), atol=1e-5), (j, r, c)
    # The frame rules: token frame 0 of 1.5 holds one padding frame and latent frame 0.
    if pt == 2:
        assert layout.pad_front == 1 and layout.latent_frames_of_token_frame(0) == [0]
        assert layout.video_frames_of_token_frame(1) == list(range(1, 9))
    else:
        assert layout.video_frames_of_token_frame(1) == [1, 2, 3, 4]


def test_steps_selected_by_timestep_take_the_nearest_step():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = _gen()
    layout = CogVideoXFamily().layout(pipe, gen)
    spec = CaptureSpec((1,), (260,), (), (), step_unit="timestep")
    rec = KeepAll(spec, batch=2, token_grid=layout.token_grid)
    rec.kept = {}
    _run(pipe, gen, rec)
    schedule = [int(t) for t in pipe.scheduler.timesteps]
    nearest = int(np.argmin(np.abs(np.array(schedule) - 260)))
    assert list(rec.kept) == [(1, nearest)]
    assert rec.step_timesteps[nearest] == schedule[nearest]


def test_capture_of_missing_layer_is_a_user_error():
    from datagen.errors import UserError

    pipe = build_tiny_pipeline()
    rec = Recorder(CaptureSpec((5,), (0,), (), ()), batch=1)
    with pytest.raises(UserError, match=r"capture layers \[5\] do not exist"):
        CogVideoXFamily().install_capture(pipe, rec, True)


@pytest.mark.parametrize("variant", ["1.0-2b (sin-cos, no RoPE)", "1.5 (RoPE, patch_t=2)"])
def test_hidden_states_are_the_blocks_output_video_tokens(variant):
    """``capture.hidden_layers``: each chosen block's output video tokens (no text) of the
    conditional CFG half (CogVideoX batches [negative, positive]), at the feature steps, as
    fp16 (token frames, h*w, width); the video stays bit-identical and the hooks go away."""
    num_frames = 9
    pipe, gen, layout = _setup(variant, num_frames)
    plain = _run(pipe, gen)
    # Independent of the recorder: count the transformer's forwards (one per step) ourselves.
    seen: dict[tuple[int, int], torch.Tensor] = {}
    calls = [-1]
    blocks = pipe.transformer.transformer_blocks

    def count(module, args, kwargs):
        calls[0] += 1

    def keep(layer):
        def fn(module, args, out):
            seen[(layer, calls[0])] = out[0].detach().clone()  # (video, text)

        return fn

    handles = [pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [blocks[i].register_forward_hook(keep(i)) for i in (0, 1)]
    spec = CaptureSpec((), (1, 3), (), (), hidden_layers=(1,))
    rec = Recorder(spec, batch=2, token_grid=layout.token_grid)
    try:
        captured = _run(pipe, gen, rec)
    finally:
        for h in handles:
            h.remove()
    assert np.array_equal(plain, captured)
    assert all(not b._forward_hooks for b in blocks), "remove() must take the hooks off"
    f, h, w = layout.token_grid
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    for b in range(2):
        assert sorted(rec.features[b]) == ["h.layer001.step001", "h.layer001.step003"]
        for step in (1, 3):
            out = seen[(1, step)]  # (2 * batch, F*h*w, width): negative rows first
            assert out.shape == (4, f * h * w, width)
            want = out[2 + b].reshape(f, h * w, width).to(torch.float16)
            got = rec.features[b][f"h.layer001.step{step:03d}"]
            assert got.dtype == torch.float16 and torch.equal(got, want)
            assert not torch.equal(got, out[b].reshape(f, h * w, width).half()), "negative half"
        other = seen[(1, 2)][2 + b].reshape(f, h * w, width).half()
        assert not torch.equal(rec.features[b]["h.layer001.step001"], other)
