"""The presets (a resolved config's first layer) and resolving a config: preset, then config
file, then ``--set`` overrides, then every value checked (see :mod:`datagen.config`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from datagen.config import (
    TINY_HUNYUAN_ID,
    TINY_WAN_ID,
    TRAINED_TINY_ID,
    BuildConfig,
    CaptureConfig,
    GenerationConfig,
    ModelConfig,
    QCSettings,
    ShardConfig,
    SourceConfig,
    TrackerConfig,
    apply_mapping,
    check_config,
    load_config_file,
    parse_overrides,
)
from datagen.errors import UserError

WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)
"""The negative prompt of the Wan 2.1 model cards' examples (English rendering)."""


def _paper_capture(num_layers: int, match_layer: int, steps: int = 50) -> CaptureConfig:
    # Features (135 MB to 1.5 GB per layer and step) for one layer at the last two steps;
    # correspondence arrays (small) for every layer at every fifth of the schedule and the last.
    return CaptureConfig(
        feature_layers=[match_layer],
        feature_steps=[steps - 6, steps - 1],
        corr_layers=list(range(num_layers)),
        corr_steps=sorted({round(i * steps / 5) - 1 for i in range(1, 6)} | {0}),
    )


def _paper_generation(**kw: Any) -> GenerationConfig:
    base = dict(
        num_frames=49,
        height=480,
        width=720,
        num_inference_steps=50,
        guidance_scale=6.0,
        fps=8,
        seed=42,
        batch_size=1,
        max_sequence_length=226,
    )
    base.update(kw)
    return GenerationConfig(**base)


def _wan_generation(height: int, width: int) -> GenerationConfig:
    """Wan 2.1's model-card settings at a resolution: 81 frames, guidance 5, 16 fps, 512 text
    tokens and its negative prompt."""
    return _paper_generation(
        num_frames=81,
        height=height,
        width=width,
        guidance_scale=5.0,
        fps=16,
        max_sequence_length=512,
        negative_prompt=WAN_NEGATIVE_PROMPT,
    )


def _tiny_trained() -> BuildConfig:
    # The shipped trained DiT: 8 frames of 32x32 pixels, 6 layers; its two last layers are
    # captured at the last two of 6 DDIM steps. The synthetic source defaults to the
    # distribution it was trained on (its held-out seeds are the evaluation set).
    from datagen.models.tiny_spec import train_video_settings

    return BuildConfig(
        preset="tiny",
        source=SourceConfig(synthetic=train_video_settings()),
        model=ModelConfig(model_id=TRAINED_TINY_ID),
        generation=GenerationConfig(
            num_frames=8,
            height=32,
            width=32,
            num_inference_steps=6,
            guidance_scale=1.5,  # chosen by measurement: README, "The embedded model"
            batch_size=16,
            max_sequence_length=32,
            first_frame="procedural",
        ),
        # Window 9: the best worst case over the busy and smooth calibration sets at this
        # size (README, "Labels you can trust"); the model's videos are smooth.
        tracker=TrackerConfig(name="lk_recover", grid_size=8, settings={"win_size": 9}),
        capture=CaptureConfig(
            feature_layers=[4, 5], feature_steps=[4, 5], corr_layers=[4, 5], corr_steps=[4, 5]
        ),
    )


def _real(
    name: str, model: ModelConfig, gen: GenerationConfig, capture: CaptureConfig
) -> BuildConfig:
    """A preset for a public checkpoint: CoTracker3 labels on a 20x20 grid, small shards."""
    return BuildConfig(
        preset=name,
        model=model,
        generation=gen,
        tracker=TrackerConfig(name="cotracker3_offline", grid_size=20),
        capture=capture,
        shards=ShardConfig(max_samples=16),
    )


PRESETS: dict[str, BuildConfig] = {
    "tiny": _tiny_trained(),
    # Random weights make noise that QC rejects: the tiny-random presets exercise the whole
    # pipeline of each family (fast tests), so they keep those samples rather than drop them.
    "tiny-random": BuildConfig(preset="tiny-random", qc=QCSettings(rejected="keep")),
    "tiny-random-wan": BuildConfig(
        preset="tiny-random-wan",
        model=ModelConfig(family="wan", model_id=TINY_WAN_ID),
        qc=QCSettings(rejected="keep"),
    ),
    "tiny-random-hunyuan": BuildConfig(
        preset="tiny-random-hunyuan",
        model=ModelConfig(family="hunyuanvideo", model_id=TINY_HUNYUAN_ID),
        qc=QCSettings(rejected="keep"),
    ),
    # DiffTrack's settings: 49 frames at 480x720, 50 steps, default guidance; features of the
    # paper's best matching layer (17).
    "cogvideox-2b": _real(
        "cogvideox-2b",
        ModelConfig(model_id="THUDM/CogVideoX-2b", dtype="float16"),
        _paper_generation(),
        _paper_capture(30, 17),
    ),
    "cogvideox-5b": _real(
        "cogvideox-5b",
        ModelConfig(model_id="THUDM/CogVideoX-5b", dtype="bfloat16"),
        _paper_generation(),
        _paper_capture(42, 17),
    ),
    "cogvideox-5b-i2v": _real(
        "cogvideox-5b-i2v",
        ModelConfig(model_id="THUDM/CogVideoX-5b-I2V", dtype="bfloat16"),
        _paper_generation(first_frame="prompt"),
        _paper_capture(42, 17),
    ),
    # The model card's settings: 81 frames at 768x1360, 16 fps (temporal patch 2: the layout
    # pads one latent frame in front).
    "cogvideox1.5-5b": _real(
        "cogvideox1.5-5b",
        ModelConfig(model_id="THUDM/CogVideoX1.5-5B", dtype="bfloat16"),
        _paper_generation(num_frames=81, height=768, width=1360, fps=16),
        _paper_capture(42, 17),
    ),
    # Wan 2.1 model cards: 81 frames, 480x832 (1.3B) or 720x1280 (14B), 50 steps, guidance
    # 5, 16 fps, 512 text tokens and their negative prompt. No best matching layer is
    # published for Wan: features of the middle layer.
    "wan2.1-t2v-1.3b": _real(
        "wan2.1-t2v-1.3b",
        ModelConfig(family="wan", model_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype="bfloat16"),
        _wan_generation(height=480, width=832),
        _paper_capture(30, 15),
    ),
    "wan2.1-t2v-14b": _real(
        "wan2.1-t2v-14b",
        ModelConfig(family="wan", model_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", dtype="bfloat16"),
        _wan_generation(height=720, width=1280),
        _paper_capture(40, 20),
    ),
    # DiffTrack's HunyuanVideo settings: 49 frames at 480x720, 30 steps, the default
    # (embedded) guidance 6; 256 text tokens, 24 fps. 60 joint-attention layers (20 dual-,
    # 40 single-stream); features of the middle one.
    "hunyuanvideo": _real(
        "hunyuanvideo",
        ModelConfig(
            family="hunyuanvideo", model_id="hunyuanvideo-community/HunyuanVideo", dtype="bfloat16"
        ),
        _paper_generation(num_inference_steps=30, fps=24, max_sequence_length=256),
        _paper_capture(60, 30, steps=30),
    ),
}


def preset(name: str) -> BuildConfig:
    if name not in PRESETS:
        raise UserError(
            f"unknown preset '{name}'; choose one of: {', '.join(sorted(PRESETS))} (--preset)"
        )
    return copy.deepcopy(PRESETS[name])


def resolve_config(
    preset_name: str = "tiny",
    config_file: Path | None = None,
    overrides: list[str] | None = None,
) -> BuildConfig:
    """Preset, then config file, then ``--set`` overrides; then checks every value."""
    file_data: dict[str, Any] = {}
    if config_file is not None:
        file_data = load_config_file(config_file)
        preset_name = file_data.get("preset", preset_name)
        if not isinstance(preset_name, str):
            raise UserError(f"{config_file}: 'preset' must be a string")
    cfg = preset(preset_name)
    if file_data:
        apply_mapping(cfg, file_data, str(config_file))
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "--set")
    check_config(cfg)
    return cfg
