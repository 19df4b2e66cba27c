"""--upstream-compatible reproduces RoboInter's scorer rule for rule; every number here is computed by hand."""

import json

import pytest
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.eval import upstream as up
from lora_manip.eval.report import format_table
from lora_manip.eval.score import score_records

approx = pytest.approx
runner = CliRunner()


# --------------------------------------------------------------------------------------------------------- choice
@pytest.mark.parametrize("pred,gt,correct", [
    ("The answer is C.", "C", True),  # strict reads "C" too, but upstream needs no parsing for it
    ("C", " C \n", True),  # both stripped
    ("", "A", True),  # LEAK: "" is in every string
    ("As the image shows, C", "A", True),  # LEAK: the capital A of "As" is "A" in the last 100 characters
    ("B", "(B)", True),  # pred in gt
    ("b", "B", False),  # case-sensitive
    ("B" + " because" * 20, "B", False),  # the letter is more than 100 characters from the end
    ("D", "B", False),
])
def test_decide_rule(pred, gt, correct):
    assert up.decide(pred, gt) is correct
    rows, _ = score_records([{"id": 1, "task": "traj_choice", "gt": gt, "pred": pred}], upstream_compatible=True)
    assert rows[0]["correct"] is correct


def test_yes_no_decide_files_use_the_same_rule():
    rows, _ = score_records([{"id": 1, "task": "contact_decide", "gt": "Yes", "pred": "yes"},
                             {"id": 2, "task": "contact_decide", "gt": "No", "pred": "No, it is not"}],
                            upstream_compatible=True)
    assert [r["kind"] for r in rows] == ["yesno", "yesno"] and [r["correct"] for r in rows] == [False, True]


# ------------------------------------------------------------------------------------------------------ box parser
@pytest.mark.parametrize("text,box,step", [
    ("[0.1, -0.2, 0.3, 0.4]", [0.1, -0.2, 0.3, 0.4], "json"),  # step 1 keeps the sign
    ("[1, 2, 3, 4]", [1, 2, 3, 4], "json"),
    ("(0.1, -0.2, 0.3, 0.4)", [0.1, 0.2, 0.3, 0.4], "numbers"),  # parentheses fail JSON: sign lost in step 3
    ("[-.5, 0.2, 0.3, 0.4]", [0.5, 0.2, 0.3, 0.4], "numbers"),  # "-.5" is not JSON; ".5" is an unsigned number
    ("-0.1, 0.2, 0.3, 0.4", [0.1, 0.2, 0.3, 0.4], "numbers"),  # bare list: JSON "extra data"
    ("[0.1, 0.2, 0.3, 0.4, 0.5]", [0.1, 0.2, 0.3, 0.4], "numbers"),  # match stops before ", 0.5": no "]"
    ("[[10, 20], [30, 40]]", [10, 20, 30, 40], "int-pairs"),  # step 2: integers only
    ("[[0.1, -0.2], [0.3, 0.4]]", [0.1, 0.2, 0.3, 0.4], "numbers"),  # float pairs skip steps 1-2
    ('{"bbox_2d": [[0.1, 0.2], [0.3, 0.4]]}', [2, 0.1, 0.2, 0.3], "numbers"),  # LEAK: the 2 of the key
    ("[0.1, 0.2]", [0, 0, 0, 0], "zeros"),
    ("no box", [0, 0, 0, 0], "zeros"),
])
def test_box_parser_order(text, box, step):
    assert up.box_answer(text) == (approx(box), step)


def test_box_iou_scaling_and_no_corner_reordering():
    gt = "[[0.1, 0.1], [0.5, 0.5]]"
    rows, _ = score_records([
        {"id": "a", "task": "current_box", "gt": gt, "pred": "[0.1, 0.1, 0.3, 0.3]"},  # 0.04 / 0.16
        {"id": "b", "task": "current_box", "gt": gt, "pred": "[0.5, 0.5, 0.1, 0.1]"},  # swapped: 0 upstream
        {"id": "c", "task": "current_box", "gt": "[[-0.1, 0.1], [0.5, 0.5]]", "pred": "[0.1, 0.1, 0.5, 0.5]"},
    ], upstream_compatible=True)
    assert [r["iou"] for r in rows] == approx([0.25, 0.0, 1.0])  # c: the ground truth's sign is dropped too
    strict, _ = score_records([{"id": "b", "task": "current_box", "gt": gt, "pred": "[0.5, 0.5, 0.1, 0.1]"}])
    assert strict[0]["iou"] == approx(1.0)  # the kit re-orders corners
    assert up.iou([0, 0, 2, 2], [1, 1, 3, 3]) == approx(1 / 7)


def test_box_ground_truth_with_fewer_than_four_numbers_is_a_data_error():
    rows, s = score_records([{"id": "g", "task": "final_box", "gt": "[[0.1, 0.2]]", "pred": "[0, 0, 1, 1]"}],
                            upstream_compatible=True)
    assert not rows and s["data_errors"][0]["id"] == "g"


# --------------------------------------------------------------------------------------------- trajectories, sizes
def test_image_size_fallback_and_dtw():
    traj = {"task": "traj", "gt": "[[0.1, 0.2], [0.3, 0.5]]", "pred": "[[0.1, 0.2], [0.3, 0.4]]"}
    rows, _ = score_records([{"id": "RH20T_cfg3_1", **traj},  # 640x480: 0.1 * 480 = 48 px
                             {"id": "rh20t_1", **traj},  # LEAK: lower case is not "RH20T": 320x180
                             {"id": "droid_1", **traj},  # 320x180: 0.1 * 180 = 18 px
                             {"id": "x", "image_size": [100, 50], **traj}], upstream_compatible=True)
    assert [r["dtw_px"] for r in rows] == approx([48.0, 18.0, 18.0, 5.0])
    assert [r["upstream_size_from"] for r in rows] == ["id:RH20T", "id:default", "id:default", "image_size"]
    assert up.image_size({"id": "RH20T"})[0] == (640.0, 480.0)


def test_trajectory_reading_and_zero_dtw_dropped():
    assert up.traj_answer("[[-0.1, 0.2], [0.3") == [(0.1, 0.2)]  # sign dropped, odd last number dropped
    gt = "[[0.1, 0.1], [0.2, 0.1]]"
    rows, s = score_records([
        {"id": "perfect", "task": "traj", "gt": gt, "pred": gt},  # DTW 0: LEAK, dropped like a failure
        {"id": "off", "task": "traj", "gt": gt, "pred": "[[0.1, 0.2], [0.2, 0.2]]"},  # 2 x 0.1 x 180 = 36
        {"id": "empty", "task": "traj", "gt": gt, "pred": "I don't know"},  # infinite DTW -> 0 -> dropped
    ], upstream_compatible=True)
    assert [r["dtw_px"] for r in rows] == approx([0.0, 36.0, 0.0])
    f = s["upstream"]["files"]["traj"]
    assert f["mean_dtw_px"] == approx(36.0) and f["n_dropped"] == 2 and f["count"] == 3
    assert rows[2]["parse_error"].startswith("upstream: no point")


# ----------------------------------------------------------------------------------------- per file, Average Score
def _mixed():
    return [
        {"id": "b1", "task": "rh20t_current_box", "gt": "[[0.1, 0.1], [0.5, 0.5]]", "pred": "[0.1, 0.1, 0.3, 0.3]"},
        {"id": "b2", "task": "rh20t_current_box", "gt": "[[0.1, 0.1], [0.5, 0.5]]", "pred": "[0.1, 0.1, 0.5, 0.5]"},
        {"id": "t1", "task": "traj", "gt": "[[0.1, 0.1], [0.2, 0.1]]", "pred": "[[0.1, 0.2], [0.2, 0.2]]"},
        {"id": "c1", "task": "traj_choice", "gt": "B", "pred": "The answer is B."},
        {"id": "c2", "task": "traj_choice", "gt": "B", "pred": "D"},
        {"id": "p1", "task": "contact_point", "gt": "[[0.5, 0.5]]", "pred": "[[0.5, 0.5]]"},  # not upstream's
    ]


def test_per_file_scores_and_average_score():
    _, s = score_records(_mixed(), upstream_compatible=True)
    files = s["upstream"]["files"]
    assert list(files) == ["current_box", "traj", "traj_choice"]  # a row is upstream's file: rh20t_current_box's
    assert files["current_box"]["mean_iou"] == approx((0.25 + 1) / 2)
    assert files["current_box"]["acc@0.1"] == 1.0
    assert files["traj"]["mean_dtw_px"] == approx(36.0) and files["traj_choice"]["accuracy"] == 0.5
    # LEAK: IoU, pixels and accuracy averaged together
    assert s["upstream"]["average_score"] == approx((0.625 + 36.0 + 0.5) / 3)
    table = format_table(s)
    assert "current_box : Mean IOU: 0.6250 Accuracy (IOU > 0.1): 1.0000" in table
    assert "traj : Mean DTW: 36.0000" in table and "traj_choice : Accuracy: 0.5000" in table
    assert "Average Score: 12.3750" in table
    # strict mode on the same records: the choice answer "D" is wrong, "The answer is B." right, no Average Score
    _, strict = score_records(_mixed())
    assert "upstream" not in strict and strict["all"]["choice"]["accuracy"] == 0.5


def test_score_cli_reads_upstream_result_files(tmp_path):
    by_task: dict = {}
    for r in _mixed():
        by_task.setdefault(r.pop("task"), []).append(r)
    paths = []
    for task, recs in by_task.items():
        paths.append(tmp_path / f"eval_details_{task}.json")
        paths[-1].write_text(json.dumps(recs))
    res = runner.invoke(app, ["score", *map(str, paths), "--upstream-compatible", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "Average Score: 12.3750" in res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["upstream"]["average_score"] == approx(12.375)


def test_upstream_does_not_need_a_parsable_choice_ground_truth():
    rec = [{"id": 1, "task": "trajlang_choice", "gt": "The left one", "pred": "I would say: The left one"}]
    rows, s = score_records(rec, upstream_compatible=True)
    assert rows[0]["correct"] is True and not s["data_errors"]
    rows, s = score_records(rec)  # strict needs an option letter in the ground truth
    assert not rows and s["data_errors"][0]["field"] == "gt"


# ------------------------------------------------------------------------ VABench-V traces, Embodied-R1's scorer
# pickxiguapi/Embodied-R1 eval/hf_inference_vabench_visual_trace.py: <point>[...]</point> in pixels, x / w * 999,
# resampled by INDEX to the longer trace, RMSE = sqrt(mean(dx^2 + dy^2)), MAE = mean((|dx| + |dy|) / 2).
TRACE_GT = '{"trajectory": [[0, 0], [0.5, 0.5], [1.0, 0.5]]}'  # 0-999: (0, 0), (499.5, 499.5), (999, 499.5)


def _trace(rid, pred, gt=TRACE_GT, **extra):
    return {"id": rid, "task": "traj", "gt": gt, "pred": pred, "w": 100, "h": 50, **extra}


def test_vabench_trace_by_hand():
    # pred (0, 0), (100, 50) px -> (0, 0), (999, 999); by index to 3 points: (0, 0), (499.5, 499.5), (999, 999)
    # differences (0, 0), (0, 0), (0, 499.5): RMSE = 499.5 / sqrt(3), MAE = (499.5 / 2) / 3
    rows, s = score_records([
        _trace("two", "<think>up and right</think><answer><point>[[0, 0], [100, 50]]</point></answer>"),
        _trace("same", "<point>[[0, 0], [50, 25], [100, 25]]</point>"),  # untagged: read whole
        _trace("one", "<point>[[10, 10]]</point>"),  # under 2 points: left out
        _trace("no_tag", '{"trajectory": [[0, 0], [1, 1]]}'),  # no <point> tag, no points: left out
        _trace("multiline", "<answer>\n<point>[[0, 0], [100, 50]]</point></answer>"),  # regex without DOTALL
        _trace("triple", "<point>[[0, 0, 1], [1, 1, 1]]</point>"),  # x, y = point raises upstream
        _trace("gt_one", "<point>[[0, 0], [100, 50]]</point>", gt='{"trajectory": [[0.2, 0.2]]}'),
    ], upstream_compatible=True)
    by = {r["id"]: r for r in rows}
    assert by["two"]["vabench_rmse"] == approx(499.5 / 3 ** 0.5) and by["two"]["vabench_mae"] == approx(83.25)
    assert by["same"]["vabench_rmse"] == approx(0.0) and by["same"]["vabench_mae"] == approx(0.0)
    for rid in ("one", "no_tag", "multiline", "triple", "gt_one"):
        assert by[rid]["vabench_rmse"] is None and by[rid]["vabench_note"], rid
    assert "raises" in by["triple"]["vabench_note"] and by["no_tag"]["vabench_points"] == 0
    trace = s["upstream"]["vabench_trace"]
    assert trace["vabench_rmse"] == approx(499.5 / 3 ** 0.5 / 2) and trace["vabench_mae"] == approx(83.25 / 2)
    assert (trace["vabench_scored"], trace["vabench_left_out"]) == (2, 5)
    assert "VABench-V visual trace (Embodied-R1's rule, 0-999) : RMSE: 144.1932 MAE: 41.6250" in format_table(s)


def test_vabench_rule_differs_from_the_kits_arc_length_trace():
    rec = _trace("two", "<point>[[0, 0], [100, 50]]</point>")
    upstream_rows, _ = score_records([rec], upstream_compatible=True)
    strict_rows, _ = score_records([{**rec, "pred": "[[0, 0], [1, 1]]"}])  # the same trace in [0, 1]
    assert upstream_rows[0]["vabench_rmse"] == approx(288.386, abs=1e-3)
    assert strict_rows[0]["trace_rmse"] != approx(upstream_rows[0]["vabench_rmse"], abs=1.0)  # by arc length


def test_vabench_points_reader():
    assert up.trace_points("<point>[[1.5, 2], [3, 4]]</point>") == ([(1.5, 2.0), (3.0, 4.0)], None)
    assert up.trace_points("<point>[(1, 2), (3, 4)]</point>") == ([], None)  # JSON fails, no [x, y] pairs
    assert up.trace_points("<point>[[1, 2], [3, -4]]</point>")[0] == [(1.0, 2.0), (3.0, -4.0)]  # JSON keeps signs
    assert up.trace_points("<point>[['1', 2]]</point>")[0] is None  # a string coordinate raises upstream
    assert up.trace_points("<point>[[1, 2], [3 4]]</point>") == ([(1.0, 2.0)], None)  # fallback: unsigned pairs
    assert up.trace_points("<answer>no tag</answer> <point>[[1, 2]]</point>") == ([], None)  # only the answer
    rows, _ = score_records([{k: v for k, v in _trace("nosize", "<point>[[0, 0], [1, 1]]</point>").items()
                              if k not in ("w", "h")}], upstream_compatible=True)
    assert rows[0]["vabench_rmse"] is None and "image size" in rows[0]["vabench_note"]
