"""What trains: LoRA lands on the parts that ask for it (never on SigLIP by name accident), full parts train."""

import pytest
from transformers import LlavaOnevisionForConditionalGeneration

from lora_manip.model.adapters import prepare_trainable, trainable_summary
from lora_manip.model.layouts import part_of, unwrap_peft
from lora_manip.recipe import recipe_from_dict
from lora_manip.train.optim import param_groups

from tests.conftest import tiny_recipe_dict


def _prepare(tiny_model_dir, tmp_path, **over):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path, tmp_path / "out", **over))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    return prepare_trainable(model, recipe), recipe


def test_lora_only_on_language_model(tiny_model_dir, tmp_path):
    model, _ = _prepare(tiny_model_dir, tmp_path)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora, "no LoRA weights attached"
    assert all(unwrap_peft(n).startswith("model.language_model.") for n in lora)
    assert not any("vision_tower" in n for n, _ in model.named_modules() if n.endswith(("lora_A", "lora_B")))
    adapted = {unwrap_peft(n).split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {unwrap_peft(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert "model.image_newline" in trainable
    assert any(n.startswith("model.multi_modal_projector.") for n in trainable)
    assert not any(n.startswith("model.vision_tower.") for n in trainable)
    assert not any(n.startswith("model.language_model.") and "lora_" not in n for n in trainable)
    assert set(trainable_summary(model)) == {"language_model", "projector"}


def test_vision_tower_lora_and_full(tiny_model_dir, tmp_path):
    model, _ = _prepare(tiny_model_dir, tmp_path, parts__vision_tower={"train": "lora"},
                        lora__target_modules=["q_proj", "v_proj", "out_proj"])
    parts = {part_of(n) for n, _ in model.named_parameters() if "lora_" in n}
    assert parts == {"language_model", "vision_tower"}
    model, _ = _prepare(tiny_model_dir, tmp_path, parts__vision_tower={"train": "full"})
    fresh = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert trainable_summary(model)["vision_tower"] == sum(p.numel() for p in fresh.model.vision_tower.parameters())


def test_targets_matching_nothing_is_an_error(tiny_model_dir, tmp_path):
    from lora_manip.errors import UserError

    with pytest.raises(UserError, match="matches no layer in vision_tower"):
        _prepare(tiny_model_dir, tmp_path, parts__vision_tower={"train": "lora"}, lora__target_modules=["o_proj"])


def test_full_method_sets_requires_grad_per_part(tiny_model_dir, tmp_path):
    model, _ = _prepare(tiny_model_dir, tmp_path, method="full",
                        parts__vision_tower={"train": "frozen"}, parts__projector={"train": "full"})
    for n, p in model.named_parameters():
        assert p.requires_grad == (part_of(n) != "vision_tower"), n


def test_param_groups_carry_part_learning_rates(tiny_model_dir, tmp_path):
    model, recipe = _prepare(tiny_model_dir, tmp_path, method="full",
                             parts__vision_tower={"train": "full", "lr": 4e-6},
                             parts__language_model={"lr": 2e-5}, parts__projector={"lr": 1e-4},
                             train__weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, recipe)
    lrs = {"language_model": 2e-5, "projector": 1e-4, "vision_tower": 4e-6}
    seen = set()
    for g in groups:
        part = g["group_name"].split("/")[0]
        assert g["lr"] == lrs[part]
        for p in g["params"]:
            n = names[id(p)]
            assert part_of(n) == part
            no_decay = "bias" in n or "norm" in n or "image_newline" in n or "position_embedding" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), n
            seen.add(n)
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
