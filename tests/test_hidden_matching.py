"""Matching by cosine similarity of stored block outputs (``capture.hidden_layers``): the
recomputation against a naive per-point loop, features built to match every point (100%),
shuffled features (chance)."""

from __future__ import annotations

import math

import numpy as np
import torch

from datagen.analysis import study as st
from datagen.analysis import zeroshot as zs
from datagen.layout import TokenLayout


def _layout(frames=17, height=64, width=96) -> TokenLayout:
    # 5 token frames of 4 x 6 tokens of 16 px; temporal compression 4, a non-square grid.
    return TokenLayout("cogvideox", frames, height, width, (4, 8, 8), (1, 2, 2), 0, "first")


def _naive(hidden: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query and one frame at a time: cosine of float64 vectors, argmax."""
    x = hidden.astype(np.float64)
    f, t, _ = x.shape
    match = np.zeros((len(tokens), f), np.int64)
    reverse = np.zeros((len(tokens), f), np.int64)

    def cos(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    for n, tok in enumerate(tokens):
        for j in range(f):
            sims = [cos(x[0, tok], x[j, i]) for i in range(t)]
            match[n, j] = int(np.argmax(sims))
            back = [cos(x[j, match[n, j]], x[0, i]) for i in range(t)]
            reverse[n, j] = int(np.argmax(back))
    return match, reverse


def test_feature_matches_equal_a_naive_per_point_loop():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((4, 15, 24)).astype(np.float16)
    tokens = np.array([0, 3, 3, 14, 7])
    got = zs.feature_matches(hidden, tokens, chunk=2)
    want_m, want_r = _naive(hidden, tokens)
    np.testing.assert_array_equal(got.match, want_m)
    np.testing.assert_array_equal(got.reverse, want_r)
    assert (got.match[:, 0] == tokens).all(), "frame 0 matches each token to itself"
    # Scale does not matter to a cosine; a torch tensor is taken as it is.
    scaled = zs.feature_matches(torch.from_numpy(hidden.astype(np.float32) * 7), tokens)
    np.testing.assert_array_equal(scaled.match, want_m)


def _exact_features(lay: TokenLayout, rng, dim=32, shuffled=False):
    """Features whose frame-0 token i reappears on token frame j at token perm[j][i] (content
    moves; the other tokens carry other content), and tracks on those token centres."""
    f, h, w = lay.token_grid
    t = h * w
    content = rng.standard_normal((t, dim))
    perm = [np.arange(t)] + [rng.permutation(t) for _ in range(1, f)]
    hidden = np.zeros((f, t, dim))
    for j in range(f):
        where = rng.permutation(t) if shuffled and j > 0 else perm[j]
        hidden[j, where] = content
    centres = lay.centre_of_token_index(np.arange(t))
    tracks = np.zeros((t, lay.num_frames, 2))
    for vf in range(lay.num_frames):
        tracks[:, vf] = centres[perm[lay.token_frame_of_video_frame(vf)]]
    return hidden.astype(np.float16), tracks, np.ones((t, lay.num_frames), bool)


def _scores(hidden, tracks, visible, lay):
    qxy = tracks[:, 0]
    m = zs.feature_matches(hidden, lay.token_index_of_pixel(qxy))
    pairs = st.scored_pairs(tracks, visible, lay)
    metrics = st.metrics_of(st.match_sums(m.match, pairs, lay, st.threshold_px(lay)))
    pred = zs.tracks_from_tokens(m.match, qxy, lay)
    vis = zs.cycle_visible(m.reverse, qxy, lay)
    return metrics, zs.score_tracks(pred, vis, tracks, visible, lay), pairs


def test_features_built_to_match_every_point_score_100_and_track_perfectly():
    lay = _layout()
    hidden, tracks, visible = _exact_features(lay, np.random.default_rng(1))
    m, tap, pairs = _scores(hidden, tracks, visible, lay)
    assert pairs.point.size == 24 * 4
    assert m["accuracy_px"] == 1.0 and m["accuracy_token"] == 1.0
    assert math.isnan(m["reverse_accuracy_px"]), "no reverse accuracy from features"
    assert tap["delta_avg"] == 1.0 and tap["average_jaccard"] == 1.0
    assert tap["occlusion_accuracy"] == 1.0


def test_shuffled_features_score_at_chance():
    lay = _layout(frames=41, height=128, width=192)  # 11 token frames of 8 x 12 tokens
    hidden, tracks, visible = _exact_features(lay, np.random.default_rng(2), shuffled=True)
    m, tap, pairs = _scores(hidden, tracks, visible, lay)
    f, h, w = lay.token_grid
    p = 1 / (h * w)  # the label's own token (labels sit on token centres)
    k = pairs.point.size
    assert abs(m["accuracy_px"] - p) < 4 * math.sqrt(p * (1 - p) / k), m["accuracy_px"]
    assert tap["delta_avg"] < 0.2
