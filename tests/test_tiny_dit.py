"""The embedded trained tiny DiT: shipped weights, loading, captions, matching analysis and the
training script."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen.analysis.matching import (
    head_averaged_matches,
    pixel_matches,
    score_matches,
)
from datagen.layout import TokenLayout
from datagen.models import tiny_dit
from datagen.models.pixel_vae import PixelSpaceVAE
from datagen.sources.synthetic import SpriteSpec, SyntheticConfig, render_synthetic_video
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_weights_are_fp16_small_and_load_through_from_pretrained():
    from diffusers import CogVideoXImageToVideoPipeline, DiffusionPipeline

    import datagen.models.pixel_vae  # noqa: F401  (diffusers loads only imported modules)

    weights = tiny_dit.SHIPPED_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    total = sum(p.stat().st_size for p in tiny_dit.SHIPPED_DIR.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dit.SHIPPED_DIR), dtype=torch.float32)
    assert isinstance(pipe, CogVideoXImageToVideoPipeline)
    cfg = pipe.transformer.config
    for key, value in tiny_dit.TRANSFORMER_CONFIG.items():
        assert cfg[key] == value, key
    assert isinstance(pipe.vae, PixelSpaceVAE)
    assert pipe.vae_scale_factor_spatial == 1 and pipe.vae_scale_factor_temporal == 1


def test_pixel_vae_is_the_identity_on_valid_pixels():
    vae = PixelSpaceVAE()
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(vae.decode(z).sample, x)
    assert vae.decode(torch.full((1, 3, 1, 2, 2), 3.0)).sample.max() == 1.0


def test_trained_preset_generates_its_size_through_the_family():
    from datagen.models.cogvideox import CogVideoXFamily
    from datagen.presets import resolve_config

    cfg = resolve_config("tiny")
    fam = CogVideoXFamily()
    pipe = fam.load_pipeline(cfg.model)
    g = cfg.generation
    g.num_inference_steps = 2
    assert fam.takes_first_frame(pipe)
    first, _ = tiny_dit.first_frame_for_prompt("red box moves left", 3)
    video = fam.generate(pipe, ["red box moves left"], [""], [3], g, images=[first])
    assert video.shape == (1, g.num_frames, g.height, g.width, 3) and video.dtype == np.uint8
    layout = fam.layout(pipe, g)
    assert layout.token_grid == (8, 8, 8) and layout.token_pixel_size == (4, 4)
    geo = fam.geometry(cfg.model)
    assert (geo.temporal, geo.spatial, geo.patch, geo.heads_dim) == (1, 1, 4, 128)


def test_caption_names_colour_shape_and_pan():
    scene = SyntheticConfig(
        num_frames=8,
        height=32,
        width=32,
        sprites=(
            SpriteSpec("square", (5.0, 5.0), (16.0, 16.0), velocity=(-2.0, 0.0)),
            SpriteSpec("disc", (4.0, 4.0), (8.0, 8.0), velocity=(0.0, 1.5)),
        ),
        camera_velocity=(1.0, 0.0),
    )
    words = tiny_dit.caption(scene, 0).split(", ")
    # Sprites by colour and shape only: the only direction words are the camera's.
    assert words[0].split()[1] == "box" and words[1].split()[1] == "ball"
    assert len(words[0].split()) == len(words[1].split()) == 2
    assert words[2] == "camera pans right"
    assert tiny_dit.caption(dataclasses.replace(scene, camera_velocity=(-1.0, -1.0)), 0).endswith(
        "camera pans up left"
    )
    assert tiny_dit.colour_word(np.array([220, 30, 30])) == "red"
    assert tiny_dit.colour_word(np.array([30, 60, 220])) == "blue"
    assert tiny_dit.colour_word(np.array([40, 200, 50])) == "green"
    assert tiny_dit.colour_word(np.array([128, 128, 130])) == "gray"
    assert tiny_dit.direction_words(0.2, -0.3) == "slowly"
    assert tiny_dit.direction_words(3.0, -3.0) == "up right"


# --- matching analysis ---------------------------------------------------------------------


def _layout(frames=3, h=16, w=16, patch=4):
    return TokenLayout("cogvideox", frames, h, w, (1, 1, 1), (1, patch, patch), 0, "first")


def test_score_matches_hand_computed():
    layout = _layout()  # 4 x 4 tokens of 4 px, 3 frames
    # Point A moves 8 px right per frame; point B moves 1 px (not counted: under a token);
    # point C moves but is invisible on frame 2.
    tracks = np.array(
        [
            [[2.0, 2.0], [10.0, 2.0], [15.0, 2.0]],
            [[6.0, 6.0], [7.0, 6.0], [7.0, 6.0]],
            [[2.0, 10.0], [2.0, 14.0], [9.0, 14.0]],
        ]
    )
    visible = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
    # A: true tokens (0,2) on f1 and (0,3) on f2. C on f1: (3,0).
    matches = np.array([[0, 2, 0], [5, 5, 5], [8, 12, 0]])
    counts = score_matches(matches, np.zeros(3), tracks, visible, layout)
    # counted: A f1, A f2, C f1 (moved 4 px = one token); B never; C f2 invisible.
    assert counts.counted == 3
    # A f1: token 2 centre (10, 2) vs (10, 2): right. A f2: token 0 centre (2, 2) vs (15, 2):
    # wrong. C f1: token 12 = row 3 col 0, centre (2, 14) vs (2, 14): right.
    assert counts.correct == 2
    # One token off is still right, two tokens off is wrong.
    near = np.array([[0, 3, 3], [5, 5, 5], [8, 8, 0]])  # A f1 col 3 (14 vs 10), C f1 row 2
    c2 = score_matches(near, np.zeros(3), tracks, visible, layout)
    assert c2.correct == 3  # A f1 |14-10|=4 ok, A f2 |14-15| ok, C f1 |10-14|=4 ok


def test_head_averaged_matches_equal_the_correspondence_module():
    from datagen.capture.correspondence import compute_correspondence

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 4, 16, 8, generator=g)
    k = torch.randn(1, 3, 4, 16, 8, generator=g)
    ours = head_averaged_matches(q, k)[0]  # (T, F)
    ref = compute_correspondence(q[0], k[0], torch.arange(16), grid_hw=(4, 4))
    torch.testing.assert_close(ours, ref.match_forward.long())


def test_pixel_baseline_finds_a_translating_pattern_exactly():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1, 3, 32, 32, generator=g) * 2 - 1
    # Frame f is frame 0 shifted right by f tokens (4 px), wrapping around.
    frames = torch.cat([torch.roll(base, shifts=4 * f, dims=-1) for f in range(3)], dim=1)
    m = pixel_matches(frames, 4)[0]  # (64, 3)
    expect = torch.tensor([[(t // 8) * 8 + (t % 8 + f) % 8 for f in range(3)] for t in range(64)])
    assert torch.equal(m, expect)


@pytest.fixture(scope="module")
def lowest_noise_table():
    """Matching accuracy at the lowest noise level of the evaluation grid (t = 100) on 32
    held-out procedural videos: shipped weights, random init, pixel patches."""
    from diffusers import DiffusionPipeline

    import datagen.models.pixel_vae  # noqa: F401

    pipe = DiffusionPipeline.from_pretrained(str(tiny_dit.SHIPPED_DIR), dtype=torch.float32)
    random_init = tiny_dit.build_pipeline(seed=0).transformer.eval()
    seeds = [tiny_dit.EVAL_SEED_BASE + i for i in range(32)]
    videos = [render_synthetic_video(tiny_dit.TRAIN_VIDEO, s) for s in seeds]
    emb = tiny_dit.encode_captions(pipe, [tiny_dit.caption(tiny_dit.TRAIN_VIDEO, s) for s in seeds])
    table = tiny_dit.evaluate_matching(
        {"trained": pipe.transformer.eval(), "random": random_init},
        videos,
        emb,
        pipe.scheduler,
        [100],
    )
    acc = table.to_json()["accuracy"]
    best = {
        name: max(v["100"] for k, v in acc.items() if k.startswith(name))
        for name in ("trained", "random")
    }
    return best, acc


def test_shipped_model_matches_moving_points_3x_better_than_random_init(lowest_noise_table):
    best, acc = lowest_noise_table
    assert best["trained"] >= 3 * best["random"], acc


def test_shipped_model_beats_the_pixel_patch_baseline_at_the_lowest_noise(lowest_noise_table):
    # The baseline sees the clean first frame, as the image-to-video model does (README table).
    best, acc = lowest_noise_table
    assert best["trained"] > acc["pixel patches"]["100"], acc


# --- training script ------------------------------------------------------------------------


def test_init_from_copies_weights_and_zero_fills_new_input_channels(tmp_path):
    train_tiny_dit = load_script("train_tiny_dit")
    from safetensors.torch import load_file, save_file

    # A text-to-video checkpoint (3 input channels) starts an image-to-video model (6).
    t2v = dict(tiny_dit.TRANSFORMER_CONFIG, in_channels=3)
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(5)
    old = CogVideoXTransformer3DModel(**t2v)
    folder = tmp_path / "old" / "transformer"
    folder.mkdir(parents=True)
    save_file(old.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    model = tiny_dit.build_pipeline(seed=1).transformer
    train_tiny_dit.init_from(model, tmp_path / "old")
    new = model.state_dict()
    w = new["patch_embed.proj.weight"]
    assert torch.equal(w[:, :3], old.state_dict()["patch_embed.proj.weight"])
    assert not w[:, 3:].any()
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    for name, value in state.items():
        if name != "patch_embed.proj.weight":
            assert torch.equal(new[name], value), name
    # So the started model ignores the first frame exactly: same output as the old model.
    x = torch.randn(1, 8, 3, 32, 32)
    emb = torch.randn(1, 32, 32)
    t = torch.tensor([500])
    with torch.no_grad():
        a = old(hidden_states=x, encoder_hidden_states=emb, timestep=t, return_dict=False)[0]
        b = model(
            hidden_states=tiny_dit.with_first_frame(x, torch.randn_like(x)),
            encoder_hidden_states=emb,
            timestep=t,
            return_dict=False,
        )[0]
    torch.testing.assert_close(a, b)


def test_training_script_runs_resumes_and_exports(tmp_path):
    train_tiny_dit = load_script("train_tiny_dit")
    out = tmp_path / "run"
    common = ["--out", str(out), "--pool", "6", "--batch", "2", "--eval-videos", "2"]
    common += ["--init-from", str(tiny_dit.SHIPPED_DIR)]
    common += ["--eval-every", "2", "--eval-t", "100", "--checkpoint-every", "2"]
    assert train_tiny_dit.main(common + ["--steps", "2"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    first = torch.load(out / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2
    export = tmp_path / "export"
    assert train_tiny_dit.main(common + ["--steps", "3", "--export", str(export)]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # resumed, not restarted
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["transformer"] == json.loads(json.dumps(tiny_dit.TRANSFORMER_CONFIG))
    assert config["video"]["texture_scale"] == tiny_dit.TRAIN_VIDEO.texture_scale
    legs = [json.loads(x) for x in (out / "legs.jsonl").read_text().splitlines()]
    assert [leg["steps"] for leg in legs] == [2, 3]
    # A leg on another distribution records it, and renders its own pool.
    other = tmp_path / "other"
    argv = ["--out", str(other)] + common[2:] + ["--steps", "1", "--video", "texture_scale=1.5"]
    assert train_tiny_dit.main(argv) == 0
    assert json.loads((other / "config.json").read_text())["video"]["texture_scale"] == 1.5
    # --stop-at ends a leg early without changing the learning-rate schedule.
    short = tmp_path / "short"
    argv = ["--out", str(short)] + common[2:] + ["--steps", "4", "--stop-at", "2"]
    assert train_tiny_dit.main(argv) == 0
    log = [json.loads(x) for x in (short / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert json.loads((short / "config.json").read_text())["steps"] == 4
    with pytest.raises(SystemExit, match="--video 'nope=1'"):
        train_tiny_dit.main(["--out", str(other), "--video", "nope=1"])
    with pytest.raises(SystemExit):  # argparse's error: exit status 2, one line on stderr
        train_tiny_dit.main(["--out", str(other), "--junk-share", "1.5"])
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(export), dtype=torch.float32)
    assert pipe.transformer.config.num_layers == tiny_dit.TRANSFORMER_CONFIG["num_layers"]
    # Same seed and data: a fresh 2-step run reproduces the first run's weights exactly.
    again = tmp_path / "again"
    assert train_tiny_dit.main(["--out", str(again)] + common[2:] + ["--steps", "2"]) == 0
    second = torch.load(again / "checkpoint.pt", weights_only=True)
    for name, value in first["ema"].items():
        assert torch.equal(value, second["ema"][name]), name


def test_junk_captions_keep_every_clause_within_the_text_length():
    train_tiny_dit = load_script("train_tiny_dit")
    pipe = tiny_dit.build_pipeline()
    caps = [tiny_dit.caption(tiny_dit.TRAIN_VIDEO, tiny_dit.TRAIN_SEED_BASE + i) for i in range(60)]
    inserted, pure = train_tiny_dit.junk_captions(caps, 3, pipe.tokenizer)
    changed = 0
    for cap, text in zip(caps, inserted, strict=True):
        # The encoder sees the whole caption: nothing of it is cut off at MAX_TEXT_LEN.
        assert len(pipe.tokenizer(text).input_ids) <= tiny_dit.MAX_TEXT_LEN, text
        # Its clauses in order, and every other word is one the captions never use.
        rest = text
        for clause in cap.split(", "):
            before, sep, rest = rest.partition(clause)
            assert sep, (cap, text)
            assert not set(before.replace(",", " ").split()) & tiny_dit.CAPTION_WORDS
        assert not set(rest.split()) & tiny_dit.CAPTION_WORDS
        changed += text != cap
    assert changed > len(caps) // 2
    assert len(pure) == 1024
    assert all(not set(p.split()) & tiny_dit.CAPTION_WORDS for p in pure)
    # Seeded: the same seed gives the same texts.
    assert train_tiny_dit.junk_captions(caps, 3, pipe.tokenizer) == (inserted, pure)
