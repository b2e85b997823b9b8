"""A hostile dataset: keys and member names planted in the member index, the tar headers and
the manifest must never reach a path. Nothing is written outside the target, and the error
names the shard and the key."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datagen.config import VideoConfig
from datagen.names import key_problem, member_problem, safe_join, tar_name_problem
from datagen.sampleformat import read_tar
from datagen.video import encode_video

HOSTILE_KEYS = ["../ESCAPED_key", "/tmp/ABSOLUTE_key", "a/b", "x\0y", "..", "dot.key", ""]
HOSTILE_MEMBERS = ["../../x", "/abs/x", "npy/..", "a\0b", "", ".hidden", "a..b"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_unsafe_keys_are_refused(key):
    assert key_problem(key) is not None
    if "." not in key:  # a tar name splits at its first dot: "dot.key.json" is key "dot"
        assert tar_name_problem(f"{key}.json") is not None


@pytest.mark.parametrize("ext", HOSTILE_MEMBERS)
def test_unsafe_member_names_are_refused(ext):
    assert member_problem(ext) is not None


def test_safe_names_pass_and_safe_join_stays_inside(tmp_path):
    assert key_problem("golden-retriever_runs-r00") is None
    assert member_problem("qk.safetensors") is None and member_problem("tracks.npy") is None
    assert safe_join(tmp_path, "k", "tracks.npy") == tmp_path / "k" / "tracks.npy"
    for bad in ("..", "../x", "/etc", "a/b"):
        with pytest.raises(ValueError):
            safe_join(tmp_path, bad)
    outside = tmp_path.parent / "outside_target"
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="symlink"):
        safe_join(tmp_path, "link", "x.npy")


@pytest.fixture
def dataset(tmp_path, run_cli) -> Path:
    """One small real sample (an existing video, LK labels), kept whatever QC says."""
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    (videos / "clip.mp4").write_bytes(encode_video(frames, 8, VideoConfig()))
    out = tmp_path / "d"
    code, _, err = run_cli(
        "build", "--source", "videos", videos, "--out", out, "--quiet",
        "--set", "capture.corr_layers=[]", "--set", "capture.feature_layers=[]",
        "--set", "qc.rejected=keep",
    )  # fmt: skip
    assert code == 0, err
    return out


def _files_outside(root: Path, before: set[Path]) -> set[Path]:
    return {p for p in root.rglob("*")} - before


def _plant_index_key(dataset: Path, key: str | None = None, ext: str | None = None) -> None:
    path = dataset / "core-000000.tar.idx.json"
    idx = json.loads(path.read_text())
    sample = idx["samples"][0]
    if key is not None:
        sample["key"] = key
    if ext is not None:
        sample["members"][ext] = sample["members"].pop("json")
    path.write_text(json.dumps(idx))


@pytest.mark.parametrize("key", ["../ESCAPED_key", "/tmp/ESCAPED_abs_key"])
def test_inspect_refuses_a_hostile_key_from_the_index(dataset, tmp_path, run_cli, key, monkeypatch):
    _plant_index_key(dataset, key=key)
    work = tmp_path / "work"
    work.mkdir()
    before = set(tmp_path.rglob("*"))
    monkeypatch.chdir(work)
    code, out, err = run_cli("inspect", dataset)
    assert code == 2
    assert "core-000000.tar.idx.json: " in err and key in err and "unsafe sample key" in err
    assert _files_outside(tmp_path, before) == set()
    assert not Path("/tmp/ESCAPED_abs_key.png").exists()


@pytest.mark.parametrize("ext", ["../../x", "/tmp/ESCAPED_abs_member"])
def test_export_refuses_a_hostile_member_name_from_the_index(dataset, tmp_path, run_cli, ext):
    _plant_index_key(dataset, ext=ext)
    victim = tmp_path / "x"
    victim.write_text("keep me")
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli("export", dataset, "--to", tmp_path / "files")
    assert code == 2
    assert "core-000000.tar.idx.json: clip-r00: unsafe member name" in err
    assert victim.read_text() == "keep me"
    assert _files_outside(tmp_path, before) == set()  # no export, no .partial folder
    assert not Path("/tmp/ESCAPED_abs_member").exists()


def _rewrite_tar(tar: Path, rename) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for key, members in read_tar(tar):
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(rename(key, ext))
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())


@pytest.mark.parametrize("name", ["../ESCAPED_key.{ext}", "sub/dir/{key}.{ext}"])
def test_readers_refuse_hostile_tar_headers(dataset, tmp_path, run_cli, name):
    tar = dataset / "core-000000.tar"
    _rewrite_tar(tar, lambda key, ext: name.format(key=key, ext=ext))
    (dataset / "core-000000.tar.idx.json").unlink()  # the loader scans the headers
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli("export", dataset, "--to", tmp_path / "files")
    assert code == 2 and "core-000000.tar: " in err and "unsafe" in err
    code, _, err = run_cli("inspect", dataset)
    assert code == 2 and "core-000000.tar: " in err and "unsafe" in err
    assert _files_outside(tmp_path, before) == set()
    code, out, _ = run_cli("validate", dataset)
    assert code == 1 and "unsafe" in out and "core-000000.tar" in out


def test_loader_refuses_a_manifest_shard_path_outside_the_folder(dataset, tmp_path, run_cli):
    m = json.loads((dataset / "manifest.json").read_text())
    m["shards"][0]["path"] = "../../outside.tar"
    (dataset / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli("export", dataset, "--to", tmp_path / "files")
    assert code == 2
    assert "manifest.json: shard 0: unsafe shard path '../../outside.tar'" in err
    code, out, _ = run_cli("validate", dataset)
    assert code == 1 and "outside.tar" in out


def test_inspect_does_not_write_through_a_planted_symlink(dataset, tmp_path, run_cli, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (work / "clip-r00.png").symlink_to(target)
    monkeypatch.chdir(work)
    code, _, err = run_cli("inspect", dataset)
    assert code == 2 and "symlink" in err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("field", ["first_key", "rejected"])
def test_loader_refuses_hostile_keys_in_the_manifest(dataset, tmp_path, run_cli, field):
    m = json.loads((dataset / "manifest.json").read_text())
    if field == "rejected":
        m["rejected"] = [{"key": "/abs/ESCAPED", "shard": 0, "stage": "qc", "reason": "x"}]
    else:
        m["shards"][0]["first_key"] = "../ESCAPED_key"
    (dataset / "manifest.json").write_text(json.dumps(m))
    before = set(tmp_path.rglob("*"))
    code, _, err = run_cli("export", dataset, "--to", tmp_path / "files")
    assert code == 2 and "manifest.json: " in err and "unsafe sample key" in err
    assert ("ESCAPED" in err) and _files_outside(tmp_path, before) == set()
