"""compute_correspondence against a naive full-attention-matrix reference and known motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen.capture import fused as fused_kernels
from datagen.capture.correspondence import (
    CorrespondenceResult,
    compute_correspondence,
    token_grid_xy,
)

HEADS, FRAMES, GH, GW, DIM, TEXT, NQ = 3, 4, 5, 6, 8, 7, 10
PATHS = pytest.mark.parametrize(
    "fused",
    [
        pytest.param(
            True,
            id="fused",
            marks=pytest.mark.skipif(fused_kernels._compiler() is None, reason="no C compiler"),
        ),
        pytest.param(False, id="torch-path"),
    ],
)
"""Run a test on both implementations (the fused kernels are built with this machine's cc)."""
NUMPY_KEYS = {
    "match_forward": (np.int32, (NQ, FRAMES)),
    "soft_forward": (np.float32, (NQ, FRAMES, 2)),
    "match_prob": (np.float32, (NQ, FRAMES)),
    "match_reverse": (np.int32, (FRAMES, GH * GW)),
    "confidence": (np.float32, (NQ, FRAMES)),
    "mass_text": (np.float32, (NQ,)),
    "mass_own_frame": (np.float32, (NQ,)),
    "mass_other_frames": (np.float32, (NQ,)),
    "mass_per_frame": (np.float32, (NQ, FRAMES)),
}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def naive_correspondence(q_video, k_video, query_tokens, k_text, scale, grid_hw):
    """Reference: the full (heads, N_all, N_all) attention logits in float64, then slices.

    The joint sequence is text first (as in CogVideoX), then the frame-major video tokens.
    Text queries are random (they only fill rows nobody reads). Everything is explicit loops.
    """
    q = q_video.detach().cpu().double().numpy()
    k = k_video.detach().cpu().double().numpy()
    heads, frames, tokens, d = q.shape
    h, w = grid_hw
    qt = np.asarray(query_tokens)
    n_text = 0 if k_text is None else k_text.shape[1]
    kt = np.zeros((heads, 0, d)) if k_text is None else k_text.detach().cpu().double().numpy()
    q_all = np.concatenate(
        [np.random.default_rng(0).normal(size=(heads, n_text, d)), q.reshape(heads, -1, d)], 1
    )
    k_all = np.concatenate([kt, k.reshape(heads, -1, d)], axis=1)
    logits = np.einsum("hid,hjd->hij", q_all, k_all) * scale  # (heads, N_all, N_all)
    full = _softmax(logits)  # whole-sequence attention, per head

    def vid(f):  # slice of frame f's video tokens in the joint sequence
        return slice(n_text + f * tokens, n_text + (f + 1) * tokens)

    centres = np.array([[x + 0.5, y + 0.5] for y in range(h) for x in range(w)])
    n = len(qt)
    ref = {
        "match_forward": np.zeros((n, frames), np.int64),
        "soft_forward": np.zeros((n, frames, 2)),
        "match_prob": np.zeros((n, frames)),
        "match_reverse": np.zeros((frames, tokens), np.int64),
        "confidence": np.zeros((n, frames)),
        "mass_per_frame": np.zeros((n, frames)),
        "mass_text": np.zeros(n),
    }
    for i, tok in enumerate(qt):
        row = n_text + tok  # frame 0, token tok
        avg_full = full[:, row, :].mean(axis=0)
        ref["mass_text"][i] = avg_full[:n_text].sum()
        for f in range(frames):
            pair = _softmax(logits[:, row, vid(f)]).mean(axis=0)  # frame-pair (0, f)
            ref["match_forward"][i, f] = np.argmax(pair)
            ref["match_prob"][i, f] = pair.max()
            ref["soft_forward"][i, f] = pair @ centres
            ref["confidence"][i, f] = avg_full[vid(f)].max()
            ref["mass_per_frame"][i, f] = avg_full[vid(f)].sum()
    for f in range(frames):
        for j in range(tokens):
            row = n_text + f * tokens + j
            pair = _softmax(logits[:, row, vid(0)]).mean(axis=0)  # frame-pair (f, 0)
            ref["match_reverse"][f, j] = np.argmax(pair)
    ref["mass_own_frame"] = ref["mass_per_frame"][:, 0]
    ref["mass_other_frames"] = ref["mass_per_frame"][:, 1:].sum(axis=1)
    return ref


def _random_inputs(dtype=torch.float32, text=True, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    shape = (HEADS, FRAMES, GH * GW, DIM)
    q = (torch.randn(shape, generator=g) * spread).to(dtype)
    k = (torch.randn(shape, generator=g) * spread).to(dtype)
    kt = (torch.randn(HEADS, TEXT, DIM, generator=g) * spread).to(dtype) if text else None
    qt = torch.randperm(GH * GW, generator=g)[:NQ]
    return q, k, kt, qt


def _assert_matches_reference(res: CorrespondenceResult, ref: dict, atol: float) -> None:
    assert torch.equal(res.match_forward, torch.from_numpy(ref["match_forward"]))
    assert torch.equal(res.match_reverse, torch.from_numpy(ref["match_reverse"]))
    for name in (
        "soft_forward",
        "match_prob",
        "confidence",
        "mass_text",
        "mass_own_frame",
        "mass_other_frames",
        "mass_per_frame",
    ):
        got = getattr(res, name).double().numpy()
        np.testing.assert_allclose(got, ref[name], rtol=0, atol=atol, err_msg=name)


@PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_naive_reference_with_text(dtype, fused):
    if fused and dtype == torch.float64:
        pytest.skip("float64 work always runs on the torch path")
    q, k, kt, qt = _random_inputs(dtype)
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=fused)
    ref = naive_correspondence(q, k, qt, kt, DIM**-0.5, (GH, GW))
    _assert_matches_reference(res, ref, atol=1e-5)
    assert res.mass_text.min() > 1e-3  # the text keys really take part


def test_matches_naive_reference_without_text():
    q, k, _, qt = _random_inputs(torch.float64, text=False, seed=1)
    res = compute_correspondence(q, k, qt, grid_hw=(GH, GW))
    ref = naive_correspondence(q, k, qt, None, DIM**-0.5, (GH, GW))
    _assert_matches_reference(res, ref, atol=1e-5)
    assert torch.equal(res.mass_text, torch.zeros(NQ))


def test_explicit_scale_is_used():
    q, k, kt, qt = _random_inputs(torch.float64, seed=2)
    res = compute_correspondence(q, k, qt, k_text=kt, scale=0.05, grid_hw=(GH, GW))
    ref = naive_correspondence(q, k, qt, kt, 0.05, (GH, GW))
    _assert_matches_reference(res, ref, atol=1e-5)


@PATHS
def test_fp16_inputs_match_reference_of_the_same_values(fused):
    q, k, kt, qt = _random_inputs(torch.float16, seed=3)
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=fused)
    ref = naive_correspondence(q, k, qt, kt, DIM**-0.5, (GH, GW))
    _assert_matches_reference(res, ref, atol=1e-5)
    assert q.dtype == torch.float16 and k.dtype == torch.float16  # inputs untouched


@pytest.mark.parametrize(
    "chunks",
    [
        dict(row_chunk=1, head_chunk=1, fwd_chunk=1),
        dict(row_chunk=7, head_chunk=2, fwd_chunk=3),
        dict(row_chunk=4096, head_chunk=HEADS, fwd_chunk=4096),
    ],
)
def test_chunk_sizes_do_not_change_results(chunks):
    q, k, kt, qt = _random_inputs(torch.float64, seed=4)
    base = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW)).to_numpy()
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), **chunks)
    for name, value in res.to_numpy().items():
        np.testing.assert_allclose(value, base[name], rtol=0, atol=1e-6, err_msg=name)


def test_five_dim_inputs_and_input_tensors_unmodified():
    q, k, kt, qt = _random_inputs(torch.float32, seed=5)
    q0, k0, kt0 = q.clone(), k.clone(), kt.clone()
    a = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW))
    b = compute_correspondence(
        q.view(HEADS, FRAMES, GH, GW, DIM), k.view(HEADS, FRAMES, GH, GW, DIM), qt, k_text=kt
    )
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(kt, kt0)
    assert b.grid_hw == (GH, GW)
    for name, value in a.to_numpy().items():
        np.testing.assert_array_equal(value, b.to_numpy()[name], err_msg=name)


@PATHS
def test_masses_sum_to_one_and_are_probabilities(fused):
    q, k, kt, qt = _random_inputs(torch.float16, seed=6, spread=3.0)
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=fused)
    total = res.mass_text + res.mass_own_frame + res.mass_other_frames
    torch.testing.assert_close(total, torch.ones(NQ), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        res.mass_per_frame.sum(1) + res.mass_text, torch.ones(NQ), rtol=0, atol=1e-5
    )
    # a token's full-sequence probability never exceeds its frame's mass, nor the pair max
    assert torch.all(res.confidence <= res.mass_per_frame + 1e-6)
    assert torch.all(res.confidence <= res.match_prob + 1e-6)
    assert torch.all((res.match_prob > 0) & (res.match_prob <= 1 + 1e-6))


def test_to_numpy_names_dtypes_and_shapes():
    q, k, kt, qt = _random_inputs(torch.float32, seed=7)
    arrays = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW)).to_numpy()
    assert set(arrays) == set(NUMPY_KEYS)
    for name, (dtype, shape) in NUMPY_KEYS.items():
        assert arrays[name].dtype == dtype, name
        assert arrays[name].shape == shape, name


def _translating_scene(h, w, frames, dx, dy, heads=2, d=64, gain=400.0, seed=0):
    """q/k of a pattern translating by (dx, dy) tokens per frame.

    Each content location (on a canvas larger than the frame) owns a random unit vector per
    head. k at frame f, token (x, y) is the vector of the content there, i.e. canvas
    (x - f*dx, y - f*dy); q is ``gain`` times k (a query matches its own content).
    """
    g = torch.Generator().manual_seed(seed)
    pad = max(abs(dx), abs(dy)) * frames + 1
    canvas = torch.randn(heads, h + 2 * pad, w + 2 * pad, d, generator=g, dtype=torch.float64)
    canvas = canvas / canvas.norm(dim=-1, keepdim=True)
    k = torch.empty(heads, frames, h, w, d, dtype=torch.float64)
    for f in range(frames):
        y0, x0 = pad - f * dy, pad - f * dx
        k[:, f] = canvas[:, y0 : y0 + h, x0 : x0 + w]
    return (gain * k).float(), k.float()


@PATHS
@pytest.mark.parametrize("motion", [(1, 0), (0, 1), (2, -1), (-1, 1)])
def test_translating_pattern_is_matched_exactly(motion, fused):
    dx, dy = motion
    h, w, frames = 6, 9, 4  # h != w and dx != dy: a swapped x/y would fail
    q, k = _translating_scene(h, w, frames, dx, dy)
    qt = torch.arange(h * w)
    res = compute_correspondence(q, k, qt, grid_hw=(h, w), fused=fused)
    xs, ys = qt % w, qt // w
    grid = token_grid_xy(h, w)
    checked_fwd = checked_rev = 0
    visible = torch.zeros(h * w, frames, dtype=torch.bool)
    for f in range(frames):
        # forward: content at (x, y) in frame 0 is at (x + f dx, y + f dy) in frame f
        tx, ty = xs + f * dx, ys + f * dy
        inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
        visible[:, f] = inside
        expect = ty * w + tx
        assert torch.equal(res.match_forward[inside, f], expect[inside])
        torch.testing.assert_close(
            res.soft_forward[inside, f], grid[expect[inside]], rtol=0, atol=1e-3
        )
        assert torch.all(res.match_prob[inside, f] > 0.99)
        checked_fwd += int(inside.sum())
        # reverse: token (x, y) of frame f shows content that is at (x - f dx, y - f dy) in 0
        sx, sy = xs - f * dx, ys - f * dy
        inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
        assert torch.equal(res.match_reverse[f, inside], (sy * w + sx)[inside])
        checked_rev += int(inside.sum())
    assert checked_fwd > h * w * 2 and checked_rev > h * w * 2
    # full softmax: the query's content has the same logit wherever it is visible, so each of
    # those tokens gets 1 / (frames where visible) of the mass, and nothing else gets any
    share = 1.0 / visible.sum(1)
    expect_conf = torch.where(visible, share[:, None], torch.zeros(()))
    torch.testing.assert_close(res.confidence, expect_conf, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.mass_per_frame, expect_conf, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.mass_own_frame, share, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.mass_other_frames, 1 - share, rtol=0, atol=1e-4)


def test_query_tokens_out_of_range_or_bad():
    q, k, kt, _ = _random_inputs(torch.float32)
    for bad in (torch.tensor([0, GH * GW]), torch.tensor([-1]), torch.tensor([[0]])):
        with pytest.raises(ValueError):
            compute_correspondence(q, k, bad, k_text=kt, grid_hw=(GH, GW))
    with pytest.raises(ValueError):
        compute_correspondence(q, k, torch.tensor([0.0]), grid_hw=(GH, GW))


def test_shape_errors():
    q, k, kt, qt = _random_inputs(torch.float32)
    with pytest.raises(ValueError):
        compute_correspondence(q, k, qt)  # 4-D without grid_hw
    with pytest.raises(ValueError):
        compute_correspondence(q, k, qt, grid_hw=(GH + 1, GW))
    with pytest.raises(ValueError):
        compute_correspondence(q, k[:, :2], qt, grid_hw=(GH, GW))
    with pytest.raises(ValueError):
        compute_correspondence(q, k, qt, k_text=kt[..., :-1], grid_hw=(GH, GW))
    for bad in (dict(row_chunk=0), dict(head_chunk=0), dict(fwd_chunk=-1), dict(row_chunk=2.0)):
        with pytest.raises(ValueError):
            compute_correspondence(q, k, qt, grid_hw=(GH, GW), **bad)


@PATHS
def test_empty_queries(fused):
    q, k, kt, _ = _random_inputs(torch.float32)
    res = compute_correspondence(
        q, k, torch.zeros(0, dtype=torch.long), k_text=kt, grid_hw=(GH, GW), fused=fused
    )
    assert res.match_forward.shape == (0, FRAMES) and res.mass_text.shape == (0,)
    assert res.match_reverse.shape == (FRAMES, GH * GW)


def test_token_helpers():
    grid = token_grid_xy(2, 3)
    assert grid.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    q, k, kt, qt = _random_inputs(torch.float16, seed=8)
    cpu = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW)).to_numpy()
    gpu = compute_correspondence(
        q.cuda(), k.cuda(), qt.cuda(), k_text=kt.cuda(), grid_hw=(GH, GW)
    ).to_numpy()
    for name, value in cpu.items():
        np.testing.assert_allclose(gpu[name], value, rtol=0, atol=1e-4, err_msg=name)
