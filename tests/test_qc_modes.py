"""What happens to samples quality control rejects (qc.rejected = drop | keep | separate), how a
build reports the verdicts, and the warning when most samples fail.

The videos are made so the verdicts are known in advance: procedural videos of the tiny
model's training distribution (trackable: QC accepts them) and uniform noise (every point is
lost at once: QC must reject them), labelled through ``--source videos`` with the tiny preset's
tracker and QC (no model runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import datagen
from datagen.config import VideoConfig
from datagen.models import tiny_dit
from datagen.sampleformat import read_tar
from datagen.sources.synthetic import render_synthetic_video
from datagen.video import encode_video

# Held-out seeds whose labels QC keeps well above its threshold (kept fraction 0.45-0.53), so
# their verdict does not hang on the last bit of a float.
GOOD_SEEDS = tuple(tiny_dit.EVAL_SEED_BASE + i for i in (9, 11, 13))
NOISE = ("noise0", "noise1")


def _write(folder: Path, noise: tuple[str, ...], good: tuple[int, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in noise:
        frames = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        (folder / f"{name}.mp4").write_bytes(encode_video(frames, 8, VideoConfig()))
    for s in good:
        frames = render_synthetic_video(tiny_dit.TRAIN_VIDEO, s).frames
        (folder / f"good{s}.mp4").write_bytes(encode_video(frames, 8, VideoConfig()))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qcvideos")
    _write(folder, NOISE, GOOD_SEEDS)
    return folder


def _build(run_cli, videos: Path, out: Path, mode: str, *extra: str):
    return run_cli(
        "build", "--source", "videos", str(videos), "--out", str(out), "--quiet",
        "--set", "capture.corr_layers=[]", "--set", "capture.feature_layers=[]",
        "--set", f"qc.rejected={mode}", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def verdicts(videos, tmp_path_factory) -> dict[str, str]:
    """Each sample's verdict, read from KEY.json of a keep build (the reference)."""
    from datagen.cli import main

    out = tmp_path_factory.mktemp("keep") / "d"
    argv = ["build", "--source", "videos", str(videos), "--out", str(out), "--quiet",
            "--set", "capture.corr_layers=[]", "--set", "capture.feature_layers=[]",
            "--set", "qc.rejected=keep"]  # fmt: skip
    assert main(argv) == 0
    found = {}
    for key, members in read_tar(out / "core-000000.tar"):
        found[key] = json.loads(members["json"])["qc"]["verdict"]
    return found


def test_reference_verdicts_are_the_expected_ones(verdicts):
    # Noise loses every point at once; the procedural videos are what the tracker handles.
    assert {k: v for k, v in verdicts.items() if k.startswith("noise")} == {
        f"{n}-r00": "rejected" for n in NOISE
    }
    good = [v for k, v in verdicts.items() if k.startswith("good")]
    assert len(good) == len(GOOD_SEEDS) and good.count("accepted") >= 2


@pytest.mark.parametrize("mode", ["drop", "keep", "separate"])
def test_rejected_modes_counts_manifest_validate_and_resume(
    mode, videos, verdicts, tmp_path, run_cli
):
    out = tmp_path / "d"
    code, stdout, stderr = _build(run_cli, videos, out, mode)
    assert code == 0, stderr
    accepted = sorted(k for k, v in verdicts.items() if v == "accepted")
    rejected = sorted(k for k, v in verdicts.items() if v == "rejected")
    m = json.loads((out / "manifest.json").read_text())
    assert m["qc"]["mode"] == mode
    assert (m["qc"]["accepted"], m["qc"]["rejected"]) == (len(accepted), len(rejected))
    assert m["qc"]["checked"] == len(verdicts)
    assert sum(c["samples"] for c in m["qc"]["top_causes"]) == len(rejected)
    core_keys = sorted(k for k, _ in read_tar(out / "core-000000.tar"))
    listed = sorted(r["key"] for r in m["rejected"] if r["stage"] == "qc")
    if mode == "keep":
        assert core_keys == sorted(verdicts)
        assert listed == []
    else:
        assert core_keys == accepted
        assert listed == rejected
        for r in m["rejected"]:
            assert r["reason"].startswith("kept ")  # the verdict's first sentence
    assert m["totals"]["samples"] == len(core_keys)
    assert m["totals"]["failed"] == 0
    separated = out / "rejected-000000.tar"
    assert separated.exists() == (mode == "separate")
    if mode == "separate":
        assert sorted(k for k, _ in read_tar(separated)) == rejected
        ds = datagen.open_dataset(out, split="rejected", video=False)
        assert sorted(s["meta"]["key"] for s in ds) == rejected
        assert all(s["meta"]["qc"]["verdict"] == "rejected" for s in ds)
    # The summary says what QC did, with the counts of the manifest.
    assert f"{len(rejected)} rejected" in stdout
    assert f"{len(accepted)} accepted" in stdout
    assert f"done: {len(core_keys)} samples written" in stdout
    # Loaders see exactly the core samples.
    ds = datagen.open_dataset(out, video=False)
    assert len(ds) == len(core_keys)
    assert sorted(s["meta"]["key"] for s in ds) == core_keys
    # validate passes; a resume keeps the committed shard, bytes unchanged.
    assert run_cli("validate", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    code, stdout, _ = _build(run_cli, videos, out, mode)
    assert code == 0 and "(1 kept from an earlier run)" in stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_validate_catches_a_rejected_sample_in_core_and_a_lost_separated_one(
    videos, verdicts, tmp_path, run_cli
):
    keep = tmp_path / "keep"
    assert _build(run_cli, videos, keep, "keep")[0] == 0
    # A keep build's core shards, relabelled as a drop build's: the rejected samples are in
    # the wrong place.
    m = json.loads((keep / "manifest.json").read_text())
    m["qc"]["mode"] = "drop"
    (keep / "manifest.json").write_text(json.dumps(m))
    code, out, _ = run_cli("validate", str(keep))
    assert code == 1
    assert "noise0-r00: QC verdict rejected, in a core shard of a qc.rejected=drop build" in out
    sep = tmp_path / "sep"
    assert _build(run_cli, videos, sep, "separate")[0] == 0
    m = json.loads((sep / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["kind"] != "rejected"]
    (sep / "manifest.json").write_text(json.dumps(m))
    code, out, _ = run_cli("validate", str(sep))
    assert code == 1
    assert "rejected-000000.tar: shard file not listed in manifest.json" in out
    assert "noise1-r00 is listed as QC-rejected but in no rejected shard" in out


def test_warning_when_most_samples_fail_qc(tmp_path, run_cli):
    mostly_noise = tmp_path / "mostly_noise"
    _write(mostly_noise, ("n0", "n1", "n2"), GOOD_SEEDS[:1])
    code, stdout, stderr = _build(run_cli, mostly_noise, tmp_path / "a", "drop")
    assert code == 0
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("warning: quality control rejected 3 of 4 samples (75%)")
    assert "top reason: " in lines[-1] and "to change: " in lines[-1]
    log = (tmp_path / "a" / "build.log").read_text()
    assert "quality control rejected 3 of 4 samples" in log
    # Half or fewer rejected: no warning.
    mostly_good = tmp_path / "mostly_good"
    _write(mostly_good, ("n0",), GOOD_SEEDS)
    code, stdout, stderr = _build(run_cli, mostly_good, tmp_path / "b", "drop")
    assert code == 0 and "warning" not in stderr


def test_qc_rejected_mode_is_checked(run_cli, tmp_path):
    code, _, err = run_cli(
        "build", "--prompts", "prompts", "--out", str(tmp_path / "x"), "--set", "qc.rejected=bin"
    )
    assert code == 2
    assert "qc.rejected 'bin' is not one of drop, keep, separate" in err
    assert not (tmp_path / "x").exists()


def test_unknown_split_and_missing_rejected_shards(videos, tmp_path, run_cli):
    out = tmp_path / "d"
    assert _build(run_cli, videos, out, "drop")[0] == 0
    with pytest.raises(datagen.UserError, match="no rejected shards .*qc.rejected=drop"):
        datagen.open_dataset(out, split="rejected")
    with pytest.raises(datagen.UserError, match="split='x'"):
        datagen.open_dataset(out, split="x")
