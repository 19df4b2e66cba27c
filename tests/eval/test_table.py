"""`--table robointer-files`: upstream's scorer rows (its fourteen eval files, in its order), each scored by the
upstream-compatible and the strict rules side by side, and the Average Score both ways; `--table robointer`: the
paper's Table 3, column by column in its units. Both checked on hand-made predictions whose numbers are worked out
by hand below."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.eval.table import TABLES, format_paper_table, row_key

runner = CliRunner()

# upstream's json_name_list (generation.py), in its order
UPSTREAM_FILES = ["contact_box", "current_box", "final_box", "gripper_det", "traj", "traj_wo_init_pos",
                  "contact_decide", "grasppose_choice", "grounding_choice", "traj_choice", "traj_direction_choice",
                  "traj_direction_choice_with_traj", "trajlang_choice", "trajlang_sub_choice"]


def _box(a, b):
    return json.dumps({"contact_bbox": [a, b]})


def _traj(*pts):
    return json.dumps({"future_traj": [list(p) for p in pts]})


# RH20T ids: upstream reads the frame as 640x480 (it ignores w / h); strict reads the records' w / h, the same here.
RECORDS = [
    # contact_box. 1: exact, IoU 1. 2: [0, 0, 0.4, 0.4] against [0.2, 0, 0.6, 0.4]: overlap 0.2 x 0.4 = 0.08, union
    # 0.16 + 0.16 - 0.08 = 0.24, IoU 1/3 (scaling both axes keeps it). Mean IoU 2/3, both above 0.1.
    {"id": "RH20T_cb_0", "task": "contact_box", "pred": _box([0.1, 0.1], [0.5, 0.5]),
     "gt": _box([0.1, 0.1], [0.5, 0.5]), "w": 640, "h": 480},
    {"id": "RH20T_cb_1", "task": "contact_box", "pred": _box([0.2, 0.0], [0.6, 0.4]),
     "gt": _box([0.0, 0.0], [0.4, 0.4]), "w": 640, "h": 480},
    # traj. 1: every point 0.1 lower: 48 px each, DTW 48 + 48 = 96 px. 2: exact, DTW 0, which upstream drops
    # (upstream mean 96 over 1, 1 dropped); strict keeps it (mean 48).
    {"id": "RH20T_t_0", "task": "traj", "pred": _traj((0.1, 0.2), (0.2, 0.2)), "gt": _traj((0.1, 0.1), (0.2, 0.1)),
     "w": 640, "h": 480},
    {"id": "RH20T_t_1", "task": "traj", "pred": _traj((0.1, 0.1), (0.2, 0.1)), "gt": _traj((0.1, 0.1), (0.2, 0.1)),
     "w": 640, "h": 480},
    # contact_decide: an empty answer is right upstream ("" is in "Yes"), wrong strict. Accuracy 1.0 vs 0.5.
    {"id": "RH20T_d_0", "task": "contact_decide", "pred": "", "gt": "Yes"},
    {"id": "RH20T_d_1", "task": "contact_decide", "pred": "No", "gt": "No"},
    # grounding_choice: the "A" of "As" makes it right upstream; strict reads the letter C. 1.0 vs 0.0.
    {"id": "RH20T_g_0", "task": "grounding_choice", "pred": "As the image shows, C", "gt": "A"},
    # no task: its dataset names the row (final_box, the one box, exact: IoU 1 both ways)
    {"id": "RH20T_f_0", "dataset": "rh20t_vla_final_box_val", "pred": _box([0.2, 0.2], [0.4, 0.6]),
     "gt": _box([0.2, 0.2], [0.4, 0.6]), "w": 640, "h": 480},
    # in no row of the table: listed under it
    {"id": "RH20T_p_0", "task": "contact_point", "pred": "[[0.5, 0.5], [0.6, 0.5]]",
     "gt": json.dumps({"contact_point": [[0.5, 0.5], [0.6, 0.5]]}), "w": 640, "h": 480},
]
UPSTREAM = {"contact_box": 2 / 3, "final_box": 1.0, "traj": 96.0, "contact_decide": 1.0, "grounding_choice": 1.0}
STRICT = {"contact_box": 2 / 3, "final_box": 1.0, "traj": 48.0, "contact_decide": 0.5, "grounding_choice": 0.0}


def _score(tmp_path, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    res = runner.invoke(app, ["score", str(preds), "--table", "robointer-files", "--out", str(tmp_path / "s"), *flags])
    assert res.exit_code == 0, res.output
    return res.output, json.loads((tmp_path / "s" / "metrics.json").read_text())["table"]


def test_the_layout_is_upstreams_fourteen_files_in_its_order():
    rows = TABLES["robointer-files"].rows
    assert [r.key for r in rows] == UPSTREAM_FILES
    assert {r.utype for r in rows[:4]} == {"box"} and {r.utype for r in rows[4:6]} == {"traj"} and {
        r.utype for r in rows[6:]} == {"decide"}


def test_the_rows_and_their_arithmetic_both_ways(tmp_path):
    output, table = _score(tmp_path)
    rows = {r["key"]: r for r in table["rows"]}
    assert [r["key"] for r in table["rows"]] == UPSTREAM_FILES
    for key, value in UPSTREAM.items():
        assert abs(rows[key]["upstream"]["score"] - value) < 1e-9, key
        assert abs(rows[key]["strict"]["score"] - STRICT[key]) < 1e-9, key
    assert rows["contact_box"]["upstream"]["acc@0.1"] == rows["contact_box"]["strict"]["acc@0.1"] == 1.0
    assert rows["traj"]["upstream"]["n_dropped"] == 1 and rows["traj"]["count"] == 2
    assert rows["contact_decide"]["strict"]["parse_failure_rate"] == 0.5  # the empty answer
    assert all(rows[k]["count"] == 0 and rows[k]["strict"] is None for k in UPSTREAM_FILES if k not in UPSTREAM)
    assert abs(table["average"]["upstream"] - sum(UPSTREAM.values()) / 5) < 1e-9  # 19.9333
    assert abs(table["average"]["strict"] - sum(STRICT.values()) / 5) < 1e-9  # 10.0333
    assert table["average"]["upstream_rows"] == table["average"]["strict_rows"] == 5
    assert [(o["dataset"], o["kind"], o["count"]) for o in table["others"]] == [("default", "point", 1)]
    assert table["others"][0]["metrics"]["mean_distance"] == 0.0

    printed = output[output.index("robointer-files table"):]
    lines = printed.splitlines()
    assert [line.split()[1 if line.startswith(("Generation", "Understanding")) else 0] for line in lines[3:17]] == \
        UPSTREAM_FILES  # one line per row, in upstream's order, the group named once
    assert re.search(r"contact_box +2 +mIoU / IoU>0.1 +0.667 / 1.000 +0.667 / 1.000 +0.0%", printed)
    assert re.search(r"traj +2 +DTW \(px\) +96.00 \(1 dropped\) +48.00 +0.0%", printed)
    assert re.search(r"contact_decide +2 +accuracy +1.000 +0.500 +50.0%", printed)
    assert re.search(r"current_box +- +mIoU / IoU>0.1 +not evaluated +not evaluated", printed)
    assert re.search(r"Average Score +\(5 of 14 rows\) +19.9333 +10.0333", printed)
    assert "Not in this table" in printed and "default  contact_point  point  n=1" in printed


def test_the_table_is_the_same_whichever_scorer_leads(tmp_path):
    _, strict_led = _score(tmp_path / "a")
    _, upstream_led = _score(tmp_path / "b", "--upstream-compatible")
    assert strict_led == upstream_led


def test_a_row_is_found_by_file_then_task_then_dataset():
    layout = TABLES["robointer-files"]
    release = "Generation/meta/val/llava_format/full_single_multi_contact_obj_"
    assert row_key(layout, None, release + "traj_qa.json", "x") == "traj"  # the start position given
    assert row_key(layout, None, release + "traj_qa_wo_init_pos.json", "x") == "traj_wo_init_pos"
    assert row_key(layout, None, release + "gripper_det_qa.json", "x") == "gripper_det"
    assert row_key(layout, "traj_wo_init_pos", release + "traj_qa.json", "x") == "traj"  # upstream goes by file
    assert row_key(layout, "traj_wo_init_pos", release + "val_misc.json", "x") == "traj_wo_init_pos"
    assert row_key(layout, "box", None, "eval_details_current_box") == "current_box"
    assert row_key(layout, None, None, "rh20t_traj_lang_choice_qa_val") == "trajlang_choice"
    assert row_key(layout, "contact_point", "contact_point.json", "contact_point") is None


def test_unknown_table_is_one_line(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": 1, "pred": "A", "gt": "A"}\n')
    res = runner.invoke(app, ["score", str(preds), "--table", "paper"])
    assert res.exit_code == 2 and "--table paper: choose one of robointer, robointer-files" in res.output
    data = tmp_path / "d.json"
    data.write_text("[]")
    res = runner.invoke(app, ["eval", str(tmp_path / "no-model"), "--data", str(data), "--table", "paper"])
    assert res.exit_code == 2 and "choose one of robointer" in res.output  # before anything loads


def test_strict_dtw_without_an_image_size_says_so():
    table = {"name": "robointer-files", "of": 14, "not_scored": 0, "others": [],
             "average": {"upstream": None, "strict": None, "upstream_rows": 0, "strict_rows": 0},
             "rows": [{"key": "traj", "label": "traj", "group": "Generation", "type": "traj", "metric": "DTW (px)", "count": 1,
                       "upstream": None, "strict": {"count": 1, "parse_failure_rate": 0.0, "dtw_px": None,
                                                    "n_scored_px": 0, "score": None, "no_size": 1}}]}
    text = format_paper_table(table)
    assert "- (no w/h)" in text and "needs each record's image size" in text


# --- the paper's Table 3 ---------------------------------------------------------------------------------------
PAPER_COLUMNS = [  # (group, column, val file), in the paper's order (asset/VLM_table.png of InternRobotics/RoboInter)
    ("Spatial / Generation", "Object G.D.", "current_box"), ("Spatial / Generation", "Grasp A.F.", "contact_box"),
    ("Spatial / Generation", "Place A.F.", "final_box"), ("Spatial / Generation", "Gripper G.D.", "gripper_det"),
    ("Spatial / Multiple Choice", "Grasp Pose", "grasppose_choice"),
    ("Spatial / Multiple Choice", "Grounding Choice", "grounding_choice"), ("Spatial / T/F", "Contact", "contact_decide"),
    ("Temporal / Generation", "Trace", "traj"), ("Temporal / Generation", "Task Planning", "planning"),
    ("Temporal / Multiple Choice", "Visual Trace", "traj_choice"),
    ("Temporal / Multiple Choice", "Planning Choice", "plan_choice"), ("Temporal / T/F", "Task Planning", "plan_decide"),
]

PAPER_RECORDS = [
    # Object G.D. (current_box): IoU 1, and [0, 0, 0.1, 0.1] against [0.5, 0.5, 0.9, 0.9]: IoU 0. ACC@0.1 = 50.0 %.
    {"id": "RH20T_ob_0", "task": "current_box", "pred": _box([0.1, 0.1], [0.5, 0.5]),
     "gt": _box([0.1, 0.1], [0.5, 0.5]), "w": 640, "h": 480},
    {"id": "RH20T_ob_1", "task": "current_box", "pred": _box([0.0, 0.0], [0.1, 0.1]),
     "gt": _box([0.5, 0.5], [0.9, 0.9]), "w": 640, "h": 480},
    # Trace (traj): upstream 96 px (the exact one dropped), strict 48 px, as in the files table above.
    *[r for r in RECORDS if r.get("task") == "traj"],
    # the file without a start position is not a column of the paper: listed under the table
    {"id": "RH20T_two_0", "task": "traj_wo_init_pos", "pred": _traj((0.1, 0.1), (0.2, 0.1)),
     "gt": _traj((0.1, 0.1), (0.2, 0.1)), "w": 640, "h": 480},
    # Contact (contact_decide): upstream 100.0 (the empty answer counts), strict 50.0.
    *[r for r in RECORDS if r.get("task") == "contact_decide"],
    # Visual Trace (traj_choice): right both ways.
    {"id": "RH20T_vt_0", "task": "traj_choice", "pred": "B", "gt": "B"},
    # Task Planning (found by upstream's names in the id, as task_planning/eval.py sorts them): both exact after
    # upstream's lower-casing of the LAST line: upstream BLEU 1.0 each, 100.0; strict reads the whole answer.
    {"id": "manip_Planning_Task_0", "pred": "Pick up the cup", "gt": "pick up the cup"},
    {"id": "manip_Planning_Task_1", "pred": "The next step is:\nopen the drawer", "gt": "open the drawer"},
    # Planning Choice: "" is in every answer upstream (100.0); strict 50.0.
    {"id": "manip_Past_Primitive_Selection_0", "pred": "C", "gt": "C"},
    {"id": "manip_Past_Primitive_Selection_1", "pred": "", "gt": "B"},
    # Task Planning T/F: one right, one wrong, both ways: 50.0.
    {"id": "manip_Success_Positive_Task_0", "pred": "Yes", "gt": "Yes"},
    {"id": "manip_Success_Negative_Task_1", "pred": "Yes", "gt": "No"},
]


def _paper(tmp_path, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in PAPER_RECORDS))
    res = runner.invoke(app, ["score", str(preds), "--table", "robointer", "--out", str(tmp_path / "s"), *flags])
    assert res.exit_code == 0, res.output
    return res.output, json.loads((tmp_path / "s" / "metrics.json").read_text())["table"]


def test_the_paper_layout_is_table_3_column_by_column():
    rows = TABLES["robointer"].rows
    assert [(r.group, r.label, r.key) for r in rows] == PAPER_COLUMNS


def test_the_paper_table_numbers_and_units(tmp_path):
    from lora_manip.eval.metrics import bleu

    output, table = _paper(tmp_path)
    rows = {r["label"] + "/" + r["group"]: r for r in table["rows"]}
    by_key = {r["key"]: r for r in table["rows"]}
    assert [r["key"] for r in table["rows"]] == [k for _, _, k in PAPER_COLUMNS] and "average" not in table
    assert by_key["current_box"]["upstream"]["acc@0.1"] == by_key["current_box"]["strict"]["acc@0.1"] == 0.5
    assert by_key["traj"]["upstream"]["dtw_px"] == 96.0 and by_key["traj"]["strict"]["dtw_px"] == 48.0
    assert by_key["contact_decide"]["upstream"]["accuracy"] == 1.0 and by_key["contact_decide"]["strict"][
        "accuracy"] == 0.5
    assert by_key["planning"]["count"] == 2 and by_key["planning"]["upstream"]["bleu"] == 1.0
    strict_bleu = (bleu("Pick up the cup", "pick up the cup") + bleu("The next step is:\nopen the drawer",
                                                                     "open the drawer")) / 2
    assert abs(by_key["planning"]["strict"]["bleu"] - strict_bleu) < 1e-12 and strict_bleu < 1.0
    assert by_key["plan_choice"]["upstream"]["accuracy"] == 1.0 and by_key["plan_choice"]["strict"]["accuracy"] == 0.5
    assert by_key["plan_decide"]["upstream"]["accuracy"] == by_key["plan_decide"]["strict"]["accuracy"] == 0.5
    assert rows["Task Planning/Temporal / T/F"]["key"] == "plan_decide"
    assert [(o["dataset"], o["task"], o["kind"]) for o in table["others"]] == [
        ("default", "traj_wo_init_pos", "trajectory")]  # not a column of the paper; its own numbers shown
    assert table["others"][0]["metrics"]["dtw_px"] == 0.0

    printed = output[output.index("robointer table"):]
    assert re.search(r"Spatial / Generation +Object G.D. +current_box +2 +ACC@IoU>0.1 % +50.0 +50.0 +0.0%", printed)
    assert re.search(r"Temporal / Generation +Trace +traj +2 +DTW px \(lower\) +96.0 \(1 dropped\) +48.0 +0.0%",
                     printed)  # one decimal below 100 px (the paper's hundreds print whole)
    assert re.search(r" +Task Planning +planning +2 +BLEU avg x100 +100.0 +%.1f +0.0%%" % (100 * strict_bleu), printed)
    assert re.search(r"Spatial / T/F +Contact +contact_decide +2 +ACC % +100.0 +50.0 +50.0%", printed)
    assert re.search(r"Grasp A.F. +contact_box +- +ACC@IoU>0.1 % +not evaluated +not evaluated", printed)
    assert ("upstream-compatible in the paper's column order: 50.0 | - | - | - | - | - | 100.0 | 96.0 | 100.0 | 100.0 | "
            "100.0 | 50.0") in printed
    assert "Average Score" not in printed  # the paper prints none


def test_the_paper_table_is_the_same_whichever_scorer_leads(tmp_path):
    assert _paper(tmp_path / "a")[1] == _paper(tmp_path / "b", "--upstream-compatible")[1]


def test_a_task_planning_file_is_told_apart_by_its_folder_or_its_ids():
    layout = TABLES["robointer"]
    tp = "Task_planning/meta/val/{}/task_planning.json"
    assert [row_key(layout, None, tp.format(x), "x") for x in ("planning", "choice", "decide")] == [
        "planning", "plan_choice", "plan_decide"]
    assert row_key(layout, None, None, "choice/task_planning") == "plan_choice"  # eval's name for that file
    assert row_key(layout, None, None, "x", "ep3_Future_Primitive_Selection_7") == "plan_choice"
    assert row_key(layout, None, None, "x", "ep3_Discriminative_Affordance_Negative_Task") == "plan_decide"
    assert row_key(layout, "traj", release_traj := "full_single_multi_contact_obj_traj_qa_wo_init_pos.json", "x") is None
    assert row_key(TABLES["robointer-files"], "traj", release_traj, "x") == "traj_wo_init_pos"


def test_upstreams_dataset_names_read_the_trajectory_files_the_other_way_round():
    """Upstream's registry: rh20t_vla_traj_qa_train reads ..._traj_qa_wo_init_pos.json and
    rh20t_vla_traj_init_point_qa_train reads ..._traj_qa.json (qwenvl/data/__init__.py)."""
    files = TABLES["robointer-files"]
    assert row_key(files, None, None, "rh20t_vla_traj_qa_train") == "traj_wo_init_pos"
    assert row_key(files, None, None, "droid_vla_traj_init_point_qa_train") == "traj"
    assert row_key(files, None, None, "vla_traj_init_point_qa_val") == "traj"
    assert row_key(files, None, None, "vla_traj_qa_wo_init_pos_val") == "traj_wo_init_pos"
    assert row_key(TABLES["robointer"], None, None, "vla_traj_init_point_qa_val") == "traj"


def test_a_trace_whose_dtws_are_all_dropped_says_so(tmp_path):
    """Every answer exact: upstream drops every DTW of 0, leaving no number (its script divides by zero there)."""
    recs = [{**r, "pred": r["gt"]} for r in RECORDS if r.get("task") == "traj"]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name in ("robointer", "robointer-files"):
        res = runner.invoke(app, ["score", str(preds), "--table", name, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        printed = res.output[res.output.index(f"{name} table"):]
        if name == "robointer":
            assert re.search(r"Trace +traj +2 +DTW px \(lower\) +- \(2 dropped\) +0.0 +0.0%", printed)
        else:
            assert re.search(r"traj +2 +DTW \(px\) +- \(2 dropped\) +0.00", printed)
            assert "upstream's script stops there (division by zero)" in printed
