"""The build on Ray (a local cluster started by the executor): byte-identical to the local
build, an actor killed mid-shard is retried, a shard that always fails is a named failure."""

import json

import pytest

ray = pytest.importorskip(
    "ray", reason="the 'ray' extra is not installed (pip install -e '.[ray]')"
)

from datagen.faults import ENV  # noqa: E402
from tests.conftest import SMALL_SETTINGS, digests, small_reference_build  # noqa: E402

SETTINGS = SMALL_SETTINGS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return small_reference_build(tmp_path_factory.mktemp("ref"))


def test_ray_build_is_byte_identical_and_survives_an_actor_killed_mid_shard(
    run_cli, reference, tmp_path, monkeypatch
):
    bank, ref = reference
    once = tmp_path / "killed-once"
    monkeypatch.setenv(ENV, f"shard-sample:0:kill:{once}")
    out = tmp_path / "ds"
    code, text, err = run_cli(
        "build", "--prompts", bank, "--out", out, "--executor", "ray", "--ray-actors", "2",
        *SETTINGS,
    )  # fmt: skip
    assert code == 0, err
    assert once.exists(), "the fault fired: an actor died mid-shard"
    assert "worker actor died" in (out / "build.log").read_text()
    assert digests(out) == ref
    assert not ray.is_initialized(), "the cluster it started is shut down"


def test_ray_shard_that_always_fails_is_named_and_a_rerun_with_another_executor_ends_identical(
    run_cli, reference, tmp_path, monkeypatch
):
    bank, ref = reference
    monkeypatch.setenv(ENV, "shard-start:2:raise")
    out = tmp_path / "ds"
    code, text, err = run_cli(
        "build", "--prompts", bank, "--out", out, "--executor", "ray", "--max-retries", "1",
        *SETTINGS,
    )  # fmt: skip
    assert code == 1
    assert "shard(s) 2 failed every attempt" in err
    failed = [
        r for r in json.loads((out / "manifest.json").read_text())["rejected"]
        if r["stage"] == "shard"
    ]  # fmt: skip
    assert [r["shard"] for r in failed] == [2] and "FailpointError" in failed[0]["reason"]
    monkeypatch.delenv(ENV)
    code, text, err = run_cli("build", "--prompts", bank, "--out", out, *SETTINGS)
    assert code == 0, err
    assert digests(out) == ref


def test_ray_options_need_the_ray_executor(run_cli, tmp_path):
    bank = tmp_path / "b.txt"
    bank.write_text("a dog\n")
    code, _, err = run_cli("build", "--prompts", bank, "--out", tmp_path / "o", "--ray-actors", "2")
    assert code == 2 and "--ray-address and --ray-actors go with --executor ray" in err


def _ray_build(bank, out, *extra, failpoints=None):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != ENV}
    if failpoints:
        env[ENV] = failpoints
    cli = [sys.executable, "-m", "datagen.cli", "build", "--prompts", str(bank), "--out", str(out)]
    return subprocess.run(
        [*cli, "--executor", "ray", *SETTINGS, *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


def test_more_actors_than_the_cluster_holds_does_not_hang(reference, tmp_path):
    bank, ref = reference
    run = _ray_build(bank, tmp_path / "ds", "--ray-actors", "8")
    assert run.returncode == 0, run.stderr
    assert digests(tmp_path / "ds") == ref
    assert "the cluster has room for" in (tmp_path / "ds" / "build.log").read_text()


def test_actors_that_cannot_start_stop_the_build_in_one_line(reference, tmp_path):
    bank, _ = reference
    run = _ray_build(bank, tmp_path / "ds", "--ray-actors", "2",
                     failpoints="worker-start:0:raise")  # fmt: skip
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("datagen: error: no Ray actor can run shards (FailpointError")
    assert not (tmp_path / "ds" / "manifest.json").exists()
