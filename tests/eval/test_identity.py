"""Which val file a record belongs to (lora_manip/eval/identity.py): by its registry name, else its file's name
whatever the prefix, else its task; an unrecognised file is a row of its own, never merged with others of its kind.
Issue 24's QA found a Trace column pooling both trajectory files and `score --upstream-compatible` printing one row
per answer kind; both are checked here against upstream's generation.py rules worked out by hand."""

from __future__ import annotations

import json

import pytest
from pytest import approx
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.eval.identity import KNOWN, dataset_line, file_line, source_of
from lora_manip.eval.table import TABLES, row_key

runner = CliRunner()
GENERATION = ["contact_box", "current_box", "final_box", "gripper_det", "traj", "traj_wo_init_pos"]


@pytest.mark.parametrize("name", ["contact_box.json", "val_contact_box_qa.json", "val_contact_box.jsonl",
                                  "full_single_multi_contact_obj_contact_box_qa.json", "contact_box_qa_val",
                                  "results/eval_details_contact_box.json", "Generation/meta/val/x_contact_box_qa.json"])
def test_a_file_name_is_known_whatever_its_prefix(name):
    assert file_line(name) == "contact_box"


@pytest.mark.parametrize("name,line", [
    ("val_traj_qa.json", "traj"), ("val_traj_qa_wo_init_pos.json", "traj_wo_init_pos"),
    ("val_traj_wo_init_pos_qa.jsonl", "traj_wo_init_pos"), ("full_single_multi_contact_obj_traj_qa.json", "traj"),
    ("val_gripper_det_qa.json", "gripper_det"), ("rh20t_traj_lang_choice_qa_val", "trajlang_choice"),
    ("x_traj_direction_choice_with_traj.json", "traj_direction_choice_with_traj"),
    ("Task_planning/meta/val/decide/task_planning.json", "plan_decide"),
    ("Task_planning/meta/train/manipvqa/task_planning.json", None),  # all three types: the ids say which
    ("val_contact_point_qa.json", None), ("predictions.jsonl", None), ("", None), (None, None)])
def test_file_names(name, line):
    assert file_line(name) == line


def test_the_registry_name_comes_first_then_the_file_then_the_task():
    wo = "Generation/meta/val/llava_format/val_traj_qa_wo_init_pos.json"
    assert source_of("vla_traj_qa_wo_init_pos_val", (wo,), "traj") == "traj_wo_init_pos"
    assert source_of("vla_traj_init_point_qa_val", (wo,), "traj_wo_init_pos") == "traj"  # the registry decides
    assert dataset_line("rh20t_vla_traj_qa_train") == "traj_wo_init_pos"  # upstream's registry, the other way round
    assert source_of("val_traj_qa_wo_init_pos", (), "traj") == "traj_wo_init_pos"  # a file's stem names its dataset
    assert source_of("default", (None, wo), "traj") == "traj_wo_init_pos"  # the file before the task
    assert source_of("default", (), "traj") == "traj"  # only then the task
    assert source_of("default", (), "future_traj") == "future_traj"  # a task is matched exactly, never by suffix
    assert source_of("mine", ("preds.jsonl",), None) == "mine"  # unknown: the dataset, one row per file
    assert source_of("x", (), "task_planning", "ep1_Success_Positive_Task_2") == "plan_decide"  # upstream's id names
    assert row_key(TABLES["robointer"], "traj", wo, "x") is None  # never Trace
    assert KNOWN >= {r.key for t in TABLES.values() for r in t.rows}


def _box(a, b):
    return json.dumps({"current_bbox": [a, b]})


def _traj(*pts):
    return json.dumps({"future_traj": [list(p) for p in pts]})


def test_score_upstream_compatible_is_one_row_per_file(tmp_path):
    """Six files named as the QA named them, records without `task`: six rows, as generation.py prints them. Boxes:
    an exact answer (IoU 1) and a half-width shift (IoU 1/3), mean 2/3; trajectories (RH20T ids: 640x480): every
    point 0.1 lower is 48 px a point, DTW 96 over two points. Average Score (4 x 2/3 + 2 x 96) / 6."""
    for name in GENERATION:
        if name.startswith("traj"):
            recs = [{"id": f"RH20T_{name}_0", "pred": _traj((0.1, 0.2), (0.2, 0.2)),
                     "gt": _traj((0.1, 0.1), (0.2, 0.1))}]
        else:
            recs = [{"id": f"RH20T_{name}_0", "pred": _box([0.1, 0.1], [0.5, 0.5]),
                     "gt": _box([0.1, 0.1], [0.5, 0.5])},
                    {"id": f"RH20T_{name}_1", "pred": _box([0.2, 0.0], [0.6, 0.4]),
                     "gt": _box([0.0, 0.0], [0.4, 0.4])}]
        stem = "traj_qa" if name == "traj" else "traj_wo_init_pos_qa" if name == "traj_wo_init_pos" else f"{name}_qa"
        (tmp_path / f"val_{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = runner.invoke(app, ["score", *sorted(map(str, tmp_path.glob("*.jsonl"))), "--upstream-compatible", "--out",
                              str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    files = json.loads((tmp_path / "out" / "metrics.json").read_text())["upstream"]
    assert sorted(files["files"]) == sorted(GENERATION)
    assert all(files["files"][n]["score"] == approx(2 / 3) for n in GENERATION[:4])
    assert files["files"]["traj"]["score"] == files["files"]["traj_wo_init_pos"]["score"] == approx(96.0)
    assert files["average_score"] == approx((4 * 2 / 3 + 2 * 96.0) / 6)
    assert f"Average Score: {(4 * 2 / 3 + 2 * 96.0) / 6:.4f}" in res.output


def test_files_no_name_recognises_are_rows_of_their_own_never_merged_by_kind(tmp_path):
    good, half = _box([0.1, 0.1], [0.5, 0.5]), _box([0.2, 0.0], [0.6, 0.4])
    (tmp_path / "mine.jsonl").write_text(json.dumps({"id": 1, "pred": good, "gt": good}) + "\n")
    (tmp_path / "theirs.jsonl").write_text(json.dumps({"id": 1, "pred": half, "gt": _box([0, 0], [0.4, 0.4])}) + "\n")
    res = runner.invoke(app, ["score", str(tmp_path / "mine.jsonl"), str(tmp_path / "theirs.jsonl"),
                              "--upstream-compatible"])
    assert res.exit_code == 0, res.output
    assert "mine : Mean IOU: 1.0000" in res.output and "theirs : Mean IOU: 0.3333" in res.output
    assert "box : Mean IOU" not in res.output
