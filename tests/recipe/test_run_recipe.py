"""A run folder's recipe.yaml is read back once, typed (recipe.load.read_run_recipe): eval's system prompt and anyres
cap and merge's quantisation all come from the schema's Recipe, never from raw YAML with defaults restated."""

from __future__ import annotations

import pytest
import yaml

from lora_manip.errors import UserError
from lora_manip.recipe import dump_recipe, read_run_recipe, recipe_from_dict
from lora_manip.recipe.schema import DataCfg
from tests.conftest import saved_run_recipe, tiny_recipe_dict


def test_no_recipe_is_none_and_a_saved_one_is_the_recipe(tmp_path):
    assert read_run_recipe(tmp_path) is None
    raw = tiny_recipe_dict(tmp_path / "m", tmp_path / "d", tmp_path / "o", data__system_prompt="Robot.",
                           data__max_image_tiles=4)
    recipe = recipe_from_dict(raw)
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))
    back = read_run_recipe(tmp_path)
    assert back == recipe and back.data.system_prompt == "Robot." and back.data.max_image_tiles == 4


def test_what_the_file_spells_out_is_known(tmp_path):
    (tmp_path / "recipe.yaml").write_text(saved_run_recipe())
    data = read_run_recipe(tmp_path).data
    assert "system_prompt" not in data.model_fields_set
    assert data.system_prompt == DataCfg.model_fields["system_prompt"].default


def test_a_finished_run_is_not_checked_against_this_machine(tmp_path):
    # The run trained with a DeepSpeed config that is not here (another machine, a moved folder): its recipe still
    # says what it trained with. A fresh recipe naming that file is refused, as before.
    raw = tiny_recipe_dict(tmp_path / "m", tmp_path / "d", tmp_path / "o")
    raw["distributed"] = {"deepspeed": str(tmp_path / "gone.json")}
    with pytest.raises(UserError, match="distributed.deepspeed"):
        recipe_from_dict(raw)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert read_run_recipe(tmp_path).distributed.deepspeed == str(tmp_path / "gone.json")


@pytest.mark.parametrize("text, message", [
    ("data:\n  system_prompt: x\n", r"recipe.yaml is invalid:\n  - model: required key is missing"),
    ("[1, 2]\n", r"recipe .*recipe.yaml: expected a mapping"),
    ("a: [\n", r"recipe .*recipe.yaml line \d+: not valid YAML"),
])
def test_a_broken_recipe_is_an_error_naming_file_and_key(tmp_path, text, message):
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        read_run_recipe(tmp_path)


def test_one_bad_field_is_one_line(tmp_path):
    (tmp_path / "recipe.yaml").write_text(saved_run_recipe(method="qlora", quantization={"quant_type": "int4"}))
    with pytest.raises(UserError) as e:
        read_run_recipe(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'recipe.yaml'}: quantization.quant_type: ")
    assert "\n" not in str(e.value)
