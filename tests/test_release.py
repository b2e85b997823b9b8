"""Releases: `datagen release` writes a carded, checksummed folder in the Hub layout that
`datagen verify` passes, `datasets` loads offline, and in which every tampering is named."""

import json
import os
import shutil

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


def test_datasets_loads_both_configs_offline_with_every_key_once(release, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    core = datasets.load_dataset(str(release), "core", split="train")
    keys = core["__key__"]
    assert len(keys) == 3 and len(set(keys)) == 3
    feats = datasets.load_dataset(str(release), "features", split="train")
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
