"""The layer x step study and zero-shot tracking, held to naive point-by-point references, to
hand-computed cases and to q/k built so that the exact answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datagen.analysis import study as st
from datagen.analysis import zeroshot as zs
from datagen.capture.correspondence import compute_correspondence
from datagen.layout import TokenLayout


def _layout(frames=9, height=48, width=80, vae=(4, 8, 8), patch=(1, 2, 2)) -> TokenLayout:
    # Default: 3 token frames of 3 x 5 tokens of 16 x 16 px; a non-square grid, so that a
    # swapped x / y shows, and temporal compression 4, so that a frame convention shows.
    return TokenLayout("cogvideox", frames, height, width, vae, patch, 0, "first")


def test_layout_conventions_by_hand():
    lay = _layout()
    assert lay.token_grid == (3, 3, 5) and lay.token_pixel_size == (16, 16)
    # Token (row 1, col 3) = index 1 * 5 + 3; its centre has the half-token offset.
    assert lay.centre_of_token_index(np.array([8])).tolist() == [[56.0, 24.0]]
    assert lay.token_index_of_pixel(np.array([[56.0, 24.0]])).tolist() == [8]
    assert lay.pixels_of_token_units(np.array([[0.5, 1.5]])).tolist() == [[8.0, 24.0]]
    # CogVideoX, 49 frames: token frame j is compared at video frame 4j (the last it encodes).
    cog = _layout(frames=49, height=480, width=720)
    assert [cog.anchor_video_frame(j) for j in (0, 1, 2, 12)] == [0, 4, 8, 48]
    # CogVideoX 1.5: one padding latent frame in front of temporal patches of 2.
    c15 = TokenLayout("cogvideox", 81, 768, 1360, (4, 8, 8), (2, 2, 2), 0, "first", pad_front=1)
    assert [c15.anchor_video_frame(j) for j in (0, 1, 10)] == [0, 8, 80]


def test_threshold_is_the_papers_8px_scaled_with_resolution():
    assert st.threshold_px(_layout(height=480, width=720)) == pytest.approx(8.0)
    assert st.threshold_px(_layout(height=240, width=360)) == pytest.approx(4.0)
    assert st.threshold_px(_layout(height=480, width=720), 12.0) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="positive"):
        st.threshold_px(_layout(), 0.0)


def _random_video(rng, lay: TokenLayout, n: int):
    f, h, w = lay.token_grid
    th, tw = lay.token_pixel_size
    tracks = rng.uniform(-4, [lay.width + 4, lay.height + 4], size=(n, lay.num_frames, 2))
    visible = rng.random((n, lay.num_frames)) < 0.7
    true_tok = lay.token_index_of_pixel(tracks)  # (n, T)
    mf = rng.integers(0, h * w, size=(n, f))
    for j in range(1, f):  # half the matches are right, to have hits of every kind
        right = rng.random(n) < 0.5
        mf[right, j] = true_tok[right, lay.anchor_video_frame(j)]
    mr = rng.integers(0, h * w, size=(f, h * w))
    arrays = {
        "match_forward": mf,
        "match_reverse": mr,
        "confidence": rng.random((n, f)),
        "mass_text": rng.random(n),
        "mass_own_frame": rng.random(n),
        "mass_other_frames": rng.random(n),
    }
    return tracks, visible, arrays


def _naive(tracks, visible, a, lay: TokenLayout, thr: float) -> dict[str, float]:
    """The README's definitions, one point and one frame at a time, with nothing shared."""
    f_count, h, w = lay.token_grid
    th, tw = lay.token_pixel_size
    ct = lay.vae_compression[0]
    out = dict.fromkeys(st.STATS, 0.0)
    for n in range(tracks.shape[0]):
        out["points"] += 1
        out["mass_text_sum"] += a["mass_text"][n]
        out["mass_own_sum"] += a["mass_own_frame"][n]
        out["mass_other_sum"] += a["mass_other_frames"][n]
        for j in range(1, f_count):
            vf = ct * j
            x, y = tracks[n, vf]
            if not visible[n, vf] or not (0 <= x < lay.width and 0 <= y < lay.height):
                continue
            out["pairs"] += 1
            x0, y0 = tracks[n, 0]
            moved = abs(x - x0) >= tw or abs(y - y0) >= th
            out["moved_pairs"] += moved
            m = a["match_forward"][n, j]
            cx, cy = (m % w + 0.5) * tw, (m // w + 0.5) * th
            out["hit_px"] += math.hypot(cx - x, cy - y) < thr
            tok = abs(cx - x) <= tw and abs(cy - y) <= th
            out["hit_token"] += tok
            out["hit_token_moved"] += tok and moved
            label_token = int(y // th) * w + int(x // tw)
            b = a["match_reverse"][j, label_token]
            bx, by = (b % w + 0.5) * tw, (b // w + 0.5) * th
            out["rev_hit_px"] += math.hypot(bx - x0, by - y0) < thr
            out["rev_hit_token"] += abs(bx - x0) <= tw and abs(by - y0) <= th
            out["conf_sum"] += a["confidence"][n, j]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_study_sums_equal_a_naive_point_by_point_reference(seed):
    rng = np.random.default_rng(seed)
    lay = _layout()
    tracks, visible, a = _random_video(rng, lay, n=40)
    thr = 12.0  # wide enough for hits and misses of both kinds on random data
    pairs = st.scored_pairs(tracks, visible, lay)
    got = st.match_sums(a["match_forward"], pairs, lay, thr, a["match_reverse"], tracks[:, 0])
    att = st.attention_sums(
        a["confidence"], a["mass_text"], a["mass_own_frame"], a["mass_other_frames"], pairs
    )
    got = np.where(np.isnan(got), att, got)
    want = _naive(tracks, visible, a, lay, thr)
    assert want["hit_px"] > 0 and want["hit_token"] > want["hit_px"]
    assert want["pairs"] > want["hit_token"] and want["rev_hit_token"] > 0
    assert dict(zip(st.STATS, got.tolist(), strict=True)) == pytest.approx(want)
    m = st.metrics_of(got)
    assert m["accuracy_px"] == pytest.approx(want["hit_px"] / want["pairs"])
    assert m["confidence"] == pytest.approx(want["conf_sum"] / want["pairs"])
    assert m["mass_other_frames"] == pytest.approx(want["mass_other_sum"] / 40)


def test_a_tracker_without_attention_leaves_attention_metrics_undefined():
    lay = _layout()
    tracks, visible, a = _random_video(np.random.default_rng(0), lay, 10)
    pairs = st.scored_pairs(tracks, visible, lay)
    m = st.metrics_of(st.match_sums(a["match_forward"], pairs, lay, 8.0))
    assert np.isfinite(m["accuracy_px"]) and np.isfinite(m["accuracy_token"])
    for name in ("reverse_accuracy_px", "confidence", "mass_text", "mass_other_frames"):
        assert np.isnan(m[name])


def test_harmonic_ranking_equals_a_hand_computed_case():
    acc = np.array([[0.0, 50.0], [100.0, 25.0]])  # normalised: 0, .5, 1, .25
    conf = np.array([[1.0, 2.0], [3.0, 4.0]])  # 0, 1/3, 2/3, 1
    cross = np.array([[0.1, 0.2], [0.3, 0.5]])  # 0, .25, .5, 1
    scores = st.harmonic_scores(acc, conf, cross)
    want = np.array([[0.0, 3 / (2 + 3 + 4)], [3 / (1 + 1.5 + 2), 3 / (4 + 1 + 1)]])
    np.testing.assert_allclose(scores, want)
    ranking = st.layer_ranking(scores, [17, 3])
    assert [layer for layer, _ in ranking] == [3, 17]
    assert ranking[0][1] == pytest.approx((want[1, 0] + want[1, 1]) / 2)
    # A flat term carries no information: it normalises to 1 and leaves the others to rank.
    flat = st.harmonic_scores(np.zeros((2, 2)), conf, cross)
    assert flat[1, 1] == pytest.approx(1.0) and flat[0, 0] == 0.0


def _naive_qk(q, k, tokens, h, w, radius):
    """Per head, per query, per frame: softmax(q k^T / sqrt(d)), head mean, argmax, window
    expectation, and the matched token's reverse argmax; float64 loops."""
    heads, frames, t, d = q.shape
    q, k = q.double(), k.double()
    n = len(tokens)
    match = np.zeros((n, frames), int)
    refined = np.zeros((n, frames, 2))
    reverse = np.zeros((n, frames), int)
    for i, tok in enumerate(tokens):
        for f in range(frames):
            p = sum(
                torch.softmax(q[hd, 0, tok] @ k[hd, f].T / math.sqrt(d), 0) for hd in range(heads)
            )
            p = (p / heads).numpy()
            m = int(p.argmax())
            match[i, f] = m
            r0, c0 = divmod(m, w)
            num, den = np.zeros(2), 0.0
            for r in range(r0 - radius, r0 + radius + 1):
                for c in range(c0 - radius, c0 + radius + 1):
                    if 0 <= r < h and 0 <= c < w:
                        num += p[r * w + c] * np.array([c + 0.5, r + 0.5])
                        den += p[r * w + c]
            refined[i, f] = num / den
            back = sum(
                torch.softmax(q[hd, f, m] @ k[hd, 0].T / math.sqrt(d), 0) for hd in range(heads)
            )
            reverse[i, f] = int(back.argmax())
    return match, refined, reverse


def test_qk_matches_equal_a_naive_reference_and_the_stored_correspondence():
    torch.manual_seed(0)
    heads, frames, h, w, d = 3, 4, 3, 5, 8  # heads != d: a head-count scale would show
    q = torch.randn(heads, frames, h * w, d) * 2
    k = torch.randn(heads, frames, h * w, d) * 2
    tokens = np.array([0, 4, 7, 14, 7])
    got = zs.qk_matches(q.half(), k.half(), tokens, (h, w), radius=1, chunk=2)
    match, refined, reverse = _naive_qk(q.half().float(), k.half().float(), tokens, h, w, 1)
    np.testing.assert_array_equal(got.match, match)
    np.testing.assert_allclose(got.refined, refined, atol=1e-5)
    np.testing.assert_array_equal(got.reverse, reverse)
    corr = compute_correspondence(q.half(), k.half(), torch.as_tensor(tokens), grid_hw=(h, w))
    np.testing.assert_array_equal(got.match, corr.match_forward.numpy())


def _exact_qk(lay: TokenLayout, rng, heads=2, d=None, shuffled=False):
    """q/k whose every frame-0 token matches, on each token frame, the token its content moved
    to (a random permutation per frame), and tracks that sit on those token centres."""
    f, h, w = lay.token_grid
    t = h * w
    d = d or t
    perm = [np.arange(t)] + [rng.permutation(t) for _ in range(1, f)]
    eye = torch.eye(t, d) * 12.0
    q = torch.zeros(heads, f, t, d)
    k = torch.zeros(heads, f, t, d)
    for j in range(f):
        key_perm = rng.permutation(t) if shuffled and j > 0 else perm[j]
        k[:, j, key_perm] = eye  # token perm[j][i] of frame j carries content i
        q[:, j, perm[j]] = eye
    centres = lay.centre_of_token_index(np.arange(t))
    tracks = np.zeros((t, lay.num_frames, 2))
    for vf in range(lay.num_frames):
        tracks[:, vf] = centres[perm[lay.token_frame_of_video_frame(vf)]]
    return q.half(), k.half(), tracks, np.ones((t, lay.num_frames), bool)


def _study_of(q, k, tracks, visible, lay):
    tokens = lay.token_index_of_pixel(tracks[:, 0])
    corr = compute_correspondence(q, k, torch.as_tensor(tokens), grid_hw=lay.token_grid[1:])
    pairs = st.scored_pairs(tracks, visible, lay)
    thr = st.threshold_px(lay)
    mf, mr = corr.match_forward.numpy(), corr.match_reverse.numpy()
    m = st.metrics_of(st.match_sums(mf, pairs, lay, thr, mr, tracks[:, 0]))
    qk = zs.qk_matches(q, k, tokens, lay.token_grid[1:])
    m_qk = st.metrics_of(st.match_sums(qk.match, pairs, lay, thr))
    vis = zs.cycle_visible(zs.reverse_of_forward(mf, mr), tracks[:, 0], lay)
    scores = {
        "argmax": zs.tracks_from_tokens(mf, tracks[:, 0], lay),
        "soft": zs.tracks_from_token_units(corr.soft_forward.numpy(), tracks[:, 0], lay),
        "qk_refined": zs.tracks_from_token_units(qk.refined, tracks[:, 0], lay),
    }
    tap = {n: zs.score_tracks(p, vis, tracks, visible, lay) for n, p in scores.items()}
    return m, m_qk, tap, pairs


def test_qk_built_to_match_every_point_scores_100_and_tracks_perfectly():
    lay = _layout(frames=17, height=64, width=96)  # 5 token frames of 4 x 6 tokens
    q, k, tracks, visible = _exact_qk(lay, np.random.default_rng(0))
    m, m_qk, tap, _ = _study_of(q, k, tracks, visible, lay)
    for metrics in (m, m_qk):
        assert metrics["accuracy_px"] == 1.0 and metrics["accuracy_token"] == 1.0
    assert m["reverse_accuracy_px"] == 1.0
    for name, t in tap.items():
        assert t["delta_avg"] == 1.0, name
        assert t["average_jaccard"] == 1.0 and t["occlusion_accuracy"] == 1.0, name


def test_shuffled_qk_score_at_chance():
    lay = _layout(frames=41, height=128, width=192)  # 11 token frames of 8 x 12 tokens
    q, k, tracks, visible = _exact_qk(lay, np.random.default_rng(1), shuffled=True)
    m, m_qk, tap, pairs = _study_of(q, k, tracks, visible, lay)
    f, h, w = lay.token_grid
    # Chance: a uniformly random token hits within the threshold only when it is the label's
    # own token (labels sit on token centres), and within one token for each of the up to
    # 3 x 3 tokens around it.
    rc = lay.token_of_pixel(pairs.label)
    near = (np.minimum(rc[:, 0] + 1, h - 1) - np.maximum(rc[:, 0] - 1, 0) + 1) * (
        np.minimum(rc[:, 1] + 1, w - 1) - np.maximum(rc[:, 1] - 1, 0) + 1
    )
    k_pairs = pairs.point.size
    for acc, p in ((m["accuracy_px"], 1 / (h * w)), (m["accuracy_token"], near.mean() / (h * w))):
        assert abs(acc - p) < 4 * math.sqrt(p * (1 - p) / k_pairs), (acc, p)
    assert m_qk["accuracy_token"] == pytest.approx(m["accuracy_token"])
    assert tap["argmax"]["delta_avg"] < 0.2


def test_baselines_recover_whole_token_motion_and_stillness():
    lay = _layout(frames=9, height=48, width=80, vae=(4, 8, 8), patch=(1, 2, 2))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    # The texture moves right by one token (16 px) per token frame, wrapping around.
    frames = np.stack(
        [np.roll(base, 16 * lay.token_frame_of_video_frame(t), axis=1) for t in range(9)]
    )
    qxy = lay.centre_of_token_index(np.arange(15))
    pm = zs.pixel_patch_matches(frames, qxy, lay)
    for j in range(3):
        want = (np.arange(15) // 5) * 5 + (np.arange(15) % 5 + j) % 5
        np.testing.assert_array_equal(pm[:, j], want)
    still = zs.no_motion_tracks(qxy, lay)
    assert still.shape == (15, 3, 2) and (still == qxy[:, None]).all()
