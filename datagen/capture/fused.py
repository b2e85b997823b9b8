"""Fused CPU kernels for the correspondence softmaxes: built at first use, optional.

``corr_kernels.c`` (next to this file) does everything that follows the logit GEMMs of
:func:`datagen.capture.correspondence.compute_correspondence` in one pass per row: per-head
max / exp / sum, head sums, argmax, maxima, soft-argmax and attention mass. It has no Python or
torch headers, so any C compiler builds it in about a second (``cc -O3 -march=native
-fopenmp-simd -fno-math-errno -fno-trapping-math -shared``). The library is cached under
``$DATAGEN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/datagen`` or ``~/.cache/datagen``), keyed by
the source, the compiler, its flags and this CPU's feature flags, so a home directory shared by
different machines gets one build per CPU type.

Before first use the library is checked against the torch reference on a small random case; a
library that fails to build, load or agree is not used (one warning says why) and the torch path
runs instead, with the same results up to float rounding. ``DATAGEN_FUSED=0`` turns the kernels
off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["kernels", "forward", "reverse", "pack_keys", "exp2", "cache_dir"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("corr_kernels.c")
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
NATIVE = ["-march=native"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_C = ctypes.c_int
_SIGNATURES = {
    "dg_exp2_n": [_P, _I, _P],
    "dg_pack_keys": [_P, _I, _P, _I, _C, _I, ctypes.c_float, _I, _I, _I, _P],
    "dg_reverse": [_P, _C, _P, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P],
    "dg_forward": [_P, _C, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P],
}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""Input dtypes the kernels read (converted to float32 inside)."""
PANEL = 16
"""Keys per packed panel (the GEMM tile's width)."""
LOG2E = 1.4426950408889634
"""Keys are packed pre-scaled by this too: the kernels work in base 2."""
REVERSE_GROUP = 96
"""Query rows per group in the reverse kernel (its logits and head sums stay in L2)."""
FORWARD_GROUP = 48
"""Query rows per group in the forward kernel (the keys are read once per group)."""


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("DATAGEN_CACHE_DIR"):
        return Path(os.environ["DATAGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "datagen"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _build(cc: str, out: Path) -> None:
    """Compile SOURCE into out (atomically); retry without -march=native if that fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (NATIVE, []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *FLAGS, *arch, "-o", tmp, str(SOURCE), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            os.unlink(tmp)
            raise RuntimeError(f"{cc} did not build {SOURCE.name} within 300 s") from None
        if proc.returncode == 0:
            os.replace(tmp, out)
            return
        os.unlink(tmp)
        errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[-1][0]}")


def _self_test(lib: ctypes.CDLL) -> None:
    """Compare both kernels with plain torch on a small random case (raises on disagreement)."""
    gen = torch.Generator().manual_seed(0)
    heads, rows, frames, tokens, text, d = 3, 8, 2, 21, 4, 5
    q = torch.randn(heads, rows, d, generator=gen)
    k = torch.randn(heads, text + frames * tokens, d, generator=gen)
    logits = q @ k.transpose(1, 2)  # (heads, rows, text + F*T), scale 1
    video = logits[..., text:].unflatten(-1, (frames, tokens))
    kp = _pack(lib, k[:, text:], k[:, :text], 1.0, threads=2)
    pair, full, mass = _run_forward(lib, q, kp, text, frames, tokens, threads=2, group=7)
    ref_full = torch.softmax(logits, -1).sum(0)
    ok = (
        torch.allclose(pair, torch.softmax(video, -1).sum(0), atol=1e-5)
        and torch.allclose(full, ref_full[..., text:].unflatten(-1, (frames, tokens)), atol=1e-5)
        and torch.allclose(mass[:, 0], ref_full[..., :text].sum(-1), atol=1e-5)
        and torch.allclose(mass[:, 1:], full.sum(-1), atol=1e-5)
    )
    k0 = k[:, text : text + tokens]
    kp0 = _pack(lib, k0, None, 1.0, threads=2)
    rev = _run_reverse(lib, q, kp0, tokens, threads=2, group=7)
    ref = torch.softmax(q @ k0.transpose(1, 2), -1).sum(0).argmax(-1)
    ok = ok and torch.equal(rev, ref)
    for dtype in (torch.float16, torch.bfloat16):  # the in-kernel conversions
        qh = q.to(dtype)
        rev = _run_reverse(lib, qh, kp0, tokens, threads=1)
        ok = ok and torch.equal(rev, torch.softmax(qh.float() @ k0.mT, -1).sum(0).argmax(-1))
    if not ok:
        raise RuntimeError("built kernels disagree with torch on the self-test")


_lock = threading.Lock()


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (kernels off, no compiler, or a failed build/check)."""
    if os.environ.get("DATAGEN_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        cc = _compiler()
        if cc is None:
            log.warning("no C compiler found: correspondence runs on the (slower) torch path")
            return None
        key = hashlib.sha256()
        for part in (
            SOURCE.read_bytes(),
            cc.encode(),
            " ".join(FLAGS + NATIVE).encode(),
            _cpu_signature().encode(),
            sys.platform.encode(),
        ):
            key.update(part)
            key.update(b"\0")
        path = cache_dir() / "kernels" / f"corr_kernels-{key.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                _build(cc, path)
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                getattr(lib, name).argtypes = argtypes
                getattr(lib, name).restype = None
            _self_test(lib)
        except (OSError, RuntimeError) as exc:
            log.warning("fused correspondence kernels unavailable (%s); using the torch path", exc)
            return None
        return lib


_pools: dict[int, ThreadPoolExecutor] = {}


def _forget_pools() -> None:
    """A forked child inherits the pool objects but not their threads: start new ones there."""
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, n)) for i in range(0, n, max(1, chunk))]


def _parallel(fn, n: int, threads: int, chunk: int | None = None) -> list:
    """fn(i0, i1) over ranges of range(n) on ``threads`` threads; ctypes calls drop the GIL.

    The ranges (``chunk`` long, default about a quarter of a thread's share) are handed out as
    threads become free, so a core slowed by another process does not hold the others up.
    """
    if n <= 0:
        return []
    if threads <= 1:
        return [fn(0, n)]
    spans = _spans(n, chunk or -(-n // (4 * threads)))
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="datagen-corr")
    return [fut.result() for fut in [pool.submit(fn, a, b) for a, b in spans]]


def _input(t: torch.Tensor, name: str) -> int:
    """The kernels' dtype code of a contiguous CPU input (ValueError otherwise)."""
    if t.dtype not in DTYPES or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32/float16/bfloat16 CPU tensor")
    return DTYPES[t.dtype]


def _packed_width(kp: torch.Tensor, q: torch.Tensor, keys: int) -> int:
    """Padded key count of :func:`pack_keys` output ``kp`` holding ``keys`` keys for ``q``."""
    heads, _, d = q.shape
    padded = kp.shape[1] * PANEL if kp.dim() == 4 else 0
    if (
        kp.shape != (heads, padded // PANEL, d, PANEL)
        or kp.dtype != torch.float32
        or kp.device.type != "cpu"
        or not kp.is_contiguous()
        or not 0 < keys <= padded
    ):
        raise ValueError(
            f"packed keys {tuple(kp.shape)} ({kp.dtype}) are not pack_keys output for "
            f"{keys} keys and q of shape {tuple(q.shape)}"
        )
    return padded


def _pack(
    lib: ctypes.CDLL,
    keys: torch.Tensor,
    text: torch.Tensor | None,
    scale: float,
    threads: int,
) -> torch.Tensor:
    heads, width, d = keys.shape
    n_text = 0
    if text is not None and text.shape[1]:
        n_text = text.shape[1]
        if text.dtype != keys.dtype:  # one dtype code per call: widen both
            keys, text = keys.float(), text.float()
        text = text.contiguous()
    keys = keys.contiguous()
    code = _input(keys, "keys")
    if n_text:
        _input(text, "text keys")
    padded = -(-(n_text + width) // PANEL) * PANEL
    out = torch.empty(heads, padded // PANEL, d, PANEL)

    def work(h0: int, h1: int) -> None:
        lib.dg_pack_keys(
            text.data_ptr() if n_text else None, n_text, keys.data_ptr(), width, code, d,
            scale * LOG2E, padded, h0, h1, out.data_ptr(),
        )  # fmt: skip

    _parallel(work, heads, threads)
    return out


def _run_reverse(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    kp: torch.Tensor,
    tokens: int,
    threads: int,
    group: int = REVERSE_GROUP,
) -> torch.Tensor:
    code = _input(q, "q")
    heads, rows, d = q.shape
    padded = _packed_width(kp, q, tokens)
    out = torch.empty(rows, dtype=torch.int64)

    def work(r0: int, r1: int) -> None:
        g = max(1, min(group, r1 - r0))
        buf = torch.empty(g * (padded + tokens + d + 9))
        lib.dg_reverse(
            q.data_ptr(), code, kp.data_ptr(), heads, rows, d, tokens, padded, r0, r1, g,
            buf.data_ptr(), out.data_ptr(),
        )  # fmt: skip

    share = -(-rows // (4 * max(1, threads)))  # a quarter of a thread's rows, whole groups
    _parallel(work, rows, threads, chunk=-(-share // group) * group)
    return out


def _run_forward(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    kp: torch.Tensor,
    text: int,
    frames: int,
    tokens: int,
    threads: int,
    group: int = FORWARD_GROUP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    code = _input(q, "q")
    heads, rows, d = q.shape
    padded = _packed_width(kp, q, text + frames * tokens)
    pair = torch.zeros(rows, frames, tokens)
    full = torch.zeros(rows, frames, tokens)
    mass = torch.zeros(rows, frames + 1)

    # on several threads each range is one group (the keys are read once per range)
    chunk = max(1, min(2 * group, -(-rows // (4 * threads)))) if threads > 1 else group

    def work(r0: int, r1: int) -> None:
        g = max(1, min(chunk, r1 - r0))
        buf = torch.empty(g * (padded + d + 9) + 2 * frames)
        lib.dg_forward(
            q.data_ptr(), code, kp.data_ptr(), heads, rows, d, text, frames, tokens, padded,
            r0, r1, g, buf.data_ptr(), pair.data_ptr(), full.data_ptr(), mass.data_ptr(),
        )  # fmt: skip

    _parallel(work, rows, threads, chunk=chunk)
    return pair, full, mass


def pack_keys(
    keys: torch.Tensor,
    text: torch.Tensor | None = None,
    scale: float = 1.0,
    threads: int | None = None,
) -> torch.Tensor:
    """Keys ``(H, W, d)`` (after ``(H, L, d)`` text keys, if given) as the kernels' panels.

    Returns ``(H, ceil((L + W) / 16), d, 16)`` float32, zero-padded, every value multiplied by
    ``scale * log2(e)`` (the kernels work in base 2). Needs :func:`kernels` (RuntimeError).
    """
    return _pack(_require(), keys, text, scale, threads or torch.get_num_threads())


def reverse(q: torch.Tensor, kp: torch.Tensor, tokens: int, threads: int | None = None):
    """Reverse matches ``argmax_j sum_h softmax_j(scale * q[h, r] . k[h, j])`` of every row r.

    ``q``: contiguous ``(H, N, d)`` rows (float32, float16 or bfloat16); ``kp``:
    :func:`pack_keys` of the ``(H, tokens, d)`` keys. Returns ``(N,)`` int64. Needs
    :func:`kernels` (RuntimeError).
    """
    return _run_reverse(_require(), q, kp, tokens, threads or torch.get_num_threads())


def forward(
    q: torch.Tensor,
    kp: torch.Tensor,
    text: int,
    frames: int,
    tokens: int,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head sums of the frame-pair and full-sequence softmaxes of ``(H, N, d)`` query rows.

    ``kp``: :func:`pack_keys` of the ``(H, frames*tokens, d)`` video keys after ``text`` text
    keys. Returns ``pair (N, F, T)`` (sum over heads of the softmax over frame f's keys),
    ``full (N, F, T)`` (sum over heads of the softmax over all keys, frame f's part) and
    ``mass (N, 1 + F)`` (that softmax's sum over the text keys, then over each frame's keys).
    Divide by H for head means. Needs :func:`kernels` (RuntimeError).
    """
    return _run_forward(_require(), q, kp, text, frames, tokens, threads or torch.get_num_threads())


def exp2(x: torch.Tensor) -> torch.Tensor:
    """The kernels' ``2**x`` for float32 ``x <= 0`` (exposed for tests)."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    _require().dg_exp2_n(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def _require() -> ctypes.CDLL:
    lib = kernels()
    if lib is None:
        raise RuntimeError("fused kernels are not available")
    return lib
