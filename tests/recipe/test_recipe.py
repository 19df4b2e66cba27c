from pathlib import Path

import pytest
import yaml

from lora_manip.errors import UserError
from lora_manip.recipe import apply_overrides, dump_recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))

BASE = {
    "model": {"path": "llava-hf/llava-onevision-qwen2-7b-ov-hf"},
    "method": "lora",
    "data": {"train": [{"annotation_path": "a.json", "data_path": "imgs"}]},
    "train": {"output_dir": "runs/x"},
}


def test_shipped_recipes_validate():
    assert RECIPES, "no recipes shipped"
    for path in RECIPES:
        load_recipe(path)


def test_defaults_resolve_from_method():
    r = recipe_from_dict(BASE)
    assert (r.parts.language_model.train, r.parts.projector.train, r.parts.vision_tower.train) == \
        ("lora", "full", "frozen")
    full = recipe_from_dict({**BASE, "method": "full"})
    assert full.parts.language_model.train == "full"


@pytest.mark.parametrize("patch, message", [
    ({"lora": {"r": 0}}, "lora.r: Input should be greater than 0"),
    ({"lora": {"rank": 8}}, "lora.rank: unknown key"),
    ({"train": {"output_dir": "x", "per_device_batch_size": "two"}}, "train.per_device_batch_size:"),
    ({"method": "qlora4"}, "method: Input should be 'full', 'lora' or 'qlora'"),
    ({"method": "full", "parts": {"vision_tower": {"train": "lora"}}},
     "parts.vision_tower.train: 'lora' needs method: lora or qlora"),
    ({"parts": {"language_model": {"train": "full"}}}, "parts.language_model.train: 'full' needs method: full"),
    ({"parts": {"language_model": {"train": "frozen"}, "projector": {"train": "frozen"}}},
     "every part is frozen"),
    ({"parts": {"language_model": {"train": "frozen"}}}, "no part has train: lora"),
    ({"method": "qlora", "distributed": {"deepspeed": "recipes/zero3.json"}}, "distributed.deepspeed: QLoRA"),
    ({"distributed": {"deepspeed": "nope.json"}}, "distributed.deepspeed: nope.json not found"),
    ({"train": {"output_dir": "x", "optimizer": "mezo"}, "distributed": {"nproc_per_node": 2}},
     "train.optimizer: mezo runs in one process"),
])
def test_errors_name_the_key_path(patch, message):
    raw = {**BASE, **patch}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    assert message in str(e.value)


def test_all_errors_reported_at_once():
    raw = {**BASE, "lora": {"r": -1, "alpha": 0}, "bogus": 1}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    msg = str(e.value)
    assert "lora.r" in msg and "lora.alpha" in msg and "bogus: unknown key" in msg


def test_overrides_parse_yaml_values():
    raw = apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)),
                          ["lora.r=8", "train.gradient_checkpointing=true", "lora.target_modules=[q_proj, v_proj]",
                           "data.train.0.sample=0.5", "model.path=/models/x"])
    r = recipe_from_dict(raw)
    assert r.lora.r == 8 and r.train.gradient_checkpointing is True
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.train[0].sample == 0.5 and r.model.path == "/models/x"


def test_bad_override_is_a_user_error():
    with pytest.raises(UserError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["lora.r"])


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_recipe(scalar)


def test_dump_round_trips():
    r = recipe_from_dict(BASE)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert again == r


def test_deepspeed_optimizer_block_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}')
    with pytest.raises(UserError, match="has a `optimizer` block"):
        recipe_from_dict({**BASE, "method": "full", "distributed": {"deepspeed": str(ds)}})


def test_shipped_zero3_config_gathers_weights_and_has_no_optimizer():
    import json

    cfg = json.loads((Path(__file__).parents[2] / "recipes" / "zero3.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg


@pytest.mark.parametrize("patch, message", [
    ({"quantization": {"bits": 4}}, "quantization: only read with method: qlora (method is lora); remove the block "
     "or set method: qlora"),
    ({"method": "full", "quantization": {}}, "quantization: only read with method: qlora (method is full)"),
    ({"method": "full", "lora": {"r": 128}}, "lora: only read with method: lora or qlora (method is full, which "
     "trains no adapter); remove the block or set method: lora"),
])
def test_blocks_the_method_does_not_read_are_refused(patch, message):
    with pytest.raises(UserError) as e:
        recipe_from_dict({**BASE, **patch})
    assert message in str(e.value)


def test_blocks_the_method_reads_are_accepted_and_round_trip():
    for raw in ({**BASE, "method": "qlora", "quantization": {"quant_type": "fp4"}, "lora": {"r": 8}},
                {**BASE, "lora": {"r": 8}}, {**BASE, "method": "full"}):
        r = recipe_from_dict(raw)
        assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r
    # the defaults of an unwritten block are no block: the full recipe's dump has neither, the qlora one both
    assert "lora" not in yaml.safe_load(dump_recipe(recipe_from_dict({**BASE, "method": "full"})))
    assert recipe_from_dict({**BASE, "method": "qlora"}).quantization.quant_type == "nf4"
    with pytest.raises(UserError, match="lora: only read with method: lora or qlora"):
        recipe_from_dict(apply_overrides(yaml.safe_load(yaml.safe_dump({**BASE, "method": "full"})), ["lora.r=8"]))


def test_reward_names_match_the_rewards_training_computes():
    """The schema's reward table (what a recipe may name) and train/rewards.py (what runs) list the same rewards
    for the same kinds: a reward added on one side only fails here."""
    from lora_manip.recipe import REWARD_KINDS
    from lora_manip.train.rewards import REWARDS

    assert REWARD_KINDS == {name: kinds for name, (_, kinds) in REWARDS.items()}


GRPO = {**BASE, "objective": "grpo", "train": {"output_dir": "runs/x", "per_device_batch_size": 4}}
SFT_ONLY = {"data": {"packing": True, "group_by_length": False},
            "train": {"max_tokens_per_batch": 4096, "loss_reduction": "token", "eval_limit": 8,
                      "eval_max_new_tokens": 32}}


@pytest.mark.parametrize("section, key", [(s, k) for s, keys in SFT_ONLY.items() for k in keys])
def test_settings_grpo_does_not_read_are_refused_with_key_path_and_fix(section, key):
    """TRL's GRPOTrainer batches prompts in groups with its own sampler and loss: SFT's batching, loss and
    eval-during-training settings would do nothing in a grpo recipe, even set to their defaults."""
    raw = {**GRPO, section: {**GRPO[section], key: SFT_ONLY[section][key]}}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    lines = [line.strip(" -") for line in str(e.value).splitlines()[1:]]
    assert any(line.startswith(f"{section}.{key}: not read by objective grpo") and "remove it" in line
               for line in lines), lines


def test_the_same_settings_are_read_by_sft():
    data = {"train": [{"annotation_path": "a.json", "data_path": "imgs", "val_fraction": 0.1}], "packing": True}
    r = recipe_from_dict({**BASE, "data": data, "train": {**SFT_ONLY["train"], "output_dir": "x", "eval_steps": 5}})
    assert (r.data.packing, r.train.max_tokens_per_batch, r.train.eval_limit) == (True, 4096, 8)
    assert recipe_from_dict({**BASE, "data": {**BASE["data"], "group_by_length": False}}).data.group_by_length is False


@pytest.mark.parametrize("train, message", [
    ({"mezo_eps": 1e-2}, "train.mezo_eps: only read with train.optimizer: mezo (optimizer is adamw_torch)"),
    ({"eval_limit": 8}, "train.eval_limit: only read with train.eval_steps"),
    ({"eval_max_new_tokens": 16}, "train.eval_max_new_tokens: only read with train.eval_steps"),
])
def test_settings_another_setting_switches_off_are_refused(train, message):
    with pytest.raises(UserError) as e:
        recipe_from_dict({**BASE, "train": {**BASE["train"], **train}})
    assert message in str(e.value)
    with pytest.raises(UserError, match="data.group_by_length: not read with train.max_tokens_per_batch"):
        recipe_from_dict({**BASE, "data": {**BASE["data"], "group_by_length": False},
                          "train": {**BASE["train"], "max_tokens_per_batch": 4096}})
    recipe_from_dict({**BASE, "train": {**BASE["train"], "optimizer": "mezo", "mezo_eps": 1e-2}})


def test_every_unread_setting_is_left_out_of_the_run_folder_copy_which_reloads():
    from lora_manip.recipe.checks import unread_settings

    for raw in (GRPO, {**GRPO, "method": "full"}, BASE, {**BASE, "train": {**BASE["train"],
                                                                          "max_tokens_per_batch": 512}}):
        r = recipe_from_dict(raw)
        dumped = yaml.safe_load(dump_recipe(r))
        for path in unread_settings(r):
            *parents, last = path.split(".")
            node = dumped
            for key in parents:
                node = node[key]
            assert last not in node, path
        assert recipe_from_dict(dumped) == r
    assert "packing" not in yaml.safe_load(dump_recipe(recipe_from_dict(GRPO)))["data"]
    assert "packing" in yaml.safe_load(dump_recipe(recipe_from_dict(BASE)))["data"]
