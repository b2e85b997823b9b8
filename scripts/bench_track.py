"""Throughput of the classical trackers on a synthetic moving-texture video.

Usage: python scripts/bench_track.py [--height 480] [--width 720] [--frames 25] [--grid 20]

The video is a Gaussian-blurred noise texture translated by a known sub-pixel amount per frame,
so every row also reports accuracy against the exact motion (median and 99th percentile of the
error of visible points, in px). Rows:

* ``lk``: LKTracker with defaults (forward-backward check + appearance check).
* ``lk_recover``: the tiny preset's tracker (LK that follows lost points and re-acquires them).
* ``lk, no appearance check``: LKTracker(min_ncc=None), i.e. the forward-backward check only.
* ``baseline: plain LK forward``: one cv2.calcOpticalFlowPyrLK call per frame pair, same LK
  parameters, no checks; the ratio to it (``x base``) shows what the checks cost.
* ``dis``: DISTracker with defaults.

frames/s = video frames / wall time of one whole ``track`` call (grayscale conversion
included), best of ``--repeats`` interleaved rounds; the median is shown too, since other
processes on the machine add noise. ``pyramid build`` is the cost of one
cv2.buildOpticalFlowPyramid call, i.e. what each pyramid reuse would save if OpenCV's Python
binding accepted pyramids (it does not: opencv/opencv#4777).

Optional CoTracker section (``--cotracker-repo DIR``, a local co-tracker checkout): CoTracker3
with RANDOM weights (``pretrained=False``; its speed does not depend on the weights, its
accuracy and visibility are meaningless) on the CPU, on the same video, next to LK on the same
(smaller, ``--cotracker-grid``) query grid. Reported: model load time, wall time of one
``track`` call, seconds per frame and milliseconds per frame x point. CoTracker's cost is
dominated by its CNN on every frame at 384x512, so per frame x point it falls with more points.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cv2
import numpy as np

from datagen.track.lk import DISTracker, LKTracker, to_gray
from datagen.track.queries import grid_queries
from datagen.track.registry import make_tracker


def moving_texture(height: int, width: int, num_frames: int, velocity, seed: int) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB: a smooth random texture moving by ``velocity`` px per frame."""
    rng = np.random.default_rng(seed)
    pad = int(np.ceil(np.abs(velocity).max() * num_frames)) + 16
    canvas = rng.uniform(0, 255, (height + 2 * pad, width + 2 * pad)).astype(np.float32)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 2.5)
    canvas = (canvas - canvas.mean()) / canvas.std() * 45 + 128
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        # dst(x) = canvas(x + pad - v t): content moves by +v t (a pure translation, so the
        # pixel-centre vs raster convention does not matter here)
        m = np.float32([[1, 0, -pad + velocity[0] * t], [0, 1, -pad + velocity[1] * t]])
        img = cv2.warpAffine(canvas, m, (width, height), flags=cv2.INTER_CUBIC)
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)[..., None]
    return frames


def time_rounds(fns, repeats: int) -> list[tuple[float, float, object]]:
    """Per function: (best wall s, median wall s, last output). Rounds interleave the
    functions, so that load from other processes affects them alike."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t), o) for t, o in zip(times, outs, strict=True)]


def plain_lk_forward(frames: np.ndarray, queries: np.ndarray, lk: LKTracker) -> np.ndarray:
    """Baseline: chain cv2.calcOpticalFlowPyrLK forward from frame 0, no checks."""
    gray = to_gray(frames)
    p = np.ascontiguousarray(queries[:, 1:3] - 0.5, dtype=np.float32)
    tracks = np.empty((len(p), len(gray), 2), np.float32)
    tracks[:, 0] = p + 0.5
    for t in range(len(gray) - 1):
        p, _, _ = lk._lk(gray[t], gray[t + 1], p)
        p = p.reshape(-1, 2)
        tracks[:, t + 1] = p + 0.5
    return tracks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--grid", type=int, default=20, help="grid_size; points = grid**2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cotracker-repo", metavar="DIR", help="local co-tracker checkout: add a CoTracker section"
    )
    ap.add_argument("--cotracker-grid", type=int, default=5, help="CoTracker grid_size")
    ap.add_argument(
        "--cotracker-variants",
        default="cotracker3_offline",
        help="comma-separated: cotracker3_offline, cotracker3_online",
    )
    ap.add_argument("--cotracker-repeats", type=int, default=1)
    args = ap.parse_args()

    velocity = np.array([1.37, -0.61])
    frames = moving_texture(args.height, args.width, args.frames, velocity, args.seed)
    queries = grid_queries(args.grid, args.height, args.width, frame=0)
    truth = queries[:, None, 1:3] + velocity[None, None, :] * np.arange(args.frames)[:, None]

    lk = LKTracker()
    lk_fb_only = LKTracker(min_ncc=None)
    lk_recover = make_tracker("lk_recover")
    dis = DISTracker()
    rows = [
        ("lk", lambda: lk.track(frames, queries)),
        ("lk_recover (tiny default)", lambda: lk_recover.track(frames, queries)),
        ("lk, no appearance check", lambda: lk_fb_only.track(frames, queries)),
        ("baseline: plain LK forward", lambda: plain_lk_forward(frames, queries, lk)),
        ("dis", lambda: dis.track(frames, queries)),
    ]

    print(
        f"video {args.frames}x{args.height}x{args.width}, {len(queries)} grid points, "
        f"motion {velocity.tolist()} px/frame; opencv {cv2.__version__}, "
        f"{cv2.getNumThreads()} threads, {os.cpu_count()} cpus, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    header = f"{'tracker':<28} {'frames/s':>9} {'(median)':>9} {'x base':>7} {'vis %':>6} "
    header += f"{'med err':>8} {'p99 err':>8}"
    print(header)
    print("-" * len(header))

    timed = time_rounds([fn for _, fn in rows], args.repeats)
    base_fps = args.frames / timed[3][0]
    for (name, _), (best, med, out) in zip(rows, timed, strict=True):
        if isinstance(out, np.ndarray):
            tracks, vis = out, np.ones(out.shape[:2], bool)
        else:
            tracks, vis = out.tracks, out.visible
        err = np.linalg.norm(tracks - truth, axis=-1)[vis]
        fps = args.frames / best
        print(
            f"{name:<28} {fps:>9.1f} {args.frames / med:>9.1f} {fps / base_fps:>7.2f} "
            f"{100 * vis.mean():>6.1f} {np.median(err):>8.3f} {np.percentile(err, 99):>8.3f}"
        )

    gray = to_gray(frames)
    win = (lk.win_size, lk.win_size)
    ((best, _, _),) = time_rounds(
        [lambda: [cv2.buildOpticalFlowPyramid(g, win, lk.max_level) for g in gray]], args.repeats
    )
    print(f"pyramid build (with derivatives): {1000 * best / len(gray):.2f} ms per frame")

    if args.cotracker_repo:
        bench_cotracker(args, frames, velocity, lk)


def bench_cotracker(args, frames: np.ndarray, velocity: np.ndarray, lk: LKTracker) -> None:
    """CoTracker3 (random weights, CPU) next to LK on the same video and the same points."""
    import torch

    from datagen.track.cotracker import CoTrackerTracker

    queries = grid_queries(args.cotracker_grid, args.height, args.width, frame=0)
    n, t = len(queries), args.frames
    truth = queries[:, None, 1:3] + velocity[None, None, :] * np.arange(t)[:, None]
    print(
        f"\nCoTracker section: {n} grid points, {t} frames, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; RANDOM weights: accuracy/visibility meaningless"
    )
    header = f"{'tracker':<36} {'load s':>7} {'track s':>8} {'s/frame':>8} {'ms/(f*pt)':>10} "
    header += f"{'vis %':>6} {'med err':>8}"
    print(header)
    print("-" * len(header))

    def row(name, load_s, best, out):
        # visible points after the query frame (frame 0), where the error is 0 by construction
        err = np.linalg.norm(out.tracks - truth, axis=-1)[:, 1:][out.visible[:, 1:]]
        med = f"{np.median(err):>8.3f}" if err.size else f"{'-':>8}"
        print(
            f"{name:<36} {load_s:>7.2f} {best:>8.3f} {best / t:>8.3f} "
            f"{1000 * best / (t * n):>10.3f} {100 * out.visible.mean():>6.1f} {med}"
        )

    ((best, _, out),) = time_rounds([lambda: lk.track(frames, queries)], args.repeats)
    row("lk", 0.0, best, out)
    for variant in [v.strip() for v in args.cotracker_variants.split(",") if v.strip()]:
        ct = CoTrackerTracker(
            variant=variant, repo=args.cotracker_repo, pretrained=False, device="cpu"
        )
        t0 = time.perf_counter()
        ct.load()
        load_s = time.perf_counter() - t0
        ((best, _, out),) = time_rounds(
            [lambda ct=ct: ct.track(frames, queries)], args.cotracker_repeats
        )
        row(f"{variant} (random weights)", load_s, best, out)


if __name__ == "__main__":
    main()
