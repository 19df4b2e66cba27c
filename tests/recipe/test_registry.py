"""The dataset registry, `name%NN`, seeded sampling and validation splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lora_manip.data.dataset import build_datasets, choose_subset, seeded_rng, split_validation
from lora_manip.recipe import load_registry, split_percent
from lora_manip.errors import UserError
from lora_manip.recipe import dump_recipe, recipe_from_dict

EXAMPLE = Path(__file__).parents[2] / "recipes" / "registry" / "datasets.example.yaml"


def base(data: dict) -> dict:
    return {"model": {"path": "m"}, "method": "lora", "data": data, "train": {"output_dir": "o"}}


@pytest.fixture()
def registry(tmp_path):
    path = tmp_path / "reg" / "datasets.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"root": "/mnt/robointer", "datasets": {
        "rh20t_vla_current_box_train": {"annotation_path": "meta/current_box.json", "data_path": "images/rh20t"},
        "droid_traj_choice_qa_train": {"annotation_path": "/abs/traj_choice_droid.json", "data_path": "vqa"}}}))
    return path


def test_names_resolve_through_the_registry(registry):
    r = recipe_from_dict(base({"registry": str(registry), "train": [
        {"name": "rh20t_vla_current_box_train%30"},
        {"name": "droid_traj_choice_qa_train", "sample": 500, "val_fraction": 0.1},
        {"name": "droid_traj_choice_qa_train", "data_path": "/elsewhere"},  # inline wins, the rest is filled in
        {"annotation_path": "inline.jsonl", "data_path": "imgs"}]}))
    a, b, c, d = r.data.train
    assert (a.name, a.annotation_path, a.data_path, a.sample) == (
        "rh20t_vla_current_box_train", "/mnt/robointer/meta/current_box.json", "/mnt/robointer/images/rh20t", 0.3)
    assert (b.annotation_path, b.sample, b.val_fraction) == ("/abs/traj_choice_droid.json", 500, 0.1)
    assert (c.annotation_path, c.data_path) == ("/abs/traj_choice_droid.json", "/elsewhere")
    assert (d.annotation_path, d.name) == ("inline.jsonl", None)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))  # the run folder's recipe reloads as it ran
    assert again.data.train == r.data.train


@pytest.mark.parametrize("data, message", [
    ({"train": [{"name": "rh20t_vla_curent_box_train"}]},
     "data.train.0.name: unknown dataset 'rh20t_vla_curent_box_train' in registry {reg}; did you mean "
     "rh20t_vla_current_box_train"),
    ({"train": [{"annotation_path": "a.json", "data_path": "d"}], "val": [{"name": "nope"}]},
     "data.val.0.name: unknown dataset 'nope'"),
    ({"train": [{"name": "rh20t_vla_current_box_train%300"}]}, "data.train.0.name: 'rh20t_vla_current_box_train%300'"
     ": the percentage must be in (0, 100]"),
    ({"train": [{"name": "rh20t_vla_current_box_train%30", "sample": 0.5}]}, "data.train.0.name: "),
    ({"train": [{"annotation_path": "a.json", "data_path": "d", "val_fraction": 1.5}]},
     "data.train.0.val_fraction: Input should be less than 1"),
    ({"train": [{"annotation_path": "a.json"}]}, "data.train.0.data_path: required key is missing"),
    ({"train": [{"annotation_path": "a.json", "data_path": "d"}], "on_too_long": "truncate"},
     "data.on_too_long: Input should be 'drop'"),
])
def test_errors_name_the_key_path(registry, data, message):
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(registry), **data}))
    assert message.format(reg=registry) in str(e.value)


def test_a_name_needs_a_registry(monkeypatch, tmp_path, registry):
    monkeypatch.delenv("LORA_MANIP_REGISTRY", raising=False)
    with pytest.raises(UserError, match=r"data.train.0.name: dataset 'x' is not in any registry: set data.registry"):
        recipe_from_dict(base({"train": [{"name": "x"}]}))
    with pytest.raises(UserError, match=r"data.registry: registry file .*nope.yaml not found"):
        recipe_from_dict(base({"registry": str(tmp_path / "nope.yaml"), "train": [{"name": "x"}]}))
    monkeypatch.setenv("LORA_MANIP_REGISTRY", str(registry))  # the per-machine default
    r = recipe_from_dict(base({"train": [{"name": "droid_traj_choice_qa_train"}]}))
    assert r.data.train[0].annotation_path == "/abs/traj_choice_droid.json"


def test_example_registry_lists_upstream_datasets():
    reg = load_registry(EXAMPLE)
    for name in ("rh20t_vla_current_box_train", "rh20t_vla_traj_qa_train", "droid_vla_gripper_det_qa_train",
                 "rh20t_grounding_choice_qa_train", "droid_traj_choice_qa_train", "manipvqa_train"):
        assert name in reg and Path(reg[name]["annotation_path"]).is_absolute()


def test_split_percent():
    assert split_percent("a_b%30") == ("a_b", 0.3) and split_percent("x") == ("x", None)
    assert split_percent("x%2.5") == ("x", 0.025)
    with pytest.raises(ValueError):
        split_percent("%30")


def test_sampling_is_seeded_and_reproducible():
    pos = np.arange(1000)
    a = choose_subset(pos, 0.3, seeded_rng(1, "f.json", "sample"))
    assert len(a) == 300 and np.array_equal(a, np.sort(a)) and len(set(a.tolist())) == 300
    assert np.array_equal(a, choose_subset(pos, 0.3, seeded_rng(1, "f.json", "sample")))
    assert not np.array_equal(a, choose_subset(pos, 0.3, seeded_rng(2, "f.json", "sample")))
    assert not np.array_equal(a, choose_subset(pos, 0.3, seeded_rng(1, "g.json", "sample")))
    assert len(choose_subset(pos, 250, seeded_rng(1))) == 250 and len(choose_subset(pos, 5000, seeded_rng(1))) == 1000
    val, train = split_validation(pos, 0.1, seeded_rng(0))
    assert len(val) == 100 and len(train) == 900 and not set(val.tolist()) & set(train.tolist())


def _write(folder: Path, n: int) -> Path:
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}?"},
                                               {"from": "gpt", "value": "yes" if i % 2 else "no"}]}
            for i in range(n)]
    path = folder / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def test_mixture_split_and_sample_are_reproducible_and_disjoint(tmp_path, processor):
    path = _write(tmp_path, 60)
    other = tmp_path / "b.jsonl"
    other.write_text(path.read_text().replace('"id": "r', '"id": "b'))

    def build(seed, sample=0.5):
        r = recipe_from_dict(base({"train": [
            {"annotation_path": str(path), "data_path": str(tmp_path), "val_fraction": 0.2, "sample": sample},
            {"annotation_path": str(other), "data_path": str(tmp_path), "sample": 10}]}))
        train, val = build_datasets(r.data, processor, seed)
        return ([train.samples[i].id for i in range(len(train))], [val.samples[i].id for i in range(len(val))])

    train, val = build(0)
    assert len(val) == 12 and len(train) == 24 + 10
    assert not set(train) & set(val) and all(v.startswith("r") for v in val)
    assert build(0) == (train, val)  # reproducible
    t1, v1 = build(1)
    assert v1 != val and t1 != train  # another seed, another draw
    t_all, v_all = build(0, sample=None)
    assert v_all == val  # the validation split does not depend on `sample`
    r_all = {x for x in t_all if x.startswith("r")}
    assert len(r_all) == 48 and {x for x in train if x.startswith("r")} < r_all  # sampled from the train part


# --- the RoboInter-VQA release as published (tests/fixtures/robointer_release.py is a stand-in of it) -----------

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from tests.fixtures.robointer_release import write_release

    return write_release(tmp_path_factory.mktemp("RoboInter-VQA"))


def _example_with_root(release: Path, tmp_path: Path) -> Path:
    """The example registry with nothing changed but `root`, as its header tells a user to do."""
    text = EXAMPLE.read_text()
    assert text.count("root: /path/to/RoboInter-VQA\n") == 1
    path = tmp_path / "datasets.yaml"
    path.write_text(text.replace("root: /path/to/RoboInter-VQA\n", f"root: {release}\n"))
    return path


def test_example_registry_names_every_released_file(release, tmp_path):
    from tests.fixtures.robointer_release import train_annotation_files, val_annotation_files

    reg = load_registry(_example_with_root(release, tmp_path))
    train = sorted(Path(e["annotation_path"]) for n, e in reg.items() if not n.endswith("_val"))
    assert train == train_annotation_files(release)  # each file once, nothing the release lacks
    val = sorted(Path(e["annotation_path"]) for n, e in reg.items() if n.endswith("_val"))
    assert val == val_annotation_files(release) and len(val) == 16  # Generation's patterns: each matches one file
    assert {e["data_path"] for e in reg.values()} == {str(release)}  # records carry the release-relative paths
    assert "rh20t_graspppose_choice_qa_train" in reg and "droid_graspppose_choice_qa_train" not in reg
    assert Path(reg["rh20t_vla_traj_qa_train"]["annotation_path"]).name.endswith("_traj_qa_wo_init_pos.json")
    assert Path(reg["vla_traj_init_point_qa_val"]["annotation_path"]).name.endswith("_traj_qa.json")
    assert Path(reg["vla_traj_qa_wo_init_pos_val"]["annotation_path"]).name.endswith("_traj_qa_wo_init_pos.json")
    assert "*" in yaml.safe_load(EXAMPLE.read_text())["datasets"]["vla_contact_box_val"]["annotation_path"]


def test_data_check_passes_on_the_release_with_only_root_set(release, tmp_path):
    from lora_manip.data.check import run_check
    from tests.fixtures.robointer_release import val_annotation_files

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(base({"registry": str(_example_with_root(release, tmp_path)),
                                           "train": [{"name": "all"}], "val": [{"name": "all"}]})))
    r = recipe_from_dict(yaml.safe_load(recipe.read_text()))
    assert len(r.data.train) == 26 and not [d for d in r.data.train if d.name.endswith("_val")]  # never trained on
    assert sorted(Path(d.annotation_path) for d in r.data.val) == val_annotation_files(release)
    report = run_check(str(recipe))
    assert report["ok"], report["problems"][:3]
    assert len(report["datasets"]) == 26 + 16 and report["problem_count"] == 0 and not report["warnings"]


# --- annotation_path as a glob pattern (the release's Generation val file names are not published) ---------------

def _pattern_registry(tmp_path: Path, files: list[str], pattern: str, name: str = "gen_val") -> Path:
    folder = tmp_path / "meta"
    folder.mkdir(exist_ok=True)
    for f in files:
        (folder / f).write_text("[]")
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump({"datasets": {
        name: {"annotation_path": f"meta/{pattern}", "data_path": "."},
        "plain_train": {"annotation_path": "meta/plain.json", "data_path": "."}}}))
    return path


def test_a_pattern_matches_one_file_and_a_traj_pattern_not_its_wo_init_pos_sibling(tmp_path):
    reg = _pattern_registry(tmp_path, ["p_traj_qa.json", "p_traj_qa_wo_init_pos.json"], "*_traj_qa.json")
    assert load_registry(reg)["gen_val"]["annotation_path"] == str(tmp_path / "meta" / "p_traj_qa.json")
    r = recipe_from_dict(base({"registry": str(reg), "val": [{"name": "gen_val"}],
                               "train": [{"annotation_path": "a.json", "data_path": "d"}]}))
    assert r.data.val[0].annotation_path == str(tmp_path / "meta" / "p_traj_qa.json")  # the recipe gets the file


@pytest.mark.parametrize("files, message", [
    (["a_contact_point_qa.json", "notes.txt", *[f"x{i:02d}.json" for i in range(12)]],
     "registry file {reg}: datasets.gen_val.annotation_path 'meta/*_contact_box_qa.json': no file in {folder} "
     "matches '*_contact_box_qa.json'; its .json/.jsonl files: a_contact_point_qa.json, x00.json, x01.json, "
     "x02.json, x03.json, x04.json, x05.json, x06.json, x07.json, x08.json, ... (13 in all); set annotation_path "
     "to one of them"),
    (["a_contact_box_qa.json", "b_contact_box_qa.json"],
     "registry file {reg}: datasets.gen_val.annotation_path 'meta/*_contact_box_qa.json': 2 files in {folder} "
     "match '*_contact_box_qa.json': a_contact_box_qa.json, b_contact_box_qa.json; make the pattern match one of "
     "them, or set annotation_path to the file"),
])
def test_a_pattern_matching_no_file_or_several_is_one_line(tmp_path, files, message):
    reg = _pattern_registry(tmp_path, files, "*_contact_box_qa.json")
    expected = message.format(reg=reg, folder=tmp_path / "meta")
    table = load_registry(reg)  # reading the registry matches nothing yet
    with pytest.raises(ValueError) as e:
        table["gen_val"]
    assert str(e.value) == expected and isinstance(e.value, UserError)  # eval's sources show it as it is
    with pytest.raises(UserError) as e:  # a recipe: under the entry's key path, one line
        recipe_from_dict(base({"registry": str(reg), "train": [{"name": "gen_val"}]}))
    line = next(x for x in str(e.value).splitlines() if "gen_val" in x)
    assert line.endswith(expected) and "data.train.0.name" in line


def test_a_pattern_is_matched_only_when_its_dataset_is_used(tmp_path):
    reg = _pattern_registry(tmp_path, ["plain.json"], "*_contact_box_qa.json")
    r = recipe_from_dict(base({"registry": str(reg), "train": [{"name": "plain_train"}]}))
    assert r.data.train[0].annotation_path == str(tmp_path / "meta" / "plain.json")
    given = recipe_from_dict(base({"registry": str(reg),
                                   "train": [{"name": "gen_val", "annotation_path": "mine.json"}]}))
    assert given.data.train[0].annotation_path == "mine.json"  # its own file: the pattern is not needed
    missing = tmp_path / "datasets2.yaml"
    missing.write_text(yaml.safe_dump({"datasets": {"v_val": {"annotation_path": "nowhere/*.json", "data_path": "."}}}))
    with pytest.raises(ValueError, match=r"datasets.v_val.annotation_path 'nowhere/\*.json': folder .*nowhere not "
                                         r"found; check the registry's root \(.*datasets2.yaml sets none: its paths "
                                         r"are relative to its folder .*\)$"):
        load_registry(missing)["v_val"]


@pytest.mark.parametrize("root, says", [("/mnt/no-such-release", "root = /mnt/no-such-release)"),
                                        ("rel", "root = rel, i.e. {folder}/rel)")])
def test_a_missing_pattern_folder_names_the_registry_root(tmp_path, root, says):
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump({"root": root, "datasets": {"v_val": {"annotation_path": "m/*.json",
                                                                          "data_path": "."}}}))
    with pytest.raises(UserError) as e:
        load_registry(path)["v_val"]
    assert str(e.value).endswith(f"; check the registry's root ({path}: {says.format(folder=tmp_path)}")


def test_a_wrong_root_lists_every_missing_file_of_the_recipe_train_and_val(tmp_path):
    """The example registry as a user copies it, its root wrong: the refusal for the val patterns also counts the
    training files (and plain val files) that are missing, each line naming the root to check."""
    wrong = tmp_path / "not-the-release"
    reg = _example_with_root(wrong, tmp_path)
    written = yaml.safe_load(reg.read_text())["datasets"]
    train = [n for n in written if not n.endswith(("_val", "_test"))]
    plain_val = [n for n in written if n.endswith("_val") and "*" not in written[n]["annotation_path"]]
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(reg), "train": [{"name": "all"}], "val": [{"name": "all"}]}))
    lines = str(e.value).splitlines()
    hint = f"check the registry's root ({reg}: root = {wrong})"
    assert len(train) == 26 and plain_val and all(line.endswith(hint) for line in lines[1:]), lines
    (t,) = [x for x in lines if "data.train:" in x]
    assert f"data.train: {len(train)} annotation file(s) the registry names are missing too: {train[0]} (" in t
    assert f"({len(train)} in all)" in t
    (v,) = [x for x in lines if "data.val:" in x]
    assert f"data.val: {len(plain_val)} annotation file(s) the registry names are missing too: {plain_val[0]} (" in v
    assert len([x for x in lines if "not found; check the registry's root" in x]) == len(written) - len(train) \
        - len(plain_val)  # one line per val pattern


def test_a_literal_path_is_not_globbed_even_with_brackets_in_its_name(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "val[1].json").write_text("[]")
    (folder / "val1.json").write_text("[]")  # what `val[1].json` would match as a pattern
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump({"datasets": {
        "bracket_val": {"annotation_path": "meta/val[1].json", "data_path": "."},
        "absent_val": {"annotation_path": "meta/absent.json", "data_path": "."}}}))
    reg = load_registry(path)
    assert reg["bracket_val"]["annotation_path"] == str(folder / "val[1].json")
    assert reg["absent_val"]["annotation_path"] == str(folder / "absent.json")  # as today: found missing later
    r = recipe_from_dict(base({"registry": str(path), "train": [{"name": "bracket_val"}]}))
    assert r.data.train[0].annotation_path == str(folder / "val[1].json")


def test_all_leaves_out_held_out_sets_in_train_and_is_the_val_sets_in_val(tmp_path):
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump({"datasets": {n: {"annotation_path": f"{n}.json", "data_path": "."} for n in (
        "a_train", "b", "a_val", "a_test", "interval")}}, sort_keys=False))
    r = recipe_from_dict(base({"registry": str(path), "train": [{"name": "all"}], "val": [{"name": "all"}]}))
    assert [d.name for d in r.data.train] == ["a_train", "b", "interval"] and [d.name for d in r.data.val] == ["a_val"]
    path.write_text(yaml.safe_dump({"datasets": {"a_train": {"annotation_path": "a.json", "data_path": "."}}}))
    with pytest.raises(UserError, match=r"data.val.0.name: `all`: registry .* lists no \*_val datasets"):
        recipe_from_dict(base({"registry": str(path), "train": [{"name": "all"}], "val": [{"name": "all"}]}))


def test_all_names_every_registry_dataset(registry):
    r = recipe_from_dict(base({"registry": str(registry), "train": [{"name": "all%30", "val_fraction": 0.1}]}))
    assert [(d.name, d.sample, d.val_fraction) for d in r.data.train] == [  # in the file's order (safe_dump sorts)
        ("droid_traj_choice_qa_train", 0.3, 0.1), ("rh20t_vla_current_box_train", 0.3, 0.1)]
    assert r.data.train[0].annotation_path == "/abs/traj_choice_droid.json"


@pytest.mark.parametrize("train, message", [
    ([{"name": "all"}, {"name": "droid_traj_choice_qa_train%10"}],
     "data.train: dataset 'droid_traj_choice_qa_train' is named twice (once through `all`)"),
    ([{"name": "all", "annotation_path": "a.json"}], "data.train.0.name: `all` stands for every dataset of the "
                                                      "registry; it takes no annotation_path"),
    ([{"name": "rh20t"}], "(`all` in data.train stands for its 2 dataset(s) not named *_val / *_test, of 2)"),
])
def test_all_refusals(registry, train, message):
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(registry), "train": train}))
    assert message in str(e.value)


def test_an_unknown_name_says_what_all_means_where_it_is_used(tmp_path):
    path = tmp_path / "datasets.yaml"
    names = ("a_train", "b_train", "a_val", "b_val", "c_val", "a_test")
    path.write_text(yaml.safe_dump({"datasets": {n: {"annotation_path": f"{n}.json", "data_path": "."}
                                                 for n in names}}))
    with pytest.raises(UserError) as e:
        recipe_from_dict(base({"registry": str(path), "train": [{"name": "a_trian"}], "val": [{"name": "a_vla"}]}))
    assert "data.train.0.name: unknown dataset 'a_trian'" in str(e.value)
    assert "(`all` in data.train stands for its 2 dataset(s) not named *_val / *_test, of 6)" in str(e.value)
    assert "(`all` in data.val stands for its 3 *_val dataset(s) of 6)" in str(e.value)


def test_a_registry_dataset_called_all_is_that_dataset(tmp_path):
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"all": {"annotation_path": "mix.json", "data_path": "img"},
                                                 "other": {"annotation_path": "o.json", "data_path": "img"}}}))
    r = recipe_from_dict(base({"registry": str(path), "train": [{"name": "all"}]}))
    assert [(d.name, Path(d.annotation_path).name) for d in r.data.train] == [("all", "mix.json")]


def test_a_tilde_is_the_home_folder_in_every_recipe_and_registry_path(tmp_path, monkeypatch):
    """`~` in YAML or --set is not expanded by any shell: a path left with it made a folder named `~` beside the run
    (the tiny model was written to the home folder, then loaded from `./~`). Every path field, the registry file,
    its root and its entries' paths mean the home folder."""
    home = tmp_path / "home"
    (home / "reg").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / "reg" / "datasets.yaml").write_text(yaml.safe_dump({"root": "~/RoboInter-VQA", "datasets": {
        "a_train": {"annotation_path": "meta/a.json", "data_path": "images"},
        "b_train": {"annotation_path": "~/elsewhere/b.json", "data_path": "~/elsewhere"}}}))
    (home / "ds.json").write_text((Path(__file__).parents[2] / "recipes" / "zero3.json").read_text())
    r = recipe_from_dict({"model": {"path": "~/models/base", "adapter": None}, "method": "lora",
                          "data": {"registry": "~/reg/datasets.yaml", "train": [
                              {"name": "a_train"}, {"name": "b_train"},
                              {"annotation_path": "~/own.json", "data_path": "~/own"}]},
                          "train": {"output_dir": "~/runs/x"}, "distributed": {"deepspeed": "~/ds.json"}})
    assert r.model.path == str(home / "models/base") and r.train.output_dir == str(home / "runs/x")
    assert r.distributed.deepspeed == str(home / "ds.json") and r.data.registry == str(home / "reg/datasets.yaml")
    got = [(d.annotation_path, d.data_path) for d in r.data.train]
    assert got == [(str(home / "RoboInter-VQA/meta/a.json"), str(home / "RoboInter-VQA/images")),
                   (str(home / "elsewhere/b.json"), str(home / "elsewhere")),
                   (str(home / "own.json"), str(home / "own"))]
    assert recipe_from_dict({"model": {"path": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}, "method": "lora",
                             "data": {"train": [{"annotation_path": "a.json", "data_path": "."}]},
                             "train": {"output_dir": "o"}}).model.path == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
