import json

import pytest

from datagen.errors import UserError
from datagen.presets import PRESETS, resolve_config


def test_presets_carry_paper_settings():
    for name, model_id in (
        ("cogvideox-2b", "THUDM/CogVideoX-2b"),
        ("cogvideox-5b", "THUDM/CogVideoX-5b"),
    ):
        c = resolve_config(name)
        g = c.generation
        assert c.model.model_id == model_id
        assert (g.num_frames, g.height, g.width, g.num_inference_steps) == (49, 480, 720, 50)
        assert (g.guidance_scale, g.fps, g.max_sequence_length) == (6.0, 8, 226)
    assert resolve_config().preset == "tiny"
    assert set(PRESETS) >= {"tiny", "cogvideox-2b", "cogvideox-5b"}


def test_file_then_set_overrides_and_fingerprint_changes(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[generation]\nseed = 7\nnum_frames = 17\n[tracker]\ngrid_size = 5\n")
    base = resolve_config()
    c = resolve_config("tiny-random", f, ["generation.seed=9", 'tracker.settings={"win_size": 9}'])
    assert (c.generation.seed, c.generation.num_frames, c.tracker.grid_size) == (9, 17, 5)
    assert c.tracker.settings == {"win_size": 9}
    assert c.fingerprint() != base.fingerprint()
    assert resolve_config().fingerprint() == base.fingerprint()
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"preset": "cogvideox-2b", "shards": {"max_samples": 3}}))
    c2 = resolve_config("tiny-random", j)
    assert c2.preset == "cogvideox-2b" and c2.shards.max_samples == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["generation.colour=1"], r"unknown field 'generation.colour'"),
        (["gen.seed=1"], r"unknown section 'gen'"),
        (["generation.seed=abc"], r"generation.seed: expected an integer"),
        (["seed=1"], r"expected SECTION.FIELD=VALUE"),
        (["generation.height=0"], r"generation.height must be positive"),
        (["model.dtype=float8"], r"model.dtype 'float8'"),
        (["generation.width=95"], r"must be even"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_config("tiny-random", None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_config("tiny-random", tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[generation\n")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve_config("tiny-random", bad)
    y = tmp_path / "c.yaml"
    y.write_text("a: 1")
    with pytest.raises(UserError, match="unknown format"):
        resolve_config("tiny-random", y)
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        resolve_config("nope")
