"""Every model family from the command line: a build of each family's tiny preset (generation
with capture, and the feature pass of procedural videos), validated; every real preset's dry
run, with its size estimate checked against the storage figures of the public checkpoints."""

import json
import re
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.numpy
import torch

from datagen.models import FAMILIES, get_family
from datagen.presets import PRESETS, preset

TINY = {
    "cogvideox": "tiny-random",
    "wan": "tiny-random-wan",
    "hunyuanvideo": "tiny-random-hunyuan",
}
REAL = sorted(
    name for name, cfg in PRESETS.items() if not cfg.model.model_id.startswith("datagen/")
)


def test_every_family_has_a_tiny_preset_and_a_real_one():
    assert sorted(TINY) == sorted(FAMILIES)
    for family, name in TINY.items():
        assert PRESETS[name].model.family == family
    assert {PRESETS[n].model.family for n in REAL} == set(FAMILIES)


def _members(out):
    got = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                got[m.name] = t.extractfile(m).read()
    return got


@pytest.mark.parametrize("source", ["text-to-video", "synthetic"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_tiny_preset_builds_and_validates_through_the_cli(run_cli, tmp_path, family, source):
    name = TINY[family]
    cfg = preset(name)
    g = cfg.generation
    out = tmp_path / "ds"
    argv = ["build", "--out", out, "--preset", name, "--quiet"]
    if source == "text-to-video":
        bank = tmp_path / "bank.txt"
        bank.write_text("a red ball rolls left\na dog runs across a field\n")
        argv += ["--prompts", bank]
    else:
        # The feature pass: procedural videos at the model's size, one forward per step.
        size = {"num_frames": g.num_frames, "height": g.height, "width": g.width}
        argv += ["--source", "synthetic", "--set", "source.num_videos=2"]
        argv += ["--set", f"source.synthetic={json.dumps(size)}"]
    code, text, err = run_cli(*argv)
    assert code == 0, err
    assert "done: 2 samples written" in text
    code, text, err = run_cli("validate", out)
    assert code == 0 and "valid: 2 samples" in text, err

    members = _members(out)
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert len(metas) == 2
    geo = get_family(family).geometry(cfg.model)
    grid = geo.token_grid(g)
    for meta in metas:
        assert meta["layout"]["family"] == family
        assert tuple(meta["layout"]["token_grid"]) == grid
        cap = meta["capture"]
        assert cap["corr_layers"] == [0, 1] and cap["corr_steps"] == [2, 3]
        if source == "synthetic":
            assert cap["protocol"].startswith("existing video")
        key = meta["key"]
        corr = safetensors.numpy.load(members[f"{key}.corr.safetensors"])
        assert all(np.isfinite(a).all() or a.dtype.kind != "f" for a in corr.values())
        feats = safetensors.numpy.load(members[f"{key}.qk.safetensors"])
        assert sorted(feats) == sorted(
            f"{kind}.layer{layer:03d}.step{step:03d}"
            for kind in ("q", "k")
            for layer in (0, 1)
            for step in (2, 3)
        )
        f, h, w = grid
        for name, arr in feats.items():
            # (heads, token frames, tokens per frame, head dim); heads x dim = the geometry's.
            assert arr.shape[1:3] == (f, h * w), name
            assert arr.shape[0] * arr.shape[3] == geo.heads_dim, name
            assert arr.dtype == np.float16 and np.isfinite(arr).all(), name
        # Different noise levels give different q (the steps are really different forwards).
        assert not np.array_equal(feats["q.layer001.step002"], feats["q.layer001.step003"])


def _expected_feature_bytes(tokens: int, heads_dim: int, pairs: int) -> int:
    return pairs * 2 * tokens * heads_dim * 2


# Storage of one layer at one step (video tokens, fp16, q + k), from the public checkpoints'
# sizes: CogVideoX-2B 135 MB, CogVideoX-5B 216 MB, Wan2.1-1.3B at 81x480x832 201 MB.
PUBLISHED_MB = {
    "cogvideox-2b": 135,
    "cogvideox-5b": 216,
    "cogvideox-5b-i2v": 216,
    "wan2.1-t2v-1.3b": 201,
}
# Hand-computed where no figure is published: tokens x heads*dim x 2 (q, k) x 2 bytes.
HAND = {
    # 81 frames -> 21 latent frames, padded to 22, patch_t 2 -> 11; 768/16 x 1360/16 = 48 x 85.
    "cogvideox1.5-5b": _expected_feature_bytes(11 * 48 * 85, 48 * 64, 1),
    # 81 frames -> 21; 720/16 x 1280/16 = 45 x 80; 40 heads x 128.
    "wan2.1-t2v-14b": _expected_feature_bytes(21 * 45 * 80, 40 * 128, 1),
    # 49 frames -> 13; 480/16 x 720/16 = 30 x 45; 24 heads x 128.
    "hunyuanvideo": _expected_feature_bytes(13 * 30 * 45, 24 * 128, 1),
}


@pytest.mark.parametrize("name", REAL)
def test_real_preset_dry_run_needs_no_weights_and_sizes_the_features(run_cli, tmp_path, name):
    from datagen.build import prepare_build

    assert name in PUBLISHED_MB or name in HAND, f"add {name}'s expected size"
    cfg = preset(name)
    bank = tmp_path / "bank.jsonl"
    entry = {"id": "a-dog", "prompt": "a dog runs across a field"}
    if cfg.generation.first_frame == "prompt" and name.endswith("i2v"):
        import cv2

        cv2.imwrite(str(tmp_path / "dog.png"), np.zeros((48, 72, 3), np.uint8))
        entry["image"] = "dog.png"
    bank.write_text(json.dumps(entry) + "\n")
    code, text, err = run_cli(
        "build", "--prompts", bank, "--out", tmp_path / "o", "--preset", name, "--dry-run"
    )
    assert code == 0, err
    assert f"preset {name}, model {cfg.model.model_id}" in text
    assert "dry run: nothing written" in text and not (tmp_path / "o").exists()

    pairs = len(cfg.capture.feature_layers) * len(cfg.capture.feature_steps)
    per_sample = prepare_build(cfg, bank, tmp_path / "o", dry_run=True).plan
    got = per_sample.feature_bytes_per_sample
    if name in PUBLISHED_MB:
        # The published figures are rounded to the MB (10^6 bytes).
        assert abs(got / pairs / 1e6 - PUBLISHED_MB[name]) < 1.0, got / pairs / 1e6
    else:
        assert got == HAND[name] * pairs
    shown = re.search(r"\+ ([\d.]+) (MB|GB) of q/k features", text)
    assert shown, text
    scale = {"MB": 1e6, "GB": 1e9}[shown.group(2)]  # summary.human_bytes: decimal units
    assert abs(float(shown.group(1)) * scale - got) / got < 0.01


@pytest.mark.parametrize("family", sorted(TINY))
def test_another_familys_builtin_model_is_refused_in_one_line(run_cli, tmp_path, family):
    other = next(PRESETS[n].model.model_id for f, n in TINY.items() if f != family)
    bank = tmp_path / "bank.txt"
    bank.write_text("a dog\n")
    code, _, err = run_cli(
        "build", "--prompts", bank, "--out", tmp_path / "o", "--dry-run",
        "--preset", TINY[family], "--set", f"model.model_id={other}",
    )  # fmt: skip
    assert code == 2
    assert f"model.model_id '{other}' is not a" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_flow_matching_noise_equals_the_schedulers_own(family):
    """The feature pass noises Wan and HunyuanVideo latents as their rectified-flow schedulers
    do: ``scale_noise`` of diffusers' flow-matching scheduler at each of the pipeline's
    timesteps (and t=1000 is pure noise, t=0 the clean latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from datagen.models.base import flow_matching_noise

    fam = get_family(family)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = type("P", (), {"scheduler": scheduler})()
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 4, 3, 4, 6, generator=g)
    noise = torch.randn(1, 4, 3, 4, 6, generator=g)
    for t in fam.inference_timesteps(pipe, 4):
        ref = scheduler.scale_noise(clean, torch.tensor([t]), noise)
        torch.testing.assert_close(fam.add_noise(pipe, clean, noise, t), ref)
    torch.testing.assert_close(flow_matching_noise(scheduler, clean, noise, 1000.0), noise)
    torch.testing.assert_close(flow_matching_noise(scheduler, clean, noise, 0.0), clean)


def test_wan_latents_are_what_the_pipeline_decodes():
    """``encode_video`` normalises by the VAE's per-channel statistics exactly as WanPipeline
    undoes them before decoding: ``latents / (1 / std) + mean`` gives back the posterior mode."""
    from diffusers import AutoencoderKLWan

    from datagen.models.base import vae_posterior_mode
    from datagen.models.wan import WanFamily

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(
            base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            latents_mean=[0.5, -1.0, 2.0, 0.0], latents_std=[2.0, 0.5, 1.0, 3.0],
        ).eval()  # fmt: skip
    pipe = type("P", (), {"vae": vae, "transformer": SimpleNamespace(dtype=torch.float32)})()
    frames = np.random.default_rng(0).integers(0, 256, (1, 5, 16, 16, 3), dtype=np.uint8)
    z = WanFamily().encode_video(pipe, frames)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z / inv_std + mean, vae_posterior_mode(vae, frames))
