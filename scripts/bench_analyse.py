"""Analysis throughput (videos/s) from stored correspondence and from stored q/k, against the
time to read the same bytes, at CogVideoX-2B size.

Usage: python scripts/bench_analyse.py [--videos 2] [--layers 30] [--steps 6] [--qk-pairs 2]
       [--queries 400] [--repeats 3] [--threads N] [--small]

Defaults follow the ``cogvideox-2b`` preset: 49 frames at 480x720 (13 token frames of 30x45
tokens, 30 heads of 64 channels), correspondence for 30 layers x 6 steps, q/k (fp16) for one
layer at 2 steps (2 x 135 MB a video), 400 frame-0 query points. Inputs are synthetic (random
tracks and arrays of the stored shapes and dtypes; q/k standard normal); the analysis code is
the one ``datagen analyse --report`` runs per video (:class:`datagen.analysis.collect`'s
per-video step: matching, confidence, attention split and TAP-Vid tracking of every captured
cell, the no-motion and pixel-patch baselines, and for q/k the recomputed matches).

Each video's members are written once to files (safetensors, as the shards hold them). Per
mode, timed in the same run, best of ``--repeats``:

* ``read``: read the member files and decode them (the floor: page-cached reads, no analysis);
* ``read + analyse``: the same, then the per-video analysis.

The ratio ``read + analyse`` / ``read`` says how far the analysis is from reading speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _layout(small: bool) -> dict:
    from datagen.layout import TokenLayout

    if small:
        return TokenLayout("cogvideox", 9, 96, 144, (4, 8, 8), (1, 2, 2), 226, "first").to_json()
    return TokenLayout("cogvideox", 49, 480, 720, (4, 8, 8), (1, 2, 2), 226, "first").to_json()


def _video(rng, args, lay: dict, folder: Path, i: int) -> dict:
    """Write one video's members; return what stays in memory (metadata, labels, frames)."""
    import safetensors.numpy

    frames_tok, h, w = lay["token_grid"]
    t, n = h * w, args.queries
    heads, d = (30, 64) if not args.small else (4, 16)
    layers, steps = list(range(args.layers)), list(range(args.steps))
    qxy = rng.uniform(0, [lay["width"], lay["height"]], size=(n, 2)).astype(np.float32)
    drift = rng.normal(0, 3, size=(n, lay["num_frames"], 2)).cumsum(1)
    tracks = (qxy[:, None] + drift).astype(np.float32)
    shape = (args.layers, args.steps, n)
    corr = {
        "match_forward": rng.integers(0, t, size=(*shape, frames_tok)).astype(np.int32),
        "soft_forward": rng.uniform(0, w, size=(*shape, frames_tok, 2)).astype(np.float32),
        "match_prob": rng.random((*shape, frames_tok), np.float32),
        "match_reverse": rng.integers(0, t, size=(args.layers, args.steps, frames_tok, t)).astype(
            np.int32
        ),
        "confidence": rng.random((*shape, frames_tok), np.float32),
        "mass_text": rng.random(shape, np.float32),
        "mass_own_frame": rng.random(shape, np.float32),
        "mass_other_frames": rng.random(shape, np.float32),
        "mass_per_frame": rng.random((*shape, frames_tok), np.float32),
    }
    (folder / f"{i}.corr.safetensors").write_bytes(safetensors.numpy.save(corr))
    qk = {}
    for p in range(args.qk_pairs):
        for kind in ("q", "k"):
            name = f"{kind}.layer{17 % args.layers:03d}.step{steps[-1 - p]:03d}"
            qk[name] = rng.standard_normal((heads, frames_tok, t, d), np.float32).astype(np.float16)
    (folder / f"{i}.qk.safetensors").write_bytes(safetensors.numpy.save(qk))
    return {
        "key": f"bench-{i}",
        "meta": {
            "layout": lay,
            "capture": {
                "corr_layers": layers,
                "corr_steps": steps,
                "step_timesteps": {str(s): 999 - 20 * s for s in steps},
            },
            "prompt": {"category": "bench", "set": "object"},
            "tracker": {"name": "cotracker3_offline"},
        },
        "queries": np.concatenate([np.zeros((n, 1), np.float32), qxy], axis=1),
        "tracks": tracks,
        "visible": rng.random((n, lay["num_frames"])) < 0.9,
        "frames": rng.integers(
            0, 256, (lay["num_frames"], lay["height"], lay["width"], 3), np.uint8
        ),
    }


def _read(folder: Path, i: int, qk: bool) -> tuple[dict, dict, int]:
    from datagen.sampleformat import safetensors_arrays

    corr_bytes = (folder / f"{i}.corr.safetensors").read_bytes()
    corr = safetensors_arrays(corr_bytes)
    feats, size = {}, len(corr_bytes)
    if qk:
        qk_bytes = (folder / f"{i}.qk.safetensors").read_bytes()
        feats = safetensors_arrays(qk_bytes)
        size += len(qk_bytes)
    return corr, feats, size


def _run(folder: Path, videos: list[dict], qk: bool, analyse: bool) -> tuple[float, int]:
    from datagen.analysis.collect import StudyOptions, _Collector

    col = _Collector(StudyOptions(qk=qk))
    size = 0
    t0 = time.perf_counter()
    for i, v in enumerate(videos):
        corr, feats, n = _read(folder, i, qk)
        size += n
        if analyse:
            col.video(v | {"correspondence": corr, "features": feats})
    return time.perf_counter() - t0, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--qk-pairs", type=int, default=2)
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--small", action="store_true", help="a small layout, for a quick check")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    lay = _layout(args.small)
    out = {"layout": lay["token_grid"], "threads": torch.get_num_threads(), "videos": args.videos}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = [_video(rng, args, lay, folder, i) for i in range(args.videos)]
        for mode, qk in (("correspondence", False), ("q/k", True)):
            times = {}
            for analyse in (False, True):
                best, size = min(
                    _run(folder, videos, qk, analyse) for _ in range(max(1, args.repeats))
                )
                times[analyse] = best
            row = {
                "bytes_per_video": size // args.videos,
                "read_s": times[False],
                "read_analyse_s": times[True],
                "videos_per_s": args.videos / times[True],
                "read_videos_per_s": args.videos / times[False],
                "ratio": times[True] / times[False],
            }
            out[mode] = row
            print(
                f"{mode:>15}: {row['videos_per_s']:.3g} videos/s analysed "
                f"({row['bytes_per_video'] / 2**20:.1f} MiB a video); reading alone "
                f"{row['read_videos_per_s']:.3g} videos/s; read + analyse / read = "
                f"{row['ratio']:.1f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
