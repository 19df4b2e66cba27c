"""Served as trained: what a stock stack loads from the kit's outputs is the model the kit trained and merged.
Stock PEFT (`PeftModel.from_pretrained(base, adapter).merge_and_unload()`) gives the kit's merge, image_newline
included; a run trained with an anyres cap carries it in the files servers read (config.json,
preprocessor_config.json), not only in the kit's recipe.yaml."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_manip.checkpoints.merge import merge_adapter
from lora_manip.checkpoints.tensors import Checkpoint, read_tensor
from lora_manip.data.processor import load_processor
from lora_manip.model.layouts import canonical
from lora_manip.recipe import recipe_from_dict

from tests.conftest import tiny_recipe_dict

CAP = 2


@pytest.fixture(scope="module")
def run(tiny_model_dir, synth_dir, tmp_path_factory):
    """A finished LoRA run with the projector (and image_newline) trained in full and anyres capped."""
    from lora_manip.train.workflow import build_trainer

    out = tmp_path_factory.mktemp("served") / "run"
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, synth_dir, out, train__max_steps=3,
                                               data__max_image_tiles=CAP, parts__projector={"lr": 5e-2}))
    trainer = build_trainer(recipe)
    trainer.train()
    trainer.save_final(str(out))
    return out


def _canonical_state(model) -> dict[str, torch.Tensor]:
    return {canonical(n): t.detach() for n, t in model.state_dict().items()}


def test_stock_peft_load_equals_the_kit_merge(run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlavaOnevisionForConditionalGeneration

    assert not (run / "extra_trainables.safetensors").exists()  # all of it in the adapter PEFT reads
    assert "base_model.model.model.image_newline" in load_file(run / "adapter_model.safetensors")
    merged, _ = merge_adapter(str(run), out=str(tmp_path / "merged"))
    kit = {canonical(r.name): read_tensor(r) for r in Checkpoint(merged).tensors()}

    base = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_model_dir)
    original = _canonical_state(base)["model.image_newline"].clone()
    stock = _canonical_state(PeftModel.from_pretrained(base, str(run)).merge_and_unload())
    assert set(stock) == set(kit)
    for name, t in kit.items():
        torch.testing.assert_close(stock[name], t, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (kit["model.image_newline"] - original).abs().max() > 1e-3  # it trained, and both carry it


def test_merged_folder_carries_the_image_cap(run, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    capped = load_processor(tiny_model_dir, max_image_tiles=CAP).image_processor.image_grid_pinpoints
    full = load_processor(tiny_model_dir).image_processor.image_grid_pinpoints
    assert len(capped) < len(full)
    merged, _ = merge_adapter(str(run), out=str(tmp_path / "merged"))
    for folder in (merged, run):  # the merge, and the run folder a server could also be pointed at
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        assert pre["image_grid_pinpoints"] == [list(p) for p in capped], folder
    assert AutoConfig.from_pretrained(merged).image_grid_pinpoints == [list(p) for p in capped]
    # what transformers' own loader builds from the merged folder tiles as training did, without recipe.yaml
    (merged / "recipe.yaml").unlink()
    assert load_processor(merged).image_processor.image_grid_pinpoints == [list(p) for p in capped]


def test_carry_image_cap_changes_nothing_without_a_cap(tiny_model_dir, tmp_path):
    import shutil

    from lora_manip.checkpoints.next_config import carry_image_cap

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert carry_image_cap(folder, None) == [] and carry_image_cap(folder, 36) == []
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(carry_image_cap(folder, CAP)) == ["config.json", "preprocessor_config.json"]


def test_vllm_backend_refuses_multi_image_records_before_importing_vllm(tmp_path, monkeypatch):
    """vLLM 0.33 gives each image of a multi-image prompt full anyres tiles; training gave each its base tile. The
    refusal names file, record and field, and comes before vLLM is needed (here it is hidden, as on a CPU box)."""
    import sys

    from lora_manip.data.records import load_samples
    from lora_manip.errors import UserError
    from lora_manip.eval.vllm_backend import check_single_image, generate_vllm

    from tests.conftest import write_two_images

    write_two_images(tmp_path)
    one = {"id": "one", "images": ["img/a.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhere is the cube?"}, {"from": "gpt", "value": "left"}]}
    two = {"id": "two", "images": ["img/a.png", "img/b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich frame is later?"}, {"from": "gpt", "value": "second"}]}
    (tmp_path / "v.json").write_text(json.dumps([one, two]))
    samples, problems = load_samples(tmp_path / "v.json", tmp_path)
    assert problems == [] and [len(s.images) for s in samples] == [1, 2]
    check_single_image(samples[:1])  # one image a record: served as trained
    with pytest.raises(UserError, match=r"v\.json .*id='two' field `images`: 2 images; --backend vllm") as e:
        check_single_image(samples)
    assert "--backend hf" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(UserError, match="id='two' field `images`"):
        generate_vllm(str(tmp_path), samples, None, 8, lambda idx, ans: None, progress=False)
