"""Time and memory of compute_correspondence against the GEMM floor and a naive full map.

Usage: python scripts/bench_correspondence.py [--small] [--heads 30] [--frames 13] [--height 30]
       [--width 45] [--dim 64] [--text 226] [--queries 400] [--repeats 3] [--skip-naive]
       [--row-chunk 128] [--head-chunk H] [--fwd-chunk 128] [--threads N]

Defaults are CogVideoX-2B at 480x720, 49 frames: 13 latent frames of 30x45 tokens (17,550 video
tokens), 30 heads of 64 channels, 226 text tokens; 400 query points. Inputs are synthetic fp16
q/k (standard normal). Every variant runs in a fresh subprocess, so its memory is its own:

* ``matmul rate``: best of a few 3072^3 float32 torch.matmul calls, measured before and after
  the other variants (the larger is used: the floor is never flattered), and again right
  before every timed call of ours and of the torch path: each call's time over the floor from
  that rate is printed too (the machine's speed drifts by 20% between runs when it is shared;
  these paired ratios do not);
* ``GEMM floor``: the FLOPs of the matmuls the outputs need, over that rate: queries x (text +
  all video keys) for the forward direction and the full-sequence softmax (one product serves
  both), plus every video token x frame 0's keys for the reverse direction:
  ``2 * heads * d * (N * (L + F*T) + F * T * T)``;
* ``ours``: compute_correspondence with the fused C kernels (``fused=True``; built before the
  timed calls); the first (cold) call gives the peak memory, the time is the best of
  ``--repeats`` further calls (median shown too: other processes on the machine add noise; on
  a shared 2-core machine each multi-threaded op can wait a scheduler tick for its second
  thread, so compare runs at similar load averages, or pass ``--threads 1`` for numbers that
  other processes barely move);
* ``torch path``: compute_correspondence with ``fused=False`` (default chunks unless given),
  the implementation used on GPUs and where no C compiler exists;
* ``torch path's matmuls alone``: only the batched matmuls the torch path issues (same shapes
  and chunks, no softmax): what the GEMM floor becomes at its shapes;
* ``naive``: per head, the full (video queries x all keys) logit map, sliced into the full
  softmax of the queries, the frame-pair softmaxes and the reverse frame pairs; one call.

Extra memory is the peak resident set during the call minus the resident set before it (peak
reset through /proc/self/clear_refs; without it, ru_maxrss deltas). The outputs of ours and
naive are compared at the end (argmax agreement and largest probability difference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from datagen.capture import fused as fused_kernels
from datagen.capture.correspondence import (
    DEFAULT_FWD_CHUNK,
    DEFAULT_ROW_CHUNK_CPU,
    compute_correspondence,
    token_grid_xy,
)

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(heads=8, frames=5, height=12, width=16, dim=64, text=32, queries=64)


# ---- measurement helpers ----------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra resident memory of a block: VmHWM after a reset, else ru_maxrss deltas."""

    def __enter__(self):
        self.base = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the peak resident set size (VmHWM) to the current one
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"
            self.base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            with open("/proc/self/status") as fh:
                hwm = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:"))
            self.extra = max(0, hwm - self.base)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.extra = max(0, peak - max(self.base, self.base_max))
        return False


def make_inputs(a: argparse.Namespace):
    """fp16 q/k built frame by frame (no float32 copy of the whole tensor, no RSS spike)."""
    g = torch.Generator().manual_seed(a.seed)
    tokens = a.height * a.width
    q = torch.empty(a.heads, a.frames, tokens, a.dim, dtype=torch.float16)
    k = torch.empty_like(q)
    for f in range(a.frames):
        q[:, f] = torch.randn(a.heads, tokens, a.dim, generator=g)
        k[:, f] = torch.randn(a.heads, tokens, a.dim, generator=g)
    kt = torch.randn(a.heads, a.text, a.dim, generator=g).half() if a.text else None
    qt = torch.randperm(tokens, generator=g)[: a.queries]
    return q, k, kt, qt


def needed_flops(a: argparse.Namespace) -> tuple[float, float]:
    tokens = a.height * a.width
    forward = 2.0 * a.heads * a.dim * a.queries * (a.text + a.frames * tokens)
    reverse = 2.0 * a.heads * a.dim * a.frames * tokens * tokens
    return forward, reverse


# ---- variants ---------------------------------------------------------------------------------
def naive_correspondence(q, k, kt, qt, scale, h, w) -> dict[str, np.ndarray]:
    """Per head, the full (F*T x (L + F*T)) logit map, then every softmax sliced out of it."""
    heads, frames, tokens, d = q.shape
    n_text = 0 if kt is None else kt.shape[1]
    n = qt.numel()
    grid = token_grid_xy(h, w)
    full = torch.zeros(n, n_text + frames * tokens)
    pair = torch.zeros(n, frames, tokens)
    rev = torch.zeros(frames, tokens, tokens)
    logits = torch.empty(frames * tokens, n_text + frames * tokens)  # reused: no page faults
    for hh in range(heads):
        keys = k[hh].reshape(-1, d).float()
        if kt is not None:
            keys = torch.cat([kt[hh].float(), keys])
        torch.matmul(q[hh].reshape(-1, d).float() * scale, keys.T, out=logits)  # the whole map
        rows = logits[qt]  # frame-0 query tokens
        full += torch.softmax(rows, dim=-1)
        for f in range(frames):
            cols = slice(n_text + f * tokens, n_text + (f + 1) * tokens)
            pair[:, f] += torch.softmax(rows[:, cols], dim=-1)
            rev[f] += torch.softmax(
                logits[f * tokens : (f + 1) * tokens, n_text : n_text + tokens], -1
            )
        del rows
    full /= heads
    pair /= heads
    video = full[:, n_text:].reshape(n, frames, tokens)
    per_frame = video.sum(-1)
    return {
        "match_forward": pair.argmax(-1).int().numpy(),
        "soft_forward": (pair @ grid).numpy(),
        "match_prob": pair.amax(-1).numpy(),
        "match_reverse": rev.argmax(-1).int().numpy(),
        "confidence": video.amax(-1).numpy(),
        "mass_text": full[:, :n_text].sum(-1).numpy(),
        "mass_own_frame": per_frame[:, 0].numpy(),
        "mass_other_frames": per_frame[:, 1:].sum(-1).numpy(),
        "mass_per_frame": per_frame.numpy(),
    }


def matmuls_only(q, k, kt, qt, scale, row_chunk, head_chunk, fwd_chunk) -> None:
    """The logit matmuls compute_correspondence issues, with the same blocks, and no more."""
    heads, frames, tokens, d = q.shape
    k_all = k.reshape(heads, -1, d).float().mul_(scale)
    k_all_t = k_all.transpose(1, 2)
    k0_t = k_all[:, :tokens].transpose(1, 2)
    kt_t = None if kt is None else kt.float().mul_(scale).transpose(1, 2)
    q_sel = q[:, 0].index_select(1, qt)
    n = qt.numel()
    block = min(fwd_chunk, max(1, n))
    scores = torch.empty(heads, block, tokens)
    for n0 in range(0, n, block):
        qc = q_sel[:, n0 : n0 + block].float()
        c = qc.shape[1]
        for f in range(frames):
            torch.bmm(qc, k_all_t[:, :, f * tokens : (f + 1) * tokens], out=scores[:, :c])
        if kt_t is not None:
            torch.bmm(qc, kt_t)
    q_rows = q.reshape(heads, -1, d)
    rows = min(row_chunk, q_rows.shape[1])
    hg = heads if head_chunk is None else min(head_chunk, heads)
    scores = torch.empty(hg, rows, tokens)
    for r0 in range(0, q_rows.shape[1], rows):
        qc = q_rows[:, r0 : r0 + rows].float()
        c = qc.shape[1]
        for h0 in range(0, heads, hg):
            g = min(hg, heads - h0)
            torch.bmm(qc[h0 : h0 + g], k0_t[h0 : h0 + g], out=scores[:g, :c])


def matmul_rate(size: int = 3072, calls: int = 5) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best = min(timed(lambda: torch.matmul(a, b, out=out))[0] for _ in range(calls))
    return 2.0 * size**3 / best / 1e9


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def worker(a: argparse.Namespace) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker == "rate":
        return {"gflops": matmul_rate()}
    q, k, kt, qt = make_inputs(a)
    scale = a.dim**-0.5
    torch.ones(64, 64) @ torch.ones(64, 64)  # load the BLAS and start the thread pool
    if a.worker in ("ours", "torch"):
        fused = a.worker == "ours"
        if fused:  # build (or load) the kernels outside the timed calls
            fused_kernels.kernels()

        def fn():
            return compute_correspondence(
                q,
                k,
                qt,
                k_text=kt,
                grid_hw=(a.height, a.width),
                row_chunk=a.row_chunk,
                head_chunk=a.head_chunk,
                fwd_chunk=a.fwd_chunk,
                fused=fused,
            )
    elif a.worker == "matmuls":

        def fn():
            return matmuls_only(q, k, kt, qt, scale, a.row_chunk, a.head_chunk, a.fwd_chunk)
    elif a.worker == "naive":

        def fn():
            return naive_correspondence(q, k, kt, qt, scale, a.height, a.width)
    else:
        raise SystemExit(f"unknown worker {a.worker}")
    with PeakMemory() as mem:
        cold, out = timed(fn)
    times, rates = [], []
    for _ in range(a.repeats if a.worker != "naive" else 0):
        # the matmul rate right before each timed call: a same-run baseline for its ratio
        rates.append(matmul_rate(calls=2))
        times.append(timed(fn)[0])
    times = times or [cold]
    if a.save and out is not None:
        arrays = out.to_numpy() if hasattr(out, "to_numpy") else out
        np.savez(a.save, **arrays)
    return {
        "cold": cold,
        "best": min(times),
        "median": statistics.median(times),
        "extra_mib": mem.extra / 2**20,
        "mem_method": mem.method,
        "times": times,
        "rates": rates,
    }


# ---- driver -----------------------------------------------------------------------------------
def run_worker(a: argparse.Namespace, name: str, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name]
    for key in ("heads", "frames", "height", "width", "dim", "text", "queries", "repeats"):
        cmd += [f"--{key}", str(getattr(a, key))]
    cmd += ["--row-chunk", str(a.row_chunk)]
    cmd += [] if a.head_chunk is None else ["--head-chunk", str(a.head_chunk)]
    cmd += ["--fwd-chunk", str(a.fwd_chunk)]
    cmd += ["--seed", str(a.seed)] + (["--save", save] if save else [])
    cmd += ["--threads", str(a.threads)] if a.threads else []
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(ours: dict, ref: dict) -> list[str]:
    lines = []
    for name in ("match_forward", "match_reverse"):
        agree = float(np.mean(ours[name] == ref[name])) * 100
        lines.append(f"  {name}: {agree:.3f}% equal")
    diffs = {
        n: float(np.abs(ours[n].astype(np.float64) - ref[n]).max())
        for n in ours
        if n not in ("match_forward", "match_reverse") and ours[n].size
    }
    worst = max(diffs, key=diffs.get)
    lines.append(
        f"  largest difference: {diffs[worst]:.1e} ({worst}); probabilities and masses: "
        f"{max(v for n, v in diffs.items() if n != 'soft_forward'):.1e}"
    )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--frames", type=int, default=13)
    p.add_argument("--height", type=int, default=30, help="token rows per latent frame")
    p.add_argument("--width", type=int, default=45, help="token columns per latent frame")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--text", type=int, default=226, help="text keys (0: none)")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--row-chunk", type=int, default=DEFAULT_ROW_CHUNK_CPU)
    p.add_argument("--head-chunk", type=int, default=None, help="default: all heads")
    p.add_argument("--fwd-chunk", type=int, default=DEFAULT_FWD_CHUNK)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="a quick run: " + str(SMALL))
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    if a.small:
        for key, value in SMALL.items():
            setattr(a, key, value)

    tokens = a.height * a.width
    print(
        f"size: heads={a.heads} frames={a.frames} grid={a.height}x{a.width} ({tokens} tokens/frame,"
        f" {a.frames * tokens} video tokens) d={a.dim} text={a.text} queries={a.queries}"
    )
    print(
        f"torch {torch.__version__}, {a.threads or torch.get_num_threads()} threads, chunks: "
        f"row_chunk={a.row_chunk} head_chunk={a.head_chunk or a.heads} fwd_chunk={a.fwd_chunk}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rate0 = run_worker(a, "rate")["gflops"]
        ours = run_worker(a, "ours", save=f"{tmp}/ours.npz")
        torch_path = run_worker(a, "torch", save=f"{tmp}/torch.npz")
        mm = run_worker(a, "matmuls")
        naive = None if a.skip_naive else run_worker(a, "naive", save=f"{tmp}/naive.npz")
        rate1 = run_worker(a, "rate")["gflops"]
        rate = max(rate0, rate1)
        fwd, rev = needed_flops(a)
        floor = (fwd + rev) / rate / 1e9
        print(
            f"float32 matmul rate: {rate0:.1f} / {rate1:.1f} GFLOP/s (before / after) -> {rate:.1f}"
        )
        print(
            f"FLOPs needed: forward+full {fwd / 1e9:.1f} G + reverse {rev / 1e9:.1f} G = "
            f"{(fwd + rev) / 1e9:.1f} G -> GEMM floor {floor:.3f} s"
        )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print()
        head = f"{'variant':<34}{'best s':>9}{'median s':>10}{'cold s':>9}{'x floor':>9}"
        head += f"{'x naive':>9}{'extra MiB':>11}"
        print(head)
        print("-" * len(head))
        print(f"{'GEMM floor (matmul rate)':<34}{floor:>9.3f}{'':>10}{'':>9}{1.0:>9.2f}")
        rows = [
            ("ours: compute_correspondence", ours),
            ("torch path (fused=False)", torch_path),
            ("torch path's matmuls alone", mm),
        ]
        if naive:
            rows.append(("naive: per-head full map", naive))
        for label, r in rows:
            vs_naive = f"{r['best'] / naive['best']:>9.3f}" if naive else f"{'-':>9}"
            print(
                f"{label:<34}{r['best']:>9.3f}{r['median']:>10.3f}{r['cold']:>9.3f}"
                f"{r['best'] / floor:>9.2f}{vs_naive}{r['extra_mib']:>11.1f}"
            )
        print()
        ours_np = dict(np.load(f"{tmp}/ours.npz"))
        fwd_rev = fwd + rev
        for label, r in (("ours", ours), ("torch path", torch_path)):
            ratios = sorted(
                t * g * 1e9 / fwd_rev for t, g in zip(r["times"], r["rates"], strict=True)
            )
            print(
                f"{label}: each timed call / the floor from the matmul rate measured just before "
                f"it: {' '.join(f'{x:.2f}' for x in ratios)} (median "
                f"{statistics.median(ratios):.2f})"
            )
        print(f"ours / floor = {ours['best'] / floor:.2f}", end="")
        if naive:
            print(
                f", ours / naive = {ours['best'] / naive['best']:.3f} (naive / ours = "
                f"{naive['best'] / ours['best']:.1f}x), memory naive / ours = "
                f"{naive['extra_mib'] / max(ours['extra_mib'], 1e-9):.1f}x"
            )
            print("ours vs naive outputs:")
            naive_np = dict(np.load(f"{tmp}/naive.npz"))
            print("\n".join(compare(ours_np, naive_np)))
        else:
            print()
        print("ours vs torch path outputs:")
        print("\n".join(compare(ours_np, dict(np.load(f"{tmp}/torch.npz")))))
        print(f"(memory measured with {ours['mem_method']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
