"""Release, verify and publish against the time to copy and hash the same bytes.

Usage: python scripts/bench_release.py [--samples 24] [--preset tiny-random] [--repeats 3]

A build is made once (not timed). Then, each the best of ``--repeats`` runs:

- baseline: copy the build folder and sha256 every file (the I/O a release cannot avoid);
- release: ``datagen release`` (validate the build, copy, stats and plots, card, Croissant,
  SHA256SUMS);
- verify: ``datagen verify`` of the release (sums, card, Croissant, every sample);
- verify --quick: checksums and counts only;
- publish: ``datagen publish`` to a ``file://`` folder (send, rename, read back).

Ratios are against the baseline measured in the same run (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "a red ball rolls left", "a dog runs across a field", "a car drives right",
    "a blue cube slides up", "a cat jumps over a fence", "a bird flies over the sea",
]  # fmt: skip


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--preset", default="tiny-random")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from datagen.cli import main as cli
    from datagen.publish import publish
    from datagen.release import make_release
    from datagen.verify import verify

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bank = root / "bank.txt"
        bank.write_text("\n".join(PROMPTS) + "\n")
        build = root / "ds"
        per = max(1, -(-args.samples // len(PROMPTS)))
        assert cli(["build", "--prompts", str(bank), "--out", str(build), "--preset", args.preset,
                    "--quiet", "--limit", str(args.samples), "--set", f"generation.replicas={per}",
                    "--set", "shards.max_samples=8"]) == 0  # fmt: skip
        n = 0

        def baseline() -> None:
            dst = root / f"copy{n}"
            shutil.copytree(build, dst)
            for p in sorted(dst.rglob("*")):
                if p.is_file():
                    hashlib.sha256(p.read_bytes()).hexdigest()
            shutil.rmtree(dst)

        def release() -> None:
            nonlocal n
            n += 1
            make_release(build, root / f"rel{n}", "bench", "1.0.0", "mit", prompts=bank)

        def publish_once() -> None:
            target = root / f"pub{n}-{time.perf_counter_ns()}"
            publish(root / f"rel{n}", f"file://{target}")

        t = {
            "baseline (copy + sha256)": best(baseline, args.repeats),
            "release": best(release, args.repeats),
            "verify": best(lambda: verify(root / f"rel{n}"), args.repeats),
            "verify --quick": best(lambda: verify(root / f"rel{n}", quick=True), args.repeats),
            "publish file://": best(publish_once, args.repeats),
        }
        size = sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
        samples = sum(1 for _ in (build).glob("core-*.tar"))
        print(f"{args.samples} samples ({samples} core shards, {size / 1e6:.1f} MB), "
              f"best of {args.repeats}")  # fmt: skip
        base = t["baseline (copy + sha256)"]
        for name, sec in t.items():
            print(f"{name:<26}{sec:8.3f} s   x{sec / base:6.1f} baseline")


if __name__ == "__main__":
    main()
