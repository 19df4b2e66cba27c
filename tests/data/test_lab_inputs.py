"""A lab's labels as spreadsheets and annotation tools write them, through `data normalize` and `data check`: what
the parser would silently reshape (a box given as x, y, width, height) is refused in every shape; numbers that are
words (a planning answer's "2 cups") are not taken for pixels; labels already in [0, 1] are not divided again;
pixel coordinates in any question are converted; exporters' habits (';'-separated CSV, `~` and absolute paths,
COCO crowd regions, all-unlabelled keypoints) are read, or named, row by row."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from lora_manip.data.check import run_check
from lora_manip.data.normalize import format_summary, normalize_file


def _image(folder, name="a.png", size=(640, 480)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(folder / name)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv(tmp_path, rows, header="image,task,question,answer"):
    path = tmp_path / "l.csv"
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def _record_file(tmp_path, recs):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _rec(rid, answer, task=None, question="<image>\nWhere?", **extra):
    return {"id": rid, "images": ["a.png"], **({"task": task} if task else {}), **extra, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# --- a box as x, y, width, height: the parser would sort it into another box ------------------------------------
@pytest.mark.parametrize("answer", [
    '"[300, 200, 50, 40]"', '"(300, 200), (50, 40)"', '"{""bbox_2d"": [300, 200, 50, 40]}"',
    '"<|box_start|>(300,200),(50,40)<|box_end|>"', "x=10 y=20 w=30 h=40", '"{""x"": 10, ""y"": 20, ""w"": 30, ""h"": 40}"',
    "The cup: x 300 y 200 width: 50 height: 40"])
def test_a_csv_box_given_as_its_size_is_refused_in_every_shape(tmp_path, answer):
    _image(tmp_path)
    s = normalize_file(_csv(tmp_path, [f"a.png,current_box,Where?,{answer}", "a.png,box,Where?,10 20 40 60"]),
                       tmp_path / "o.jsonl")
    assert s["output"] is None and not (tmp_path / "o.jsonl").exists()
    (p,) = s["problems"]
    assert (p["where"], p["field"], p["kind"]) == ("line 2", "answer", "box_inverted")
    assert "give two corners" in p["reason"]


@pytest.mark.parametrize("answer", ["(0.5, 0.4), (0.1, 0.2)", "x=0.1 y=0.2 w=0.3 h=0.4", '{"bbox_2d": [0.5, 0.4, 0.1, 0.2]}'])
def test_data_check_and_normalize_refuse_such_boxes_in_records_too(tmp_path, answer):
    _image(tmp_path)
    path = _record_file(tmp_path, [_rec("r", answer, "current_box"), _rec("ok", "(0.1, 0.2), (0.5, 0.4)", "box")])
    report = run_check(str(path))
    assert [(p["record_id"], p["kind"]) for p in report["problems"]] == [("r", "box_inverted")]
    pixels = _record_file(tmp_path, [_rec("r", answer.replace("0.", "").replace("x=1", "x=10"), "current_box")])
    s = normalize_file(pixels, tmp_path / "o.jsonl")
    assert s["output"] is None and s["problems"][0]["record_id"] == "r"


# --- numbers that are words -------------------------------------------------------------------------------------
def test_prose_numbers_in_text_answers_are_copied_and_bracket_lists_still_refused(tmp_path):
    _image(tmp_path)
    recs = [_rec("plan", "Pick up 2 cups and place them in 3 bowls.", "planning"),
            _rec("steps", "Step 2 of 4: grasp the mug.", "task_planning"),
            _rec("notask", "Move the gripper 10 cm left, then 5 cm down."),
            _rec("choice", "C", "choice")]
    s = normalize_file(_record_file(tmp_path, recs), tmp_path / "o.jsonl")
    assert s["problems"] == [] and s["no_coordinates"] == 4
    assert [r["conversations"][1]["value"] for r in _records(tmp_path / "o.jsonl")] == [
        r["conversations"][1]["value"] for r in recs]
    s = normalize_file(_csv(tmp_path, ["a.png,planning,What next?,Pick up 2 cups and place them in 3 bowls.",
                                       'a.png,planning,What next?,"Move to [320, 240]."']), tmp_path / "c.jsonl")
    assert [r["action"] for r in s["rows"]] == ["copied", "refused"]
    assert "coordinate-like numbers (320, 240)" in s["problems"][0]["reason"]


# --- labels already in [0, 1] -----------------------------------------------------------------------------------
def test_csv_answers_already_in_unit_range_are_kept_not_divided_again(tmp_path):
    _image(tmp_path)
    s = normalize_file(_csv(tmp_path, ['a.png,current_box,Where?,"[0.1, 0.2, 0.5, 0.6]"',
                                       'a.png,traj,"From (0.1, 0.2), where?","[[0.1, 0.2], [0.5, 0.6]]"',
                                       'a.png,current_box,"The cup at [320, 240]?","[0.1, 0.2, 0.5, 0.6]"']),
                       tmp_path / "o.jsonl")
    assert [r["action"] for r in s["rows"]] == ["converted", "converted", "refused"]
    assert s["rows"][0]["detail"] == "box; already in [0, 1]: kept"
    assert "question holds coordinates above 1 (320, 240)" in s["problems"][0]["reason"]
    s = normalize_file(_csv(tmp_path, ['a.png,current_box,Where?,"[0.1, 0.2, 0.5, 0.6]"',
                                       'a.png,traj,"From (0.1, 0.2), where?","[[0.1, 0.2], [0.5, 0.6]]"']),
                       tmp_path / "o.jsonl")
    recs = _records(tmp_path / "o.jsonl")
    assert [r["conversations"][1]["value"] for r in recs] == ['{"current_box": [[0.1, 0.2], [0.5, 0.6]]}',
                                                             '{"traj": [[0.1, 0.2], [0.5, 0.6]]}']
    assert recs[1]["conversations"][0]["value"] == "<image>\nFrom (0.1, 0.2), where?"


# --- coordinates in the question of any record ------------------------------------------------------------------
def test_pixel_coordinates_in_the_question_of_a_text_record_are_converted(tmp_path):
    _image(tmp_path)
    recs = [_rec("yn", "Yes", "yesno", "<image>\nIs the gripper at (320, 240) touching the cup?"),
            _rec("plain", "No", "yesno", "<image>\nIs the drawer open?")]
    s = normalize_file(_record_file(tmp_path, recs), tmp_path / "o.jsonl")
    assert [r["action"] for r in s["rows"]] == ["converted", "no_coordinates"]
    assert s["rows"][0]["detail"] == "divided by 640 x 480: 1 coordinate list(s) in the question"
    out = _records(tmp_path / "o.jsonl")
    assert out[0]["conversations"][0]["value"] == "<image>\nIs the gripper at (0.5, 0.5) touching the cup?"
    assert out[0]["conversations"][1]["value"] == "Yes" and (out[0]["width"], out[0]["height"]) == (640, 480)


# --- how spreadsheets and tools write files -----------------------------------------------------------------------
@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs_is_read(tmp_path, sep):
    _image(tmp_path)
    path = tmp_path / "l.csv"
    path.write_text(sep.join(["image", "task", "question", "answer"]) + "\n"
                    + sep.join(["a.png", "current_box", "Where, exactly?", "320, 240, 640, 480"]) + "\n")
    s = normalize_file(path, tmp_path / "o.jsonl")
    assert s["problems"] == []
    (r,) = _records(tmp_path / "o.jsonl")
    assert r["conversations"] == [{"from": "human", "value": "<image>\nWhere, exactly?"},
                                  {"from": "gpt", "value": '{"current_box": [[0.5, 0.5], [1.0, 1.0]]}'}]


def test_home_and_absolute_image_paths_are_written_relative_to_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _image(tmp_path / "data/cam0")
    _image(tmp_path / "elsewhere")
    path = _csv(tmp_path / "data", [f"{tmp_path}/data/cam0/a.png,box,Where?,1 2 3 4",
                                    "~/data/cam0/a.png,box,Where?,1 2 3 4", "cam0\\a.png,box,Where?,1 2 3 4"])
    s = normalize_file(path, tmp_path / "data/o.jsonl")
    assert [r["action"] for r in s["rows"]] == ["converted", "converted", "refused"]
    assert "(write paths with /, not \\)" in s["problems"][0]["reason"]
    path.write_text("image,task,question,answer\n" + f"{tmp_path}/data/cam0/a.png,box,Where?,1 2 3 4\n"
                    + "~/data/cam0/a.png,box,Where?,1 2 3 4\n")
    normalize_file(path, tmp_path / "data/o.jsonl")
    assert [r["images"] for r in _records(tmp_path / "data/o.jsonl")] == [["cam0/a.png"], ["cam0/a.png"]]
    assert run_check(str(tmp_path / "data/o.jsonl"))["ok"]
    path.write_text(f"image,task,question,answer\n{tmp_path}/elsewhere/a.png,box,Where?,1 2 3 4\n")
    s = normalize_file(path, tmp_path / "data/o2.jsonl")
    (p,) = s["problems"]
    assert p["field"] == "images" and f"not under the data root {os.path.abspath(tmp_path / 'data')}" in p["reason"]
    assert not (tmp_path / "data/o2.jsonl").exists()


def test_coco_crowd_regions_are_skipped_and_unlabelled_keypoints_give_no_point_record(tmp_path):
    _image(tmp_path)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 640, "height": 480}],
            "categories": [{"id": 1, "name": "mug", "keypoints": ["handle", "rim"]}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [64, 48, 64, 48], "iscrowd": 0,
                 "keypoints": [0, 0, 0, 0, 0, 0], "num_keypoints": 0},  # a box; nobody labelled its keypoints
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 640, 480], "iscrowd": 1,
                 "segmentation": {"counts": [0, 10], "size": [480, 640]}},  # a crowd region
                {"id": 3, "image_id": 1, "category_id": 1, "keypoints": [0, 0, 0, 0, 0, 0]}]}  # nothing at all
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    assert [(r["id"], r["action"]) for r in s["rows"]] == [("1-box", "converted"), ("2", "skipped"),
                                                           ("3-points", "refused")]
    assert "keypoints are all unlabelled" in s["rows"][0]["detail"] and "iscrowd 1" in s["rows"][1]["detail"]
    assert [(p["record_id"], p["field"]) for p in s["problems"]] == [("3-points", "keypoints")]
    del coco["annotations"][2]
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    assert s["problems"] == [] and s["skipped"] == 1 and [r["id"] for r in _records(tmp_path / "c.jsonl")] == ["1-box"]
    assert format_summary(s).splitlines()[-1].startswith("wrote ") and "1 converted, 0 copied (no coordinates), " \
        "1 skipped, 0 refused" in format_summary(s)



def test_a_coco_category_id_missing_from_categories_is_refused_not_named_object(tmp_path):
    _image(tmp_path)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 640, "height": 480}],
            "categories": [{"id": 1, "name": "mug"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [64, 48, 64, 48]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    assert [(p["record_id"], p["field"]) for p in s["problems"]] == [("7", "category_id")]
    assert not (tmp_path / "c.jsonl").exists()
    coco["annotations"][0]["category_id"] = 1
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    assert s["problems"] == [] and "mug" in _records(tmp_path / "c.jsonl")[0]["conversations"][0]["value"]

def test_data_check_names_pixels_of_the_decoded_image_when_the_record_states_no_size(tmp_path):
    _image(tmp_path)
    report = run_check(str(_record_file(tmp_path, [_rec("r", "(320, 240), (330, 250)", "contact_point")])))
    (p,) = report["problems"]
    assert "pixels of the 640x480 image" in p["reason"] and p["record_id"] == "r"
