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


def load_script(name: str):
    """A script of ``scripts/`` as a module (scripts are not a package), loaded by path."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses of the script look their module up
    spec.loader.exec_module(module)
    return module


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file a build wrote (its log aside): equal dicts, byte-identical builds."""
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.name != "build.log"
    }


def analyse_report(build: Path) -> tuple[Path, dict]:
    """``datagen analyse BUILD --report BUILD/../R --rank-by token``: the folder and report.json."""
    import json

    from datagen.cli import main

    out = build.parent / "R"
    assert main(["analyse", str(build), "--report", str(out), "--rank-by", "token"]) == 0
    return out, json.loads((out / "report.json").read_text())


SMALL_BANK = "".join(f"a red ball rolls left number {i}\n" for i in range(5))
# 5 samples in 3 shards (2, 2, 1).
SMALL_SETTINGS = ["--preset", "tiny-random", "--quiet", "--set", "shards.max_samples=2",
                  "--set", "generation.batch_size=2"]  # fmt: skip


def small_reference_build(root: Path) -> tuple[Path, dict[str, str]]:
    """The small bank (``root/bank.txt``) built uninterrupted with ``SMALL_SETTINGS`` into
    ``root/ref``: (the bank, the build's digests), what interrupted builds must equal."""
    from datagen.cli import main

    bank = root / "bank.txt"
    bank.write_text(SMALL_BANK)
    assert main(["build", "--prompts", str(bank), "--out", str(root / "ref"), *SMALL_SETTINGS]) == 0
    return bank, digests(root / "ref")
