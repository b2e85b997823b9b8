"""What the embedded trained model is, without torch: where its weights live, its video size,
and the procedural distribution it was trained on (the ``tiny`` preset reads these when the
config module loads, which must not import torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.sources.synthetic import SyntheticConfig

SHIPPED_DIR = Path(__file__).parent / "weights" / "tiny-cogvideox"
"""The shipped weights: a diffusers pipeline folder (fp16 safetensors)."""

FRAMES, HEIGHT, WIDTH, PATCH = 8, 32, 32, 4
MAX_TEXT_LEN = 32

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=6,  # noisy video + first-frame image latents (CogVideoX-I2V)
    out_channels=3,
    time_embed_dim=128,
    text_embed_dim=32,
    num_layers=6,
    sample_width=WIDTH,
    sample_height=HEIGHT,
    sample_frames=FRAMES,
    patch_size=PATCH,
    temporal_compression_ratio=1,
    max_text_seq_length=MAX_TEXT_LEN,
)

# Cosine (squaredcos_cap_v2) DDPM betas, v-prediction, no SNR shift (CogVideoX shifts by 3 for
# its latents; pixels at this size train better without), trailing DDIM spacing so the first
# step starts from pure noise.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    snr_shift_scale=1.0,
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=True,
    rescale_betas_zero_snr=False,
)

# The training distribution, and the held-out evaluation sets, of the procedural source.
TRAIN_VIDEO = SyntheticConfig(
    num_frames=FRAMES,
    height=HEIGHT,
    width=WIDTH,
    num_sprites=3,
    sprite_size_range=(3.5, 7.5),
    max_speed=1.2,
    max_accel=0.05,
    rotation_range_deg=(1.0, 6.0),
    camera_pan_speed=0.8,
    points_per_sprite=16,
    background_points=24,
    # A distribution a 2.5M-parameter model learns to generate on a CPU budget: pure integer
    # translations (no rotation, scaling or acceleration: each later frame is frame 0 shifted
    # by whole pixels) and textures 3x smoother than the synthetic default (shortest
    # wavelength 9 px on the background, 15 px on sprites: detail a 4 px patch can carry from
    # frame to frame), and slow sprites (0-1 px/frame per axis). These also make its labels
    # easier: on 24 held-out videos lk_recover's QC accepts all (71% with the continuous,
    # detailed, faster scenes) and keeps 69% of point-frames visible (48%).
    integer_motion=True,
    texture_scale=3.0,
)
TRAIN_SEED_BASE = 10_000_000
"""Training videos use seeds TRAIN_SEED_BASE + i; evaluation uses EVAL_SEED_BASE + i."""
EVAL_SEED_BASE = 90_000_000


def train_video_settings() -> dict[str, Any]:
    """``source.synthetic`` settings that reproduce the training distribution."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(TRAIN_VIDEO):
        if f.name in ("sprites", "seed", "camera_velocity"):
            continue
        v = getattr(TRAIN_VIDEO, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
