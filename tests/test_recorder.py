"""The recorder applies the model's text-key mask to the online correspondence."""

import torch

from datagen.capture.correspondence import compute_correspondence
from datagen.capture.recorder import CaptureSpec, Recorder


def test_masked_text_keys_are_left_out_of_the_correspondence():
    g = torch.Generator().manual_seed(0)
    heads, frames, h, w, d, n_text = 2, 3, 2, 3, 8, 5
    q = torch.randn(1, heads, frames, h * w, d, generator=g)
    k = torch.randn(1, heads, frames, h * w, d, generator=g)
    k_text = torch.randn(1, heads, n_text, d, generator=g) * 3
    mask = torch.tensor([[True, True, False, False, False]])
    rec = Recorder(
        CaptureSpec((), (), (0,), (0,)),
        batch=1,
        query_tokens=torch.tensor([0, 4]),
        token_grid=(frames, h, w),
    )
    rec.resolve_steps([999])
    rec.begin_forward(0, 999, slice(0, 1))
    rec.record(0, q, k, k_text, text_mask=mask)
    got = rec.correspondence[0][(0, 0)]
    real = compute_correspondence(
        q[0], k[0], torch.tensor([0, 4]), k_text=k_text[0, :, :2], grid_hw=(h, w)
    ).to_numpy()
    padded = compute_correspondence(
        q[0], k[0], torch.tensor([0, 4]), k_text=k_text[0], grid_hw=(h, w)
    ).to_numpy()
    torch.testing.assert_close(
        torch.from_numpy(got["mass_text"]), torch.from_numpy(real["mass_text"])
    )
    assert not torch.allclose(
        torch.from_numpy(got["mass_text"]), torch.from_numpy(padded["mass_text"])
    )


def test_batched_dense_path_equals_the_chunked_kernel_per_video():
    from datagen.capture import batched

    g = torch.Generator().manual_seed(1)
    b, heads, frames, h, w, d, n_text = 3, 2, 4, 3, 5, 8, 6
    q = torch.randn(b, heads, frames, h * w, d, generator=g)
    k = torch.randn(b, heads, frames, h * w, d, generator=g)
    kt = torch.randn(b, heads, n_text, d, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1]]).bool()
    qt = torch.tensor([0, 7, 14, 3])
    dense = batched.batched_correspondence(q, k, qt, kt, mask, grid_hw=(h, w))
    limit = batched.DENSE_LIMIT
    batched.DENSE_LIMIT = 0  # force the chunked per-video path
    try:
        chunked = batched.batched_correspondence(q, k, qt, kt, mask, grid_hw=(h, w))
    finally:
        batched.DENSE_LIMIT = limit
    for i in range(b):
        ref = compute_correspondence(
            q[i], k[i], qt, k_text=kt[i][:, mask[i]], grid_hw=(h, w)
        ).to_numpy()
        for got in (dense[i], chunked[i]):
            assert sorted(got) == sorted(ref)
            for name, arr in ref.items():
                assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
                if arr.dtype.kind == "i":
                    assert (got[name] == arr).all(), name
                else:
                    assert abs(got[name] - arr).max() <= 1e-5, name


def test_per_point_arrays_gathered_from_distinct_tokens_equal_a_per_point_computation():
    """Each video's own queries (different per video, some sharing a token, some on later
    frames) get rows equal to computing the correspondence of each point's token directly."""
    import numpy as np
    import safetensors.numpy

    from datagen.capture.batched import batched_correspondence
    from datagen.capture.products import capture_products, corr_tokens, token_rows
    from datagen.layout import TokenLayout
    from datagen.track.queries import QuerySampler

    frames, h, w, heads, d = 3, 4, 5, 2, 8
    layout = TokenLayout(
        family="cogvideox", num_frames=frames, height=h * 8, width=w * 8,
        vae_compression=(1, 8, 8), patch_size=(1, 1, 1), text_tokens=4, text_position="first",
    )  # fmt: skip
    assert layout.token_grid == (frames, h, w)
    queries = [
        QuerySampler("random", num_queries=9).sample(h * 8, w * 8, frames, s) for s in (1, 2)
    ]
    queries[1] = np.concatenate([queries[1], [[2, 3.0, 4.0]]]).astype(np.float32)  # a later query
    tokens = corr_tokens(layout, queries)
    rows = [token_rows(layout, tokens, q) for q in queries]
    assert tokens.numel() < 18  # shared tokens are computed once
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, frames, h * w, d, generator=g)
    k = torch.randn(2, heads, frames, h * w, d, generator=g)
    kt = torch.randn(2, heads, 4, d, generator=g)
    spec = CaptureSpec((), (), (0,), (0,))
    rec = Recorder(spec, batch=2, query_tokens=tokens, token_grid=(frames, h, w))
    rec.resolve_steps([999])
    rec.begin_forward(0, 999, slice(0, 2))
    rec.record(0, q, k, kt)
    for b in range(2):
        made = capture_products(spec, rec, b, rows[b])
        meta = made.meta
        got = safetensors.numpy.load(made.correspondence)
        first = queries[b][queries[b][:, 0] == 0]
        assert meta["corr_points"] == len(first) == 9
        own = torch.from_numpy(
            (first[:, 2] // 8).astype(np.int64) * w + (first[:, 1] // 8).astype(np.int64)
        )
        ref = batched_correspondence(q[b : b + 1], k[b : b + 1], own, kt[b : b + 1],
                                     grid_hw=(h, w))[0]  # fmt: skip
        for name, arr in ref.items():
            np.testing.assert_allclose(got[name][0, 0], arr, rtol=1e-5, atol=1e-6, err_msg=name)


def test_layout_round_trips_through_sample_metadata():
    import json

    from datagen.layout import TokenLayout

    lay = TokenLayout(
        family="cogvideox1.5", num_frames=33, height=64, width=96, vae_compression=(4, 8, 8),
        patch_size=(2, 2, 2), text_tokens=7, text_position="first", pad_front=1, rope=True,
    )  # fmt: skip
    back = TokenLayout.from_json(json.loads(json.dumps(lay.to_json())))
    assert back == lay and back.token_grid == lay.token_grid
