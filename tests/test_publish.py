"""Publishing a release to a file system URL (fsspec, here file://): the copy verifies at the
target, a dry run sends nothing, a publish killed half-way resumes, and bad releases or
targets are refused in one line."""

import shutil
import subprocess
import sys

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
    code, _, err = run_cli("publish", release, "--to", "hf://datasets/org/name")
    assert code == 2 and "Hub is not built yet" in err
