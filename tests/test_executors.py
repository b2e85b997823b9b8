"""Executors run the same shard tasks: local worker processes (``--workers N``) write shards
and a manifest byte-identical to the in-process build."""

import pytest

from tests.conftest import digests


@pytest.fixture
def bank(tmp_path):
    f = tmp_path / "bank.txt"
    f.write_text("".join(f"a red ball rolls left number {i}\n" for i in range(5)))
    return f


def test_worker_processes_write_what_the_local_build_writes(run_cli, tmp_path, bank):
    common = ["--prompts", bank, "--preset", "tiny-random", "--quiet"]
    common += ["--set", "shards.max_samples=2", "--set", "generation.batch_size=2"]
    code, text, err = run_cli("build", "--out", tmp_path / "local", *common)
    assert code == 0, err
    code, text, err = run_cli("build", "--out", tmp_path / "procs", "--workers", "2", *common)
    assert code == 0, err
    assert "done: 5 samples written in 3 shards" in text
    local, procs = digests(tmp_path / "local"), digests(tmp_path / "procs")
    assert sorted(local) == sorted(procs) and "manifest.json" in local
    assert local == procs
    code, _, _ = run_cli("validate", tmp_path / "procs")
    assert code == 0


def test_resume_with_another_executor_ends_identical(run_cli, tmp_path, bank):
    """A build that ran in-process for its first shards resumes with worker processes."""
    common = ["--prompts", bank, "--preset", "tiny-random", "--quiet"]
    common += ["--set", "shards.max_samples=2", "--set", "generation.batch_size=2"]
    code, _, err = run_cli("build", "--out", tmp_path / "ref", *common)
    assert code == 0, err
    out = tmp_path / "mixed"
    code, _, err = run_cli("build", "--out", out, "--limit", "2", *common)
    assert code == 0, err
    # --limit changes the plan of the last shard only; build the whole plan with workers.
    code, text, err = run_cli("build", "--out", out, "--workers", "2", *common)
    assert code == 0, err
    assert "(1 kept from an earlier run)" in text
    assert digests(out) == digests(tmp_path / "ref")


def test_workers_must_be_positive(run_cli, tmp_path, bank):
    code, _, err = run_cli("build", "--prompts", bank, "--out", tmp_path / "o", "--workers", "0")
    assert code == 2 and "--workers must be at least 1, got 0" in err
    assert not (tmp_path / "o").exists()
