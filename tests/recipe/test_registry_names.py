"""The registry's names as a recipe uses them: the example's Generation val patterns against every spelling of the
release's unpublished val file names, a dataset both trained on and validated on, and an unknown name's refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_manip.errors import UserError
from lora_manip.recipe import load_registry, recipe_from_dict

EXAMPLE = Path(__file__).parents[2] / "recipes" / "registry" / "datasets.example.yaml"
GEN_VAL = {  # example name -> the task part of its val file's name
    "vla_contact_box_val": "contact_box", "vla_contact_point_val": "contact_point",
    "vla_current_box_val": "current_box", "vla_final_box_val": "final_box",
    "vla_gripper_det_qa_val": "gripper_det", "vla_traj_init_point_qa_val": "traj",
    "vla_traj_qa_wo_init_pos_val": "traj_wo_init_pos"}


def base(data: dict) -> dict:
    return {"model": {"path": "m"}, "method": "lora", "data": data, "train": {"output_dir": "o"}}


def _example(root: Path, tmp_path: Path) -> Path:
    path = tmp_path / "datasets.yaml"
    path.write_text(EXAMPLE.read_text().replace("root: /path/to/RoboInter-VQA\n", f"root: {root}\n"))
    return path


def _val_folder(root: Path, names: list[str]) -> Path:
    folder = root / "Generation" / "meta" / "val" / "llava_format"
    folder.mkdir(parents=True)
    for n in names:
        (folder / n).write_text("[]")
    return folder


def _card(task: str) -> str:
    """The card's pattern (`*_contact_box_qa.json`, `*_traj_qa_wo_init_pos.json`) with a prefix."""
    return "val_traj_qa_wo_init_pos.json" if task == "traj_wo_init_pos" else f"val_{task}_qa.json"


@pytest.mark.parametrize("spell", [
    lambda t: f"{t}.json",  # upstream's eval: eval_details_{stem}.json read as eval_details_contact_box.json
    _card,  # the card's table
    lambda t: _card(t).removeprefix("val_"),  # the card's pattern with nothing before the task
])
def test_example_val_patterns_take_every_spelling_the_evidence_allows(tmp_path, spell):
    folder = _val_folder(tmp_path / "release", [spell(t) for t in GEN_VAL.values()])
    reg = load_registry(_example(tmp_path / "release", tmp_path))
    got = {name: Path(reg[name]["annotation_path"]) for name in GEN_VAL}
    assert got == {name: folder / spell(t) for name, t in GEN_VAL.items()}  # `traj` never its wo_init_pos sibling


@pytest.mark.parametrize("files, says", [
    (["contact_box.json", "val_contact_box_qa.json"], "2 files in {folder} match '{{,*_}}contact_box{{,_qa}}.json' "
                                                      "{spelt}: contact_box.json, val_contact_box_qa.json"),
    (["contact_point.json", "notes.json"], "no file in {folder} matches '{{,*_}}contact_box{{,_qa}}.json' {spelt}; "
                                           "its .json/.jsonl files: contact_point.json, notes.json"),
])
def test_example_val_pattern_matching_none_or_several_is_refused_with_the_candidates(tmp_path, files, says):
    folder = _val_folder(tmp_path / "release", files)
    reg = _example(tmp_path / "release", tmp_path)
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(reg), "train": [{"name": "rh20t_vla_contact_box_train"}],
                               "val": [{"name": "vla_contact_box_val"}]}))
    spelt = "(any of contact_box.json, contact_box_qa.json, *_contact_box.json, *_contact_box_qa.json)"
    assert "data.val.0.name: registry file" in str(e.value) and says.format(folder=folder, spelt=spelt) in str(e.value)


def test_a_path_with_braces_that_exists_is_that_file(tmp_path):
    folder = _val_folder(tmp_path, ["{a,b}.json", "a.json"])
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"x_val": {"annotation_path": str(folder / "{a,b}.json"),
                                                           "data_path": "."}}}))
    assert load_registry(path)["x_val"]["annotation_path"] == str(folder / "{a,b}.json")


# --- a dataset both trained on and validated on ----------------------------------------------------------------

@pytest.fixture()
def small(tmp_path):
    for n in ("a", "b", "shared"):
        (tmp_path / f"{n}.json").write_text("[]")
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump({"datasets": {
        "a_train": {"annotation_path": "a.json", "data_path": "."},
        "b_train": {"annotation_path": "b.json", "data_path": "."},
        "a_val": {"annotation_path": "shared.json", "data_path": "."},
        "b_val": {"annotation_path": "b.json", "data_path": "."}}}, sort_keys=False))  # one file, two names
    return path


@pytest.mark.parametrize("train, val, says", [
    ([{"name": "a_train"}], [{"name": "b_train"}, {"name": "a_train%50"}],
     "data.val.1: dataset 'a_train' is in data.train too"),
    ([{"name": "all"}], [{"name": "a_train"}], "data.val.0: dataset 'a_train' is in data.train too"),  # via `all`
    ([{"name": "b_train"}], [{"name": "all"}], "data.val.1: 'b_val' reads {root}/b.json, which data.train also "
                                               "reads (as 'b_train')"),
    ([{"name": "a_val"}], [{"name": "a_val"}], "data.val.0: dataset 'a_val' is in data.train too"),
    ([{"annotation_path": "{root}/shared.json", "data_path": "."}], [{"name": "a_val"}],
     "data.val.0: 'a_val' reads {root}/shared.json, which data.train also reads"),
])
def test_a_val_file_that_is_also_trained_on_is_refused(small, train, val, says):
    root = small.parent
    fmt = [{k: v.format(root=root) for k, v in e.items()} for e in train]
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(small), "train": fmt, "val": val}))
    line = next(x for x in str(e.value).splitlines() if "data.val." in x)
    assert says.format(root=root) in line and "val_fraction" in line


def test_train_and_val_apart_and_val_fraction_load(small):
    r = recipe_from_dict(base({"registry": str(small), "train": [{"name": "a_train", "val_fraction": 0.1}],
                               "val": [{"name": "all"}]}))
    assert [d.name for d in r.data.val] == ["a_val", "b_val"]


# --- an unknown name ----------------------------------------------------------------------------------------------

def test_an_unknown_name_lists_the_names_it_may_mean(small, tmp_path):
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(small), "train": [{"name": "alll"}]}))
    assert "unknown dataset 'alll' in registry" in str(e.value) and "did you mean all?" in str(e.value)
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(small), "train": [{"name": "zzz"}]}))
    assert "; its names: a_train, b_train, a_val, b_val, all (" in str(e.value)
    many = tmp_path / "many.yaml"
    many.write_text(yaml.safe_dump({"datasets": {f"set{i:02d}_train": {"annotation_path": "a.json", "data_path": "."}
                                                 for i in range(30)}}))
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(many), "train": [{"name": "qqq_tr"}]}))
    assert "; its 31 names, nearest first: " in str(e.value) and str(e.value).count("_train") >= 5
