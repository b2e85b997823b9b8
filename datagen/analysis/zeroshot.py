"""Zero-shot point tracking from attention, its DINOv2-free baselines, and their TAP-Vid scores.

Tracks follow the frame-0 query points of a video through token frames: each token frame is
predicted at its anchor video frame (:meth:`TokenLayout.anchor_video_frame`; video frame 0 for
token frame 0, where the track is the query itself), and TAP-Vid metrics
(:mod:`datagen.analysis.tapvid`, raster coordinates, 256x256 evaluation, "first" mode with
query frame 0) are taken on those frames only. With a temporal VAE compression of 4
(CogVideoX), the 49 frames of a video give 13 predicted frames.

Trackers (positions in raster pixels through the layout):

* **attention argmax**: the centre of the matched token (``match_forward``, or recomputed from
  the stored q/k by :func:`qk_matches`);
* **attention soft-argmax**: from the stored correspondence, ``soft_forward`` (the expectation of
  the token centre under the head-averaged frame-pair probability, over the whole frame); from
  q/k, with **sub-token refinement**: the expectation over the ``(2r+1) x (2r+1)`` tokens around
  the argmax only (r = 1 by default), which a diffuse tail cannot pull towards the frame centre;
* **pixel patches** (baseline): argmax cosine similarity of zero-mean RGB patches of one token's
  extent, from the query's token on frame 0 to every token of the anchor frame;
* **no motion** (baseline): the query position on every frame.
* **cosine argmax** (source "features", ``capture.hidden_layers``): the centre of the token of
  the anchor frame whose stored block-output features are most cosine-similar to the query's
  frame-0 token (:func:`feature_matches`); visibility by the same cycle consistency.

Predicted visibility, for AJ and OA: attention tracks are visible where the match is
cycle-consistent (the matched token's own reverse match to frame 0 lies within one token of
the query point in x and y; the reverse direction of the correspondence); the baselines
predict every point visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datagen.analysis.tapvid import evaluate_tracks
from datagen.layout import TokenLayout


def anchors(layout: TokenLayout) -> list[tuple[int, int]]:
    """(token frame, anchor video frame) of every token frame that encodes a video frame."""
    out = []
    for j in range(layout.token_grid[0]):
        vf = layout.anchor_video_frame(j)
        if vf is not None:
            out.append((j, vf))
    return out


@dataclass(frozen=True)
class QKMatches:
    """Forward matches of N frame-0 query tokens recomputed from q/k, on all F token frames."""

    match: np.ndarray
    """(N, F) int64: argmax token (``row * w + col``) of the head-averaged frame-pair softmax."""
    refined: np.ndarray
    """(N, F, 2) float64: (x, y) token units, soft-argmax over the window around the argmax."""
    reverse: np.ndarray
    """(N, F) int64: the frame-0 token that the matched token matches back to."""


def qk_matches(
    q, k, query_tokens: np.ndarray, grid_hw: tuple[int, int], radius: int = 1, chunk: int = 128
) -> QKMatches:
    """Forward matches, refined positions and reverse matches from one layer's q/k.

    ``q``, ``k``: (heads, F, h*w, d) video tokens (numpy or torch, any float dtype; fp16 as
    stored); ``query_tokens`` (N,) frame-0 token indices. The softmax scale is ``d ** -0.5``
    (the head dimension, never the head count), per head, then the mean over heads: the
    definition of :mod:`datagen.capture.correspondence`. Memory: ``heads x chunk x h*w``
    float32 logits at a time.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        # Stored q/k view a read-only shard buffer; they are only read here, never copied.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        qt = torch.as_tensor(np.asarray(q)) if not isinstance(q, torch.Tensor) else q
        kt = torch.as_tensor(np.asarray(k)) if not isinstance(k, torch.Tensor) else k
    heads, frames, tokens, d = qt.shape
    h, w = grid_hw
    if h * w != tokens:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens, q/k have {tokens}")
    scale = d**-0.5
    toks = torch.as_tensor(np.asarray(query_tokens, np.int64))
    n = toks.numel()
    match = np.zeros((n, frames), np.int64)
    refined = np.zeros((n, frames, 2))
    reverse = np.zeros((n, frames), np.int64)
    k0 = kt[:, 0].float()
    ys, xs = np.divmod(np.arange(tokens), w)
    centres = torch.as_tensor(np.stack([xs + 0.5, ys + 0.5], -1), dtype=torch.float64)
    for n0 in range(0, n, chunk):
        sel = toks[n0 : n0 + chunk]
        q0 = qt[:, 0, sel].float()  # (heads, c, d)
        for f in range(frames):
            kf = kt[:, f].float()
            p = torch.softmax(torch.bmm(q0, kf.transpose(1, 2)) * scale, dim=-1).mean(0)
            m = p.argmax(-1)  # (c,)
            match[n0 : n0 + sel.numel(), f] = m.numpy()
            refined[n0 : n0 + sel.numel(), f] = _window_mean(p.double(), m, h, w, radius, centres)
            qf = qt[:, f, m].float()  # the matched tokens' own queries, back to frame 0
            back = torch.softmax(torch.bmm(qf, k0.transpose(1, 2)) * scale, dim=-1).mean(0)
            reverse[n0 : n0 + sel.numel(), f] = back.argmax(-1).numpy()
    return QKMatches(match, refined, reverse)


@dataclass(frozen=True)
class FeatureMatches:
    """Forward matches of N frame-0 query tokens by cosine similarity of stored block outputs
    (``capture.hidden_layers``), on all F token frames."""

    match: np.ndarray
    """(N, F) int64: the token of frame f most cosine-similar to the query's frame-0 token."""
    reverse: np.ndarray
    """(N, F) int64: the frame-0 token most cosine-similar to the matched token."""


def feature_matches(hidden, query_tokens: np.ndarray, chunk: int = 256) -> FeatureMatches:
    """Forward and reverse matches from one block's output features ``hidden`` (F, h*w, dim)
    (numpy or torch, any float dtype; fp16 as stored), by cosine similarity: the query's
    frame-0 token against every token of frame f, argmax (the matching :func:`qk_matches`
    does with attention). Memory: ``chunk x h*w`` float32 similarities at a time."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        ht = hidden if isinstance(hidden, torch.Tensor) else torch.as_tensor(np.asarray(hidden))
    ht = ht.float()
    unit = ht / ht.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    frames = unit.shape[0]
    toks = torch.as_tensor(np.asarray(query_tokens, np.int64))
    n = toks.numel()
    match = np.zeros((n, frames), np.int64)
    reverse = np.zeros((n, frames), np.int64)
    u0 = unit[0]
    for n0 in range(0, n, chunk):
        q0 = u0[toks[n0 : n0 + chunk]]
        for f in range(frames):
            m = (q0 @ unit[f].T).argmax(-1)
            match[n0 : n0 + q0.shape[0], f] = m.numpy()
            reverse[n0 : n0 + q0.shape[0], f] = (unit[f][m] @ u0.T).argmax(-1).numpy()
    return FeatureMatches(match, reverse)


def _window_mean(p, m, h: int, w: int, radius: int, centres):
    """Expectation of token centres under ``p`` (c, h*w) restricted to the (2r+1)^2 tokens
    around each row's argmax ``m`` (c,) (clipped at the frame border): (c, 2) numpy."""
    import torch

    r0, c0 = m // w, m % w
    dy, dx = torch.meshgrid(
        torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij"
    )
    rr = r0[:, None] + dy.reshape(1, -1)
    cc = c0[:, None] + dx.reshape(1, -1)
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    idx = (rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)).long()
    wts = torch.gather(p, 1, idx) * ok
    pos = (wts[..., None] * centres[idx]).sum(1) / wts.sum(1, keepdim=True).clamp_min(1e-300)
    return pos.numpy()


def tracks_from_tokens(match: np.ndarray, query_xy: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Raster tracks (N, A, 2) at the anchor frames from token matches (N, F): the query
    itself on token frame 0, the matched token's centre elsewhere."""
    return _at_anchors(query_xy, layout, lambda j: layout.centre_of_token_index(match[:, j]))


def _at_anchors(query_xy: np.ndarray, layout: TokenLayout, position) -> np.ndarray:
    """(N, A, 2): the query on token frame 0, ``position(j)`` (N, 2) on token frame j."""
    q = np.asarray(query_xy, np.float64)
    return np.stack([q if j == 0 else position(j) for j, _ in anchors(layout)], axis=1)


def tracks_from_token_units(
    xy_tokens: np.ndarray, query_xy: np.ndarray, layout: TokenLayout
) -> np.ndarray:
    """Raster tracks (N, A, 2) from positions (N, F, 2) in token units (``soft_forward``,
    :attr:`QKMatches.refined`)."""
    return _at_anchors(query_xy, layout, lambda j: layout.pixels_of_token_units(xy_tokens[:, j]))


def cycle_visible(
    reverse_tokens: np.ndarray, query_xy: np.ndarray, layout: TokenLayout
) -> np.ndarray:
    """Predicted visibility (N, A) at the anchor frames: the matched token's reverse match
    (N, F) frame-0 token index lands within one token (x and y) of the query point; True on
    token frame 0."""
    th, tw = layout.token_pixel_size
    q = np.asarray(query_xy, np.float64)
    out = []
    for j, _ in anchors(layout):
        if j == 0:
            out.append(np.ones(q.shape[0], bool))
            continue
        d = np.abs(layout.centre_of_token_index(reverse_tokens[:, j]) - q)
        out.append((d[:, 0] <= tw) & (d[:, 1] <= th))
    return np.stack(out, axis=1)


def reverse_of_forward(match_forward: np.ndarray, match_reverse: np.ndarray) -> np.ndarray:
    """(N, F) frame-0 token each forward match goes back to, from the stored ``match_reverse``
    (F, h*w)."""
    f = np.arange(match_forward.shape[1])[None, :]
    return np.asarray(match_reverse)[f, np.asarray(match_forward)]


def patch_vectors(frame: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """(h*w, th*tw*3) float32 zero-mean unit-norm RGB patches of one token's extent, in token
    order, of a uint8 frame (H, W, 3)."""
    th, tw = layout.token_pixel_size
    _, h, w = layout.token_grid
    x = np.asarray(frame, np.float32)[: h * th, : w * tw]
    x = x.reshape(h, th, w, tw, -1).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def pixel_patch_matches(
    frames: np.ndarray, query_xy: np.ndarray, layout: TokenLayout
) -> np.ndarray:
    """(N, F) token matches of the pixel-patch baseline: for each query, argmax cosine
    similarity of its frame-0 token patch against the patches of each token frame's anchor
    video frame (token frames without one keep the query token)."""
    qtok = layout.token_index_of_pixel(query_xy)
    v0 = patch_vectors(frames[0], layout)[qtok]
    out = np.repeat(qtok[:, None], layout.token_grid[0], axis=1)
    for j, vf in anchors(layout):
        if j > 0 and vf < len(frames):
            out[:, j] = np.argmax(v0 @ patch_vectors(frames[vf], layout).T, axis=1)
    return out


def no_motion_tracks(query_xy: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """The no-motion baseline: the query position (N, 2) on every anchor frame, (N, A, 2)."""
    a = len(anchors(layout))
    return np.repeat(np.asarray(query_xy, np.float64)[:, None], a, axis=1)


def score_tracks(
    pred: np.ndarray,
    pred_visible: np.ndarray,
    tracks: np.ndarray,
    visible: np.ndarray,
    layout: TokenLayout,
) -> dict[str, float]:
    """TAP-Vid metrics (fractions; :func:`datagen.analysis.tapvid.tapvid_metrics`) of one
    video's predicted tracks (N, A, 2) and visibility (N, A) at the anchor frames, against
    labels (N, T, 2) raster and (N, T) bool on video frames; query frame 0 ("first" mode), a
    point not visible on frame 0 is not evaluated."""
    frames = [vf for _, vf in anchors(layout)]
    gt = np.asarray(tracks, np.float64)[:, frames]
    gv = np.asarray(visible, bool)[:, frames]
    qf = np.where(gv[:, 0], 0, -1).astype(np.int64)
    return evaluate_tracks(
        pred,
        np.asarray(pred_visible, bool),
        gt,
        gv,
        (layout.height, layout.width),
        mode="first",
        query_frames=qf,
    )


def attention_maps(q, k, token: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """(F, h, w) float64: the head-averaged frame-pair softmax of frame-0 token ``token``'s
    query over each token frame's keys (each map sums to 1), from one layer's q/k (heads, F,
    h*w, d); scale ``d ** -0.5``."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    heads, frames, tokens, d = q.shape
    logits = np.einsum("hd,hftd->hft", q[:, 0, token], k) * d**-0.5
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return p.mean(0).reshape(frames, *grid_hw)
