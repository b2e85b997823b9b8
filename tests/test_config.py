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


def test_hidden_layers_are_left_out_of_the_stored_config_until_set():
    """Builds without ``capture.hidden_layers`` keep the stored config and fingerprint they
    had before the field existed; a set value is stored and changes the fingerprint."""
    base = resolve_config("tiny-random")
    assert base.capture.hidden_layers == []
    assert "hidden_layers" not in base.to_dict()["capture"]
    assert set(base.to_dict()["capture"]) == {
        "feature_layers", "feature_steps", "corr_layers", "corr_steps", "step_unit"
    }  # fmt: skip
    on = resolve_config("tiny-random", None, ["capture.hidden_layers=[1]"])
    assert on.capture.hidden_layers == [1] and on.to_dict()["capture"]["hidden_layers"] == [1]
    assert on.fingerprint() != base.fingerprint()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["capture.hidden_layers=[-1]"], r"capture.hidden_layers must hold distinct non-neg"),
        (["capture.hidden_layers=[1,1]"], r"capture.hidden_layers must hold distinct"),
        (["capture.hidden_layers=x"], r"capture.hidden_layers: expected a list of integers"),
        (
            ["capture.hidden_layers=[0]", "capture.feature_steps=[]"],
            r"capture.hidden_layers \[0\] are captured at capture.feature_steps, which is empty",
        ),
    ],
)
def test_bad_hidden_layers_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_config("tiny-random", None, overrides)


@pytest.mark.parametrize("preset_name", ["tiny-random", "tiny-random-wan", "tiny-random-hunyuan"])
def test_hidden_layer_past_the_models_layers_is_one_line(run_cli, tmp_path, preset_name):
    bank = tmp_path / "bank.txt"
    bank.write_text("a dog\n")
    code, _, err = run_cli(
        "build", "--prompts", bank, "--out", tmp_path / "o", "--dry-run",
        "--preset", preset_name, "--set", "capture.hidden_layers=[0,9]",
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "capture layers [9] do not exist" in err and not (tmp_path / "o").exists()


def test_dry_run_sizes_hidden_states(tmp_path):
    """Each hidden (layer, step) adds (token frames x h*w x width) fp16 bytes: half a q/k
    pair's."""
    from datagen.build import prepare_build

    bank = tmp_path / "bank.txt"
    bank.write_text("a dog\n")

    def feature_bytes(*sets):
        cfg = resolve_config("cogvideox-2b", None, list(sets))
        return prepare_build(cfg, bank, tmp_path / "o", dry_run=True).plan.feature_bytes_per_sample

    qk = feature_bytes("capture.feature_steps=[40,45]", "capture.feature_layers=[17]")
    both = feature_bytes(
        "capture.feature_steps=[40,45]", "capture.feature_layers=[17]",
        "capture.hidden_layers=[10,17,20]",
    )  # fmt: skip
    hidden_only = feature_bytes("capture.feature_steps=[40,45]", "capture.feature_layers=[]",
                                "capture.hidden_layers=[17]")  # fmt: skip
    one = 13 * 30 * 45 * 1920 * 2  # token frames x h*w x width (30 heads x 64) x 2 bytes
    assert qk == 2 * 2 * one and both == qk + 3 * 2 * one and hidden_only == 2 * one
