"""CLI behaviour a new user meets: bad input gets one line, exit 2 and nothing written."""

import os

import pytest

from tests.conftest import ROOT


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


@pytest.fixture
def bank(tmp_path):
    f = tmp_path / "bank.txt"
    f.write_text("a dog runs left\na car drives right\n")
    return f


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["build", "--prompts", "{tmp}/missing", "--out", "{tmp}/out"],
            "prompt path {tmp}/missing does not exist (--prompts)",
        ),
        (
            ["build", "--prompts", "{bank}", "--out", "{tmp}/out", "--preset", "huge"],
            "unknown preset 'huge'; choose one of: cogvideox-2b, cogvideox-5b, cogvideox-5b-i2v, "
            "cogvideox1.5-5b, hunyuanvideo, tiny, tiny-random, tiny-random-hunyuan, "
            "tiny-random-wan, wan2.1-t2v-1.3b, wan2.1-t2v-14b (--preset)",
        ),
        (
            ["build", "--prompts", "{bank}", "--out", "{bank}/sub"],
            "output {bank}/sub cannot be created: {bank} is not a folder (--out)",
        ),
        (
            [
                "build",
                "--prompts",
                "{bank}",
                "--out",
                "{tmp}/out",
                "--preset",
                "tiny-random",
                "--set",
                "generation.num_frames=10",
            ],
            "generation.num_frames=10: CogVideoX needs 4k+1 frames (e.g. 9, 17, 49)",
        ),
        (
            ["build", "--prompts", "{bank}", "--out", "{tmp}/out", "--set", "generation.height=30"],
            "generation.height=30: CogVideoX needs a multiple of 4 (VAE 1x times patch 4)",
        ),
        (
            ["build", "--prompts", "{bank}", "--out", "{tmp}/out", "--set", "tracker.name=magic"],
            "tracker: unknown tracker 'magic'",
        ),
        (
            ["build", "--prompts", "{bank}", "--out", "{tmp}/out", "--limit", "0"],
            "--limit must be positive, got 0",
        ),
        (["build", "--prompts", "{bank}"], "the following arguments are required: --out"),
        (["validate", "{tmp}/nothing"], "{tmp}/nothing is not a folder"),
        (
            [
                "build",
                "--prompts",
                "{bank}",
                "--out",
                "{tmp}/out",
                "--set",
                "generation.guidance_scale=nan",
            ],
            "--set: generation.guidance_scale: expected a finite number, got 'nan'",
        ),
        (
            [
                "build",
                "--prompts",
                "{bank}",
                "--out",
                "{tmp}/out",
                "--set",
                'tracker.settings={{"win_size": Infinity}}',
            ],
            "tracker.settings.win_size: NaN and infinities are not allowed",
        ),
        (
            [
                "build",
                "--prompts",
                "{bank}",
                "--out",
                "{tmp}/out",
                "--set",
                "generation.num_frames=100000001",
            ],
            "generation.num_frames=100000001, height=32, width=32: one sample would take about",
        ),
        ([], "the following arguments are required: command (see 'datagen --help')"),
    ],
)
def test_bad_input_prints_one_line_exits_2_writes_nothing(run_cli, tmp_path, bank, argv, message):
    before = _tree(tmp_path)
    subst = {"tmp": str(tmp_path), "bank": str(bank)}
    code, out, err = run_cli(*[a.format(**subst) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("datagen: error: ")
    assert message.format(**subst) in lines[0]
    assert out == ""
    assert _tree(tmp_path) == before


def test_unwritable_output_is_refused(run_cli, tmp_path, bank):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that ignore folder permissions")
        code, _, err = run_cli("build", "--prompts", bank, "--out", locked / "out")
        assert code == 2 and "is not writable" in err
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def test_output_on_read_only_filesystem_is_refused(run_cli, bank):
    # /proc is read-only for everyone (root included), so this runs even as root.
    code, _, err = run_cli("build", "--prompts", bank, "--out", "/proc/datagen-out")
    assert code == 2 and err.count("\n") == 1
    assert "not writable" in err or "cannot be created" in err


def test_non_empty_foreign_folder_is_refused(run_cli, tmp_path, bank):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    code, _, err = run_cli("build", "--prompts", bank, "--out", out)
    assert code == 2 and "not empty and holds no datagen build" in err
    assert _tree(out) == ["holiday.jpg"]


def test_dry_run_prints_plan_and_writes_nothing(run_cli, tmp_path):
    code, out, _ = run_cli(
        "build", "--prompts", ROOT / "prompts", "--out", tmp_path / "o", "--dry-run"
    )
    assert code == 0
    assert (
        "plan: 250 samples from 250 prompts (1 per prompt), preset tiny" in out
        and "dry run: nothing written" in out
    )
    assert not (tmp_path / "o").exists()


def test_build_validate_inspect_round_trip(run_cli, tmp_path, bank):
    out = tmp_path / "ds"
    # Keep QC-rejected samples: this checks the round trip, whatever QC says of 2 videos.
    code, text, _ = run_cli(
        "build", "--prompts", bank, "--out", out, "--quiet", "--set", "qc.rejected=keep"
    )
    assert code == 0 and "done: 2 samples written in 1 shards" in text
    code, text, _ = run_cli("validate", out)
    assert code == 0 and "valid: 2 samples" in text
    png = tmp_path / "s.png"
    code, text, _ = run_cli("inspect", out, "--png", png)
    assert code == 0 and "prompt:" in text and png.stat().st_size > 0
    import cv2

    img = cv2.imread(str(png))
    assert img.shape[0] >= 64 and img.shape[1] >= 4 * 320
    code, _, err = run_cli("inspect", out, "--key", "nope-r00")
    assert code == 2 and "no sample with key 'nope-r00'" in err
    # A broken shard makes validate fail and name it.
    tar = out / "core-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-700])
    code, text, _ = run_cli("validate", out)
    assert code == 1 and "core-000000.tar:" in text


def test_build_larger_than_free_disk_is_refused_with_the_figure(run_cli, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    code, out, err = run_cli("build", "--prompts", ROOT / "prompts", "--out", tmp_path / "o")
    assert code == 2 and out == ""
    assert "the build needs about" in err and "has 1.0 MB free" in err
    assert not (tmp_path / "o").exists()
    # A dry run still prints its estimate, and says the build would stop for lack of space.
    code, out, err = run_cli(
        "build", "--prompts", ROOT / "prompts", "--out", tmp_path / "o", "--dry-run"
    )
    assert code == 0 and "size: about" in out and "has 1.0 MB free" in out
    assert "the build itself would stop here" in out and not (tmp_path / "o").exists()


def test_dry_run_sizes_follow_the_capture_choice(run_cli, tmp_path):
    def sizes(*extra):
        code, out, _ = run_cli(
            "build", "--prompts", ROOT / "prompts", "--out", tmp_path / "o", "--dry-run",
            "--preset", "tiny-random", *extra,
        )  # fmt: skip
        assert code == 0
        line = next(x for x in out.splitlines() if x.startswith("size:"))
        return line

    base = sizes()
    more = sizes(
        "--set", "capture.feature_layers=[0,1]", "--set", "capture.feature_steps=[0,1,2,3]"
    )
    assert "2 layers x 2 steps" in base and "2 layers x 4 steps" in more
    feat = lambda line: float(line.split("+ ")[1].split(" KB")[0])  # noqa: E731
    assert abs(feat(more) - 2 * feat(base)) < 0.2


def test_calibrate_reports_all_and_kept_and_writes_json(run_cli, tmp_path):
    import json

    out = tmp_path / "cal.json"
    code, text, _ = run_cli("calibrate", "--videos", "1", "--seed", "7", "--json", out)
    assert code == 0 and "delta_avg" in text and "kept" in text
    assert "== busy textures ==" in text and "== smooth textures ==" in text
    both = json.loads(out.read_text())["sets"]
    assert both["busy"]["synthetic"]["texture"] == "sinusoid"
    assert both["smooth"]["synthetic"]["texture"] == "smooth"
    assert both["busy"]["all"] != both["smooth"]["all"]
    code, text, _ = run_cli(
        "calibrate", "--videos", "1", "--seed", "7", "--scenes", "busy", "--json", out
    )
    assert code == 0 and "smooth textures" not in text
    report = json.loads(out.read_text())
    assert (report["all"], report["kept"]) == (both["busy"]["all"], both["busy"]["kept"])
    assert report["videos"] == 1 and report["seeds"] == [7]
    assert 0 <= report["all"]["delta_avg"] <= 100 and report["kept"]["delta_avg"] is not None
    code, _, err = run_cli("calibrate", "--set", "tracker.win_size=-3")
    assert code == 2 and err.startswith("datagen: error: --tracker lk_recover:")
    assert report["tracker"] == "lk_recover"  # the default tracker


def test_export_writes_plain_files(run_cli, tmp_path, bank):
    import numpy as np

    from datagen import open_dataset

    out = tmp_path / "ds"
    keep = ("--set", "qc.rejected=keep")
    assert (
        run_cli("build", "--prompts", bank, "--out", out, "--quiet", "--limit", "1", *keep)[0] == 0
    )
    code, text, _ = run_cli("export", out, "--to", tmp_path / "files")
    assert code == 0 and "exported 1 samples" in text
    s = next(iter(open_dataset(out)))
    folder = tmp_path / "files" / s["key"]
    np.testing.assert_array_equal(np.load(folder / "tracks.npy"), s["tracks"])
    assert (folder / "video.mp4").stat().st_size > 0
    code, _, err = run_cli("export", out, "--to", tmp_path / "files")
    assert code == 2 and "is not empty" in err


def test_calibrate_on_a_presets_scenes(run_cli, tmp_path):
    import json

    from datagen.models import tiny_dit

    out = tmp_path / "cal.json"
    code, text, _ = run_cli(
        "calibrate", "--preset", "tiny", "--videos", "2", "--seed", "3", "--json", out
    )
    assert code == 0
    sets = json.loads(out.read_text())["sets"]
    busy, smooth = sets["busy"]["synthetic"], sets["smooth"]["synthetic"]
    assert (busy["num_frames"], busy["height"], busy["width"]) == (8, 32, 32)
    assert busy["integer_motion"] and busy["texture_scale"] == tiny_dit.TRAIN_VIDEO.texture_scale
    assert busy["texture"] == "sinusoid" and smooth["texture"] == "smooth"
    assert {k: v for k, v in smooth.items() if k != "texture"} == {
        k: v for k, v in busy.items() if k != "texture"
    }
    code, _, err = run_cli("calibrate", "--preset", "nope")
    assert code == 2 and "unknown preset 'nope'" in err
