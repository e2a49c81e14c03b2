"""Recipe validation: every problem at once, with lines and suggestions; overrides; round trip."""

from __future__ import annotations

import pytest

from qlora_kit.errors import UsageError
from qlora_kit.recipe import Recipe, build_recipe, dump_recipe, load_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_round_trip_keeps_every_value(tmp_path):
    recipe = build_recipe(
        {
            "model": {"name": "opt-125m"},
            "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]},
            "train": {"lr": 1e-4, "max_steps": 10},
        }
    )
    again = load_recipe(write(tmp_path, dump_recipe(recipe, "header")))
    assert again == recipe and isinstance(again, Recipe)


def test_all_problems_are_reported_at_once(tmp_path):
    text = "model:\n  name: x\nlora:\n  rank: -1\ntrian:\n  lr: 1\ndata:\n  format: markdown\n"
    with pytest.raises(UsageError) as err:
        load_recipe(write(tmp_path, text))
    msg = str(err.value)
    assert "3 problems" in msg
    assert "lora.rank (line 4) must be positive" in msg
    assert "unknown section 'trian' (line 5); did you mean 'train'?" in msg
    assert "data.format (line 8) must be one of text, prompt_response, chat" in msg


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, "model:\n  name: opt-125m\n")
    assert load_recipe(path, ["train.max_steps=7", "lora.targets=[q_proj]"]).train.max_steps == 7
    with pytest.raises(UsageError, match=r"train\.max_steps must be an integer"):
        load_recipe(path, ["train.max_steps=seven"])
    with pytest.raises(UsageError, match=r"is not section\.key=value"):
        load_recipe(path, ["max_steps=7"])


def test_ints_are_accepted_for_floats_but_not_bools_for_ints():
    r = build_recipe({"model": {"name": "m"}, "train": {"lr": 1, "epochs": 2}})
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)
    with pytest.raises(UsageError, match=r"train\.micro_batch must be an integer"):
        build_recipe({"model": {"name": "m"}, "train": {"micro_batch": True}})


def test_broken_yaml_and_missing_model_are_clear(tmp_path):
    with pytest.raises(UsageError, match="not valid YAML at line"):
        load_recipe(write(tmp_path, "model:\n  name: [unclosed\n"))
    with pytest.raises(UsageError, match=r"model\.name is required"):
        load_recipe(write(tmp_path, "train:\n  lr: 0.1\n"))


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; a learning rate written that way must still work."""
    path = write(tmp_path, "model:\n  name: m\ntrain:\n  lr: 1e-4\n")
    assert load_recipe(path).train.lr == 1e-4
    assert load_recipe(path, ["train.lr=3e-3"]).train.lr == 3e-3
    with pytest.raises(UsageError, match="must be a number"):
        load_recipe(path, ["train.lr=fast"])
