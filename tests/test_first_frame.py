"""Image-to-video generation (CogVideoX-I2V): where first frames come from, how they reach the
pipeline, and the note on prompt words the embedded model was not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datagen.errors import UserError
from datagen.models import tiny_dit
from datagen.prompts import load_prompts
from datagen.sources.synthetic import build_scene
from datagen.summary import unknown_words, vocabulary_note


def test_named_objects_reads_colour_noun_pairs():
    assert tiny_dit.named_objects("Red ball moves left, a grey box and blue, camera pans up") == [
        ("red", "ball"),
        ("gray", "box"),
        ("blue", None),
    ]
    assert tiny_dit.named_objects("a dog runs on the beach") == []


def test_first_frame_matches_named_colours_and_shapes():
    cap = "purple box moves up right, yellow ball moves down right, green box moves up right"
    frame, scene_seed = tiny_dit.first_frame_for_prompt(cap, 7)
    scene = build_scene(tiny_dit.TRAIN_VIDEO, scene_seed)
    have = sorted(tiny_dit.sprite_words(scene))
    assert have == sorted([("purple", "box"), ("yellow", "ball"), ("green", "box")])
    # The frame is that scene's frame 0, and the choice is deterministic.
    np.testing.assert_array_equal(frame, scene.render_frame(0)[0])
    again, seed2 = tiny_dit.first_frame_for_prompt(cap, 7)
    assert seed2 == scene_seed and np.array_equal(again, frame)
    assert tiny_dit.first_frame_for_prompt(cap, 8)[1] != scene_seed


def test_with_first_frame_is_what_the_i2v_pipeline_builds():
    x0 = torch.randn(2, 8, 3, 4, 4)
    xt = torch.randn(2, 8, 3, 4, 4)
    got = tiny_dit.with_first_frame(xt, x0)
    assert got.shape == (2, 8, 6, 4, 4)
    assert torch.equal(got[:, :, :3], xt)
    assert torch.equal(got[:, 0, 3:], x0[:, 0])
    assert not got[:, 1:, 3:].any()


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory) -> Path:
    """A random-weight tiny I2V pipeline saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("i2v") / "pipe"
    tiny_dit.build_pipeline(seed=3).save_pretrained(str(folder))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == (
        "CogVideoXImageToVideoPipeline"
    )
    return folder


def test_i2v_generation_gets_the_exact_first_frame_latents(i2v_folder):
    from datagen.models.cogvideox import CogVideoXFamily
    from datagen.presets import resolve_config

    cfg = resolve_config("tiny", None, [f"model.model_id={i2v_folder}"])
    fam = CogVideoXFamily()
    pipe = fam.load_pipeline(cfg.model)
    assert fam.takes_first_frame(pipe)
    images = [tiny_dit.first_frame_for_prompt("red ball", s)[0] for s in (1, 2)]
    seen = {}
    orig = pipe.prepare_latents

    def spy(*a, **k):
        out = orig(*a, **k)
        seen["image_latents"] = out[1]
        return out

    pipe.prepare_latents = spy
    video = fam.generate(pipe, ["red ball", "blue box"], ["", ""], [1, 2], cfg.generation, images)
    assert video.shape == (2, 8, 32, 32, 3) and video.dtype == np.uint8
    want = tiny_dit.frames_to_latents(np.stack(images)[:, None])
    assert torch.equal(seen["image_latents"][:, :1], want)
    assert not seen["image_latents"][:, 1:].any()
    with pytest.raises(ValueError, match="one first frame a prompt"):
        fam.generate(pipe, ["red ball"], [""], [1], cfg.generation)


def test_build_with_procedural_and_file_first_frames(i2v_folder, tmp_path, run_cli):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :, 2] = 200  # BGR: a red image
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "red.png"), image)
    bank = tmp_path / "bank.jsonl"
    bank.write_text(
        json.dumps({"id": "a", "prompt": "red ball moves left", "image": "img/red.png"}) + "\n"
    )
    common = ("--prompts", bank, "--quiet", "--set", f"model.model_id={i2v_folder}",
              "--set", "qc.rejected=keep")  # fmt: skip
    out = tmp_path / "file"
    code, _, err = run_cli("build", "--out", out, *common, "--set", "generation.first_frame=prompt")
    assert code == 0, err
    from datagen import open_dataset

    s = next(iter(open_dataset(out)))
    ff = s["meta"]["source"]["first_frame"]
    assert ff["kind"] == "image" and ff["path"] == str((tmp_path / "img" / "red.png").resolve())
    out = tmp_path / "proc"
    assert run_cli("build", "--out", out, *common)[0] == 0  # tiny preset: procedural
    s = next(iter(open_dataset(out)))
    ff = s["meta"]["source"]["first_frame"]
    assert ff["kind"] == "procedural"
    want = tiny_dit.first_frame_for_prompt("red ball moves left", s["meta"]["seed"])[1]
    assert ff["scene_seed"] == want


def test_i2v_prompt_without_image_is_refused_before_anything_is_written(
    i2v_folder, tmp_path, run_cli
):
    bank = tmp_path / "bank.txt"
    bank.write_text("red ball moves left\n")
    code, _, err = run_cli(
        "build", "--prompts", bank, "--out", tmp_path / "o", "--quiet",
        "--set", f"model.model_id={i2v_folder}", "--set", "generation.first_frame=prompt",
    )  # fmt: skip
    assert code == 2
    assert err.startswith(f"datagen: error: {bank}:1: model ")
    assert "is image-to-video and this prompt has no 'image' field" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prompt_image_field_is_checked_when_the_bank_is_read(tmp_path):
    bank = tmp_path / "b.jsonl"
    bank.write_text(json.dumps({"prompt": "x", "image": "missing.png"}) + "\n")
    with pytest.raises(UserError, match=r"b.jsonl:1: image 'missing.png' cannot be read"):
        load_prompts(bank)
    bank.write_text(json.dumps({"prompt": "x", "image": "notes.txt"}) + "\n")
    with pytest.raises(UserError, match=r"b.jsonl:1: image 'notes.txt' is not one of .png"):
        load_prompts(bank)
    (tmp_path / "ok.png").write_bytes(b"\x89PNG fake")
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,image\nhello,ok.png\n")
    (p,) = load_prompts(csv)
    assert p.image == str((tmp_path / "ok.png").resolve()) and len(p.image_sha256) == 64


def test_unknown_words_counts_prompts_and_ranks_content_words_first():
    from datagen.prompts import Prompt

    known = tiny_dit.CAPTION_WORDS
    prompts = [
        Prompt("a", "red ball moves left, camera pans up"),
        Prompt("b", "a golden dog runs to the golden sea"),
        Prompt("c", "the dog and the blue box"),
    ]
    n, words = unknown_words(prompts, known)
    assert n == 2
    # dog (2 prompts) and golden (1) before the function words a, and, the, to.
    assert words[:4] == ["dog", "golden", "runs", "sea"]
    assert set(words[4:]) == {"a", "and", "the", "to"}
    note = vocabulary_note(prompts, known, "m")
    assert note.startswith("note: 2 of 3 prompts use words model m was not trained on")
    assert "'dog', 'golden'" in note
    assert vocabulary_note(prompts[:1], known, "m") is None


def test_build_prints_the_vocabulary_note_once(tmp_path, run_cli):
    bank = tmp_path / "bank.txt"
    bank.write_text("red ball moves left\na golden retriever runs\na golden dog\n")
    code, out, _ = run_cli("build", "--prompts", bank, "--out", tmp_path / "o", "--dry-run")
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: 2 of 3 prompts")
    assert "'golden'" in notes[0]
    # The note counts the prompts this build generates: the first one alone is all known words.
    code, out, _ = run_cli(
        "build", "--prompts", bank, "--out", tmp_path / "o", "--dry-run", "--limit", "1"
    )
    assert code == 0 and "note:" not in out
    # Models whose training words the project does not know get no note.
    code, out, _ = run_cli(
        "build", "--prompts", bank, "--out", tmp_path / "o", "--dry-run", "--preset", "tiny-random"
    )
    assert code == 0 and "note:" not in out
