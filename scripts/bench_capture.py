"""Capture overhead of the default build: tiny preset with capture on / off, same run.

Usage: python scripts/bench_capture.py [--samples 64] [--repeats 3]

Both variants run the same shard (same prompts, seeds, batch size) through ShardWorker.run,
alternating, after one warm-up each; the figure is min(time with capture) / min(time
without), and the median of the paired ratios (each run with capture over the run without
right after it: on a shared machine the speed drifts between runs, and a pair shares the
drift). The correspondence kernel at full CogVideoX-2B size is measured by
scripts/bench_correspondence.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from datagen.plan import make_plan
from datagen.presets import resolve_config
from datagen.prompts import load_prompts
from datagen.worker import ShardWorker

OFF = [
    "capture.feature_layers=[]",
    "capture.feature_steps=[]",
    "capture.corr_layers=[]",
    "capture.corr_steps=[]",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=Path, default=Path(__file__).parents[1] / "prompts")
    args = ap.parse_args()
    prompts = load_prompts(args.prompts)
    variants = {
        "with capture": resolve_config(),
        "without capture": resolve_config("tiny", None, OFF),
    }
    workers = {}
    tasks = {}
    for name, cfg in variants.items():
        cfg.shards.max_samples = args.samples
        workers[name] = ShardWorker(cfg)
        tasks[name] = make_plan(cfg, prompts, args.samples).shards[0]
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:  # warm-up: model load, first-call allocations
            workers[name].run(make_plan(variants[name], prompts, 8).shards[0], Path(tmp))
        for _ in range(args.repeats):
            for name in variants:
                t0 = time.perf_counter()
                workers[name].run(tasks[name], Path(tmp))
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    for name, ts in times.items():
        print(
            f"{name:<16} best {best[name]:7.2f} s  runs {' '.join(f'{t:.2f}' for t in ts)}"
            f"  ({args.samples / best[name]:.1f} samples/s)"
        )
    ratio = best["with capture"] / best["without capture"]
    paired = sorted(
        w / wo for w, wo in zip(times["with capture"], times["without capture"], strict=True)
    )
    print(
        f"capture overhead ratio: {ratio:.3f} (best / best; target <= 1.05); capture = q/k of "
        "2 layers x 2 steps stored fp16 + online correspondence for 2 layers x 2 steps"
    )
    print(
        f"paired ratios (each run with capture / the run without right after it): "
        f"{' '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f}"
    )


if __name__ == "__main__":
    main()
