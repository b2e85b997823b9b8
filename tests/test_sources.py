"""`--source synthetic`: procedural videos with exact labels, in the dataset format."""

import numpy as np

from datagen import open_dataset
from datagen.build import prepare_build, run_build
from datagen.presets import resolve_config
from datagen.sources.procedural import synthetic_config
from datagen.sources.synthetic import render_synthetic_video
from datagen.validate import validate_dataset


def test_synthetic_build_stores_exact_ground_truth(tmp_path, run_cli):
    cfg = resolve_config(
        "tiny-random",
        None,
        [
            "source.kind=synthetic",
            'source.synthetic={"num_frames": 12}',
            "capture.corr_layers=[]",
            "capture.feature_layers=[]",
        ],
    )
    summary = run_build(prepare_build(cfg, None, tmp_path / "syn", limit=3), progress=False)
    assert summary.samples == 3 and summary.rejected == 0
    problems, checked = validate_dataset(tmp_path / "syn")
    assert problems == [] and checked == 3
    scene = synthetic_config({"num_frames": 12})
    for s in open_dataset(tmp_path / "syn"):
        truth = render_synthetic_video(scene, seed=s["meta"]["seed"])
        np.testing.assert_array_equal(s["tracks"], truth.tracks)
        np.testing.assert_array_equal(s["visible"], truth.visible)
        np.testing.assert_array_equal(s["queries"], truth.queries)
        assert s["frames"].shape == truth.frames.shape
        # Lossy storage, but close to the rendered frames.
        assert np.abs(s["frames"].astype(int) - truth.frames).mean() < 6
        assert s["meta"]["tracker"]["name"] == "ground-truth"
        assert s["meta"]["source"]["kind"] == "synthetic"
        assert np.isnan(s["confidence"]).all()


def test_synthetic_source_bad_settings_and_prompts(run_cli, tmp_path):
    code, _, err = run_cli(
        "build",
        "--source",
        "synthetic",
        "--out",
        tmp_path / "o",
        "--set",
        'source.synthetic={"sprites_count": 3}',
    )
    assert code == 2 and "source.synthetic: unknown field(s) sprites_count" in err
    code, _, err = run_cli(
        "build", "--source", "synthetic", "--out", tmp_path / "o", "--prompts", tmp_path
    )
    assert code == 2 and "takes no --prompts" in err
    code, _, err = run_cli("build", "--out", tmp_path / "o")
    assert code == 2 and "--prompts is required" in err
    assert not (tmp_path / "o").exists()
