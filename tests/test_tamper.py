"""Tampered datasets: validate names every edit a user's trials made (member index, manifest
fingerprint, stats markers), and JSON nested too deeply is a finding, not a traceback."""

import json
import re
import shutil

import pytest

PROMPTS = "a red ball rolls left\na dog runs across a field\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from datagen.cli import main

    root = tmp_path_factory.mktemp("tamper")
    bank = root / "bank.txt"
    bank.write_text(PROMPTS)
    out = root / "ds"
    argv = ["build", "--prompts", str(bank), "--out", str(out), "--preset", "tiny-random"]
    assert main([*argv, "--quiet"]) == 0
    return out


@pytest.fixture
def ds(built, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(built, copy)
    return copy


def _validate(run_cli, ds):
    code, text, err = run_cli("validate", ds)
    return code, text + err


def _edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def test_the_untouched_copy_validates(run_cli, ds):
    code, text = _validate(run_cli, ds)
    assert code == 0, text


def _first_member(obj):
    return obj["samples"][0]["members"][0] if "samples" in obj else None


@pytest.mark.parametrize("edit", ["checksum digit", "shifted offset", "flipped byte"])
def test_member_index_edits_are_found(run_cli, ds, edit):
    idx = ds / "core-000000.tar.idx.json"
    text = idx.read_text()
    if edit == "checksum digit":
        old = re.search(r'"members":\{"[^"]+":\[\d+,\d+,"([0-9a-f]+)"', text).group(1)
        text = text.replace(old, ("1" if old[0] != "1" else "2") + old[1:], 1)
    elif edit == "shifted offset":
        m = re.search(r'("members":\{"[^"]+":\[)(\d+),', text)
        text = text.replace(m.group(0), f"{m.group(1)}{int(m.group(2)) + 512},", 1)
    else:
        raw = bytearray(idx.read_bytes())
        i = raw.index(b'"bytes":') + 8
        raw[i] = ord("9") if raw[i] != ord("9") else ord("8")
        text = raw.decode()
    assert text != idx.read_text()
    idx.write_text(text)
    code, out = _validate(run_cli, ds)
    assert code == 1
    assert "core-000000.tar.idx.json: differs from the index of core-000000.tar" in out


def test_manifest_fingerprint_edit_is_found(run_cli, ds):
    _edit_json(ds / "manifest.json", lambda m: m.update(config_fingerprint="0123456789abcdef"))
    code, out = _validate(run_cli, ds)
    assert code == 1 and "config_fingerprint 0123456789abcdef is not the fingerprint" in out


@pytest.mark.parametrize("field", ["sha256", "keys"])
def test_stats_marker_edits_are_found(run_cli, ds, field):
    def change(s):
        if field == "sha256":
            s["files"]["core"]["sha256"] = "0" * 64
        else:
            s["keys"] = s["keys"][:-1]

    _edit_json(ds / "shard-000000.stats.json", change)
    code, out = _validate(run_cli, ds)
    assert code == 1
    want = "sha256 or size" if field == "sha256" else "key list differs"
    assert "shard-000000.stats.json: " in out and want in out


@pytest.mark.parametrize("name", ["manifest.json", "core-000000.tar.idx.json"])
def test_json_nested_too_deeply_is_a_finding_not_a_traceback(run_cli, ds, name):
    (ds / name).write_text("[" * 100000 + "]" * 100000)
    code, out = _validate(run_cli, ds)
    assert code == 1 and "Traceback" not in out and "RecursionError" not in out
    assert name in out


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """The same prompts built with another seed: same keys and shard names, other bytes."""
    from datagen.cli import main

    root = tmp_path_factory.mktemp("other")
    bank = root / "bank.txt"
    bank.write_text(PROMPTS)
    out = root / "ds"
    argv = ["build", "--prompts", str(bank), "--out", str(out), "--preset", "tiny-random"]
    assert main([*argv, "--quiet", "--set", "generation.seed=7"]) == 0
    return out


def test_the_loader_refuses_a_shard_and_index_swapped_in_from_another_build(ds, other):
    from datagen import open_dataset
    from datagen.sampleformat import CorruptShardError

    for name in ("core-000000.tar", "core-000000.tar.idx.json"):
        shutil.copy(other / name, ds / name)
    with pytest.raises(CorruptShardError, match="core-000000.tar: is not the shard the manifest"):
        list(open_dataset(ds, video=False))


def test_the_loader_refuses_a_lowered_sample_count(ds):
    from datagen import open_dataset
    from datagen.sampleformat import CorruptShardError

    def lower(m):
        m["shards"][0]["samples"] -= 1
        m["totals"]["samples"] -= 1

    _edit_json(ds / "manifest.json", lower)
    with pytest.raises(CorruptShardError, match="holds 2 samples, the manifest lists 1"):
        list(open_dataset(ds, video=False))


@pytest.mark.parametrize("command", ["export", "inspect"])
def test_export_and_inspect_answer_deep_json_in_one_line(run_cli, ds, tmp_path, command):
    (ds / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    argv = [command, ds] + (["--to", tmp_path / "exp"] if command == "export" else [])
    code, _, err = run_cli(*argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "nested too deeply" in err
    assert not list(tmp_path.glob("exp*")), "nothing written, no .partial folder"


def test_inspect_on_a_corrupt_sample_is_one_line(run_cli, ds, tmp_path):
    idx = json.loads((ds / "core-000000.tar.idx.json").read_text())
    offset, size, _ = idx["samples"][0]["members"]["mp4"]
    tar = ds / "core-000000.tar"
    raw = bytearray(tar.read_bytes())
    for k in range(offset + 64, offset + size - 8, 5):
        raw[k] ^= 0xFF
    tar.write_bytes(bytes(raw))
    (ds / "core-000000.tar.idx.json").unlink()  # no checksums to stop it early: decode it
    code, _, err = run_cli("inspect", ds, "--png", tmp_path / "x.png")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot be decoded" in err and "run datagen validate" in err


def test_an_index_alone_from_another_build_is_stale_not_fatal(ds, other, built):
    """The right shard beside another build's index: the loader scans the shard and returns
    the right samples (the index is stale), whether or not the two tars have the same size."""
    from datagen import open_dataset

    want = [(s["key"], s["tracks"].tobytes()) for s in open_dataset(built, video=False)]
    shutil.copy(other / "core-000000.tar.idx.json", ds / "core-000000.tar.idx.json")
    got = [(s["key"], s["tracks"].tobytes()) for s in open_dataset(ds, video=False)]
    assert got == want
