"""Features of existing videos (the zero-shot protocol): `--source synthetic` and
`--source videos DIR` with capture on."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from datagen import open_dataset
from datagen.analysis.matching import head_averaged_matches
from datagen.build import prepare_build, run_build
from datagen.config import VideoConfig
from datagen.layout import TokenLayout
from datagen.models.cogvideox import CogVideoXFamily, capture_qk
from datagen.presets import resolve_config
from datagen.sources.synthetic import SyntheticConfig, render_synthetic_video
from datagen.validate import validate_dataset
from datagen.video import encode_video

SMALL = [
    "generation.num_inference_steps=4",
    "capture.feature_layers=[0,1]",
    "capture.feature_steps=[1,3]",
    "capture.corr_layers=[1]",
    "capture.corr_steps=[3]",
]


def _features(out, key):
    import tarfile

    with tarfile.open(out / "features-000000.tar") as tar:
        data = tar.extractfile(f"{key}.qk.safetensors").read()
    return safetensors.torch.load(data)


def test_synthetic_feature_pass_equals_a_direct_forward_at_the_noised_latents(tmp_path):
    cfg = resolve_config(
        "tiny-random",
        None,
        [
            "source.kind=synthetic",
            'source.synthetic={"num_frames": 9, "height": 64, "width": 96, "num_sprites": 2}',
            *SMALL,
        ],
    )
    out = tmp_path / "syn"
    summary = run_build(prepare_build(cfg, None, out, limit=1), progress=False)
    assert summary.samples == 1 and summary.rejected == 0
    assert validate_dataset(out)[0] == []
    sample = next(iter(open_dataset(out)))
    cap = sample["meta"]["capture"]
    assert cap["corr_layers"] == [1] and cap["corr_steps"] == [3]

    # Reference, straight from diffusers objects: VAE mode x scaling factor, the scheduler's
    # own noising at the 4-step schedule's timesteps, the caption as prompt, one forward.
    fam = CogVideoXFamily()
    pipe = fam.load_pipeline(cfg.model)
    video = render_synthetic_video(
        SyntheticConfig(num_frames=9, height=64, width=96, num_sprites=2),
        seed=sample["meta"]["seed"],
    )
    x = torch.from_numpy(video.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        x0 = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
        emb, _ = pipe.encode_prompt(
            [cap["prompt"]], do_classifier_free_guidance=False, max_sequence_length=32
        )
    x0 = x0.permute(0, 2, 1, 3, 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cap["noise_seed"]))
    pipe.scheduler.set_timesteps(4)
    stored = _features(out, sample["key"])
    corr = sample["correspondence"]
    layout = TokenLayout(**{k: sample["meta"]["layout"][k] for k in _LAYOUT_FIELDS})
    f, h, w = layout.token_grid
    for step in (1, 3):
        t = int(pipe.scheduler.timesteps[step])
        assert cap["step_timesteps"][str(step)] == t
        xt = pipe.scheduler.add_noise(x0, noise, torch.tensor([t]))
        qk = capture_qk(pipe.transformer, xt, emb, torch.tensor([t]), layers=[0, 1])
        for layer in (0, 1):
            q, k = qk[layer]
            got_q = stored[f"q.layer{layer:03d}.step{step:03d}"].float()
            torch.testing.assert_close(got_q, q[0].half().float(), atol=2e-3, rtol=2e-3)
            got_k = stored[f"k.layer{layer:03d}.step{step:03d}"].float()
            torch.testing.assert_close(got_k, k[0].half().float(), atol=2e-3, rtol=2e-3)
        if step == 3:
            q, k = qk[1]
            rc = layout.token_of_pixel(sample["queries"][:, 1:])
            qtok = rc[:, 0] * w + rc[:, 1]
            ref = head_averaged_matches(q, k)[0].numpy()[qtok]  # (N, F)
            np.testing.assert_array_equal(corr["match_forward"][0, 0], ref)


_LAYOUT_FIELDS = (
    "family",
    "num_frames",
    "height",
    "width",
    "vae_compression",
    "patch_size",
    "text_tokens",
    "text_position",
    "pad_front",
    "rope",
)


@pytest.fixture
def video_folder(tmp_path):
    folder = tmp_path / "vids"
    folder.mkdir()
    for i, frames in enumerate((10, 12)):
        v = render_synthetic_video(SyntheticConfig(num_frames=frames, height=64, width=64), i)
        (folder / f"clip {i}.mp4").write_bytes(encode_video(v.frames, 8, VideoConfig()))
    (folder / "clip 0.txt").write_text("a red box moves left\n")
    short = render_synthetic_video(SyntheticConfig(num_frames=3, height=64, width=64), 9)
    (folder / "short.mp4").write_bytes(encode_video(short.frames, 8, VideoConfig()))
    (folder / "notes.md").write_text("not a video")
    return folder


def test_video_files_become_tracked_samples_with_features(run_cli, tmp_path, video_folder):
    out = tmp_path / "ds"
    code, text, err = run_cli(
        "build", "--source", "videos", video_folder, "--out", out, "--preset", "tiny-random",
        "--quiet", *[a for s in SMALL for a in ("--set", s)],
    )  # fmt: skip
    assert code == 0, err
    assert "done: 2 samples written" in text and "1 failed" in text
    assert "short-r00 at read" in text and "3 frames, fewer than 9" in text
    samples = {s["key"]: s for s in open_dataset(out)}
    assert sorted(samples) == ["clip_0-r00", "clip_1-r00"]
    s0 = samples["clip_0-r00"]
    assert s0["frames"].shape == (9, 64, 96, 3)
    assert s0["meta"]["source"]["original"]["width"] == 64 and s0["meta"]["source"]["resized"]
    assert s0["meta"]["prompt"]["text"] == "a red box moves left"
    assert s0["meta"]["capture"]["prompt"] == "a red box moves left"
    assert samples["clip_1-r00"]["meta"]["prompt"]["text"] == ""
    assert s0["tracks"].shape == (100, 9, 2) and "qc" in s0["meta"]
    assert s0["correspondence"]["match_forward"].shape == (1, 1, 100, 3)
    assert run_cli("validate", out)[0] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "videos"], "--source takes a folder only for videos"),
        (["--source", "synthetic", "x"], "--source takes a folder only for videos"),
        (["--source", "movies", "x"], "--source movies: choose one of"),
        (["--source", "videos", "{tmp}/none"], "not a folder of video files"),
        (["--source", "videos", "{tmp}/empty"], "no video files"),
        (
            ["--source", "videos", "{tmp}/empty", "--prompts", "{tmp}"],
            "--source videos takes no --prompts",
        ),
        (
            ["--source", "synthetic", "--preset", "tiny-random"],
            "differs from the model's generation size",
        ),
    ],
)
def test_bad_source_arguments_get_one_line_and_write_nothing(run_cli, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_cli("build", "--out", tmp_path / "out", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_dry_run_estimate_is_close_to_the_written_feature_bytes(tmp_path):
    cfg = resolve_config("tiny-random", None, ["source.kind=synthetic", *_SYN, *SMALL])
    req = prepare_build(cfg, None, tmp_path / "o", limit=1)
    run_build(req, progress=False)
    feats = _features(tmp_path / "o", "synthetic-00000-r00")
    raw = sum(v.numel() * v.element_size() for v in feats.values())
    assert abs(req.plan.feature_bytes_per_sample - raw) / raw < 0.05


_SYN = ['source.synthetic={"num_frames": 9, "height": 64, "width": 96}']


def test_analyse_counts_equal_a_naive_loop_over_points(tmp_path, run_cli):
    cfg = resolve_config(
        "tiny-random",
        None,
        ["source.kind=synthetic", *_SYN, *SMALL, "capture.corr_layers=[0,1]"],
    )
    out = tmp_path / "syn"
    run_build(prepare_build(cfg, None, out, limit=2), progress=False)
    from datagen.analysis.matching import analyse_dataset

    table = analyse_dataset(out)
    # Naive reference of the documented definition, point by point.
    correct: dict = {}
    counted: dict = {}
    for s in open_dataset(out):
        meta = s["meta"]
        tp_h, tp_w = meta["layout"]["token_pixel_size"]
        f_count, h, w = meta["layout"]["token_grid"]
        t_of = meta["capture"]["step_timesteps"]
        for li, layer in enumerate(meta["capture"]["corr_layers"]):
            for si, step in enumerate(meta["capture"]["corr_steps"]):
                key = (layer, t_of[str(step)])
                for n in range(s["tracks"].shape[0]):
                    for j in range(1, f_count):
                        vf = 4 * j  # CogVideoX: token frame j ends at video frame 4j
                        x0, y0 = s["tracks"][n, 0]
                        x, y = s["tracks"][n, vf]
                        if not s["visible"][n, vf] or not (0 <= x < 96 and 0 <= y < 64):
                            continue
                        if abs(x - x0) < tp_w and abs(y - y0) < tp_h:
                            continue
                        m = int(s["correspondence"]["match_forward"][li, si, n, j])
                        cx, cy = (m % w + 0.5) * tp_w, (m // w + 0.5) * tp_h
                        ok = abs(cx - x) <= tp_w and abs(cy - y) <= tp_h
                        counted[key] = counted.get(key, 0) + 1
                        correct[key] = correct.get(key, 0) + int(ok)
    assert counted
    for (layer, t), n in counted.items():
        got = table.rows[f"layer {layer}"][t]
        assert (got.counted, got.correct) == (n, correct[(layer, t)])
    code, text, _ = run_cli("analyse", out, "--json", tmp_path / "a.json")
    assert code == 0 and "| layer 0 |" in text and (tmp_path / "a.json").exists()
    cell = table.rows["layer 0"][table.timesteps[0]]
    assert f"({cell.correct}/{cell.counted})" in text


def test_matching_table_shows_counts_and_no_percentage_without_points():
    from datagen.analysis.matching import MatchCounts, MatchingTable

    table = MatchingTable(timesteps=[500, 100])
    table.add("layer 1", 500, MatchCounts(correct=2, counted=8))
    table.add("layer 1", 100, MatchCounts())
    assert (
        table.markdown(counts=True).splitlines()[-1] == "| layer 1 | 25.0% (2/8) | n/a (0 points) |"
    )
    assert table.markdown().splitlines()[-1] == "| layer 1 | 25.0% | n/a |"
