"""Loader throughput, every figure next to its baseline measured in the same run.

    python scripts/bench_load.py --data /tmp/loader-ds [--seconds 2] [--replicate 20]

1. core shards, non-video fields (tracks, visible, queries, confidence, correspondence,
   meta): samples/s of ``open_dataset(video=False)`` against webdataset's generic pipeline
   ``WebDataset(urls).decode()`` on the same shards (target >= 2x). The samples of ``--data``
   are replicated (new keys) into shards of 64 so that a pass takes a while.
2. feature shards (synthetic, ``--feature-mb`` per sample): MB/s of
   ``open_dataset(features=True)`` against a raw sequential read of the same tar bytes
   (1 MiB ``readinto``; target >= 0.8). Both touch every byte: the loader hashes each member
   (xxh3_64, ``verify="members"``); also shown: ``verify="none"``, where arrays are
   zero-copy views of the page cache and only one byte per 4 KiB page is touched.
3. video decode frames/s: the loader's frames against PyAV decoding the same mp4 bytes
   already in memory (datagen.sampleformat.decode_video, the decoder the loader calls: the
   ratio is the loader's own cost).
4. DataLoader workers: samples/s with video decode, 2 workers against 1.

Warm page cache throughout (each pipeline runs once before timing). Passes of a pipeline and
its baseline alternate, and each figure is the best pass, so that other load on a shared
machine affects both alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datagen.data import open_dataset
from datagen.sampleformat import FEATURE_MEMBER, decode_video, npy_bytes
from datagen.shards import write_shard

FINGERPRINT = "0" * 16


def best_rates(fns: list[Callable[[], float]], seconds: float, rounds: int) -> list[float]:
    """Best single-pass rate of each of ``fns`` (each returns the units it did), passes
    timed in alternation (A B A B ...) for at least ``rounds`` rounds and ``seconds`` per
    function, so that load from elsewhere on the machine hits them alike."""
    for fn in fns:
        fn()  # warm-up: page cache, imports, indexes
    best = [0.0] * len(fns)
    spent = [0.0] * len(fns)
    done = 0
    while done < rounds or min(spent) < seconds:
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            units = fn()
            elapsed = time.perf_counter() - start
            spent[i] += elapsed
            best[i] = max(best[i], units / elapsed)
        done += 1
    return best


def replicate_core(src: Path, out: Path, copies: int, per_shard: int = 64) -> int:
    ds = open_dataset(src, video=False)
    raw = [(k, {e: bytes(v) for e, v in m.items()}) for k, m, _ in ds.iter_raw()]
    samples = [(f"{k}-x{r:03d}", m) for r in range(copies) for k, m in raw]
    for i in range(0, len(samples), per_shard):
        write_shard(
            out, i // per_shard, {"core": dict(samples[i : i + per_shard])}, FINGERPRINT, []
        )
    return len(samples)


def synth_features(src: Path, out: Path, samples: int, mb: int, per_shard: int = 4) -> int:
    """Feature shards with ``mb`` MB of fp16 q/k per sample (core members copied from
    ``src``'s first sample)."""
    import safetensors.numpy

    first = next(open_dataset(src, video=False).iter_raw())[1]
    core = {e: bytes(v) for e, v in first.items()}
    rng = np.random.default_rng(0)
    elems = mb * (1 << 20) // 2 // 2  # two fp16 tensors
    shape = (elems // (13 * 64), 13, 64)
    for i in range(0, samples, per_shard):
        cores, feats = {}, {}
        for j in range(i, min(i + per_shard, samples)):
            key = f"feat{j:05d}-r00"
            cores[key] = dict(core, **{"tracks.npy": npy_bytes(np.zeros((1, 1, 2), np.float32))})
            t = {n: rng.standard_normal(shape).astype(np.float16) for n in ("q", "k")}
            feats[key] = {
                FEATURE_MEMBER: safetensors.numpy.save(
                    {f"{n}.layer000.step000": v for n, v in t.items()}
                )
            }
        write_shard(out, i // per_shard, {"core": cores, "features": feats}, FINGERPRINT, [])
    return sum(f.stat().st_size for f in out.glob("features-*.tar"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a built dataset folder")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per pipeline")
    ap.add_argument("--rounds", type=int, default=5, help="at least this many passes each")
    ap.add_argument("--replicate", type=int, default=20, help="copies of --data's samples")
    ap.add_argument("--feature-samples", type=int, default=16)
    ap.add_argument("--feature-mb", type=int, default=32)
    args = ap.parse_args()
    import webdataset as wds

    rows: list[tuple[str, str, str, str]] = []
    load0 = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="bench_load.") as tmp:
        core_dir, feat_dir = Path(tmp, "core"), Path(tmp, "features")
        core_dir.mkdir()
        feat_dir.mkdir()
        n = replicate_core(args.data, core_dir, args.replicate)
        urls = sorted(str(p) for p in core_dir.glob("core-*.tar"))

        # 1. core, non-video fields
        ours = open_dataset(str(core_dir / "core-*.tar"), video=False)

        def run_ours() -> float:
            return float(sum(1 for _ in ours))

        def run_wds() -> float:
            ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
            return float(sum(1 for _ in ds))

        a, b = best_rates([run_ours, run_wds], args.seconds, args.rounds)
        rows.append(
            (
                f"core, non-video fields ({n} samples, {len(urls)} shards)",
                f"{a:,.0f} samples/s",
                f"WebDataset.decode(): {b:,.0f} samples/s",
                f"{a / b:.2f}x (target >= 2x)",
            )
        )

        # 2. feature shards
        size = synth_features(args.data, feat_dir, args.feature_samples, args.feature_mb)
        feat_tars = sorted(feat_dir.glob("features-*.tar"))
        mb = size / 1e6

        def raw_read() -> float:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            for p in feat_tars:
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(view):
                        pass
            return mb

        def features(verify: str) -> Callable[[], float]:
            ds = open_dataset(
                str(feat_dir / "core-*.tar"), video=False, fields=[], features=True, verify=verify
            )

            def run() -> float:
                for s in ds:
                    for t in s["features"].values():
                        t.reshape(-1).view(np.uint8)[::4096].sum()  # one byte per page
                return mb

            return run

        base, *rates = best_rates(
            [raw_read, features("members"), features("none")], args.seconds, args.rounds
        )
        for verify, r in zip(("members", "none"), rates, strict=True):
            rows.append(
                (
                    f"features, {args.feature_mb} MB/sample, verify={verify}",
                    f"{r:,.0f} MB/s",
                    f"raw sequential read: {base:,.0f} MB/s",
                    f"{r / base:.2f} (target >= 0.8)",
                )
            )

        # 3. video decode
        from datagen.data import VideoSpec

        vds = open_dataset(args.data, fields=[])
        mp4s = {k: bytes(m["mp4"]) for k, m, _ in vds.iter_raw()}
        stored = {k: decode_video(m).shape[0] for k, m in mp4s.items()}

        def run_video(spec: VideoSpec) -> Callable[[], float]:
            ds = open_dataset(args.data, video=spec, fields=[])
            return lambda: float(sum(stored[s["key"]] for s in ds))

        def run_pyav() -> float:
            return float(sum(decode_video(m).shape[0] for m in mp4s.values()))

        specs = (
            ("uint8", VideoSpec()),
            ("float32", VideoSpec(dtype="float32")),
            ("stride 2, half size", VideoSpec(stride=2, size=(32, 48))),
        )
        pyav, *rates = best_rates(
            [run_pyav, *(run_video(spec) for _, spec in specs)], args.seconds, args.rounds
        )
        for (label, _), r in zip(specs, rates, strict=True):
            rows.append(
                (
                    f"video decode, {label} (stored frames decoded)",
                    f"{r:,.0f} frames/s",
                    f"PyAV on bytes in memory: {pyav:,.0f} frames/s",
                    f"{r / pyav:.2f}",
                )
            )

        # 4. DataLoader workers (video decode + labels, batches of 8)
        from torch.utils.data import DataLoader

        big = open_dataset(str(core_dir / "core-*.tar"))
        td = big.torch(batch_size=8, shuffle=True, seed=0)

        def loader(workers: int) -> Callable[[], float]:
            return lambda: float(
                sum(len(b["key"]) for b in DataLoader(td, batch_size=None, num_workers=workers))
            )

        one, two = best_rates([loader(1), loader(2)], 0, 2)
        rows.append(
            (
                f"DataLoader, video + labels, batch 8 ({os.cpu_count()} CPUs)",
                f"2 workers: {two:,.0f} samples/s",
                f"1 worker: {one:,.0f} samples/s",
                f"{two / one:.2f}x",
            )
        )

    print(f"load average before/after: {load0} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    head = ("measure", "datagen.data", "baseline (same run)", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
