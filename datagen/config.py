"""Build configuration: typed sections, the fingerprint, and reading and checking values.

A config is resolved (:func:`datagen.presets.resolve_config`) in three layers: a preset
(``tiny`` by default, :mod:`datagen.presets`), then an optional config file (TOML or JSON, same
nesting as the dataclasses), then ``--set section.field=value`` overrides. The resolved config
is recorded in every sample and in the manifest; its fingerprint (a hash of everything that can
change the output bytes) guards resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen.errors import UserError

if TYPE_CHECKING:
    from datagen.track.queries import QuerySampler

SOURCE_KINDS = ("text-to-video", "synthetic", "videos")
FIRST_FRAME_KINDS = ("prompt", "procedural")
QC_REJECTED_MODES = ("drop", "keep", "separate")
TINY_MODEL_ID = "datagen/tiny-random-cogvideox"
"""The random-weight tiny CogVideoX, built from configs (fast tests, ``--preset tiny-random``)."""
TRAINED_TINY_ID = "datagen/tiny-cogvideox"
"""The trained tiny DiT shipped with the package (``--preset tiny``, the default)."""
TINY_WAN_ID = "datagen/tiny-random-wan"
"""The random-weight tiny Wan 2.1, built from configs (``--preset tiny-random-wan``)."""
TINY_HUNYUAN_ID = "datagen/tiny-random-hunyuanvideo"
"""The random-weight tiny HunyuanVideo, built from configs (``--preset tiny-random-hunyuan``)."""


@dataclass
class ModelConfig:
    """Which video DiT generates the videos."""

    family: str = "cogvideox"
    """Model family plugin under ``datagen.models``."""
    model_id: str = TINY_MODEL_ID
    """Hub id or local folder for ``from_pretrained``; the tiny id is built locally."""
    revision: str | None = None
    """Hub revision (commit or tag) for reproducible downloads."""
    dtype: str = "float32"
    """Weights dtype: float32, float16 or bfloat16 (half types need a GPU to be fast)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda[:N]."""


@dataclass
class GenerationConfig:
    """Sampler settings and output size."""

    num_frames: int = 9
    height: int = 64
    width: int = 96
    num_inference_steps: int = 4
    guidance_scale: float = 6.0
    fps: int = 8
    seed: int = 42
    """Base seed; each video's seed is derived from it, the prompt id and the replica."""
    replicas: int = 1
    """Videos per prompt (different seeds)."""
    batch_size: int = 8
    """Prompts generated together; part of the fingerprint since it can change float bits."""
    max_sequence_length: int = 32
    """Text tokens the encoder sees (226 for real CogVideoX)."""
    negative_prompt: str = ""
    """Default negative prompt for prompts that carry none."""
    first_frame: str = "prompt"
    """Image-to-video models (CogVideoX-I2V) only: where each video's first frame comes from:
    'prompt' (the prompt entry's ``image`` file, fitted to the generation size) or
    'procedural' (rendered by the procedural source from the colours and shapes the prompt
    names; the ``tiny`` preset). Text-to-video models ignore it."""


@dataclass
class TrackerConfig:
    """Pseudo-labelling tracker and its query points."""

    name: str = "lk"
    queries: str = "default"
    """How query points are sampled (datagen.track.queries.QuerySampler): grid, random, sift,
    strided, or 'default': grid for videos the tracker labels, the renderer's own points on
    each object and the background for synthetic videos."""
    grid_size: int = 10
    """Side of the CoTracker-compatible grid on frame 0 (grid and strided)."""
    num_queries: int = 400
    """Points per video for random and sift."""
    query_stride: int = 8
    """strided: the grid is repeated every query_stride frames."""
    query_mask: str = ""
    """'objects': keep only frame-0 queries on the first frame's object mask (the paper's
    object-centric set); synthetic videos carry the mask, video files a NAME.mask.png."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Tracker keyword arguments (e.g. win_size, fb_threshold for lk)."""


@dataclass
class QCSettings:
    """Quality control of tracker labels (see datagen.track.qc.QCConfig for definitions)."""

    cycle_threshold: float = 2.0
    check_cycle: bool = True
    min_visible_fraction: float = 0.5
    min_motion: float = 0.0
    max_jitter: float = 4.0
    min_kept_fraction: float = 0.3
    rejected: str = "drop"
    """What happens to a sample QC rejects: 'drop' (not written; listed in the manifest with its
    reasons), 'keep' (written to the core shards like the others, verdict in KEY.json) or
    'separate' (written to rejected-NNNNNN.tar beside the core shards)."""

    def thresholds(self) -> Any:
        """The track-check thresholds as a :class:`datagen.track.qc.QCConfig`."""
        from datagen.track.qc import QCConfig

        return QCConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k != "rejected"})


@dataclass
class VideoConfig:
    """How each video is stored; labels are computed on the decoded result."""

    codec: str = "libx264"
    crf: int = 12
    pix_fmt: str = "yuv420p"


@dataclass
class CaptureConfig:
    """Attention capture: q/k stored as features, and online correspondence arrays.

    Layers are 0-based transformer blocks; steps are 0-based denoising step indices, or
    scheduler timesteps (the nearest step is taken) when ``step_unit`` is 'timestep'.
    Empty lists switch that product off.
    """

    feature_layers: list[int] = field(default_factory=lambda: [0, 1])
    feature_steps: list[int] = field(default_factory=lambda: [2, 3])
    corr_layers: list[int] = field(default_factory=lambda: [0, 1])
    corr_steps: list[int] = field(default_factory=lambda: [2, 3])
    step_unit: str = "index"
    hidden_layers: list[int] = field(default_factory=list)
    """Blocks whose output hidden states (video tokens, fp16) are stored beside q/k in the
    features shards, at ``feature_steps``; empty: none (left out of the stored config, so
    builds without it keep their bytes and fingerprints)."""


@dataclass
class SourceConfig:
    """Where videos come from: 'text-to-video' (the model, from the prompt bank),
    'synthetic' (procedural videos with exact tracks; no prompts needed) or 'videos'
    (existing video files in ``videos_dir``). For 'synthetic' and 'videos', an enabled
    capture runs one forward pass of the model on each video's latents noised to the capture
    steps (the zero-shot protocol), so those videos get q/k and correspondence too."""

    kind: str = "text-to-video"
    num_videos: int = 128
    """Videos of a synthetic build (text-to-video builds take the prompt bank)."""
    synthetic: dict[str, Any] = field(default_factory=dict)
    """SyntheticConfig fields, e.g. {"num_frames": 24, "height": 96, "width": 128}."""
    videos_dir: str = ""
    """Folder of video files for kind 'videos' (a same-named .txt beside a video is its
    prompt for the feature pass)."""


@dataclass
class ShardConfig:
    """Limits per shard: samples, and bytes (through the per-sample size estimate)."""

    max_samples: int = 64
    max_bytes: int = 1 << 30


@dataclass
class BuildConfig:
    preset: str = "tiny"
    source: SourceConfig = field(default_factory=SourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    qc: QCSettings = field(default_factory=QCSettings)
    video: VideoConfig = field(default_factory=VideoConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["capture"]["hidden_layers"]:
            # Added after builds were published: absent when unused, so their stored configs
            # and fingerprints stay what they were.
            del out["capture"]["hidden_layers"]
        return out

    def fingerprint(self) -> str:
        """Hash of everything that can change the bytes written (16 hex digits)."""
        # The device changes where the work runs; the fingerprint keeps it because GPU and CPU
        # kernels round differently, so their outputs differ.
        return fingerprint_of(self.to_dict())


def fingerprint_of(config: dict[str, Any]) -> str:
    """The fingerprint of a resolved config as stored (``BuildConfig.to_dict()``, or the
    ``config`` of a manifest or sample): 16 hex digits of its canonical JSON's SHA-256."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def query_sampler(cfg: BuildConfig) -> QuerySampler | None:
    """The build's query sampler; None for a synthetic build's own (default) points."""
    from datagen.track.queries import QuerySampler

    t = cfg.tracker
    method = t.queries
    if method == "default":
        if cfg.source.kind == "synthetic" and not t.query_mask:
            return None
        method = "grid"
    return QuerySampler(method, t.grid_size, t.num_queries, t.query_stride, t.query_mask)


def _section_types(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Convert ``value`` to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if isinstance(current, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return number
    if isinstance(current, list):
        if isinstance(value, str):
            text = value.strip()
            try:
                value = (
                    json.loads(text)
                    if text.startswith("[")
                    else [int(v) for v in text.split(",") if v.strip()]
                )
            except ValueError:
                raise UserError(f"{where}: expected a list of integers, got {value!r}") from None
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise UserError(f"{where}: expected a list of integers, got {value!r}")
        return value
    if isinstance(current, dict):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{where}: expected a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table/object, got {value!r}")
        return value
    if current is None or isinstance(current, str):
        if value is None or isinstance(value, str):
            return value
        if current is None and isinstance(value, (int, float)):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    return value


def apply_mapping(cfg: BuildConfig, data: dict[str, Any], source: str) -> None:
    """Apply a nested mapping (from a config file) onto ``cfg`` in place."""
    sections = _section_types(cfg)
    for sec_name, sec_values in data.items():
        if sec_name == "preset":
            continue
        if sec_name not in sections or sec_name == "preset":
            raise UserError(
                f"{source}: unknown section '{sec_name}'; valid sections: "
                f"{', '.join(n for n in sections if n != 'preset')}"
            )
        if not isinstance(sec_values, dict):
            raise UserError(f"{source}: section '{sec_name}' must be a table of fields")
        section = getattr(cfg, sec_name)
        fields = _section_types(section)
        for key, value in sec_values.items():
            if key not in fields:
                raise UserError(
                    f"{source}: unknown field '{sec_name}.{key}'; valid fields: {', '.join(fields)}"
                )
            where = f"{source}: {sec_name}.{key}"
            setattr(section, key, _coerce(value, getattr(section, key), where))


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist (--config)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} cannot be read: {exc}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise UserError(f"config file {path}: top level must be an object")
            return data
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}"
        ) from None
    raise UserError(f"config file {path}: unknown format '{path.suffix}'; use .toml or .json")


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["generation.num_frames=17"]`` -> ``{"generation": {"num_frames": "17"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. generation.seed=7")
        out.setdefault(section, {})[name] = value
    return out


def _non_finite(obj: Any, path: str) -> str | None:
    """The first path in a config tree holding NaN or an infinity (not JSON; diffusers and
    the trackers would take them silently)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def check_config(cfg: BuildConfig) -> None:
    bad = _non_finite(cfg.to_dict(), "")
    if bad:
        raise UserError(f"{bad}: NaN and infinities are not allowed; give a finite number")
    g = cfg.generation
    positive = {
        "generation.num_frames": g.num_frames,
        "generation.height": g.height,
        "generation.width": g.width,
        "generation.num_inference_steps": g.num_inference_steps,
        "generation.fps": g.fps,
        "generation.replicas": g.replicas,
        "generation.batch_size": g.batch_size,
        "generation.max_sequence_length": g.max_sequence_length,
        "tracker.grid_size": cfg.tracker.grid_size,
        "shards.max_samples": cfg.shards.max_samples,
        "shards.max_bytes": cfg.shards.max_bytes,
    }
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value} (--set {name}=N)")
    if g.seed < 0:
        raise UserError(f"generation.seed must be >= 0, got {g.seed}")
    if g.first_frame not in FIRST_FRAME_KINDS:
        raise UserError(
            f"generation.first_frame '{g.first_frame}' is not one of "
            f"{', '.join(FIRST_FRAME_KINDS)} (--set generation.first_frame=prompt)"
        )
    if cfg.model.dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"model.dtype '{cfg.model.dtype}' is not one of float32, float16, bfloat16")
    if cfg.video.pix_fmt not in ("yuv420p", "yuv444p"):
        raise UserError(f"video.pix_fmt '{cfg.video.pix_fmt}' is not one of yuv420p, yuv444p")
    if not 0 <= cfg.video.crf <= 51:
        raise UserError(f"video.crf must be in 0..51, got {cfg.video.crf}")
    if cfg.qc.rejected not in QC_REJECTED_MODES:
        raise UserError(
            f"qc.rejected '{cfg.qc.rejected}' is not one of {', '.join(QC_REJECTED_MODES)} "
            "(--set qc.rejected=drop)"
        )
    try:
        cfg.qc.thresholds()
    except ValueError as exc:
        raise UserError(f"qc: {exc} (--set qc.FIELD=VALUE)") from None
    if cfg.source.kind not in SOURCE_KINDS:
        raise UserError(
            f"source '{cfg.source.kind}' is not one of {', '.join(SOURCE_KINDS)} (--source)"
        )
    try:
        query_sampler(cfg)
    except ValueError as exc:
        raise UserError(
            f"tracker queries: {exc} (--set tracker.queries=grid|random|sift|strided)"
        ) from None
    if cfg.tracker.query_mask and cfg.source.kind == "text-to-video":
        raise UserError(
            "tracker.query_mask=objects needs first-frame object masks, which text-to-video "
            "builds do not have; use --source videos DIR (a NAME.mask.png beside each video) "
            "or --source synthetic"
        )
    if cfg.source.num_videos <= 0:
        raise UserError(f"source.num_videos must be positive, got {cfg.source.num_videos}")
    cap = cfg.capture
    if cap.step_unit not in ("index", "timestep"):
        raise UserError(f"capture.step_unit '{cap.step_unit}' is not one of index, timestep")
    for name in ("feature_layers", "feature_steps", "corr_layers", "corr_steps", "hidden_layers"):
        values = getattr(cap, name)
        if any(v < 0 for v in values) or len(set(values)) != len(values):
            raise UserError(f"capture.{name} must hold distinct non-negative integers: {values}")
        if name.endswith("steps") and cap.step_unit == "index":
            late = [v for v in values if v >= g.num_inference_steps]
            if late:
                raise UserError(
                    f"capture.{name} {late} lie past the last step {g.num_inference_steps - 1} "
                    f"(generation.num_inference_steps={g.num_inference_steps})"
                )
    if cap.hidden_layers and not cap.feature_steps:
        raise UserError(
            f"capture.hidden_layers {cap.hidden_layers} are captured at capture.feature_steps, "
            "which is empty; set capture.feature_steps=[...]"
        )
    if cfg.video.pix_fmt == "yuv420p" and (g.height % 2 or g.width % 2):
        raise UserError("generation.height and width must be even for video.pix_fmt=yuv420p")
