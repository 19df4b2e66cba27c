"""`train --dry-run` is the plan a user checks before a long run: when the run would stop on its data (a missing
annotation file or images folder, an unreadable file, no training records) the plan is printed all the same, its last
line says which datasets and what to fix, and the exit code is 2 (bad input). The demo's synthetic data, created on
first train, is not missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lora_manip.cli import app

from tests.conftest import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "recipes" / "registry" / "datasets.example.yaml"


def dry_run(recipe: Path, *args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run", *map(str, args)])
    return result.exit_code, result.output.splitlines()


def stops(code: int, lines: list[str]) -> str:
    """The plan was printed and ends with the one error line; returns that line."""
    assert code == 2, "\n".join(lines)
    assert "optimizer parameter groups:" in lines and any(x.startswith("optimizer steps:") for x in lines), lines
    errors = [x for x in lines if x.startswith("error: ")]
    assert errors == [lines[-1]] and lines[-1].startswith("error: the run would stop on its data: "), lines
    return lines[-1]


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_wrong_registry_root_stops_the_plan_and_says_what_to_fix(tiny_model_dir, tmp_path):
    wrong = tmp_path / "not-the-release"
    registry = tmp_path / "datasets.yaml"  # the example as a user copies it, root set to a folder without the release
    registry.write_text(EXAMPLE.read_text().replace("root: /path/to/RoboInter-VQA\n", f"root: {wrong}\n"))
    names = [n for n in yaml.safe_load(registry.read_text())["datasets"] if not n.endswith(("_val", "_test"))]
    raw = tiny_recipe_dict(tiny_model_dir, tmp_path, tmp_path / "run", train__max_steps=-1)
    raw["data"] = {"registry": str(registry), "train": [{"name": "all"}]}
    code, lines = dry_run(write(tmp_path / "r.yaml", raw))
    line = stops(code, lines)
    assert f"annotation file not found for {len(names)} dataset(s) (train: {names[0]}, " in line
    assert f"and {len(names) - 3} more)" in line and "images folder not found" in line
    assert f"check the registry's root ({registry}: root = {wrong})" in line
    assert "fix the recipe's" not in line  # every path came from the registry
    assert [x.split(":")[1].strip() for x in lines if "MISSING: annotation file" in x] == names  # each one listed
    assert "optimizer steps: not known: the run would stop on its data (last line)" in lines
    assert not (tmp_path / "run").exists()


def _bad_images(d: Path, tmp: Path) -> dict:
    return {"data_path": str(tmp / "no-images")}


def _malformed(d: Path, tmp: Path) -> dict:
    (tmp / "bad.json").write_text('[{"id": "a"}, {"id": ')
    return {"annotation_path": str(tmp / "bad.json")}


def _a_folder(d: Path, tmp: Path) -> dict:
    (tmp / "folder.json").mkdir()
    return {"annotation_path": str(tmp / "folder.json")}


def _empty(d: Path, tmp: Path) -> dict:
    (tmp / "empty.json").write_text("[]")
    return {"annotation_path": str(tmp / "empty.json")}


@pytest.mark.parametrize("change, row, says", [
    (_bad_images, "MISSING: images folder (data_path)", "images folder not found for 1 dataset(s) (train: "),
    (_malformed, "UNREADABLE: ", "annotation file unreadable for 1 dataset(s) (train: bad.json)"),
    (_a_folder, "folder.json is not a file", "annotation file not found for 1 dataset(s) (train: folder.json)"),
    (_empty, "train: empty.json: 0 records", "data.train's files hold no records"),
])
def test_each_way_the_data_would_stop_the_run(tiny_model_dir, synth_dir, tmp_path, change, row, says):
    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", train__max_steps=-1)
    raw["data"]["train"][0].update(change(synth_dir, tmp_path))
    code, lines = dry_run(write(tmp_path / "r.yaml", raw))
    line = stops(code, lines)
    assert says in line and any(row in x for x in lines), lines
    if change is not _empty:
        assert "fix the recipe's annotation_path / data_path" in line


def test_a_missing_val_file_stops_the_plan_too(tiny_model_dir, synth_dir, tmp_path):
    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run")
    raw["data"]["val"] = [{"name": "held", "annotation_path": str(tmp_path / "val.json"), "data_path": str(synth_dir)}]
    line = stops(*dry_run(write(tmp_path / "r.yaml", raw)))
    assert "annotation file not found for 1 dataset(s) (val: held)" in line


def test_present_data_plans_with_exit_0_and_a_steps_line(tiny_model_dir, synth_dir, tmp_path):
    raw = tiny_recipe_dict(tiny_model_dir, synth_dir, tmp_path / "run", train__max_steps=-1, train__epochs=2)
    code, lines = dry_run(write(tmp_path / "r.yaml", raw))
    n = len(yaml.safe_load((synth_dir / "train.json").read_text()))
    assert code == 0 and not [x for x in lines if x.startswith("error")], lines
    assert f"optimizer steps: ~{-(-n * 2 // 4)} ({n:,} samples x 2 epoch(s) / 4, before sub-sampling and length " \
           "drops)" in lines


def test_the_demo_data_created_on_first_train_is_not_missing_but_another_file_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's relative paths (runs/...) name folders of a fresh clone
    raw = yaml.safe_load((ROOT / "recipes" / "tiny_cpu.yaml").read_text())
    code, lines = dry_run(write(tmp_path / "demo.yaml", raw))
    assert code == 0 and "  train: synth_train: missing (created on first train)" in lines, lines
    assert "optimizer steps: set by the data created on first train (the run logs them at start)" in lines
    raw["data"]["train"].append({"name": "mine", "annotation_path": "runs/synth-data/mine.json",
                                 "data_path": "runs/synth-data"})  # the synthetic writer never makes this file
    line = stops(*dry_run(write(tmp_path / "demo.yaml", raw)))
    assert "annotation file not found for 1 dataset(s) (train: mine)" in line and "synth_train" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.yaml"]  # nothing written


def test_a_processor_that_does_not_load_stops_a_budget_plan(tiny_model_dir, synth_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)  # the plan's model needs only its config
    raw = tiny_recipe_dict(config_only, synth_dir, tmp_path / "run", train__max_tokens_per_batch=900)
    line = stops(*dry_run(write(tmp_path / "r.yaml", raw)))
    assert "the processor does not load (" in line and "fix the recipe's" not in line
