"""Scoring records, strict vs upstream-compatible, loading/writing files, and the drawing helpers."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from lora_manip.errors import UserError
from lora_manip.eval.draw import GT_COLOR, PRED_COLOR, contact_sheet, draw_overlay
from lora_manip.eval.report import format_table, load_predictions, write_outputs
from lora_manip.eval.score import score_records

approx = pytest.approx

BOX_GT = '{"current_bbox": [[0.1, 0.1], [0.3, 0.5]]}'
TRAJ_GT = '{"future_traj": [[0, 0], [0.1, 0], [0.2, 0]]}'


def _records():
    return [
        # boxes: IoU 1, 1/3 (shifted by half a width), 0 (unparsable)
        {"id": "b1", "dataset": "A", "task": "current_bbox", "gt": BOX_GT, "pred": BOX_GT},
        {"id": "b2", "dataset": "A", "task": "final_bbox", "gt": BOX_GT, "pred": "Sure: [[0.4, 0.5], [0.2, 0.1]]"},
        {"id": "b3", "dataset": "B", "task": "current_bbox", "gt": BOX_GT, "pred": "I don't know"},
        # points: 0.015 (px 1.5 on 200x100), unparsable, 0.1
        {"id": "p1", "dataset": "A", "task": "contact_point", "w": 200, "h": 100,
         "gt": '{"contact_point": [[0.5, 0.5], [0.6, 0.5]]}', "pred": "[[0.6, 0.5], [0.5, 0.53]]"},
        {"id": "p2", "dataset": "A", "task": "contact_point", "gt": '{"contact_point": [[0.5, 0.5]]}', "pred": ""},
        {"id": "p3", "dataset": "B", "task": "contact_point", "gt": '{"contact_point": [[0.5, 0.5]]}',
         "pred": '{"contact_point": [[0.5, 0.6]]}'},
        # trajectories: DTW 0.1 (px 10 on 100x100), unparsable
        {"id": "t1", "dataset": "A", "task": "future_traj", "w": 100, "h": 100, "gt": TRAJ_GT,
         "pred": "[[0, 0], [0.2, 0]]"},
        {"id": "t2", "dataset": "B", "task": "future_traj", "gt": TRAJ_GT, "pred": ""},
        # choice: right, empty, ambiguous
        {"id": "c1", "dataset": "A", "task": "choice", "gt": "B", "pred": "The answer is B"},
        {"id": "c2", "dataset": "A", "task": "choice", "gt": "A", "pred": ""},
        {"id": "c3", "dataset": "B", "task": "choice", "gt": "C", "pred": "A or C"},
        # yes/no (task inferred from the ground truth)
        {"id": "y1", "dataset": "A", "gt": "Yes", "pred": "yes."},
        {"id": "y2", "dataset": "B", "gt": "No", "pred": "Yes"},
        # planning
        {"id": "l1", "dataset": "A", "task": "planning", "gt": "pick up the cube", "pred": "Pick up the cube"},
        {"id": "l2", "dataset": "A", "task": "planning", "gt": "pick up the cube", "pred": "  "},
    ]


def test_score_records_strict_summary():
    rows, s = score_records(_records())
    assert s["mode"] == "strict" and s["count"] == 15 and len(rows) == 15
    a = s["all"]
    assert a["box"]["count"] == 3
    assert a["box"]["mean_iou"] == approx((1 + 1 / 3 + 0) / 3)
    assert a["box"]["acc@0.1"] == approx(2 / 3)
    assert a["box"]["acc@0.5"] == approx(1 / 3)
    assert a["box"]["parse_failure_rate"] == approx(1 / 3)

    assert a["point"]["mean_distance"] == approx((0.015 + 0.1) / 2)  # the unparsable one is excluded ...
    assert a["point"]["mean_distance_px"] == approx(1.5)  # only p1 has w/h
    assert a["point"]["acc@0.05"] == approx(1 / 3)  # ... but it is a miss here
    assert a["point"]["parse_failure_rate"] == approx(1 / 3)

    assert a["trajectory"]["dtw"] == approx(0.1)
    assert a["trajectory"]["dtw_px"] == approx(10.0)
    assert a["trajectory"]["frechet"] == approx(0.1)
    assert a["trajectory"]["endpoint_error"] == approx(0.0)
    assert a["trajectory"]["parse_failure_rate"] == approx(0.5)
    assert a["trajectory"]["n_scored"] == 1

    assert a["choice"]["accuracy"] == approx(1 / 3)
    assert a["choice"]["parse_failures"] == 2
    assert a["yesno"]["accuracy"] == approx(0.5)
    assert a["planning"]["bleu"] == approx(0.5)
    assert a["planning"]["parse_failure_rate"] == approx(0.5)

    assert set(s["by_dataset"]) == {"A", "B"}
    assert s["by_dataset"]["A"]["box"]["mean_iou"] == approx((1 + 1 / 3) / 2)
    assert s["by_dataset"]["B"]["box"]["mean_iou"] == 0.0
    assert s["by_dataset"]["B"]["choice"]["accuracy"] == 0.0
    assert s["by_task"]["current_bbox"]["count"] == 2
    assert s["by_task"]["final_bbox"]["mean_iou"] == approx(1 / 3)
    assert s["by_task"]["yesno"]["kind"] == "yesno"

    by_id = {r["id"]: r for r in rows}
    assert by_id["b2"]["pred"] == [0.2, 0.1, 0.4, 0.5] and by_id["b2"]["iou"] == approx(1 / 3)
    assert by_id["b3"]["parse_error"] and by_id["b3"]["iou"] == 0.0
    assert by_id["p1"]["distance_px"] == approx(1.5) and by_id["p1"]["hit"] is True
    assert by_id["p2"]["distance"] is None and by_id["p2"]["hit"] is False
    assert by_id["c2"]["parse_error"] == "empty" and by_id["c2"]["correct"] is False
    assert by_id["y1"]["kind"] == "yesno" and by_id["y1"]["pred"] is True
    json.dumps(rows, allow_nan=False)
    json.dumps(s, allow_nan=False)


def test_upstream_compatible_differs():
    rows, s = score_records(_records(), upstream_compatible=True)
    assert s["mode"] == "upstream_compatible"
    by_id = {r["id"]: r for r in rows}
    assert by_id["c1"]["correct"] is True  # "B" in the answer's last 100 characters
    assert by_id["c2"]["correct"] is True  # "" in "A": upstream counts an empty answer as right
    assert by_id["c3"]["correct"] is True  # "C" in "A or C"
    assert s["all"]["choice"]["accuracy"] == 1.0 and s["all"]["choice"]["parse_failures"] == 0
    # ids without RH20T: 320x180; pred (0,0),(64,0) vs gt (0,0),(32,0),(64,0): DTW 32 px; the empty one is dropped
    assert s["all"]["trajectory"]["dtw_px"] == approx(32.0)
    assert s["all"]["trajectory"]["count"] == 2 and s["all"]["trajectory"]["n_dropped"] == 1
    assert s["upstream"]["files"]["future_traj"]["mean_dtw_px"] == approx(32.0)


def test_empty_choice_strict_zero_upstream_one():
    rec = [{"id": 1, "task": "choice", "gt": "A", "pred": ""}]
    assert score_records(rec)[1]["all"]["choice"]["accuracy"] == 0.0
    assert score_records(rec, upstream_compatible=True)[1]["all"]["choice"]["accuracy"] == 1.0


def test_negative_coordinate_strict_vs_upstream():
    rec = [{"id": "n", "task": "current_bbox", "gt": '{"current_bbox": [[0, 0], [0.2, 0.4]]}',
            "pred": '{"current_bbox": [[-0.2, 0.0], [0.2, 0.4]]}'}]
    strict, _ = score_records(rec)
    up, _ = score_records(rec, upstream_compatible=True)
    assert strict[0]["pred"] == [-0.2, 0.0, 0.2, 0.4] and strict[0]["iou"] == approx(0.5)
    # nested pairs skip upstream's signed step; its unsigned numbers give a zero-width box
    assert up[0]["upstream_box"] == [0.2, 0.0, 0.2, 0.4] and up[0]["upstream_step"] == "numbers"
    assert up[0]["iou"] == 0.0


def test_point_threshold():
    rec = [{"id": 1, "task": "contact_point", "gt": "[[0.5, 0.5]]", "pred": "[[0.5, 0.6]]"}]
    assert score_records(rec, point_threshold=0.05)[1]["all"]["point"]["acc@0.05"] == 0.0
    assert score_records(rec, point_threshold=0.2)[1]["all"]["point"]["acc@0.2"] == 1.0


def test_bad_records_are_listed_not_fatal():
    recs = [{"id": "bad7", "task": "current_bbox", "gt": "no box here", "pred": "[0, 0, 1, 1]"},
            {"id": "ok", "task": "choice", "gt": "A", "pred": "A"},
            {"id": "nogt", "pred": "A"},
            {"id": "nopred", "gt": "A"},
            {"id": "w0", "gt": "A", "pred": "A", "w": 0, "h": 10},
            {"id": "tc", "task": "traj_choice", "gt": "B", "pred": "B"},  # crashed the whole run before
            "not an object"]
    for upstream in (False, True):
        rows, s = score_records(recs, upstream_compatible=upstream)
        assert [r["id"] for r in rows] == ["ok", "tc"]
        errors = {(e["id"], e["field"]) for e in s["data_errors"]}
        assert errors == {("bad7", "gt"), ("nogt", "gt"), ("nopred", "pred"), ("w0", "w"), (None, "-")}
        assert s["count"] == 2 and s["records"] == 7 and s["all"]["choice"]["accuracy"] == 1.0
    bad7 = next(e for e in score_records(recs)[1]["data_errors"] if e["id"] == "bad7")
    assert "does not parse as box" in bad7["reason"] and bad7["index"] == 0
    assert "id='bad7' field `gt`" in format_table(score_records(recs)[1])


def test_guessed_kind_yields_to_the_ground_truth():
    rows, s = score_records([{"id": 1, "task": "pick_traj_set", "gt": "C", "pred": "C"}])
    assert not s["data_errors"] and rows[0]["kind"] == "choice" and rows[0]["kind_from"] == "format"
    # an exact name does not yield: its ground truth must fit
    rows, s = score_records([{"id": 2, "task": "traj", "gt": "C", "pred": "C"}])
    assert not rows and s["data_errors"][0]["field"] == "gt"


def test_task_map_and_coords():
    recs = [{"id": 1, "task": "mine", "gt": "[[0.1, 0.1], [0.5, 0.5]]", "pred": "[[100, 100], [500, 500]]"}]
    rows, s = score_records(recs, task_map={"mine": "box"}, coords="thousand")
    assert rows[0]["kind_from"] == "task-map" and s["all"]["box"]["mean_iou"] == approx(1.0)
    assert s["coords"]["predictions"] == "thousand" and "0-1000" in format_table(s)
    rows, s = score_records(recs, task_map={"mine": "box"})  # read as [0, 1]: flagged
    assert s["coords"]["suspicious"] == 1 and "try --coords pixels" in format_table(s)
    rows, s = score_records(recs, task_map={"mine": "box"}, coords="pixels")
    assert s["data_errors"][0]["field"] == "w/h"
    recs[0].update(w=1000, h=1000)
    assert score_records(recs, task_map={"mine": "box"}, coords="pixels")[1]["all"]["box"]["mean_iou"] == approx(1)
    with pytest.raises(ValueError, match="coords"):
        score_records(recs, coords="inches")
    with pytest.raises(ValueError, match="upstream"):
        score_records(recs, upstream_compatible=True, coords="pixels")


def test_trajectory_metrics_include_hausdorff_and_trace_errors():
    rows, s = score_records([{"id": 1, "task": "traj", "w": 100, "h": 100, "gt": "[[0, 0], [0.5, 0]]",
                              "pred": "[[0, 0.1], [0.5, 0.1]]"}])
    r = rows[0]
    assert r["hausdorff"] == approx(0.1) and r["hausdorff_px"] == approx(10.0)
    assert r["trace_rmse"] == approx(99.9) and r["trace_mae"] == approx(99.9 / 2)  # 0.1 in y, scaled to 0-999
    assert "hausdorff=0.100" in format_table(s) and "trace_rmse=99.900" in format_table(s)


def test_the_image_size_is_read_from_width_height_as_from_w_h():
    """The kit's records (and LLaVA's) say `width` / `height`: pixel metrics and the pixel-unit hint need them as
    much as RoboInter's `w` / `h`."""
    base = {"id": 1, "task": "traj", "gt": "[[0, 0], [0.5, 0]]", "pred": "[[0, 0.1], [0.5, 0.1]]"}
    (a,), _ = score_records([{**base, "w": 100, "h": 100}])
    (b,), _ = score_records([{**base, "width": 100, "height": 100}])
    assert a["hausdorff_px"] == b["hausdorff_px"] == approx(10.0)
    rows, s = score_records([{**base, "gt": "[[300, 200], [600, 400]]", "width": 640, "height": 480}])
    assert not rows and "640x480" in s["data_errors"][0]["reason"]
    rows, s = score_records([{**base, "width": 0, "height": 100}])
    assert s["data_errors"][0]["field"] == "width"


@pytest.mark.parametrize("gt", ["[[0.3, 0.4], [0.1, 0.2]]", "(0.3, 0.4), (0.1, 0.2)", "[0.3, 0.4, 0.1, 0.2]",
                                '{"bbox_2d": [0.3, 0.4, 0.1, 0.2]}', "x=0.1 y=0.2 w=0.3 h=0.3"])
def test_an_inverted_or_sized_ground_truth_box_is_refused_in_every_shape(gt):
    """The parser sorts corners, so an inverted ground truth (x, y, width, height, most often) would be scored as
    another box; strict scoring refuses it as data check does, whatever the shape."""
    rows, s = score_records([{"id": 1, "task": "current_box", "gt": gt, "pred": "[0.1, 0.2, 0.3, 0.4]"}])
    assert not rows and s["data_errors"][0]["field"] == "gt"
    rows, s = score_records([{"id": 1, "task": "current_box", "gt": "(0.1, 0.2), (0.3, 0.4)",
                              "pred": "[0.1, 0.2, 0.3, 0.4]"}])
    assert rows[0]["iou"] == approx(1.0)


def test_format_table():
    _, s = score_records(_records())
    table = format_table(s)
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "kind", "n", "parse-fail", "metrics"]
    assert "mean_iou=0.444" in table and "acc@0.1=0.667" in table
    assert "dtw=0.100  dtw_px=10.000" in table and "accuracy=0.333" in table and "bleu=0.500" in table
    body = [l for l in lines[2:] if not l.startswith("coordinates:")]
    assert lines[-1].startswith("coordinates: predictions read as [0, 1]")
    assert len(body) == len(s["all"]) + sum(len(k) for k in s["by_dataset"].values())
    col = lines[0].index("metrics")
    assert all(l[col - 2 : col] == "  " and l[col] != " " for l in body)  # the metrics column is aligned
    assert "33.3%" in table


def test_coordinates_line_only_where_coordinates_were_read():
    _, s = score_records([{"id": 1, "task": "choice", "gt": "A", "pred": "A"},
                          {"id": 2, "task": "planning", "gt": "pick up the cup", "pred": "pick up the cup"}])
    assert "coordinates:" not in format_table(s)
    _, s = score_records([{"id": 1, "task": "object_box", "gt": "[0.1, 0.1, 0.5, 0.5]", "pred": "[0.1, 0.1, 0.5, 0.5]"}])
    assert "coordinates: predictions read as [0, 1]" in format_table(s)


def test_write_outputs(tmp_path):
    rows, s = score_records(_records())
    write_outputs(tmp_path / "out", rows, s)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == s
    lines = (tmp_path / "out" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == [r["id"] for r in rows]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


# --------------------------------------------------------------------------------------------------------- loading
def test_load_json_and_jsonl(tmp_path):
    recs = [{"id": 1, "pred": "A", "gt": "A"}, {"id": 2, "pred": "B", "gt": "A", "task": "choice"}]
    (tmp_path / "p.json").write_text(json.dumps(recs))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_predictions(tmp_path / "p.json") == recs
    assert load_predictions(tmp_path / "p.jsonl") == recs


def test_load_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "preds.jsonl"
    p.write_text('{"id": 1, "pred": "A", "gt": "A"}\n\n{"id": 2, "pred": "A", "gt": }\n')
    with pytest.raises(UserError, match=r"preds\.jsonl: line 3: invalid JSON"):
        load_predictions(p)


def test_load_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "preds.json"
    p.write_text('[\n {"id": 1, "pred": "A", "gt": "A"},\n {"id": 2 "pred": "A"}\n]')
    with pytest.raises(UserError, match=r"preds\.json: line 3"):
        load_predictions(p)


def test_load_needs_ids_and_takes_the_task_from_upstream_file_names(tmp_path):
    p = tmp_path / "preds.jsonl"
    p.write_text('{"id": "x1", "pred": "A", "gt": "A"}\n{"pred": "A"}\n')
    with pytest.raises(UserError, match=r"preds\.jsonl: line 2: record 1 has no 'id' field"):
        load_predictions(p)
    q = tmp_path / "eval_details_traj_choice.json"
    q.write_text(json.dumps([{"id": 5, "gt": "A", "pred": "A"}, {"id": 6, "gt": "A", "pred": "A", "task": "x"}]))
    assert [r["task"] for r in load_predictions(q)] == ["traj_choice", "x"]
    with pytest.raises(UserError, match="not found"):
        load_predictions(tmp_path / "missing.jsonl")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(UserError, match="array"):
        load_predictions(tmp_path / "obj.json")


# ----------------------------------------------------------------------------------------------------------- draw
def test_draw_overlay_box_and_copy():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    before = img.tobytes()
    out = draw_overlay(img, "box", (0.5, 0.5, 0.9, 0.9), (0.1, 0.6, 0.3, 0.8))
    assert out.size == (200, 100) and out.mode == "RGB" and out is not img
    assert img.tobytes() == before  # input untouched
    assert out.getpixel((100, 70)) == GT_COLOR  # left edge of the GT box at x = 0.5 * 200
    assert out.getpixel((20, 70)) == PRED_COLOR  # left edge of the predicted box at x = 0.1 * 200


@pytest.mark.parametrize(
    "kind,gt,pred",
    [("point", [(0.5, 0.5)], [[0.2, 0.8], [0.3, 0.3]]),
     ("trajectory", [(0.1, 0.1), (0.5, 0.5), (0.9, 0.2)], None),
     ("choice", "B", None), ("yesno", True, False), ("planning", "pick up the cube " * 10, "pick")],
)
def test_draw_overlay_kinds(kind, gt, pred):
    img = Image.new("L", (64, 48), 128)
    out = draw_overlay(img, kind, gt, pred)
    assert out.size == (64, 48) and out.mode == "RGB"
    assert img.mode == "L"


def test_draw_overlay_point_colour():
    out = draw_overlay(Image.new("RGB", (100, 100)), "point", [(0.7, 0.7)], [(0.3, 0.8)])
    assert out.getpixel((70, 70)) == GT_COLOR and out.getpixel((30, 80)) == PRED_COLOR


def test_contact_sheet_sizes():
    ims = [Image.new("RGB", (100 + 10 * i, 50), (i * 40, 0, 0)) for i in range(5)]
    assert contact_sheet(ims, columns=4, thumb=64).size == (256, 128)
    assert contact_sheet(ims[:2], columns=4, thumb=64).size == (128, 64)
    assert contact_sheet(ims, columns=1, thumb=32).size == (32, 160)
    with pytest.raises(ValueError):
        contact_sheet([])


def test_eval_modules_do_not_import_torch():
    code = (
        "import sys; import lora_manip.answers.kinds, lora_manip.answers.parse, lora_manip.eval.metrics, "
        "lora_manip.eval.score, "
        "lora_manip.eval.draw, lora_manip.eval.upstream, lora_manip.eval.pointing, lora_manip.eval.report; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_several_prediction_files_are_a_row_each(tmp_path):
    """`score A B`: records without a `dataset` take their file's name (a stem two folders share gets its folder),
    so each file has its own numbers, as in eval; records that carry a dataset keep it."""
    from lora_manip.eval.score import score_files

    box = lambda a, b: json.dumps({"current_bbox": [a, b]})  # noqa: E731
    gt = box([0.1, 0.1], [0.5, 0.5])
    for folder, name, pred in (("m1", "eval_details_current_box", gt), ("m1", "eval_details_final_box",
                                                                        box([0.1, 0.1], [0.2, 0.2])),
                               ("m2", "eval_details_final_box", gt)):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{name}.json").write_text(json.dumps([{"id": 1, "pred": pred, "gt": gt}]))
    (tmp_path / "tagged.jsonl").write_text(json.dumps({"id": 1, "dataset": "mine", "pred": gt, "gt": gt}) + "\n")
    files = [tmp_path / "m1" / "eval_details_current_box.json", tmp_path / "m1" / "eval_details_final_box.json",
             tmp_path / "m2" / "eval_details_final_box.json", tmp_path / "tagged.jsonl"]
    summary = score_files(files)
    by = {ds: s["box"]["mean_iou"] for ds, s in summary["by_dataset"].items()}
    assert by == {"eval_details_current_box": 1.0, "m1/eval_details_final_box": 0.0625,
                  "m2/eval_details_final_box": 1.0, "mine": 1.0}
    assert set(score_files(files[:1])["by_dataset"]) == {"default"}  # one file: one row, as before
