"""`data normalize`: pixel coordinates -> [0, 1], into a new file; the input is never touched."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from lora_manip.cli import app
from lora_manip.data.report import Entry, check_entries
from lora_manip.data.normalize import normalize_file, smart_resize
from lora_manip.errors import UserError

runner = CliRunner()


def rec(rid, answer, **extra):
    return {"id": rid, "images": ["f.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": answer}], **extra}


@pytest.fixture()
def src(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    recs = [
        rec("fields", '{"current_bbox": [[320, 240], [640, 480]]}', width=640, height=480),
        rec("header", '{"future_traj": [[64, 48], [128, 96], [192, 144]]}'),
        rec("flat", '{"gripper_box": [160, 120, 480, 360]}'),
        rec("choice", "B"),
        rec("done", '{"contact_point": [[0.25, 0.5]]}'),
    ]
    path = tmp_path / "pixels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def answers(path):
    return [json.loads(line)["conversations"][1]["value"] for line in path.read_text().splitlines()]


def test_pixels_to_unit_coordinates(src, tmp_path):
    before = src.read_bytes()
    out = tmp_path / "unit.jsonl"
    s = normalize_file(src, out, "pixels")
    assert src.read_bytes() == before  # the input is never modified
    assert (s["converted"], s["already_normalised"], s["no_coordinates"], s["problems"]) == (3, 1, 1, [])
    assert answers(out) == ['{"current_bbox": [[0.5, 0.5], [1.0, 1.0]]}',
                            '{"future_traj": [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]}',
                            '{"gripper_box": [0.25, 0.25, 0.75, 0.75]}', "B", '{"contact_point": [[0.25, 0.5]]}']
    report = check_entries([Entry("u", str(out), str(tmp_path))])
    assert report["ok"], report["problems"]
    as_array = tmp_path / "unit.json"  # the output format follows its suffix
    normalize_file(src, as_array, "pixels")
    assert [r["conversations"][1]["value"] for r in json.loads(as_array.read_text())] == answers(out)


def test_resized_and_thousand_units(src, tmp_path):
    assert smart_resize(480, 640) == (476, 644)
    assert smart_resize(180, 320) == (168, 308)
    h, w = smart_resize(4000, 6000)
    assert h % 28 == w % 28 == 0 and h * w <= 28 * 28 * 16384
    resized = tmp_path / "resized.jsonl"
    resized.write_text(json.dumps(rec("q", '{"current_bbox": [[322, 238], [644, 476]]}', width=640, height=480)))
    normalize_file(resized, tmp_path / "o1.jsonl", "resized")
    assert answers(tmp_path / "o1.jsonl") == ['{"current_bbox": [[0.5, 0.5], [1.0, 1.0]]}']
    k = tmp_path / "k.jsonl"
    k.write_text(json.dumps(rec("k", '{"current_bbox": [[100, 250], [1000, 500]]}')))
    normalize_file(k, tmp_path / "o2.jsonl", "thousand")
    assert answers(tmp_path / "o2.jsonl") == ['{"current_bbox": [[0.1, 0.25], [1.0, 0.5]]}']


def test_problems_write_nothing(src, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(src.read_text() + json.dumps(rec("big", '{"current_bbox": [[900, 10], [950, 20]]}')) + "\n"
                   + json.dumps({"id": "noimg", "conversations": [
                       {"from": "human", "value": "Where?"}, {"from": "gpt", "value": '{"point": [[5, 5]]}'}]}))
    s = normalize_file(bad, tmp_path / "out.jsonl", "pixels")
    assert s["output"] is None and not (tmp_path / "out.jsonl").exists()
    assert [(p["record_id"], p["where"]) for p in s["problems"]] == [("big", "line 6"), ("noimg", "line 7")]
    assert "outside the image" in s["problems"][0]["reason"] and "no image size" in s["problems"][1]["reason"]
    assert list(tmp_path.glob(".out.jsonl*")) == []  # no temporary left behind


def test_refuses_to_overwrite(src, tmp_path):
    with pytest.raises(UserError, match="never modified"):
        normalize_file(src, src, "pixels")
    (tmp_path / "exists.jsonl").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        normalize_file(src, tmp_path / "exists.jsonl", "pixels")
    assert (tmp_path / "exists.jsonl").read_text() == "keep"


def test_cli(src, tmp_path):
    result = runner.invoke(app, ["data", "normalize", str(src), str(tmp_path / "n.jsonl"), "--from", "pixels"])
    assert result.exit_code == 0 and "3 converted, 1 already in [0, 1]" in result.stdout
    result = runner.invoke(app, ["data", "normalize", str(src), str(tmp_path / "m.jsonl"), "--from", "inches"])
    assert result.exit_code == 2 and "--from 'inches'" in result.output


# --- every answer shape the scorer reads: converted, or refused with a reason; never copied in pixels ------------
from lora_manip.answers.parse import parse_answer  # noqa: E402
from lora_manip.answers.units import value_points  # noqa: E402


def _one(tmp_path, answer, task=None, question="<image>\nWhere?", mode="pixels"):
    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    r = rec("r", answer, **({"task": task} if task else {}))
    r["conversations"][0]["value"] = question
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(r) + "\n")
    out = tmp_path / "out.jsonl"
    s = normalize_file(src, out, mode, force=True)
    return s, (json.loads(out.read_text()) if s["output"] else None)


@pytest.mark.parametrize("answer, task, kind, expected", [
    ("[320, 240, 640, 480]", "current_box", "box", "[0.5, 0.5, 1.0, 1.0]"),  # flat list
    ("[[64, 48], [128, 96], [192, 144]]", "traj", "trajectory", "[[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]"),  # bare
    ("(320, 240)", "contact_point", "point", "(0.5, 0.5)"),  # tuple
    ("The box is 320, 240, 640, 480.", "current_box", "box", "The box is 0.5, 0.5, 1.0, 1.0."),  # prose
    ('{"bbox_2d": [320, 240, 640, 480]}', None, "box", '{"bbox_2d": [0.5, 0.5, 1.0, 1.0]}'),  # Qwen2.5-VL
    ('[{"point_2d": [320, 240]}, {"point_2d": [64, 48]}]', "contact_point", "point",
     '[{"point_2d": [0.5, 0.5]}, {"point_2d": [0.1, 0.1]}]'),
    ('{"gripper": [[320, 240], [640, 480]]}', "gripper_det", "box", '{"gripper": [[0.5, 0.5], [1.0, 1.0]]}'),
    ("<|box_start|>(320,240),(640,480)<|box_end|>", "current_box", "box",
     "<|box_start|>(0.5,0.5),(1.0,1.0)<|box_end|>"),  # Qwen2-VL tags
    ("<point>[[64, 48], [128, 96]]</point>", "traj", "trajectory", "<point>[[0.1, 0.1], [0.2, 0.2]]</point>"),
])
def test_every_shape_the_scorer_reads_is_converted(tmp_path, answer, task, kind, expected):
    s, out = _one(tmp_path, answer, task)
    assert s["converted"] == 1 and s["rows"][0]["action"] == "converted", s["problems"]
    got = out["conversations"][1]["value"]
    assert got == expected
    before, after = parse_answer(answer, kind, "pixels", (640, 480)), parse_answer(got, kind)
    flat = lambda v: [c for pt in value_points(v) for c in pt]  # noqa: E731
    assert flat(after.value) == pytest.approx(flat(before.value))  # the scorer reads the same coordinates


def test_coordinates_in_the_question_are_converted_with_the_answer(tmp_path):
    s, out = _one(tmp_path, '{"future_traj": [[64, 48], [128, 96]]}', "traj",
                  question="<image>\nThe gripper starts at [64, 48]; step 2 of (3 steps).")
    assert out["conversations"][0]["value"] == "<image>\nThe gripper starts at [0.1, 0.1]; step 2 of (3 steps)."
    assert "1 coordinate list(s) in the question" in s["rows"][0]["detail"]


@pytest.mark.parametrize("answer, task, question, reason", [
    ('{"gripper": [[320, 240], [640, 480]]}', None, "<image>\nWhere?", "coordinate-like numbers (320, 240, 640, "
                                                                      "480) but without a task name it reads as"),
    ("[320, 240, 640]", "current_box", "<image>\nWhere?", "box answer whose coordinates cannot be read"),
    ("I cannot see it.", "current_box", "<image>\nWhere?", "box answer whose coordinates cannot be read"),
    ("Move to [320, 240] first.", "traj_choice", "<image>\nWhich?", "its task 'traj_choice' is a choice task"),
    ('{"current_bbox": [[0.5, 0.5], [1.0, 1.0]]}', None, "<image>\nThe cup is at [320, 240].",
     "the question holds coordinate lists above 1"),
])
def test_what_cannot_be_converted_is_refused_with_its_reason(tmp_path, answer, task, question, reason):
    s, out = _one(tmp_path, answer, task, question)
    assert out is None and s["refused"] == 1 and s["output"] is None
    assert reason in s["problems"][0]["reason"] and s["problems"][0]["record_id"] == "r"


def test_molmo_percent_tags_are_left_alone(tmp_path):
    s, out = _one(tmp_path, '<point x="61.5" y="40.6" alt="cup">cup</point>', "contact_point")
    assert s["no_coordinates"] == 1 and "percent" in s["rows"][0]["detail"]
    assert out["conversations"][1]["value"] == '<point x="61.5" y="40.6" alt="cup">cup</point>'


# --- pixel ground truths: data check and score name the records and the unit instead of using them -------------
def test_data_check_and_score_refuse_pixel_ground_truths(tmp_path):
    from lora_manip.eval.score import score_records

    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    recs = [rec("qwen", '{"bbox_2d": [320, 240, 640, 480]}', width=640, height=480),
            rec("tuple", "(320, 240)", task="contact_point"), rec("fine", "(0.5, 0.5)", task="contact_point")]
    path = tmp_path / "pixels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    report = check_entries([Entry("p", str(path), str(tmp_path))])
    flagged = {p["record_id"]: p["reason"] for p in report["problems"] if p["kind"] == "coords_out_of_range"}
    assert set(flagged) == {"qwen", "tuple"}
    # `bbox_2d` is a coordinate key: the key-by-key check names it (and the unit); the tuple gets the unit rule
    assert "`bbox_2d`" in flagged["qwen"] and "pixel coordinates" in flagged["qwen"]
    assert "data normalize --from pixels" in flagged["tuple"]
    preds = [{"id": "b", "task": "current_box", "gt": "[[320, 240], [640, 480]]", "pred": "[[320, 240], [640, 480]]",
              "w": 640, "h": 480},
             {"id": "t", "task": "traj", "gt": "[[64, 48], [128, 96]]", "pred": "[[64, 48], [128, 96]]", "w": 640,
              "h": 480}]
    rows, s = score_records(preds, coords="pixels")
    assert not rows and [e["id"] for e in s["data_errors"]] == ["b", "t"]
    assert all(e["field"] == "gt" and "pixels of the 640x480 image" in e["reason"] for e in s["data_errors"])


# --- a lab's own labels: CSV and COCO-style JSON -------------------------------------------------------------
def _labels_dir(tmp_path):
    for name, size in (("a.png", (640, 480)), ("b.png", (320, 180))):
        Image.new("RGB", size).save(tmp_path / name)
    return tmp_path


def test_csv_rows_become_records(tmp_path):
    _labels_dir(tmp_path)
    (tmp_path / "labels.csv").write_text(
        "image,task,question,answer,id\n"
        "a.png,current_box,Where is the cup?,320 240 640 480,\n"
        'a.png,contact_point,Where will the fingers touch?,"(320, 240), (64, 48)",cp1\n'
        'b.png,traj,"<image>\nThe gripper starts at (32, 18). Where next?","[[32, 18], [160, 90], [320, 180]]",\n'
        "b.png,traj_choice,Which path is right?,B,\n")
    out = tmp_path / "labels.jsonl"
    s = normalize_file(tmp_path / "labels.csv", out)
    assert (s["input"], s["records"], s["converted"], s["copied"], s["problems"]) == ("csv", 4, 3, 1, [])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["labels-2", "cp1", "labels-4", "labels-6"]  # FILE-LINE (its first line)
    assert [r["conversations"][1]["value"] for r in recs] == [
        '{"current_box": [[0.5, 0.5], [1.0, 1.0]]}', '{"contact_point": [[0.5, 0.5], [0.1, 0.1]]}',
        '{"traj": [[0.1, 0.1], [0.5, 0.5], [1.0, 1.0]]}', "B"]
    assert recs[0]["conversations"][0]["value"] == "<image>\nWhere is the cup?"
    assert recs[2]["conversations"][0]["value"] == "<image>\nThe gripper starts at (0.1, 0.1). Where next?"
    assert [r["action"] for r in s["rows"]] == ["converted", "converted", "converted", "copied"]
    assert check_entries([Entry("l", str(out), str(tmp_path))])["ok"]  # the kit accepts what it wrote
    res = runner.invoke(app, ["data", "normalize", str(tmp_path / "labels.csv"), str(tmp_path / "again.json")])
    assert res.exit_code == 0 and "line 2 id='labels-2': converted (box divided by 640 x 480)" in res.stdout
    assert "4 rows, 3 converted, 1 copied (no coordinates), 0 refused" in res.stdout


def test_csv_rows_that_cannot_be_converted_are_named_and_nothing_is_written(tmp_path):
    _labels_dir(tmp_path)
    (tmp_path / "bad.csv").write_text(
        "image,task,question,answer,width,height\n"
        "a.png,current_box,Where?,320 240 640 480,,\n"
        "a.png,current_box,Where?,320 240 900 480,,\n"  # beyond the image
        "a.png,current_box,Where?,320 240 640,,\n"  # three numbers
        "missing.png,current_box,Where?,1 2 3 4,,\n"  # no image, no size
        'a.png,traj_choice,Which?,"go to [320, 240]",,\n'  # pixels in a text answer
        "a.png,point,,10 10,,\n")  # no question
    res = runner.invoke(app, ["data", "normalize", str(tmp_path / "bad.csv"), str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1 and not (tmp_path / "o.jsonl").exists()
    for line, words in ((3, "outside the image"), (4, "does not read as a box"), (5, "missing.png not found"),
                        (6, "coordinate-like numbers"), (7, "field `question`: empty")):
        assert any(f"line {line}" in x and words in x for x in res.output.splitlines()), (line, res.output)
    assert "5 problem(s) in 6 rows" in res.output
    (tmp_path / "typo.csv").write_text("img,task,question,answer\n")
    res = runner.invoke(app, ["data", "normalize", str(tmp_path / "typo.csv"), str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "lacks image" in res.output and "unknown column(s) img" in res.output


def test_coco_boxes_and_keypoints(tmp_path):
    _labels_dir(tmp_path)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 640, "height": 480}],
            "categories": [{"id": 7, "name": "mug", "keypoints": ["handle", "rim"]}],
            "annotations": [
                {"id": 11, "image_id": 1, "category_id": 7, "bbox": [64, 48, 256, 192],
                 "keypoints": [320, 240, 2, 0, 0, 0]},  # the rim is not labelled
                {"id": 12, "image_id": 1, "category_id": 7, "bbox": [0, 0, 0, 5]},  # no area
                {"id": 13, "image_id": 9, "category_id": 7, "bbox": [0, 0, 5, 5]}]}  # no such image
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "coco.json", tmp_path / "o.jsonl")
    assert s["input"] == "coco" and s["output"] is None
    assert [(r["id"], r["action"]) for r in s["rows"]] == [("11-box", "converted"), ("11-points", "converted"),
                                                           ("12-box", "refused"), ("13", "refused")]
    coco["annotations"] = coco["annotations"][:1]
    coco["annotations"][0]["keypoints"] = [320, 240, 2, 64, 48, 1]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "coco.json", tmp_path / "o.jsonl", keypoints="trajectory")
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["conversations"][1]["value"] for r in recs] == ['{"bbox": [[0.1, 0.1], [0.5, 0.5]]}',
                                                              '{"trajectory": [[0.5, 0.5], [0.1, 0.1]]}']
    assert recs[0]["conversations"][0]["value"] == "<image>\nGive the bounding box of the mug."
    assert [r["task"] for r in recs] == ["box", "trajectory"]
    assert check_entries([Entry("c", str(tmp_path / "o.jsonl"), str(tmp_path))])["ok"]
    with pytest.raises(UserError, match="COCO coordinates are pixels"):
        normalize_file(tmp_path / "coco.json", tmp_path / "p.jsonl", "thousand")


@pytest.mark.parametrize("fmt, mode", [("origin_format", "pixels"), ("smart_resize_format", "resized")])
def test_robointer_pixel_formats_convert_to_its_llava_format(tmp_path, fmt, mode):
    """The release ships each Generation file in pixels, resized pixels and [0, 1]: converting either pixel file
    gives the [0, 1] one, question coordinates included (traj_qa states the starting point)."""
    from tests.fixtures.robointer_release import write_release

    root = write_release(tmp_path / "rel")
    meta = root / "Generation/meta/train/droid"
    for name in ("full_single_multi_contact_obj_traj_qa.json", "full_single_multi_contact_obj_current_box_qa.json"):
        out = tmp_path / f"{fmt}-{name}"
        s = normalize_file(meta / fmt / name, out, mode, data_root=root)
        assert s["converted"] == s["records"] == 2 and s["problems"] == []
        want = json.loads((meta / "llava_format" / name).read_text())
        got = json.loads(out.read_text())
        for w, g in zip(want, got):
            for tw, tg in zip(w["conversations"], g["conversations"]):
                nums = lambda t: [float(x) for x in re.findall(r"\d+\.\d+|\d+", t.split("Answer")[0])]  # noqa: E731
                assert nums(tg["value"]) == pytest.approx(nums(tw["value"]), abs=0.03)  # whole pixels of 32x18
            assert g["gt"] == g["conversations"][1]["value"]  # the release's `gt` converted with the answer
            assert g["images"].startswith("rel/Generation/")  # relative to the output's folder
        assert run_check(str(out))["ok"]  # every image found from the output's own folder, `gt` in [0, 1] too


# --- what a converted record carries: its image size, its `gt` converted with its answer, images that exist ------
from lora_manip.data.check import run_check  # noqa: E402


def test_a_converted_record_states_the_image_size(src, tmp_path):
    normalize_file(src, tmp_path / "out.jsonl")
    sizes = [{k: r[k] for k in ("width", "height", "w", "h") if k in r}
             for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())]
    # read from the image for "header" and "flat"; records copied unchanged stay unchanged
    assert sizes == [{"width": 640, "height": 480}] * 3 + [{}, {}]
    rh = tmp_path / "rh.jsonl"  # RoboInter's spelling is kept, not doubled
    rh.write_text(json.dumps(rec("rh", '{"current_bbox": [[320, 240], [640, 480]]}', w=640, h=480)) + "\n")
    normalize_file(rh, tmp_path / "rh-out.jsonl")
    out = json.loads((tmp_path / "rh-out.jsonl").read_text())
    assert (out["w"], out["h"]) == (640, 480) and "width" not in out


def test_gt_is_converted_with_the_answer_and_data_check_holds_it_to_the_same_rule(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    answer = '{"future_traj": [[64, 48], [128, 96]]}'
    recs = [rec("text", answer, gt=answer, task="traj"),
            rec("json", answer, gt={"future_traj": [[64, 48], [128, 96]]}, task="traj"),
            rec("other", "[[320, 240], [640, 480]]", gt="[[320, 240], [640, 480]]", task="current_box")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = normalize_file(tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert s["converted"] == 3, s["problems"]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["gt"] for r in out] == ['{"future_traj": [[0.1, 0.1], [0.2, 0.2]]}',
                                      {"future_traj": [[0.1, 0.1], [0.2, 0.2]]}, "[[0.5, 0.5], [1.0, 1.0]]"]
    assert run_check(str(tmp_path / "out.jsonl"))["ok"]
    # a gt left in pixels beside a converted answer: data check names it; normalize refuses to guess which is right
    out[0]["gt"] = answer
    (tmp_path / "half.jsonl").write_text(json.dumps(out[0]) + "\n")
    report = run_check(str(tmp_path / "half.jsonl"))
    assert [(p["field"], p["kind"]) for p in report["problems"]] == [("gt", "coords_out_of_range")]
    s = normalize_file(tmp_path / "half.jsonl", tmp_path / "again.jsonl")
    assert [(p["field"], p["kind"]) for p in s["problems"]] == [("gt", "coords_out_of_range")]
    assert "`gt` and the answer are in different units" in s["problems"][0]["reason"]


def test_records_whose_image_is_missing_or_that_data_check_refuses_are_refused(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "f.png")
    gone = rec("gone", '{"current_bbox": [[320, 240], [640, 480]]}', width=640, height=480)
    gone["images"] = ["gone.png"]
    recs = [gone, rec("one", '{"future_traj": [[64, 48]]}'), rec("inverted", '{"current_bbox": [640, 480, 320, 240]}'),
            rec("fine", '{"future_traj": [[64, 48], [128, 96]]}')]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = normalize_file(tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert s["output"] is None and s["converted"] == 1
    assert [(p["record_id"], p["field"], p["kind"]) for p in s["problems"]] == [
        ("gone", "images", "missing_image"), ("one", "conversations", "short_trajectory"),
        ("inverted", "conversations", "box_inverted")]
    assert "gone.png not found" in s["problems"][0]["reason"]
