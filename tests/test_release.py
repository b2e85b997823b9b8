"""Releases: `datagen release` writes a carded, checksummed folder in the Hub layout that
`datagen verify` passes, `datasets` loads offline, and in which every tampering is named."""

import json
import os
import shutil
from pathlib import Path

import pytest

PROMPTS = "a red ball rolls left\na dog runs across a field\na car drives right\n"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from datagen.cli import main

    root = tmp_path_factory.mktemp("rel")
    bank = root / "bank.txt"
    bank.write_text(PROMPTS)
    out = root / "ds"
    argv = ["build", "--prompts", str(bank), "--out", str(out), "--preset", "tiny-random"]
    assert main([*argv, "--quiet", "--set", "shards.max_samples=2"]) == 0
    return out, bank


@pytest.fixture(scope="module")
def release(build, tmp_path_factory):
    from datagen.cli import main

    out, bank = build
    rel = tmp_path_factory.mktemp("r") / "rel"
    argv = ["release", str(out), "--name", "tiny-test", "--version", "1.0.0", "--license",
            "cc-by-4.0", "--out", str(rel), "--prompts", str(bank)]  # fmt: skip
    assert main(argv) == 0
    return rel


@pytest.fixture
def copy(release, tmp_path):
    dst = tmp_path / "rel"
    shutil.copytree(release, dst)
    return dst


def test_release_layout_card_and_sums(release, build):
    from datagen.verify import card_front

    names = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    wanted = "README.md SHA256SUMS CHANGELOG.md config.json data/manifest.json prompts/bank.txt"
    wanted += " data/core-000000.tar data/core-000001.tar data/features-000001.tar"
    wanted += " schemas/manifest.schema.json stats/categories.csv data/shard-000001.stats.json"
    wanted += " croissant.json stats/categories.png stats/samples.png"
    for want in wanted.split():
        assert want in names, want
    front = card_front((release / "README.md").read_text())
    assert front["license"] == "cc-by-4.0" and front["datagen"]["samples"] == 3
    assert [c["config_name"] for c in front["configs"]] == ["core", "features"]
    sums = (release / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(names) - 1 and all(len(line.split("  ")[0]) == 64 for line in sums)
    built = json.loads((build[0] / "manifest.json").read_text())
    assert json.loads((release / "config.json").read_text()) == built["config"]


def test_release_verifies_fully_and_quickly(run_cli, release):
    for extra in ([], ["--quick"]):
        code, text, err = run_cli("verify", release, *extra)
        assert code == 0, text + err
        assert "verified release" in text


def test_quick_verify_reads_each_file_of_a_release_once(release, monkeypatch):
    import datagen.verify as verify_mod

    read = []
    real = verify_mod.sha256_file
    monkeypatch.setattr(verify_mod, "sha256_file", lambda p: read.append(Path(p)) or real(p))
    problems, kind = verify_mod.verify(release, quick=True)
    assert problems == [] and kind == "release"
    files = sorted(p for p in release.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert sorted(read) == files  # shards included, none twice


# datasets 5.2 caches a local folder by its name and config, not its content (two releases in
# folders of the same name share a cache entry), so every load here gets its own cache_dir.


def test_datasets_loads_both_configs_offline_with_every_key_once(release, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = str(tmp_path / "hf")
    core = datasets.load_dataset(str(release), "core", split="train", cache_dir=hf)
    keys = core["__key__"]
    assert len(keys) == 3 and len(set(keys)) == 3
    feats = datasets.load_dataset(str(release), "features", split="train", cache_dir=hf)
    assert sorted(feats["__key__"]) == sorted(keys)


def _other_features(tmp_path, bank):
    """A features shard of another build (another seed): same name and keys, other bytes."""
    from datagen.cli import main

    out = tmp_path / "other"
    argv = ["build", "--prompts", str(bank), "--out", str(out), "--preset", "tiny-random"]
    assert main([*argv, "--quiet", "--set", "shards.max_samples=2", "--set",
                 "generation.seed=9"]) == 0  # fmt: skip
    return out / "features-000000.tar"


@pytest.mark.parametrize(
    "tamper, named",
    [
        ("byte", "data/core-000000.tar: sha256 differs from SHA256SUMS"),
        ("missing", "data/core-000001.tar: listed in SHA256SUMS but missing"),
        ("extra", "data/notes.txt: not listed in SHA256SUMS"),
        ("card", "README.md: datagen.samples is 4, data/manifest.json says 3"),
        ("features", "data/features-000000.tar: sha256 differs from SHA256SUMS"),
        ("croissant", "croissant.json: data/core-000000.tar sha256 0000"),
    ],
)
def test_every_tampering_is_named(run_cli, copy, build, tmp_path, tamper, named):
    if tamper == "byte":
        tar = copy / "data" / "core-000000.tar"
        raw = bytearray(tar.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        tar.write_bytes(bytes(raw))
    elif tamper == "missing":
        os.remove(copy / "data" / "core-000001.tar")
    elif tamper == "extra":
        (copy / "data" / "notes.txt").write_text("hello")
    elif tamper == "card":
        card = copy / "README.md"
        card.write_text(card.read_text().replace("  samples: 3", "  samples: 4"))
    elif tamper == "croissant":  # and SHA256SUMS rewritten to match: only the Croissant check
        from datagen.verify import write_sums

        doc = json.loads((copy / "croissant.json").read_text())
        core0 = next(d for d in doc["distribution"] if d["@id"] == "core-000000.tar")
        core0["sha256"] = "0" * 64
        (copy / "croissant.json").write_text(json.dumps(doc))
        write_sums(copy)
    else:
        shutil.copy(_other_features(tmp_path, build[1]), copy / "data" / "features-000000.tar")
    for extra in ([], ["--quick"]):
        code, text, _ = run_cli("verify", copy, *extra)
        assert code == 1 and named in text, text
    if tamper == "features":
        code, text, _ = run_cli("verify", copy)
        assert "data/features-000000.tar: sha256 differs from manifest.json" in text


def test_release_without_features(run_cli, build, tmp_path):
    from datagen.verify import card_front

    rel = tmp_path / "nofeat"
    code, _, err = run_cli("release", build[0], "--name", "t", "--version", "0.1.0", "--license",
                           "mit", "--out", rel, "--no-features")  # fmt: skip
    assert code == 0, err
    assert not list((rel / "data").glob("features-*"))
    assert [c["config_name"] for c in card_front((rel / "README.md").read_text())["configs"]] == [
        "core"
    ]
    code, text, err = run_cli("verify", rel)
    assert code == 0, text + err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--version", "1.0"], "--version '1.0': give X.Y.Z"),
        (["--license", "cc by"], "--license 'cc by': give an SPDX id"),
        (["--prompts", "OTHER"], "not the bank this build used"),
        (["--out", "EXISTING"], "exists; releases are never overwritten"),
    ],
)
def test_bad_release_input_is_one_line_and_writes_nothing(run_cli, build, tmp_path, args, message):
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n")
    existing = tmp_path / "existing"
    existing.mkdir()
    base = {"--version": "1.0.0", "--license": "mit", "--out": str(tmp_path / "new")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    base = {k: {"OTHER": str(other), "EXISTING": str(existing)}.get(v, v) for k, v in base.items()}
    argv = ["release", build[0], "--name", "t"] + [x for kv in base.items() for x in kv]
    code, _, err = run_cli(*argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "new").exists() and not list(existing.iterdir())


def _run_py(code: str, tmp_path, **env):
    """Python in a child process (mlcroissant reads its cache folder at import)."""
    import subprocess
    import sys

    env = {**os.environ, "CROISSANT_CACHE": str(tmp_path / "croissant-cache"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_croissant_validates_and_loads_every_sample_as_in_the_shards(release, tmp_path):
    """mlcroissant (the reference implementation) validates croissant.json and reads every
    record set; the records are the shards' own members, key for key."""
    pytest.importorskip("mlcroissant")
    import numpy as np

    from datagen.sampleformat import npy_array, read_tar

    code = f"""
import json, mlcroissant as mlc
from mlcroissant._src.core.issues import ValidationError
ds = mlc.Dataset({str(release / "croissant.json")!r})
out = {{}}
for rs in ds.metadata.record_sets:
    rows = list(ds.records(rs.name))
    out[rs.name] = {{r[rs.name + "/key"].decode(): r[rs.fields[1].uuid].hex() for r in rows}}
print(json.dumps(out))
"""
    run = _run_py(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    manifest = json.loads((release / "data" / "manifest.json").read_text())
    want: dict = {}
    for s in manifest["shards"]:
        for key, raw in read_tar(release / "data" / s["path"]):
            for member, data in raw.items():
                rs = f"{s['kind']}_{member.replace('.', '_')}"
                want.setdefault(rs, {})[key] = data.hex()
    assert got == want
    assert len(got["core_json"]) == 3 and len(got["features_qk_safetensors"]) == 3
    key = sorted(got["core_tracks_npy"])[0]
    tracks = npy_array(bytes.fromhex(got["core_tracks_npy"][key]))
    assert tracks.ndim == 3 and tracks.shape[-1] == 2 and np.isfinite(tracks).any()
    # `mlcroissant validate` (its CLI): no errors, no warnings
    code = "import sys; from mlcroissant.scripts.cli import main; sys.exit(main())"
    validate = _run_py(code.replace("sys.exit", "sys.argv[1:] = ['validate', '--jsonld', "
                                    f"{str(release / 'croissant.json')!r}]; sys.exit"), tmp_path)
    assert validate.returncode == 0, validate.stderr[-2000:]
    assert "Done." in validate.stderr and "warning" not in validate.stderr.lower()


def test_mlcroissant_refuses_a_shard_whose_sha256_differs(copy, tmp_path):
    pytest.importorskip("mlcroissant")
    tar = copy / "data" / "core-000000.tar"
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    tar.write_bytes(bytes(raw))
    code = f"""
import mlcroissant as mlc
list(mlc.Dataset({str(copy / "croissant.json")!r}).records("core_json"))
"""
    run = _run_py(code, tmp_path)
    assert run.returncode != 0 and "Hash of downloaded file" in run.stderr
    assert "core-000000.tar is not identical with the reference" in run.stderr


def test_datasets_rows_decode_videos_with_the_hf_extra(release, monkeypatch, tmp_path):
    """With torchcodec (the [hf] extra) the mp4 column decodes to the same frames datagen's
    own reader gives (both decode with FFmpeg); without decoding it is the member's bytes."""
    datasets = pytest.importorskip("datasets")
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception as exc:  # torchcodec loads the system FFmpeg libraries
        pytest.skip(f"torchcodec cannot load here ({type(exc).__name__}): install FFmpeg libs")
    import numpy as np

    import datagen

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    core = datasets.load_dataset(str(release), "core", split="train", cache_dir=str(tmp_path))
    ours = {s["key"]: s for s in datagen.open_dataset(release / "data")}
    for row in core:
        frames = ours[row["__key__"]]["frames"]
        n = len(frames)
        got = row["mp4"].get_frames_in_range(0, n).data.permute(0, 2, 3, 1).numpy()
        assert got.shape == tuple(frames.shape) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - np.asarray(frames).astype(int)).mean() < 1.0
    raw = core.cast_column("mp4", datasets.Video(decode=False))[0]["mp4"]["bytes"]
    from datagen.sampleformat import read_tar

    members = {k: r for s in sorted((release / "data").glob("core-*.tar")) for k, r in read_tar(s)}
    assert raw == members[core[0]["__key__"]]["mp4"]


def test_stats_plots_are_real_pngs(release):
    import struct

    for name in ("categories.png", "samples.png"):
        data = (release / "stats" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 600 and height >= 250
    stats = json.loads((release / "stats" / "categories.json").read_text())
    assert sum(r["samples"] for r in stats) == 3
    card = (release / "README.md").read_text()
    assert "![samples per category](stats/categories.png)" in card


def test_calibration_figures_go_in_the_card_for_the_builds_tracker_only(run_cli, build, tmp_path):
    cal = tmp_path / "cal.json"
    code, _, err = run_cli("calibrate", "--tracker", "lk", "--videos", "1", "--scenes", "busy",
                           "--preset", "tiny", "--json", cal)  # fmt: skip
    assert code == 0, err
    report = json.loads(cal.read_text())
    rel = tmp_path / "rel"
    code, _, err = run_cli("release", build[0], "--name", "t", "--version", "1.0.0", "--license",
                           "mit", "--out", rel, "--calibration", cal)  # fmt: skip
    assert code == 0, err
    row = f"| synthetic | 1 | {report['all']['delta_avg']:.1f} / {report['kept']['delta_avg']:.1f}"
    assert row in (rel / "README.md").read_text()
    assert json.loads((rel / "stats" / "calibration.json").read_text()) == report
    other = tmp_path / "cal5.json"
    code, _, err = run_cli("calibrate", "--tracker", "lk", "--videos", "1", "--scenes", "busy",
                           "--preset", "tiny", "--set", "tracker.win_size=5", "--json",
                           other)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("release", build[0], "--name", "t", "--version", "1.0.0", "--license",
                           "mit", "--out", tmp_path / "r2", "--calibration", other)  # fmt: skip
    assert code == 2 and "win_size 5 (the build: 15)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r2.partial").exists()


@pytest.fixture(scope="module")
def extended(build, release, tmp_path_factory):
    """Release 1.1.0: release 1.0.0 plus a build of two other prompts (another seed too)."""
    from datagen.cli import main

    root = tmp_path_factory.mktemp("ext")
    bank = root / "more.txt"
    bank.write_text("a blue cube slides up\na cat jumps over a fence\n")
    out = root / "ds2"
    assert main(["build", "--prompts", str(bank), "--out", str(out), "--preset", "tiny-random",
                 "--quiet", "--set", "shards.max_samples=1", "--set",
                 "generation.seed=5"]) == 0  # fmt: skip
    rel2 = root / "rel2"
    assert main(["release", str(out), "--extends", str(release), "--version", "1.1.0",
                 "--out", str(rel2), "--prompts", str(bank)]) == 0  # fmt: skip
    return out, rel2


def test_an_extended_release_holds_both_versions_and_both_verify(run_cli, release, extended):
    from datagen.sampleformat import read_tar
    from datagen.verify import card_front

    build2, rel2 = extended
    for folder in (release, rel2):
        code, text, err = run_cli("verify", folder)
        assert code == 0, text + err
    # the earlier release's data files are in the new one, byte for byte
    for p in (release / "data").iterdir():
        if p.name != "manifest.json":
            assert (rel2 / "data" / p.name).read_bytes() == p.read_bytes(), p.name
    # the build's shards follow them, renumbered, with the same bytes
    m2 = json.loads((build2 / "manifest.json").read_text())
    for s in m2["shards"]:
        moved = f"{s['kind']}-{s['index'] + 2:06d}.tar"
        assert (rel2 / "data" / moved).read_bytes() == (build2 / s["path"]).read_bytes()
    keys = [k for p in sorted((rel2 / "data").glob("core-*.tar")) for k, _ in read_tar(p)]
    assert len(keys) == 5 and len(set(keys)) == 5
    manifest = json.loads((rel2 / "data" / "manifest.json").read_text())
    assert [(p["version"], p["samples"], p["shards"]) for p in manifest["parts"]] == [
        ("1.0.0", 3, [0, 1]), ("1.1.0", 2, [2, 3])]  # fmt: skip
    front = card_front((rel2 / "README.md").read_text())
    assert front["datagen"]["samples"] == 5 and front["datagen"]["version"] == "1.1.0"
    assert front["license"] == "cc-by-4.0" and front["pretty_name"] == "tiny-test"
    card = (rel2 / "README.md").read_text()
    assert "- 1.0.0: 3 samples in shards 0..1" in card
    assert "- 1.1.0: 2 samples in shards 2..3" in card
    log = (rel2 / "CHANGELOG.md").read_text()
    assert log.index("## 1.1.0") < log.index("## 1.0.0") and "Extends 1.0.0 (3 samples)" in log
    assert sorted(p.name for p in (rel2 / "prompts").iterdir()) == ["bank.txt", "more.txt"]


def test_an_extended_release_loads_everywhere_with_every_key_once(
    release, extended, monkeypatch, tmp_path
):
    datasets = pytest.importorskip("datasets")
    import datagen

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rel2 = extended[1]
    hf = str(tmp_path / "hf")
    core = datasets.load_dataset(str(rel2), "core", split="train", cache_dir=hf)
    feats = datasets.load_dataset(str(rel2), "features", split="train", cache_dir=hf)
    assert len(set(core["__key__"])) == 5 == len(core)
    assert sorted(feats["__key__"]) == sorted(core["__key__"])
    ours = [s["key"] for s in datagen.open_dataset(rel2 / "data", video=False)]
    assert sorted(ours) == sorted(core["__key__"])


def test_a_shard_edited_in_an_extended_release_is_checked_against_its_own_build(
    run_cli, extended, tmp_path
):
    """Each part's shards carry their build's fingerprint: a part's config edited in the
    manifest is named, as is a shard marker moved between parts."""
    rel2 = tmp_path / "rel2"
    shutil.copytree(extended[1], rel2)
    manifest = json.loads((rel2 / "data" / "manifest.json").read_text())
    manifest["parts"][0]["config"]["generation"]["seed"] = 7
    (rel2 / "data" / "manifest.json").write_text(json.dumps(manifest))
    code, text, _ = run_cli("verify", rel2)
    assert code == 1
    assert "part 1.0.0's config_fingerprint is not the fingerprint of its config" in text
    manifest["parts"][0]["config"]["generation"]["seed"] = 42
    manifest["parts"][0]["shards"], manifest["parts"][1]["shards"] = [0], [1, 2, 3]
    (rel2 / "data" / "manifest.json").write_text(json.dumps(manifest))
    code, text, _ = run_cli("verify", rel2)
    assert code == 1 and "shard-000001.stats.json: config_fingerprint" in text


@pytest.mark.parametrize(
    "case, message",
    [
        ("same-build", "keys of BUILD are already in the release (first p"),
        ("old-version", "--version 1.0.0: must be later than the extended release's 1.0.0"),
        ("not-release", "not a release folder"),
        ("bad-release", "does not verify"),
    ],
)
def test_bad_extensions_are_refused_in_one_line(run_cli, build, release, tmp_path, case, message):
    target, version = release, "1.1.0"
    if case == "old-version":
        version = "1.0.0"
    elif case == "not-release":
        target = build[0]
    elif case == "bad-release":
        target = tmp_path / "bad"
        shutil.copytree(release, target)
        (target / "data" / "notes.txt").write_text("x")
    code, _, err = run_cli("release", build[0], "--extends", target, "--version", version,
                           "--out", tmp_path / "new")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message.replace("BUILD", str(build[0])) in err
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()


def _drop_build(tmp_path, run_cli, min_kept: float):
    """tiny-random (noise: points are lost after a frame or two) with qc.rejected=drop and
    thresholds that accept some samples: min_kept 0.03 accepts 3 of these 4, 0.09 none."""
    bank = tmp_path / "bank.jsonl"
    bank.write_text(
        '{"id": "a1", "prompt": "a red ball rolls left", "category": "objects"}\n'
        '{"id": "a2", "prompt": "a dog runs across a field", "category": "animals"}\n'
        '{"id": "a3", "prompt": "a cat jumps", "category": "animals"}\n'
        '{"id": "a4", "prompt": "a car drives right", "category": "vehicles"}\n'
    )
    out = tmp_path / "ds"
    code, _, err = run_cli("build", "--prompts", bank, "--out", out, "--preset", "tiny-random",
                           "--quiet", "--set", "qc.rejected=drop", "--set", "qc.check_cycle=false",
                           "--set", "qc.min_visible_fraction=0.2", "--set",
                           f"qc.min_kept_fraction={min_kept}")  # fmt: skip
    assert code == 0, err
    return bank, out


def test_stats_count_samples_a_drop_build_left_out_by_the_banks_categories(run_cli, tmp_path):
    """qc.rejected=drop: rejected samples are not in the shards, yet the release's verdict
    counts hold them, per category from the prompt bank (unknown without it)."""
    bank, out = _drop_build(tmp_path, run_cli, 0.03)
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = {r["key"] for r in manifest["rejected"] if r["stage"] == "qc"}
    written = manifest["totals"]["samples"]
    assert dropped and written, "this test needs both verdicts"
    category = {"a1": "objects", "a2": "animals", "a3": "animals", "a4": "vehicles"}
    want: dict = {}
    for key in dropped:
        c = want.setdefault(category[key.split("-r")[0]], {})
        c["rejected (dropped)"] = c.get("rejected (dropped)", 0) + 1
    for with_bank in (True, False):
        rel = tmp_path / f"rel{with_bank}"
        extra = ["--prompts", bank] if with_bank else []
        code, _, err = run_cli("release", out, "--name", "t", "--version", "1.0.0", "--license",
                               "mit", "--out", rel, *extra)  # fmt: skip
        assert code == 0, err
        stats = json.loads((rel / "stats" / "categories.json").read_text())
        assert sum(r["samples"] for r in stats) == 4
        got = {r["category"]: {k: v for k, v in r["qc"].items() if k != "accepted"}
               for r in stats}  # fmt: skip
        got = {c: v for c, v in got.items() if v}
        if with_bank:
            assert got == want
        else:
            assert got == {"(unknown: prompt bank not included)": {"rejected (dropped)":
                                                                    len(dropped)}}  # fmt: skip
        assert sum(r["qc"].get("accepted", 0) for r in stats) == written


def test_a_build_with_no_sample_left_is_not_released(run_cli, tmp_path):
    _, out = _drop_build(tmp_path, run_cli, 0.09)
    code, _, err = run_cli("release", out, "--name", "t", "--version", "1.0.0", "--license", "mit",
                           "--out", tmp_path / "rel")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds no samples in its core shards (quality control rejected 4 of 4)" in err
    assert not (tmp_path / "rel").exists() and not (tmp_path / "rel.partial").exists()
