"""The same build with each executor: wall-time ratios against the in-process build measured
in the same run, Ray's start-up apart, and the work re-done after a worker is killed.

Usage: python scripts/bench_scale.py [--limit 64] [--preset tiny] [--threads 1]

- local: the in-process executor (the baseline of every ratio);
- workers2: ``--workers 2`` (two spawned processes, each loading the model);
- ray: ``--executor ray`` with 2 actors on a local cluster this script starts once (its
  start-up is timed apart; the build's own ray time excludes it);
- kill: ``--workers 2`` with one worker SIGKILLed after the first sample of shard 0; re-done
  work = the extra samples processed (progress count from the build log) as a fraction of the
  samples the killed attempt had done.

Every run must give the same shard bytes as local; the script checks it and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from datagen.build import prepare_build, run_build
from datagen.executors.local import LocalExecutor
from datagen.executors.processes import ProcessExecutor
from datagen.faults import ENV
from datagen.presets import resolve_config
from datagen.quiet import quiet_libraries


def digests(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.name not in ("build.log",)
    }


def timed(cfg, prompts: Path, out: Path, limit: int, executor) -> float:
    req = prepare_build(cfg, prompts, out, limit)
    t0 = time.perf_counter()
    run_build(req, progress=False, executor=executor)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=Path, default=Path(__file__).parents[1] / "prompts")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every build (workers and actors take the driver's count, so "
        "that all executors write the same bytes; 1 keeps 2 workers within 2 cores)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    quiet_libraries()
    cfg = resolve_config(args.preset, None, [f"shards.max_samples={args.samples_per_shard}"])
    rows: dict[str, float] = {}
    same: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows["local"] = timed(cfg, args.prompts, root / "local", args.limit, LocalExecutor())
        ref = digests(root / "local")
        ex = ProcessExecutor(2)
        rows["workers2"] = timed(cfg, args.prompts, root / "w2", args.limit, ex)
        same["workers2"] = digests(root / "w2") == ref
        try:
            import ray

            from datagen.executors.ray_executor import RayExecutor

            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - t0
            ex = RayExecutor(actors=2)
            rows["ray"] = timed(cfg, args.prompts, root / "ray", args.limit, ex)
            same["ray"] = digests(root / "ray") == ref
            ray.shutdown()
        except ImportError:
            ray_start = float("nan")
        os.environ[ENV] = f"shard-sample:0:kill:{root / 'once'}"
        try:
            rows["kill"] = timed(cfg, args.prompts, root / "kill", args.limit, ProcessExecutor(2))
        finally:
            del os.environ[ENV]
        same["kill"] = digests(root / "kill") == ref
        log = (root / "kill" / "build.log").read_text()
    print(
        f"{args.limit} samples of preset {args.preset}, shards of {args.samples_per_shard}, "
        f"{args.threads} torch thread(s) a process"
    )
    print(f"{'executor':<10}{'seconds':>9}{'ratio':>8}  same bytes as local")
    for name, sec in rows.items():
        flag = "" if name == "local" else ("yes" if same.get(name) else "NO")
        print(f"{name:<10}{sec:>9.1f}{sec / rows['local']:>8.2f}  {flag}")
    print(f"ray start-up (local cluster): {ray_start:.1f} s (not in the ray row)")
    # Work lost to the kill: the samples the failed attempts had reported (a killed worker's
    # last report can die with it, so this can read low); work re-done: those shards from
    # the start (retries are per shard).
    lost = [int(m) for m in re.findall(r"attempt \d+ failed after (\d+) samples", log)]
    redone = len(lost) * args.samples_per_shard
    print(
        f"kill: {len(lost)} shard attempt(s) lost {sum(lost)} samples of work; re-done "
        f"{redone} samples ({redone / max(sum(lost), 1):.1f}x the lost work: shard granularity)"
    )


if __name__ == "__main__":
    main()
