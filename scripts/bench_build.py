"""Time share of each stage of the default build (tiny preset, shipped prompt bank).

Usage: python scripts/bench_build.py [--limit N] [--prompts prompts/]

Stage seconds come from the build itself (perf_counter around each stage); shares are of
the summed stage time, so they are ratios measured within one run, robust to a noisy machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from datagen.build import STAGES, prepare_build, run_build
from datagen.presets import resolve_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=Path(__file__).parents[1] / "prompts")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = resolve_config("tiny", None, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        req = prepare_build(cfg, args.prompts, Path(tmp) / "shards", args.limit)
        s = run_build(req, progress=False)
        wall = time.perf_counter() - t0
    total = sum(s.timings.get(k, 0.0) for k in STAGES)
    print(
        f"default build: {s.samples} samples, {s.rejected} rejected, wall {wall:.1f} s, "
        f"{s.samples / wall:.2f} samples/s"
    )
    print(f"{'stage':<10}{'seconds':>10}{'share':>8}{'ms/sample':>11}")
    for k in STAGES:
        v = s.timings.get(k, 0.0)
        print(f"{k:<10}{v:>10.2f}{v / total:>8.1%}{1000 * v / max(s.samples, 1):>11.1f}")
    print(f"{'(other)':<10}{wall - total:>10.2f}{'':>8}{'':>11}  (plan, manifest, imports)")


if __name__ == "__main__":
    main()
