"""Publishing a release: to file system URLs (fsspec: file:// and a real local S3 server) the
copy verifies at the target, a dry run sends nothing, a publish killed half-way resumes, and
bad releases or targets are refused in one line; to the Hub through an injected fake API."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.faults import ENV
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from datagen.cli import main

    root = tmp_path_factory.mktemp("pub")
    bank = root / "bank.txt"
    bank.write_text("a red ball rolls left\na dog runs across a field\n")
    out, rel = root / "ds", root / "rel"
    assert main(["build", "--prompts", str(bank), "--out", str(out), "--preset", "tiny-random",
                 "--quiet", "--set", "shards.max_samples=1"]) == 0  # fmt: skip
    assert main(["release", str(out), "--name", "t", "--version", "1.0.0", "--license", "mit",
                 "--out", str(rel)]) == 0  # fmt: skip
    return rel


def test_publish_verifies_at_the_target_and_a_rerun_sends_nothing_new(run_cli, release, tmp_path):
    target = tmp_path / "target"
    code, text, err = run_cli("publish", release, "--to", f"file://{target}", "--dry-run")
    assert code == 0 and "nothing sent" in text and not target.exists()
    sent = text.count("would send")
    code, text, err = run_cli("publish", release, "--to", f"file://{target}")
    assert code == 0, err
    assert f"{sent} sent, 0 already there" in text
    code, text, err = run_cli("verify", target)
    assert code == 0, text + err
    code, text, _ = run_cli("publish", release, "--to", f"file://{target}")
    assert code == 0 and f"0 sent, {sent} already there" in text


def test_a_publish_killed_half_way_resumes_and_verifies(run_cli, release, tmp_path):
    target = tmp_path / "target"
    cli = [sys.executable, "-m", "datagen.cli", "publish", str(release), "--to", f"file://{target}"]
    run = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, ENV: "publish-file:3:kill"})  # fmt: skip
    assert run.returncode == -9
    assert not (target / "SHA256SUMS").exists(), "not marked complete"
    assert len([p for p in target.rglob("*") if p.is_file()]) >= 4
    code, text, err = run_cli("publish", release, "--to", f"file://{target}")
    assert code == 0, err
    assert "4 already there" in text
    code, text, err = run_cli("verify", target)
    assert code == 0, text + err
    assert not list(target.rglob("*.partial"))


def test_bad_releases_and_targets_are_refused(run_cli, release, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    (bad / "data" / "extra.txt").write_text("x")
    code, _, err = run_cli("publish", bad, "--to", f"file://{tmp_path / 't1'}")
    assert code == 2 and "does not verify" in err and not (tmp_path / "t1").exists()
    other = tmp_path / "t2"
    other.mkdir()
    (other / "SHA256SUMS").write_text("0" * 64 + "  README.md\n")
    code, _, err = run_cli("publish", release, "--to", f"file://{other}")
    assert code == 2 and "already holds another release" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server process on 127.0.0.1 (moto's server), reached by s3fs."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("releases")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_publish_to_a_local_s3_server_verifies_there(run_cli, release, s3, tmp_path):
    code, text, err = run_cli("publish", release, "--to", "s3://releases/t/1.0.0")
    assert code == 0, err
    files = [p for p in release.rglob("*") if p.is_file()]
    # every file listed in SHA256SUMS is read back and checked (the sums file is sent last)
    assert f"{len(files)} sent, 0 already there, {len(files) - 1} checked at the target" in text
    assert not [p for p in s3.find("releases/t/1.0.0") if p.endswith(".partial")]
    back = tmp_path / "back"
    s3.get("releases/t/1.0.0/", str(back), recursive=True)
    code, text, err = run_cli("verify", back)
    assert code == 0, text + err
    for p in files:
        assert (back / p.relative_to(release)).read_bytes() == p.read_bytes()
    code, text, _ = run_cli("publish", release, "--to", "s3://releases/t/1.0.0")
    assert code == 0 and f"0 sent, {len(files)} already there" in text


class FakeHub:
    """Stands in for huggingface_hub.HfApi: no Hub server runs offline, so this records the
    calls and keeps the files 'uploaded' (sha256 by path, per revision), applying
    allow/ignore patterns with huggingface_hub's own filter and answering
    verify_repo_checksums with its own comparison (huggingface_hub.utils._verification)."""

    def __init__(self, corrupt: str | None = None, sums: bytes | None = None):
        self.calls: list[tuple] = []
        self.files: dict[str, dict[str, str]] = {}
        self.corrupt = corrupt
        if sums is not None:
            import hashlib

            self.files["main"] = {"SHA256SUMS": hashlib.sha256(sums).hexdigest()}
            self.sums = sums

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def list_repo_files(self, repo_id, repo_type=None, revision=None):
        self.calls.append(("list_repo_files", repo_id, revision))
        return sorted(self.files.get(revision or "main", {}))

    def hf_hub_download(self, repo_id, filename, repo_type=None, revision=None):
        self.calls.append(("hf_hub_download", repo_id, filename))
        path = Path(self.tmp) / filename
        path.write_bytes(self.sums)
        return str(path)

    def upload_folder(self, *, repo_id, folder_path, revision=None, allow_patterns=None,
                      ignore_patterns=None, **kw):  # fmt: skip
        from huggingface_hub.utils import filter_repo_objects

        from datagen.shards import sha256_file

        root = Path(folder_path)
        paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        chosen = sorted(filter_repo_objects(paths, allow_patterns=allow_patterns,
                                            ignore_patterns=ignore_patterns))  # fmt: skip
        self.calls.append(("upload_folder", repo_id, revision, chosen))
        store = self.files.setdefault(revision or "main", {})
        for p in chosen:
            store[p] = "0" * 64 if p == self.corrupt else sha256_file(root / p)

    def verify_repo_checksums(self, repo_id, *, repo_type=None, revision=None, local_dir=None):
        from huggingface_hub.utils._verification import collect_local_files, verify_maps

        self.calls.append(("verify_repo_checksums", repo_id, revision, str(local_dir)))

        class Remote:  # what verify_maps reads of a RepoFile
            def __init__(self, path, sha):
                self.path, self.blob_id, self.lfs = path, "0" * 40, {"sha256": sha}

        store = self.files.get(revision or "main", {})
        remote = {p: Remote(p, sha) for p, sha in store.items()}
        local = collect_local_files(Path(local_dir))
        return verify_maps(remote_by_path=remote, local_by_path=local,
                           revision=revision or "main", verified_path=Path(local_dir))  # fmt: skip


def test_publish_to_the_hub_data_first_then_card_and_sums_then_verified(release, tmp_path):
    from datagen.publish import publish

    hub = FakeHub()
    done = publish(release, "hf://datasets/org/tiny", revision="v1.0.0", private=True, api=hub)
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "create_branch", "list_repo_files", "upload_folder",
                     "upload_folder", "verify_repo_checksums"]  # fmt: skip
    assert hub.calls[0][2]["private"] is True and hub.calls[0][2]["repo_type"] == "dataset"
    assert hub.calls[1][2]["branch"] == "v1.0.0"
    files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    final = ["README.md", "SHA256SUMS", "croissant.json"]
    assert hub.calls[3][3] == [f for f in files if f not in final]
    assert hub.calls[4][3] == final
    assert sorted(hub.files["v1.0.0"]) == files and done["checked"] == len(files)


def test_the_hub_path_names_a_file_that_differs_after_upload(release):
    from datagen.errors import UserError
    from datagen.publish import publish

    with pytest.raises(UserError, match=r"1 file\(s\) differ after upload, first data/core-000000"):
        publish(release, "hf://datasets/org/tiny", api=FakeHub(corrupt="data/core-000000.tar"))


def test_the_hub_refuses_a_repo_holding_another_release(release, tmp_path):
    from datagen.errors import UserError
    from datagen.publish import publish

    hub = FakeHub(sums=b"0" * 64 + b"  README.md\n")
    hub.tmp = tmp_path
    with pytest.raises(UserError, match="already holds another release"):
        publish(release, "hf://datasets/org/tiny", api=hub)
    assert "upload_folder" not in [c[0] for c in hub.calls]


def test_hub_dry_run_sends_nothing_and_bad_hub_urls_are_refused(run_cli, release, monkeypatch):
    import huggingface_hub

    made = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: made.append(1))
    code, text, err = run_cli("publish", release, "--to", "hf://datasets/org/tiny", "--dry-run")
    assert code == 0, err
    assert "would send README.md (commit 2 of 2)" in text and "nothing sent" in text
    assert "would send data/core-000000.tar (commit 1 of 2)" in text and made == []
    code, _, err = run_cli("publish", release, "--to", "hf://models/org/tiny")
    assert code == 2 and "give a Hub dataset as hf://datasets/ORG/NAME" in err
    code, _, err = run_cli("publish", release, "--to", "file:///tmp/x", "--revision", "v1")
    assert code == 2 and "--revision and --private are for hf:// targets only" in err
