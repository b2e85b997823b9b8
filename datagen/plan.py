"""Deterministic work units (prompt x replica) assigned to shards, with size estimates."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from datagen.config import BuildConfig
from datagen.prompts import Prompt


@dataclass(frozen=True)
class WorkUnit:
    key: str
    """Stable sample key '<prompt id>-r<replica>' (no dots)."""
    prompt: Prompt
    replica: int
    seed: int
    negative_prompt: str


@dataclass(frozen=True)
class ShardTask:
    index: int
    units: tuple[WorkUnit, ...]


@dataclass(frozen=True)
class Plan:
    shards: tuple[ShardTask, ...]
    samples_per_shard: int
    bytes_per_sample: int
    """Estimated bytes of one core sample."""
    feature_bytes_per_sample: int = 0
    """Estimated bytes of one sample's q/k features (features shards)."""

    @property
    def num_samples(self) -> int:
        return sum(len(s.units) for s in self.shards)


def sample_key(prompt_id: str, replica: int) -> str:
    return f"{prompt_id}-r{replica:02d}"


def derived_seed(base_seed: int, prompt_id: str, replica: int) -> int:
    """Per-video seed from the base seed, the prompt id and the replica (not the position)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{replica}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def estimate_sample_bytes(cfg: BuildConfig) -> int:
    """Rough bytes of one core sample: compressed video plus label arrays plus metadata."""
    g = cfg.generation
    pixels = g.num_frames * g.height * g.width
    if cfg.source.kind == "synthetic":
        from datagen.sources.synthetic import synthetic_config

        s = synthetic_config(cfg.source.synthetic)
        frames, h, w = s.num_frames, s.height, s.width
        points = query_points_bound(cfg)
        masks = frames * h * w // 8  # int16 masks of a few objects compress poorly in npy
        return (
            int(frames * h * w * 2 ** (-(cfg.video.crf - 12) / 6))
            + points * frames * 17
            + 2 * masks
            + 16384
            + estimate_capture_bytes(cfg)[0]
        )
    # Measured on the tiny preset's noisy output: about 1 byte per pixel at crf 12; x264 halves
    # the size for every +6 of crf. Smooth real-model video is smaller, so this errs high.
    video = int(pixels * 2 ** (-(cfg.video.crf - 12) / 6)) + 2048
    points = query_points_bound(cfg)
    labels = points * g.num_frames * (8 + 1 + 4) + points * 12 + 4 * 128
    tar_overhead = 6 * 1024
    return video + labels + 4096 + tar_overhead + estimate_capture_bytes(cfg)[0]


def query_points_bound(cfg: BuildConfig, first_frame: bool = False) -> int:
    """Most query points one video gets (``first_frame``: only those on frame 0)."""
    from datagen.config import query_sampler

    sampler = query_sampler(cfg)
    if sampler is None:  # a synthetic build's own points
        from datagen.sources.synthetic import synthetic_config

        s = synthetic_config(cfg.source.synthetic)
        return s.points_per_sprite * s.num_sprites + s.background_points
    if first_frame and sampler.method == "strided":
        return sampler.grid_size**2
    return sampler.max_points(cfg.generation.num_frames)


def estimate_capture_bytes(cfg: BuildConfig, heads_dim: int | None = None) -> tuple[int, int]:
    """(correspondence bytes in the core sample, q/k and hidden-state feature bytes) of one
    video.

    The token grid and attention width come from the model family's geometry (read from a
    local model folder's configs when there is one); ``heads_dim`` overrides the width.
    """
    from datagen.capture.products import capture_spec
    from datagen.models import get_family

    cap = capture_spec(cfg)
    if not cap.enabled:
        return 0, 0
    geo = get_family(cfg.model.family).geometry(cfg.model)
    heads_dim = heads_dim or geo.heads_dim
    f, h, w = geo.token_grid(cfg.generation)
    n = query_points_bound(cfg, first_frame=True)
    pairs = len(cap.corr_layers) * len(cap.corr_steps)
    # per (layer, step): forward match/prob/confidence/mass (N x F x 5 x 4 B), soft (N x F x 8),
    # reverse matches (F x h x w x 4 B), three masses (N x 12 B)
    corr = pairs * (n * f * 28 + f * h * w * 4 + n * 12) + (1024 if pairs else 0)
    feat_pairs = len(cap.feature_layers) * len(cap.feature_steps)
    # hidden states: one (F, h*w, model width) fp16 tensor per (layer, step); the width of the
    # three families' blocks is heads x head dim
    hidden_pairs = len(cap.hidden_layers) * len(cap.feature_steps)
    features = (feat_pairs * 2 + hidden_pairs) * f * h * w * heads_dim * 2
    return corr, features


def make_plan(cfg: BuildConfig, prompts: list[Prompt], limit: int | None = None) -> Plan:
    units: list[WorkUnit] = []
    for p in prompts:
        for r in range(cfg.generation.replicas):
            seed = (
                p.seeds[r]
                if p.seeds is not None and r < len(p.seeds)
                else derived_seed(cfg.generation.seed, p.id, r)
            )
            neg = (
                p.negative_prompt
                if p.negative_prompt is not None
                else cfg.generation.negative_prompt
            )
            units.append(WorkUnit(sample_key(p.id, r), p, r, seed, neg))
    if limit is not None:
        units = units[:limit]
    per_sample = estimate_sample_bytes(cfg)
    biggest = max(per_sample, estimate_capture_bytes(cfg)[1])
    per_shard = max(1, min(cfg.shards.max_samples, cfg.shards.max_bytes // biggest))
    shards = tuple(
        ShardTask(i, tuple(units[s : s + per_shard]))
        for i, s in enumerate(range(0, len(units), per_shard))
    )
    return Plan(
        shards=shards,
        samples_per_shard=per_shard,
        bytes_per_sample=per_sample,
        feature_bytes_per_sample=estimate_capture_bytes(cfg)[1],
    )
