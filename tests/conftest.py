import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Keep the 2-core CI machine responsive and runs repeatable.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from datagen.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def pytest_configure(config):
    sys.path.insert(0, str(ROOT))
