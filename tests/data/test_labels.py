"""`data normalize` of a lab's labels (CSV, COCO): every record states its image size and names images its output
file can find on its own; rows the kit would not accept later (missing image, unknown task, a one-point trajectory)
are refused by row and field, and the report says what was done."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from lora_manip.answers.kinds import TASK_KINDS
from lora_manip.cli import app
from lora_manip.data.check import run_check
from lora_manip.data.normalize import format_summary, normalize_file
from lora_manip.data.records import load_samples
from lora_manip.errors import UserError

runner = CliRunner()


def _images(folder, sizes=(("a.png", (640, 480)), ("b.png", (320, 180)))):
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes:
        Image.new("RGB", size).save(folder / name)
    return folder


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _coco(images, annotations):
    return {"images": images, "categories": [{"id": 7, "name": "mug"}], "annotations": annotations}


def test_every_record_states_the_size_of_its_image(tmp_path):
    _images(tmp_path)
    (tmp_path / "l.csv").write_text("image,task,question,answer,width,height\n"
                                    "a.png,current_box,Where?,320 240 640 480,,\n"  # size from the image
                                    "b.png,traj_choice,Which?,B,,\n"  # copied, still sized
                                    "a.png,contact_point,Where?,(64 48),640,480\n")  # size given
    s = normalize_file(tmp_path / "l.csv", tmp_path / "l.jsonl")
    assert s["problems"] == []
    assert [(r["width"], r["height"]) for r in _records(tmp_path / "l.jsonl")] == [(640, 480), (320, 180), (640, 480)]
    coco = _coco([{"id": 1, "file_name": "b.png"}, {"id": 2, "file_name": "a.png", "width": 640.0, "height": 480}],
                 [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [32, 18, 128, 72]},
                  {"id": 2, "image_id": 2, "category_id": 7, "bbox": [64, 48, 256, 192]}])
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    recs = _records(tmp_path / "c.jsonl")
    assert [(r["width"], r["height"]) for r in recs] == [(320, 180), (640, 480)], s["problems"]
    # what eval reads: the record's size, so it reports pixel distances too
    from lora_manip.eval.generate import eval_record
    from lora_manip.eval.score import score_records

    samples, problems = load_samples(tmp_path / "l.jsonl", tmp_path)
    assert problems == []
    preds = [eval_record(x, x.messages[-1]["content"], "l") for x in samples]
    assert (preds[2]["w"], preds[2]["h"]) == (640, 480)
    rows, _ = score_records(preds)
    assert rows[2]["distance_px"] == 0.0
    coco["images"][1]["width"] = "wide"
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c2.jsonl")
    assert [(p["record_id"], p["field"]) for p in s["problems"]] == [("2", "images")]
    assert "'wide' is not a number" in s["problems"][0]["reason"]


def test_image_paths_are_written_relative_to_the_output_file(tmp_path):
    _images(tmp_path / "data/images")
    (tmp_path / "data/l.csv").write_text("image,task,question,answer\n"
                                         "a.png,current_box,Where?,320 240 640 480\n"
                                         "sub/../b.png,traj_choice,Which?,B\n")
    out = tmp_path / "l.jsonl"  # its folder holds the images: the file works on its own
    res = runner.invoke(app, ["data", "normalize", str(tmp_path / "data/l.csv"), str(out), "--data-root",
                              str(tmp_path / "data/images")])
    assert res.exit_code == 0, res.output
    assert "image paths relative to OUT's folder" in res.output
    assert [r["images"] for r in _records(out)] == [["data/images/a.png"], ["data/images/b.png"]]
    assert run_check(str(out))["ok"]  # data check OUT: its images are found from its own folder
    from lora_manip.eval.sources import missing_images, resolve_data

    sources = resolve_data([str(out)])  # eval --data OUT
    samples, problems = load_samples(sources[0].path, sources[0].root)
    assert problems == [] and missing_images(sources, [samples]) is None
    # an output beside the data root, not above it: the paths stay relative to the data root, and the report says
    # which folder to give (`..` or absolute paths would be refused as leaving the file's folder)
    out2 = tmp_path / "elsewhere/l.jsonl"
    s = normalize_file(tmp_path / "data/l.csv", out2, data_root=tmp_path / "data/images")
    assert [r["images"] for r in _records(out2)] == [["a.png"], ["sub/../b.png"]]
    assert s["images_relative_to"] == str((tmp_path / "data/images").resolve()) and not s["images_from_out"]
    assert f"--data-root {(tmp_path / 'data/images').resolve()}" in format_summary(s)
    assert run_check(str(out2), data_root=str(tmp_path / "data/images"))["ok"]


def test_a_row_whose_image_is_missing_is_refused_even_when_its_size_is_given(tmp_path):
    _images(tmp_path)
    (tmp_path / "l.csv").write_text("image,task,question,answer,width,height\n"
                                    "a.png,current_box,Where?,320 240 640 480,640,480\n"
                                    "gone.png,current_box,Where?,320 240 640 480,640,480\n"
                                    "gone.png,traj_choice,Which?,B,640,480\n")
    s = normalize_file(tmp_path / "l.csv", tmp_path / "l.jsonl")
    assert s["output"] is None and [r["action"] for r in s["rows"]] == ["converted", "refused", "refused"]
    assert [(p["where"], p["field"], p["kind"]) for p in s["problems"]] == [
        ("line 3", "images", "missing_image"), ("line 4", "images", "missing_image")]
    assert "gone.png not found" in s["problems"][0]["reason"]
    coco = _coco([{"id": 1, "file_name": "gone.png", "width": 640, "height": 480}],
                 [{"id": 5, "image_id": 1, "category_id": 7, "bbox": [64, 48, 256, 192]}])
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    assert [(p["record_id"], p["field"], p["kind"]) for p in s["problems"]] == [("5-box", "images", "missing_image")]


def test_a_task_the_scorer_does_not_know_is_refused_with_the_names_it_knows(tmp_path):
    _images(tmp_path)
    (tmp_path / "l.csv").write_text("image,task,question,answer\n"
                                    "a.png,bogus_task,Where?,320 240 640 480\n"
                                    "a.png,box,Where?,320 240 640 480\n"  # a kind
                                    "a.png,rh20t_current_box_qa,Where?,320 240 640 480\n")  # a name of its table
    s = normalize_file(tmp_path / "l.csv", tmp_path / "l.jsonl")
    assert [r["action"] for r in s["rows"]] == ["refused", "converted", "converted"]
    (problem,) = s["problems"]
    assert (problem["where"], problem["field"]) == ("line 2", "task")
    assert "'bogus_task' is not a kind (box, point" in problem["reason"]
    assert all(name in problem["reason"] for name in TASK_KINDS)
    coco = _coco([{"id": 1, "file_name": "a.png"}],
                 [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [64, 48, 256, 192], "task": "bogus_task"},
                  {"id": 2, "image_id": 1, "category_id": 7, "bbox": [64, 48, 256, 192], "task": "traj"},
                  {"id": 3, "image_id": 1, "category_id": 7, "bbox": [64, 48, 256, 192], "task": "current_box"}])
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl")
    assert [(r["id"], r["action"]) for r in s["rows"]] == [("1-box", "refused"), ("2-box", "refused"),
                                                           ("3-box", "converted")]
    assert "not a kind" in s["problems"][0]["reason"]
    assert "'traj' is scored as a trajectory, but the annotation gives a box" in s["problems"][1]["reason"]


def test_a_one_point_trajectory_is_refused_by_data_checks_rule(tmp_path):
    _images(tmp_path)
    (tmp_path / "l.csv").write_text('image,task,question,answer\n'
                                    'a.png,traj,Where next?,"[[64, 48]]"\n'
                                    'a.png,traj,Where next?,"[[64, 48], [128, 96]]"\n')
    s = normalize_file(tmp_path / "l.csv", tmp_path / "l.jsonl")
    assert [r["action"] for r in s["rows"]] == ["refused", "converted"]
    assert [(p["field"], p["kind"]) for p in s["problems"]] == [("answer", "short_trajectory")]
    coco = _coco([{"id": 1, "file_name": "a.png"}],
                 [{"id": 1, "image_id": 1, "category_id": 7, "keypoints": [64, 48, 2, 0, 0, 0]}])
    (tmp_path / "c.json").write_text(json.dumps(coco))
    s = normalize_file(tmp_path / "c.json", tmp_path / "c.jsonl", keypoints="trajectory")
    assert [(p["record_id"], p["kind"]) for p in s["problems"]] == [("1-trajectory", "short_trajectory")]


def test_the_report_says_what_was_done_once(tmp_path):
    _images(tmp_path)
    (tmp_path / "l.csv").write_text('image,task,question,answer\n'
                                    'a.png,contact_point,Where?,"<point x=""50"" y=""20"">cup</point>"\n'
                                    'a.png,bogus,Where?,1 2\n'
                                    'gone.png,box,Where?,1 2 3 4\n')
    res = runner.invoke(app, ["data", "normalize", str(tmp_path / "l.csv"), str(tmp_path / "l.jsonl")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == ("2 problem(s) in 3 rows (1 converted, 0 copied (no coordinates), "
                                                   "2 refused); nothing written")
    (tmp_path / "l.csv").write_text('image,task,question,answer\n'
                                    'a.png,contact_point,Where?,"<point x=""50"" y=""20"">cup</point>"\n')
    s = normalize_file(tmp_path / "l.csv", tmp_path / "l.jsonl")
    assert s["rows"][0]["detail"] == "point read from Molmo tags as percent of the image"
    assert _records(tmp_path / "l.jsonl")[0]["conversations"][1]["value"] == '{"contact_point": [[0.5, 0.2]]}'


@pytest.mark.parametrize("name", ["out.csv", "out.txt", "out.json.gz"])
def test_an_output_that_is_not_json_or_jsonl_is_refused(tmp_path, name):
    _images(tmp_path)
    (tmp_path / "l.csv").write_text("image,task,question,answer\na.png,box,Where?,1 2 3 4\n")
    with pytest.raises(UserError, match=r"write a \.json .* or a \.jsonl file"):
        normalize_file(tmp_path / "l.csv", tmp_path / name)
    res = runner.invoke(app, ["data", "normalize", str(tmp_path / "l.csv"), str(tmp_path / name)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and not (tmp_path / name).exists()
