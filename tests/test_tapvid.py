"""Tests for datagen.analysis.tapvid; expected values are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datagen.analysis.tapvid import (
    DELTAS,
    evaluate_tracks,
    evaluate_videos,
    evaluation_mask,
    query_frames_first,
    rescale_points,
    tapvid_metrics,
)

B = np.array  # shorthand for small literal arrays


def _vis(rows: list[str]) -> np.ndarray:
    """Visibility from strings like "1101" (one string per track)."""
    return np.array([[c == "1" for c in r] for r in rows], dtype=bool)


def _gt_grid(n: int, t: int) -> np.ndarray:
    """Distinct, exactly representable GT points, (N, T, 2) float64, well inside 256x256."""
    x = 20.0 + 10.0 * np.arange(t)[None, :] + 0.5 * np.arange(n)[:, None]
    y = 30.0 + 5.0 * np.arange(n)[:, None] + 0.25 * np.arange(t)[None, :]
    return np.stack([x, y], axis=-1)


# --------------------------------------------------------------------------- masks / queries


def test_query_frames_first_with_never_visible_track():
    vis = _vis(["0110", "0000", "1000", "0001"])
    q = query_frames_first(vis)
    assert q.shape == (4,)
    assert np.issubdtype(q.dtype, np.integer)
    assert q.tolist() == [1, -1, 0, 3]


def test_evaluation_mask_first_vs_strided():
    q = B([1, -1, 0, 3])
    first = evaluation_mask(q, 4, "first")
    strided = evaluation_mask(q, 4, "strided")
    assert first.dtype == bool and first.shape == (4, 4)
    assert first.tolist() == _vis(["0011", "0000", "0111", "0000"]).tolist()
    assert strided.tolist() == _vis(["1011", "0000", "0111", "1110"]).tolist()


def test_evaluation_mask_bad_mode_names_valid_modes():
    with pytest.raises(ValueError, match="first.*strided"):
        evaluation_mask(B([0]), 3, "all")


def test_first_vs_strided_metrics_differ_by_hand():
    # One track visible everywhere, query frame 2 of 4. Prediction is correct at frames 2, 3
    # and 100 px off at frames 0, 1.
    gt = _gt_grid(1, 4)
    pred = gt.copy()
    pred[0, :2, 0] += 100.0
    vis = np.ones((1, 4), dtype=bool)
    q = B([2])
    first = tapvid_metrics(pred, vis, gt, vis, q, mode="first")
    strided = tapvid_metrics(pred, vis, gt, vis, q, mode="strided")
    # first: only frame 3 evaluated -> 1/1 within; strided: frames 0, 1, 3 -> 1/3 within.
    assert first["num_eval_points"] == 1.0
    assert strided["num_eval_points"] == 3.0
    for d in DELTAS:
        assert first[f"within_{d}"] == 1.0
        assert first[f"jaccard_{d}"] == 1.0
        assert strided[f"within_{d}"] == pytest.approx(1 / 3, rel=1e-15)
        # TP = 1, FP = 2 (frames 0, 1 predicted visible but far): 1 / (3 + 2)
        assert strided[f"jaccard_{d}"] == pytest.approx(1 / 5, rel=1e-15)


# --------------------------------------------------------------------------- tapvid_metrics


def test_perfect_tracks():
    gt_vis = _vis(["111011", "011111", "001101", "000000"])
    gt = _gt_grid(4, 6)
    q = query_frames_first(gt_vis)
    m = tapvid_metrics(gt.copy(), gt_vis.copy(), gt, gt_vis, q)
    # Evaluated visible points (after the first visible frame): 4 + 4 + 2 + 0 = 10.
    assert m["num_eval_points"] == 10.0
    assert m["occlusion_accuracy"] == 1.0
    for d in DELTAS:
        assert m[f"within_{d}"] == 1.0
        assert m[f"jaccard_{d}"] == 1.0
    assert m["delta_avg"] == 1.0
    assert m["average_jaccard"] == 1.0


def test_all_predictions_far_away():
    gt_vis = _vis(["1111", "0111"])
    gt = _gt_grid(2, 4)
    pred = gt + np.array([100.0, -50.0])  # d ~ 111.8 > 16 everywhere
    q = query_frames_first(gt_vis)
    m = tapvid_metrics(pred, gt_vis, gt, gt_vis, q)
    assert m["occlusion_accuracy"] == 1.0  # visibility is still right
    for d in DELTAS:
        assert m[f"within_{d}"] == 0.0
        assert m[f"jaccard_{d}"] == 0.0
    assert m["delta_avg"] == 0.0
    assert m["average_jaccard"] == 0.0
    assert m["num_eval_points"] == 5.0


def test_occluded_frames_predicted_visible_are_false_positives():
    gt_vis = _vis(["11001"])
    gt = _gt_grid(1, 5)
    q = B([0])
    honest = tapvid_metrics(gt, gt_vis, gt, gt_vis, q)
    assert honest["occlusion_accuracy"] == 1.0
    assert honest["average_jaccard"] == 1.0

    # Same positions, but the prediction claims visible at the two GT-occluded frames (2, 3).
    # Evaluated frames 1..4: OA = 2/4 (drop of exactly 0.5); within unaffected = 2/2;
    # TP = 2 (frames 1, 4), FP = 2 (frames 2, 3) -> jaccard = 2 / (2 + 2) = 0.5.
    all_vis = np.ones((1, 5), dtype=bool)
    m = tapvid_metrics(gt, all_vis, gt, gt_vis, q)
    assert m["occlusion_accuracy"] == 0.5
    assert honest["occlusion_accuracy"] - m["occlusion_accuracy"] == 0.5
    for d in DELTAS:
        assert m[f"within_{d}"] == 1.0
        assert m[f"jaccard_{d}"] == 0.5
    assert m["average_jaccard"] == 0.5
    assert m["num_eval_points"] == 2.0


def test_distance_exactly_at_threshold_is_not_within():
    # One track, 3 frames, visible throughout, query frame 0: frames 1 and 2 evaluated.
    gt = B([[[12.75, 40.5], [12.75, 40.5], [100.25, 7.125]]])
    pred = B([[[12.75, 40.5], [16.75, 40.5], [100.25, 15.125]]])  # d = 4 exactly, d = 8 exactly
    vis = np.ones((1, 3), dtype=bool)
    m = tapvid_metrics(pred, vis, gt, vis, B([0]))
    assert m["within_1"] == 0.0
    assert m["within_2"] == 0.0
    assert m["within_4"] == 0.0  # d == 4 is not < 4, d == 8 is not < 4
    assert m["within_8"] == 0.5  # d == 4 < 8, d == 8 is not < 8
    assert m["within_16"] == 1.0
    # Both predicted visible: delta 4 -> TP 0, FP 2 -> 0/4; delta 8 -> TP 1, FP 1 -> 1/3;
    # delta 16 -> TP 2, FP 0 -> 2/2.
    assert m["jaccard_4"] == 0.0
    assert m["jaccard_8"] == pytest.approx(1 / 3, rel=1e-15)
    assert m["jaccard_16"] == 1.0


def test_hand_worked_two_tracks_four_frames():
    gt = _gt_grid(2, 4)
    gt_vis = _vis(["1110", "0111"])
    pred_vis = _vis(["1111", "1101"])
    pred = gt.copy()
    # Track 0 (query 0, evaluated frames 1, 2, 3):
    #   f1: GT visible, pred visible, d = 0.5
    #   f2: GT visible, pred visible, d = 3
    #   f3: GT occluded, pred visible (-> FP for every delta, OA miss)
    pred[0, 1] += (0.5, 0.0)
    pred[0, 2] += (0.0, -3.0)
    pred[0, 3] += (200.0, 0.0)  # position irrelevant: GT occluded
    # Track 1 (query 1, evaluated frames 2, 3; frame 0 and query frame 1 not evaluated):
    #   f0: not evaluated (pred visible, GT occluded: would be FP if it were)
    #   f1: query frame, prediction far away: not evaluated
    #   f2: GT visible, pred occluded (OA miss), d = 5 (3-4-5)
    #   f3: GT visible, pred visible, d = 10 (6-8-10)
    pred[1, 1] += (90.0, 0.0)
    pred[1, 2] += (3.0, 4.0)
    pred[1, 3] += (-6.0, 8.0)
    q = query_frames_first(gt_vis)
    assert q.tolist() == [0, 1]

    m = tapvid_metrics(pred, pred_vis, gt, gt_vis, q)

    # Evaluated: 5 frames (t0: f1 f2 f3, t1: f2 f3); visible among them: 4 (d = .5, 3, 5, 10).
    assert m["num_eval_points"] == 4.0
    # OA: correct at t0f1, t0f2, t1f3; wrong at t0f3, t1f2 -> 3/5.
    assert m["occlusion_accuracy"] == 3 / 5
    # within: d < 1: {.5}; < 2: {.5}; < 4: {.5, 3}; < 8: {.5, 3, 5}; < 16: all four.
    assert m["within_1"] == 1 / 4
    assert m["within_2"] == 1 / 4
    assert m["within_4"] == 2 / 4
    assert m["within_8"] == 3 / 4
    assert m["within_16"] == 4 / 4
    assert m["delta_avg"] == pytest.approx((0.25 + 0.25 + 0.5 + 0.75 + 1.0) / 5, rel=1e-15)
    # Jaccard = TP / (4 + FP). Predicted-visible evaluated: t0f1 (.5), t0f2 (3), t0f3 (GT
    # occluded), t1f3 (10). t1f2 (d = 5) is predicted occluded: never TP, never FP.
    #   delta 1:  TP 1 (t0f1);        FP 3 (t0f3, t0f2, t1f3) -> 1/7
    #   delta 2:  TP 1 (t0f1);        FP 3 (t0f3, t0f2, t1f3) -> 1/7
    #   delta 4:  TP 2 (t0f1, t0f2);  FP 2 (t0f3, t1f3)       -> 2/6
    #   delta 8:  TP 2 (t0f1, t0f2);  FP 2 (t0f3, t1f3)       -> 2/6
    #   delta 16: TP 3 (+t1f3);       FP 1 (t0f3)             -> 3/5
    assert m["jaccard_1"] == 1 / 7
    assert m["jaccard_2"] == 1 / 7
    assert m["jaccard_4"] == 2 / 6
    assert m["jaccard_8"] == 2 / 6
    assert m["jaccard_16"] == 3 / 5
    expected_aj = (1 / 7 + 1 / 7 + 1 / 3 + 1 / 3 + 3 / 5) / 5
    assert m["average_jaccard"] == pytest.approx(expected_aj, rel=1e-15)


def test_no_evaluable_points_gives_nan():
    gt_vis = _vis(["0000", "1000"])  # track 0 never visible; track 1 visible only at query
    gt = _gt_grid(2, 4)
    pred_vis = np.zeros((2, 4), dtype=bool)
    m = tapvid_metrics(gt, pred_vis, gt, gt_vis, query_frames_first(gt_vis))
    assert m["num_eval_points"] == 0.0
    assert m["occlusion_accuracy"] == 1.0  # 3 evaluated frames of track 1, all occluded & right
    assert math.isnan(m["within_4"]) and math.isnan(m["delta_avg"])
    assert math.isnan(m["jaccard_4"]) and math.isnan(m["average_jaccard"])


def test_shape_mismatch_raises():
    gt = _gt_grid(2, 4)
    vis = np.ones((2, 4), dtype=bool)
    q = B([0, 0])
    with pytest.raises(ValueError, match="pred_tracks"):
        tapvid_metrics(_gt_grid(2, 5), vis, gt, vis, q)
    with pytest.raises(ValueError, match="pred_visible"):
        tapvid_metrics(gt, np.ones((2, 3), dtype=bool), gt, vis, q)
    with pytest.raises(ValueError, match="gt_visible"):
        tapvid_metrics(gt, vis, gt, np.ones((4, 2), dtype=bool), q)
    with pytest.raises(ValueError, match="query_frames"):
        tapvid_metrics(gt, vis, gt, vis, B([0, 0, 0]))
    with pytest.raises(ValueError, match="gt_tracks"):
        tapvid_metrics(gt[..., :1], vis, gt[..., :1], vis, q)
    with pytest.raises(ValueError, match="query_frames"):
        tapvid_metrics(gt, vis, gt, vis, B([0, 4]))  # out of range for T = 4
    with pytest.raises(ValueError, match="pred_visible"):
        tapvid_metrics(gt, vis.astype(np.float32) * 0.7, gt, vis, q)  # probabilities


# --------------------------------------------------------------------------- rescaling


def test_rescale_points():
    pts = B([[0.0, 0.0], [0.5, 0.5], [1024.0, 512.0], [100.0, 40.0]])
    out = rescale_points(pts, from_hw=(512, 1024), to_hw=(256, 256))  # x * 1/4, y * 1/2
    assert out.tolist() == [[0.0, 0.0], [0.125, 0.25], [256.0, 256.0], [25.0, 20.0]]
    tracks = np.zeros((3, 5, 2), dtype=np.float32) + np.float32(8.0)
    out3 = rescale_points(tracks, (128, 64), (256, 256))  # x * 4, y * 2
    assert out3.shape == (3, 5, 2) and out3.dtype == np.float32
    assert (out3[..., 0] == 32.0).all() and (out3[..., 1] == 16.0).all()
    with pytest.raises(ValueError):
        rescale_points(np.zeros((4, 3)), (256, 256), (256, 256))


def test_evaluate_tracks_rescales_pred_and_gt():
    # Video 512 high x 1024 wide -> 256x256: x shrinks by 4, y by 2.
    gt = _gt_grid(1, 3) * np.array([4.0, 2.0])
    pred = gt.copy()
    pred[0, 1, 0] += 8.0  # 8 video px in x -> 2 eval px: not < 2, but < 4
    pred[0, 2, 1] += 2.0  # 2 video px in y -> 1 eval px: not < 1, but < 2
    vis = _vis(["111"])
    m = evaluate_tracks(pred, vis, gt, vis, video_hw=(512, 1024))  # query frames derived: [0]
    assert m["num_eval_points"] == 2.0
    assert m["within_1"] == 0.0
    assert m["within_2"] == 0.5
    assert m["within_4"] == 1.0


# --------------------------------------------------------------------------- aggregation


def _metrics_all(value: float, n: float) -> dict[str, float]:
    keys = ["occlusion_accuracy", "delta_avg", "average_jaccard"]
    keys += [f"within_{d}" for d in DELTAS] + [f"jaccard_{d}" for d in DELTAS]
    out = dict.fromkeys(keys, value)
    out["num_eval_points"] = n
    return out


def test_evaluate_videos_nanmean_in_percent():
    a = _metrics_all(0.5, 10.0)
    b = _metrics_all(1.0, 0.0)
    b["within_1"] = float("nan")
    c = _metrics_all(0.25, 2.0)
    c["within_1"] = float("nan")
    res = evaluate_videos([a, b, c])
    assert res["num_videos"] == 3.0
    assert res["num_eval_points"] == 12.0
    assert res["within_1"] == 50.0  # only video a counts
    assert res["occlusion_accuracy"] == pytest.approx(100 * (0.5 + 1.0 + 0.25) / 3, rel=1e-15)
    assert res["jaccard_16"] == pytest.approx(175 / 3, rel=1e-15)
    all_nan = _metrics_all(float("nan"), 0.0)
    assert math.isnan(evaluate_videos([all_nan, all_nan])["average_jaccard"])
    with pytest.raises(ValueError):
        evaluate_videos([])
