"""One build at a time per output folder: a live holder refuses a second build in one line
and nothing is written; a lock left by a killed build is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from datagen.errors import UserError
from datagen.lock import LOCK, BuildLock
from tests.conftest import ROOT

HOLD = """
import sys, time
from pathlib import Path
from datagen.lock import BuildLock
with BuildLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/ds."""
    out = tmp_path / "ds"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def bank(tmp_path):
    f = tmp_path / "bank.txt"
    f.write_text("a dog runs left\n")
    return f


def test_a_second_build_into_a_held_folder_is_refused_in_one_line(run_cli, holder, bank):
    out, proc = holder
    before = _tree(out)
    code, _, err = run_cli(
        "build", "--prompts", bank, "--out", out, "--preset", "tiny-random", "--quiet"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"another datagen build (pid {proc.pid} on " in lines[0]
    assert _tree(out) == before, "the refused build wrote nothing"
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid


def test_a_lock_left_by_a_killed_build_is_taken_over(run_cli, holder, bank):
    out, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid, "the stale file stays"
    code, text, err = run_cli(
        "build", "--prompts", bank, "--out", out, "--preset", "tiny-random", "--quiet"
    )
    assert code == 0, err
    assert "done: 1 samples written" in text
    assert not (out / LOCK).exists(), "released at the end"
    code, text, _ = run_cli("validate", out)
    assert code == 0


def test_the_lock_is_released_when_the_holder_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with BuildLock(tmp_path):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK).exists()
    with BuildLock(tmp_path):  # and can be taken again at once
        pass


def test_two_holders_in_one_process_exclude_each_other(tmp_path):
    with BuildLock(tmp_path):
        start = time.perf_counter()
        with pytest.raises(UserError, match="is being built by another datagen build"):
            with BuildLock(tmp_path):
                pass
        assert time.perf_counter() - start < 5, "refuses at once, does not wait"
