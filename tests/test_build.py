"""End to end: the tiny pipeline through build, validate, load and inspect."""

import json
import shutil

import numpy as np
import pytest

from datagen import open_dataset
from datagen.build import prepare_build, run_build
from datagen.presets import resolve_config
from datagen.sample import CORE_MEMBERS, CORR_MEMBER, QC_MEMBER
from datagen.sampleformat import read_tar
from datagen.validate import validate_dataset

PROMPTS = "\n".join(
    [
        "a brown dog runs along the beach from left to right",
        "the camera pans slowly right across a brick city street",
        "a red car turns the corner",
        "a white cat jumps onto a wooden table",
        "a small boat glides across a lake",
    ]
)
SETTINGS = ["shards.max_samples=2", "generation.batch_size=2"]


def _build(prompts, out, extra=()):
    cfg = resolve_config("tiny-random", None, SETTINGS + list(extra))
    return run_build(prepare_build(cfg, prompts, out), progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    prompts = root / "bank.txt"
    prompts.write_text(PROMPTS + "\n")
    a = _build(prompts, root / "a")
    b = _build(prompts, root / "b")
    return root, prompts, a, b


def test_same_config_gives_byte_identical_shards(built):
    root, _, a, b = built
    tars_a = sorted(p.name for p in (root / "a").glob("*.tar"))
    assert tars_a == [f"{k}-00000{i}.tar" for k in ("core", "features") for i in range(3)]
    for name in tars_a:
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()
    assert (root / "a" / "manifest.json").read_bytes() == (
        root / "b" / "manifest.json"
    ).read_bytes()


def test_manifest_counts_and_members(built):
    root, _, a, _ = built
    m = json.loads((root / "a" / "manifest.json").read_text())
    assert m["totals"]["samples"] + m["totals"]["rejected"] == 5
    core = [s for s in m["shards"] if s["kind"] == "core"]
    assert m["totals"]["samples"] == a.samples == sum(s["samples"] for s in core)
    assert m["totals"]["bytes"] == sum(s["bytes"] for s in m["shards"])
    assert m["config_fingerprint"] == resolve_config("tiny-random", None, SETTINGS).fingerprint()
    for key, members in read_tar(root / "a" / "core-000000.tar"):
        assert sorted(members) == sorted(CORE_MEMBERS + (CORR_MEMBER, QC_MEMBER))
        assert "." not in key
    # Quality control: every sample has a verdict; the shard stats and manifest count them.
    stats = json.loads((root / "a" / "shard-000000.stats.json").read_text())
    assert stats["qc"]["accepted"] + stats["qc"]["rejected"] == len(stats["keys"])
    assert m["qc"]["accepted"] + m["qc"]["rejected"] == m["totals"]["samples"]


def test_qc_flags_match_a_recomputation(built):
    from datagen.sampleformat import npy_array
    from datagen.track.qc import QCConfig, run_qc
    from datagen.track.registry import make_tracker

    root, *_ = built
    s = next(iter(open_dataset(root / "a")))
    raw = dict(read_tar(root / "a" / "core-000000.tar"))[s["key"]]
    meta = s["meta"]
    tracker = make_tracker(meta["tracker"]["name"], **meta["tracker"]["settings"])
    result = tracker.track(s["frames"], s["queries"])
    qc = run_qc(tracker, s["frames"], result, s["queries"], QCConfig(**meta["qc"]["settings"]))
    bits = meta["qc"]["flag_bits"]
    stored = npy_array(raw[QC_MEMBER])
    for name, bit in bits.items():
        np.testing.assert_array_equal((stored & bit) > 0, qc.flags[name])
    assert meta["qc"]["verdict"] == qc.verdict["verdict"]


def test_validate_passes_on_a_fresh_build(built):
    root, *_ = built
    problems, checked = validate_dataset(root / "a")
    assert problems == [] and checked == 5


def test_loader_yields_frames_of_configured_size_and_labels(built):
    root, *_ = built
    cfg = resolve_config("tiny-random")
    samples = list(open_dataset(root / "a"))
    assert len(samples) == 5
    g = cfg.generation
    n = cfg.tracker.grid_size**2
    for s in samples:
        assert s["frames"].shape == (g.num_frames, g.height, g.width, 3)
        assert s["frames"].dtype == np.uint8
        assert s["tracks"].shape == (n, g.num_frames, 2) and s["tracks"].dtype == np.float32
        assert s["visible"].shape == (n, g.num_frames) and s["visible"].dtype == bool
        assert s["queries"].shape == (n, 3)
        assert s["meta"]["key"] == s["key"]
        assert s["meta"]["video"]["num_frames"] == g.num_frames
        np.testing.assert_array_equal(s["tracks"][:, 0], s["queries"][:, 1:])


def test_labels_are_computed_on_the_decoded_video(built):
    """Re-tracking the stored (decoded) video reproduces the stored tracks exactly."""
    from datagen.track.registry import make_tracker

    root, *_ = built
    s = next(iter(open_dataset(root / "a")))
    meta = s["meta"]
    tracker = make_tracker(meta["tracker"]["name"], **meta["tracker"]["settings"])
    again = tracker.track(s["frames"], s["queries"])
    np.testing.assert_array_equal(again.tracks, s["tracks"])
    np.testing.assert_array_equal(again.visible, s["visible"])


def test_rerun_resumes_and_rebuilds_only_damaged_shards(built, tmp_path):
    root, prompts, *_ = built
    out = tmp_path / "c"
    shutil.copytree(root / "a", out)
    again = _build(prompts, out)
    assert (again.shards_kept, again.shards_built) == (3, 0)
    # A flipped byte breaks the checksum: that shard alone is rebuilt, identically.
    tar = out / "core-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[1000] ^= 0xFF
    tar.write_bytes(bytes(raw))
    (out / "core-000002.tar").unlink()
    fixed = _build(prompts, out)
    assert (fixed.shards_kept, fixed.shards_built) == (1, 2)
    for name in ("core-000001.tar", "core-000002.tar"):
        assert (out / name).read_bytes() == (root / "a" / name).read_bytes()


def test_validate_names_corrupt_shard_and_bad_sample(built, tmp_path):
    root, *_ = built
    out = tmp_path / "d"
    shutil.copytree(root / "a", out)
    tar = out / "core-000000.tar"
    raw = bytearray(tar.read_bytes())
    raw[-2000] ^= 0x01
    tar.write_bytes(bytes(raw))
    problems, _ = validate_dataset(out)
    assert any(p.startswith("core-000000.tar: sha256 differs") for p in problems)
    (out / "core-000001.tar").unlink()
    problems, _ = validate_dataset(out)
    assert "core-000001.tar: listed in manifest.json but missing" in problems
    # Features whose core sample is gone are named too.
    assert any(
        p.startswith("features-000001.tar: ") and "no valid core sample" in p for p in problems
    )


def test_different_config_into_same_folder_is_refused(built, tmp_path):
    from datagen.errors import UserError

    root, prompts, *_ = built
    out = tmp_path / "e"
    shutil.copytree(root / "a", out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="config fingerprint"):
        _build(prompts, out, ["generation.seed=1"])
    assert sorted(p.name for p in out.iterdir()) == before


def test_build_stopped_before_its_first_commit_resumes(built, tmp_path):
    root, prompts, *_ = built
    out = tmp_path / "f"
    out.mkdir()
    (out / "build.log").write_text("started\n")
    (out / ".core-000000.tar.partial").write_bytes(b"half a tar")
    again = _build(prompts, out)
    assert again.shards_built == 3
    for name in ("core-000000.tar", "features-000002.tar"):
        assert (out / name).read_bytes() == (root / "a" / name).read_bytes()
