"""Calibration of LK and the track QC against the exact ground truth of procedural videos."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from datagen.calibrate import calibrate, format_report
from datagen.sources.synthetic import SyntheticConfig
from datagen.track.qc import QCConfig

NUM_VIDEOS = 4  # ~2 s with LK on 2 cores


@pytest.fixture(scope="module")
def lk_report():
    return calibrate("lk", num_videos=NUM_VIDEOS, seed=0)


def test_report_is_json_and_complete(lk_report):
    r = lk_report
    text = json.dumps(r, allow_nan=False)  # strict JSON: no NaN
    assert json.loads(text) == r
    assert r["tracker"] == "lk" and r["settings"]["win_size"] == 15  # full default settings
    assert r["videos"] == NUM_VIDEOS and r["seeds"] == list(range(NUM_VIDEOS))
    assert r["qc"] == QCConfig().to_dict()
    assert len(r["per_video"]) == NUM_VIDEOS
    for v in r["per_video"]:
        assert v["verdict"] in ("accepted", "rejected")
        assert v["num_kept"] <= v["num_tracks"]
        assert set(v["seconds"]) == {"render", "track", "qc"}
        assert all(s >= 0 for s in v["seconds"].values())
    total = sum(v["num_tracks"] for v in r["per_video"])
    kept = sum(v["num_kept"] for v in r["per_video"])
    assert r["kept_fraction"] == pytest.approx(kept / total)
    assert r["all"]["num_videos"] == NUM_VIDEOS


def test_default_synthetic_set_is_the_hard_one(lk_report):
    # the calibration runs on the synthetic module's defaults, not on an easier variant
    syn = lk_report["synthetic"]
    assert syn == json.loads(json.dumps(asdict(SyntheticConfig())))
    assert syn["num_frames"] >= 24
    assert syn["num_sprites"] >= 1 and min(syn["rotation_range_deg"]) > 0
    assert min(syn["scale_rate_range"]) > 0 and syn["max_speed"] > 0


def test_lk_metrics_and_qc_gain(lk_report):
    r = lk_report
    for part in ("all", "kept"):
        for key in ("delta_avg", "average_jaccard", "occlusion_accuracy"):
            assert r[part][key] is not None and math.isfinite(r[part][key]), (part, key)
            assert 0.0 <= r[part][key] <= 100.0
    # QC keeps a usable share and the kept pseudo-labels are much better than all of them
    assert 0.3 <= r["kept_fraction"] <= 0.9
    assert r["kept"]["delta_avg"] >= 70.0, r["kept"]["delta_avg"]
    assert r["kept"]["delta_avg"] >= r["all"]["delta_avg"] + 15.0
    assert r["kept"]["average_jaccard"] > r["all"]["average_jaccard"]
    assert r["kept"]["occlusion_accuracy"] > r["all"]["occlusion_accuracy"]
    # regression floor for all tracks, measured 46.1 on seeds 0..3 (plain LK drops lost points;
    # lk_recover below follows them)
    assert r["all"]["delta_avg"] >= 40.0, r["all"]["delta_avg"]


def test_lk_recover_reaches_70_on_all_tracks_and_qc_still_helps():
    """The issue's bar: LK (following and re-acquiring lost points) reaches delta_avg >= 70
    over ALL tracks of the default synthetic set; QC-kept tracks score higher still.
    Measured on seeds 0..3: 73.7 all / 86.5 kept (AJ 56.1 / 75.1, OA 74.5 / 93.5)."""
    r = calibrate("lk_recover", num_videos=NUM_VIDEOS, seed=0)
    assert r["tracker"] == "lk_recover" and r["settings"]["recover"] is True
    assert r["all"]["delta_avg"] >= 70.0, r["all"]
    assert r["kept"]["delta_avg"] > r["all"]["delta_avg"] + 5.0
    assert r["kept"]["average_jaccard"] > r["all"]["average_jaccard"]
    assert r["kept"]["occlusion_accuracy"] > r["all"]["occlusion_accuracy"]


def test_format_report(lk_report):
    text = format_report(lk_report)
    lines = text.splitlines()
    assert lines[0].startswith("tracker lk")
    for label in ("delta_avg", "AJ", "OA", "within_1", "within_16"):
        row = next(line for line in lines if line.startswith(label + " "))
        all_v, kept_v = (float(x) for x in row.split()[1:3])
        key = {"AJ": "average_jaccard", "OA": "occlusion_accuracy"}.get(label, label)
        assert all_v == pytest.approx(lk_report["all"][key], abs=0.05)
        assert kept_v == pytest.approx(lk_report["kept"][key], abs=0.05)


def test_nothing_kept_gives_none_metrics():
    tiny = SyntheticConfig(num_frames=6, height=48, width=64, num_sprites=1, background_points=16)
    qc = QCConfig(min_motion=1e6)  # no track moves that much: nothing is kept
    r = calibrate("lk", num_videos=1, synthetic=tiny, qc=qc, seed=5, mode="strided")
    json.dumps(r, allow_nan=False)
    assert r["kept_fraction"] == 0.0 and r["accepted_videos"] == 0
    assert r["kept"]["delta_avg"] is None
    assert r["all"]["delta_avg"] is not None
    assert r["per_video"][0]["verdict"] == "rejected"
    assert "n/a" in format_report(r)


def test_argument_validation():
    with pytest.raises(ValueError):
        calibrate("lk", num_videos=0)
    with pytest.raises(ValueError):
        calibrate("lk", num_videos=1, mode="middle")
    with pytest.raises(ValueError):
        calibrate("no-such-tracker", num_videos=1)
    with pytest.raises(ValueError):
        calibrate("lk", {"no_such_setting": 1}, num_videos=1)
