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
