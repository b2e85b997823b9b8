"""Faults that lose nothing: a shard that raises is retried, then recorded as a named failure
(exit 1) that a rerun builds; a worker process killed mid-shard is retried; a build killed at
each stage boundary ends, after a rerun, byte-identical to an uninterrupted build.

Faults are injected with failpoints (``datagen.faults``, ``DATAGEN_FAILPOINTS``), which worker
processes inherit; killed builds run as real subprocesses and die by SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from datagen.faults import ENV
from tests.conftest import ROOT, SMALL_SETTINGS, digests, small_reference_build

SETTINGS = SMALL_SETTINGS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted build, and the prompt bank."""
    return small_reference_build(tmp_path_factory.mktemp("ref"))


def _build(bank, out, *extra, failpoints=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if failpoints:
        env[ENV] = failpoints
    cli = [sys.executable, "-m", "datagen.cli", "build", "--prompts", str(bank)]
    return subprocess.run(
        [*cli, "--out", str(out), *SETTINGS, *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip


def test_a_shard_that_always_raises_is_a_named_failure_and_a_rerun_builds_it(reference, tmp_path):
    bank, ref = reference
    out = tmp_path / "ds"
    run = _build(bank, out, "--max-retries", "1", failpoints="shard-start:1:raise")
    assert run.returncode == 1, run.stderr
    assert "shard(s) 1 failed every attempt (1 retries" in run.stderr
    assert "2 failed" in run.stdout  # shard 1's two samples
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [r for r in manifest["rejected"] if r["stage"] == "shard"]
    assert sorted(r["shard"] for r in failed) == [1, 1]
    assert all("failed 2 attempts; last: FailpointError" in r["reason"] for r in failed)
    assert not (out / "core-000001.tar").exists() and not (out / "shard-000001.stats.json").exists()
    log = (out / "build.log").read_text()
    assert "shard 1 attempt 1 failed" in log and "shard 1 attempt 2 failed" in log
    # The rerun builds only shard 1, and the dataset is then the uninterrupted one.
    run = _build(bank, out)
    assert run.returncode == 0, run.stderr
    assert "(2 kept from an earlier run)" in run.stdout
    assert digests(out) == ref


def test_a_worker_process_killed_mid_shard_is_retried(reference, tmp_path):
    bank, ref = reference
    out = tmp_path / "ds"
    once = tmp_path / "killed-once"
    run = _build(bank, out, "--workers", "2", failpoints=f"shard-sample:0:kill:{once}")
    assert run.returncode == 0, run.stderr
    assert once.exists(), "the fault fired"
    assert "worker process died" in (out / "build.log").read_text()
    assert digests(out) == ref


@pytest.mark.parametrize(
    "point",
    ["shard-start:1", "shard-sample:1", "shard-tar:1", "shard-renamed:1", "manifest:0"],
)
def test_a_build_killed_at_each_stage_boundary_resumes_byte_identical(reference, tmp_path, point):
    bank, ref = reference
    out = tmp_path / "ds"
    run = _build(bank, out, failpoints=f"{point}:kill")
    assert run.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    run = _build(bank, out)
    assert run.returncode == 0, run.stderr
    assert digests(out) == ref
    keys = [k for s in json.loads((out / "manifest.json").read_text())["shards"] for k in [s]]
    assert (
        sum(s["samples"] for s in keys if s["kind"] == "core")
        + len(json.loads((out / "manifest.json").read_text())["rejected"])
        == 5
    ), "no key lost or duplicated"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_stops_in_one_line_and_the_rerun_resumes(reference, tmp_path, workers):
    """ENOSPC is raised by a failpoint where the tar is written (a real full disk needs a
    mount this suite cannot make): one line, exit 2, nothing committed lost, no retries."""
    bank, ref = reference
    out = tmp_path / "ds"
    run = _build(bank, out, "--workers", workers, failpoints="shard-tar:1:enospc")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datagen: error: disk full while writing")
    assert "run the same command again" in lines[0]
    assert "attempt 2" not in (out / "build.log").read_text(), "a full disk is not retried"
    run = _build(bank, out)
    assert run.returncode == 0, run.stderr
    assert digests(out) == ref


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB file system (tmpfs), where this machine lets the suite mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk_mid_build_stops_in_one_line_and_resumes(reference, small_disk):
    from datagen.build import prepare_build, run_build
    from datagen.errors import UserError
    from datagen.presets import resolve_config

    bank, ref = reference
    out = small_disk / "ds"
    sets = ["shards.max_samples=2", "generation.batch_size=2"]
    cfg = resolve_config("tiny-random", None, sets)
    req = prepare_build(cfg, bank, out)  # the estimate fits
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    one_shard = 2 * (req.plan.bytes_per_sample + req.plan.feature_bytes_per_sample)
    filler.write_bytes(b"\0" * max(0, free - int(1.5 * one_shard)))  # room for about one shard
    with pytest.raises(UserError, match="disk full while writing under .*run the same command"):
        run_build(req, progress=False)
    assert not (out / "manifest.json").exists()
    # Free room for the shards still to build, not for the whole dataset: the resume must
    # count what is committed.
    one = req.plan.bytes_per_sample + req.plan.feature_bytes_per_sample
    filler.unlink()
    free = shutil.disk_usage(small_disk).free
    left = 5 - 2  # shard 0 (2 samples) committed before the disk filled
    assert free > int(1.3 * left * one)
    filler.write_bytes(b"\0" * (free - int(1.3 * left * one)))
    assert shutil.disk_usage(small_disk).free < 5 * one, "not room for the whole dataset"
    run = _build(bank, out)
    assert run.returncode == 0, run.stderr
    assert digests(out) == ref


def test_a_dying_worker_charges_only_its_own_shard(reference, tmp_path):
    """With --max-retries 0, one transient kill fails nothing (the shards in flight re-run
    alone, uncharged); a shard that always kills its worker fails alone, the others build."""
    bank, ref = reference
    out = tmp_path / "once"
    once = tmp_path / "killed-once"
    run = _build(bank, out, "--workers", "2", "--max-retries", "0",
                 failpoints=f"shard-sample:0:kill:{once}")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert once.exists() and digests(out) == ref
    out = tmp_path / "always"
    run = _build(bank, out, "--workers", "2", "--max-retries", "1",
                 failpoints="shard-sample:1:kill")  # fmt: skip
    assert run.returncode == 1
    assert "shard(s) 1 failed every attempt" in run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["shard"] for r in manifest["rejected"] if r["stage"] == "shard"} == {1}
    assert [s["index"] for s in manifest["shards"] if s["kind"] == "core"] == [0, 2]
    assert not list(out.glob("*-000001.tar*")), "the failed shard leaves no files behind"
