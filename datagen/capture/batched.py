"""Online correspondence for a whole batch of small videos at once.

Same definitions as :mod:`datagen.capture.correspondence` (read its module docstring), but
dense: the scores of a whole batch are materialised in one go, ``(B, heads, N + F*T, F*T)``
floats. That is what makes small videos cheap (a handful of batched kernels instead of a
loop of per-frame, per-video kernels: the tiny preset's capture overhead), and it is only
used below ``DENSE_LIMIT`` elements, so memory stays bounded; larger videos go through the
chunked :func:`~datagen.capture.correspondence.compute_correspondence`, one video at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from datagen.capture.correspondence import compute_correspondence, token_grid_xy

DENSE_LIMIT = 8_000_000
"""Score elements (B x heads x (N + F*T) x F*T) up to which the dense batched path runs
(32 MB of float32)."""


def dense_elements(batch: int, heads: int, frames: int, tokens: int, queries: int) -> int:
    return batch * heads * (queries + frames * tokens) * frames * tokens


def batched_correspondence(
    q_video: torch.Tensor,
    k_video: torch.Tensor,
    query_tokens: torch.Tensor,
    k_text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    grid_hw: tuple[int, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Correspondence arrays of every video in a batch, as ``CorrespondenceResult.to_numpy``.

    q_video, k_video: (B, heads, F, T, d); query_tokens (N,) within frame 0; k_text
    (B, heads, L, d) or None; text_mask (B, L) bool (True = a key the model attends to) or
    None; grid_hw (h, w) with h*w = T. Dense below ``DENSE_LIMIT`` score elements, otherwise
    one chunked call per video.
    """
    b, heads, frames, tokens, d = q_video.shape
    h, w = grid_hw if grid_hw is not None else (1, tokens)
    qt = query_tokens.to(q_video.device, torch.long)
    n = int(qt.numel())
    if dense_elements(b, heads, frames, tokens, n) > DENSE_LIMIT:
        out = []
        for i in range(b):
            kt = None
            if k_text is not None:
                kt = k_text[i] if text_mask is None else k_text[i][:, text_mask[i].bool()]
            out.append(
                compute_correspondence(
                    q_video[i], k_video[i], qt, k_text=kt, grid_hw=(h, w)
                ).to_numpy()
            )
        return out
    cdtype = torch.float64 if torch.float64 in (q_video.dtype, k_video.dtype) else torch.float32
    scale = d**-0.5
    q = q_video.to(cdtype)
    k = k_video.to(cdtype).reshape(b, heads, frames * tokens, d) * scale
    q0 = q[:, :, 0].index_select(2, qt)  # (B, H, N, d)
    s = (q0 @ k.transpose(-1, -2)).view(b, heads, n, frames, tokens)
    # Frame-pair softmax, head mean.
    pair = torch.softmax(s, dim=-1).mean(dim=1)  # (B, N, F, T)
    match_forward = pair.argmax(dim=-1)
    match_prob = pair.amax(dim=-1)
    soft_forward = pair @ token_grid_xy(h, w, device=q.device, dtype=cdtype)  # (B, N, F, 2)
    # Full-sequence softmax over text keys (masked ones excluded) and every video token.
    flat = s.reshape(b, heads, n, frames * tokens)
    if k_text is not None:
        st = q0 @ (k_text.to(cdtype) * scale).transpose(-1, -2)  # (B, H, N, L)
        if text_mask is not None:
            st = st.masked_fill(~text_mask.bool()[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(torch.cat([st, flat], dim=-1), dim=-1, keepdim=True)
        mass_text = torch.exp(st - lse).sum(dim=-1).mean(dim=1)  # (B, N)
    else:
        lse = torch.logsumexp(flat, dim=-1, keepdim=True)
        mass_text = torch.zeros(b, n, dtype=cdtype, device=q.device)
    full = torch.exp(flat - lse).mean(dim=1).view(b, n, frames, tokens)
    confidence = full.amax(dim=-1)
    mass_per_frame = full.sum(dim=-1)
    # Reverse: every token of every frame against frame 0's keys.
    rev = q.reshape(b, heads, frames * tokens, d) @ k[:, :, :tokens].transpose(-1, -2)
    match_reverse = torch.softmax(rev, dim=-1).mean(dim=1).argmax(dim=-1).view(b, frames, tokens)

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy()

    def i32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu").numpy().astype(np.int32)

    return [
        {
            "match_forward": i32(match_forward[i]),
            "soft_forward": f32(soft_forward[i]),
            "match_prob": f32(match_prob[i]),
            "match_reverse": i32(match_reverse[i]),
            "confidence": f32(confidence[i]),
            "mass_text": f32(mass_text[i]),
            "mass_own_frame": f32(mass_per_frame[i, :, 0]),
            "mass_other_frames": f32(mass_per_frame[i, :, 1:].sum(dim=-1)),
            "mass_per_frame": f32(mass_per_frame[i]),
        }
        for i in range(b)
    ]
