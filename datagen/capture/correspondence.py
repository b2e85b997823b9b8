"""Online correspondence from captured attention queries and keys, without whole attention maps.

A video DiT's 3D self-attention links a point on one latent frame to the same point on other
frames. This module turns one layer's captured queries and keys into small per-point arrays
(matches, probabilities, attention mass) while never materialising a whole-layer attention map
(``tokens**2 x heads``): work is done in row blocks of ``heads x rows x keys`` scores.

Conventions
-----------
* Video tokens are frame-major: within the video part of the sequence, the token index is
  ``f * (h * w) + y * w + x`` for latent frame ``f``, token row ``y`` and token column ``x``.
  ``q_video`` / ``k_video`` hold the video tokens only, as ``(heads, F, h*w, d)`` (then pass
  ``grid_hw=(h, w)``) or ``(heads, F, h, w, d)``.
* Text keys are optional (``k_text``, ``(heads, L, d)``). Where they sit in the model's joint
  sequence (first for CogVideoX, last elsewhere) does not matter: a softmax does not depend on
  the order of its keys. Without text keys the "full" softmax runs over the video tokens only.
* Attention logits are ``q . k * scale`` with ``scale = d ** -0.5`` unless given: the real
  softmax scale of the model (not the head count).
* Points are in **token units, raster convention**: ``(0, 0)`` is the top-left corner of token
  ``(x=0, y=0)``, token centres sit at ``(x + 0.5, y + 0.5)``, a frame spans ``[0, w] x [0, h]``.
  Coordinates are always ``(x, y)``; token indices are ``y * w + x``.
* Head averaging follows DiffTrack: softmax per head, then the mean over heads of the
  probabilities; argmax / max / soft-argmax are taken on that head average.

What is computed (``N`` query tokens on latent frame 0, ``F`` frames, ``T = h * w``):

1. Forward matching, frame pair ``(0, f)``: ``P_h = softmax_j(q[h, 0, n] . k[h, f, j] * scale)``
   over frame ``f``'s tokens only, ``P = mean_h P_h``; ``match_forward = argmax_j P``,
   ``match_prob = max_j P``, ``soft_forward = sum_j P(j) * centre(j)``.
2. Reverse matching, frame pair ``(f, 0)``, for *every* token ``j`` of every frame ``f``:
   argmax over frame 0's tokens of ``mean_h softmax(q[h, f, j] . k[h, 0, :] * scale)``.
3. Full-sequence attention of the ``N`` query tokens: per head, softmax over all keys (text +
   every video token of every frame), then the mean over heads ``A``; ``confidence[n, f] =
   max_{j in frame f} A``, ``mass_per_frame[n, f] = sum_{j in frame f} A``, ``mass_text = sum
   over text keys``, ``mass_own_frame = mass_per_frame[:, 0]``, ``mass_other_frames = sum over
   f >= 1``. The masses sum to 1 up to rounding.

Cost and memory
---------------
Two implementations give the same results (to float rounding; the tests hold both to a naive
float64 reference):

* **Fused kernels** (default on the CPU for float32 / float16 / bfloat16 inputs; see
  :mod:`datagen.capture.fused`): C code built at first use. Groups of query rows go through
  every head: a register-blocked GEMM writes the group's logits for one head into a cache-sized
  buffer (keeping each row's maximum), and the softmax, the head sums and the per-frame sums
  are taken from it at once; one exponential per logit. The reverse direction keeps a group's
  head sums in cache and writes only the argmax; the forward direction adds each head's
  frame-pair and full-sequence probabilities into ``(N, F, T)`` sums, from which torch takes
  the argmax, maxima and soft-argmax. Extra memory: the packed keys (``heads x (L + F*T) x d``
  float32, 136 MB at CogVideoX-2B size), the two ``(N, F, T)`` sums (28 MB each for 400
  queries) and a few MB of buffers per thread: about 200 MB there.
* **torch path** (``fused=False``, CUDA tensors, float64, or where no C compiler is found):
  logits in float32 (float64 when an input is float64), a block at a time, with the softmax
  scale folded into one float copy of the keys:

  - forward + full sequence, for blocks of ``fwd_chunk`` query tokens, frame by frame: the
    ``heads x fwd_chunk x T`` logits against frame ``f``, their frame-pair softmax (kept for
    every frame: ``F x heads x fwd_chunk x T``), its head mean (match, max, soft-argmax) and
    each head's log-sum-exp over the frame (``lse = max logit - log(max prob)``, exact). Once
    all frames (and the text keys) are done, the per-head log-sum-exp over the whole sequence
    gives each frame's share of the full softmax, and the full-sequence probability of a token
    of frame ``f`` is ``P_pair * exp(lse_h(f) - lse_h(all))``: both directions come from one
    pass of logits, with no second matmul;
  - reverse, for blocks of ``row_chunk`` video query rows (any frames) and ``head_chunk``
    heads: the logits against frame 0's keys, softmax, head sum (accumulated), argmax.

  Extra memory is the float copy of the keys (``heads x F*T x d``), the forward block (``F x
  heads x fwd_chunk x T``) and two reverse blocks (``head_chunk x row_chunk x T``): about 450
  MB at CogVideoX-2B size with the defaults. Only device-agnostic torch operations are used:
  CUDA tensors are processed on their device (default reverse blocks of 1024 rows there;
  float32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32``, off by default), and
  results come back on the CPU.

Either way the matmul work is the minimum the outputs need, ``2 * heads * d * (N * (L + F*T) +
F*T*T)`` FLOPs, plus one ``exp`` per logit; whole-layer maps (``heads x tokens x tokens``, 37 GB
at CogVideoX-2B size) never exist. ``scripts/bench_correspondence.py`` measures both paths
against the GEMM floor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from datagen.capture import fused as fused_kernels

__all__ = [
    "CorrespondenceResult",
    "compute_correspondence",
    "token_grid_xy",
]

DEFAULT_ROW_CHUNK_CPU = 128
"""Video query rows per reverse-direction block on the CPU (all heads: ~20 MB at 2B size)."""
DEFAULT_ROW_CHUNK_GPU = 1024
"""Video query rows per reverse-direction block on other devices."""
DEFAULT_FWD_CHUNK = 128
"""Query tokens per forward block."""
FUSED_MIN_WORK = 4_000_000
"""Multiply-adds of a layer's logits from which ``fused=None`` picks the fused kernels (2 ms
vs 1.3 ms on the torch path at 0.1 M, 2 ms vs 4.5 ms at 7.5 M, on a 2-core CPU)."""
FUSED_PARALLEL_WORK = 32_000_000
"""Multiply-adds from which the fused kernels use all torch threads; below, handing work to
threads costs more than it saves (a tiny-preset layer: 1.0 ms on one thread, 1.5 ms on two)."""


def token_grid_xy(
    h: int, w: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(h*w, 2)`` token centres ``(x + 0.5, y + 0.5)`` in token units, row ``y * w + x``."""
    if h < 1 or w < 1:
        raise ValueError(f"token grid must be at least 1x1, got h={h}, w={w}")
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1) + 0.5


@dataclass
class CorrespondenceResult:
    """Per-layer correspondence arrays; torch tensors on the CPU.

    ``N`` query tokens, ``F`` latent frames, ``T = h * w`` tokens per frame. Token indices are
    within a frame (``y * w + x``); points are ``(x, y)`` in token units (raster convention).
    """

    match_forward: torch.Tensor
    """(N, F) int64: argmax token in frame f of the head-averaged frame-pair (0, f) softmax."""
    soft_forward: torch.Tensor
    """(N, F, 2) float32: soft-argmax (x, y) under that probability (token centres at +0.5)."""
    match_prob: torch.Tensor
    """(N, F) float32: max of the head-averaged frame-pair probability."""
    match_reverse: torch.Tensor
    """(F, T) int64: for every token of frame f, argmax token of frame 0 (pair (f, 0))."""
    confidence: torch.Tensor
    """(N, F) float32: max over frame f's tokens of the head-averaged full-sequence softmax."""
    mass_text: torch.Tensor
    """(N,) float32: full-sequence attention mass on text keys (0 without text keys)."""
    mass_own_frame: torch.Tensor
    """(N,) float32: mass on frame 0 (the queries' own frame)."""
    mass_other_frames: torch.Tensor
    """(N,) float32: mass on frames 1..F-1."""
    mass_per_frame: torch.Tensor
    """(N, F) float32: mass on each frame."""
    grid_hw: tuple[int, int] = (0, 0)
    """(h, w) token grid of one latent frame."""

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Arrays under stable names for storage: indices as int32, everything else float32.

        Keys: ``match_forward`` (N, F) int32, ``soft_forward`` (N, F, 2) float32,
        ``match_prob`` (N, F) float32, ``match_reverse`` (F, h*w) int32, ``confidence``
        (N, F) float32, ``mass_text`` / ``mass_own_frame`` / ``mass_other_frames`` (N,)
        float32, ``mass_per_frame`` (N, F) float32.
        """
        out: dict[str, np.ndarray] = {}
        for fld in fields(self):
            value = getattr(self, fld.name)
            if not isinstance(value, torch.Tensor):
                continue
            value = value.detach().cpu()
            if value.dtype in (torch.int64, torch.int32):
                out[fld.name] = value.numpy().astype(np.int32)
            else:
                out[fld.name] = value.to(torch.float32).numpy()
        return out


def _video_shapes(
    q_video: torch.Tensor, k_video: torch.Tensor, grid_hw: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate q/k, return them as (heads, F, T, d) with the grid (h, w)."""
    for name, t in (("q_video", q_video), ("k_video", k_video)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q_video.shape != k_video.shape:
        raise ValueError(
            f"q_video and k_video must have the same shape, got {tuple(q_video.shape)} and "
            f"{tuple(k_video.shape)}"
        )
    if q_video.device != k_video.device:
        raise ValueError(f"q_video is on {q_video.device} but k_video on {k_video.device}")
    if q_video.dim() == 5:
        heads, frames, h, w, d = q_video.shape
        if grid_hw is not None and tuple(grid_hw) != (h, w):
            raise ValueError(f"grid_hw={tuple(grid_hw)} disagrees with 5-D inputs of grid {(h, w)}")
        q = q_video.reshape(heads, frames, h * w, d)
        k = k_video.reshape(heads, frames, h * w, d)
    elif q_video.dim() == 4:
        if grid_hw is None:
            raise ValueError("4-D (heads, F, h*w, d) inputs need grid_hw=(h, w)")
        h, w = (int(v) for v in grid_hw)
        if h * w != q_video.shape[2]:
            raise ValueError(f"grid_hw={(h, w)} has {h * w} tokens, inputs have {q_video.shape[2]}")
        q, k = q_video, k_video
    else:
        raise ValueError(
            "q_video/k_video must be (heads, F, h*w, d) or (heads, F, h, w, d), got "
            f"{tuple(q_video.shape)}"
        )
    if min(q.shape) < 1:
        raise ValueError(f"q_video/k_video have an empty dimension: {tuple(q_video.shape)}")
    return q, k, h, w


def _query_tokens(query_tokens, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
    qt = torch.as_tensor(query_tokens)
    if qt.dim() != 1:
        raise ValueError(f"query_tokens must be 1-D, got shape {tuple(qt.shape)}")
    if qt.is_floating_point() or qt.is_complex() or qt.dtype == torch.bool:
        raise ValueError(f"query_tokens must be integer token indices, got {qt.dtype}")
    if qt.numel() and (int(qt.min()) < 0 or int(qt.max()) >= tokens_per_frame):
        raise ValueError(
            f"query_tokens must lie in [0, {tokens_per_frame}) (tokens of latent frame 0), got "
            f"min {int(qt.min())}, max {int(qt.max())}"
        )
    return qt.to(device=device, dtype=torch.long)


@torch.no_grad()
def compute_correspondence(
    q_video: torch.Tensor,
    k_video: torch.Tensor,
    query_tokens: torch.Tensor,
    k_text: torch.Tensor | None = None,
    scale: float | None = None,
    row_chunk: int | None = None,
    *,
    grid_hw: tuple[int, int] | None = None,
    head_chunk: int | None = None,
    fwd_chunk: int = DEFAULT_FWD_CHUNK,
    fused: bool | None = None,
) -> CorrespondenceResult:
    """Forward/reverse matches, confidence and attention mass for one layer; see the module doc.

    Args:
        q_video, k_video: video queries / keys, ``(heads, F, h*w, d)`` or ``(heads, F, h, w,
            d)``, any float dtype (fp16 typical), any device.
        query_tokens: ``(N,)`` integer token indices within latent frame 0 (``y * w + x``).
        k_text: optional ``(heads, L, d)`` text keys, part of the full-sequence softmax.
        scale: softmax scale, default ``d ** -0.5``.
        row_chunk: video query rows per reverse block; default 128 on the CPU, 1024 elsewhere.
        grid_hw: ``(h, w)``, required for 4-D inputs (inferred from 5-D ones).
        head_chunk: heads per reverse block, default all.
        fwd_chunk: query tokens per forward block (default 128).
        fused: use the fused C kernels (:mod:`datagen.capture.fused`): None (default) when
            they are available, the inputs are float32/float16/bfloat16 CPU tensors and the
            layer has at least ``FUSED_MIN_WORK`` multiply-adds of logits; True to require
            them (RuntimeError when they cannot run); False for the torch path.

    The chunk sizes (torch path only; the fused kernels size their own groups) only bound the
    working memory and set the speed; results do not depend on them beyond float rounding.

    Returns:
        A :class:`CorrespondenceResult` of CPU tensors.

    Raises:
        ValueError: inconsistent shapes or devices, ``query_tokens`` not 1-D integers in
            ``[0, h*w)``, chunk sizes that are not positive ints.
        RuntimeError: ``fused=True`` where the fused kernels cannot run.
        TypeError: q/k/k_text that are not floating-point tensors.
    """
    q, k, h, w = _video_shapes(q_video, k_video, grid_hw)
    heads, num_frames, tokens, d = q.shape
    device = q.device
    cpu = device.type == "cpu"
    if row_chunk is None:
        row_chunk = DEFAULT_ROW_CHUNK_CPU if cpu else DEFAULT_ROW_CHUNK_GPU
    if head_chunk is None:
        head_chunk = heads
    for name, value in (
        ("row_chunk", row_chunk),
        ("head_chunk", head_chunk),
        ("fwd_chunk", fwd_chunk),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if k_text is not None:
        if not isinstance(k_text, torch.Tensor) or not k_text.is_floating_point():
            raise TypeError("k_text must be a floating-point torch.Tensor or None")
        if k_text.dim() != 3 or k_text.shape[0] != heads or k_text.shape[2] != d:
            raise ValueError(f"k_text must be (heads={heads}, L, d={d}), got {tuple(k_text.shape)}")
        if k_text.device != device:
            raise ValueError(f"k_text is on {k_text.device} but the video tensors on {device}")
        if k_text.shape[1] == 0:
            k_text = None
    qt = _query_tokens(query_tokens, tokens, device)
    scale = d**-0.5 if scale is None else float(scale)

    dtypes = [q.dtype, k.dtype] + ([k_text.dtype] if k_text is not None else [])
    cdtype = torch.float64 if torch.float64 in dtypes else torch.float32
    eligible = cpu and all(dt in fused_kernels.DTYPES for dt in dtypes)
    n_text = 0 if k_text is None else k_text.shape[1]
    work = heads * d * (num_frames * tokens * tokens + qt.numel() * (n_text + num_frames * tokens))
    if _use_fused(fused, eligible, work):
        threads = 1 if work < FUSED_PARALLEL_WORK else torch.get_num_threads()
        fwd = _forward_fused(q, k, k_text, qt, scale, h, w, threads)
        match_reverse = _reverse_fused(q, k, scale, threads)
    else:
        # Scaled keys in the compute dtype, once (a copy: the caller's tensors are untouched).
        k_all = k.reshape(heads, num_frames * tokens, d).to(cdtype, copy=True).mul_(scale)
        kt_t = None
        if k_text is not None:
            kt_t = k_text.to(cdtype, copy=True).mul_(scale).transpose(1, 2)  # (heads, d, L)
        layer = _Layer(
            q=q,
            k_all_t=k_all.transpose(1, 2),  # (heads, d, F*T), a view: BLAS takes it transposed
            kt_t=kt_t,
            grid=token_grid_xy(h, w, device=device, dtype=cdtype),
            cdtype=cdtype,
        )
        fwd = _forward_torch(layer, qt, fwd_chunk)
        match_reverse = _reverse_torch(layer, row_chunk, head_chunk)
    match_forward, match_prob, soft_forward, confidence, mass_per_frame, mass_text = fwd

    def out(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device="cpu")
        return t if t.dtype == torch.long else t.to(torch.float32)

    return CorrespondenceResult(
        match_forward=out(match_forward),
        soft_forward=out(soft_forward),
        match_prob=out(match_prob),
        match_reverse=out(match_reverse.view(num_frames, tokens)),
        confidence=out(confidence),
        mass_text=out(mass_text),
        mass_own_frame=out(mass_per_frame[:, 0]),
        mass_other_frames=out(mass_per_frame[:, 1:].sum(dim=-1)),
        mass_per_frame=out(mass_per_frame),
        grid_hw=(h, w),
    )


def _use_fused(fused: bool | None, eligible: bool, work: int) -> bool:
    """Whether to run the fused kernels (see compute_correspondence's ``fused``).

    By default only from FUSED_MIN_WORK multiply-adds: below, their fixed costs (thread hand-off,
    key packing) outweigh what they save (tiny-preset layers are ~0.1 M).
    """
    if fused is False:
        return False
    if fused is True:
        if not eligible:
            raise RuntimeError("fused correspondence kernels take float32 work on the CPU only")
        if fused_kernels.kernels() is None:
            raise RuntimeError(
                "fused correspondence kernels are unavailable (no C compiler, a failed build, "
                "or DATAGEN_FUSED=0); pass fused=None to fall back to the torch path"
            )
        return True
    return eligible and work >= FUSED_MIN_WORK and fused_kernels.kernels() is not None


@dataclass
class _Layer:
    """One layer's inputs in the compute dtype, shared by the forward and reverse passes."""

    q: torch.Tensor  # (heads, F, T, d), input dtype
    k_all_t: torch.Tensor  # (heads, d, F*T) scaled keys
    kt_t: torch.Tensor | None  # (heads, d, L) scaled text keys
    grid: torch.Tensor  # (T, 2) token centres
    cdtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        heads, frames, tokens, d = self.q.shape
        return heads, frames, tokens, d

    def empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=self.cdtype, device=self.q.device)


def _balanced(n: int, chunk: int) -> int:
    """Block size <= chunk that splits n items into equal blocks (400 by 128 -> 4 x 100)."""
    n = max(1, n)
    return -(-n // -(-n // chunk))


def _forward_torch(layer: _Layer, qt: torch.Tensor, fwd_chunk: int) -> tuple[torch.Tensor, ...]:
    """Forward matching + full-sequence attention of the query tokens, torch operations only."""
    heads, num_frames, tokens, _ = layer.shape
    device, cdtype, kt_t, grid = layer.q.device, layer.cdtype, layer.kt_t, layer.grid
    n_queries = qt.numel()
    empty = layer.empty
    match_forward = torch.empty(n_queries, num_frames, dtype=torch.long, device=device)
    match_prob = empty(n_queries, num_frames)
    soft_forward = empty(n_queries, num_frames, 2)
    confidence = empty(n_queries, num_frames)
    mass_per_frame = empty(n_queries, num_frames)
    mass_text = torch.zeros(n_queries, dtype=cdtype, device=device)

    # Buffers are allocated once and reused: fresh multi-MB allocations cost page faults.
    block = _balanced(n_queries, fwd_chunk)
    scores = empty(heads, block, tokens)  # one frame's logits
    probs = empty(num_frames, heads, block, tokens)  # frame-pair softmax of every frame
    head_sum = empty(num_frames, block, tokens)
    s_max = empty(num_frames, heads, block)
    p_max = empty(num_frames, heads, block)
    full_mean = empty(block, 1, tokens)
    ones = torch.ones(1, heads, dtype=cdtype, device=device)
    q_sel = layer.q[:, 0].index_select(1, qt)  # (heads, N, d), input dtype
    for n0 in range(0, n_queries, block):
        n1 = min(n0 + block, n_queries)
        c = n1 - n0
        qc = q_sel[:, n0:n1].to(cdtype)
        for f in range(num_frames):
            k_f = layer.k_all_t[:, :, f * tokens : (f + 1) * tokens]
            s = torch.bmm(qc, k_f, out=scores[:, :c])
            torch.amax(s, dim=-1, out=s_max[f, :, :c])
            p = torch.softmax(s, dim=-1, out=probs[f, :, :c])
            torch.amax(p, dim=-1, out=p_max[f, :, :c])
            # head sum (= heads * head mean) as a (1 x heads) @ (heads x c*T) product: one
            # read of p, faster than torch.sum over the outer dimension
            torch.mm(ones, p.view(heads, c * tokens), out=head_sum[f, :c].view(1, c * tokens))
        hs = head_sum[:, :c]  # (F, c, T)
        match_forward[n0:n1] = hs.argmax(dim=-1).T
        match_prob[n0:n1] = hs.amax(dim=-1).T / heads
        soft_forward[n0:n1] = torch.matmul(hs, grid).transpose(0, 1) / heads
        # Per-head log-sum-exp of each frame's logits (max prob = exp(s_max - lse) exactly),
        # then over the whole sequence.
        lse_frame = (s_max[:, :, :c] - torch.log(p_max[:, :, :c])).permute(1, 2, 0)  # (h, c, F)
        if kt_t is not None:
            lse_text = torch.logsumexp(torch.bmm(qc, kt_t), dim=-1)  # (heads, c)
            lse_all = torch.logsumexp(torch.cat([lse_text[..., None], lse_frame], dim=-1), -1)
            mass_text[n0:n1] = torch.exp(lse_text - lse_all).mean(dim=0)
        else:
            lse_all = torch.logsumexp(lse_frame, dim=-1)
        share = torch.exp(lse_frame - lse_all[..., None])  # (heads, c, F): frames' full mass
        mass_per_frame[n0:n1] = share.mean(dim=0)
        # Full-sequence probability of a token of frame f = frame-pair probability * share;
        # its head mean is one (1 x heads) @ (heads x T) product per query (batched bmm).
        weights = (share / heads).permute(2, 1, 0)  # (F, c, heads)
        for f in range(num_frames):
            p_f = probs[f, :, :c].transpose(0, 1)  # (c, heads, T), a strided view
            out_f = torch.bmm(weights[f].unsqueeze(1), p_f, out=full_mean[:c])
            confidence[n0:n1, f] = out_f.squeeze(1).amax(dim=-1)
    return match_forward, match_prob, soft_forward, confidence, mass_per_frame, mass_text


def _forward_fused(q, k, k_text, qt, scale, h, w, threads) -> tuple[torch.Tensor, ...]:
    """As :func:`_forward_torch`, with the fused C kernel (GEMM and softmaxes in cache)."""
    heads, num_frames, tokens, d = q.shape
    keys = k.reshape(heads, num_frames * tokens, d)
    kp = fused_kernels.pack_keys(keys, k_text, scale, threads=threads)
    text = 0 if k_text is None else k_text.shape[1]
    q_sel = q[:, 0].index_select(1, qt).contiguous()  # (heads, N, d)
    pair, full, mass = fused_kernels.forward(q_sel, kp, text, num_frames, tokens, threads)
    pair /= heads
    match_prob, match_forward = pair.max(dim=-1)
    soft_forward = torch.matmul(pair, token_grid_xy(h, w))
    confidence = full.amax(dim=-1) / heads
    mass /= heads
    return match_forward, match_prob, soft_forward, confidence, mass[:, 1:], mass[:, 0]


def _reverse_torch(layer: _Layer, row_chunk: int, head_chunk: int) -> torch.Tensor:
    """Reverse matching, every video token -> frame 0, torch operations only: (F*T,) long."""
    heads, num_frames, tokens, d = layer.shape
    empty = layer.empty
    k0_t = layer.k_all_t[:, :, :tokens]  # (heads, d, T)
    ones = torch.ones(1, heads, dtype=layer.cdtype, device=layer.q.device)
    # Blocks of rows x head_chunk heads; the head sum of the probabilities accumulates in acc.
    q_rows = layer.q.reshape(heads, num_frames * tokens, d)
    n_rows = num_frames * tokens
    rows = min(row_chunk, n_rows)
    hg = min(head_chunk, heads)
    scores = empty(hg, rows, tokens)
    probs = empty(hg, rows, tokens)
    head_sum = empty(rows * tokens)
    match_reverse = torch.empty(n_rows, dtype=torch.long, device=layer.q.device)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        c = r1 - r0
        qc = q_rows[:, r0:r1].to(layer.cdtype)
        acc = head_sum[: c * tokens]
        for h0 in range(0, heads, hg):
            h1 = min(h0 + hg, heads)
            g = h1 - h0
            s = torch.bmm(qc[h0:h1], k0_t[h0:h1], out=scores[:g, :c])
            p = torch.softmax(s, dim=-1, out=probs[:g, :c]).view(g, c * tokens)
            if g == 1 and h0 == 0:
                acc.copy_(p[0])
            elif g == 1:
                acc.add_(p[0])
            elif h0 == 0:  # (1 x g) @ (g x c*T): one read of p, faster than torch.sum
                torch.mm(ones[:, :g], p, out=acc.view(1, -1))
            else:
                acc.view(1, -1).addmm_(ones[:, :g], p)
        # the head sum and the head mean share their argmax
        torch.argmax(acc.view(c, tokens), dim=-1, out=match_reverse[r0:r1])
    return match_reverse


def _reverse_fused(q: torch.Tensor, k: torch.Tensor, scale: float, threads: int) -> torch.Tensor:
    """As :func:`_reverse_torch`, with the fused C kernel (GEMM and softmax in cache)."""
    heads, num_frames, tokens, d = q.shape
    kp = fused_kernels.pack_keys(k[:, 0], None, scale, threads=threads)
    q_rows = q.reshape(heads, num_frames * tokens, d).contiguous()
    return fused_kernels.reverse(q_rows, kp, tokens, threads)
