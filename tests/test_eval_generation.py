"""scripts/eval_generation.py: its measurements on hand-made cases, and a small end-to-end run
(no quality thresholds here: the figures are the README's, measured by the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datagen.models import tiny_dit
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ev():
    return load_script("eval_generation")


def test_pan_words_read_only_the_camera_clause(ev):
    assert ev.pan_words("red ball moves left, camera pans up right") == ["up", "right"]
    assert ev.pan_words("red ball moves left, camera pans slowly") == []
    assert ev.pan_words("a dog runs left") == []


def test_measured_camera_motion_is_minus_the_median_displacement(ev):
    t = 8
    # 5 background points move 1 px/frame left (camera pans right), 2 sprite points move down.
    bg = np.stack([np.stack([10.0 - np.arange(t), np.full(t, 5.0 + i)], -1) for i in range(5)])
    sp = np.stack([np.stack([np.full(t, 3.0), 2.0 * np.arange(t)], -1) for _ in range(2)])
    tracks = np.concatenate([bg, sp]).astype(np.float32)
    visible = np.ones(tracks.shape[:2], bool)
    motion = ev.measured_camera_motion(tracks, visible)
    np.testing.assert_allclose(motion, [7.0, 0.0])
    assert ev.pan_agrees(["right"], motion) and not ev.pan_agrees(["left"], motion)
    assert not ev.pan_agrees(["up", "right"], motion)  # y did not move up
    visible[:, -1] = False
    assert ev.measured_camera_motion(tracks, visible) is None
    assert not ev.pan_agrees(["right"], None)


def test_colours_present_counts_pixels_of_each_named_colour(ev):
    frame = np.full((32, 32, 3), 128, np.uint8)  # gray
    frame[:4, :4] = (220, 30, 30)  # 16 red pixels
    frame[10:12, 10:15] = (30, 60, 220)  # 10 blue pixels: under COLOUR_MIN_PIXELS
    assert ev.COLOUR_MIN_PIXELS == 12
    assert ev.colours_present("red ball moves left, blue box moves up", frame) == (1, 2)
    assert ev.colours_present("gray box, red ball", frame) == (2, 2)
    assert ev.colours_present("a dog", frame) == (0, 0)


def test_small_run_writes_a_consistent_report(ev, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert ev.main(["--bank", "2", "--captions", "2", "--videos", "2", "--timesteps", "100",
                    "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    text = capsys.readouterr().out
    for name, n in (("default bank", 2), ("held-out captions", 2), ("training distribution", 2)):
        r = report[name]
        assert r["samples"] == n
        assert 0 <= r["qc_acceptance"] <= 1 and 0 <= r["visible_fraction"] <= 1
        assert f"| {name} | {n} |" in text
    base = report["training distribution"]
    assert base["visible_ratio"] == pytest.approx(1.0)
    gen = report["held-out captions"]
    assert gen["visible_ratio"] == pytest.approx(gen["visible_fraction"] / base["visible_fraction"])
    # The baseline's own first frames hold the colours its captions name (rendered from them).
    seeds = [tiny_dit.EVAL_SEED_BASE + i for i in range(2)]
    captions = [tiny_dit.caption(tiny_dit.TRAIN_VIDEO, s) for s in seeds]
    named = sum(len({c for c, _ in tiny_dit.named_objects(c)}) for c in captions)
    assert report["prompt following (training distribution)"]["colours_named"] == named
    m = report["matching"]
    acc = m["table"]["accuracy"]
    trained = [v for row, cells in acc.items() if row.startswith("trained") for v in cells.values()]
    assert m["best"]["accuracy"] == max(trained)
    assert acc[m["best"]["row"]][m["best"]["t"]] == m["best"]["accuracy"]
    assert set(m["table"]["accuracy"]) >= {"pixel patches", "no motion"}
    assert report["default bank"]["build_seconds"] > 0
